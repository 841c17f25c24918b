"""Per-shard partial tables: all that the histograms and the report need of a committed shard, small in its persons.

Aggregation never loads all rows. Each committed shard is read once into a :class:`ShardPartial` (its
:class:`~colortrend.aggregate.histograms.Partial`, persons by photo year x whole-year age x colour bin plus the colour
sketch behind the medians, and its :class:`SampleCounts`, the report's sample figures), which is cached under the
output as ``_partials/<shard>.<settings key>.parquet``. The settings key is a digest of the settings that shape a
partial (``colour``, ``bins``, ``grid_step``, ``cohorts``, ``age_bucket_years`` and the format version), so changing
them builds new partials and changing anything else (``min_persons``, ``bootstrap``, the calibration, sales) reuses
them. A partial records the digest of the shard's marker it was built from: a shard re-committed in place (same id,
new rows) is rebuilt. The partials are then merged one at a time (memory bounded by the merged partial, which stops
growing once every (year, age, bin) and sketch value is seen) and finished into the same statistics.

Persons across shards
    Within a shard a person is one (content_hash, face_idx) (``select_persons``). Across shards each content hash
    is analysed once: intake marks every later copy of bytes already committed, or planned earlier in the same run,
    as ``duplicate`` and analyses nothing of it, so only the first copy has garment rows. A partial also leaves out
    garment rows of photos its shard marks ``duplicate``, so the rule holds on the partial's side too.

Housekeeping
    Partials of shards that are no longer committed are deleted (``Store.recover`` and each aggregation); files in
    ``_partials/`` that are not named like a partial are never touched. Partials of other settings of committed
    shards stay, so switching back is cheap.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from colortrend.aggregate.histograms import LAB_STEP, HistogramSettings, Partial
from colortrend.io.store import PARTIALS, Store

#: Bumped whenever what a partial holds or how it is laid out changes: older partials are then rebuilt.
PARTIAL_VERSION = 1
_KINDS = {"cells": 0, "colours": 1}
_PARTIAL_SCHEMA = pa.schema([pa.field("kind", pa.int8()), pa.field("code", pa.int64()),
                             pa.field("persons", pa.int64())])


@dataclass
class SampleCounts:
    """The report's sample figures of some shards: photos by status and year, faces, faces passing the quality
    filters (None when unknown), measured persons (garment rows)."""

    photos: int = 0
    by_status: Counter = field(default_factory=Counter)
    years: Counter = field(default_factory=Counter)  # photos by taken_year
    faces: int = 0
    faces_ok: int | None = 0
    measured: int = 0

    @classmethod
    def of_tables(cls, photos: pd.DataFrame, garments: pd.DataFrame, faces: pd.DataFrame | None) -> SampleCounts:
        """The counts of a run's tables; without ``faces``, faces come from the photos' ``n_faces``."""
        years = pd.to_numeric(photos["taken_year"], errors="coerce").dropna() if "taken_year" in photos else []
        status = photos["status"].fillna("unknown") if "status" in photos else pd.Series(dtype=object)
        if faces is not None:
            n_faces = len(faces)
        elif "n_faces" in photos:
            n_faces = int(pd.to_numeric(photos["n_faces"], errors="coerce").fillna(0).sum())
        else:
            n_faces = 0
        quality = faces["quality_ok"] if faces is not None and "quality_ok" in faces else None
        return cls(photos=len(photos), by_status=Counter(status.tolist()), years=Counter(int(y) for y in years),
                   faces=n_faces, faces_ok=int(quality.fillna(False).astype(bool).sum()) if quality is not None
                   else None, measured=len(garments))

    def __add__(self, other: SampleCounts) -> SampleCounts:
        known = [n for n in (self.faces_ok, other.faces_ok) if n is not None]
        return SampleCounts(self.photos + other.photos, self.by_status + other.by_status, self.years + other.years,
                            self.faces + other.faces, sum(known) if known else None,
                            self.measured + other.measured)

    def to_json(self) -> dict:
        return {"photos": self.photos, "by_status": dict(self.by_status),
                "years": {str(y): n for y, n in self.years.items()}, "faces": self.faces,
                "faces_ok": self.faces_ok, "measured": self.measured}

    @classmethod
    def from_json(cls, obj: dict) -> SampleCounts:
        return cls(obj["photos"], Counter(obj["by_status"]), Counter({int(y): n for y, n in obj["years"].items()}),
                   obj["faces"], obj["faces_ok"], obj["measured"])


@dataclass
class ShardPartial:
    histogram: Partial
    samples: SampleCounts

    @classmethod
    def of_tables(cls, garments: pd.DataFrame, photos: pd.DataFrame, faces: pd.DataFrame | None,
                  settings: HistogramSettings) -> ShardPartial:
        """The partial of one shard's tables (garment rows of ``duplicate`` photos left out, see the docstring)."""
        counted = garments
        if "status" in photos and len(garments):
            copies = set(photos.loc[photos["status"] == "duplicate", "photo_id"])
            counted = garments[~garments["photo_id"].isin(copies)] if copies else garments
        return cls(Partial.of_garments(counted, settings), SampleCounts.of_tables(photos, garments, faces))


def settings_key(settings: HistogramSettings) -> str:
    """Digest of what shapes a partial: the settings that bin persons and group them, and the format."""
    shaping = [PARTIAL_VERSION, LAB_STEP, settings.colour, settings.bins, settings.grid_step,
               [list(c) for c in settings.cohorts], settings.age_bucket_years]
    return hashlib.sha256(json.dumps(shaping, ensure_ascii=False).encode()).hexdigest()[:16]


def marker_digest(marker: dict) -> str:
    return hashlib.sha256(json.dumps(marker, sort_keys=True, default=str).encode()).hexdigest()[:16]


def committed_shards(store: Store) -> Iterator[tuple[str, dict]]:
    """(shard id, marker) of every committed shard in id order (markers are small: no photo lists), each checked
    by the store (a malformed record is an ``OutputError`` naming it)."""
    yield from sorted(store.markers().items())


def merged_partial(store: Store, settings: HistogramSettings) -> ShardPartial:
    """The merged partial of every committed shard, building (and caching) those missing or out of date, then
    deleting the partials of shards no longer committed."""
    key = settings_key(settings)
    samples = SampleCounts()
    shards: set[str] = set()

    def partials() -> Iterator[Partial]:
        nonlocal samples
        for shard_id, marker in committed_shards(store):
            shards.add(shard_id)
            part = shard_partial(store, shard_id, marker, settings, key)
            samples += part.samples
            yield part.histogram

    histogram = Partial.merge(partials())
    store.remove_partials(shards)
    return ShardPartial(histogram, samples)


def shard_partial(store: Store, shard_id: str, marker: dict, settings: HistogramSettings,
                  key: str | None = None, cache: bool = True) -> ShardPartial:
    """The shard's cached partial when it matches the shard's commit and settings, else built from its files (and
    cached, unless ``cache`` is false: ``colortrend combine`` never writes into the outputs it reads)."""
    rel = f"{PARTIALS}/{shard_id}.{key or settings_key(settings)}.parquet"
    commit = marker_digest(marker)
    cached = _read_partial(store, rel, commit)
    if cached is not None:
        return cached
    garments_columns = ["photo_id", "face_idx", "content_hash", "age", "age_sd", "taken_year", "quality_ok",
                        *(f"{settings.colour}_{c}" for c in ("r", "g", "b", "lab_l", "lab_a", "lab_b"))]
    tables = {name: _read_columns(store, shard_id, marker, name, columns) for name, columns in
              (("garments", garments_columns), ("photos", ["photo_id", "status", "taken_year"]),
               ("faces", ["quality_ok"]))}
    part = ShardPartial.of_tables(tables["garments"], tables["photos"], tables["faces"], settings)
    if cache:
        _write_partial(store, rel, part, commit)
    return part


def _read_columns(store: Store, shard_id: str, marker: dict, table: str, columns: list[str]) -> pd.DataFrame:
    """The columns of a committed file that it has (older shards may lack some); empty when there is no file. A
    damaged file is the store's ``OutputError`` naming it."""
    rows = store.read_shard(shard_id, marker, table, columns, present_only=True)
    return pd.DataFrame(columns=columns) if rows is None else rows.to_pandas()


def _write_partial(store: Store, rel: str, part: ShardPartial, commit: str) -> None:
    h = part.histogram
    table = pa.table({
        "kind": np.r_[np.full(len(h.cell_codes), _KINDS["cells"]), np.full(len(h.colour_codes), _KINDS["colours"])]
        .astype(np.int8),
        "code": np.r_[h.cell_codes, h.colour_codes], "persons": np.r_[h.cell_persons, h.colour_persons],
    }, schema=_PARTIAL_SCHEMA)
    meta = {"version": PARTIAL_VERSION, "commit": commit, "samples": part.samples.to_json()}
    table = table.replace_schema_metadata({"colortrend": json.dumps(meta)})
    store.write_parquet(rel, table)  # atomic: a partial is whole or absent


def _read_partial(store: Store, rel: str, commit: str) -> ShardPartial | None:
    """The cached partial at ``rel``; None when absent, unreadable, of another format, or of another commit."""
    import pyarrow.parquet as pq

    try:
        data = store.fs.cat_file(store.path(rel))
        table = pq.read_table(io.BytesIO(data))
        meta = json.loads((table.schema.metadata or {}).get(b"colortrend", b"{}"))
    except (OSError, ValueError, pa.ArrowException):
        return None
    if meta.get("version") != PARTIAL_VERSION or meta.get("commit") != commit:
        return None
    kind, code, persons = (table[c].to_numpy() for c in ("kind", "code", "persons"))
    cells, colours = kind == _KINDS["cells"], kind == _KINDS["colours"]
    histogram = Partial(code[cells], persons[cells], code[colours], persons[colours])
    return ShardPartial(histogram, SampleCounts.from_json(meta["samples"]))

