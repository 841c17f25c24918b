"""`colortrend eval cohorts` and `colortrend.histograms`: what an analyst runs to know whether to trust the table."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import colortrend
from colortrend.aggregate.age_error import DEFAULT_CALIBRATION
from colortrend.cli import main
from colortrend.color.names import NAMED_COLORS
from colortrend.errors import ConfigError

RGB = {c.en: c.rgb for c in NAMED_COLORS}


def garments(n=600, seed=0):
    rng = np.random.default_rng(seed)
    ages = rng.uniform(12, 50, n)
    rgb = np.array([RGB[c] for c in rng.choice(["black", "white", "red"], n)], dtype=np.uint8)
    return pd.DataFrame({"photo_id": [f"p{i}" for i in range(n)], "face_idx": 0, "age": ages, "taken_year": 2016,
                         "quality_ok": True, "dominant_r": rgb[:, 0], "dominant_g": rgb[:, 1], "dominant_b": rgb[:, 2]})


def test_eval_cohorts_scores_raw_and_corrected_tables_on_planted_effects(tmp_path):
    # The shipped calibration is the default age model's real errors on faces it never trained on.
    result = CliRunner().invoke(main, ["eval", "cohorts", str(DEFAULT_CALIBRATION), "--sizes", "50000", "--seeds", "1",
                                       "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output.strip().splitlines()[-1])
    assert set(metrics["scenarios"]) == {"step", "trend", "reversal"} and metrics["runs"] == 3
    cohorts = metrics["scenarios"]["step"]["by_cohort"]
    assert list(cohorts) == ["70后", "80后", "85后", "90后", "95后", "00后"]
    for figures in cohorts.values():
        assert {"top_right_raw", "top_right_soft", "share_error_raw", "share_error_soft", "coverage_raw",
                "coverage_soft"} <= set(figures)
    # The case: the 95后 truly wear red 40 %. Counting by estimated age says black, with intervals that
    # miss the truth; the corrected table finds red, near 40 %, inside its intervals.
    planted = metrics["step_95后_red"]
    assert planted["truth"] == pytest.approx(0.4) and planted["raw"] < 0.3
    assert abs(planted["soft"] - 0.4) < 0.08
    young = cohorts["95后"]
    assert young["top_right_raw"] == 0 and young["top_right_soft"] == 1
    assert young["coverage_raw"] < 0.5 and young["coverage_soft"] == 1
    # Over every scenario and cohort, the corrected intervals cover the truth near their nominal 95 %.
    assert metrics["overall"]["coverage_soft"] >= 0.85 > metrics["overall"]["coverage_raw"]


def test_eval_cohorts_compares_the_penalised_correction_with_the_plain_fit():
    def run(*extra):
        result = CliRunner().invoke(main, ["eval", "cohorts", str(DEFAULT_CALIBRATION), "--sizes", "2000", "--seeds",
                                           "2", "--json", *extra])
        assert result.exit_code == 0, result.output
        return json.loads(result.output.strip().splitlines()[-1])

    penalised, plain = run(), run("--correction-smoothing", "0")
    assert (penalised["correction_smoothing"], plain["correction_smoothing"]) == (5.0, 0.0)
    # At 2,000 persons the plain fit is noisy: the penalty brings the corrected shares nearer the truth, and leaves
    # the intervals (the plain fit's bootstrap) covering it as often.
    assert penalised["overall"]["share_error_soft"] < 0.6 * plain["overall"]["share_error_soft"]
    assert penalised["overall"]["coverage_soft"] >= plain["overall"]["coverage_soft"] - 0.01


def test_eval_cohorts_refuses_a_file_without_true_ages(tmp_path):
    (tmp_path / "p.csv").write_text("path,predicted_age\na.jpg,20\n")
    result = CliRunner().invoke(main, ["eval", "cohorts", str(tmp_path / "p.csv")])
    assert result.exit_code == 2 and "no age column" in result.output
    result = CliRunner().invoke(main, ["eval", "cohorts", str(DEFAULT_CALIBRATION), "--sizes", "ten"])
    assert result.exit_code == 2 and "--sizes" in result.output


def test_library_call_recuts_cohorts_with_validated_settings():
    df = garments()
    table = colortrend.histograms(df, cohorts=[["young", 2000, 2004], ["older", 1966, 1999]], bootstrap=50,
                                  min_persons=5)
    assert isinstance(table, pd.DataFrame)
    cohorts = table[table["group_type"] == "cohort"]
    assert list(cohorts["group"].unique()) == ["young", "older"]
    assert {"share", "ci_low", "ci_high", "share_soft", "share_soft_low", "share_soft_high", "purity"} <= set(table)
    young = cohorts[cohorts["group"] == "young"]
    assert young["group_persons"].iloc[0] == ((2016 - np.floor(df["age"] + 0.5)).between(2000, 2004)).sum()
    with pytest.raises(ConfigError, match="histograms.bootstrapp: unknown key"):
        colortrend.histograms(df, bootstrapp=10)
    with pytest.raises(ConfigError, match="histograms.min_persons: expected an integer"):
        colortrend.histograms(df, min_persons="ten")
    with pytest.raises(ConfigError, match="lacks column"):
        colortrend.histograms(df.drop(columns="age"))


def test_one_cohort_spanning_every_birth_year_is_corrected_without_neighbours():
    # Nothing outside the one group: the correction has no neighbour to pull it towards, and must not need one.
    df = garments()
    table = colortrend.histograms(df, cohorts=[["everyone", 1800, 2100]], bootstrap=20, min_persons=1)
    everyone = table[(table["group_type"] == "cohort") & table["share_soft"].notna()]
    assert len(everyone) == 3 and everyone["share_soft"].sum() == pytest.approx(1.0)
    assert (everyone["share_soft"] - everyone["share"]).abs().max() < 1e-6  # every person is in it: nothing to undo
