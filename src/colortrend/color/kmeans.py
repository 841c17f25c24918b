"""Garment palettes: k-means in CIELAB, run on many persons at once.

Each person's garment pixels become a palette (cluster centres in CIELAB and sRGB with their pixel shares) whose
largest cluster is the person's dominant colour. All persons of a batch are clustered together: their pixel samples
are padded to one ``(persons, pixels, 3)`` array with zero weights on the padding, and every step (greedy
k-means++ seeding, Lloyd iterations, merging) is one numpy operation over all persons instead of a Python loop.

Choices, and why:

* Sampling: at most ``max_pixels`` pixels per person, evenly spaced in the person's row-major pixel order, so the
  sample covers the whole garment and depends on nothing but the pixels.
* Highlights: clipped pixels (a channel at 250 or more) are dropped when they are a minority of the person's
  pixels (specular shine, a logo); when they are the majority the garment itself is white and they are kept.
* Shadows and small patterns split into small or nearby clusters: clusters closer than ``merge_delta_e``
  (CIEDE2000) are merged, size-weighted, and the dominant colour is the cluster with the largest share.
* Determinism: seeding uses one seeded stream of uniform draws shared by every person, so a person's palette
  depends only on its pixels and ``seed``; batching, batch order and chunking never change a result.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from colortrend.color.space import delta_e2000, lab_to_rgb, rgb_to_lab, to_uint8

#: sRGB code at or above which a pixel counts as clipped (a highlight unless most of the garment is clipped).
CLIP_CODE = 250
#: Persons clustered together: bounds memory (about 100 MB at 4,000 pixels) without changing any result.
CHUNK = 256


@dataclass(frozen=True)
class Palette:
    """One person's garment colours, sorted by share (largest first)."""

    lab: NDArray[np.float64]  # (m, 3) CIELAB centres
    rgb: NDArray[np.uint8]  # (m, 3) the same centres in 8-bit sRGB
    share: NDArray[np.float64]  # (m,) fraction of the clustered pixels, summing to 1

    @property
    def dominant_lab(self) -> NDArray[np.float64]:
        return self.lab[0]

    @property
    def dominant_rgb(self) -> NDArray[np.uint8]:
        return self.rgb[0]

    @property
    def dominant_share(self) -> float:
        return float(self.share[0])


def sample_pixels(pixels: NDArray[np.uint8], max_pixels: int) -> NDArray[np.uint8]:
    """At most ``max_pixels`` rows of an (n, 3) pixel list, evenly spaced (deterministic, covers the garment)."""
    n = len(pixels)
    if n <= max_pixels:
        return pixels
    return pixels[(np.arange(max_pixels, dtype=np.int64) * n) // max_pixels]


def drop_highlights(pixels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Remove clipped pixels unless they are the majority (then the garment is white and they are its colour)."""
    clipped = pixels.max(axis=1) >= CLIP_CODE
    return pixels[~clipped] if clipped.mean() < 0.5 else pixels


def palettes(pixel_sets: Sequence[NDArray[np.uint8]], k: int = 5, max_pixels: int = 4000,
             merge_delta_e: float = 6.0, max_iter: int = 30, seed: int = 0) -> list[Palette | None]:
    """The palette of each (n_i, 3) uint8 sRGB pixel list; None for an empty list.

    ``k`` clusters before merging; ``merge_delta_e``: clusters closer than this CIEDE2000 are merged;
    ``max_iter``: cap on Lloyd iterations (they usually converge in 10-20).
    """
    samples = [sample_pixels(drop_highlights(p), max_pixels) if len(p) else p for p in pixel_sets]
    results: list[Palette | None] = [None] * len(samples)
    todo = [i for i, s in enumerate(samples) if len(s)]
    draws = _seed_draws(k, seed)
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        x, w = _pad_lab([samples[i] for i in chunk])
        centres, counts = _lloyd(x, w, _kmeanspp(x, w, k, draws), max_iter)
        centres, counts = _merge_close(centres, counts, merge_delta_e)
        for row, i in enumerate(chunk):
            results[i] = _palette(centres[row], counts[row])
    return results


def _seed_draws(k: int, seed: int) -> NDArray[np.float64]:
    """Uniform draws for seeding: (k, trials), the same for every person so results do not depend on batching."""
    trials = 2 + int(math.log(k))  # scikit-learn's number of local trials for greedy k-means++
    return np.random.default_rng(seed).random((k, trials))


def _pad_lab(samples: list[NDArray[np.uint8]]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(P, N, 3) CIELAB of the samples, zero-padded to the longest, and (P, N) weights (1 real, 0 padding)."""
    n = max(len(s) for s in samples)
    x = np.zeros((len(samples), n, 3), np.float32)
    w = np.zeros((len(samples), n), np.float32)
    lab = rgb_to_lab(np.concatenate(samples)).astype(np.float32)
    offset = 0
    for p, s in enumerate(samples):
        x[p, :len(s)] = lab[offset:offset + len(s)]
        w[p, :len(s)] = 1
        offset += len(s)
    return x, w


def _sq_dist(x: NDArray[np.float32], c: NDArray[np.float32]) -> NDArray[np.float32]:
    """Squared distances (P, N, m) between pixels (P, N, 3) and per-person points (P, m, 3)."""
    d = (x * x).sum(-1)[..., None] - 2 * np.matmul(x, c.transpose(0, 2, 1)) + (c * c).sum(-1)[:, None, :]
    return np.maximum(d, 0)


def _kmeanspp(x: NDArray[np.float32], w: NDArray[np.float32], k: int,
              draws: NDArray[np.float64]) -> NDArray[np.float32]:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007, with scikit-learn's local trials), all persons at once.

    Each new centre is the best of a few candidates drawn with probability proportional to the squared distance to
    the nearest centre so far; "best" means lowest total squared distance afterwards.
    """
    p_count, n = w.shape
    rows = np.arange(p_count)
    n_real = w.sum(1).astype(np.int64)
    first = np.minimum((draws[0, 0] * n_real).astype(np.int64), n_real - 1)
    centres = np.empty((p_count, k, 3), np.float32)
    centres[:, 0] = x[rows, first]
    closest = _sq_dist(x, centres[:, :1])[..., 0] * w
    for c in range(1, k):
        cum = np.cumsum(closest, axis=1, dtype=np.float64)
        targets = draws[c][None, :] * cum[:, -1:]  # (P, trials)
        # Candidate = first pixel whose cumulative weight reaches the target (inverse-CDF sampling).
        idx = np.stack([np.minimum((cum < t[:, None]).sum(1), n_real - 1) for t in targets.T], axis=1)
        candidates = x[rows[:, None], idx]  # (P, trials, 3)
        trial_closest = np.minimum(closest[:, :, None], _sq_dist(x, candidates) * w[..., None])
        best = trial_closest.sum(1).argmin(1)
        centres[:, c] = candidates[rows, best]
        closest = trial_closest[rows, :, best]
    return centres


def _lloyd(x: NDArray[np.float32], w: NDArray[np.float32], centres: NDArray[np.float32],
           max_iter: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Lloyd iterations for all persons; returns centres (P, k, 3) and pixel counts (P, k) of the final assignment.

    A cluster that loses all its pixels keeps its centre with count 0 (dropped from the palette). Iterating stops
    when no person's assignment changes, which is a fixed point for each person separately.
    """
    p_count, n = w.shape
    k = centres.shape[1]
    offsets = (np.arange(p_count) * k)[:, None]
    weights = w.ravel().astype(np.float64)
    labels = None
    for _ in range(max_iter):
        new_labels = _sq_dist(x, centres).argmin(-1)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        flat = (labels + offsets).ravel()
        counts = np.bincount(flat, weights=weights, minlength=p_count * k).reshape(p_count, k)
        sums = np.stack([np.bincount(flat, weights=x[..., ch].ravel() * weights, minlength=p_count * k)
                         for ch in range(3)], axis=-1).reshape(p_count, k, 3)
        filled = counts > 0
        centres = np.where(filled[..., None], sums / np.maximum(counts, 1)[..., None], centres).astype(np.float32)
    flat = (labels + offsets).ravel()
    counts = np.bincount(flat, weights=weights, minlength=p_count * k).reshape(p_count, k)
    return centres.astype(np.float64), counts


def _merge_close(centres: NDArray[np.float64], counts: NDArray[np.float64],
                 threshold: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Merge, closest pair first, clusters closer than ``threshold`` (CIEDE2000) into their size-weighted mean."""
    centres, counts = centres.copy(), counts.copy()
    p_count, k = counts.shape
    rows = np.arange(p_count)
    upper = np.triu(np.ones((k, k), bool), 1)
    for _ in range(k - 1):
        d = delta_e2000(centres[:, :, None], centres[:, None, :])
        alive = counts > 0
        d = np.where(upper & alive[:, :, None] & alive[:, None, :], d, np.inf).reshape(p_count, -1)
        pair = d.argmin(1)
        merge = d[rows, pair] < threshold
        if not merge.any():
            break
        i, j = np.divmod(pair, k)
        r, i, j = rows[merge], i[merge], j[merge]
        total = counts[r, i] + counts[r, j]
        centres[r, i] = (centres[r, i] * counts[r, i, None] + centres[r, j] * counts[r, j, None]) / total[:, None]
        counts[r, i] = total
        counts[r, j] = 0
    return centres, counts


def _palette(centres: NDArray[np.float64], counts: NDArray[np.float64]) -> Palette:
    keep = np.flatnonzero(counts > 0)
    order = keep[np.argsort(-counts[keep], kind="stable")]
    lab = centres[order]
    return Palette(lab=lab, rgb=to_uint8(lab_to_rgb(lab)), share=counts[order] / counts[order].sum())
