"""What a run has to do: the listed inputs compared with what is committed, without loading any model.

A listed photo is *done* when a committed shard holds it under the current stage fingerprints and its file is
the one that was analysed (same size and mtime, and ETag where the store gives one, as recorded in
``photos.input_bytes`` / ``input_mtime_ns`` / ``input_etag``). Everything else is pending:

- new photos (no committed row) go into new shards, in path order;
- the listed photos of a *stale* shard (other fingerprints, or ``--full``) or of a shard holding a *changed*
  photo (replaced bytes, a file truncated mid-copy that is now whole) are reanalysed into shards that replace it;
- a *damaged* shard (a file its marker names missing or altered: ``Store.damage``) counts as not committed: the
  run drops it and its photos are new again.

Memory: the committed side is a few numpy arrays (8-byte photo keys, shard, size, mtime: 29 bytes a photo),
filled in place shard by shard from the photos files' own columns; the listing is streamed past them and only pending
photos are kept as Python objects. A nightly rerun over 200,000 unchanged photos holds no set of paths or ids.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from colortrend.io.discover import Listed, iter_inputs, keyed_photo_id
from colortrend.pipeline import ShardTask, shard_tasks

if TYPE_CHECKING:
    import pyarrow as pa

    from colortrend.config import Config
    from colortrend.io.store import Store
    from colortrend.pipeline import Pipeline

log = logging.getLogger(__name__)
UNKNOWN = np.iinfo(np.int64).min  # a size, mtime or ETag the listing or an old row does not give
CHUNK = 8192  # listed files compared with the committed ones at a time
INPUT_COLUMNS = ("input_bytes", "input_mtime_ns", "input_etag")  # the version of each input as listed when planned


@dataclass
class Plan:
    inputs: int  # distinct input files listed
    tasks: list[ShardTask]
    stale: list[str]  # committed shards to redo: other fingerprints, or holding a changed photo
    committed_photos: int  # photos of committed shards that stay as they are
    fingerprint: str
    damaged: dict[str, str] = field(default_factory=dict)  # shard id -> which file is damaged and how
    changed: int = 0  # listed photos whose file changed since it was analysed
    listed: dict[str, Listed] = field(default_factory=dict)  # photo_id -> how it was listed, for pending photos
    index_tokens: dict[str, str | None] = field(default_factory=dict)  # healthy shard -> its hash index token


def plan(cfg: "Config", pipeline: "Pipeline", store: "Store", full: bool = False) -> Plan:
    current = pipeline.fingerprints()[pipeline.stages[-1].name]
    markers = store.markers()
    damaged = store.damage(markers)
    healthy = {sid: m for sid, m in markers.items() if sid not in damaged}
    index = CommittedIndex.read(store, healthy, damaged)
    fresh = np.array([healthy[sid].get("fingerprint") == current and not full for sid in index.shards], bool)

    pending: dict[str, Listed] = {}  # photo_id -> listing, of new photos and of photos of shards to redo
    owner: dict[str, int] = {}  # photo_id -> index of the committed shard a pending photo is in
    changed_shards: set[int] = set()
    listed_keys: list[np.ndarray] = []
    changed = 0
    for chunk in _chunks(iter_inputs(cfg.input.paths, exclude=cfg.output)):
        ids = [keyed_photo_id(entry.path, pipeline.photo_key) for entry in chunk]
        keys = id_keys(ids)
        listed_keys.append(keys)
        pos, found = index.find(keys)
        shard = np.where(found, index.shard[pos], -1) if len(index.key) else np.full(len(chunk), -1)
        in_fresh = np.zeros(len(chunk), bool)
        in_fresh[found] = fresh[shard[found]]
        is_changed = found & index.changed(pos, chunk)
        changed += int(np.count_nonzero(is_changed & in_fresh))
        changed_shards.update(shard[is_changed].tolist())
        redo = ~in_fresh | is_changed
        for i in np.flatnonzero(redo):
            pending[ids[i]] = chunk[i]
            if found[i]:
                owner[ids[i]] = int(shard[i])
    inputs = int(np.unique(np.concatenate(listed_keys)).size) if listed_keys else 0

    newly_stale = changed_shards - {int(i) for i in np.flatnonzero(~fresh)}
    if newly_stale:  # a shard holding a changed photo is redone whole: list again for its other photos
        for chunk in _chunks(iter_inputs(cfg.input.paths, exclude=cfg.output)):
            ids = [keyed_photo_id(entry.path, pipeline.photo_key) for entry in chunk]
            pos, found = index.find(id_keys(ids))
            for i in np.flatnonzero(found):
                if int(index.shard[pos[i]]) in newly_stale:
                    pending.setdefault(ids[i], chunk[i])
                    owner[ids[i]] = int(index.shard[pos[i]])

    redone = {int(i) for i in np.flatnonzero(~fresh)} | newly_stale
    by_shard: dict[int, list[str]] = {}
    new = []
    for pid in pending:
        if pid in owner:
            by_shard.setdefault(owner[pid], []).append(pid)
        else:
            new.append(pid)
    tasks = []
    for s in sorted(by_shard, key=lambda s: index.shards[s]):
        for task in _tasks(by_shard[s], pending, cfg.shard_size):
            task.replaces = [index.shards[s]]
            tasks.append(task)
    tasks += _tasks(new, pending, cfg.shard_size)
    stale = sorted(index.shards[s] for s in redone)
    committed = sum(int(index.rows[s]) for s in range(len(index.shards)) if s not in redone)
    tokens = {sid: healthy[sid].get("hash_index") for sid in index.shards}
    return Plan(inputs, tasks, stale, committed, current, damaged, changed, pending, tokens)


def _tasks(ids: list[str], listed: dict[str, Listed], shard_size: int) -> list[ShardTask]:
    ids = sorted(ids, key=lambda pid: listed[pid].path)
    return shard_tasks(ids, [listed[pid].path for pid in ids], shard_size)


def _chunks(entries: Iterable[Listed]) -> Iterator[list[Listed]]:
    chunk = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class CommittedIndex:
    """The committed photos as parallel numpy arrays sorted by photo key: what planning compares listings with.

    Per photo: its 8-byte key, its shard (4 bytes), the size and mtime it was listed with (for rows committed before
    listings were recorded: the size intake read, flagged by ``recorded``), and its ETag's hash only where some
    shard recorded one: 29 bytes a photo on a local disk. The arrays are filled in place, shard by shard, and
    sorted one column at a time, so building them needs little more than they hold."""

    def __init__(self, shards: list[str], rows: np.ndarray, key: np.ndarray, shard: np.ndarray, size: np.ndarray,
                 mtime: np.ndarray, recorded: np.ndarray, etag: np.ndarray | None):
        self.shards, self.rows = shards, rows
        order = np.argsort(key, kind="stable")
        for column in (key, shard, size, mtime, recorded, etag):
            if column is not None:
                column[:] = column[order]  # one column's copy at a time
        del order
        self.key, self.shard, self.size, self.mtime, self.recorded, self.etag = key, shard, size, mtime, recorded, etag

    @classmethod
    def read(cls, store: "Store", markers: dict[str, dict], damaged: dict[str, str]) -> "CommittedIndex":
        """From each shard's photos file (only the columns planning needs). A photos file that cannot be read
        makes its shard damaged (added to ``damaged``)."""
        from colortrend.errors import OutputError

        expected = sum(int(m.get("rows", {}).get("photos", 0)) for m in markers.values() if "photos" in m["files"])
        columns = _Columns(expected)
        shards, rows = [], []
        for shard_id, marker in markers.items():
            if "photos" not in marker["files"]:
                continue
            try:
                table = _read_columns(store, shard_id, marker)
            except OutputError as exc:
                damaged[shard_id] = str(exc).removeprefix("output: ")
                continue
            columns.add(table, len(shards))
            shards.append(shard_id)
            rows.append(table.num_rows)
        for name in list(markers):
            if name in damaged:
                markers.pop(name)
        return cls(shards, np.array(rows, np.int64), *columns.filled())

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key: its position in the index and whether it is there."""
        if not len(self.key):
            return np.zeros(len(keys), np.intp), np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.key, keys), len(self.key) - 1)
        return pos, self.key[pos] == keys

    def changed(self, pos: np.ndarray, chunk: list[Listed]) -> np.ndarray:
        """Whether each listed file differs from the one analysed (meaningful where the key was found)."""
        if not len(self.key):
            return np.zeros(len(chunk), bool)
        size = np.array([UNKNOWN if e.size is None else e.size for e in chunk], np.int64)
        mtime = np.array([UNKNOWN if e.mtime_ns is None else e.mtime_ns for e in chunk], np.int64)
        c_size, c_mtime = self.size[pos], self.mtime[pos]
        differs = (size != c_size) | ((c_mtime != UNKNOWN) & (mtime != c_mtime))
        if self.etag is not None:
            etag, c_etag = etag_keys([e.etag for e in chunk]), self.etag[pos]
            differs |= (c_etag != UNKNOWN) & (etag != UNKNOWN) & (etag != c_etag)
        # Rows committed before listings were recorded: only the size intake read can tell a changed file.
        differs_old = (c_size != UNKNOWN) & (size != UNKNOWN) & (size != c_size)
        return np.where(self.recorded[pos], differs, differs_old)


class _Columns:
    """The index's columns, preallocated for ``expected`` rows (the markers' counts) and grown if a file holds more."""

    def __init__(self, expected: int):
        self.n = 0
        self.key = np.empty(expected, np.uint64)
        self.shard = np.empty(expected, np.int32)
        self.size = np.empty(expected, np.int64)
        self.mtime = np.empty(expected, np.int64)
        self.recorded = np.empty(expected, bool)
        self.etag: np.ndarray | None = None  # only once a shard has recorded ETags

    def add(self, table: "pa.Table", shard: int) -> None:
        start, end = self.n, self.n + table.num_rows
        if end > len(self.key):
            self._grow(max(end, 2 * len(self.key)))
        listed = _int_column(table, "input_bytes")
        recorded = listed != UNKNOWN
        self.key[start:end] = id_keys(table.column("photo_id").to_pylist())
        self.shard[start:end] = shard
        self.size[start:end] = np.where(recorded, listed, _int_column(table, "file_bytes"))
        self.mtime[start:end] = _int_column(table, "input_mtime_ns")
        self.recorded[start:end] = recorded
        if "input_etag" in table.column_names and table.column("input_etag").null_count < table.num_rows:
            if self.etag is None:
                self.etag = np.full(len(self.key), UNKNOWN, np.int64)
            self.etag[start:end] = etag_keys(table.column("input_etag").to_pylist())
        elif self.etag is not None:
            self.etag[start:end] = UNKNOWN
        self.n = end

    def _grow(self, size: int) -> None:
        for name in ("key", "shard", "size", "mtime", "recorded", "etag"):
            column = getattr(self, name)
            if column is not None:
                grown = np.full(size, UNKNOWN, column.dtype) if name == "etag" else np.empty(size, column.dtype)
                grown[:len(column)] = column
                setattr(self, name, grown)

    def filled(self) -> tuple:
        n = self.n
        return (self.key[:n], self.shard[:n], self.size[:n], self.mtime[:n], self.recorded[:n],
                None if self.etag is None else self.etag[:n])


def _read_columns(store: "Store", shard_id: str, marker: dict) -> "pa.Table":
    import pyarrow.parquet as pq

    from colortrend.errors import OutputError

    rel = marker["files"]["photos"]
    try:
        with store.fs.open(store.path(rel), "rb") as f:
            parquet = pq.ParquetFile(f)
            names = parquet.schema_arrow.names
            wanted = ["photo_id", *(c for c in (*INPUT_COLUMNS, "file_bytes") if c in names)]
            return parquet.read(columns=wanted)
    except Exception as exc:  # OSError, ArrowException, a photos file without photo_id...
        raise OutputError(f"output: {store.uri(rel)} is damaged ({' '.join(str(exc).split())[:200]})") from None


def _int_column(table: "pa.Table", name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, UNKNOWN, np.int64)
    return table.column(name).fill_null(UNKNOWN).to_numpy().astype(np.int64, copy=False)


def id_keys(ids: list[str]) -> np.ndarray:
    """Photo ids (16 hex digits: 64 bits of the path's sha1) as uint64, losslessly; any other id is hashed."""
    if ids and all(len(pid) == 16 for pid in ids):  # the usual case, decoded at once (a tenth of the time)
        try:
            packed = bytes.fromhex("".join(ids))
        except ValueError:
            packed = b""
        if len(packed) == 8 * len(ids):  # (fromhex skips spaces: an id holding one is keyed one by one)
            return np.frombuffer(packed, ">u8").astype(np.uint64)
    return np.fromiter((_key(pid) for pid in ids), np.uint64, count=len(ids))


def _key(pid: str) -> int:
    if len(pid) == 16:
        try:
            return int(pid, 16)
        except ValueError:
            pass
    return int.from_bytes(hashlib.blake2b(pid.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


def etag_keys(etags: list[str | None]) -> np.ndarray:
    """ETags as int64 hashes (UNKNOWN where absent): compared for equality only."""
    return np.fromiter((UNKNOWN if e is None else
                        int.from_bytes(hashlib.blake2b(e.encode(), digest_size=8).digest(), "big", signed=True) | 1
                        for e in etags), np.int64, count=len(etags))
