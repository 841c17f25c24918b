"""Shards become visible only when whole; a crash at any point is repaired; one run per output folder."""
from __future__ import annotations

import json
import multiprocessing
import os

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


def test_commit_is_readable_by_pandas_and_by_committed_reader(tmp_path):
    store = Store(tmp_path)
    store.prepare()
    store.commit_shard("a", shard(3), {"photo_ids": ["p0", "p1", "p2"]})
    assert len(pd.read_parquet(tmp_path / "photos")) == 3
    assert store.read_table("faces").num_rows == 3
    empty = store.read_table("garments", schema=SCHEMA)
    assert empty.num_rows == 0 and empty.schema.field("x").type == pa.float32()


def test_crash_before_marker_leaves_nothing_visible(tmp_path):
    store = Store(tmp_path)
    store.prepare()
    # what a process killed after staging its files but before the marker leaves behind
    (tmp_path / STAGING / "photos-part-b.parquet").write_bytes(b"half a file")
    assert list((tmp_path / "photos").glob("*.parquet")) == []
    actions = store.recover()
    assert any("removed unfinished" in a for a in actions)
    assert list((tmp_path / STAGING).iterdir()) == []


def test_crash_after_marker_is_rolled_forward(tmp_path):
    store = Store(tmp_path)
    store.prepare()
    store.commit_shard("c", shard(2), {"photo_ids": ["p0", "p1"]})
    # simulate a kill between the marker and the moves: put one file back into staging
    os.replace(tmp_path / "faces" / "part-c.parquet", tmp_path / STAGING / "faces-part-c.parquet")
    store.recover()
    assert store.read_table("faces").num_rows == 2


def test_superseded_shard_is_dropped_on_recovery(tmp_path):
    store = Store(tmp_path)
    store.prepare()
    store.commit_shard("old", shard(2), {"photo_ids": ["p0", "p1"]})
    store.commit_shard("new", shard(2), {"photo_ids": ["p0", "p1"], "replaces": ["old"]})
    store.recover()  # the run died before dropping "old": the same photos must not appear twice
    assert set(store.markers()) == {"new"}
    assert len(pd.read_parquet(tmp_path / "photos")) == 2


def test_marker_names_files_and_rows(tmp_path):
    store = Store(tmp_path)
    store.prepare()
    store.commit_shard("d", shard(4), {"photo_ids": []})
    marker = json.loads((tmp_path / "_markers" / "d.json").read_text())
    assert marker["rows"] == {"photos": 4, "faces": 4, "garments": 0}
    assert marker["files"]["photos"] == "photos/part-d.parquet"


def _hold_lock(root, ready, release):
    with RunLock(root):
        ready.set()
        release.wait(20)


def test_second_run_is_refused_and_dead_lock_taken_over(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    assert ready.wait(20)
    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.kill()  # dies without releasing: its lock file stays behind
    holder.join()
    assert (tmp_path / "_lock").exists()
    with RunLock(tmp_path) as lock:
        assert lock.held
    assert not (tmp_path / "_lock").exists()
