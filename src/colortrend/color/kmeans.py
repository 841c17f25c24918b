"""Garment palettes: k-means in CIELAB, run on many persons at once.

Each person's garment pixels become a palette (cluster centres in CIELAB and sRGB with their pixel shares) whose
largest cluster is the person's dominant colour. All persons of a batch are clustered together: each person's
pixel sample becomes a weighted colour histogram (a few hundred occupied bins), the histograms are padded to one
``(persons, bins, 3)`` array with zero weights on the padding, and every step (greedy k-means++ seeding, Lloyd
iterations, merging) is one numpy operation over all persons instead of a Python loop per person.
``scripts/benchmark_kmeans.py`` compares it with per-person scikit-learn.

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
#: Persons clustered in one array (grouped by histogram size, so padding wastes little); results do not depend on it.
CHUNK = 64


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
    clipped = np.maximum(np.maximum(pixels[:, 0], pixels[:, 1]), pixels[:, 2]) >= CLIP_CODE
    return pixels[~clipped] if 2 * clipped.sum() < len(pixels) else pixels


def palettes(pixel_sets: Sequence[NDArray[np.uint8]], k: int = 5, max_pixels: int = 4000,
             merge_delta_e: float = 6.0, max_iter: int = 30, seed: int = 0) -> list[Palette | None]:
    """The palette of each (n_i, 3) uint8 sRGB pixel list; None for an empty list.

    ``k`` clusters before merging; ``merge_delta_e``: clusters closer than this CIEDE2000 are merged;
    ``max_iter``: cap on Lloyd iterations per person (they usually converge in 5-20).
    """
    samples = [drop_highlights(sample_pixels(p, max_pixels)) for p in pixel_sets]
    results: list[Palette | None] = [None] * len(samples)
    todo = [i for i, s in enumerate(samples) if len(s)]
    if not todo:
        return results
    bins = dict(zip(todo, _colour_bins([samples[i] for i in todo])))
    # Chunks of persons with similar bin counts waste little on padding.
    todo.sort(key=lambda i: len(bins[i][1]))
    draws = _seed_draws(k, seed)
    for start in range(0, len(todo), CHUNK):
        chunk = todo[start:start + CHUNK]
        x, w = _pad([bins[i] for i in chunk])
        centres, counts = _merge_close(*_lloyd(x, w, _kmeanspp(x, w, k, draws), max_iter), merge_delta_e)
        for i, palette in zip(chunk, palettes_of_clusters(centres, counts)):
            results[i] = palette
    return results


def _seed_draws(k: int, seed: int) -> NDArray[np.float64]:
    """Uniform draws for seeding: (k, trials), the same for every person so results do not depend on batching."""
    trials = 2 + int(math.log(k))  # scikit-learn's number of local trials for greedy k-means++
    return np.random.default_rng(seed).random((k, trials))


def _colour_bins(samples: list[NDArray[np.uint8]]) -> list[tuple[NDArray[np.float64], NDArray[np.int64]]]:
    """Each sample as a weighted colour histogram: CIELAB of its occupied bins (B, 3) and their pixel counts (B,).

    Bins are 8x8x8 codes of sRGB, each represented by the CIELAB of its members' mean colour. Clustering the bins
    weighted by their counts is k-means on the pixels themselves except that a bin (at most a few CIEDE2000 units
    wide) cannot straddle two clusters, and it is several times faster: a garment's 4,000 pixels fill a few
    hundred bins.
    """
    histograms = []
    for pixels in samples:
        q = (pixels >> 3).astype(np.int32)
        codes = (q[:, 0] << 10) | (q[:, 1] << 5) | q[:, 2]
        counts = np.bincount(codes, minlength=1 << 15)  # dense bincount: faster than sorting (np.unique)
        occupied = np.flatnonzero(counts)
        sums = np.stack([np.bincount(codes, weights=pixels[:, ch], minlength=1 << 15)[occupied] for ch in range(3)],
                        axis=1)
        histograms.append((sums / counts[occupied, None], counts[occupied]))
    lab = rgb_to_lab(np.concatenate([mean for mean, _ in histograms]))
    bounds = np.cumsum([0] + [len(counts) for _, counts in histograms])
    return [(lab[a:b], counts) for a, b, (_, counts) in zip(bounds[:-1], bounds[1:], histograms)]


def _pad(bins: list[tuple[NDArray[np.float64], NDArray[np.int64]]]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Stack ragged histograms into (P, B, 3) points and (P, B) weights, zero-padded (weight 0) to the longest."""
    x = np.zeros((len(bins), max(len(c) for _, c in bins), 3), np.float32)
    w = np.zeros(x.shape[:2], np.float32)
    for p, (lab, counts) in enumerate(bins):
        x[p, :len(counts)] = lab
        w[p, :len(counts)] = counts
    return x, w


def _sq_dist(x: NDArray[np.float32], xx: NDArray[np.float32], c: NDArray[np.float32]) -> NDArray[np.float32]:
    """Squared distances (P, N, m) between points ``x`` (P, N, 3), whose squared norms are ``xx`` (P, N), and
    per-person points ``c`` (P, m, 3): expanded as |x|^2 - 2 x.c + |c|^2, one batched matrix product."""
    cc = np.einsum("pmc,pmc->pm", c, c)
    return np.maximum(xx[..., None] - 2 * np.matmul(x, c.transpose(0, 2, 1)) + cc[:, None, :], 0)


def _kmeanspp(x: NDArray[np.float32], w: NDArray[np.float32], k: int,
              draws: NDArray[np.float64]) -> NDArray[np.float32]:
    """Greedy weighted k-means++ seeding (Arthur & Vassilvitskii 2007; scikit-learn's local trials), all persons.

    Each new centre is the best of a few candidates drawn with probability proportional to weight times squared
    distance to the nearest centre so far; "best" means the lowest total weighted squared distance afterwards.
    The first centre is drawn proportionally to weight.
    """
    p_count = len(w)
    rows = np.arange(p_count)
    xx = np.einsum("pnc,pnc->pn", x, x)
    last = (w > 0).sum(1) - 1  # index of each person's last real point (padding follows it)
    closest = w.astype(np.float64)
    centres = np.empty((p_count, k, 3), np.float32)
    for c in range(k):
        cum = np.cumsum(closest, axis=1)
        targets = draws[c][None, :] * cum[:, -1:]  # (P, trials)
        # Inverse-CDF sampling: the first point whose cumulative weight exceeds the target.
        idx = np.stack([np.minimum((cum <= t[:, None]).sum(1), last) for t in targets.T], axis=1)
        candidates = x[rows[:, None], idx]  # (P, trials, 3)
        trial = _sq_dist(x, xx, candidates) * w[..., None]
        if c:
            trial = np.minimum(closest[:, :, None], trial)
        best = trial.sum(1).argmin(1)
        centres[:, c] = candidates[rows, best]
        closest = trial[rows, :, best]
    return centres


def _lloyd(x: NDArray[np.float32], w: NDArray[np.float32], centres: NDArray[np.float32],
           max_iter: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Weighted Lloyd iterations; returns centres (P, k, 3) and the weight assigned to each (P, k).

    A person whose assignment no longer changes has reached a fixed point and leaves the working set, so each
    person's result is what clustering it alone would give. A cluster that loses all its points keeps its centre
    with weight 0 (dropped from the palette).
    """
    p_count, _, k = *w.shape, centres.shape[1]
    centres = centres.copy()
    counts = np.zeros((p_count, k))
    labels = np.full(w.shape, -1)
    active = np.arange(p_count)
    xx = np.einsum("pnc,pnc->pn", x, x)
    for _ in range(max_iter):
        xa, wa = x[active], w[active]
        new = _sq_dist(xa, xx[active], centres[active]).argmin(-1)
        changed = (new != labels[active]).any(1)
        active, new, xa, wa = active[changed], new[changed], xa[changed], wa[changed]
        if not len(active):
            break
        labels[active] = new
        counts[active], sums = _cluster_sums(xa, wa, new, k)
        filled = counts[active] > 0
        centres[active] = np.where(filled[..., None], sums / np.maximum(counts[active], 1e-12)[..., None],
                                   centres[active])
    else:
        # Persons still moving after max_iter: their counts must describe their final assignment.
        final = _sq_dist(x[active], xx[active], centres[active]).argmin(-1)
        counts[active], _ = _cluster_sums(x[active], w[active], final, k)
    return centres.astype(np.float64), counts


def _cluster_sums(x: NDArray[np.float32], w: NDArray[np.float32], labels: NDArray[np.int64],
                  k: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per person and cluster: total weight (P, k) and weighted sum of points (P, k, 3)."""
    p_count = len(w)
    flat = (labels + (np.arange(p_count) * k)[:, None]).ravel()
    weights = w.ravel().astype(np.float64)
    counts = np.bincount(flat, weights=weights, minlength=p_count * k).reshape(p_count, k)
    sums = np.stack([np.bincount(flat, weights=x[..., ch].ravel() * weights, minlength=p_count * k)
                     for ch in range(3)], axis=-1).reshape(p_count, k, 3)
    return counts, sums


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


def palettes_of_clusters(centres: NDArray[np.float64], counts: NDArray[np.float64]) -> list[Palette]:
    """Each person's palette from their clusters' CIELAB centres (P, k, 3) and weights (P, k): the clusters with
    weight, largest first (ties keep cluster order). Each person's colours are converted on their own: a matrix
    product over the whole chunk could round differently with the chunk's size, and a palette must not depend on
    who else was in the batch."""
    palettes = []
    for lab_all, weight in zip(centres, counts):
        keep = np.flatnonzero(weight > 0)
        order = keep[np.argsort(-weight[keep], kind="stable")]
        lab = lab_all[order]
        palettes.append(Palette(lab=lab, rgb=to_uint8(lab_to_rgb(lab)), share=weight[order] / weight[order].sum()))
    return palettes
