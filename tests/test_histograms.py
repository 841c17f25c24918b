"""Cohort / age-bucket histograms on synthetic garments tables whose right answers are known."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from colortrend.aggregate import histograms as h
from colortrend.aggregate.age_error import default_age_calibration
from colortrend.aggregate.histograms import (
    HISTOGRAM_SCHEMA,
    LAB_STEP,
    AgeCalibration,
    HistogramSettings,
    Partial,
    build_histograms,
    histograms_from_partial,
    load_sales,
    select_persons,
    whole_years,
)
from colortrend.color.names import NAMED_COLORS
from colortrend.color.space import lab_to_rgb, rgb_to_lab, to_uint8

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


def test_the_stored_cielab_centre_bins_a_person_before_its_8_bit_rgb():
    """The k-means centre in CIELAB (dominant_lab_l/a/b) is the precise colour; its 8-bit RGB only stands in
    where it is missing. A centre stored as red bins as red even though its RGB columns say black."""
    red = rgb_to_lab(np.array([RGB["red"]], float))[0]
    df = garments([30, 30], ["black", "black"], dominant_lab_l=[red[0], np.nan], dominant_lab_a=[red[1], np.nan],
                  dominant_lab_b=[red[2], np.nan])
    cohort = cells(build_histograms(df, HistogramSettings(min_persons=1)))
    assert cell(cohort, "85后", "red")["persons"] == 1 and cell(cohort, "85后", "black")["persons"] == 1


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
    # Everyone aged 25-35 in 2016 (born 1981-1991, well inside the cohorts) and an age error of 2 years: nothing
    # falls outside. Without a calibration the shipped measurement of the default age model is used: its wider,
    # skewed error lets a few of these persons be older than every cohort.
    rng = np.random.default_rng(3)
    df = garments(rng.uniform(25, 35, 200), rng.choice(["black", "white"], 200), age_sd=1.5)
    narrow = measured(lambda age, rng: rng.normal(0, 2.0, len(age)))
    for calibration, low in ((narrow, 198), (None, 190)):
        table = build_histograms(df, HistogramSettings(min_persons=1), age_calibration=calibration).to_pandas()
        for group_type in ("cohort", "age_bucket"):
            soft = table[table["group_type"] == group_type]["persons_soft"].sum()
            assert low <= soft <= 200 + 1e-6


def blurred_population(n, seed, error_sd, bias=0.0):
    """Truth: the 95后 of 2016 wear black 70 %, everyone else 20 %; the ages seen carry a Gaussian error."""
    rng = np.random.default_rng(seed)
    true_age = rng.integers(10, 51, n)
    born = 2016 - true_age
    in_95 = (born >= 1995) & (born <= 1999)
    black = rng.random(n) < np.where(in_95, 0.7, 0.2)
    seen = true_age + bias + rng.normal(0, error_sd, n)
    return garments(seen, np.where(black, "black", "white"), age_sd=error_sd), 0.7, in_95.sum()


def measured(error, faces=2000, seed=2):
    """A calibration: ``faces`` labelled faces aged 3-70 whose estimates carry ``error(true ages, rng)``."""
    rng = np.random.default_rng(seed)
    labelled = rng.integers(3, 71, faces).astype(float)
    return AgeCalibration.from_predictions(labelled, labelled + error(labelled, rng))


def test_correction_undoes_the_age_blur_and_its_interval_covers_the_truth():
    df, truth, _ = blurred_population(4000, seed=0, error_sd=3.0)
    calibration = measured(lambda age, rng: rng.normal(0, 3.0, len(age)))
    row = cell(cells(build_histograms(df, HistogramSettings(), age_calibration=calibration)), "95后", "black")
    # Raw counting mixes neighbours in (about 0.5, its interval far from 0.7); the corrected share is near the truth.
    assert row["ci_high"] < truth - 0.05
    assert abs(row["share_soft"] - truth) < abs(row["share"] - truth) - 0.08
    assert row["share_soft_low"] <= truth <= row["share_soft_high"]
    assert row["share_soft_low"] <= row["share_soft"] <= row["share_soft_high"]


def test_calibration_from_labelled_faces_removes_a_bias_that_grows_for_the_young():
    # The case: the young are over-aged by up to 4 years, so the 95后 of the raw table are mostly 00后.
    def over_ages_the_young(age, rng):
        return np.clip((26 - age) * 0.4, 0, 4) + rng.normal(0, 2.5, len(age))

    rng = np.random.default_rng(5)
    true_age = rng.integers(8, 60, 8000)
    born = 2016 - true_age
    in_95 = (born >= 1995) & (born <= 1999)
    u = rng.random(len(true_age))
    colour = np.where(in_95, np.where(u < 0.4, "red", np.where(u < 0.7, "black", "white")),
                      np.where(u < 0.4, "black", np.where(u < 0.45, "red", "white")))
    df = garments(true_age + over_ages_the_young(true_age.astype(float), rng), colour)
    table = cells(build_histograms(df, HistogramSettings(), age_calibration=measured(over_ages_the_young)))
    red, black = cell(table, "95后", "red"), cell(table, "95后", "black")
    assert red["rank"] != 1 and not red["ci_low"] <= 0.4 <= red["ci_high"]  # raw: "95后 wear black", confidently
    assert red["rank_soft"] == 1 and abs(red["share_soft"] - 0.4) < 0.08
    assert red["share_soft_low"] <= 0.4 <= red["share_soft_high"]
    assert black["share_soft_low"] <= 0.3 <= black["share_soft_high"]


def test_smoothing_the_correction_brings_it_nearer_the_truth_and_leaves_its_interval():
    # A smooth trend (navy rising with birth year) blurred by over-aging errors, at a size where the plain fit is
    # noisy: the penalised shares are nearer the truth in every seed on average, the intervals are the plain fit's.
    def errs(age, rng):
        return np.clip((26 - age) * 0.3, 0, 3) + rng.normal(0, 4.0, len(age))

    calibration = measured(errs)
    plain_error, smooth_error = [], []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        true_age = rng.integers(5, 65, 3000)
        navy = np.clip(0.1 + 0.4 * (2016 - true_age - 1966) / 43, 0.1, 0.5)
        colour = np.where(rng.random(len(true_age)) < navy, "navy", "black")
        df = garments(true_age + errs(true_age.astype(float), rng), colour)
        tables = {lam: cells(build_histograms(df, HistogramSettings(correction_smoothing=lam, bootstrap=200),
                                              age_calibration=calibration)) for lam in (0.0, 5.0)}
        for label, first, last in HistogramSettings().cohorts:
            born = 2016 - true_age
            truth = navy[(born >= first) & (born <= last)].mean()
            plain_error.append(abs(cell(tables[0.0], label, "navy")["share_soft"] - truth))
            smooth_error.append(abs(cell(tables[5.0], label, "navy")["share_soft"] - truth))
            for table in tables.values():
                row = cell(table, label, "navy")
                assert row["share_soft_low"] <= row["share_soft"] <= row["share_soft_high"]
        plain, smooth = (t.set_index(["group", "bin_id"]) for t in tables.values())
        assert (smooth["share_soft_low"] <= plain["share_soft_low"] + 1e-9).all()  # widened only to hold the estimate
    assert np.mean(smooth_error) < 0.7 * np.mean(plain_error)


def test_corrected_shares_are_shares_of_the_group_and_small_groups_have_none():
    df, _, _ = blurred_population(3000, seed=4, error_sd=3.0)
    df = pd.concat([df, garments([62.0] * 3, ["red"] * 3).assign(photo_id=["x1", "x2", "x3"],
                                                                  content_hash=["y1", "y2", "y3"])])
    calibration = measured(lambda age, rng: rng.normal(0, 3.0, len(age)))
    table = build_histograms(df, HistogramSettings(min_persons=5), age_calibration=calibration).to_pandas()
    cohorts = table[table["group_type"] == "cohort"]
    sums = cohorts.groupby("group")["share_soft"].sum()
    # Up to what the hidden cells (too few raw persons) hold: a few millionths here.
    assert sums.to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert ((cohorts["purity"] > 0) & (cohorts["purity"] < 1)).all()
    old = table[(table["group_type"] == "age_bucket") & (table["group"] == "60-64")]
    assert old["share_soft"].isna().all() and old["share_soft_low"].isna().all()  # 3 persons: nothing to correct


def test_an_age_gap_in_the_labelled_faces_gives_every_true_age_an_error():
    # No labelled face aged 31-79: those true ages take the error of the nearest faces, in every bootstrap resample
    # too, never an undefined (NaN) column that would blank the corrected shares.
    rng = np.random.default_rng(0)
    true_age = np.concatenate([rng.integers(5, 31, 40), rng.integers(80, 91, 8)]).astype(float)
    calibration = AgeCalibration.from_predictions(true_age, true_age + rng.normal(2, 3, len(true_age)))
    for matrix in (calibration.error_matrix(), *calibration.resampled_error_matrices(20, seed=0)):
        assert np.isfinite(matrix).all()
        assert np.allclose(matrix.sum(axis=0), 1.0)


def test_a_smaller_calibration_widens_the_corrected_interval():
    df, _, _ = blurred_population(4000, seed=6, error_sd=3.0)

    def width(faces):
        calibration = measured(lambda age, rng: rng.normal(0, 3.0, len(age)), faces=faces)
        row = cell(cells(build_histograms(df, HistogramSettings(), age_calibration=calibration)), "95后", "black")
        return row["share_soft_high"] - row["share_soft_low"]

    assert width(60) > 1.2 * width(6000)


def test_each_bootstrap_fit_stops_on_its_own_as_if_fitted_alone():
    # The replicates are fitted together, but each stops when it has converged: its result does not depend on the
    # replicates it was fitted with (before, all ran until the slowest had converged).
    from colortrend.aggregate.age_error import EM_MAX_ITER, _em

    rng = np.random.default_rng(3)
    est, true, bins, fits = 30, 50, 4, 6
    error = rng.dirichlet(np.ones(est), size=(fits, true)).transpose(0, 2, 1)  # (fits, estimates, true ages)
    counts = rng.poisson(rng.uniform(0.5, 30, (fits, 1, bins, est)))  # replicates near and far from converged
    block = (np.arange(true) // 10)[None, :]
    together = _em(counts.astype(np.float64), error, block, 5, None, EM_MAX_ITER)
    for i in range(fits):
        alone = _em(counts[i:i + 1].astype(np.float64), error[i:i + 1], block, 5, None, EM_MAX_ITER)
        for got, expected in zip(together, alone):
            np.testing.assert_allclose(got[i], expected[0], rtol=1e-9, atol=1e-12)


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
    loaded = load_sales(path)
    blended = cells(build_histograms(df, settings, sales=loaded))
    quantity = blended[blended["group"] == "95后"].set_index("bin_id")["sales_quantity"].dropna().to_dict()
    assert quantity == {"black": 10, "white": 30}
    assert blended[(blended["group"] == "90后") & (blended["bin_id"] == "white")]["sales_share"].tolist() == [1.0]

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


# ------------------------------------------------------------------------ partials against the row-based statistics
def rowwise_histograms(garments_df: pd.DataFrame, settings: HistogramSettings, sales=None, age_calibration=None,
                       group_types=("cohort", "age_bucket")) -> pd.DataFrame:
    """The row-based build of the table before partials (kept here as the reference): every person's row binned,
    grouped and median-ed with pandas, then the same cell statistics."""
    if age_calibration is None:
        age_calibration = default_age_calibration()
    persons = select_persons(garments_df, settings)
    lab = persons[["l", "a", "b"]].to_numpy(np.float64)
    keys = h._bin_keys(lab, settings)
    sales_cells = h._sales_cells(sales, settings) if sales is not None else None
    bins = h._make_bins(np.concatenate([keys, sales_cells[1] if sales_cells else []]).astype(np.int64), settings)
    k = np.searchsorted(bins.keys, keys)
    bin_lab = bins.nominal_lab.astype(np.float64).copy()
    if len(lab):
        medians = pd.DataFrame(lab).groupby(k).median()
        bin_lab[medians.index.to_numpy()] = medians.to_numpy()
    names = h._bin_names(bins, bin_lab, settings)
    taken = persons["taken_year"].to_numpy(np.int64)
    age_years = whole_years(persons["age"].to_numpy(np.float64))
    estimated = np.clip(age_years, 0, 110)
    by_year = {int(t): np.zeros((len(bins.keys), 111)) for t in np.unique(taken)}
    for t, counts in by_year.items():
        np.add.at(counts, (k[taken == t], estimated[taken == t]), 1)
    frames = []
    for kind in group_types:
        groups = h._cohort_groups(settings) if kind == "cohort" else h._bucket_groups(age_years, settings)
        hard = groups.index(taken, age_years)
        inside = hard >= 0
        counts = np.zeros((len(groups.labels), len(bins.keys)), dtype=np.int64)
        np.add.at(counts, (hard[inside], k[inside]), 1)
        cell_lab = np.full((len(groups.labels), len(bins.keys), 3), np.nan)
        if inside.any():
            medians = pd.DataFrame(lab[inside]).groupby([hard[inside], k[inside]]).median()
            cell_lab[medians.index.get_level_values(0), medians.index.get_level_values(1)] = medians.to_numpy()
        correction = h._correction(groups, by_year, age_calibration, settings)
        frame = h._group_frame(groups, counts, cell_lab, correction, bins, bin_lab, names, settings)
        frames.append(h._blend(frame, sales_cells, bins, settings) if kind == "cohort" else frame)
    return pd.concat(frames, ignore_index=True)[HISTOGRAM_SCHEMA.names]


REP = ["rep_r", "rep_g", "rep_b"]


def assert_same_statistics(table: pd.DataFrame, reference: pd.DataFrame) -> None:
    """Equal in every column; representative colours (sketched medians) within 1 unit of 8-bit sRGB."""
    table = table.reset_index(drop=True)
    reference = pa.Table.from_pandas(reference, schema=HISTOGRAM_SCHEMA, preserve_index=False).to_pandas()
    assert len(table) == len(reference) and len(table)
    pd.testing.assert_frame_equal(table.drop(columns=REP), reference.drop(columns=REP), check_dtype=False)
    assert np.abs(table[REP].astype(int).to_numpy() - reference[REP].astype(int).to_numpy()).max() <= 1


def real_population(n: int, seed: int) -> pd.DataFrame:
    """Ages the shipped age model gave real faces (its calibration CSV), garment colours of real photo pixels
    (data/demo), three photo years, some rejected faces and some repeated photos."""
    from PIL import Image

    from colortrend.aggregate.age_error import DEFAULT_CALIBRATION

    rng = np.random.default_rng(seed)
    ages = pd.read_csv(DEFAULT_CALIBRATION)["predicted_age"].dropna().to_numpy()
    photos = sorted((ROOT / "data" / "demo").glob("*.jpg"))[:6]
    pixels = np.concatenate([np.asarray(Image.open(p).convert("RGB").reduce(8)).reshape(-1, 3) for p in photos])
    rgb = pixels[rng.integers(0, len(pixels), n)]
    df = garments(rng.choice(ages, n), [tuple(c) for c in rgb], year=2016)
    df["taken_year"] = rng.choice([2015, 2016, 2017], n)
    df["quality_ok"] = rng.random(n) > 0.1
    repeated = rng.choice(n, n // 20, replace=False)  # the same bytes under another name: counted once
    df.loc[repeated, "content_hash"] = df["content_hash"].iloc[(repeated + 1) % n].to_numpy()
    return df


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("bins", ["palette", "grid"])
def test_partial_statistics_equal_the_row_based_ones_on_real_ages_and_colours(bins):
    df = real_population(1500, seed=1)
    settings = HistogramSettings(bins=bins, grid_step=20.0, min_persons=5, bootstrap=20)
    sales = pd.DataFrame({"birth_year": [1996, 1990, 1980], "color_name": ["black", "white", "navy"],
                          "quantity": [5, 3, 2]})
    table = build_histograms(df, settings, sales=sales).to_pandas()
    assert_same_statistics(table, rowwise_histograms(df, settings, sales=sales))
    assert table["share_soft"].notna().any() and table["suppressed"].any() and table["sales_share"].notna().any()


def test_partial_statistics_equal_the_row_based_ones_on_generated_ages_outside_every_group():
    # Negative, very old and fractional ages, a measured calibration, upper-garment colours with stored CIELAB.
    rng = np.random.default_rng(2)
    n = 2500
    df = garments(np.r_[rng.uniform(-3, 95, n - 2), [-0.6, 104.4]], rng.choice(list(RGB)[:12], n))
    df = df.rename(columns={f"dominant_{c}": f"upper_{c}" for c in "rgb"})
    lab = rgb_to_lab(df[[f"upper_{c}" for c in "rgb"]].to_numpy(np.float64)) + rng.normal(0, 0.4, (n, 3))
    for i, c in enumerate("lab"):
        df[f"upper_lab_{c}"] = lab[:, i]
    calibration = measured(lambda age, rng: rng.normal(1.0, 2.5, len(age)))
    for settings in (HistogramSettings(colour="upper", min_persons=3, bootstrap=20, age_bucket_years=7),
                     HistogramSettings(colour="upper", bins="grid", grid_step=6.0, bootstrap=20)):
        table = build_histograms(df, settings, age_calibration=calibration).to_pandas()
        assert_same_statistics(table, rowwise_histograms(df, settings, age_calibration=calibration))


def test_partials_merge_to_the_partial_of_all_persons():
    df = real_population(1000, seed=3).drop_duplicates("content_hash")  # shards never share a person
    settings = HistogramSettings(min_persons=3, bootstrap=20)
    whole = Partial.of_garments(df, settings)
    shards = np.random.default_rng(0).integers(0, 7, len(df))
    merged = Partial.merge(Partial.of_garments(df[shards == s], settings) for s in range(7))
    for field in ("cell_codes", "cell_persons", "colour_codes", "colour_persons"):
        assert np.array_equal(getattr(merged, field), getattr(whole, field)), field
    assert merged.persons == df["quality_ok"].sum()
    assert histograms_from_partial(merged, settings).equals(build_histograms(df, settings))


def test_sketched_median_is_within_half_a_step_of_the_exact_one():
    rng = np.random.default_rng(4)
    settings = HistogramSettings(min_persons=1)
    for n in (1, 2, 3, 10, 501, 4000):
        lab = np.c_[rng.uniform(0, 100, n), rng.normal(0, 30, n), rng.normal(0, 30, n)]
        rgb = to_uint8(lab_to_rgb(lab))
        df = garments([20.0] * n, [tuple(c) for c in rgb])
        persons = select_persons(df, settings)
        lab = persons[["l", "a", "b"]].to_numpy()
        exact = pd.DataFrame(lab).groupby(h._bin_keys(lab, settings)).median()
        partial = Partial.of_garments(df, settings)
        at, median = h._sketch_medians(partial.colour_codes, partial.colour_persons)
        bucket = at["group_type"] == h._BUCKET  # everyone is 20: one bucket holds every person
        got = np.full(exact.shape, np.nan)
        got[np.searchsorted(exact.index.to_numpy(), at["bin_key"][bucket]), at["channel"][bucket]] = median[bucket]
        assert np.abs(got - exact.to_numpy()).max() <= LAB_STEP / 2 + 1e-9, n


# ---------------------------------------------------------------------------------- aggregation of committed shards
def commit(store, shard_id: str, rows: pd.DataFrame, schemas: dict, status=None) -> None:
    """Commit one shard whose photos each hold one measured person, through the store's own commit."""
    status = status if status is not None else ["ok"] * len(rows)
    base = {"photo_id": rows["photo_id"], "path": rows["photo_id"], "status": status, "face_idx": rows["face_idx"],
            "content_hash": rows["content_hash"], "taken_year": rows["taken_year"], "quality_ok": rows["quality_ok"]}
    columns = {**base, **{c: rows[c] for c in rows.columns}}
    tables = {name: pa.table({f.name: pa.array(columns[f.name], f.type) if f.name in columns else
                              pa.nulls(len(rows), f.type) for f in schema}, schema=schema)
              for name, schema in schemas.items()}
    store.commit_shard(shard_id, tables, {"photo_ids": list(rows["photo_id"]), "created": shard_id})


@pytest.fixture()
def committed(tmp_path):
    from colortrend.config import load_from_dict
    from colortrend.io.store import Store
    from colortrend.pipeline import Pipeline

    def cfg(**histograms):
        return load_from_dict({"name": "agg", "input": {"paths": ["x"]}, "output": str(tmp_path / "out"),
                               "histograms": {"bootstrap": 20, "min_persons": 3, **histograms}})

    store = Store(tmp_path / "out")
    store.prepare()
    df = real_population(600, seed=5).drop_duplicates("content_hash").assign(taken_year=2016)
    schemas = Pipeline(cfg()).schemas
    for s, part in enumerate(np.array_split(np.arange(len(df)), 3)):
        commit(store, f"s{s}", df.iloc[part], schemas)
    return {"store": store, "cfg": cfg, "df": df, "schemas": schemas, "out": tmp_path / "out"}


def partial_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "_partials").glob("*.parquet")}


def test_committed_shards_aggregate_to_the_table_of_all_their_rows(committed):
    from colortrend.run import build_aggregates, read

    out, cfg = committed["out"], committed["cfg"]
    assert build_aggregates(cfg(), committed["store"], force=True) == "rebuilt"
    table = read(str(out), "histograms")
    assert table.equals(build_histograms(committed["df"], cfg().histograms).to_pandas())
    page = (out / "report" / "index.html").read_text(encoding="utf-8")
    assert f'persons measured (garments)</td><td class="num">{len(committed["df"]):,}' in page
    assert len(partial_files(out)) == 3  # one per shard


def test_cached_partials_are_reused_and_rebuilt_only_for_what_shapes_them(committed):
    from colortrend.io.store import Store
    from colortrend.run import build_aggregates, read

    out, cfg, store = committed["out"], committed["cfg"], committed["store"]
    build_aggregates(cfg(), store, force=True)
    first = partial_files(out)
    build_aggregates(cfg(min_persons=5, bootstrap=30), store, force=True)  # not in a partial: all reused
    assert partial_files(out) == first
    recut = cfg(cohorts=[["young", 1995, 2009], ["old", 1940, 1994]])
    build_aggregates(recut, store, force=True)  # cohorts shape partials: a new set, the old one kept
    assert len(partial_files(out)) == 6 and set(first) < set(partial_files(out))
    assert read(str(out), "histograms").equals(build_histograms(committed["df"], recut.histograms).to_pandas())
    # A shard re-committed in place (same id, other rows) is rebuilt; a dropped shard's partials are deleted, and
    # so are those of a shard whose marker is gone (recovery); files not named like a partial stay.
    (out / "_partials" / "notes.txt").write_text("mine")
    (out / "_partials" / "mine.parquet").write_bytes(b"not ours")
    df = committed["df"]
    fewer = df[df["photo_id"].isin(store.read_marker("s0")["photo_ids"][:50])]
    commit(store, "s0", fewer, committed["schemas"])
    store.drop_shard("s1")
    build_aggregates(cfg(), store, force=True)
    kept = pd.concat([fewer, df[df["photo_id"].isin(store.read_marker("s2")["photo_ids"])]])
    assert read(str(out), "histograms").equals(build_histograms(kept, cfg().histograms).to_pandas())
    names = set(partial_files(out))
    assert not any(n.startswith("s1.") for n in names)
    store.delete("_markers/s2.json")
    assert any("partial of uncommitted shard s2" in a for a in Store(out).recover())
    assert {n.split(".")[0] for n in partial_files(out)} == {"s0", "mine"}
    assert (out / "_partials" / "notes.txt").read_text() == "mine"


def test_a_photo_marked_duplicate_counts_no_person_in_any_shard(committed):
    from colortrend.run import build_aggregates, read

    out, cfg, store, df = committed["out"], committed["cfg"], committed["store"], committed["df"]
    copy = df.iloc[:40].assign(photo_id=lambda d: "copy-" + d["photo_id"])  # the same bytes, another name
    commit(store, "s9", copy, committed["schemas"], status=["duplicate"] * len(copy))
    build_aggregates(cfg(), store, force=True)
    assert read(str(out), "histograms").equals(build_histograms(df, cfg().histograms).to_pandas())
