"""Turn an analysed batch (photo rows with per-face arrays) into the three shard tables of the output contract.

Each table's schema is the union of the fields its stages declare, in stage order, so a new stage column appears
in the output without touching this file. Coordinates are reported in the original photo's pixels.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Sequence

import numpy as np
import pyarrow as pa

from colortrend.stages.base import Batch, Stage

#: Face-level columns in analysed-image pixels, scaled back to original pixels on output.
PIXEL_COLUMNS = ("box_x1", "box_y1", "box_x2", "box_y2", "landmarks", "face_px",
                 "person_x1", "person_y1", "person_x2", "person_y2")

#: Columns every garment row carries besides those the stages declare, so analysts need no joins.
GARMENT_CONTEXT = pa.schema(
    [
        pa.field("photo_id", pa.string(), nullable=False),
        pa.field("face_idx", pa.int32(), nullable=False),
        pa.field("content_hash", pa.string()),
        pa.field("taken_year", pa.int32()),
        pa.field("age", pa.float32()),
        pa.field("age_sd", pa.float32()),
        pa.field("birth_year", pa.float32()),
        pa.field("quality_ok", pa.bool_()),
        pa.field("wb_gain_r", pa.float32()),
        pa.field("wb_gain_g", pa.float32()),
        pa.field("wb_gain_b", pa.float32()),
    ]
)
PHOTO_EXTRA = pa.schema([
    pa.field("n_faces", pa.int32()),
    pa.field("n_persons", pa.int32()),
    # The input file as listed when the photo was planned (filled in by the run): a later listing that differs
    # means the file changed (replaced, or whole after a partial copy) and the photo is analysed again.
    pa.field("input_bytes", pa.int64()),
    pa.field("input_mtime_ns", pa.int64()),
    pa.field("input_etag", pa.string()),
])
FACE_KEYS = pa.schema([
    pa.field("photo_id", pa.string(), nullable=False),
    pa.field("face_idx", pa.int32(), nullable=False),
])


def merge_schemas(parts: Sequence[pa.Schema]) -> pa.Schema:
    fields: dict[str, pa.Field] = {}
    for schema in parts:
        for f in schema:
            fields.setdefault(f.name, f)
    return pa.schema(list(fields.values()))


def table_schemas(stages: Sequence[Stage]) -> dict[str, pa.Schema]:
    return {
        "photos": merge_schemas([*(s.photo_fields for s in stages), PHOTO_EXTRA]),
        "faces": merge_schemas([FACE_KEYS, *(s.face_fields for s in stages)]),
        "garments": merge_schemas([GARMENT_CONTEXT, *(s.garment_fields for s in stages)]),
    }


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a file name that is not (Python keeps its bytes as surrogates) shows them as
    ``\\xff`` escapes, since Arrow strings must be UTF-8. The photo id still hashes the real name."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def build_tables(batch: Batch, schemas: dict[str, pa.Schema], path_key: bytes | None = None) -> dict[str, pa.Table]:
    """Photos, faces and garments rows of one analysed batch. ``path_key`` set: paths are stored as keyed hashes."""
    n_photos = len(batch["photo_id"])
    n_faces = [int(batch.get("n_faces", [0] * n_photos)[i] or 0) for i in range(n_photos)]
    parses = batch.get("person_parse", [None] * n_photos)
    measured = [[j for j in range(n_faces[i]) if parses[i] is not None and parses[i][j] is not None]
                for i in range(n_photos)]

    photos = {name: list(batch.get(name, [None] * n_photos)) for name in schemas["photos"].names}
    photos["n_faces"] = n_faces
    photos["n_persons"] = [len(m) for m in measured]
    photos["status"] = [
        "no_face" if s == "ok" and n == 0 else s for s, n in zip(batch["status"], n_faces)
    ]
    if path_key is not None:
        photos["path"] = [hmac.new(path_key, p.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:32]
                          for p in photos["path"]]
    else:
        photos["path"] = [printable(p) for p in photos["path"]]
    photos["error"] = [None if e is None else printable(e) for e in photos["error"]]

    faces = _face_rows(batch, schemas["faces"], [list(range(n)) for n in n_faces])
    garments = _face_rows(batch, schemas["garments"], measured)
    return {
        "photos": pa.Table.from_pydict(photos, schema=schemas["photos"]),
        "faces": pa.Table.from_pydict(faces, schema=schemas["faces"]),
        "garments": pa.Table.from_pydict(garments, schema=schemas["garments"]),
    }


def _face_rows(batch: Batch, schema: pa.Schema, picks: list[list[int]]) -> dict[str, list]:
    """One row per picked face: photo-level columns repeat, face-level columns take element j."""
    cols: dict[str, list] = {name: [] for name in schema.names}
    for i, js in enumerate(picks):
        if not js:
            continue
        scale = batch["analysis_scale"][i] or 1.0
        age = batch.get("age", [None] * len(picks))[i]
        for name in schema.names:
            if name == "photo_id":
                cols[name].extend([batch["photo_id"][i]] * len(js))
            elif name == "face_idx":
                cols[name].extend(js)
            elif name == "birth_year":
                year = batch["taken_year"][i]
                cols[name].extend([None if year is None or age is None else float(year - age[j]) for j in js])
            elif name in batch and _is_face_level(batch[name][i]):
                values = batch[name][i]
                cols[name].extend(_py(values[j], 1.0 / scale if name in PIXEL_COLUMNS else None) for j in js)
            else:
                cols[name].extend([_py(batch.get(name, [None] * len(picks))[i])] * len(js))
    return cols


def _is_face_level(value) -> bool:
    return isinstance(value, (np.ndarray, list, tuple))


def _py(value, scale: float | None = None):
    """numpy scalars/arrays -> Python values Arrow accepts; NaN -> null; optional pixel rescale."""
    if isinstance(value, np.ndarray):
        if scale is not None:
            value = value * scale
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        if scale is not None:
            return value * scale
    elif isinstance(value, int) and scale is not None and not isinstance(value, bool):
        return round(value * scale)
    return value
