"""Raw vs age-error-corrected cohort shares on synthetic populations whose true shares are known.

Each synthetic person has a true age, a colour whose probability depends on the birth cohort ("step": 95后 wear
black 70 % vs 20 % elsewhere; "trend": a smooth drift across birth years), and an estimated age = true age +
Normal(0, sd). Prints the mean absolute error of the black share per cohort, raw and corrected (share_soft).

    python scripts/cohort_correction.py
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from colortrend.color.names import NAMED_COLORS
from colortrend.aggregate.histograms import HistogramSettings, build_histograms

SETTINGS = HistogramSettings(min_persons=1, bootstrap=1)
RGB = {c.en: c.rgb for c in NAMED_COLORS}


def population(ages: np.ndarray, black: np.ndarray, age_sd: float, year: int = 2016) -> pd.DataFrame:
    rgb = np.array([RGB["black"] if b else RGB["white"] for b in black], dtype=np.uint8)
    n = len(ages)
    return pd.DataFrame({
        "photo_id": [f"p{i:06d}" for i in range(n)], "face_idx": 0, "content_hash": [f"h{i}" for i in range(n)],
        "age": ages, "age_sd": age_sd, "taken_year": year, "quality_ok": True,
        "dominant_r": rgb[:, 0], "dominant_g": rgb[:, 1], "dominant_b": rgb[:, 2],
    })


def share_errors(kind: str, n: int, sd: float, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    true_age = rng.uniform(10, 50, n)
    born = 2016 - np.floor(true_age + 0.5)
    if kind == "step":
        p = np.where((born >= 1995) & (born <= 1999), 0.7, 0.2)
    else:
        p = np.clip(0.1 + (born - 1966) / 40 * 0.6, 0, 1)
    black = rng.random(n) < p
    table = build_histograms(population(true_age + rng.normal(0, sd, n), black, sd), SETTINGS).to_pandas()
    table = table[(table.group_type == "cohort") & (table.bin_id == "black")].set_index("group")
    truth = pd.Series({
        label: black[(born >= first) & (born <= last)].mean() for label, first, last in SETTINGS.cohorts
    })
    return (table["share"] - truth).abs().mean(), (table["share_soft"] - truth).abs().mean()


def main() -> None:
    print("| case | persons | age error sd | raw | corrected |\n|---|---|---|---|---|")
    for kind in ("step", "trend"):
        for n in (3000, 20000):
            for sd in (3.0, 6.0):
                raw, corrected = np.array([share_errors(kind, n, sd, s) for s in range(3)]).mean(axis=0)
                print(f"| {kind} | {n} | {sd} | {raw:.3f} | {corrected:.3f} |")


if __name__ == "__main__":
    main()
