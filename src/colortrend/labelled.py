"""Labelled data, read the same way by ``colortrend eval ...``, ``colortrend train ...`` and the scripts.

Two kinds of labels files, both CSVs with paths relative to the file:

* faces with ages (``path,age``, or ``path,age_lo,age_hi`` for age bands as FairFace labels them):
  :func:`read_age_labels`;
* photos with garment masks (``image,mask``, masks holding Clothing Co-Parsing class ids): :func:`read_mask_labels`.

Each kind has one fixed validation split that training never trains on, so ``--split val`` scores unseen data:
15 % of each age folder chosen by a hash of the path (:func:`validation_mask`), and the CCP photos whose number
is divisible by 8 (:func:`is_validation`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from colortrend.errors import ConfigError
from colortrend.stages.base import Batch, Stage

#: Which labelled rows a command uses: all of them, those training learns from, or the held-out ones.
Split = Literal["all", "train", "val"]
#: Share of each labelled age folder held out for validation.
VALIDATION_FRACTION = 0.15
#: Smallest face searched in labelled face photos (``detect.min_face_px`` there): the labelled sets are face
#: crops, their faces are never tiny.
LABELLED_MIN_FACE_PX = 32


def validation_mask(paths: Sequence[str], fraction: float = VALIDATION_FRACTION) -> np.ndarray:
    """True for age-labelled paths in the validation split: a stable hash of the path (as written in labels.csv)."""
    buckets = [int.from_bytes(hashlib.sha1(p.encode()).digest()[:4], "big") % 10_000 for p in paths]
    return np.array(buckets, dtype=np.int64) < fraction * 10_000


def read_age_labels(labels_csv: str | Path, split: Split = "all") -> pd.DataFrame:
    """The labelled faces of ``split``: ``path`` (as in the CSV), ``age``, ``age_lo``, ``age_hi``, ``group`` and
    ``file`` (absolute path).

    A face is labelled with an exact ``age`` (``age_lo`` = ``age_hi`` = ``age``) or with an age band ``age_lo``-
    ``age_hi``, both ends inclusive (``age`` is then NaN), as FairFace labels them. ``group`` is the optional
    ``race`` column (None without it), by which band figures are also reported.
    """
    labels_csv = Path(labels_csv)
    try:
        labels = pd.read_csv(labels_csv)
    except ValueError as exc:  # not a CSV, not text, empty
        raise ConfigError(f"{labels_csv}: not a readable CSV ({' '.join(str(exc).split())})") from None
    columns = set(labels.columns)
    if "path" not in columns or not ("age" in columns or {"age_lo", "age_hi"} <= columns):
        raise ConfigError(f"{labels_csv}: expected columns path and age, or path, age_lo and age_hi (an age band)")
    out = pd.DataFrame({"path": labels["path"].astype(str)})
    if "age" in labels.columns:
        out["age"] = pd.to_numeric(labels["age"], errors="coerce")
        out["age_lo"], out["age_hi"] = out["age"], out["age"]
    else:
        out["age"] = np.nan
        out["age_lo"] = pd.to_numeric(labels["age_lo"], errors="coerce")
        out["age_hi"] = pd.to_numeric(labels["age_hi"], errors="coerce")
    if out[["age_lo", "age_hi"]].isna().any().any() or (out["age_lo"] > out["age_hi"]).any():
        bad = out.index[out["age_lo"].isna() | out["age_hi"].isna() | (out["age_lo"] > out["age_hi"])][0]
        raise ConfigError(f"{labels_csv}: row {bad + 2} has no valid age or age band")
    out["group"] = labels["race"].astype(str) if "race" in labels.columns else None
    if split != "all":
        val = validation_mask(out["path"].tolist())
        out = out[val if split == "val" else ~val]
    out = out.reset_index(drop=True)
    out["file"] = [str(labels_csv.parent / p) for p in out["path"]]
    return out


def photo_number(path: str | Path) -> int:
    """CCP's numeric photo id from a file name (``0008.jpg``, ``ccp_0008.jpg`` -> 8)."""
    return int(re.findall(r"\d+", Path(path).stem)[-1])


def is_validation(path: str | Path) -> bool:
    """The fixed validation split of mask-labelled photos: photo numbers divisible by 8."""
    return photo_number(path) % 8 == 0


def read_mask_labels(labels_csv: str | Path, split: Split = "all") -> pd.DataFrame:
    """``image`` and ``mask`` (as in the CSV), ``image_file`` and ``mask_file`` (absolute) of the rows of ``split``."""
    labels_csv = Path(labels_csv)
    try:
        labels = pd.read_csv(labels_csv, usecols=["image", "mask"])
    except ValueError as exc:  # missing columns, not a CSV, not text
        raise ConfigError(f"{labels_csv}: expected a CSV with image and mask columns ({' '.join(str(exc).split())})"
                          ) from None
    if split != "all":
        val = np.array([is_validation(p) for p in labels["image"]], bool)
        labels = labels[val if split == "val" else ~val].reset_index(drop=True)
    labels["image_file"] = [str((labels_csv.parent / p).resolve()) for p in labels["image"]]
    labels["mask_file"] = [str((labels_csv.parent / p).resolve()) for p in labels["mask"]]
    return labels


def analyse_labelled(stages: list[Stage], files: list[str]) -> Batch:
    """Labelled photos through a chain from :func:`colortrend.pipeline.build_stages` (intake first), as a run
    analyses them. A photo intake cannot read is a problem of the labels file: a ConfigError naming it."""
    from colortrend.pipeline import new_batch, run_chain

    batch = run_chain(stages[:1], new_batch(files))
    for path, status, error in zip(files, batch["status"], batch["error"]):
        if status != "ok":
            raise ConfigError(f"{path}: cannot read the labelled photo ({status}: {error})")
    return run_chain(stages[1:], batch)


def load_rgb(path: str) -> np.ndarray:
    """Decode a labelled photo exactly as the pipeline's intake does by default (EXIF orientation applied, RGB
    uint8); an unreadable one is a problem of the labels file."""
    from colortrend.stages.intake import InputSettings, decode_image

    defaults = {f.name: f.default for f in dataclasses.fields(InputSettings)}
    try:
        with open(path, "rb") as f:
            data = f.read()
        return decode_image(data, defaults["max_pixels"], defaults["max_side"])["image"]
    except Exception as exc:  # any unreadable labelled photo is a problem of the labels file
        raise ConfigError(f"{path}: cannot read the labelled photo ({exc})") from exc
