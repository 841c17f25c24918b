"""``colortrend eval age``: score the project's own detect -> align -> age path against labelled photos.

Each photo listed in a ``labels.csv`` (``path,age`` columns, paths relative to the CSV) goes through the run's own
chain up to the age stage (intake, detect, align, age: ``pipeline.build_stages(..., upto=("align", "age"))``) with
a run's settings; the most confident face is the labelled one. Photos without a detected face count as ``missed``
and are not scored.

The validation split (:func:`colortrend.labelled.validation_mask`) is a fixed 15 % of each labelled folder chosen
by a hash of the path: ``colortrend train age`` never trains on it, so ``--split val`` gives figures for faces the
model has not seen.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from colortrend.config import Config, default_config
from colortrend.labelled import LABELLED_MIN_FACE_PX, Split, analyse_labelled, read_age_labels
from colortrend.pipeline import build_stages

#: Age bands reported separately (inclusive bounds; None = no upper bound).
AGE_BANDS: tuple[tuple[int, int | None], ...] = ((0, 12), (13, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, None))
#: Ages of the 95后 cohort in 2016 (born 1995-1999): how many such faces land there matters most to the report.
COHORT_WINDOW = (17, 21)
#: True ages whose mean error is reported on its own: too old an estimate moves them out of their cohort.
YOUNG = (16, 21)


def predict_ages(
    labels_csv: str | Path,
    device: str = "cpu",
    weights: str | tuple[str, ...] | None = None,
    split: Split = "all",
    batch_size: int = 32,
    cfg: Config | None = None,
) -> pd.DataFrame:
    """One row per listed photo: ``path``, ``age``, ``predicted_age`` (NaN where no face) and the face's quality.

    The photos go through the run's own chain up to ``age``, with ``cfg``'s settings (default: a run's defaults,
    faces searched down to :data:`~colortrend.labelled.LABELLED_MIN_FACE_PX`); ``weights`` replaces ``age.weights``.
    Extra columns: ``age_sd``, ``det_score``, ``face_px``, ``sharpness``, ``yaw``, ``quality_ok``,
    ``filter_reason`` (the ``align`` filters), and the label's ``age_lo``, ``age_hi`` (the band; the age itself for
    exact labels) and ``group``.
    """
    labels = read_age_labels(labels_csv, split)
    if cfg is None:
        cfg = default_config(str(Path(labels_csv).parent), device=device, detect={"min_face_px": LABELLED_MIN_FACE_PX})
    if weights:
        cfg = dataclasses.replace(cfg, age=dataclasses.replace(cfg.age, weights=weights))
    stages = build_stages(cfg, device, upto=("align", "age"))  # align: the face quality columns
    columns = ("age_sd", "det_score", "face_px", "sharpness", "yaw", "quality_ok", "filter_reason")
    rows: list[dict] = []
    for start in range(0, len(labels), batch_size):
        batch = analyse_labelled(stages, labels["file"].iloc[start:start + batch_size].tolist())
        for ages, *faces in zip(batch["age"], *(batch[key] for key in columns)):
            found = len(ages) > 0  # the labelled face: the most confident one, first
            row = {"predicted_age": float(ages[0]) if found else np.nan}
            row.update({key: values[0] if found else None for key, values in zip(columns, faces)})
            rows.append(row)
    predictions = pd.DataFrame(rows, index=labels.index, columns=["predicted_age", *columns])
    out = pd.concat([labels[["path", "age"]], predictions, labels[["age_lo", "age_hi", "group"]]], axis=1)
    return out


def age_metrics(predictions: pd.DataFrame) -> dict:
    """Error figures of a :func:`predict_ages` table (faces scored = photos with a prediction); band labels get
    :func:`band_metrics` instead.

    ``mae``, ``median_ae``, ``bias`` (mean predicted - true), ``rmse``, ``n``, ``missed``, ``missed_rate``,
    ``mae_by_band``, ``bias_by_band`` and ``n_by_band`` (true-age bands), ``bias_16_21``, ``window_17_21``
    recall/precision (rounded predictions), ``quality_ok`` (MAE and coverage of faces passing the quality filters)
    and ``filtered`` (per reason).
    """
    if "age_lo" in predictions and predictions["age"].isna().any():
        return band_metrics(predictions)
    scored = predictions.dropna(subset=["predicted_age"])
    err = scored["predicted_age"].to_numpy(float) - scored["age"].to_numpy(float)
    true_age = scored["age"].to_numpy(float)
    out: dict = {
        "mae": _round(np.abs(err).mean()) if len(err) else None,
        "median_ae": _round(np.median(np.abs(err))) if len(err) else None,
        "bias": _round(err.mean()) if len(err) else None,
        "rmse": _round(np.sqrt((err**2).mean())) if len(err) else None,
        "n": len(scored),
        "missed": int(len(predictions) - len(scored)),
        "missed_rate": _round((len(predictions) - len(scored)) / max(1, len(predictions)), 4),
        "mae_by_band": {},
        "bias_by_band": {},
        "n_by_band": {},
    }
    for lo, hi in AGE_BANDS:
        name = f"{lo}-{hi}" if hi is not None else f"{lo}+"
        in_band = (true_age >= lo) & (true_age <= (hi if hi is not None else np.inf))
        out["n_by_band"][name] = int(in_band.sum())
        out["mae_by_band"][name] = _round(np.abs(err[in_band]).mean()) if in_band.any() else None
        out["bias_by_band"][name] = _round(err[in_band].mean()) if in_band.any() else None
    young = (true_age >= YOUNG[0]) & (true_age <= YOUNG[1])  # the ages that decide the 95后 of a 2016 collection
    out[f"bias_{YOUNG[0]}_{YOUNG[1]}"] = _round(err[young].mean()) if young.any() else None
    lo, hi = COHORT_WINDOW
    truly = (true_age >= lo) & (true_age <= hi)
    predicted_age = np.floor(scored["predicted_age"].to_numpy(float) + 0.5)
    landed = (predicted_age >= lo) & (predicted_age <= hi)
    out[f"window_{lo}_{hi}"] = {
        "recall": _round((truly & landed).sum() / truly.sum(), 4) if truly.any() else None,
        "precision": _round((truly & landed).sum() / landed.sum(), 4) if landed.any() else None,
        "n_true": int(truly.sum()),
        "n_predicted": int(landed.sum()),
    }
    if "quality_ok" in scored:
        ok = scored["quality_ok"].fillna(False).astype(bool).to_numpy()
        out["quality_ok"] = {
            "n": int(ok.sum()),
            "coverage": _round(ok.mean(), 4) if len(ok) else None,
            "mae": _round(np.abs(err[ok]).mean()) if ok.any() else None,
        }
        reasons = scored["filter_reason"].fillna("").to_numpy(str)  # "" = passed
        out["filtered"] = {
            str(r): {"n": int((reasons == r).sum()), "mae": _round(np.abs(err[reasons == r]).mean())}
            for r in sorted(set(reasons) - {""})
        }
    return out


def band_metrics(predictions: pd.DataFrame) -> dict:
    """Figures of faces labelled with age bands (FairFace): how often the estimate, rounded to whole years, falls in
    the labelled band (``band_accuracy``, also per band and per ``group``), the mean distance of the estimate from
    the band (``band_mae``, 0 inside), and for faces labelled 10-19 the share estimated 19 or younger."""
    scored = predictions.dropna(subset=["predicted_age"])
    estimate = np.floor(scored["predicted_age"].to_numpy(float) + 0.5)
    lo, hi = scored["age_lo"].to_numpy(float), scored["age_hi"].to_numpy(float)
    inside = (estimate >= lo) & (estimate <= hi)
    distance = np.clip(lo - scored["predicted_age"], 0, None) + np.clip(scored["predicted_age"] - hi, 0, None)
    bands = scored["age_lo"].astype(int).astype(str) + "-" + scored["age_hi"].astype(int).astype(str)
    out: dict = {
        "n": len(scored),
        "missed": int(len(predictions) - len(scored)),
        "missed_rate": _round((len(predictions) - len(scored)) / max(1, len(predictions)), 4),
        "band_accuracy": _round(inside.mean(), 4) if len(scored) else None,
        "band_mae": _round(np.mean(distance)) if len(scored) else None,
        "band_accuracy_by_band": {b: _round(inside[(bands == b).to_numpy()].mean(), 4) for b in sorted(set(bands),
                                  key=lambda b: int(b.split("-")[0]))},
        "n_by_band": {b: int((bands == b).sum()) for b in sorted(set(bands), key=lambda b: int(b.split("-")[0]))},
    }
    teens = ((lo == 10) & (hi == 19))
    if teens.any():
        out["teens_estimated_under_20"] = _round((estimate[teens] <= 19).mean(), 4)
        out["teens_mean_estimate"] = _round(scored["predicted_age"].to_numpy(float)[teens].mean())
    if scored["group"].notna().any():
        groups = scored["group"].astype(str).to_numpy()
        out["band_accuracy_by_group"] = {g: _round(inside[groups == g].mean(), 4) for g in sorted(set(groups))}
        out["missed_by_group"] = {
            g: _round(predictions.loc[predictions["group"].astype(str) == g, "predicted_age"].isna().mean(), 4)
            for g in sorted(set(groups))}
    return out


def _round(value: float, digits: int = 3) -> float:
    return round(float(value), digits)


def format_age_metrics(metrics: dict) -> str:
    """The human-readable report of ``colortrend eval age`` (``--json`` prints ``metrics`` instead)."""
    if "band_accuracy" in metrics:
        return _format_band_metrics(metrics)
    lines = [
        f"faces scored {metrics['n']}, photos without a face {metrics['missed']} ({metrics['missed_rate']:.1%})",
        f"MAE {metrics['mae']} years, median {metrics['median_ae']}, bias {metrics['bias']:+}, RMSE {metrics['rmse']}"
        if metrics["n"]
        else "no face scored",
        "MAE by true age: "
        + ", ".join(f"{band} {mae} (n={metrics['n_by_band'][band]})" for band, mae in metrics["mae_by_band"].items()),
        "bias by true age: " + ", ".join(f"{band} {bias:+}" for band, bias in metrics["bias_by_band"].items()
                                          if bias is not None)
        + (f"; ages {YOUNG[0]}-{YOUNG[1]} {metrics[f'bias_{YOUNG[0]}_{YOUNG[1]}']:+}"
           if metrics[f"bias_{YOUNG[0]}_{YOUNG[1]}"] is not None else ""),
    ]
    lo, hi = COHORT_WINDOW
    window = metrics[f"window_{lo}_{hi}"]
    lines.append(f"ages {lo}-{hi}: recall {window['recall']}, precision {window['precision']}")
    if "quality_ok" in metrics:
        ok = metrics["quality_ok"]
        lines.append(f"passing the quality filters: {ok['n']} faces ({ok['coverage']}), MAE {ok['mae']}")
        for reason, info in metrics["filtered"].items():
            lines.append(f"  filtered as {reason}: {info['n']} faces, MAE {info['mae']}")
    return "\n".join(lines)


def _format_band_metrics(metrics: dict) -> str:
    lines = [
        f"faces scored {metrics['n']}, photos without a face {metrics['missed']} ({metrics['missed_rate']:.1%})",
        f"estimate inside the labelled band: {metrics['band_accuracy']}; mean distance from the band "
        f"{metrics['band_mae']} years",
        "by band: " + ", ".join(f"{b} {a} (n={metrics['n_by_band'][b]})"
                                for b, a in metrics["band_accuracy_by_band"].items()),
    ]
    if "teens_estimated_under_20" in metrics:
        lines.append(f"faces labelled 10-19 estimated 19 or younger: {metrics['teens_estimated_under_20']} "
                     f"(mean estimate {metrics['teens_mean_estimate']})")
    if "band_accuracy_by_group" in metrics:
        lines.append("by group: " + ", ".join(f"{g} {a}" for g, a in metrics["band_accuracy_by_group"].items()))
    return "\n".join(lines)
