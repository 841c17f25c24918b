"""``colortrend eval color``: how far segmentation moves the measured garment colour.

For each photo of a parsing-style ``labels.csv`` (``image,mask`` columns, paths relative to the CSV; masks hold CCP
class ids), the dominant colour of the main person is measured twice, both with white balance off and the run's
clustering settings: from the ground-truth garment pixels (CCP garment classes, as the parser is trained to see them)
and as the pipeline measures it, through the run's chain up to the dominant stage (intake, detect, segment, correct,
dominant). CCP labels only the photo's main person, taken to be the one with the largest detected face (as in ``eval
parsing``).

Scores are CIEDE2000 between the two colours: median, 90th percentile and mean over the photos scored (``n``); photos
where the pipeline found no face, or did not parse the main person, count as ``missed``. The same figures are given for
the photos where one colour clearly dominates the ground truth (its cluster holds at least ``clear_share`` of the
garment pixels), where "the dominant colour" is well defined.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from colortrend.color.kmeans import palettes
from colortrend.color.space import delta_e2000
from colortrend.config import Config, default_config
from colortrend.pipeline import build_stages
from colortrend.stages.base import Batch

#: Ground-truth dominant share from which one colour "clearly dominates" a person's garments.
CLEAR_SHARE = 0.6


def predict_colors(
    labels_csv: str | Path, device: str = "cpu", batch_size: int = 8, split: str = "all", cfg: Config | None = None
) -> pd.DataFrame:
    """One row per listed photo: ``image``, the ground-truth dominant colour (``gt_r/g/b``, ``gt_lab_l/a/b``,
    ``gt_share``), the pipeline's (``pred_*``, NaN where missed) and their CIEDE2000 ``delta_e``.

    The photos go through the run's chain up to ``dominant`` with ``cfg``'s settings (default: a run's), white
    balance off either way: the ground truth is measured on the photo as it is."""
    from PIL import Image

    from colortrend.labelled import analyse_labelled, read_mask_labels
    from colortrend.models.parse_classes import GARMENT_CLASSES, ccp_lookup

    labels = read_mask_labels(labels_csv, split)  # split "val": the photos the parser never trained on
    garment_ids = np.flatnonzero(np.isin(ccp_lookup(), GARMENT_CLASSES))
    cfg = cfg or default_config(str(Path(labels_csv).parent), device=device)
    cfg = dataclasses.replace(cfg, color=dataclasses.replace(cfg.color, white_balance="none"))
    stages = build_stages(cfg, device, upto="dominant")
    settings = cfg.color

    rows = []
    for start in range(0, len(labels), batch_size):
        part = labels.iloc[start:start + batch_size]
        batch = analyse_labelled(stages, part["image_file"].tolist())
        masks = [np.asarray(Image.open(p)) for p in part["mask_file"]]
        gt = palettes([image[np.isin(mask, garment_ids)] for image, mask in zip(batch["image"], masks)],
                      k=settings.k, max_pixels=settings.max_pixels, merge_delta_e=settings.merge_delta_e,
                      seed=settings.seed)
        for i, (image_path, palette) in enumerate(zip(part["image"], gt)):
            rows.append({"image": image_path, **_gt_columns(palette), **_main_person_columns(batch, i)})
    table = pd.DataFrame(rows)
    table["delta_e"] = delta_e2000(table[["gt_lab_l", "gt_lab_a", "gt_lab_b"]].to_numpy(float),
                                   table[["pred_lab_l", "pred_lab_a", "pred_lab_b"]].to_numpy(float))
    return table


def _gt_columns(palette) -> dict:
    if palette is None:  # no garment labelled in the photo
        return dict.fromkeys(("gt_r", "gt_g", "gt_b", "gt_lab_l", "gt_lab_a", "gt_lab_b", "gt_share"), np.nan)
    return {**{f"gt_{c}": int(v) for c, v in zip("rgb", palette.dominant_rgb)},
            **{f"gt_lab_{c}": float(v) for c, v in zip("lab", palette.dominant_lab)},
            "gt_share": palette.dominant_share}


def _main_person_columns(batch: Batch, i: int) -> dict:
    """The pipeline's dominant colour of the photo's largest detected face (NaN when missing)."""
    columns = ("pred_r", "pred_g", "pred_b", "pred_lab_l", "pred_lab_a", "pred_lab_b", "pred_share")
    if batch["status"][i] != "ok" or not batch["n_faces"][i]:
        return dict.fromkeys(columns, np.nan)
    area = (batch["box_x2"][i] - batch["box_x1"][i]) * (batch["box_y2"][i] - batch["box_y1"][i])
    j = int(np.argmax(area))
    if batch["dominant_r"][i][j] is None:
        return dict.fromkeys(columns, np.nan)
    sources = ("dominant_r", "dominant_g", "dominant_b", "dominant_lab_l", "dominant_lab_a", "dominant_lab_b",
               "dominant_share")
    return {column: batch[source][i][j] for column, source in zip(columns, sources)}


def color_metrics(predictions: pd.DataFrame, clear_share: float = CLEAR_SHARE) -> dict:
    """Figures of a :func:`predict_colors` table: ``median``, ``p90``, ``mean`` (CIEDE2000), ``n``, ``missed``,
    ``no_garment`` (photos with no ground-truth garment pixel, not scored) and the same on ``clear`` photos."""
    labelled = predictions.dropna(subset=["gt_lab_l"])

    def summary(rows: pd.DataFrame) -> dict:
        scored = rows["delta_e"].dropna().to_numpy(float)
        return {
            "median": round(float(np.median(scored)), 3) if len(scored) else None,
            "p90": round(float(np.percentile(scored, 90)), 3) if len(scored) else None,
            "mean": round(float(scored.mean()), 3) if len(scored) else None,
            "n": len(scored),
            "missed": len(rows) - len(scored),
        }

    return {**summary(labelled), "no_garment": int(len(predictions) - len(labelled)), "clear_share": clear_share,
            "clear": summary(labelled[labelled["gt_share"] >= clear_share])}


def format_color_metrics(metrics: dict) -> str:
    """The human-readable report of ``colortrend eval color`` (``--json`` prints ``metrics`` instead)."""
    def line(name: str, m: dict) -> str:
        if not m["n"]:
            return f"{name}: nothing scored ({m['missed']} missed)"
        return (f"{name}: CIEDE2000 median {m['median']}, p90 {m['p90']}, mean {m['mean']} "
                f"(n={m['n']}, missed {m['missed']})")

    return "\n".join([
        line("all photos", metrics),
        line(f"one colour >= {metrics['clear_share']:.0%} of the garments", metrics["clear"]),
    ])
