"""Cohort and age-bucket colour histograms: the statistics behind "what colour do the 95后 wear most?".

Runs after the photos; the result is the ``histograms/`` table (``HISTOGRAM_SCHEMA``), one row per (group, colour
bin). It is computed from a :class:`Partial` ("Partial tables" below), never from all rows: ``build_histograms``
makes the one partial of a garments DataFrame, aggregation merges the cached partials of the committed shards
(:mod:`colortrend.aggregate.partials`), and ``histograms_from_partial`` finishes either.

Who is counted
    Each measured person whose face passed the quality filters (``quality_ok``) and who has an age. A photo stored
    under several names counts once: a person is keyed by the photo's ``content_hash`` and ``face_idx``.

Groups
    Ages are rounded to whole years (the age labels the model learnt from are whole years) and
    birth year = ``taken_year`` - age. A cohort ``(label, first, last)`` holds birth years first..last inclusive, so
    the 95后 of a 2016 photo collection are ages 17-21. An age bucket of width w holds whole-year ages j*w .. j*w+w-1.

Colour bins
    ``palette``: the nearest colour of the curated named palette by CIEDE2000 (bins read "black", "camel", ...);
    ``grid``: a cell of a regular CIELAB grid. A cell's representative colour is the median L*, a*, b* of its
    persons (robust to the odd mis-measured garment) converted to sRGB; cells that are suppressed or empty show the
    median of the whole bin instead (or the bin's nominal colour when no photographed person falls in it). The
    medians come from a sketch: each channel's values rounded to ``LAB_STEP`` (0.1 CIELAB units), so a median is
    within 0.05 units per channel of the exact one (ΔE76 under 0.09) and a representative 8-bit sRGB colour within
    1 of the exact median's (tested against the per-person medians).

Partial tables
    Everything above needs only counts: persons per (photo year, whole-year age, colour bin) give every group's cell
    counts, the bucket range, the bootstrap (multinomial draws on the counts) and the age-error correction (counts
    by year, bin and estimated age; its calibration bootstrap needs nothing per person); purity comes from the
    fit. The medians need per (group, bin, channel) the count of each sketch value. Both are integer codes with
    counts (:class:`Partial`), summed when partials merge, so a merged partial is exactly the partial of all its
    persons and its size stops growing once every (year, age, bin) and sketch value has been seen.

Shares and intervals
    share = persons in the cell / persons in the group; ``rank`` orders the published cells of a group by share.
    The interval is a percentile bootstrap over the group's persons. Resampling n persons with replacement makes the
    cell counts Multinomial(n, observed shares), which is drawn directly: the same bootstrap at a fraction of the
    cost. Each group's generator is seeded from ``seed`` and the group's name, so adding a cohort never moves
    another cohort's interval. lift = share in the group / share of the same bin among all other groups of that kind.

Suppression (privacy and reliability)
    A cell with fewer than ``min_persons`` persons, empty ones included, is suppressed: its counts, shares, interval,
    lift and rank are null and ``suppressed_reason`` says why. Group totals stay published, so when a group's
    suppressed cells hide persons in a single cell (its count would follow by subtraction) the smallest published
    cell of that group is suppressed too.

Age error: ``persons_soft``, ``share_soft`` and its interval, ``purity``
    Raw counts put each person in the group of their estimated age, so a cohort's raw share blends in its
    neighbours. The corrected columns undo that blur by a deconvolution against the age model's measured error,
    penalised towards neighbouring cohorts by ``correction_smoothing`` (:mod:`colortrend.aggregate.age_error`):
    ``age_calibration_path`` names labelled faces like the photos (the CSV of ``colortrend eval age
    --save-predictions``); without it the shipped measurement of the default age model is used. ``share_soft`` is
    the group's share of its corrected total (a group's corrected shares sum to 1), ``share_soft_low`` /
    ``share_soft_high`` its bootstrap interval over the persons *and* the calibration's labelled faces (of the
    unpenalised fit, widened to hold the estimate), ``persons_soft`` the corrected persons, ``purity`` the
    estimated share of the persons counted in the group who truly belong to it. Corrected figures are suppressed
    with the cell, and for groups whose corrected total is under ``min_persons``.

Sales blend
    An optional sales table (buyer birth year, item colour as r, g, b or a palette name, quantity) is binned the same
    way into cohorts; ``sales_share`` = quantity in the cell / quantity of the cohort, and the blended ranking
    orders ``blended_share`` = (1 - ``sales_weight``) * share + ``sales_weight`` * sales_share (published cells of
    cohorts with sales only).
"""
from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from numpy.typing import NDArray

from colortrend.aggregate.age_error import (
    AGES,
    MAX_TRUE_AGE,
    AgeCalibration,
    Correction,
    correct,
    default_age_calibration,
    load_age_calibration,
)
from colortrend.color.names import NAMED_COLORS, NAMED_LAB, nearest_index, nearest_name
from colortrend.color.space import lab_to_rgb, rgb_to_lab, to_uint8

GroupType = Literal["cohort", "age_bucket"]

DEFAULT_COHORTS: tuple[tuple[str, int, int], ...] = (
    ("70后", 1970, 1979),
    ("80后", 1980, 1984),
    ("85后", 1985, 1989),
    ("90后", 1990, 1994),
    ("95后", 1995, 1999),
    ("00后", 2000, 2009),
)
#: Colours compared with the palette at once (bounds memory to ~20 MB whatever the palette size).
CHUNK = 20_000

HISTOGRAM_SCHEMA = pa.schema(
    [
        pa.field("group_type", pa.string(), nullable=False),  # "cohort" or "age_bucket"
        pa.field("group", pa.string(), nullable=False),  # "95后", "20-24"
        pa.field("group_first", pa.int32(), nullable=False),  # cohort: first birth year; bucket: first age
        pa.field("group_last", pa.int32(), nullable=False),  # cohort: last birth year; bucket: last age
        pa.field("group_persons", pa.int64(), nullable=False),  # persons counted in the group
        pa.field("bin_id", pa.string(), nullable=False),
        pa.field("rep_r", pa.uint8(), nullable=False),
        pa.field("rep_g", pa.uint8(), nullable=False),
        pa.field("rep_b", pa.uint8(), nullable=False),
        pa.field("color_name", pa.string(), nullable=False),
        pa.field("color_name_zh", pa.string(), nullable=False),
        pa.field("persons", pa.int64()),
        pa.field("share", pa.float64()),
        pa.field("ci_low", pa.float64()),
        pa.field("ci_high", pa.float64()),
        pa.field("lift", pa.float64()),  # null where the bin is absent from all other groups
        pa.field("rank", pa.int32()),  # 1 = most worn among the group's published cells
        pa.field("suppressed", pa.bool_(), nullable=False),
        pa.field("suppressed_reason", pa.string()),
        pa.field("persons_soft", pa.float64()),  # corrected for age error (see the module docstring)
        pa.field("share_soft", pa.float64()),
        pa.field("share_soft_low", pa.float64()),
        pa.field("share_soft_high", pa.float64()),
        pa.field("rank_soft", pa.int32()),  # rank by share_soft among the group's cells with one
        pa.field("purity", pa.float64()),  # of the group: share of its persons truly in it (estimated)
        pa.field("sales_quantity", pa.float64()),  # cohorts only, when a sales table is given
        pa.field("sales_share", pa.float64()),
        pa.field("blended_share", pa.float64()),
        pa.field("blended_rank", pa.int32()),
    ]
)

_SALES_COLUMNS = ("sales_quantity", "sales_share", "blended_share", "blended_rank")

@dataclass(frozen=True)
class HistogramSettings:
    # Birth cohorts as (label, first birth year, last birth year), inclusive and non-overlapping; report order.
    cohorts: tuple[tuple[str, int, int], ...] = DEFAULT_COHORTS
    # Width of the age buckets in whole years.
    age_bucket_years: int = 5
    # Which garment colour of a person is counted: the dominant colour of all garments, or upper/lower garment only.
    colour: Literal["dominant", "upper", "lower"] = "dominant"
    # Colour bins: nearest colour of the named palette (CIEDE2000), or cells of a regular CIELAB grid.
    bins: Literal["palette", "grid"] = "palette"
    # Edge of a grid cell in CIELAB units (bins: grid).
    grid_step: float = 10.0
    # Cells with fewer persons than this are suppressed (counts hidden, marked with the reason).
    min_persons: int = 10
    # Bootstrap resamples behind each confidence interval.
    bootstrap: int = 1000
    # Confidence level of the intervals.
    ci: float = 0.95
    # Seed of the bootstrap.
    seed: int = 0
    # Predictions CSV of `colortrend eval age --save-predictions` (path,age,predicted_age) on labelled faces like the
    # photos: the measured age error behind the corrected shares; without it, the default model's shipped measurement.
    age_calibration_path: str | None = None
    # Pull of each group's corrected shares towards its neighbours' (birth-year order), in persons: the age-error
    # correction's regulariser (0: the plain maximum-likelihood fit, far noisier). The intervals do not depend on it.
    correction_smoothing: float = 5.0
    # Optional sales table (CSV or Parquet): birth_year, quantity, and r,g,b or color_name.
    sales_path: str | None = None
    # Weight of the sales share in the blended ranking (0 = photos only, 1 = sales only).
    sales_weight: float = 0.5

    def __post_init__(self) -> None:
        labels = [c[0] for c in self.cohorts]
        if not labels:
            raise ValueError("cohorts: at least one cohort is needed")
        if len(set(labels)) != len(labels) or not all(labels):
            raise ValueError("cohorts: labels must be unique and non-empty")
        for label, first, last in self.cohorts:
            if first > last:
                raise ValueError(f"cohorts: {label} ends ({last}) before it starts ({first})")
        spans = sorted((first, last, label) for label, first, last in self.cohorts)
        for (_, last, label), (first, _, next_label) in itertools.pairwise(spans):
            if first <= last:
                raise ValueError(f"cohorts: {label} and {next_label} overlap")
        if self.age_bucket_years < 1:
            raise ValueError("age_bucket_years: must be at least 1")
        if not 1.0 <= self.grid_step <= 100.0:
            raise ValueError("grid_step: must lie in 1-100 CIELAB units")
        if self.min_persons < 1:
            raise ValueError("min_persons: must be at least 1")
        if self.bootstrap < 1:
            raise ValueError("bootstrap: must be at least 1")
        if not 0.0 < self.ci < 1.0:
            raise ValueError("ci: must lie strictly between 0 and 1")
        if not 0.0 <= self.correction_smoothing <= 1e6:
            raise ValueError("correction_smoothing: must lie in 0-1000000 (persons)")
        if not 0.0 <= self.sales_weight <= 1.0:
            raise ValueError("sales_weight: must lie in 0-1")


# ---------------------------------------------------------------------------------------------------------- persons
def select_persons(garments: pd.DataFrame, settings: HistogramSettings) -> pd.DataFrame:
    """The persons the statistics count, one row each: ``age``, ``age_sd``, ``taken_year`` and CIELAB ``l, a, b``.

    Keeps faces with ``quality_ok`` (when the column is present), an age, a year and the chosen garment colour;
    drops repeated (content_hash, face_idx) keys, keeping the first photo_id.
    """
    rgb_cols = [f"{settings.colour}_{c}" for c in "rgb"]
    missing = [c for c in ("photo_id", "face_idx", "age", "taken_year", *rgb_cols) if c not in garments.columns]
    if missing:
        raise ValueError(f"garments table lacks column(s): {', '.join(missing)}")
    df = garments
    if "quality_ok" in df.columns:
        df = df[df["quality_ok"].fillna(False).astype(bool)]
    df = df.dropna(subset=["age", "taken_year", *rgb_cols])
    key = df["content_hash"].fillna(df["photo_id"]) if "content_hash" in df.columns else df["photo_id"]
    df = df.assign(_key=key).sort_values(["photo_id", "face_idx"], kind="stable")
    df = df.drop_duplicates(["_key", "face_idx"])

    lab = rgb_to_lab(df[rgb_cols].to_numpy(np.float64))
    lab_cols = [f"{settings.colour}_lab_{c}" for c in "lab"]  # dominant_lab_l/a/b (dominant_b is blue)
    if all(c in df.columns for c in lab_cols):  # k-means centres: more precise than their 8-bit rounding
        stored = df[lab_cols].to_numpy(np.float64, na_value=np.nan)
        lab = np.where(np.isnan(stored), lab, stored)
    age_sd = df["age_sd"].to_numpy(np.float64, na_value=np.nan) if "age_sd" in df.columns else np.nan
    return pd.DataFrame(
        {
            "age": df["age"].to_numpy(np.float64),
            "age_sd": age_sd,
            "taken_year": df["taken_year"].to_numpy(np.int64),
            "l": lab[:, 0],
            "a": lab[:, 1],
            "b": lab[:, 2],
        }
    )


def whole_years(age: NDArray) -> NDArray[np.int64]:
    """Ages rounded to whole years, halves up (so group edges sit at x.5 years of the continuous estimate)."""
    return np.floor(np.asarray(age, dtype=np.float64) + 0.5).astype(np.int64)


# ------------------------------------------------------------------------------------------------------ colour bins
@dataclass(frozen=True)
class _Bins:
    """The colour bins in use, in a fixed order (palette order, or grid cells by L*, a*, b*)."""

    keys: NDArray[np.int64]  # sortable integer key of each bin
    ids: list[str]
    nominal_lab: NDArray[np.float64]  # (k, 3): palette colour or grid-cell centre


_GRID_SPAN = 512  # grid indices of a* and b* (|a|, |b| < 256 / grid_step) are offset into 0..511


def _bin_keys(lab: NDArray[np.float64], settings: HistogramSettings) -> NDArray[np.int64]:
    """Integer bin key of each CIELAB colour: palette index, or the grid cell packed so keys sort by (L*, a*, b*)."""
    if len(lab) == 0:
        return np.zeros(0, dtype=np.int64)
    if settings.bins == "palette":
        return np.concatenate([nearest_index(lab[s : s + CHUNK]) for s in range(0, len(lab), CHUNK)])
    cell = np.floor(lab / settings.grid_step).astype(np.int64)
    return (cell[:, 0] * _GRID_SPAN + cell[:, 1] + _GRID_SPAN // 2) * _GRID_SPAN + cell[:, 2] + _GRID_SPAN // 2


def _make_bins(keys: NDArray[np.int64], settings: HistogramSettings) -> _Bins:
    keys = np.unique(keys)
    if settings.bins == "palette":
        nominal = NAMED_LAB[keys]
        ids = [NAMED_COLORS[k].en for k in keys]
    else:
        half = _GRID_SPAN // 2
        cell = np.stack([keys // _GRID_SPAN**2, keys // _GRID_SPAN % _GRID_SPAN - half, keys % _GRID_SPAN - half], 1)
        nominal = (cell + 0.5) * settings.grid_step
        ids = [f"lab({lightness:g},{a:g},{b:g})" for lightness, a, b in nominal]
    return _Bins(keys=keys, ids=ids, nominal_lab=nominal)


# ----------------------------------------------------------------------------------------------------------- groups
@dataclass(frozen=True)
class _Groups:
    """The published groups of one kind, in report order, and which (photo year, true age) falls in which."""

    group_type: GroupType
    labels: list[str]
    first: list[int]  # cohort: first birth year; bucket: first age
    last: list[int]

    def index(self, taken_year: NDArray[np.int64], age_years: NDArray[np.int64]) -> NDArray[np.int64]:
        """Group of each (photo year, whole-year age) pair; -1 where no published group holds it."""
        key = taken_year - age_years if self.group_type == "cohort" else age_years
        out = np.full(np.broadcast(key).shape, -1, dtype=np.int64)
        for g, (first, last) in enumerate(zip(self.first, self.last)):
            out[(key >= first) & (key <= last)] = g
        return out


def _cohort_groups(settings: HistogramSettings) -> _Groups:
    return _Groups("cohort", [c[0] for c in settings.cohorts], [c[1] for c in settings.cohorts],
                   [c[2] for c in settings.cohorts])


def _bucket_groups(age_years: NDArray[np.int64], settings: HistogramSettings) -> _Groups:
    """Buckets from the youngest to the oldest bucket any person is estimated in."""
    w = settings.age_bucket_years
    ages = np.clip(age_years, 0, None)
    youngest, oldest = (int(ages.min()), int(ages.max())) if len(ages) else (0, 0)
    first = list(range(youngest // w * w, oldest // w * w + 1, w))
    return _Groups("age_bucket", [f"{f}-{f + w - 1}" for f in first], first, [f + w - 1 for f in first])


# ----------------------------------------------------------------------------------------------------------- sales
def load_sales(path: str | Path) -> pd.DataFrame:
    """Read a sales table (``.csv`` or ``.parquet``) and check its columns (birth_year, quantity, and r,g,b or
    color_name)."""
    path = Path(path)
    sales = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") or path.is_dir() else pd.read_csv(path)
    _check_sales(sales, str(path))
    return sales


def _check_sales(sales: pd.DataFrame, where: str) -> None:
    missing = [c for c in ("birth_year", "quantity") if c not in sales.columns]
    has_rgb = all(c in sales.columns for c in "rgb")
    if not has_rgb and "color_name" not in sales.columns:
        missing.append("r,g,b or color_name")
    if missing:
        raise ValueError(f"{where}: sales table lacks column(s): {', '.join(missing)}")
    quantity = pd.to_numeric(sales["quantity"], errors="coerce")
    if not (np.isfinite(quantity) & (quantity >= 0)).all():
        raise ValueError(f"{where}: sales quantity must be a number, 0 or more, in every row")


def _sales_lab(sales: pd.DataFrame) -> NDArray[np.float64]:
    """CIELAB of each sales row: its r, g, b where all three are given, else its palette name (English or Chinese)."""
    lab = np.full((len(sales), 3), np.nan)
    if all(c in sales.columns for c in "rgb"):
        rgb = sales[list("rgb")].to_numpy(np.float64, na_value=np.nan)
        given = np.isfinite(rgb).all(axis=1)
        lab[given] = rgb_to_lab(rgb[given])
    todo = np.isnan(lab[:, 0])
    if todo.any():
        lookup = {e.en.casefold(): i for i, e in enumerate(NAMED_COLORS)}
        lookup |= {e.zh: i for i, e in enumerate(NAMED_COLORS)}
        names = sales.loc[todo, "color_name"] if "color_name" in sales.columns else pd.Series([None] * todo.sum())
        idx = [lookup.get(str(n).strip().casefold(), -1) if pd.notna(n) else -1 for n in names]
        unknown = sorted({str(n) for n, i in zip(names, idx) if i < 0})
        if unknown:
            raise ValueError(f"sales: colour(s) neither r,g,b nor a palette name: {', '.join(unknown[:5])}")
        lab[todo] = NAMED_LAB[idx]
    return lab


def _sales_cells(sales: pd.DataFrame, settings: HistogramSettings) -> tuple[NDArray, NDArray, NDArray]:
    """(cohort index, bin key, quantity) of each sales row inside a cohort."""
    _check_sales(sales, "sales")
    birth = sales["birth_year"].to_numpy(np.float64)
    cohort = np.full(len(sales), -1)
    for c, (_, first, last) in enumerate(settings.cohorts):
        cohort[(birth >= first) & (birth <= last)] = c
    keep = cohort >= 0
    lab = _sales_lab(sales)[keep]
    return cohort[keep], _bin_keys(lab, settings), sales["quantity"].to_numpy(np.float64)[keep]


# --------------------------------------------------------------------------------------------------- partial tables
@dataclass(frozen=True)
class _Layout:
    """Several small integer fields packed into one int64 code, first field in the highest bits, so codes sort
    as the tuples of their fields do. Each field is offset by ``offset`` (so negatives pack) and clipped to its bits."""

    names: tuple[str, ...]
    bits: tuple[int, ...]
    offsets: tuple[int, ...]

    def pack(self, **fields: NDArray) -> NDArray[np.int64]:
        code = np.zeros(np.broadcast(*fields.values()).shape, dtype=np.int64)
        for name, bits, offset in zip(self.names, self.bits, self.offsets):
            value = np.clip(np.asarray(fields[name], dtype=np.int64) + offset, 0, (1 << bits) - 1)
            code = (code << bits) | value
        return code

    def unpack(self, code: NDArray[np.int64]) -> dict[str, NDArray[np.int64]]:
        out = {}
        for name, bits, offset in reversed(list(zip(self.names, self.bits, self.offsets))):
            out[name] = (code & ((1 << bits) - 1)) - offset
            code = code >> bits
        return out


#: Persons by (photo year, whole-year age, colour bin key). Ages beyond +-2,000 years are clipped (no such person).
CELL_LAYOUT = _Layout(("taken_year", "age", "bin_key"), (16, 12, 28), (1 << 15, 1 << 11, 0))
#: Persons by (group type, group, colour bin key, CIELAB channel, channel value in LAB_STEP units): the sketch
#: behind the representative colours. Groups: the cohort index, or the age bucket's first age // bucket width.
COLOUR_LAYOUT = _Layout(("group_type", "group", "bin_key", "channel", "value"), (1, 16, 28, 2, 14),
                        (0, 1 << 15, 0, 0, 1 << 13))
#: Resolution of the colour sketch in CIELAB units: every median it gives is within LAB_STEP / 2 of the exact one.
LAB_STEP = 0.1
_COHORT, _BUCKET = 0, 1
#: Rows a merge gathers before it folds them into its running total (bounds its memory whatever the persons).
MERGE_ROWS = 1 << 20


@dataclass(frozen=True)
class Partial:
    """What the statistics need of some persons, small in their number and mergeable (see "Partial tables").

    ``cell_codes``/``cell_persons``: persons per ``CELL_LAYOUT`` code; ``colour_codes``/``colour_persons``: persons
    per ``COLOUR_LAYOUT`` code. Codes are unique and sorted.
    """

    cell_codes: NDArray[np.int64]
    cell_persons: NDArray[np.int64]
    colour_codes: NDArray[np.int64]
    colour_persons: NDArray[np.int64]

    @classmethod
    def empty(cls) -> Partial:
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, none, none)

    @classmethod
    def of_garments(cls, garments: pd.DataFrame, settings: HistogramSettings) -> Partial:
        """The partial of a garments table's persons (``select_persons``: one per (content_hash, face_idx))."""
        persons = select_persons(garments, settings)
        lab = persons[["l", "a", "b"]].to_numpy(np.float64)
        keys = _bin_keys(lab, settings)
        taken = persons["taken_year"].to_numpy(np.int64)
        age_years = whole_years(persons["age"].to_numpy(np.float64))
        cells = CELL_LAYOUT.pack(taken_year=taken, age=age_years, bin_key=keys)
        cohort = _cohort_groups(settings).index(taken, age_years)
        bucket = np.floor_divide(age_years, settings.age_bucket_years)  # negative ages: a bucket no group shows
        value = np.rint(lab / LAB_STEP).astype(np.int64)
        colours = [
            COLOUR_LAYOUT.pack(group_type=np.full(int(rows.sum()), kind), group=group[rows], bin_key=keys[rows],
                               channel=np.full(int(rows.sum()), channel), value=value[rows, channel])
            for kind, group, rows in ((_COHORT, cohort, cohort >= 0), (_BUCKET, bucket, np.ones(len(lab), bool)))
            for channel in range(3)
        ]
        return cls(*_summed([cells], [np.ones(len(cells), np.int64)]),
                   *_summed(colours, [np.ones(len(c), np.int64) for c in colours]))

    @staticmethod
    def merge(parts: Iterable[Partial]) -> Partial:
        """The partial of all persons of ``parts`` (each person in one part), read one part at a time."""
        cells, colours = _Folder(), _Folder()
        for part in parts:
            cells.add(part.cell_codes, part.cell_persons)
            colours.add(part.colour_codes, part.colour_persons)
        return Partial(*cells.total(), *colours.total())

    @property
    def persons(self) -> int:
        return int(self.cell_persons.sum())


def _summed(codes: list[NDArray], persons: list[NDArray]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Unique sorted codes and the persons summed per code."""
    if not codes:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    unique, where = np.unique(np.concatenate(codes), return_inverse=True)
    summed = np.bincount(where, weights=np.concatenate(persons), minlength=len(unique))  # exact below 2**53
    return unique, summed.astype(np.int64)


class _Folder:
    """Sums (code, persons) arrays arriving one part at a time, folding every ``MERGE_ROWS`` rows."""

    def __init__(self) -> None:
        self.codes, self.persons, self.rows = [], [], 0

    def add(self, codes: NDArray, persons: NDArray) -> None:
        self.codes.append(codes)
        self.persons.append(persons)
        self.rows += len(codes)
        if self.rows >= MERGE_ROWS:
            self._fold()

    def _fold(self) -> None:
        codes, persons = _summed(self.codes, self.persons)
        self.codes, self.persons, self.rows = [codes], [persons], 0

    def total(self) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        self._fold()
        return self.codes[0], self.persons[0]


def _sketch_medians(codes: NDArray[np.int64], persons: NDArray[np.int64]) -> tuple[dict, NDArray[np.float64]]:
    """Median channel value of each (group type, group, bin key, channel) of a colour sketch (sorted codes), as
    pandas takes it: the middle value, or the mean of the two middle values of an even count."""
    fields = COLOUR_LAYOUT.unpack(codes)
    segment = codes >> COLOUR_LAYOUT.bits[-1]  # every field but the value
    starts = np.flatnonzero(np.r_[True, segment[1:] != segment[:-1]]) if len(codes) else np.zeros(0, np.int64)
    cumulative = np.cumsum(persons)
    before = np.r_[0, cumulative][starts]
    n = np.add.reduceat(persons, starts) if len(starts) else np.zeros(0, np.int64)
    # The person at 0-based position i lies in the first row whose cumulative count exceeds i.
    low = np.searchsorted(cumulative, before + (n - 1) // 2, side="right")
    high = np.searchsorted(cumulative, before + n // 2, side="right")
    median = (fields["value"][low] + fields["value"][high]) * (LAB_STEP / 2)
    return {k: v[starts] for k, v in fields.items() if k != "value"}, median


# ------------------------------------------------------------------------------------------------------- the table
def build_histograms(
    garments: pd.DataFrame,
    settings: HistogramSettings,
    *,
    sales: pd.DataFrame | None = None,
    age_calibration: AgeCalibration | None = None,
    group_types: tuple[GroupType, ...] = ("cohort", "age_bucket"),
) -> pa.Table:
    """The ``histograms/`` table of a garments table: its one partial, finished by ``histograms_from_partial``."""
    return histograms_from_partial(Partial.of_garments(garments, settings), settings, sales=sales,
                                   age_calibration=age_calibration, group_types=group_types)


def histograms_from_partial(
    partial: Partial,
    settings: HistogramSettings,
    *,
    sales: pd.DataFrame | None = None,
    age_calibration: AgeCalibration | None = None,
    group_types: tuple[GroupType, ...] = ("cohort", "age_bucket"),
) -> pa.Table:
    """The ``histograms/`` table: every published group x every colour bin that holds a person (or a sale).

    ``partial`` must have been built with the same settings (colour, bins, cohorts, bucket width).
    ``sales`` and ``age_calibration`` default to the files named by ``settings.sales_path`` and
    ``settings.age_calibration_path`` (when unset: no sales, and the shipped age calibration). Rows are ordered
    by group type (cohorts, then age buckets),
    group, then rank (suppressed cells last, in bin order). Identical inputs and settings give an identical table.
    ``group_types`` limits the table to some kinds of group (the other kinds are not computed).
    """
    if sales is None and settings.sales_path:
        sales = load_sales(settings.sales_path)
    if age_calibration is None:
        age_calibration = (load_age_calibration(settings.age_calibration_path) if settings.age_calibration_path
                           else default_age_calibration())
    cells = CELL_LAYOUT.unpack(partial.cell_codes)
    taken, age_years, persons = cells["taken_year"], cells["age"], partial.cell_persons
    sales_cells = _sales_cells(sales, settings) if sales is not None else None
    bins = _make_bins(np.concatenate([cells["bin_key"], sales_cells[1] if sales_cells else []]).astype(np.int64),
                      settings)
    k = np.searchsorted(bins.keys, cells["bin_key"])
    medians = _sketch_medians(partial.colour_codes, partial.colour_persons)
    bin_lab = _bin_median_lab(partial, bins)
    names = _bin_names(bins, bin_lab, settings)

    # Persons by photo year, colour bin and estimated whole-year age: all the age-error correction reads.
    estimated = np.clip(age_years, 0, MAX_TRUE_AGE)
    by_year = {int(t): np.zeros((len(bins.keys), len(AGES))) for t in np.unique(taken)}
    for t, counts in by_year.items():
        in_year = taken == t
        np.add.at(counts, (k[in_year], estimated[in_year]), persons[in_year])
    frames = []
    kinds = {"cohort": lambda: _cohort_groups(settings), "age_bucket": lambda: _bucket_groups(age_years, settings)}
    for groups in (kinds[kind]() for kind in group_types):
        correction = _correction(groups, by_year, age_calibration, settings)
        counts = _group_counts(groups, taken, age_years, k, persons, len(bins.keys))
        cell_lab = _cell_median_lab(medians, groups, bins, settings)
        frame = _group_frame(groups, counts, cell_lab, correction, bins, bin_lab, names, settings)
        if groups.group_type == "cohort":
            frame = _blend(frame, sales_cells, bins, settings)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    return pa.Table.from_pandas(table[HISTOGRAM_SCHEMA.names], schema=HISTOGRAM_SCHEMA, preserve_index=False)


def _bin_names(bins: _Bins, bin_lab: NDArray, settings: HistogramSettings) -> list[tuple[str, str]]:
    """(English, Chinese) name of each bin: its palette entry, or the nearest name of a grid bin's median colour."""
    if settings.bins == "palette":
        return [(NAMED_COLORS[key].en, NAMED_COLORS[key].zh) for key in bins.keys]
    return [nearest_name(x, space="lab")[:2] for x in bin_lab]


def _bin_median_lab(partial: Partial, bins: _Bins) -> NDArray[np.float64]:
    """Median CIELAB of each bin's persons (the bin's nominal colour where it has none). Every person lies in
    exactly one age bucket, so the bucket sketch summed over buckets holds every person."""
    out = bins.nominal_lab.astype(np.float64).copy()
    fields = COLOUR_LAYOUT.unpack(partial.colour_codes)
    rows = fields["group_type"] == _BUCKET
    codes, persons = _summed([COLOUR_LAYOUT.pack(group_type=0, group=0, bin_key=fields["bin_key"][rows],
                                                 channel=fields["channel"][rows], value=fields["value"][rows])],
                             [partial.colour_persons[rows]])
    at, median = _sketch_medians(codes, persons)
    out[np.searchsorted(bins.keys, at["bin_key"]), at["channel"]] = median
    return out


def _correction(groups: _Groups, by_year: dict[int, NDArray], calibration: AgeCalibration,
                settings: HistogramSettings) -> Correction | None:
    """The age-error-corrected cells of one kind of group (None without persons or groups)."""
    if not by_year or not groups.labels:
        return None
    group_of = {t: groups.index(np.full_like(AGES, t), AGES) for t in by_year}
    return correct(by_year, group_of, len(groups.labels), calibration,
                   bootstrap=settings.bootstrap, ci=settings.ci, seed=settings.seed,
                   smoothing=settings.correction_smoothing)


def _group_counts(groups: _Groups, taken: NDArray, age_years: NDArray, k: NDArray, persons: NDArray,
                  n_bins: int) -> NDArray[np.int64]:
    """(groups, bins) persons of each published group of one kind."""
    hard = groups.index(taken, age_years)
    inside = hard >= 0
    counts = np.zeros((len(groups.labels), n_bins), dtype=np.int64)
    np.add.at(counts, (hard[inside], k[inside]), persons[inside])
    return counts


def _group_frame(groups: _Groups, counts: NDArray[np.int64], cell_lab: NDArray, correction: Correction | None,
                 bins: _Bins, bin_lab: NDArray, names: list[tuple[str, str]],
                 settings: HistogramSettings) -> pd.DataFrame:
    """All cells of one group type: counts, shares, intervals, lift, corrected shares, suppression, ranks."""
    n_groups, n_bins = counts.shape
    nan = np.full((n_groups, n_bins), np.nan)
    if correction is None:
        soft, share_soft, soft_low, soft_high, purity = nan, nan, nan, nan, np.full(n_groups, np.nan)
    else:
        soft, share_soft, soft_low, soft_high, purity = (correction.persons, correction.share, correction.low,
                                                         correction.high, correction.purity)
    # A group whose corrected total is too small has no trustworthy corrected share.
    too_few = np.nansum(soft, axis=1) < settings.min_persons

    totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / totals[:, None]
        others = (counts.sum(axis=0)[None, :] - counts) / (totals.sum() - totals)[:, None]
        lift = np.where(others > 0, share / others, np.nan)
    ci_low, ci_high = _bootstrap(counts, groups, settings)
    reason = _suppression(counts, settings.min_persons)

    rows = []
    for g in range(n_groups):
        for j in range(n_bins):
            hidden = reason[g][j] is not None
            no_soft = hidden or too_few[g] or np.isnan(share_soft[g, j])
            rgb = to_uint8(lab_to_rgb(bin_lab[j] if hidden else cell_lab[g, j]))
            rows.append({
                "group_type": groups.group_type, "group": groups.labels[g], "group_first": groups.first[g],
                "group_last": groups.last[g], "group_persons": totals[g], "bin_id": bins.ids[j],
                "rep_r": rgb[0], "rep_g": rgb[1], "rep_b": rgb[2],
                "color_name": names[j][0], "color_name_zh": names[j][1],
                "persons": None if hidden else counts[g, j],
                "share": None if hidden else share[g, j],
                "ci_low": None if hidden else ci_low[g, j],
                "ci_high": None if hidden else ci_high[g, j],
                "lift": None if hidden or np.isnan(lift[g, j]) else lift[g, j],
                "suppressed": hidden, "suppressed_reason": reason[g][j],
                "persons_soft": None if no_soft else soft[g, j],
                "share_soft": None if no_soft else share_soft[g, j],
                "share_soft_low": None if no_soft else soft_low[g, j],
                "share_soft_high": None if no_soft else soft_high[g, j],
                "purity": None if np.isnan(purity[g]) else purity[g],
                "_group_order": g, "_bin_order": j,
            })
    frame = pd.DataFrame(rows, columns=[*_CELL_COLUMNS, "_group_order", "_bin_order"])
    frame["rank"] = _rank(frame, "share")
    frame["rank_soft"] = _rank(frame, "share_soft")
    for col in _SALES_COLUMNS:
        frame[col] = None
    return _ordered(frame, "rank")


_CELL_COLUMNS = [c for c in HISTOGRAM_SCHEMA.names if c not in ("rank", "rank_soft", *_SALES_COLUMNS)]


def _cell_median_lab(medians: tuple[dict, NDArray], groups: _Groups, bins: _Bins,
                     settings: HistogramSettings) -> NDArray[np.float64]:
    """(groups, bins, 3) median CIELAB of each cell's persons, NaN where it has none."""
    out = np.full((len(groups.labels), len(bins.keys), 3), np.nan)
    at, median = medians
    if groups.group_type == "cohort":
        rows, index = at["group_type"] == _COHORT, at["group"]
    else:  # the sketch keys buckets by first age // width; the groups run from the youngest bucket on
        w = settings.age_bucket_years
        rows = at["group_type"] == _BUCKET
        index = at["group"] - (groups.first[0] // w if groups.first else 0)
    rows &= (index >= 0) & (index < len(groups.labels))
    out[index[rows], np.searchsorted(bins.keys, at["bin_key"][rows]), at["channel"][rows]] = median[rows]
    return out


def _bootstrap(counts: NDArray[np.int64], groups: _Groups, settings: HistogramSettings) -> tuple[NDArray, NDArray]:
    """Percentile bootstrap interval of every share (multinomial draws = resampling the group's persons)."""
    low = np.full(counts.shape, np.nan)
    high = np.full(counts.shape, np.nan)
    alpha = (1.0 - settings.ci) / 2
    for g, row in enumerate(counts):
        n = int(row.sum())
        if n == 0:
            continue
        seed = zlib.crc32(f"{groups.group_type}:{groups.labels[g]}".encode())
        rng = np.random.default_rng([settings.seed, seed])
        draws = rng.multinomial(n, row / n, size=settings.bootstrap) / n
        low[g], high[g] = np.quantile(draws, [alpha, 1.0 - alpha], axis=0)
    return low, high


def _suppression(counts: NDArray[np.int64], min_persons: int) -> list[list[str | None]]:
    """Per cell, why it is suppressed (None when published); see "Suppression" in the module docstring."""
    small = f"fewer than {min_persons} persons"
    reasons: list[list[str | None]] = []
    for row in counts:
        hidden = row < min_persons
        cell = [small if h else None for h in hidden]
        if hidden.sum() == 1 and row[hidden].sum() > 0 and (~hidden).any():
            shown = np.flatnonzero(~hidden)
            cell[shown[np.argmin(row[shown])]] = "protects a smaller suppressed cell"
        reasons.append(cell)
    return reasons


def _rank(frame: pd.DataFrame, column: str) -> pd.Series:
    """1-based rank by ``column`` (descending, ties in bin order) within each group, null where the value is."""
    valid = frame[frame[column].notna()].sort_values(["_group_order", column, "_bin_order"],
                                                     ascending=[True, False, True], kind="stable")
    ranks = valid.groupby("_group_order").cumcount() + 1
    return ranks.reindex(frame.index).astype("Int32")


def _ordered(frame: pd.DataFrame, rank: str) -> pd.DataFrame:
    key = frame[rank].astype("Float64").fillna(np.inf)
    return (frame.assign(_key=key).sort_values(["_group_order", "_key", "_bin_order"], kind="stable")
            .drop(columns="_key").reset_index(drop=True))


def _blend(frame: pd.DataFrame, sales_cells: tuple[NDArray, NDArray, NDArray] | None, bins: _Bins,
           settings: HistogramSettings) -> pd.DataFrame:
    """Add the sales columns and the blended ranking to the cohort rows."""
    if sales_cells is None:
        return frame
    cohort, keys, quantity = sales_cells
    table = np.zeros((len(settings.cohorts), len(bins.keys)))
    np.add.at(table, (cohort, np.searchsorted(bins.keys, keys)), quantity)
    totals = table.sum(axis=1)
    g, j = frame["_group_order"].to_numpy(), frame["_bin_order"].to_numpy()
    has_sales = totals[g] > 0
    frame["sales_quantity"] = np.where(has_sales, table[g, j], np.nan)
    frame["sales_share"] = np.where(has_sales, table[g, j] / np.where(has_sales, totals[g], 1), np.nan)
    w = settings.sales_weight
    frame["blended_share"] = (1 - w) * frame["share"].astype("Float64") + w * frame["sales_share"]
    frame["blended_share"] = frame["blended_share"].where(has_sales)
    frame["blended_rank"] = _rank(frame, "blended_share")
    return frame
