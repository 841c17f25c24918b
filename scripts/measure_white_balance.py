"""Measure the white-balance methods on CCP street photos given known synthetic colour casts.

Each photo is re-lit under several illuminants (tungsten to shade along the Planckian and daylight loci, plus a
green and a magenta tint) and corrected by every method. Two errors per (photo, cast, method):

* angular error (degrees) between the light the method estimated and the cast that was applied;
* CIEDE2000 between the dominant colour of the person's garments (ground-truth CCP garment pixels, k-means in
  CIELAB as the pipeline runs it) after correction and in the original photo.

The uncast photo is scored too ("cast: none"): a photo the camera already balanced is the common case, and a
method must not damage it. Faces for the ``skin`` method come from the pipeline's own detector, once per photo
(a cast does not move the landmarks). ``--exclude-garments`` adds rows where the light is estimated without the
garment pixels, as the correct stage can do with the parser's masks.

    python scripts/measure_white_balance.py --photos 120
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from colortrend.color.kmeans import palettes
from colortrend.color.space import XYZ_TO_RGB, delta_e2000
from colortrend.color.white_balance import (
    WB_METHODS,
    angular_error,
    apply_cast,
    white_balance,
)

CCP = Path(__file__).resolve().parents[1] / "../shared/data/parsing/ccp"


def planckian_xy(t: float) -> tuple[float, float]:
    """Chromaticity of a black body at ``t`` kelvin (Kim et al. 2002 cubic fit, 1667-25000 K)."""
    if t <= 4000:
        x = -0.2661239e9 / t**3 - 0.2343589e6 / t**2 + 0.8776956e3 / t + 0.179910
    else:
        x = -3.0258469e9 / t**3 + 2.1070379e6 / t**2 + 0.2226347e3 / t + 0.240390
    if t <= 2222:
        y = -1.1063814 * x**3 - 1.34811020 * x**2 + 2.18555832 * x - 0.20219683
    elif t <= 4000:
        y = -0.9549476 * x**3 - 1.37418593 * x**2 + 2.09137015 * x - 0.16748867
    else:
        y = 3.0817580 * x**3 - 5.87338670 * x**2 + 3.75112997 * x - 0.37001483
    return x, y


def daylight_xy(t: float) -> tuple[float, float]:
    """Chromaticity of CIE daylight at correlated colour temperature ``t`` (4000-25000 K)."""
    if t <= 7000:
        x = -4.6070e9 / t**3 + 2.9678e6 / t**2 + 0.09911e3 / t + 0.244063
    else:
        x = -2.0064e9 / t**3 + 1.9018e6 / t**2 + 0.24748e3 / t + 0.237040
    return x, -3.000 * x**2 + 2.870 * x - 0.275


def xy_to_linear_rgb(xy: tuple[float, float]) -> np.ndarray:
    x, y = xy
    return XYZ_TO_RGB @ np.array([x / y, 1.0, (1 - x - y) / y])


CASTS: dict[str, np.ndarray] = {
    "none": np.ones(3),
    "tungsten 2856K": xy_to_linear_rgb(planckian_xy(2856)),
    "warm 4000K": xy_to_linear_rgb(planckian_xy(4000)),
    "daylight 5000K": xy_to_linear_rgb(daylight_xy(5000)),
    "cool 7500K": xy_to_linear_rgb(daylight_xy(7500)),
    "shade 10000K": xy_to_linear_rgb(daylight_xy(10000)),
    "green tint": np.array([0.9, 1.0, 0.9]),
    "magenta tint": np.array([1.0, 0.88, 1.0]),
}


def load_photos(n: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``n`` CCP photos evenly spread over the set: (name, RGB image, ground-truth garment mask)."""
    from colortrend.models.parse_classes import GARMENT_CLASSES, ccp_lookup

    garment_ids = np.flatnonzero(np.isin(ccp_lookup(), GARMENT_CLASSES))
    labels = pd.read_csv(CCP / "labels.csv")
    rows = labels.iloc[np.linspace(0, len(labels) - 1, n).astype(int)]
    photos = []
    for image, mask in zip(rows["image"], rows["mask"]):
        rgb = np.asarray(Image.open(CCP / image).convert("RGB"))
        garments = np.isin(np.asarray(Image.open(CCP / mask)), garment_ids)
        photos.append((image, rgb, garments))
    return photos


def detect_landmarks(images: list[np.ndarray]) -> list[np.ndarray]:
    """(n, 10) landmarks per photo from the pipeline's detect stage."""
    from colortrend.stages.detect import DetectSettings, DetectStage

    stage = DetectStage(DetectSettings(), "cpu")
    batch = {"photo_id": list(range(len(images))), "status": ["ok"] * len(images), "error": [None] * len(images),
             "image": images}
    return list(stage(batch)["landmarks"])


def markdown(table: pd.DataFrame) -> str:
    """A DataFrame as a GitHub markdown table, numbers with 2 decimals (no dependency on ``tabulate``)."""
    header = [table.index.name or ""] + [str(c) for c in table.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in table.iterrows():
        lines.append("| " + " | ".join([str(index)] + [f"{v:.2f}" for v in row]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=120, help="CCP photos, evenly spread over the 800")
    parser.add_argument("--max-gain", type=float, default=3.0, help="clamp of the white-balance gains")
    parser.add_argument("--min-cast", type=float, default=2.0,
                        help="degrees from neutral below which a photo is left uncorrected")
    parser.add_argument("--exclude-garments", action="store_true", help="also estimate without garment pixels")
    args = parser.parse_args()

    photos = load_photos(args.photos)
    landmarks = detect_landmarks([rgb for _, rgb, _ in photos])
    variants = [(m, False) for m in WB_METHODS]
    if args.exclude_garments:
        variants += [(m, True) for m in WB_METHODS if m not in ("none", "skin")]

    records = []
    start = time.perf_counter()
    for (name, rgb, garments), lms in zip(photos, landmarks):
        truth = palettes([rgb[garments]])[0]
        for cast_name, light in CASTS.items():
            cast = apply_cast(rgb, light) if cast_name != "none" else rgb
            results = [white_balance(cast, method, landmarks=lms, exclude=garments if exclude else None,
                                     max_gain=args.max_gain, min_cast_deg=args.min_cast)
                       for method, exclude in variants]
            for (method, exclude), result, pal in zip(variants, results,
                                                      palettes([r.image[garments] for r in results])):
                records.append({
                    "photo": name, "cast": cast_name, "method": method + (" -garments" if exclude else ""),
                    "angular": angular_error(result.illuminant, light),
                    "delta_e": float(delta_e2000(pal.dominant_lab, truth.dominant_lab)),
                    "fallback": result.method != method,
                })
    df = pd.DataFrame(records)
    elapsed = time.perf_counter() - start

    cast_rows = df[df["cast"] != "none"]
    summary = pd.DataFrame({
        "angular mean (deg)": cast_rows.groupby("method")["angular"].mean(),
        "angular median": cast_rows.groupby("method")["angular"].median(),
        "ΔE garment mean (cast)": cast_rows.groupby("method")["delta_e"].mean(),
        "ΔE garment median (cast)": cast_rows.groupby("method")["delta_e"].median(),
        "ΔE garment mean (uncast)": df[df["cast"] == "none"].groupby("method")["delta_e"].mean(),
        "ΔE garment mean (all)": df.groupby("method")["delta_e"].mean(),
    }).sort_values("ΔE garment mean (all)")
    per_cast = df.pivot_table(index="method", columns="cast", values="delta_e", aggfunc="mean")[list(CASTS)]
    print(f"{len(photos)} CCP photos x {len(CASTS)} casts, max gain {args.max_gain}, min cast {args.min_cast} deg; "
          f"skin found no usable face on {df[df['method'] == 'skin']['fallback'].mean():.0%} ({elapsed:.0f} s)\n")
    print(markdown(summary))
    print("\nMean CIEDE2000 of the garment dominant colour per cast\n")
    print(markdown(per_cast.loc[summary.index]))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
