"""The content-hash index: content_hash -> photo_id of every committed analysed photo, partitioned by hash.

Duplicate marking asks it, for each photo this run analyses, whether earlier committed bytes are the same. It lives
under the output, written by the store as part of each shard's commit, in the shape of a small log-structured
merge tree, so that no commit rewrites a big file and a run reads only what its new photos' hashes touch::

    _index/hashes/delta/<shard>.<token>.parquet      a committed shard's entries, until compacted (one file a commit)
    _index/hashes/<pp>/<rows>-<name>.parquet         entries whose hash starts with the hex digits <pp>

Every entry names its shard and the *token* of the commit that wrote it; it counts only while that shard's marker
holds the same token (``hash_index`` in ``_markers/<shard>.json``). A shard's delta is written before its marker
(the commit point), so a crash anywhere leaves at worst entries that do not count: those of a shard never
committed, replaced (a new token) or dropped (no marker). Recovery deletes such deltas; compaction leaves such
entries out of what it writes. A marker without a token (an output written before the index) has its delta
rebuilt from its photos file once, then its token is added to its marker (:func:`rebuild`).

Compaction (:func:`compact`, after a run's commits): deltas beyond ``DELTA_LIMIT`` are split into one file per
partition; within a partition, ``FANOUT`` files of the same size tier (rows, by powers of ``FANOUT``) merge into one,
so each entry is rewritten about log4(entries) times and a partition holds a few files per tier.

Reading (:class:`HashIndex`): the deltas (at most ``DELTA_LIMIT`` shards' entries) once, then a partition the first
time a hash of it is asked for, held as sorted numpy arrays (24 bytes an entry). Memory is the partitions this
run's photos touch, not the collection.
"""
from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from colortrend.io.store import Store

log = logging.getLogger(__name__)
HASHES = "_index/hashes"
DELTAS = f"{HASHES}/delta"
PREFIX = 2  # hex digits of the hash naming its partition: 256 partitions
DELTA_LIMIT = 32  # deltas left as they are after a compaction; a reader reads them all
FANOUT = 4  # files of one size tier in a partition that merge into one
GROUP_ROWS = 1 << 15  # delta entries split into partitions at a time (bounds compaction's memory)
ANALYSED = ("ok", "no_face")  # statuses whose content hash stands for analysed bytes
SCHEMA = pa.schema([("content_hash", pa.string()), ("photo_id", pa.string()), ("shard", pa.string()),
                    ("token", pa.string())])
_TOKEN = re.compile(r"^[0-9a-f]{8}$")
_DELTA_NAME = re.compile(r"^(?P<shard>.+)\.(?P<token>[0-9a-f]{8})\.parquet$")
_PART_NAME = re.compile(r"^(?P<rows>[0-9]{12})-[0-9a-f]{16}\.parquet$")
_PARTITION = re.compile(r"^[0-9a-f]{%d}$" % PREFIX)
_HEX = re.compile(r"^[0-9a-f]*$")


def new_token() -> str:
    return secrets.token_hex(4)


def is_token(value: str) -> bool:
    return bool(_TOKEN.match(value))


def delta_path(shard_id: str, token: str) -> str:
    return f"{DELTAS}/{shard_id}.{token}.parquet"


def delta_of(name: str) -> tuple[str, str] | None:
    """(shard, token) of a file in the delta folder named like a delta; None for any other name (not ours)."""
    match = _DELTA_NAME.match(name)
    return (match.group("shard"), match.group("token")) if match else None


def entries(photos: pa.Table, shard_id: str, token: str) -> pa.Table:
    """The index entries of a shard's photos rows: analysed photos with a hash, in hash order."""
    import pyarrow.compute as pc

    if not {"content_hash", "status", "photo_id"} <= set(photos.column_names):
        return SCHEMA.empty_table()
    keep = pc.and_(pc.is_valid(photos["content_hash"]), pc.is_in(photos["status"], pa.array(ANALYSED)))
    rows = photos.filter(pc.fill_null(keep, False)).select(["content_hash", "photo_id"])
    rows = rows.append_column("shard", pa.array([shard_id] * rows.num_rows, pa.string()))
    rows = rows.append_column("token", pa.array([token] * rows.num_rows, pa.string()))
    return rows.cast(SCHEMA).sort_by([("content_hash", "ascending"), ("photo_id", "ascending")])


def write_delta(store: "Store", shard_id: str, token: str, photos: pa.Table) -> None:
    store.write_parquet(delta_path(shard_id, token), entries(photos, shard_id, token))


def rebuild(store: "Store", markers: dict[str, dict]) -> dict[str, str]:
    """Index the committed shards of ``markers`` that have no token (written before the index): a delta from each
    one's photos file, then the token in its marker. Killed half-way, what it wrote does not count yet."""
    for shard_id, marker in markers.items():
        if "hash_index" in marker:
            continue
        token = new_token()
        photos = store.read_shard(shard_id, marker, "photos", ["photo_id", "content_hash", "status"],
                                  present_only=True)
        write_delta(store, shard_id, token, photos if photos is not None else SCHEMA.empty_table())
        marker["hash_index"] = token
        store.write_json(store.marker(shard_id), marker)
        log.info("hash index: indexed shard %s (committed before the index)", shard_id)
    return tokens_of(markers)


def tokens_of(markers: dict[str, dict]) -> dict[str, str]:
    """shard -> the token its entries must carry to count."""
    return {sid: m["hash_index"] for sid, m in markers.items() if "hash_index" in m}


class _Valid:
    """Which entries count: those whose (shard, token) is a committed marker's."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens
        self._shards = self._tokens = None

    def __call__(self, table: pa.Table) -> pa.Table:
        import pyarrow.compute as pc

        if self._shards is None:  # once: the committed shards and, in the same order, their tokens
            self._shards = pa.array(list(self.tokens), pa.string())
            self._tokens = pa.array(list(self.tokens.values()), pa.string())
        at = pc.index_in(table["shard"], value_set=self._shards)  # null where the shard is not committed
        keep = pc.fill_null(pc.equal(table["token"], self._tokens.take(at)), False)
        return table.filter(keep)


def _read(store: "Store", rel: str) -> pa.Table:
    """An index file's entries; a file that cannot be read counts as empty (the index only ever misses a
    duplicate through it; the photos files stay the truth) and is logged."""
    import pyarrow.parquet as pq

    try:
        with store.fs.open(store.path(rel), "rb") as f:
            return pq.read_table(f, schema=SCHEMA)
    except FileNotFoundError:
        return SCHEMA.empty_table()
    except (OSError, pa.ArrowException) as exc:
        log.warning("hash index: %s cannot be read (%s); its entries are left out", store.uri(rel), exc)
        return SCHEMA.empty_table()


def partition_of(digest: str) -> str:
    """The partition a content hash belongs to: its first ``PREFIX`` hex digits."""
    return digest[:PREFIX]


def _partition_of(table: pa.Table) -> pa.Array:
    import pyarrow.compute as pc

    return pc.utf8_slice_codeunits(table["content_hash"], 0, PREFIX)


def _concat(tables: Iterable[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


class HashIndex:
    """content hash -> the first photo_id with those bytes: committed ones (of shards in ``tokens``) first, then
    this run's, in the order they are asked for. ``setdefault`` is a dict's: duplicate marking works on either.

    "First" among committed entries is the order a reader of the photos files meets them: by shard id, then
    photo_id. A partition is read the first time one of its hashes is asked for; pickled (to a Ray actor), it
    carries the output's store and the tokens, not what it has read."""

    def __init__(self, store: "Store", tokens: dict[str, str]):
        self.store, self.tokens = store, tokens
        self._deltas: dict[str, pa.Table] | None = None  # partition -> valid delta entries
        self._partitions: dict[str, _Partition] = {}
        self._valid = _Valid(tokens)

    def __getstate__(self):
        return {"store": self.store, "tokens": self.tokens}

    def __setstate__(self, state):
        self.__init__(state["store"], state["tokens"])

    def setdefault(self, digest: str, photo_id: str) -> str:
        prefix = partition_of(digest)
        partition = self._partitions.get(prefix)
        if partition is None:
            partition = self._partitions[prefix] = self._load(prefix)
        return partition.setdefault(digest, photo_id)

    def setdefault_many(self, pairs: "Sequence[tuple[str, str]]") -> list[str]:
        """``setdefault`` of each (digest, photo_id) in turn: a batch's lookups in one call (one message, where the
        partitions live in another process)."""
        return [self.setdefault(digest, photo_id) for digest, photo_id in pairs]

    @property
    def partitions_read(self) -> int:
        return len(self._partitions)

    def _load(self, prefix: str) -> "_Partition":
        import pyarrow.compute as pc

        valid = self._valid
        if self._deltas is None:
            names = (n for n in self.store.list(DELTAS, ".parquet") if (d := delta_of(n)) and
                     self.tokens.get(d[0]) == d[1])
            deltas = _concat(valid(_read(self.store, f"{DELTAS}/{n}")) for n in names)
            self._deltas = {}
            if deltas.num_rows:
                by = _partition_of(deltas)
                for p in set(by.to_pylist()):
                    self._deltas[p] = deltas.filter(pc.equal(by, p))
        files = [f"{HASHES}/{prefix}/{n}" for n in self.store.list(f"{HASHES}/{prefix}", ".parquet")
                 if _PART_NAME.match(n)]
        # Checked once for the whole partition: a lookup table of the committed shards is built per call.
        table = valid(_concat([self._deltas.get(prefix, SCHEMA.empty_table()),
                               *(_read(self.store, rel) for rel in files)]))
        order = pc.sort_indices(table, sort_keys=[("shard", "ascending"), ("photo_id", "ascending")])
        partition = _Partition(table["content_hash"].take(order), table["photo_id"].take(order))
        del table, order
        pa.default_memory_pool().release_unused()  # the files' Arrow buffers: only the arrays stay resident
        return partition


class _Partition:
    """One partition's first copies, ``setdefault`` like a dict's. The committed entries are sorted numpy arrays:
    the hash's first 16 bytes and the photo id's 8 (24 bytes an entry, where a dict of their strings takes about
    400); this run's new entries wait in a dict and are folded in every ``FOLD``. Two different sha256 hashes that
    share 128 bits are taken for the same bytes: at 10^11 photos, a chance of about 10^-17."""

    FOLD = 256  # this run's entries a partition keeps as strings: at most 256 x 256 of them in all

    def __init__(self, digests: "list[str] | pa.ChunkedArray", photo_ids: "list[str] | pa.ChunkedArray"):
        """``digests`` with their ``photo_ids`` (lists, or an index file's Arrow columns, decoded without making a
        string of each), the first of each digest counting (committed order)."""
        hi, lo = _digest_keys(digests)
        order = np.lexsort((lo, hi))  # stable: of equal hashes, the first listed stays first
        hi, lo = hi[order], lo[order]
        first = np.ones(len(hi), bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        self.hi, self.lo = hi[first], lo[first]
        self.ids = _packed_ids(photo_ids)[order[first]]
        self.added: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.hi) + len(self.added)

    def setdefault(self, digest: str, photo_id: str) -> str:
        added = self.added.get(digest)
        if added is not None:
            return added
        key = _digest16(digest)
        hi, lo = np.uint64(int.from_bytes(key[:8], "big")), np.uint64(int.from_bytes(key[8:], "big"))
        i = int(np.searchsorted(self.hi, hi))
        while i < len(self.hi) and self.hi[i] == hi:
            if self.lo[i] == lo:
                found = self.ids[i]
                return found if isinstance(found, str) else f"{int(found):016x}"
            i += 1
        self.added[digest] = photo_id
        if len(self.added) >= self.FOLD:
            self._fold()
        return photo_id

    def _fold(self) -> None:
        hi, lo = _digest_keys(list(self.added))
        ids = _packed_ids(list(self.added.values()))
        if ids.dtype != self.ids.dtype:
            ids, self.ids = _as_strings(ids), _as_strings(self.ids)
        hi, lo, ids = (np.concatenate(pair) for pair in ((self.hi, hi), (self.lo, lo), (self.ids, ids)))
        order = np.lexsort((lo, hi))
        self.hi, self.lo, self.ids = hi[order], lo[order], ids[order]
        self.added = {}


def _digest16(digest: str) -> bytes:
    """The first 16 bytes of a sha256 hex digest (of any other string: the first 16 of its own sha256)."""
    if len(digest) == 64 and _HEX.match(digest):
        return bytes.fromhex(digest[:32])
    return hashlib.sha256(digest.encode()).digest()[:16]


def _digest_keys(digests: "list[str] | pa.ChunkedArray") -> tuple[np.ndarray, np.ndarray]:
    """Each digest's 16 bytes (:func:`_digest16`) as two uint64 columns."""
    if not isinstance(digests, list):
        words = _hex_words(digests, 64, 2)  # every one a sha256 hex digest, as intake writes them
        if words is not None:
            return words[:, 0].copy(), words[:, 1].copy()
        digests = digests.to_pylist()
    packed = np.frombuffer(b"".join(map(_digest16, digests)), ">u8").astype(np.uint64).reshape(-1, 2)
    return packed[:, 0].copy(), packed[:, 1].copy()


def _packed_ids(photo_ids: "list[str] | pa.ChunkedArray") -> np.ndarray:
    """Photo ids as uint64 where every one is 16 lowercase hex digits (as colortrend writes them), else as strings."""
    if not isinstance(photo_ids, list):
        words = _hex_words(photo_ids, 16, 1)
        if words is not None:
            return words[:, 0].copy()
        photo_ids = photo_ids.to_pylist()
    joined = "".join(photo_ids)
    if all(len(pid) == 16 for pid in photo_ids) and _HEX.match(joined):
        return np.frombuffer(bytes.fromhex(joined), ">u8").astype(np.uint64)
    return np.array(photo_ids, dtype=object)


def _hex_words(column: "pa.ChunkedArray | pa.Array", chars: int, words: int) -> np.ndarray | None:
    """The first ``words`` 64-bit words of each value, read from the string column's own buffer, where every value
    is exactly ``chars`` lowercase hex digits; None where one is not (or is null)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count or not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        return None
    if not len(array):
        return np.zeros((0, words), np.uint64)
    width = np.int64 if pa.types.is_large_string(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], width)[array.offset:array.offset + len(array) + 1]
    if not (np.diff(offsets) == chars).all():
        return None
    text = np.frombuffer(array.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
    if ((text >= ord("A")) & (text <= ord("F"))).any():  # fromhex takes upper case too; these are not ours
        return None
    try:
        raw = bytes.fromhex(text.tobytes().decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if len(raw) * 2 != len(text):  # (fromhex skips spaces between digit pairs)
        return None
    packed = np.frombuffer(raw, np.uint8).reshape(-1, chars // 2)[:, :8 * words]
    return np.ascontiguousarray(packed).view(">u8").astype(np.uint64)


def _as_strings(ids: np.ndarray) -> np.ndarray:
    return ids if ids.dtype == object else np.array([f"{int(v):016x}" for v in ids], dtype=object)


def compact(store: "Store", tokens: dict[str, str]) -> None:
    """Deltas beyond ``DELTA_LIMIT`` into partition files, then merge a partition's files tier by tier. Entries that
    no longer count are left out of what is written. Killed at any point, the entries are in the old files, the new
    ones or both (the same entries twice count once)."""
    valid = _Valid(tokens)
    names = store.list(DELTAS, ".parquet")
    deltas = [n for n in names if delta_of(n)]
    touched: set[str] = set()
    if len(deltas) > DELTA_LIMIT:
        group: list[str] = []
        rows: list[pa.Table] = []
        for i, name in enumerate(deltas):
            group.append(name)
            rows.append(valid(_read(store, f"{DELTAS}/{name}")))
            if sum(t.num_rows for t in rows) >= GROUP_ROWS or i == len(deltas) - 1:
                touched |= _write_partitions(store, _concat(rows))
                for done in group:  # only once their entries are in partition files
                    store.delete(f"{DELTAS}/{done}")
                group, rows = [], []
    for prefix in sorted(touched):
        _merge_tiers(store, prefix, valid)


def _write_partitions(store: "Store", table: pa.Table) -> set[str]:
    import pyarrow.compute as pc

    if not table.num_rows:
        return set()
    by = _partition_of(table)
    written = set()
    for prefix in sorted(pc.unique(by).to_pylist()):
        if not _PARTITION.match(prefix):
            continue  # not a hex hash: never written by intake
        _write_part(store, prefix, table.filter(pc.equal(by, prefix)))
        written.add(prefix)
    return written


def _write_part(store: "Store", prefix: str, table: pa.Table) -> None:

    table = table.sort_by([("content_hash", "ascending"), ("shard", "ascending"), ("photo_id", "ascending")])
    store.write_parquet(f"{HASHES}/{prefix}/{table.num_rows:012d}-{secrets.token_hex(8)}.parquet", table)


def _merge_tiers(store: "Store", prefix: str, valid: _Valid) -> None:
    while True:
        tiers: dict[int, list[str]] = {}
        for name in store.list(f"{HASHES}/{prefix}", ".parquet"):
            match = _PART_NAME.match(name)
            if match:
                rows = int(match.group("rows"))
                tiers.setdefault(int(math.log(max(rows, 1), FANOUT)), []).append(name)
        full = [names for _, names in sorted(tiers.items()) if len(names) >= FANOUT]
        if not full:
            return
        names = full[0]
        merged = _concat(valid(_read(store, f"{HASHES}/{prefix}/{n}")) for n in names)
        merged = merged.group_by(SCHEMA.names).aggregate([])  # the same entry twice (a killed compaction) once
        if merged.num_rows:
            _write_part(store, prefix, merged.select(SCHEMA.names))
        for name in names:
            store.delete(f"{HASHES}/{prefix}/{name}")


def clean(store: "Store", tokens: dict[str, str]) -> list[str]:
    """Recovery: delete deltas that do not count (their shard is not committed under that token) and hidden
    leftovers of killed writes. Returns what it did."""
    actions = []
    for name in store.list(DELTAS, ".parquet"):
        shard = delta_of(name)
        if shard is not None and tokens.get(shard[0]) != shard[1]:
            store.delete(f"{DELTAS}/{name}")
            actions.append(f"removed hash index of uncommitted shard {shard[0]}")
    if store.local:
        import os

        root = store.path(HASHES)
        for folder, _, files in os.walk(root):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    os.remove(os.path.join(folder, name))
                    actions.append(f"removed unfinished {os.path.relpath(os.path.join(folder, name), store.root)}")
    return actions
