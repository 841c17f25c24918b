"""Persons per second of the batched garment k-means against per-person scikit-learn KMeans, on one core.

Persons are CCP photos' ground-truth garment pixels (4,000 sampled each, the pipeline's default). Three timings:
``palettes`` on all persons at once (the dominant stage's call), ``palettes`` called once per person, and
``sklearn.cluster.KMeans(n_clusters=5, n_init=1)`` per person on the same 4,000 pixels in CIELAB (the design's
reference: 185 persons/s per core on the GPU host). Rates are persons per CPU-second of this process (best of
``--repeats`` runs), so other processes on a shared machine distort them as little as possible.

    python scripts/benchmark_kmeans.py --persons 200
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from colortrend.color.kmeans import palettes, sample_pixels
from colortrend.color.space import rgb_to_lab

CCP = Path(__file__).resolve().parents[1] / "../shared/data/parsing/ccp"


def garment_pixels(n: int, max_pixels: int) -> list[np.ndarray]:
    """Sampled ground-truth garment pixels of ``n`` CCP photos spread over the set."""
    from colortrend.models.parse_classes import GARMENT_CLASSES, ccp_lookup

    garment_ids = np.flatnonzero(np.isin(ccp_lookup(), GARMENT_CLASSES))
    labels = pd.read_csv(CCP / "labels.csv")
    rows = labels.iloc[np.linspace(0, len(labels) - 1, n).astype(int)]
    people = []
    for image, mask in zip(rows["image"], rows["mask"]):
        pixels = np.asarray(Image.open(CCP / image).convert("RGB"))[np.isin(np.asarray(Image.open(CCP / mask)),
                                                                             garment_ids)]
        if len(pixels):
            people.append(sample_pixels(pixels, max_pixels))
    return people


def best_rate(run, count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return count / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--persons", type=int, default=200)
    parser.add_argument("--max-pixels", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    people = garment_pixels(args.persons, args.max_pixels)
    labs = [rgb_to_lab(p) for p in people]
    n = len(people)
    with threadpool_limits(1):  # one core for BLAS and OpenMP (scikit-learn); numpy's own loops are serial
        rates = {
            "palettes, batched (all persons in one call)": best_rate(lambda: palettes(people), n, args.repeats),
            "palettes, one call per person": best_rate(lambda: [palettes([p]) for p in people], n, args.repeats),
            "sklearn KMeans(k=5, n_init=1), per person": best_rate(
                lambda: [KMeans(n_clusters=5, n_init=1, random_state=0).fit(lab) for lab in labs], n, args.repeats),
        }
    print(f"{n} persons, {args.max_pixels} pixels each, one core, best of {args.repeats}\n")
    print("| method | persons per CPU-second |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} |")


if __name__ == "__main__":
    main()
