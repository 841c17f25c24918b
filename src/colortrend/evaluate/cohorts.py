"""``colortrend eval cohorts``: can the cohort table be trusted at this age error?

Given true and estimated ages of labelled faces (the CSV of ``colortrend eval age --save-predictions``), plants
known cohort effects in synthetic populations and runs them through the project's own cohort table
(:func:`colortrend.aggregate.histograms.build_histograms`), raw and corrected.

* The labelled faces are split in two by a hash of their path, anew for each seed: one half is the age calibration
  the correction is given, the other lends its errors to the synthetic persons. So the calibration's sampling error
  is part of the test and is averaged over, like the persons': with a thousand labelled faces it is the larger of
  the two. A person of true age a gets the estimate of a random face of the second half aged a (or of the nearest
  age there, shifted by the difference).
* True ages follow a photo-collection-like pyramid (:data:`AGE_WEIGHTS`, photo year 2016); colours are drawn from
  the scenario's probabilities by birth year. ``step``: the 95后 wear red 40 % (black 30 %), everyone else black
  40 % (red 5 %), the rest white, navy and grey: the case this command was built for. ``trend``: navy rises
  smoothly from 10 % (born 1966) to 50 % (born 2009) against black. ``reversal``: black falls from 50 % to 15 % as
  white rises from 15 % to 50 %, so the top colour flips between cohorts.
* Truth for a cohort is the planted probability averaged over the persons truly born in it; each table is
  scored per cohort: top colour right, mean absolute share error over the scenario's colours, and whether each
  colour's interval covers the truth (nominal: ``ci``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from colortrend.aggregate.age_error import AgeCalibration
from colortrend.aggregate.histograms import HistogramSettings, build_histograms
from colortrend.color.names import NAMED_COLORS
from colortrend.errors import ConfigError

YEAR = 2016
#: Relative weight of each true age in the synthetic populations: few children, most persons 16-40, a long tail.
AGE_WEIGHTS = {age: (0.3 if age < 12 else 0.7 if age < 16 else 1.0 if age <= 40 else 0.6 if age <= 55 else 0.25)
               for age in range(5, 71)}
_RGB = {c.en: c.rgb for c in NAMED_COLORS}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str

    def probabilities(self, born: np.ndarray) -> dict[str, np.ndarray]:
        """Probability of each colour for persons born in these years (each row sums to 1 over the colours)."""
        born = np.asarray(born, dtype=np.float64)
        if self.name == "step":
            in_95 = (born >= 1995) & (born <= 1999)
            return {"red": np.where(in_95, 0.40, 0.05), "black": np.where(in_95, 0.30, 0.40),
                    "white": np.where(in_95, 0.10, 0.20), "navy": np.where(in_95, 0.10, 0.20),
                    "grey": np.where(in_95, 0.10, 0.15)}
        if self.name == "trend":
            navy = np.clip(0.10 + 0.40 * (born - 1966) / (2009 - 1966), 0.10, 0.50)
            return {"navy": navy, "black": 0.8 - navy, "white": np.full_like(born, 0.2)}
        x = np.clip((born - 1966) / (2009 - 1966), 0, 1)  # reversal
        return {"black": 0.50 - 0.35 * x, "white": 0.15 + 0.35 * x, "grey": np.full_like(born, 0.35)}


SCENARIOS = (
    Scenario("step", "the 95后 wear red 40 % (black 30 %); everyone else black 40 % (red 5 %)"),
    Scenario("trend", "navy rises from 10 % (born 1966) to 50 % (born 2009), black falls as it rises"),
    Scenario("reversal", "black falls from 50 % to 15 % while white rises from 15 % to 50 %"),
)


def read_predictions(path: str | Path) -> pd.DataFrame:
    """True and estimated ages of the labelled faces with both (``path``, ``age``, ``predicted_age``)."""
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the predictions CSV ({exc})") from None
    missing = [c for c in ("path", "age", "predicted_age") if c not in df.columns]
    if missing:
        raise ConfigError(f"{path}: no {', '.join(missing)} column (the CSV of `eval age --save-predictions`)")
    df = df.dropna(subset=["age", "predicted_age"])
    if len(df) < 100:
        raise ConfigError(f"{path}: {len(df)} faces with a true and an estimated age, at least 100 needed")
    return df.reset_index(drop=True)


def split_halves(paths: pd.Series, seed: int = 0) -> np.ndarray:
    """True for the calibration half: a stable hash of the path (and of the seed, past the first)."""
    salt = f"{seed}:" if seed else ""
    return np.array([hashlib.sha1(f"{salt}{p}".encode()).digest()[0] % 2 == 0 for p in paths])


def synthetic_population(scenario: Scenario, n: int, donors: pd.DataFrame, rng: np.random.Generator):
    """A garments table of ``n`` synthetic persons, their true birth years and colour probabilities."""
    ages = np.array(list(AGE_WEIGHTS))
    weights = np.array(list(AGE_WEIGHTS.values()))
    true_age = rng.choice(ages, size=n, p=weights / weights.sum())
    born = YEAR - true_age
    probabilities = scenario.probabilities(born)
    colours = list(probabilities)
    cumulative = np.cumsum(np.stack([probabilities[c] for c in colours], axis=1), axis=1)
    drawn = (rng.random(n)[:, None] > cumulative).sum(axis=1)
    rgb = np.array([_RGB[c] for c in colours], dtype=np.uint8)[np.minimum(drawn, len(colours) - 1)]

    donor_age = donors["age"].to_numpy(np.float64)
    donor_error = donors["predicted_age"].to_numpy(np.float64) - donor_age
    by_age = {a: np.flatnonzero(np.round(donor_age) == a) for a in np.unique(np.round(donor_age))}
    known = np.array(sorted(by_age))
    estimate = np.empty(n)
    for a in np.unique(true_age):
        nearest = known[np.argmin(np.abs(known - a))]
        who = np.flatnonzero(true_age == a)
        estimate[who] = a + donor_error[rng.choice(by_age[nearest], size=len(who))]
    garments = pd.DataFrame({
        "photo_id": [f"synthetic-{i:07d}" for i in range(n)], "face_idx": 0, "age": np.clip(estimate, 0, None),
        "taken_year": YEAR, "quality_ok": True,
        "dominant_r": rgb[:, 0], "dominant_g": rgb[:, 1], "dominant_b": rgb[:, 2],
    })
    return garments, born, probabilities


def score_table(table: pd.DataFrame, born: np.ndarray, probabilities: dict[str, np.ndarray],
                settings: HistogramSettings) -> list[dict]:
    """One record per cohort: truth, raw and corrected shares of each colour, and whether each is right."""
    cells = table[table["group_type"] == "cohort"].set_index(["group", "bin_id"])
    records = []
    for label, first, last in settings.cohorts:
        members = (born >= first) & (born <= last)
        if not members.any():
            continue
        truth = {c: float(p[members].mean()) for c, p in probabilities.items()}
        top = max(truth, key=truth.get)
        record = {"cohort": label, "true_top": top}
        for kind, share, low, high in (("raw", "share", "ci_low", "ci_high"),
                                       ("soft", "share_soft", "share_soft_low", "share_soft_high")):
            errors, covered = [], []
            estimates = {}
            for colour, value in truth.items():
                row = cells.loc[(label, colour)] if (label, colour) in cells.index else None
                est = row[share] if row is not None and pd.notna(row[share]) else np.nan
                estimates[colour] = est
                errors.append(abs(est - value) if np.isfinite(est) else np.nan)
                covered.append(bool(row is not None and pd.notna(row[low]) and row[low] <= value <= row[high]))
            shown = {c: v for c, v in estimates.items() if np.isfinite(v)}
            record[f"top_right_{kind}"] = bool(shown) and max(shown, key=shown.get) == top
            record[f"share_error_{kind}"] = float(np.nanmean(errors)) if np.isfinite(errors).any() else np.nan
            record[f"coverage_{kind}"] = float(np.mean(covered))
            record[f"shares_{kind}"] = estimates
        record["truth"] = truth
        records.append(record)
    return records


def evaluate_cohorts(predictions_csv: str | Path, sizes: tuple[int, ...] = (2_000, 10_000, 50_000),
                     seeds: int = 3, settings: HistogramSettings | None = None) -> dict:
    """Score raw and corrected cohort tables on every scenario, size and seed; see the module docstring."""
    predictions = read_predictions(predictions_csv)
    settings = settings or HistogramSettings(min_persons=1)
    runs: list[dict] = []
    faces = []
    for seed in range(seeds):
        half = split_halves(predictions["path"], seed)
        calibration = AgeCalibration.from_predictions(predictions.loc[half, "age"],
                                                      predictions.loc[half, "predicted_age"],
                                                      source=str(predictions_csv))
        donors = predictions.loc[~half]
        faces.append((calibration.faces, len(donors)))
        for scenario in SCENARIOS:
            for size in sizes:
                rng = np.random.default_rng([seed, size, SCENARIOS.index(scenario)])
                garments, born, probabilities = synthetic_population(scenario, size, donors, rng)
                table = build_histograms(garments, settings, age_calibration=calibration,
                                         group_types=("cohort",)).to_pandas()
                for record in score_table(table, born, probabilities, settings):
                    runs.append({"scenario": scenario.name, "persons": size, "seed": seed, **record})
    calibration_faces, donor_faces = (round(float(np.mean(x))) for x in zip(*faces))
    return summarise(runs, calibration_faces, donor_faces, settings)


def summarise(runs: list[dict], calibration_faces: int, donor_faces: int, settings: HistogramSettings) -> dict:
    """Means over seeds and sizes per (scenario, cohort), per (scenario, size), and over everything."""
    df = pd.DataFrame(runs)
    figures = [f"{m}_{k}" for m in ("top_right", "share_error", "coverage") for k in ("raw", "soft")]

    def means(part: pd.DataFrame) -> dict:
        return {f: round(float(part[f].astype(float).mean()), 4) for f in figures}

    out: dict = {"calibration_faces": calibration_faces, "population_faces": donor_faces, "ci": settings.ci,
                 "correction_smoothing": settings.correction_smoothing,
                 "runs": int(df[["scenario", "persons", "seed"]].drop_duplicates().shape[0]), "overall": means(df),
                 "scenarios": {}}
    for name, part in df.groupby("scenario", sort=False):
        out["scenarios"][name] = {
            "overall": means(part),
            "by_persons": {int(n): means(p) for n, p in part.groupby("persons")},
            "by_cohort": {c: means(p) | {"true_top": p["true_top"].iloc[0]}
                          for c, p in part.groupby("cohort", sort=False)},
        }
    step = df[(df["scenario"] == "step") & (df["cohort"] == "95后")]
    if len(step):
        red_raw = np.array([r["red"] for r in step["shares_raw"]])
        red_soft = np.array([r["red"] for r in step["shares_soft"]])
        truth = np.array([t["red"] for t in step["truth"]])
        persons = step["persons"].to_numpy()
        out["step_95后_red"] = {"truth": round(float(truth.mean()), 4), "raw": round(float(np.nanmean(red_raw)), 4),
                               "soft": round(float(np.nanmean(red_soft)), 4),
                               "by_persons": {int(n): {"raw": round(float(np.nanmean(red_raw[persons == n])), 4),
                                                       "soft": round(float(np.nanmean(red_soft[persons == n])), 4)}
                                              for n in np.unique(persons)}}
    return out


def format_cohort_metrics(metrics: dict) -> str:
    """The human-readable report of ``colortrend eval cohorts``."""
    lines = [f"{metrics['runs']} synthetic populations; labelled faces split anew for each seed: calibration about "
             f"{metrics['calibration_faces']} faces, ages lent by about {metrics['population_faces']} others; "
             f"intervals at {metrics['ci']:.0%}; correction smoothing "
             f"{metrics['correction_smoothing']:g}",
             "scenario  cohort  top right raw/corrected  share error raw/corrected  coverage raw/corrected"]
    for name, scenario in metrics["scenarios"].items():
        for cohort, m in scenario["by_cohort"].items():
            lines.append(f"{name:9} {cohort:6}  {m['top_right_raw']:.2f} / {m['top_right_soft']:.2f}"
                         f"{'':14}{m['share_error_raw']:.3f} / {m['share_error_soft']:.3f}"
                         f"{'':15}{m['coverage_raw']:.2f} / {m['coverage_soft']:.2f}")
    o = metrics["overall"]
    lines.append(f"overall             {o['top_right_raw']:.2f} / {o['top_right_soft']:.2f}{'':14}"
                 f"{o['share_error_raw']:.3f} / {o['share_error_soft']:.3f}{'':15}"
                 f"{o['coverage_raw']:.2f} / {o['coverage_soft']:.2f}")
    if "step_95后_red" in metrics:
        s = metrics["step_95后_red"]
        lines.append(f"step: 95后 red share, true {s['truth']:.3f}: raw {s['raw']:.3f}, corrected {s['soft']:.3f}")
    return "\n".join(lines)
