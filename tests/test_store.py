"""Shards become visible only when whole; a crash at any point is repaired; one run per output. Local disk and an
fsspec filesystem (memory) behave the same."""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
import uuid

import fsspec
import pandas as pd
import pyarrow as pa
import pytest

from colortrend.errors import LockedError
from colortrend.io.lock import RunLock
from colortrend.io.store import STAGING, Store

SCHEMA = pa.schema([pa.field("photo_id", pa.string()), pa.field("x", pa.float32())])


def shard(n: int, start: int = 0) -> dict[str, pa.Table]:
    t = pa.table({"photo_id": [f"p{i}" for i in range(start, start + n)], "x": [float(i) for i in range(n)]},
                 schema=SCHEMA)
    return {"photos": t, "faces": t, "garments": t.slice(0, 0)}


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path) -> Store:
    """An empty, prepared store on the local disk and on fsspec's in-memory filesystem."""
    if request.param == "local":
        root = str(tmp_path)
    else:
        root = f"memory://store-{uuid.uuid4().hex}"
        request.addfinalizer(lambda: fsspec.filesystem("memory").rm(root, recursive=True))
    store = Store(root)
    store.prepare()
    return store


def test_commit_is_readable_by_pandas_and_by_committed_reader(store):
    store.commit_shard("a", shard(3), {"photo_ids": ["p0", "p1", "p2"]})
    assert len(pd.read_parquet(store.uri("photos"))) == 3
    assert store.read_table("faces").num_rows == 3
    empty = store.read_table("garments", schema=SCHEMA)
    assert empty.num_rows == 0 and empty.schema.field("x").type == pa.float32()


def test_crash_before_marker_leaves_nothing_visible(store):
    # what a process killed after staging its files but before the marker leaves behind
    store.fs.pipe_file(store.path(STAGING, "photos-part-b.parquet"), b"half a file")
    assert store.list("photos") == [] and store.markers() == {}
    actions = store.recover()
    assert any("removed unfinished" in a for a in actions)
    assert store.list(STAGING) == []


def test_crash_after_marker_is_rolled_forward(store):
    store.commit_shard("c", shard(2), {"photo_ids": ["p0", "p1"]})
    # simulate a kill between the marker and the moves: put one file back into staging
    store.move("faces/part-c.parquet", f"{STAGING}/faces-part-c.parquet")
    assert store.read_table("faces").num_rows == 0
    store.recover()
    assert store.read_table("faces").num_rows == 2
    assert store.list(STAGING) == []


def test_superseded_shard_is_dropped_on_recovery(store):
    store.commit_shard("old", shard(2), {"photo_ids": ["p0", "p1"]})
    store.commit_shard("new", shard(2), {"photo_ids": ["p0", "p1"], "replaces": ["old"]})
    store.recover()  # the run died before dropping "old": the same photos must not appear twice
    assert set(store.markers()) == {"new"}
    assert len(pd.read_parquet(store.uri("photos"))) == 2


def test_file_of_a_half_dropped_shard_is_removed_on_recovery(store):
    store.commit_shard("e", shard(2), {"photo_ids": ["p0", "p1"]})
    store.delete(store.marker("e"))  # drop_shard deletes the marker first; the run died right after
    actions = store.recover()
    assert "removed uncommitted photos/part-e.parquet" in actions
    assert store.list("photos") == []


def test_marker_names_files_and_rows(store):
    store.commit_shard("d", shard(4), {"photo_ids": []})
    marker = store.read_json("_markers/d.json")
    assert marker["rows"] == {"photos": 4, "faces": 4, "garments": 0}
    assert marker["files"]["photos"] == "photos/part-d.parquet"


def test_lock_on_a_remote_filesystem_refuses_a_second_run_and_takes_over_a_dead_one():
    root = f"memory://lock-{uuid.uuid4().hex}"
    with RunLock(root):
        with pytest.raises(LockedError, match=f"memory:///lock-.* is in use by pid {os.getpid()}"):
            RunLock(root).acquire()
    dead = {"pid": _dead_pid(), "host": socket.gethostname(), "since": "2026-01-01T00:00:00"}
    fsspec.filesystem("memory").pipe_file(f"{root}/_lock", json.dumps(dead).encode())
    with RunLock(root) as lock:
        assert lock.held
    assert not fsspec.filesystem("memory").exists(f"{root}/_lock")


def _dead_pid() -> int:
    child = multiprocessing.get_context("fork").Process(target=int)
    child.start()
    child.join()
    return child.pid


def _hold_lock(root, ready, release):
    with RunLock(root):
        ready.set()
        release.wait(20)


def _start_holder(root) -> multiprocessing.Process:
    """Another process holding the lock of ``root`` (kill it to leave a dead run's lock)."""
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(root, ready, release))
    holder.start()
    assert ready.wait(20)
    return holder


def test_second_run_is_refused_and_dead_lock_taken_over(tmp_path):
    holder = _start_holder(tmp_path)
    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.kill()  # dies without releasing: its lock file stays behind
    holder.join()
    assert (tmp_path / "_lock").exists()
    with RunLock(tmp_path) as lock:
        assert lock.held
    assert not (tmp_path / "_lock").exists()


def _contend(root, holders, start, wins, overlaps):
    start.wait(20)
    try:
        with RunLock(root):
            with holders.get_lock():
                holders.value += 1
                if holders.value > 1:
                    overlaps.value += 1
            time.sleep(0.01)
            with holders.get_lock():
                holders.value -= 1
            with wins.get_lock():
                wins.value += 1
    except LockedError:
        pass


def test_contenders_never_hold_the_lock_together(tmp_path):
    # Six runs started at once, many times, half of them finding a dead run's lock: never two holders.
    ctx = multiprocessing.get_context("fork")
    overlaps = ctx.Value("i", 0)
    for trial in range(40):
        root = tmp_path / f"t{trial}"
        root.mkdir()
        if trial % 2:  # a dead run's lock is left behind
            (root / "_lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
        holders, wins, start = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Event()
        procs = [ctx.Process(target=_contend, args=(root, holders, start, wins, overlaps)) for _ in range(6)]
        for proc in procs:
            proc.start()
        start.set()
        for proc in procs:
            proc.join(30)
        assert wins.value >= 1
        assert not (root / "_lock").exists()  # released by whoever held it last
    assert overlaps.value == 0


def test_status_sees_a_live_holder_and_not_a_dead_one(tmp_path):
    holder = _start_holder(tmp_path)
    assert RunLock(tmp_path).live_holder()["pid"] == holder.pid
    holder.kill()  # killed: its lock file stays, its flock does not
    holder.join()
    assert (tmp_path / "_lock").exists() and RunLock(tmp_path).live_holder() is None


# ---- The content-hash index ---------------------------------------------------------------------------------------
def analysed(shard_no: int, digests: list[str], statuses: list[str] | None = None) -> dict[str, pa.Table]:
    """A shard's photos rows as a run commits them: an id, a content hash and a status per photo."""
    ids = [f"{shard_no:04d}{i:012d}" for i in range(len(digests))]
    photos = pa.table({"photo_id": ids, "content_hash": digests,
                       "status": statuses or ["ok"] * len(digests)})
    return {"photos": photos}


def first_copies(store: Store) -> dict[str, str]:
    """What duplicate marking must find: the first analysed photo of each hash, reading every photos file."""
    first = {}
    for _, photos in store.iter_table("photos"):
        for pid, digest, status in zip(*(photos[c].to_pylist() for c in ("photo_id", "content_hash", "status"))):
            if status in ("ok", "no_face"):
                first.setdefault(digest, pid)
    return first


def test_hash_index_after_compactions_replacements_and_drops_answers_as_the_photos_files(store, monkeypatch):
    import random

    from colortrend.io import hash_index
    from colortrend.io.hash_index import HashIndex

    monkeypatch.setattr(hash_index, "DELTA_LIMIT", 3)
    monkeypatch.setattr(hash_index, "GROUP_ROWS", 40)
    rng = random.Random(7)
    pool = [f"{rng.getrandbits(256):064x}" for _ in range(300)]  # shards share hashes: copies across shards
    statuses = ["ok", "no_face", "duplicate", "error"]
    for s in range(30):
        shard_id = f"s{s % 24:02d}"  # the last six replace earlier shards under the same id, with other bytes
        store.commit_shard(shard_id, analysed(s, rng.sample(pool, 20), rng.choices(statuses, k=20)), {})
        if s % 7 == 6:
            store.drop_shard(f"s{s - 3:02d}")
        hash_index.compact(store, hash_index.tokens_of(store.markers()))
    tokens = hash_index.tokens_of(store.markers())
    index = HashIndex(store, tokens)
    expected = first_copies(store)
    assert {d: index.setdefault(d, "new") for d in pool} == {d: expected.get(d, "new") for d in pool}
    assert len(store.list(hash_index.DELTAS)) <= 3
    folders = [p for p in store.fs.ls(store.path(hash_index.HASHES), detail=False) if not p.endswith("delta")]
    assert folders and all(len(store.fs.ls(p)) <= 3 * 4 for p in folders)  # a few files a tier, not one a commit
    assert store.recover() == []  # nothing left over


def test_hash_index_reads_only_the_partitions_asked_for(store, monkeypatch):
    from colortrend.io import hash_index
    from colortrend.io.hash_index import HashIndex

    monkeypatch.setattr(hash_index, "DELTA_LIMIT", 0)  # every entry in its partition
    digests = [f"{p:02x}" + "0" * 62 for p in range(256)]
    for s in range(8):
        store.commit_shard(f"s{s}", analysed(s, digests[s * 32:(s + 1) * 32]), {})
    tokens = hash_index.tokens_of(store.markers())
    hash_index.compact(store, tokens)
    read = []
    real_read = hash_index._read
    monkeypatch.setattr(hash_index, "_read", lambda store, rel: read.append(rel) or real_read(store, rel))
    index = HashIndex(store, tokens)
    assert index.setdefault(digests[40], "new") == "0001000000000008"
    assert index.setdefault("ab" + "1" * 62, "new") == "new" and index.partitions_read == 2
    assert {rel.split("/")[2] for rel in read} == {"28", "ab"}  # of 256 partitions


@pytest.mark.parametrize("source", ["lists", "index file columns"])
@pytest.mark.parametrize("ids", ["colortrend", "foreign"])
def test_a_hash_partition_answers_as_a_dict_in_24_bytes_an_entry(ids, source, monkeypatch):
    """Committed first copies (any order of equal hashes: the first counts), then this run's photos, folded into
    the sorted arrays every few entries: every answer is a dict's, whether the committed entries come as lists or
    as an index file's Arrow columns (decoded from their buffers; hashes and ids of other shapes as strings)."""
    import random

    import pyarrow as pa

    from colortrend.io.hash_index import _Partition

    monkeypatch.setattr(_Partition, "FOLD", 7)
    rng = random.Random(3)
    pool = [f"{rng.getrandbits(256):064x}" for _ in range(120)] + ["not-a-sha256", "Z" * 64, "AB" * 32]
    name = (lambda i: f"{i:016x}") if ids == "colortrend" else (lambda i: f"photo-{i}")
    kinds = pool[:60] if ids == "colortrend" else pool[:60] + pool[-3:]
    committed = [(rng.choice(kinds), name(i)) for i in range(80)]  # copies among them: the first counts
    digests, photo_ids = [d for d, _ in committed], [p for _, p in committed]
    if source != "lists":
        digests, photo_ids = (pa.chunked_array([column[:30], column[30:]]) for column in (digests, photo_ids))
    partition = _Partition(digests, photo_ids)
    expected: dict[str, str] = {}
    for digest, pid in committed:
        expected.setdefault(digest, pid)
    for i in range(400):  # this run: committed bytes, new bytes, and new bytes seen again
        digest, pid = rng.choice(pool), name(1000 + i)
        assert partition.setdefault(digest, pid) == expected.setdefault(digest, pid)
    assert len(partition) == len(expected)
    if ids == "colortrend":
        held = partition.hi.nbytes + partition.lo.nbytes + partition.ids.nbytes
        assert held == 24 * len(partition.hi) and len(partition.added) < 7


# ---- What planning holds of the committed photos ------------------------------------------------------------------
def test_committed_index_is_29_bytes_a_photo_and_tells_each_kind_of_changed_file(store):
    from colortrend.io.discover import Listed
    from colortrend.plan import Committed, id_keys

    ids = [f"{i:016x}" for i in range(1000)]
    photos = pa.table({"photo_id": ids, "input_bytes": pa.array([100] * 1000, pa.int64()),
                       "input_mtime_ns": pa.array([5] * 1000, pa.int64()), "file_bytes": [100] * 1000})
    store.commit_shard("new", {"photos": photos}, {})
    old = pa.table({"photo_id": ["f" * 16, "e" * 16], "file_bytes": [70, 70]})  # before listings were recorded
    store.commit_shard("old", {"photos": old}, {})
    tagged = pa.table({"photo_id": ["d" * 16], "input_bytes": [9], "input_mtime_ns": [1], "input_etag": ['"v1"']})
    store.commit_shard("tagged", {"photos": tagged}, {})
    committed = Committed.read(store, store.markers(), {})
    [(index, _)] = committed.ranges(lambda: [], None)  # one range, in memory
    held = sum(a.nbytes for a in (index.key, index.shard, index.size, index.mtime, index.recorded, index.etag))
    assert len(index.key) == 1003 and held <= 1003 * 37  # 29 bytes, and the ETag hash once some shard has ETags
    listed = [Listed("a", 100, 5), Listed("b", 101, 5), Listed("c", 100, 6),  # same; other size; other mtime
              Listed("d", 70, 99), Listed("e", 71, 5),  # an old row: only the size intake read tells
              Listed("f", 9, 1, '"v1"'), Listed("g", 9, 1, '"v2"')]  # other ETag
    keys = id_keys([ids[3], ids[4], ids[5], "f" * 16, "e" * 16, "d" * 16, "d" * 16])
    pos, found = index.find(keys)
    assert found.all()
    assert index.changed(pos, listed).tolist() == [False, True, True, False, True, False, True]
    assert not index.find(id_keys(["0" * 15 + "x"]))[1].any()


def test_photo_keys_decoded_at_once_equal_those_keyed_one_by_one():
    import numpy as np

    from colortrend.plan import _key, id_keys

    usual = [f"{i * 0x9E3779B97F4A7C15 % 2**64:016x}" for i in range(300)]
    for ids in (usual, [*usual, "a path/not an id"], ["abcd efabcdefab1", *usual[:3]], []):
        assert id_keys(ids).tolist() == np.array([_key(pid) for pid in ids], np.uint64).tolist()
