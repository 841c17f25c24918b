"""Planning: every listed file lands in exactly one shard, in planned order, with the version it was listed with;
the pending photos are held as columns and each shard's task is made when a runner takes it."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np

from colortrend.config import load_config
from colortrend.io.discover import Listed, keyed_photo_id, photo_id_for
from colortrend.io.secret import output_key
from colortrend.io.store import Store
from colortrend.pipeline import Pipeline, shard_id_for
from colortrend.plan import PlannedShards, _Pending, id_keys, plan


def planned(tmp_path, inputs: list[str], shard_size: int):
    config = tmp_path / "plan.yaml"
    config.write_text(json.dumps({"name": "plan", "input": {"paths": inputs, "year": 2016},
                                  "output": str(tmp_path / "out"), "device": "cpu", "shard_size": shard_size}))
    cfg = load_config(str(config))
    store, pipeline = Store(cfg.output), Pipeline(cfg)
    pipeline.photo_key = output_key(store, cfg.privacy.hash_paths)
    return plan(cfg, pipeline, store), pipeline


def test_every_listed_file_lands_in_one_shard_in_path_order_with_its_listed_version(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    names = [f"p{i:02d}.jpg" for i in range(17)] + [f"sub/q{i}.jpg" for i in range(5)]
    names.append(os.fsdecode(b"latin-1 \xe9t\xe9.jpg"))  # not UTF-8: kept as the bytes it is
    for i, name in enumerate(names):
        (folder / name).write_bytes(b"x" * (i + 1))
    # the sub-folder is named twice (on its own and inside its parent): its files are still planned once
    the_plan, pipeline = planned(tmp_path, [str(folder), str(folder / "sub")], shard_size=5)

    tasks = list(the_plan.tasks)
    paths = [p for task in tasks for p in task.paths]
    expected = sorted(str(folder / name) for name in names)
    assert the_plan.inputs == the_plan.tasks.photos == len(names) == len(paths)
    assert sorted(paths) == expected and len(tasks) == len(the_plan.tasks) == 5
    assert all(task.paths == sorted(task.paths) for task in tasks) and paths[0] < paths[-1]
    assert [len(task.paths) for task in tasks] == [5, 5, 5, 5, 3]
    for task in tasks:
        assert task.photo_ids == [keyed_photo_id(p, pipeline.photo_key) for p in task.paths]
        assert task.shard_id == shard_id_for(task.photo_ids) and task.replaces == []
        for path, entry in zip(task.paths, task.listed):
            st = os.stat(path)
            assert entry == Listed(path, st.st_size, st.st_mtime_ns, None)


def add_pending(pending: _Pending, rows: list[tuple[str, int]], size: int = 10) -> _Pending:
    """Pending photos (path, index of the committed shard holding it or -1), added as planning adds them."""
    chunk = [Listed(path, size + i, 1_000 + i) for i, (path, _) in enumerate(rows)]
    keys = id_keys([photo_id_for(path) for path, _ in rows])
    pending.add(chunk, keys, np.array([owner for _, owner in rows]), np.arange(len(rows)))
    return pending


def test_shards_to_redo_come_first_in_id_order_then_new_photos_never_mixed():
    shards = ["s-c", "s-a", "s-b"]  # committed shards, in the order the index read them
    rows = [("/n/4", -1), ("/c/2", 0), ("/b/3", 2), ("/n/1", -1), ("/b/1", 2), ("/c/1", 0), ("/n/3", -1),
            ("/b/2", 2), ("/n/2", -1)]
    pending = add_pending(_Pending(shards), rows)
    add_pending(pending, [("/b/2", 2), ("/n/3", -1)], size=50)  # listed again (two inputs naming the same files)
    tasks = PlannedShards(pending, shards, shard_size=2)

    got = [(task.paths, task.replaces) for task in tasks]
    assert got == [(["/b/1", "/b/2"], ["s-b"]), (["/b/3"], ["s-b"]), (["/c/1", "/c/2"], ["s-c"]),
                   (["/n/1", "/n/2"], []), (["/n/3", "/n/4"], [])]
    assert tasks.photos == 9 and tasks.new_photos == 4 and tasks.replaced == {"s-b", "s-c"}
    listed = {entry.path: entry for task in tasks for entry in task.listed}
    assert listed["/c/1"] == Listed("/c/1", 15, 1_005) and listed["/n/3"] == Listed("/n/3", 16, 1_006)


def test_nothing_pending_plans_no_shard():
    tasks = PlannedShards(_Pending(["s-a"]), ["s-a"], shard_size=4)
    assert len(tasks) == 0 and not tasks and list(tasks) == [] and tasks.photos == 0 and tasks.replaced == set()


def test_a_plan_past_the_memory_limit_spills_to_a_temporary_file_with_the_same_shards_to_redo(tmp_path):
    """Past its limit the plan goes to disk in ranges: the same photos, each once with its first listing, shards
    to redo as in memory, new photos in path order within each range of keys, and the files gone once closed."""
    shards = [f"s-{i:03d}" for i in range(40)][::-1]  # committed shards, read in no particular order
    rows = [(f"/r/{s:02d}/{p}", s) for s in range(40) for p in range(3)]
    rows += [(f"/n/{i:04d}.jpg", -1) for i in range(1000)]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    again = rows[::7]  # listed a second time, with another size: the first listing stays

    def plan_of(limit):
        pending = _Pending(shards, limit=limit)
        for start in range(0, len(rows), 50):
            add_pending(pending, rows[start:start + 50])
        add_pending(pending, again, size=10_000)
        return PlannedShards(pending, shards, shard_size=16)

    in_memory, spilled = plan_of(limit=10 ** 6), plan_of(limit=64)
    assert not in_memory.spilled and spilled.spilled
    folder = spilled._spill.folder
    assert os.listdir(folder) == ["plan.arrow"]  # the pending photos' file is gone once ordered
    memory_tasks, spilled_tasks = list(in_memory), list(spilled)
    redo = [(t.paths, t.replaces) for t in memory_tasks if t.replaces]
    assert [(t.paths, t.replaces) for t in spilled_tasks if t.replaces] == redo and len(redo) == 40
    assert [t.replaces for t in spilled_tasks[:40]] == [[s] for s in sorted(shards)]  # redone shards first
    new = [t for t in spilled_tasks if not t.replaces]
    assert all(len(t.paths) <= 16 and t.paths == sorted(t.paths) for t in new)
    assert sorted(p for t in new for p in t.paths) == [f"/n/{i:04d}.jpg" for i in range(1000)]
    assert len(new) > len([t for t in memory_tasks if not t.replaces])  # shards are cut within each range
    for tasks in (in_memory, spilled):
        assert tasks.photos == len(rows) and tasks.new_photos == 1000 and tasks.replaced == set(shards)
        listed = [entry for task in tasks for entry in task.listed]
        assert len({e.path for e in listed}) == len(rows) and max(e.size for e in listed) < 10_000
        for task in tasks:
            assert task.photo_ids == [photo_id_for(p) for p in task.paths] and task.shard_id == shard_id_for(
                task.photo_ids)
    # A Ray worker takes the shards from the pickled plan: the same tasks, read from the same file.
    assert [t.paths for t in pickle.loads(pickle.dumps(spilled))] == [t.paths for t in spilled_tasks]
    spilled.close()
    assert not os.path.exists(folder)


def test_past_the_committed_limit_planning_compares_a_range_of_keys_at_a_time_with_the_same_plan(
        tmp_path, monkeypatch):
    """Past ``COMMITTED_ROWS`` the committed photos and the listing go to a temporary file by ranges of photo keys
    and are compared a range at a time: the same plan as in memory, for every kind of photo (unchanged, new,
    changed, of a stale shard, of a shard holding a changed photo, no longer listed, listed twice), and no file
    left behind."""
    import tempfile

    import pyarrow as pa

    import colortrend.plan
    from colortrend.plan import Committed

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    names = [f"p{i:03d}.jpg" for i in range(70)] + [f"sub/q{i:02d}.jpg" for i in range(20)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(b"x" * (i + 1))
    config = tmp_path / "plan.yaml"
    config.write_text(json.dumps({"name": "plan", "input": {"paths": [str(folder), str(folder / "sub")]},
                                  "output": str(tmp_path / "out"), "device": "cpu", "shard_size": 8}))
    cfg = load_config(str(config))
    store, pipeline = Store(cfg.output), Pipeline(cfg)
    store.prepare()
    pipeline.photo_key = output_key(store, cfg.privacy.hash_paths)
    current = pipeline.fingerprints()[pipeline.stages[-1].name]
    schema = pipeline.schemas["photos"]
    committed_paths = sorted(str(folder / name) for name in names)[:60] + [str(folder / "gone.jpg")]
    for s, start in enumerate(range(0, len(committed_paths), 8)):  # 60 listed photos and one no longer listed
        paths = committed_paths[start:start + 8]
        sizes = [os.stat(p).st_size if os.path.exists(p) else 1 for p in paths]
        mtimes = [os.stat(p).st_mtime_ns if os.path.exists(p) else 1 for p in paths]
        if s == 2:
            sizes[3] += 1  # a photo replaced since: its shard is redone whole
        known = {"photo_id": [keyed_photo_id(p, pipeline.photo_key) for p in paths], "path": paths,
                 "status": ["ok"] * len(paths), "input_bytes": sizes, "input_mtime_ns": mtimes, "file_bytes": sizes}
        photos = pa.table({f.name: pa.array(known[f.name], f.type) if f.name in known else pa.nulls(len(paths), f.type)
                           for f in schema}, schema=schema)
        store.commit_shard(f"s{s:02d}", {"photos": photos}, {"fingerprint": "old" if s == 5 else current})

    def the_plan():
        made = plan(cfg, pipeline, store)
        tasks = [(t.shard_id, t.photo_ids, t.paths, t.replaces, t.listed) for t in made.tasks]
        return (made.inputs, made.stale, made.committed_photos, made.changed, made.damaged, made.index_tokens), tasks

    in_memory = the_plan()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(colortrend.plan, "COMMITTED_ROWS", 4)  # 61 committed photos in 32 ranges of keys
    monkeypatch.setattr(colortrend.plan, "LISTING_ROWS", 16)
    monkeypatch.setattr(colortrend.plan, "CHUNK", 5)
    assert Committed.read(store, store.markers(), {}).spilled
    spilled = the_plan()
    assert spilled == in_memory
    (inputs, stale, kept, changed, damaged, _), tasks = in_memory
    assert inputs == 90 and stale == ["s02", "s05"] and changed == 1 and damaged == {} and kept == 60 - 16 + 1
    redone = [t for t in tasks if t[3]]
    assert [t[3] for t in redone] == [["s02"], ["s05"]] and sum(len(t[1]) for t in redone) == 16
    assert sum(len(t[1]) for t in tasks if not t[3]) == 30  # the 30 files never committed, each once
    assert list(scratch.iterdir()) == []
