"""Cohort / age-bucket histograms on synthetic garments tables whose right answers are known."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from colortrend.color.names import NAMED_COLORS
from colortrend.aggregate.histograms import (
    HISTOGRAM_SCHEMA,
    AgeCalibration,
    HistogramSettings,
    build_histograms,
    build_sales_histograms,
    load_sales,
)

RGB = {c.en: c.rgb for c in NAMED_COLORS}
NEAR_BLACK = (22, 20, 24)


def garments(ages, colours, year=2016, age_sd=2.0, **extra) -> pd.DataFrame:
    """One person per photo: ages (years) and colours (palette names or RGB triples)."""
    rgb = np.array([RGB[c] if isinstance(c, str) else c for c in colours], dtype=np.uint8).reshape(-1, 3)
    n = len(ages)
    return pd.DataFrame({
        "photo_id": [f"p{i:05d}" for i in range(n)], "face_idx": 0, "content_hash": [f"h{i}" for i in range(n)],
        "age": np.asarray(ages, dtype=float), "age_sd": age_sd, "taken_year": year,
        "dominant_r": rgb[:, 0], "dominant_g": rgb[:, 1], "dominant_b": rgb[:, 2], "quality_ok": True, **extra,
    })


def cells(table: pa.Table, group_type: str = "cohort") -> pd.DataFrame:
    df = table.to_pandas()
    return df[df["group_type"] == group_type]


def cell(df: pd.DataFrame, group: str, bin_id: str) -> pd.Series:
    row = df[(df["group"] == group) & (df["bin_id"] == bin_id)]
    assert len(row) == 1, (group, bin_id)
    return row.iloc[0]


def test_known_ages_land_in_the_right_cohort_and_bucket():
    # 2016 photos: age 19 -> born 1997 (95后); 21.4 rounds to 21 -> 1995 (95后); 21.6 rounds to 22 -> 1994 (90后);
    # 8 -> 2008 (00后); 40 -> 1976 (70后); 60 -> 1956 (no cohort, still in the 60-64 bucket).
    df = garments([19, 21.4, 21.6, 8, 40, 60], ["black"] * 6)
    table = build_histograms(df, HistogramSettings(min_persons=1))
    assert table.schema.equals(HISTOGRAM_SCHEMA)
    cohort = cells(table)
    persons = dict(zip(cohort["group"], cohort["group_persons"]))
    assert persons == {"70后": 1, "80后": 0, "85后": 0, "90后": 1, "95后": 2, "00后": 1}
    assert list(cohort["group"].unique()) == ["70后", "80后", "85后", "90后", "95后", "00后"]
    buckets = cells(table, "age_bucket").drop_duplicates("group").set_index("group")["group_persons"]
    assert buckets["15-19"] == 1 and buckets["20-24"] == 2 and buckets["5-9"] == 1 and buckets["60-64"] == 1
    assert buckets.sum() == 6
    assert cell(cohort, "95后", "black")["group_first"] == 1995


def population(n=600, seed=0):
    rng = np.random.default_rng(seed)
    ages = rng.uniform(8, 45, n)
    colours = rng.choice(["black", "white", "navy", "red", "camel"], n, p=[0.4, 0.2, 0.2, 0.1, 0.1])
    return garments(ages, colours)


def test_shares_sum_to_one_and_intervals_hold_the_share():
    table = build_histograms(population(), HistogramSettings(min_persons=1)).to_pandas()
    shown = table[~table["suppressed"]]
    sums = shown.groupby(["group_type", "group"])["share"].sum()
    assert np.allclose(sums, 1.0)
    assert (shown["ci_low"] <= shown["share"]).all() and (shown["share"] <= shown["ci_high"]).all()
    assert (shown["ci_high"] - shown["ci_low"] > 0).all()
    # Ranks follow the shares within each group.
    for _, group in shown.groupby(["group_type", "group"]):
        ordered = group.sort_values("rank")
        assert list(ordered["rank"]) == list(range(1, len(group) + 1))
        assert ordered["share"].is_monotonic_decreasing


def test_lift_compares_with_the_other_cohorts():
    young = garments([18] * 30 + [30] * 30, ["black"] * 20 + ["white"] * 10 + ["black"] * 10 + ["white"] * 20)
    cohort = cells(build_histograms(young, HistogramSettings(min_persons=1)))
    black_95 = cell(cohort, "95后", "black")  # 2/3 in 95后 against 1/3 in the others
    assert black_95["share"] == pytest.approx(2 / 3)
    assert black_95["lift"] == pytest.approx(2.0)


def test_small_cells_are_suppressed_with_the_reason():
    # 95后: 12 black, 3 red; 90后: 20 white. In 95后 the white cell (0) and red (3) are hidden, black shown.
    df = garments([18] * 15 + [24] * 20, ["black"] * 12 + ["red"] * 3 + ["white"] * 20)
    cohort = cells(build_histograms(df, HistogramSettings(min_persons=10)))
    red = cell(cohort, "95后", "red")
    assert red["suppressed"] and red["suppressed_reason"] == "fewer than 10 persons"
    assert pd.isna(red["persons"]) and pd.isna(red["share"]) and pd.isna(red["ci_low"]) and pd.isna(red["rank"])
    black = cell(cohort, "95后", "black")
    assert not black["suppressed"] and black["persons"] == 12 and black["rank"] == 1
    assert black["share"] == pytest.approx(12 / 15)  # shares stay relative to the whole cohort
    # A cohort under the minimum publishes no cell but keeps its size.
    assert cohort[cohort["group"] == "80后"]["suppressed"].all()


def test_a_lone_suppressed_cell_is_protected_by_a_second_one():
    # Only two bins exist: red (3) would follow from 95后's total minus black, so black is hidden too.
    df = garments([18] * 15 + [24] * 20, ["black"] * 12 + ["red"] * 3 + ["black"] * 20)
    cohort = cells(build_histograms(df, HistogramSettings(min_persons=10)))
    black = cell(cohort, "95后", "black")
    assert black["suppressed"] and black["suppressed_reason"] == "protects a smaller suppressed cell"
    assert not cell(cohort, "90后", "black")["suppressed"]


def test_each_person_counted_once_and_only_good_faces():
    df = garments([18, 18, 18, 18], ["black"] * 4)
    df.loc[1, "content_hash"] = "h0"  # the same photo under a second name
    df.loc[2, "quality_ok"] = False  # a face the quality filters rejected
    cohort = cells(build_histograms(df, HistogramSettings(min_persons=1)))
    assert cell(cohort, "95后", "black")["persons"] == 2


def test_representative_colour_is_the_median_of_the_members():
    colours = [NEAR_BLACK] * 7 + [(40, 40, 40)] * 3
    cohort = cells(build_histograms(garments([18] * 10, colours), HistogramSettings(min_persons=1)))
    row = cell(cohort, "95后", "black")
    assert (row["rep_r"], row["rep_g"], row["rep_b"]) == NEAR_BLACK
    assert (row["color_name"], row["color_name_zh"]) == ("black", "黑色")


def test_same_seed_same_table_other_seed_other_intervals():
    df = population()
    a = build_histograms(df, HistogramSettings())
    b = build_histograms(df.sample(frac=1.0, random_state=1), HistogramSettings())  # row order must not matter
    assert a.equals(b)
    c = build_histograms(df, HistogramSettings(seed=1)).to_pandas()
    assert not np.allclose(a.to_pandas()["ci_low"].dropna(), c["ci_low"].dropna())


def test_grid_bins_are_named_and_deterministic():
    df = population()
    settings = HistogramSettings(bins="grid", grid_step=8.0, min_persons=1)
    a = build_histograms(df, settings)
    assert a.equals(build_histograms(df, settings))
    cohort = cells(a)
    assert cohort["bin_id"].str.match(r"^lab\(-?\d+(\.\d+)?,-?\d+(\.\d+)?,-?\d+(\.\d+)?\)$").all()
    assert set(cohort["color_name"]) == {"black", "white", "navy", "red", "camel"}


def test_corrected_counts_add_up_to_the_persons():
    # Everyone aged 25-35 in 2016 (born 1981-1991, well inside the cohorts): nothing falls outside.
    rng = np.random.default_rng(3)
    df = garments(rng.uniform(25, 35, 200), rng.choice(["black", "white"], 200), age_sd=1.5)
    table = build_histograms(df, HistogramSettings(min_persons=1)).to_pandas()
    for group_type in ("cohort", "age_bucket"):
        soft = table[table["group_type"] == group_type]["persons_soft"].sum()
        assert soft == pytest.approx(200, rel=0.01)  # the smoothed estimate leaves thin tails outside


def blurred_population(n, seed, error_sd, bias=0.0):
    """Truth: the 95后 of 2016 wear black 70 %, everyone else 20 %; the ages seen carry a Gaussian error."""
    rng = np.random.default_rng(seed)
    true_age = rng.uniform(10, 50, n)
    born = 2016 - np.floor(true_age + 0.5)
    in_95 = (born >= 1995) & (born <= 1999)
    black = rng.random(n) < np.where(in_95, 0.7, 0.2)
    seen = true_age + bias + rng.normal(0, error_sd, n)
    return garments(seen, np.where(black, "black", "white"), age_sd=error_sd), black[in_95].mean(), in_95.sum()


def test_correction_undoes_part_of_the_age_blur():
    df, truth, _ = blurred_population(4000, seed=0, error_sd=3.0)
    row = cell(cells(build_histograms(df, HistogramSettings())), "95后", "black")
    # Raw counting mixes neighbours in (about 0.5); the corrected share is closer to the truth (0.7).
    assert abs(row["share_soft"] - truth) < abs(row["share"] - truth) - 0.05


def test_calibration_from_labelled_faces_removes_a_bias():
    # The age model reads everyone 4 years young, so the raw 95后 are mostly 00后 (black 0.3 instead of 0.7).
    # The model's own spread cannot know that; the error measured on labelled faces moves them back.
    df, truth, _ = blurred_population(4000, seed=1, error_sd=2.0, bias=-4.0)
    rng = np.random.default_rng(2)
    labelled = rng.uniform(5, 60, 2000)
    calibration = AgeCalibration.from_predictions(labelled, labelled - 4.0 + rng.normal(0, 2.0, 2000))
    assert calibration.bias[20] == pytest.approx(-4.0, abs=0.3) and calibration.sd[20] == pytest.approx(2.0, abs=0.3)
    plain = cell(cells(build_histograms(df, HistogramSettings())), "95后", "black")
    fixed = cell(cells(build_histograms(df, HistogramSettings(), age_calibration=calibration)), "95后", "black")
    assert abs(plain["share"] - truth) > 0.35 and abs(plain["share_soft"] - truth) > 0.35
    assert abs(fixed["share_soft"] - truth) < 0.15


def test_sales_are_binned_like_the_photos_and_blended(tmp_path):
    df = garments([18] * 30 + [24] * 30, ["black"] * 20 + ["white"] * 10 + ["white"] * 30)
    sales = pd.DataFrame({
        "birth_year": [1996, 1997, 1998, 1992, 1960],
        "r": [20, None, None, None, 0], "g": [22, None, None, None, 0], "b": [21, None, None, None, 0],
        "color_name": [None, "white", "白色", "White", None],
        "quantity": [10, 20, 10, 5, 99],  # 1960 is in no cohort
    })
    path = tmp_path / "sales.csv"
    sales.to_csv(path, index=False)
    settings = HistogramSettings(min_persons=1, sales_weight=0.25)
    alone = build_sales_histograms(load_sales(path), settings).to_pandas()
    assert alone[alone["group"] == "95后"].set_index("bin_id")["quantity"].to_dict() == {"black": 10, "white": 30}
    assert alone[alone["group"] == "90后"]["sales_share"].tolist() == [1.0]

    table = cells(build_histograms(df, HistogramSettings(min_persons=1, sales_weight=0.25, sales_path=str(path))))
    black, white = cell(table, "95后", "black"), cell(table, "95后", "white")
    assert black["sales_share"] == pytest.approx(0.25) and white["sales_share"] == pytest.approx(0.75)
    assert black["blended_share"] == pytest.approx(0.75 * 2 / 3 + 0.25 * 0.25)
    assert white["blended_share"] == pytest.approx(0.75 * 1 / 3 + 0.25 * 0.75)
    assert (black["rank"], black["blended_rank"]) == (1, 1)
    heavy = cells(build_histograms(df, HistogramSettings(min_persons=1, sales_weight=0.9), sales=sales))
    assert cell(heavy, "95后", "white")["blended_rank"] == 1  # sales outweigh the photos
    assert pd.isna(cell(heavy, "80后", "black")["sales_share"])  # no sales in that cohort


def test_bad_sales_and_settings_fail_with_the_reason():
    df = garments([18], ["black"])
    with pytest.raises(ValueError, match="neither r,g,b nor a palette name: chartreuse-ish"):
        build_histograms(df, HistogramSettings(), sales=pd.DataFrame(
            {"birth_year": [1996], "quantity": [1], "color_name": ["chartreuse-ish"]}))
    with pytest.raises(ValueError, match="lacks column"):
        build_histograms(df, HistogramSettings(), sales=pd.DataFrame({"birth_year": [1996], "color_name": ["red"]}))
    with pytest.raises(ValueError, match="overlap"):
        HistogramSettings(cohorts=(("a", 1990, 1995), ("b", 1995, 1999)))
    with pytest.raises(ValueError, match="garments table lacks column"):
        build_histograms(df.drop(columns="age"), HistogramSettings())


def test_no_persons_gives_an_empty_table_with_the_schema():
    table = build_histograms(garments([], []), HistogramSettings())
    assert table.num_rows == 0 and table.schema.equals(HISTOGRAM_SCHEMA)
