"""The local runner's lanes, with steps that take random time: order kept, memory bounded, failures raised, no
thread left behind. (The real chain through it: tests/test_pipeline.py, same tables whatever the workers.)"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass

import pyarrow as pa
import pytest

from colortrend.pipeline import ShardPart, ShardTask, new_batch
from colortrend.runners.local import LocalRunner

SCHEMAS = {"photos": pa.schema([("photo_id", pa.string()), ("order", pa.int64())])}


class Step:
    def __init__(self, name, uses_accelerator=False, sees_every_photo=False, fail_on=None):
        self.name, self.uses_accelerator, self.sees_every_photo = name, uses_accelerator, sees_every_photo
        self.fail_on, self.lock, self.active, self.most_active, self.seen = fail_on, threading.Lock(), 0, 0, []

    def __call__(self, batch):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.seen.append(batch["photo_id"][0])
        time.sleep(random.uniform(0, 0.01))  # finish out of order
        with self.lock:
            self.active -= 1
        if batch["photo_id"][0] == self.fail_on:
            raise RuntimeError(f"{self.name} broke on {self.fail_on}")
        return batch


@dataclass
class Config:
    cpu_workers: int


class FakePipeline:
    """What the runner uses of a Pipeline: steps, batches, shard parts, schemas, the config."""

    def __init__(self, steps, cpu_workers, batches=40, per_shard=4):
        self.cfg, self.schemas, self._steps = Config(cpu_workers), SCHEMAS, steps
        self.stages = [type("Stage", (), {"device": "cpu"})()]
        ids = [f"p{i:03d}" for i in range(batches)]
        self.tasks = [ShardTask(f"s{s:02d}", ids[s:s + per_shard], ids[s:s + per_shard])
                      for s in range(0, batches, per_shard)]
        self.in_flight, self.most_in_flight = 0, 0

    def steps(self, seen):
        return self._steps

    def batches(self, tasks):
        for task in tasks:
            for pid in task.photo_ids:
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                batch = new_batch([pid], [pid])
                batch["shard_id"] = [task.shard_id]
                yield batch

    def shard_parts(self, batch):
        self.in_flight -= 1
        pid = batch["photo_id"][0]
        table = pa.table({"photo_id": [pid], "order": [int(pid[1:])]}, schema=SCHEMAS["photos"])
        return [ShardPart(batch["shard_id"][0], {"photos": table}, 1, {}, [])]


def chain(fail_on=None):
    return [Step("intake"), Step("duplicates", sees_every_photo=True), Step("detect", uses_accelerator=True),
            Step("align"), Step("age", uses_accelerator=True), Step("correct", fail_on=fail_on), Step("dominant")]


def threads():
    return {t for t in threading.enumerate() if t.name.startswith("colortrend-")}


@pytest.mark.parametrize("cpu_workers", [1, 4])
def test_lanes_keep_the_planned_order_where_it_matters_and_bound_the_batches_in_flight(cpu_workers):
    steps = chain()
    pipeline = FakePipeline(steps, cpu_workers)
    results = list(LocalRunner().execute(pipeline, pipeline.tasks, {}))
    # Shards come out whole and in planned order, each with its photos in order.
    assert [r.shard_id for r in results] == [t.shard_id for t in pipeline.tasks]
    for result, task in zip(results, pipeline.tasks):
        assert sorted(result.tables["photos"]["photo_id"].to_pylist()) == task.photo_ids
    ordered = [f"p{i:03d}" for i in range(40)]
    assert steps[1].seen == ordered and steps[1].most_active == 1  # the duplicate rule's order, one at a time
    assert steps[2].most_active == 1 and steps[4].most_active == 1  # one thread owns the device
    assert max(steps[5].most_active, steps[6].most_active) <= cpu_workers
    assert pipeline.most_in_flight <= 3 + cpu_workers + 1  # one batch per worker, and the one being planned
    assert not threads()


def test_a_failing_step_stops_the_run_with_its_error_and_leaves_no_thread():
    pipeline = FakePipeline(chain(fail_on="p013"), cpu_workers=2)
    done = []
    with pytest.raises(RuntimeError, match="correct broke on p013"):
        for result in LocalRunner().execute(pipeline, pipeline.tasks, {}):
            done.append(result.shard_id)
    assert done == ["s00", "s04", "s08"]  # the shards before the failure were finished and handed over
    assert not threads()


def test_a_consumer_that_stops_early_leaves_no_thread():
    pipeline = FakePipeline(chain(), cpu_workers=2)
    results = LocalRunner().execute(pipeline, pipeline.tasks, {})
    assert next(results).shard_id == "s00"
    results.close()
    assert not threads()
