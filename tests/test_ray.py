"""The Ray executor runs the pipeline's own steps: the same rows and stage timings as the local runner, and a Ray
instance of its own that listens on 127.0.0.1 only and leaves no process behind, whether the run ends or is killed.

Slow (a Ray instance per test): every process of a run is found by an environment variable its processes inherit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import make_hostile_corpus
from test_pipeline import assert_same_tables, write_config

import ray  # the dev extra installs Ray: without it these tests must fail, not skip


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (every process a run starts inherits it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if marker.encode() in environ and not zombie:
            found.append(int(entry))
    return found


def listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    addresses.add(_ip(fields[1].split(":")[0]))
    return addresses


def _ip(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # IPv6: four little-endian 32-bit words
    full = b"".join(words)
    if full[:12] == b"\0" * 10 + b"\xff\xff":
        return ".".join(str(b) for b in full[12:])  # IPv4-mapped
    return full.hex()


def start_run(config: Path, marker: str) -> subprocess.Popen:
    env = {**os.environ, "COLORTREND_TEST_RAY": marker}
    return subprocess.Popen([sys.executable, "-m", "colortrend.cli", "run", str(config), "--no-progress",
                             "--executor", "ray"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_until_gone(marker: str, seconds: float = 60) -> list[int]:
    deadline = time.time() + seconds
    while time.time() < deadline and processes_with(marker):
        time.sleep(0.5)
    return processes_with(marker)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, demo_photos):
    import shutil

    folder = tmp_path_factory.mktemp("ray") / "photos"
    folder.mkdir()
    for p in demo_photos[:5]:
        shutil.copy(p, folder / p.name)
    shutil.copy(demo_photos[0], folder / "a copy.jpg")  # a duplicate: the rule needs every photo in planned order
    make_hostile_corpus(folder / "hostile", demo_photos[-1])
    return folder


def test_ray_gives_the_local_rows_and_timings_and_leaves_nothing_running(photos, tmp_path):
    from colortrend.config import load_config
    from colortrend.run import run

    run(load_config(write_config(tmp_path, photos, tmp_path / "local")), progress=False)
    marker = uuid.uuid4().hex
    proc = start_run(write_config(tmp_path, photos, tmp_path / "ray", index_workers=2), marker)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert_same_tables(tmp_path / "local", tmp_path / "ray")
    stages = ["intake", "detect", "align", "age", "segment", "correct", "dominant"]
    for marker_file in (tmp_path / "ray" / "_markers").glob("*.json"):  # rounded to ms: a stage may show 0
        seconds = json.loads(marker_file.read_text())["seconds"]
        assert sorted(seconds) == sorted(stages) and seconds["intake"] > 0 and sum(seconds.values()) > 0, seconds
    assert wait_until_gone(marker, 30) == []


def test_the_index_spread_over_actors_answers_as_one_index_and_each_reads_only_its_own_partitions(tmp_path):
    import random

    from colortrend.io import hash_index
    from colortrend.io.hash_index import HashIndex
    from colortrend.io.store import Store
    from colortrend.runners.ray import RayRunner, SpreadFirstCopies, index_owners, owner_of
    from test_store import analysed

    store = Store(tmp_path / "out")
    store.prepare()
    rng = random.Random(3)
    pool = [f"{rng.getrandbits(256):064x}" for _ in range(400)]
    for s in range(12):  # committed copies across shards, some of them compacted into partition files
        store.commit_shard(f"s{s:02d}", analysed(s, rng.sample(pool, 25)), {})
    tokens = hash_index.tokens_of(store.markers())
    hash_index.compact(store, tokens)
    # A run's batches: new photos, copies of committed ones, and copies within a batch and across batches.
    asked = [(rng.choice(pool) if rng.random() < 0.5 else f"{rng.getrandbits(256):064x}", f"new{i:04d}")
             for i in range(300)]
    asked += [(digest, f"again{i:04d}") for i, (digest, _) in enumerate(asked[:40])]
    batches = [asked[i:i + 16] for i in range(0, len(asked), 16)]
    one = HashIndex(store, dict(tokens))
    expected = [one.setdefault_many(batch) for batch in batches]
    _, started = RayRunner()._connect()  # a local instance on 127.0.0.1, as a run starts one
    try:
        owners = index_owners(ray, HashIndex(store, dict(tokens)), 3)
        spread = SpreadFirstCopies(owners)
        assert [spread.setdefault_many(batch) for batch in batches] == expected
        read = ray.get([owner.partitions_read.remote() for owner in owners])
        touched = {hash_index.partition_of(d) for d, _ in asked}
        assert sum(read) == one.partitions_read == len(touched)  # each partition read once, by its owner
        assert read == [len({p for p in touched if owner_of(p, 3) == k}) for k in range(3)]
    finally:
        if started:
            ray.shutdown()


def test_a_killed_ray_run_leaves_no_process_and_listened_on_loopback_only(photos, tmp_path):
    marker = uuid.uuid4().hex
    proc = start_run(write_config(tmp_path, photos, tmp_path / "killed", shard_size=2, batch_size=2), marker)
    deadline, addresses = time.time() + 300, set()
    markers = tmp_path / "killed" / "_markers"
    while time.time() < deadline and proc.poll() is None and not list(markers.glob("*.json")):
        addresses |= listening_addresses(processes_with(marker))
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be killed"
    addresses |= listening_addresses(processes_with(marker))
    assert len(processes_with(marker)) > 1  # the driver and Ray's own processes
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert addresses and addresses <= {"127.0.0.1"}, addresses
    # Ray's server processes die with the driver; its two agent processes notice their raylet's death on their own
    # polling (measured here: gone within about a minute).
    left = wait_until_gone(marker, 150)
    for pid in left:  # clean up after a failure, then report it
        os.kill(pid, signal.SIGKILL)
    assert left == []


def test_model_steps_get_several_processes_on_each_gpu_and_one_on_cpus(tmp_path):
    # Placement only (no GPU here): one process's host work cannot keep a GPU busy, so each GPU gets gpu_workers
    # actors of every model step, each a share of it; duplicate marking stays one actor in planned order.
    import dataclasses

    from colortrend.config import default_config, gpu_workers
    from colortrend.pipeline import Pipeline
    from colortrend.runners.ray import placement

    cfg = dataclasses.replace(default_config(str(tmp_path), device="cpu"), gpu_workers=4)
    steps = {step.name: step for step in Pipeline(cfg).steps({})}
    assert placement(steps["detect"], gpus=2, per_gpu=gpu_workers(cfg, 8.0), cpu_workers=3) == (8, 0.25)
    assert placement(steps["detect"], gpus=0, per_gpu=1, cpu_workers=3) == (1, 0.0)
    assert placement(steps["correct"], gpus=2, per_gpu=4, cpu_workers=3) == (3, 0.0)
    duplicates = [step for step in steps.values() if step.sees_every_photo]
    assert len(duplicates) == 1 and placement(duplicates[0], gpus=2, per_gpu=4, cpu_workers=3) == (1, 0.0)
    default = default_config(str(tmp_path), device="cpu")
    assert gpu_workers(default, cores_per_gpu=16.0) == 8 and gpu_workers(default, cores_per_gpu=1.0) == 1
