"""The age-error correction behind ``share_soft``: cohort colour shares as if every age were known exactly.

A 5-year cohort is narrow next to an age error of several years, and the error is not centred: an age model
over-ages the young and under-ages the old. Counting each person in the cohort of their estimated age therefore
mixes neighbouring cohorts (a cohort's raw share is a blend of its neighbours' shares) and shifts them.

The measurement
    How the age model errs is measured on labelled faces like the photos (:class:`AgeCalibration`: the CSV of
    ``colortrend eval age --save-predictions``; without one, the shipped measurement of the default age model on
    the validation faces it never trained on). For each whole-year true age a, the distribution of the estimate is
    the labelled faces' errors kernel-weighted by how close their true age is to a, each error smoothed by a small
    kernel: the error matrix ``P[j, a]`` = P(estimate rounds to j | true age a). No shape is assumed, so a skewed
    or heavy-tailed error is modelled as measured.

The model
    Colour preferences are what the table reports: one colour distribution q(colour | group) per published group
    (cohort or age bucket), and one per 5-year block of the true ages outside every group. Per photo year t, the
    true ages follow a distribution p_t(a), smooth across ages. A person of true age a wears colour c with
    probability q(c | group of (t, a)) and their estimate lands in j with probability P[j, a].

The fit
    Maximum likelihood by EM over the persons' (year, colour, estimated whole-year age) counts. The E-step spreads
    each count over the true ages that could have produced it, given its colour; the M-step re-estimates q from
    those expected counts and p_t from their sum, smoothed with the 1-2-1 kernel of EMS (Silverman et al. 1990) so
    the ill-posed deconvolution does not fit noise, and the fit stops early (``EM_TOL``, ``EM_MAX_ITER``).
    The plain fit is still several times noisier than the raw shares: with errors of several years, the data say
    little about how a cohort differs from its neighbours. So the estimate is penalised: the M-step adds
    ``smoothing`` pseudo-persons wearing the mean of the block's two birth-year neighbours' distributions (a
    Dirichlet prior, one-step-late as in Green 1990), which costs nothing on a linear trend and only shrinks a
    sharp step, and less the more persons there are. ``persons_soft`` is the expected number of persons of the
    group wearing the colour and ``share_soft`` = q(c | group): that group's share of its corrected total.

The interval
    ``share_soft_low`` / ``share_soft_high``: percentile bootstrap over both sources of error at once, of the plain
    fit, whose coverage the penalty's bias cannot erode (undersmoothed intervals, as in Kuusela & Panaretos 2015),
    widened where needed to hold the estimate. Each replicate resamples the persons (within each photo year) *and*
    the labelled faces of the calibration, rebuilds the error matrix, and refits (warm-started at the plain fit).

Purity
    The share of the persons counted in a group (by their estimated age) who truly belong to it, from the fitted
    true-age distribution and the error matrix: how blurred the raw column is.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray

#: True ages (whole years) the age-error model ranges over; estimates are clipped into the same range.
MAX_TRUE_AGE = 110
AGES = np.arange(MAX_TRUE_AGE + 1)
#: Kernel width (years of true age) over which the labelled faces' errors are pooled for one true age. Narrow,
#: because the error changes fast with age among the young (a child is rarely off by 2 years, a 20-year-old often
#: by 5): over `colortrend eval cohorts`' 54 populations, 1.5 against 3 gave interval coverage 0.952 against 0.923
#: (worst cohort 0.89 against 0.80) and a corrected share error of 0.038 against 0.040. The bootstrap over the
#: labelled faces carries the extra noise of pooling fewer.
CALIBRATION_BANDWIDTH = 1.5
#: Kernel width (years) that smooths each labelled face's error into a distribution.
ERROR_BANDWIDTH = 1.0
#: Fewest labelled faces accepted for an age calibration.
MIN_CALIBRATION_FACES = 30
#: Width (years) of the blocks of true ages outside every group, each with a colour distribution of its own.
OUTSIDE_BLOCK_YEARS = 5
#: EM stops when no share or age probability moves by more than EM_TOL, or after EM_MAX_ITER steps: the estimate
#: and each bootstrap replicate on its own (fitted together, as if alone). Stopping early regularises the ill-posed
#: deconvolution (as EMS's smoothing does); `colortrend eval cohorts` chose it: run to 2,000 steps and 1e-6 the
#: estimate was further from the truth (mean share error 0.107 against 0.097) and its intervals no better (coverage
#: 0.947 against 0.950).
EM_TOL = 1e-4
EM_MAX_ITER = 300
#: Bootstrap replicates of the corrected shares (each a refit): at most this many, fewer when ``bootstrap`` is.
SOFT_BOOTSTRAP = 100
#: Longest SQUAREM extrapolation, in plain EM steps.
MAX_STEP = 64.0
#: Largest age error (years) the fit considers: true ages this far beyond the estimates seen are left out.
ERROR_REACH = 25
#: The default age model's errors on its validation faces (``colortrend eval age --split val --save-predictions``).
DEFAULT_CALIBRATION = Path(__file__).resolve().parent.parent / "models" / "age_calibration.csv"


@dataclass(frozen=True, eq=False)
class AgeCalibration:
    """Labelled faces' true and estimated ages: how the age model errs, as a function of true age."""

    true_age: NDArray[np.float64]
    predicted_age: NDArray[np.float64]
    source: str = "given"

    @property
    def faces(self) -> int:
        return len(self.true_age)

    @classmethod
    def from_predictions(cls, true_age: NDArray, predicted_age: NDArray, source: str = "given") -> AgeCalibration:
        """Rows where either age is missing are left out; at least ``MIN_CALIBRATION_FACES`` must remain."""
        true_age = np.asarray(true_age, dtype=np.float64)
        predicted_age = np.asarray(predicted_age, dtype=np.float64)
        keep = np.isfinite(true_age) & np.isfinite(predicted_age)
        if keep.sum() < MIN_CALIBRATION_FACES:
            raise ValueError(
                f"age calibration: {int(keep.sum())} labelled faces, at least {MIN_CALIBRATION_FACES} needed"
            )
        return cls(np.clip(true_age[keep], 0, MAX_TRUE_AGE), predicted_age[keep], source)

    def error_matrix(self, weights: NDArray | None = None) -> NDArray[np.float64]:
        """``P[j, a]``: probability that a person of whole-year true age a is estimated at whole year j (0-110).

        ``weights`` (one per labelled face, e.g. bootstrap counts; (R, faces) for R matrices at once) weigh the
        faces; ages beyond the labelled range take the error distribution at its nearest end. Columns sum to 1.
        """
        near, kernel = self._kernels
        m = np.ones(self.faces) if weights is None else np.asarray(weights, dtype=np.float64)
        w = near * m[..., None, :]  # (..., true age, face)
        total = w.sum(axis=-1, keepdims=True)
        # A true age none of whose near faces was drawn (a sparse resample) keeps every face's weight: its error is
        # then that of the nearest labelled faces, never undefined.
        w = np.where(total > 0, w / np.maximum(total, 1e-300), near / near.sum(axis=-1, keepdims=True))
        by_offset = (w.astype(np.float32) @ kernel).astype(np.float64)  # (..., true age, offset j - a + 110)
        p = by_offset[..., AGES[None, :], AGES[:, None] - AGES[None, :] + MAX_TRUE_AGE]  # (..., j, a)
        cumulative = np.cumsum(by_offset, axis=-1)
        below = MAX_TRUE_AGE - AGES  # offset of estimate 0 for each true age: wider errors fold into 0 and 110
        p[..., 0, :] += cumulative[..., AGES, below] - by_offset[..., AGES, below]
        p[..., -1, :] += cumulative[..., AGES, -1] - cumulative[..., AGES, 2 * MAX_TRUE_AGE - AGES]
        return p / p.sum(axis=-2, keepdims=True)

    def resampled_error_matrices(self, replicates: int, seed: int) -> NDArray[np.float64]:
        """(replicates, 111, 111) error matrices of bootstrap resamples of the labelled faces (kept: cohorts and age
        buckets are corrected with the same resamples)."""
        key = (replicates, seed)
        if key not in self._resampled:
            rng = np.random.default_rng([seed, 0xCA1B])
            faces = rng.multinomial(self.faces, np.full(self.faces, 1 / self.faces), size=replicates)
            self._resampled[key] = np.stack([self.error_matrix(w) for w in faces])
        return self._resampled[key]

    @cached_property
    def _resampled(self) -> dict:
        return {}

    @cached_property
    def _kernels(self) -> tuple[NDArray, NDArray]:
        """Weights of each face for each true age (111, faces) and each face's smoothed error (faces, 221)."""
        grid = np.clip(AGES.astype(np.float64), self.true_age.min(), self.true_age.max())
        z = 0.5 * ((grid[:, None] - self.true_age[None, :]) / CALIBRATION_BANDWIDTH) ** 2
        # Relative to the nearest labelled face, so the weights of a true age far from every face do not underflow.
        near = np.exp(-(z - z.min(axis=1, keepdims=True))).astype(np.float32)
        offsets = np.arange(2 * MAX_TRUE_AGE + 1) - MAX_TRUE_AGE
        error = self.predicted_age - self.true_age
        kernel = np.exp(-0.5 * ((offsets[None, :] - error[:, None]) / ERROR_BANDWIDTH) ** 2)
        return near, (kernel / np.maximum(kernel.sum(axis=1, keepdims=True), 1e-300)).astype(np.float32)


def load_age_calibration(path: str | Path) -> AgeCalibration:
    """Read the predictions CSV of ``colortrend eval age --save-predictions`` (rows without a prediction skipped)."""
    df = pd.read_csv(path)
    missing = [c for c in ("age", "predicted_age") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: age calibration lacks column(s): {', '.join(missing)}")
    return AgeCalibration.from_predictions(df["age"].to_numpy(np.float64), df["predicted_age"].to_numpy(np.float64),
                                           source=str(path))


@cache  # one per process: its resampled error matrices are reused across tables
def default_age_calibration() -> AgeCalibration:
    """The shipped measurement of the default age model's error (its validation faces)."""
    calibration = load_age_calibration(DEFAULT_CALIBRATION)
    return AgeCalibration(calibration.true_age, calibration.predicted_age, source="default")


@dataclass(frozen=True)
class Correction:
    """The corrected cells of one kind of group: arrays (groups, colour bins), and per-group figures."""

    persons: NDArray[np.float64]  # expected persons of the group wearing the bin
    share: NDArray[np.float64]  # q(bin | group)
    low: NDArray[np.float64]  # bootstrap interval of share
    high: NDArray[np.float64]
    purity: NDArray[np.float64]  # (groups,) share of the persons counted in the group who truly belong to it


def correct(counts: dict[int, NDArray], group_of: dict[int, NDArray[np.int64]], n_groups: int,
            calibration: AgeCalibration, *, bootstrap: int, ci: float, seed: int,
            smoothing: float = 0.0) -> Correction:
    """Fit the model of the module docstring and bootstrap it.

    ``counts[t]``: (bins, 111) persons of photo year t by colour bin and estimated whole-year age (0-110).
    ``group_of[t]``: (111,) group index of each true age in year t, -1 outside every group.
    """
    years = sorted(counts)
    # Outside every group, true ages fall into 5-year blocks of birth year, the same blocks in every photo year.
    outside = {t: (t - AGES) // OUTSIDE_BLOCK_YEARS for t in years}
    keys = np.unique(np.concatenate([outside[t][group_of[t] < 0] for t in years] or [np.zeros(0, np.int64)]))
    blocks = {t: np.where(group_of[t] >= 0, group_of[t], n_groups + np.searchsorted(keys, outside[t])) for t in years}
    n_blocks = n_groups + len(keys)
    n = np.stack([counts[t] for t in years]).astype(np.float64)  # (years, bins, 111)
    # The fit runs over the estimated ages seen and the true ages that can produce them (exact: an estimate never
    # seen adds nothing to the likelihood), which keeps it small whatever the number of persons.
    seen = np.flatnonzero(n.sum(axis=(0, 1)) > 0)
    est = np.arange(seen.min(), seen.max() + 1) if len(seen) else AGES
    true = np.arange(max(0, est[0] - ERROR_REACH), min(MAX_TRUE_AGE, est[-1] + ERROR_REACH) + 1)
    block = np.stack([blocks[t][true] for t in years])  # (years, true ages): the block of each true age
    full_error = calibration.error_matrix()
    error = full_error[np.ix_(est, true)]
    n = n[..., est]
    neighbours = _neighbour_matrix(blocks, n_blocks)
    # The estimate: the fit penalised towards neighbouring blocks' shares. The interval: the plain (unpenalised)
    # fit's bootstrap, whose coverage the penalty's bias cannot erode (undersmoothing), widened to hold the estimate.
    q, p, expected = (x[0] for x in _em(n[None], error[None], block, n_blocks, None, EM_MAX_ITER,
                                        neighbours=neighbours, strength=smoothing))
    q_plain, p_plain = (x[0] for x in _em(n[None], error[None], block, n_blocks, None, EM_MAX_ITER)[:2]) \
        if smoothing > 0 else (q, p)

    replicates = min(bootstrap, SOFT_BOOTSTRAP)
    rng = np.random.default_rng([seed, 0x50F7])
    flat = n.reshape(len(years), -1)
    totals = flat.sum(axis=1)
    resampled = np.stack([
        np.stack([rng.multinomial(int(totals[y]), flat[y] / max(totals[y], 1)) for y in range(len(years))])
        for _ in range(replicates)
    ]).reshape(replicates, *n.shape).astype(np.float64)
    errors = calibration.resampled_error_matrices(replicates, seed)[:, est][:, :, true]
    start = (np.broadcast_to(q_plain, (replicates, *q.shape)), np.broadcast_to(p_plain, (replicates, *p.shape)))
    # The replicates stop at EM_TOL (1e-4), far above float32's rounding: they run in float32, twice as fast.
    q_boot = _em(resampled.astype(np.float32), errors.astype(np.float32), block, n_blocks,
                 tuple(x.astype(np.float32) for x in start), EM_MAX_ITER)[0]
    alpha = (1.0 - ci) / 2
    low, high = np.quantile(q_boot[:, :, :n_groups], [alpha, 1.0 - alpha], axis=0)
    low, high = np.minimum(low, q[:, :n_groups]), np.maximum(high, q[:, :n_groups])

    by_block = sum(expected[y] @ np.eye(n_blocks)[block[y]] for y in range(len(years)))  # (bins, blocks)
    persons = by_block[:, :n_groups]
    purity = _purity(p, totals, full_error[:, true], {t: b[true] for t, b in blocks.items()}, group_of, years,
                     n_groups)
    return Correction(persons=persons.T, share=q[:, :n_groups].T, low=low.T, high=high.T, purity=purity)


def _em(n: NDArray, error: NDArray, block: NDArray[np.int64], n_blocks: int, start: tuple[NDArray, NDArray] | None,
        max_iter: int, tol: float = EM_TOL, neighbours: NDArray | None = None,
        strength: float = 0.0) -> tuple[NDArray, NDArray, NDArray]:
    """EM of the module docstring for R fits at once (the estimate and bootstrap replicates), accelerated by SQUAREM
    (Varadhan & Roland 2008: two EM steps, then a step along their extrapolated path, kept on the simplex).

    ``n``: (R, years, bins, J) counts by estimated age; ``error``: (R, J, A) error matrices over those estimates and
    A true ages; ``block``: (years, A) block of each true age. Returns q (R, bins, blocks), p (R, years, A) and the
    expected counts by true age (R, years, bins, A).
    """
    r, n_years = n.shape[:2]
    dtype = n.dtype  # float64, or float32 for the bootstrap replicates
    tiny = np.finfo(dtype).tiny  # the floor of divisions and logarithms, representable in that precision
    stacked = np.eye(n_blocks, dtype=dtype)[block]  # (years, A, blocks): one-hot blocks, to sum persons by block
    totals = n.sum(axis=(2, 3))  # (R, years)
    colour = n.sum(axis=(1, 3)) / np.maximum(n.sum(axis=(1, 2, 3)), 1)[:, None]  # overall colour shares (R, bins)
    # Every (colour, block) starts possible: EM's multiplicative updates never leave an exact zero.
    prior = np.repeat(colour[:, :, None], stacked.shape[2], axis=2)
    if start is None:
        q, p = prior, np.full((r, n_years, stacked.shape[1]), 1.0 / stacked.shape[1], dtype)
    else:
        q, p = 0.98 * start[0] + 0.02 * prior, start[1]
    error_t = np.swapaxes(error, 1, 2)[:, None].copy()  # (R, 1, a, j)
    error_b = error[:, None].copy()  # (R, 1, j, a)
    # Each fit stops on its own once it has converged. The fits still running are the first `running` rows of
    # `counts`, `totals`, `error_t` and `error_b` (rows move to the front as others stop), fits `fit[:running]`.
    counts, fit, running = n.copy(), np.arange(r), r
    out_q, out_p, out_expected = np.empty_like(q), np.empty_like(p), np.zeros((*n.shape[:3], p.shape[2]), dtype)

    def step(q: NDArray, p: NDArray) -> tuple[NDArray, NDArray, NDArray, NDArray]:
        """One EM step from (q, p) of the running fits; also the expected counts and the log-likelihood of (q, p)."""
        n, year_totals = counts[:running], totals[:running]
        joint = p[:, :, None, :] * q[:, :, block].transpose(0, 2, 1, 3)  # (R, years, bins, a)
        fitted = joint @ error_t[:running]  # (R, years, bins, j): probability of each (bin, estimated age)
        ratio = np.divide(n, fitted, out=np.zeros_like(n), where=fitted > 0)
        expected = joint * (ratio @ error_b[:running])  # (R, years, bins, a): persons by true age
        by_age = np.concatenate([expected[..., :1].sum(2), expected.sum(2), expected[..., -1:].sum(2)], axis=-1)
        smoothed = 0.25 * by_age[..., :-2] + 0.5 * by_age[..., 1:-1] + 0.25 * by_age[..., 2:]  # EMS's 1-2-1
        new_p = np.where(year_totals[..., None] > 0, smoothed / np.maximum(smoothed.sum(-1, keepdims=True), tiny), p)
        mass = sum(expected[:, y] @ stacked[y] for y in range(n_years))  # expected persons by bin and block
        held = mass.sum(axis=1, keepdims=True)
        if strength > 0 and neighbours is not None:
            target = q @ neighbours  # (R, bins, blocks): mean of each block's neighbours' shares
            new_q = (mass + strength * target) / (held + strength)
        else:
            new_q = np.where(held > 0, mass / np.maximum(held, tiny), q)
        loglik = (n * np.log(np.maximum(fitted, tiny))).sum(axis=(1, 2, 3), dtype=np.float64)
        return new_q, new_p, expected, loglik

    def simplex(x: NDArray, axis: int) -> NDArray:
        x = np.maximum(x, 1e-12)
        return x / x.sum(axis=axis, keepdims=True)

    expected = np.zeros_like(out_expected)
    for _ in range(max(1, max_iter // 3)):
        q1, p1, _, _ = step(q, p)
        q2, p2, expected, loglik_1 = step(q1, p1)
        rq, rp = q1 - q, p1 - p
        vq, vp = q2 - q1 - rq, p2 - p1 - rp
        norm_r = np.sqrt((rq**2).sum(axis=(1, 2)) + (rp**2).sum(axis=(1, 2)))
        norm_v = np.sqrt((vq**2).sum(axis=(1, 2)) + (vp**2).sum(axis=(1, 2)))
        # Step length: -1 is a plain double step; bounded, as a vanishing ||v|| would send it to infinity.
        alpha = np.clip(-norm_r / np.maximum(norm_v, tiny), -MAX_STEP, -1.0)[:, None, None].astype(dtype)
        q_x = simplex(q - 2 * alpha * rq + alpha**2 * vq, axis=1)
        p_x = simplex(p - 2 * alpha * rp + alpha**2 * vp, axis=2)
        new_q, new_p, expected_x, loglik_x = step(q_x, p_x)
        # Safeguard: where the extrapolated point fits worse than the plain steps' path, keep the plain steps.
        worse = ~(loglik_x >= loglik_1)  # NaN counts as worse
        new_q = np.where(worse[:, None, None], q2, new_q)
        new_p = np.where(worse[:, None, None], p2, new_p)
        expected = np.where(worse[:, None, None, None], expected, expected_x)
        moved = np.maximum(np.abs(new_q - q).max(axis=(1, 2)), np.abs(new_p - p).max(axis=(1, 2)))
        q, p = new_q, new_p
        done = moved <= tol
        if done.any():  # those fits' results kept, the running ones' rows moved to the front
            stopped = fit[:running][done]
            out_q[stopped], out_p[stopped], out_expected[stopped] = q[done], p[done], expected[done]
            keep = ~done
            for rows in (fit, counts, totals, error_t, error_b):
                rows[:int(keep.sum())] = rows[:running][keep]
            q, p, expected, running = q[keep], p[keep], expected[keep], int(keep.sum())
            if not running:
                break
    out_q[fit[:running]], out_p[fit[:running]], out_expected[fit[:running]] = q, p, expected
    return out_q, out_p, out_expected


def _neighbour_matrix(blocks: dict[int, NDArray], n_blocks: int) -> NDArray[np.float64]:
    """(blocks, blocks): column b averages the blocks next to b in birth-year order (the one neighbour at an end; a
    lone block is its own, so it is not pulled at all)."""
    born = np.concatenate([t - AGES for t in blocks])
    which = np.concatenate(list(blocks.values()))
    cells = np.maximum(np.bincount(which, minlength=n_blocks), 1)
    centre = np.bincount(which, weights=born, minlength=n_blocks) / cells  # mean birth year of each block
    order = np.argsort(centre, kind="stable")
    m = np.zeros((n_blocks, n_blocks))
    for i, b in enumerate(order):
        near = [order[j] for j in (i - 1, i + 1) if 0 <= j < n_blocks] or [b]
        m[near, b] = 1.0 / len(near)
    return m


def _purity(p: NDArray, totals: NDArray, error: NDArray, blocks: dict[int, NDArray], group_of: dict[int, NDArray],
            years: list[int], n_groups: int) -> NDArray[np.float64]:
    """Per group, the expected share of persons counted in it (by estimated age) whose true age lies in it."""
    counted = np.zeros(n_groups)
    right = np.zeros(n_groups)
    for y, t in enumerate(years):
        persons = totals[y] * p[y][None, :] * error  # (j, a): expected persons by estimate (all) and true age
        observed = group_of[t]  # the group of an estimated age is that of the same true age
        for g in range(n_groups):
            rows = persons[observed == g]
            counted[g] += rows.sum()
            right[g] += rows[:, blocks[t] == g].sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted > 0, right / counted, np.nan)
