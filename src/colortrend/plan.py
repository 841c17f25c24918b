"""What a run has to do: the listed inputs compared with what is committed, without loading any model.

A listed photo is *done* when a committed shard holds it under the current stage fingerprints and its file is
the one that was analysed (same size and mtime, and ETag where the store gives one, as recorded in
``photos.input_bytes`` / ``input_mtime_ns`` / ``input_etag``). Everything else is pending:

- new photos (no committed row) go into new shards, in path order (past ``SPILL_ROWS``, range of ids by range);
- the listed photos of a *stale* shard (other fingerprints, or ``--full``) or of a shard holding a *changed*
  photo (replaced bytes, a file truncated mid-copy that is now whole) are reanalysed into shards that replace it;
- a *damaged* shard (a file its marker names missing or altered: ``Store.damage``) counts as not committed: the
  run drops it and its photos are new again.

Memory: the committed side is a few numpy arrays (8-byte photo keys, shard, size, mtime: 29 bytes a photo),
filled in place shard by shard from the photos files' own columns, and one flag a photo for whether it is still
listed; the listing is streamed past them and only pending photos are kept: up to ``SPILL_ROWS`` as one Arrow
table (their paths and about 50 bytes more a photo), past it in a temporary file, ordered a range at a time
(:class:`PlannedShards`). Past ``COMMITTED_ROWS`` committed photos, they and the listing are both written to a
temporary file by ranges of photo keys and compared a range at a time (:class:`Committed`, a partitioned join):
whatever the number of photos, committed or new, planning holds a range of each.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np

from colortrend.io.discover import Listed, iter_inputs, keyed_photo_id
from colortrend.pipeline import ShardTask, shard_id_for

if TYPE_CHECKING:
    import pyarrow as pa

    from colortrend.config import Config
    from colortrend.io.store import Store
    from colortrend.pipeline import Pipeline

log = logging.getLogger(__name__)
UNKNOWN = np.iinfo(np.int64).min  # a size, mtime or ETag the listing or an old row does not give
CHUNK = 8192  # listed files compared with the committed ones at a time
SPILL_ROWS = 1 << 18  # pending photos planning holds in memory; past it, it spills them to a temporary file
COMMITTED_ROWS = 1 << 20  # committed photos planning compares in memory; past it, a range of photo keys at a time
LISTING_ROWS = 1 << 16  # listed files a spilled comparison writes to its temporary file at a time
BUCKET_BITS = 8
BUCKETS = 1 << BUCKET_BITS  # ranges of new photos (by key) and of photos to redo (by shard) a spilled plan is cut in
INPUT_COLUMNS = ("input_bytes", "input_mtime_ns", "input_etag")  # the version of each input as listed when planned


@dataclass
class Plan:
    inputs: int  # distinct input files listed
    tasks: "PlannedShards"  # the shards to analyse, made one at a time as a runner takes them
    stale: list[str]  # committed shards to redo: other fingerprints, or holding a changed photo
    committed_photos: int  # photos of committed shards that stay as they are
    fingerprint: str
    damaged: dict[str, str] = field(default_factory=dict)  # shard id -> which file is damaged and how
    changed: int = 0  # listed photos whose file changed since it was analysed
    index_tokens: dict[str, str | None] = field(default_factory=dict)  # healthy shard -> its hash index token


def plan(cfg: "Config", pipeline: "Pipeline", store: "Store", full: bool = False,
         markers: dict[str, dict] | None = None) -> Plan:
    """The work of a run: the listing joined with the committed shards (``markers``, read here when not given)."""
    current = pipeline.fingerprints()[pipeline.stages[-1].name]
    markers = store.markers() if markers is None else markers
    damaged = store.damage(markers)
    healthy = {sid: m for sid, m in markers.items() if sid not in damaged}
    committed = Committed.read(store, healthy, damaged)
    try:
        return _compare(cfg, pipeline, committed, healthy, current, damaged, full)
    finally:
        committed.close()


def _compare(cfg: "Config", pipeline: "Pipeline", committed: "Committed", healthy: dict[str, dict], current: str,
             damaged: dict[str, str], full: bool) -> Plan:
    """The listing compared with the committed photos, a range of photo keys at a time."""
    fresh = np.array([healthy[sid].get("fingerprint") == current and not full for sid in committed.shards], bool)
    pending = _Pending(committed.shards)  # new photos and photos of shards to redo, a chunk of columns at a time

    def listing() -> Iterable[Listed]:  # (in memory, a second pass lists the inputs again)
        return iter_inputs(cfg.input.paths, exclude=cfg.output)

    listed = 0  # committed photos the listing still names
    changed_shards: set[int] = set()
    changed = 0
    for index, chunks in committed.ranges(listing, pipeline.photo_key):
        named = np.zeros(len(index.key), bool)
        for chunk, keys in chunks:
            pos, found, shard = index.look_up(keys)
            named[pos[found]] = True
            in_fresh = np.zeros(len(chunk), bool)
            in_fresh[found] = fresh[shard[found]]
            is_changed = found & index.changed(pos, chunk)
            changed += int(np.count_nonzero(is_changed & in_fresh))
            changed_shards.update(shard[is_changed].tolist())
            pending.add(chunk, keys, shard, np.flatnonzero(~in_fresh | is_changed))
        listed += int(np.count_nonzero(named))
        del index, named  # before the next range's index is built

    newly_stale = changed_shards - {int(i) for i in np.flatnonzero(~fresh)}
    if newly_stale:  # a shard holding a changed photo is redone whole: its other photos, from a second pass
        wanted = np.array(sorted(newly_stale), np.int64)
        for index, chunks in committed.ranges(listing, pipeline.photo_key):
            for chunk, keys in chunks:
                _, found, shard = index.look_up(keys)
                pending.add(chunk, keys, shard, np.flatnonzero(found & np.isin(shard, wanted)))
            del index

    redone = {int(i) for i in np.flatnonzero(~fresh)} | newly_stale
    tasks = PlannedShards(pending, committed.shards, cfg.shard_size)
    stale = sorted(committed.shards[s] for s in redone)
    kept = sum(int(committed.rows[s]) for s in range(len(committed.shards)) if s not in redone)
    tokens = {sid: healthy[sid].get("hash_index") for sid in committed.shards}
    return Plan(listed + tasks.new_photos, tasks, stale, kept, current, damaged, changed, tokens)


class PlannedShards(Sequence[ShardTask]):
    """The shards a run analyses, in planned order: the photos of each shard to redo (shard by shard, in the order
    of their ids) and then the new photos, each group in path order and cut into ``shard_size`` shards.

    Up to ``SPILL_ROWS`` pending photos the plan is one Arrow table in memory (8-byte key, the path as bytes since a
    file name need not be UTF-8, listed size, mtime and ETag, owning shard) and its planned order: a path's bytes and
    about 50 more a photo. Beyond, :class:`_Pending` has spilled them to a temporary file in ranges, and each range
    is ordered and cut in turn into a second file, one record batch per shard: the coordinator then holds a range
    at a time while planning and a shard at a time while running, whatever the number of photos. (Spilled, new
    photos come range of keys by range of keys, each range in path order.) A :class:`ShardTask` is made only when a
    runner takes it."""

    def __init__(self, pending: "_Pending", shards: list[str], shard_size: int):
        self.shards = shards
        self.photos = self.new_photos = 0
        self._spill = pending.spill  # owns the temporary folder a spilled plan lives in
        self._plan_path = None if self._spill is None else self._spill.plan_path
        self._table = self._order = self._reader = None
        starts, ends, owners = [], [], []
        with _temporary_files():
            writer = None
            for table in pending.ranges():
                table = _first_listings(table)
                owner = table.column("owner").to_numpy()
                order, cuts = _cut(table.column("path"), pending.group(owner), shard_size)
                owners.append(owner[order[cuts[:-1]]])
                self.photos += table.num_rows
                self.new_photos += int(np.count_nonzero(owner < 0))
                if self._spill is None:  # the one range: kept as it is, each shard taken from it when asked for
                    self._table, self._order = table, order
                    starts, ends = cuts[:-1], cuts[1:]
                    continue
                if writer is None:
                    writer = self._spill.plan_writer(table.schema)
                table = table.combine_chunks()  # the range's record batches as one: each shard's take reads its rows
                for a, b in zip(cuts[:-1].tolist(), cuts[1:].tolist()):  # record batch i is shard i
                    writer.write_table(table.take(order[a:b]), max_chunksize=b - a)
            if writer is not None:
                writer.close()
        self.owner = np.concatenate(owners) if owners else np.zeros(0, np.int32)
        self.starts, self.ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
        self.replaced: set[str] = {shards[int(s)] for s in np.unique(self.owner[self.owner >= 0])}

    def __len__(self) -> int:
        return len(self.owner)

    def __iter__(self) -> Iterator[ShardTask]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, i: int) -> ShardTask:
        if self._table is not None:
            rows = self._table.take(self._order[int(self.starts[i]):int(self.ends[i])])
        else:
            with _temporary_files():
                if self._reader is None:  # opened in the process that takes the shards (a Ray worker, say)
                    import pyarrow as pa

                    self._reader = pa.ipc.open_file(pa.OSFile(self._plan_path, "rb"))
                rows = self._reader.get_batch(i)
        keys = rows.column("key").to_numpy().astype(">u8").tobytes().hex()
        ids = [keys[j:j + 16] for j in range(0, len(keys), 16)]  # a pending photo's id is its key in hex
        listing = _listings(rows)
        owner = int(self.owner[i])
        return ShardTask(shard_id_for(ids), ids, [e.path for e in listing], [self.shards[owner]] if owner >= 0 else [],
                         listing)

    @property
    def spilled(self) -> bool:
        return self._plan_path is not None

    def close(self) -> None:
        """Removes a spilled plan's temporary files (also done when the plan is collected or the process exits)."""
        if self._spill is not None:
            self._spill.remove()

    def __getstate__(self):  # to a Ray worker: the spilled plan's path, not its folder's owner or an open file
        return dict(self.__dict__, _reader=None, _spill=None)


class _Pending:
    """Pending photos as they are found, a chunk of columns at a time. Up to ``limit`` photos they are held in
    memory and make one range; past it, they are written (``limit / 4`` at a time) to a temporary Arrow file in
    ``BUCKETS`` ranges of photos to redo (by their shard's place in id order) and ``BUCKETS`` of new photos (by
    their key's top bits), and :meth:`ranges` reads back neighbouring ranges together up to about ``limit``
    photos. A photo listed twice lands twice in one range (same key, same shard); the plan keeps its first
    listing. Paths are packed into Arrow buffers directly: Arrow's builders held several times the bytes they keep."""

    def __init__(self, shards: list[str], limit: int | None = None):
        self.rank = np.empty(len(shards), np.int64)  # each committed shard's place in id order
        self.rank[sorted(range(len(shards)), key=shards.__getitem__)] = np.arange(len(shards))
        self.limit = SPILL_ROWS if limit is None else limit
        self.parts: list[dict] = []
        self.held = 0
        self.spill: _Spill | None = None

    def group(self, owner: np.ndarray) -> np.ndarray:
        """Each photo's group: its shard's place in id order, or after every shard for a new photo."""
        n = len(self.rank)
        return np.where(owner >= 0, self.rank[np.maximum(owner, 0)] if n else 0, n)

    def add(self, chunk: list[Listed], keys: np.ndarray, shard: np.ndarray, rows: np.ndarray) -> None:
        if not len(rows):
            return
        self.parts.append({"key": keys[rows], "owner": shard[rows].astype(np.int32),
                           **_listing_columns([chunk[i] for i in rows])})
        self.held += len(rows)
        if self.held > (self.limit if self.spill is None else max(1, self.limit // 4)):
            self._write()

    def ranges(self) -> Iterator["pa.Table"]:
        """The pending photos, a range at a time in planned order (one range when nothing was spilled)."""
        if self.spill is None:
            yield self._joined()
            return
        if self.parts:
            self._write()
        yield from self.spill.ranges(self.limit)

    def _write(self) -> None:
        table = self._joined().combine_chunks()  # one chunk: each range's take below reads only its own rows
        owner = table.column("owner").to_numpy()
        new_range = BUCKETS + (table.column("key").to_numpy() >> np.uint64(64 - BUCKET_BITS)).astype(np.int64)
        redo_range = self.group(owner) * BUCKETS // max(1, len(self.rank))
        with _temporary_files():
            if self.spill is None:
                self.spill = _Spill(table.schema)
            self.spill.pending.write(table, np.where(owner >= 0, redo_range, new_range))

    def _joined(self) -> "pa.Table":
        import pyarrow as pa

        names = ("key", "owner", "path", "size", "mtime", "etag")
        if not self.parts:
            types = (pa.uint64(), pa.int32(), pa.large_binary(), pa.int64(), pa.int64(), pa.string())
            return pa.table({n: pa.array([], t) for n, t in zip(names, types)})
        columns = {}
        for name in names:
            values = [part.pop(name) for part in self.parts]
            columns[name] = pa.chunked_array(values) if isinstance(values[0], pa.Array) else np.concatenate(values)
        self.parts, self.held = [], 0
        return pa.table(columns)


PLAN_HELD = f"past {SPILL_ROWS:,} photos to analyse it keeps them there (about 150 bytes a photo)"


@contextlib.contextmanager
def _temporary_files(held: str | None = None) -> Iterator[None]:
    """A temporary file's disk refusing it (full, read-only, the file gone) becomes one line naming ``TMPDIR`` and
    what planning keeps there (``held``; a spilled plan's photos by default)."""
    try:
        yield
    except OSError as exc:
        from colortrend.errors import ConfigError, environment_problem

        raise ConfigError(f"planning: {environment_problem(exc, tempfile.gettempdir())}; {held or PLAN_HELD}: set "
                          "TMPDIR to a folder with room") from None


class _Scratch:
    """A temporary folder under ``TMPDIR``, removed by :meth:`remove`, when collected, or when the process exits."""

    def __init__(self, prefix: str):
        self.folder = tempfile.mkdtemp(prefix=prefix)
        self._remove = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def remove(self) -> None:
        self._remove()


class _RangeFile:
    """Rows written to one Arrow IPC file a table at a time, each row into one of ``n`` ranges, and read back a
    range (or neighbouring ranges) at a time, each in the order its rows were written."""

    def __init__(self, path: str, schema: "pa.Schema", n: int):
        import pyarrow as pa

        self.path, self.schema = path, schema
        self._writer = pa.ipc.new_file(path, schema)
        self._reader = None
        self.batches: list[list[int]] = [[] for _ in range(n)]  # each range's record batches
        self.rows = np.zeros(n, np.int64)
        self.written = 0

    def write(self, table: "pa.Table", ranges: np.ndarray) -> None:
        order = np.argsort(ranges, kind="stable")  # stable: a range keeps its rows in the order given
        for a, b in _runs(ranges[order]):  # a range's rows copied at a time, not the whole table's
            r = int(ranges[order[a]])
            for batch in table.take(order[a:b]).to_batches():
                self._writer.write_batch(batch)
                self.batches[r].append(self.written)
                self.written += 1
            self.rows[r] += b - a

    def batches_of(self, ranges: Iterable[int]) -> Iterator["pa.RecordBatch"]:
        import pyarrow as pa

        if self._reader is None:
            self._writer.close()
            self._reader = pa.ipc.open_file(pa.OSFile(self.path, "rb"))
        for r in ranges:
            for i in self.batches[r]:
                yield self._reader.get_batch(i)

    def read(self, ranges: Iterable[int]) -> "pa.Table":
        import pyarrow as pa

        return pa.Table.from_batches(list(self.batches_of(ranges)), schema=self.schema)

    def remove(self) -> None:
        self._reader = None
        os.remove(self.path)


class _Spill(_Scratch):
    """A spilled plan's temporary folder: the pending photos, by range (:class:`_RangeFile`), then the ordered plan,
    one record batch per shard."""

    def __init__(self, schema: "pa.Schema"):
        super().__init__("colortrend-plan-")
        self.plan_path = os.path.join(self.folder, "plan.arrow")
        self.pending = _RangeFile(os.path.join(self.folder, "pending.arrow"), schema, 2 * BUCKETS)

    def ranges(self, limit: int) -> Iterator["pa.Table"]:
        """Neighbouring ranges read back together, up to about ``limit`` photos (or one range, if larger)."""
        rows = self.pending.rows
        group: list[int] = []
        for r in [*np.flatnonzero(rows).tolist(), None]:
            full = group and (r is None or r == BUCKETS or rows[group].sum() + rows[r] > limit)
            if full:  # (photos to redo and new photos are never read together)
                yield self.pending.read(group)
                group = []
            if r is not None:
                group.append(r)
        self.pending.remove()

    def plan_writer(self, schema: "pa.Schema"):
        import pyarrow as pa

        return pa.ipc.new_file(self.plan_path, schema)


def _first_listings(table: "pa.Table") -> "pa.Table":
    """The table without later listings of a photo listed twice (two inputs naming the same file)."""
    _, first = np.unique(table.column("key").to_numpy(), return_index=True)
    return table if len(first) == table.num_rows else table.take(np.sort(first))


def _cut(paths: "pa.ChunkedArray", group: np.ndarray, shard_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The planned order (by group, then path) and where its shards start, with the end last: a shard never
    spans two groups."""
    import pyarrow.compute as pc

    # By path, then (stably) by group: one column's sort at a time (a two-key table sort holds far more).
    by_path = pc.sort_indices(paths).to_numpy()
    order = by_path[np.argsort(group[by_path], kind="stable")]
    cuts = [start for a, b in _runs(group[order]) for start in range(a, b, shard_size)]
    return order, np.array([*cuts, len(order)], np.int64)


def _listing_columns(entries: list[Listed]) -> dict:
    """Listed files as columns: the path as bytes (a file name need not be UTF-8), size, mtime and ETag."""
    import pyarrow as pa

    etags = [e.etag for e in entries]
    known = any(e is not None for e in etags)
    return {"path": _binary([e.path.encode("utf-8", "surrogateescape") for e in entries]),
            "size": np.array([UNKNOWN if e.size is None else e.size for e in entries], np.int64),
            "mtime": np.array([UNKNOWN if e.mtime_ns is None else e.mtime_ns for e in entries], np.int64),
            "etag": pa.array(etags, pa.string()) if known else pa.nulls(len(etags), pa.string())}


def _listings(rows: "pa.Table | pa.RecordBatch") -> list[Listed]:
    """The listed files of :func:`_listing_columns`' columns."""
    paths = [path.decode("utf-8", "surrogateescape") for path in rows.column("path").to_pylist()]
    sizes, mtimes = (_known(rows.column(name).to_numpy()) for name in ("size", "mtime"))
    return [Listed(*entry) for entry in zip(paths, sizes, mtimes, rows.column("etag").to_pylist())]


def _binary(items: list[bytes]) -> "pa.Array":
    """``items`` as one Arrow large_binary array, its two buffers made in one pass each."""
    import pyarrow as pa

    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum([len(item) for item in items], out=offsets[1:])
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(items))]
    return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(items), buffers)


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of equal values of a sorted array."""
    if not len(values):
        return []
    cuts = np.flatnonzero(np.diff(values)) + 1
    return list(zip([0, *cuts.tolist()], [*cuts.tolist(), len(values)]))


def _known(values: np.ndarray) -> list[int | None]:
    return [None if v == UNKNOWN else v for v in values.tolist()]


def _chunks(entries: Iterable[Listed]) -> Iterator[list[Listed]]:
    chunk = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


COMMITTED_HELD = (f"past {COMMITTED_ROWS:,} committed photos it compares them with the listing there, a range at a "
                  "time (about 40 bytes a committed photo and 60 more than its path a listed one)")


class Committed:
    """The committed photos, as planning compares the listing with them: a range of photo keys at a time.

    Up to ``COMMITTED_ROWS`` photos there is one range, a :class:`CommittedIndex` of them all, and the listing is
    streamed past it. Past it, a partitioned join: each photos file is read once and its rows are written by the
    top bits of their keys to a temporary file, in ranges of about ``COMMITTED_ROWS / 2`` photos; the listing is
    written by the same bits beside them the first time it is asked for; then each range's index is built in turn
    and that range's listed files streamed past it. Planning then holds one range of the committed photos and
    ``LISTING_ROWS`` listed files, whatever the number of either. :meth:`close` removes the files."""

    def __init__(self, shards: list[str], rows: np.ndarray, index: "CommittedIndex | None" = None,
                 spill: "_CommittedSpill | None" = None):
        self.shards, self.rows = shards, rows
        self._index, self._spill = index, spill

    @property
    def spilled(self) -> bool:
        return self._spill is not None

    @classmethod
    def read(cls, store: "Store", markers: dict[str, dict], damaged: dict[str, str],
             limit: int | None = None) -> "Committed":
        """From each shard's photos file (only the columns planning needs). A photos file that cannot be read
        makes its shard damaged (added to ``damaged`` and dropped from ``markers``)."""
        from colortrend.errors import OutputError

        limit = COMMITTED_ROWS if limit is None else limit
        expected = sum(int(m.get("rows", {}).get("photos", 0)) for m in markers.values() if "photos" in m["files"])
        spill = _CommittedSpill(expected, limit) if expected > limit else None
        columns = _Columns(expected if spill is None else spill.flush_rows)
        shards, rows = [], []
        for shard_id, marker in markers.items():
            if "photos" not in marker["files"]:
                continue
            try:
                table = _read_columns(store, shard_id, marker)
            except OutputError as exc:
                damaged[shard_id] = str(exc).removeprefix("output: ")
                continue
            if spill is not None and columns.n + table.num_rows > spill.flush_rows:
                spill.write(columns)
            columns.add(table, len(shards))
            shards.append(shard_id)
            rows.append(table.num_rows)
        if spill is not None:
            spill.write(columns)
        for name in list(markers):
            if name in damaged:
                markers.pop(name)
        rows = np.array(rows, np.int64)
        if spill is not None:
            return cls(shards, rows, spill=spill)
        return cls(shards, rows, index=CommittedIndex(shards, rows, *columns.filled()))

    def ranges(self, listing: Callable[[], Iterable[Listed]], photo_key: bytes | None
               ) -> Iterator[tuple["CommittedIndex", Iterator[tuple[list[Listed], np.ndarray]]]]:
        """Each range's index of committed photos, with the listed files whose keys fall in it, a chunk at a time
        with their photo keys; ``listing()`` lists the inputs (called once; a spilled comparison keeps what it
        listed for a second pass)."""
        if self._spill is None:
            yield self._index, _keyed(listing(), photo_key)
            return
        if self._spill.listing is None:
            self._spill.write_listing(_keyed(listing(), photo_key))
        for r in range(self._spill.n):
            yield self._spill.index(r, self.shards, self.rows), self._spill.listed(r)

    def close(self) -> None:
        if self._spill is not None:
            self._spill.remove()


class _CommittedSpill(_Scratch):
    """A spilled comparison's temporary folder: the committed photos' columns and the listing, by key range. Its
    disk refusing a write or a read is one line naming ``TMPDIR`` (:func:`_temporary_files`)."""

    def __init__(self, expected: int, limit: int):
        import pyarrow as pa

        self.bits = max(1, math.ceil(math.log2(expected / max(1, limit // 2))))  # ranges of about limit / 2
        self.n = 1 << self.bits
        self.flush_rows = max(1, limit // 4)  # committed rows gathered before they are written
        self.etags = False  # whether any shard recorded ETags
        schema = pa.schema([("key", pa.uint64()), ("shard", pa.int32()), ("size", pa.int64()), ("mtime", pa.int64()),
                            ("recorded", pa.bool_()), ("etag", pa.int64())])
        with _temporary_files(COMMITTED_HELD):
            super().__init__("colortrend-committed-")
            self.committed = _RangeFile(os.path.join(self.folder, "committed.arrow"), schema, self.n)
        self.listing: _RangeFile | None = None

    def range_of(self, keys: np.ndarray) -> np.ndarray:
        return (keys >> np.uint64(64 - self.bits)).astype(np.int64)

    def write(self, columns: "_Columns") -> None:
        import pyarrow as pa

        key, shard, size, mtime, recorded, etag = columns.filled()
        self.etags |= etag is not None
        etag = np.full(len(key), UNKNOWN, np.int64) if etag is None else etag
        table = pa.table({"key": key, "shard": shard, "size": size, "mtime": mtime, "recorded": recorded,
                          "etag": etag})
        with _temporary_files(COMMITTED_HELD):
            self.committed.write(table, self.range_of(key))
        columns.clear()

    def index(self, r: int, shards: list[str], rows: np.ndarray) -> "CommittedIndex":
        with _temporary_files(COMMITTED_HELD):
            table = self.committed.read([r])
        columns = [table.column(name).to_numpy() for name in ("key", "shard", "size", "mtime", "recorded", "etag")]
        del table  # Arrow's buffers go before the index sorts its columns in place
        for i in range(len(columns)):
            if not columns[i].flags.writeable:  # (one range's one batch: a view of Arrow's buffer)
                columns[i] = columns[i].copy()
        key, shard, size, mtime, recorded, etag = columns
        return CommittedIndex(shards, rows, key, shard, size, mtime, recorded, etag if self.etags else None)

    def write_listing(self, chunks: Iterator[tuple[list[Listed], np.ndarray]]) -> None:
        import pyarrow as pa

        schema = pa.table({"key": np.zeros(0, np.uint64), **_listing_columns([])}).schema
        with _temporary_files(COMMITTED_HELD):
            self.listing = _RangeFile(os.path.join(self.folder, "listing.arrow"), schema, self.n)
        parts, held = [], 0
        for chunk, keys in chunks:  # (listed outside the wrapper: a listing's own error is not the disk's)
            parts.append(pa.table({"key": keys, **_listing_columns(chunk)}).cast(schema))
            held += len(chunk)
            if held >= LISTING_ROWS:  # written at a time, so that each range's record batches stay large
                self._write_listed(parts)
                parts, held = [], 0
        self._write_listed(parts)

    def _write_listed(self, parts: list["pa.Table"]) -> None:
        if parts:
            import pyarrow as pa

            table = pa.concat_tables(parts).combine_chunks()
            with _temporary_files(COMMITTED_HELD):
                self.listing.write(table, self.range_of(table.column("key").to_numpy()))

    def listed(self, r: int) -> Iterator[tuple[list[Listed], np.ndarray]]:
        with _temporary_files(COMMITTED_HELD):
            for batch in self.listing.batches_of([r]):
                yield _listings(batch), batch.column("key").to_numpy()


def _keyed(entries: Iterable[Listed], photo_key: bytes | None) -> Iterator[tuple[list[Listed], np.ndarray]]:
    """Listed files a chunk at a time, with their photo keys."""
    for chunk in _chunks(entries):
        yield chunk, id_keys([keyed_photo_id(entry.path, photo_key) for entry in chunk])


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

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key: its position in the index and whether it is there."""
        if not len(self.key):
            return np.zeros(len(keys), np.intp), np.zeros(len(keys), bool)
        pos = np.minimum(np.searchsorted(self.key, keys), len(self.key) - 1)
        return pos, self.key[pos] == keys

    def look_up(self, keys: np.ndarray) -> tuple[np.ndarray, ...]:
        """For each listed file's photo key: its position in the index, whether it is there, and its shard's
        index (-1 where it is not)."""
        pos, found = self.find(keys)
        shard = np.where(found, self.shard[pos], -1) if len(self.key) else np.full(len(keys), -1)
        return pos, found, shard

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

    def clear(self) -> None:
        self.n = 0
        self.etag = None

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
