"""Accuracy and cost of the age stage's settings: networks x chip scales x mirror averaging, on labelled faces.

Detection and alignment run once per labels file; then each variant of :class:`AgeSettings` ages the same faces,
so the MAE and the age stage's seconds compare like with like. Prints one line per (labels file, variant).

    python scripts/age_variants.py ../shared/data/age/aaf/labels.csv ../shared/data/age/utkface/labels.csv
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from colortrend.config import default_config
from colortrend.labelled import LABELLED_MIN_FACE_PX, analyse_labelled, read_age_labels
from colortrend.pipeline import build_stages
from colortrend.stages.age import FINETUNED_WEIGHTS, AgeSettings, AgeStage

VARIANTS = {
    "default (4 networks), scale 1, mirror": AgeSettings(),
    "default, 3 scales, mirror": AgeSettings(scales=(0.94, 1.0, 1.06)),
    "default, scale 1, no mirror": AgeSettings(flip_average=False),
    **{f"{w.stem} alone, scale 1, mirror": AgeSettings(weights=str(w)) for w in FINETUNED_WEIGHTS},
}


def aligned_batches(labels_csv: str, split: str, batch_size: int = 32) -> list[tuple[dict, np.ndarray]]:
    """(aligned batch, true ages) pairs covering the listed photos of ``split``."""
    labels = read_age_labels(labels_csv, split)
    cfg = default_config(".", device="cpu", detect={"min_face_px": LABELLED_MIN_FACE_PX})
    stages = build_stages(cfg, "cpu", upto="align")  # the run's chain, as `eval age` runs it, before the age stage
    batches = []
    for start in range(0, len(labels), batch_size):
        part = labels.iloc[start : start + batch_size]
        batches.append((analyse_labelled(stages, part["file"].tolist()), part["age"].to_numpy()))
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labels", nargs="+", help="labels.csv files (path,age)")
    parser.add_argument("--split", default="val", choices=["all", "train", "val"])
    args = parser.parse_args()
    for csv in args.labels:
        batches = aligned_batches(csv, args.split)
        for name, settings in VARIANTS.items():
            stage = AgeStage(settings)
            stage.setup()
            started, errors = time.perf_counter(), []
            for batch, ages in batches:
                out = stage(dict(batch))
                errors += [abs(out["age"][i][0] - age) for i, age in enumerate(ages) if len(out["age"][i])]
            print(f"{Path(csv).parent.name}\t{name}\tMAE {np.mean(errors):.3f}\tn {len(errors)}"
                  f"\tage stage {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
