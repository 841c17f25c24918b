"""``colortrend eval parsing``: score the pipeline's garment masks against Clothing Co-Parsing style labels.

Each photo listed in a ``labels.csv`` (``image,mask`` columns, paths relative to the CSV; masks hold CCP label ids) goes
through the run's own chain up to the segment stage (intake, detect, segment), with a run's settings. CCP labels only
the photo's main person (passers-by are background), so the person scored is the one with the largest detected face;
their garment pixels (upper and lower classes) are compared with CCP's garment classes over the whole photo. CCP's
ambiguous classes (hat, scarf, tie, gloves, socks, stockings, tights, belt, accessories) are not scored.

Photos where no face is found count as ``missed`` and are scored as an empty prediction, as the saved masks (and any
outside scoring of them) would be. A mask that labels nobody (CCP has such a photo) cannot say what the main person
wears: the photo counts as ``unlabelled`` and is not scored. The validation split
(:func:`colortrend.labelled.is_validation`) is fixed by photo number: ``colortrend train parsing`` never trains on it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from colortrend.config import Config, default_config
from colortrend.labelled import Split, analyse_labelled, read_mask_labels
from colortrend.models.parse_classes import GARMENT_CLASSES, IGNORE, PARSE_CLASSES, ccp_lookup
from colortrend.pipeline import build_stages
from colortrend.stages.base import Batch, Stage


def parsing_stages(labels_csv: str | Path, device: str = "cpu", cfg: Config | None = None) -> list[Stage]:
    """The run's chain up to ``segment`` (intake, detect, segment) with ``cfg``'s settings (default: a run's)."""
    cfg = cfg or default_config(str(Path(labels_csv).parent), device=device)
    return build_stages(cfg, device, upto="segment")


def main_person_labels(batch: Batch, i: int) -> np.ndarray | None:
    """Photo ``i``'s class map (analysed-image size) of the person with the largest face; None if no face was found."""
    if batch["status"][i] != "ok" or not batch["n_faces"][i]:
        return None
    area = (batch["box_x2"][i] - batch["box_x1"][i]) * (batch["box_y2"][i] - batch["box_y1"][i])
    out = np.zeros(batch["image"][i].shape[:2], np.uint8)
    parse = batch["person_parse"][i][int(np.argmax(area))]
    if parse is not None:
        x0, y0, labels = parse
        out[y0:y0 + labels.shape[0], x0:x0 + labels.shape[1]] = labels
    return out


class _Tally:
    """Pixel counts pooled over photos, per class and for garments against the rest."""

    def __init__(self) -> None:
        self.inter = np.zeros(len(PARSE_CLASSES), np.int64)
        self.pred = np.zeros(len(PARSE_CLASSES), np.int64)
        self.true = np.zeros(len(PARSE_CLASSES), np.int64)
        self.garment = np.zeros(3, np.int64)  # intersection, predicted, true
        self.per_photo: list[tuple[float, float, float]] = []

    def add(self, pred: np.ndarray, truth: np.ndarray) -> None:
        scored = truth != IGNORE
        n = len(PARSE_CLASSES)
        p, t = pred[scored].astype(np.int64), truth[scored].astype(np.int64)
        self.inter += np.bincount(p[p == t], minlength=n)[:n]
        self.pred += np.bincount(p, minlength=n)[:n]
        self.true += np.bincount(t, minlength=n)[:n]
        pg, tg = np.isin(p, GARMENT_CLASSES), np.isin(t, GARMENT_CLASSES)
        counts = np.array([(pg & tg).sum(), pg.sum(), tg.sum()])
        self.garment += counts
        self.per_photo.append(_ratios(*counts))


def _ratios(inter: int, pred: int, true: int) -> tuple[float, float, float]:
    """IoU, precision, recall; an empty prediction of an empty truth is perfect."""
    union = pred + true - inter
    return (inter / union if union else 1.0, inter / pred if pred else float(true == 0),
            inter / true if true else float(pred == 0))


def evaluate_parsing(labels_csv: str | Path, device: str = "cpu", save_masks_dir: str | Path | None = None,
                     split: Split = "all", batch_size: int = 16, cfg: Config | None = None) -> dict:
    """Garment-vs-rest IoU, precision and recall of the main person's mask, pooled over pixels and averaged per
    photo, per-class IoU (``iou_by_class``), ``n`` (photos scored), ``missed`` (photos without a detected face, scored
    as empty) and ``unlabelled`` (photos whose mask labels nobody, not scored).

    ``save_masks_dir``: writes ``<image stem>.png`` per photo, 255 where the main person's garments are predicted,
    0 elsewhere, at the photo's size (all 0 where no face was found).
    """
    import cv2

    labels = read_mask_labels(labels_csv, split)
    stages = parsing_stages(labels_csv, device, cfg)
    lut = ccp_lookup()
    if save_masks_dir is not None:
        Path(save_masks_dir).mkdir(parents=True, exist_ok=True)
    tally, missed, unlabelled = _Tally(), 0, 0
    for start in range(0, len(labels), batch_size):
        part = labels.iloc[start:start + batch_size]
        batch = analyse_labelled(stages, part["image_file"].tolist())
        for i, (image, mask_file) in enumerate(zip(part["image"], part["mask_file"])):
            truth = lut[cv2.imread(mask_file, cv2.IMREAD_UNCHANGED)]
            pred = main_person_labels(batch, i)
            if pred is None:
                pred = np.zeros(truth.shape, np.uint8)
            elif pred.shape != truth.shape:  # analysed at a reduced size: back to the labels' pixels
                pred = cv2.resize(pred, truth.shape[::-1], interpolation=cv2.INTER_NEAREST)
            if not truth.any():
                unlabelled += 1
            else:
                missed += int(not batch["n_faces"][i])
                tally.add(pred, truth)
            if save_masks_dir is not None:
                garment = np.isin(pred, GARMENT_CLASSES).astype(np.uint8) * 255
                cv2.imwrite(str(Path(save_masks_dir) / f"{Path(image).stem}.png"), garment)

    iou, precision, recall = _ratios(*tally.garment)
    per_photo = np.array(tally.per_photo).reshape(-1, 3)
    union = tally.pred + tally.true - tally.inter
    return {
        "iou": round(iou, 4), "precision": round(precision, 4), "recall": round(recall, 4),
        "mean_iou": round(float(per_photo[:, 0].mean()), 4) if len(per_photo) else None,
        "mean_precision": round(float(per_photo[:, 1].mean()), 4) if len(per_photo) else None,
        "mean_recall": round(float(per_photo[:, 2].mean()), 4) if len(per_photo) else None,
        "iou_by_class": {name: round(float(tally.inter[k] / union[k]), 4) if union[k] else None
                         for k, name in enumerate(PARSE_CLASSES)},
        "n": len(tally.per_photo), "missed": missed, "unlabelled": unlabelled, "split": split,
    }


def format_parsing_metrics(metrics: dict) -> str:
    """The human-readable report of ``colortrend eval parsing`` (``--json`` prints ``metrics`` instead)."""
    by_class = ", ".join(f"{k} {v}" for k, v in metrics["iou_by_class"].items())
    m = metrics
    return "\n".join([
        f"photos scored {m['n']} ({m['split']} split), without a detected face {m['missed']}, "
        + f"unlabelled {m['unlabelled']}",
        f"garments, pooled pixels: IoU {m['iou']}, precision {m['precision']}, recall {m['recall']}",
        f"garments, mean per photo: IoU {m['mean_iou']}, precision {m['mean_precision']}, recall {m['mean_recall']}",
        f"IoU by class: {by_class}",
    ])
