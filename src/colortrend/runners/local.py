"""In-process runner: a streaming executor over thread pools, one pool per *lane* of the pipeline's steps.

The steps (:meth:`Pipeline.steps`) fall into lanes by where they must run, and every batch flows through the lanes
in order while other batches are in the lanes before and after it:

* ``intake``: reading and decoding (its own ``decode_workers`` threads within a batch);
* ``duplicates``: the step that must see every photo in planned order: one thread;
* ``device``: the model stages, from the first that ``uses_accelerator`` to the last, and the light CPU work
  between them (align's warps): one thread owns the device, as a hop to a CPU pool and back would cost more;
* ``cpu``: the work after the models (white balance, k-means, building the tables): ``cpu_workers`` threads,
  each on a batch of its own, so the device never waits for them.

Each pool takes its batches first come, first served, in planned order, and a task waits only for the same batch
in the lane before, so the order the duplicate rule needs is kept and nothing can wait in a circle. At most one
batch per worker is in flight (memory stays bounded), and shards come out in planned order: the tables are the
same whatever the number of workers (tested).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from colortrend.config import cpu_workers
from colortrend.pipeline import FirstCopies, Pipeline, ShardAssembler, ShardResult, ShardTask, Step


@dataclass(frozen=True)
class Lane:
    name: str
    steps: tuple[Step, ...]
    workers: int


def lanes(steps: list[Step], cpu_workers: int) -> list[Lane]:
    """The steps cut into lanes (see the module docstring); every step lands in exactly one, in order."""
    on_device = [i for i, step in enumerate(steps) if step.uses_accelerator]
    first, last = (on_device[0], on_device[-1]) if on_device else (len(steps), len(steps) - 1)
    out: list[Lane] = []
    for step in steps[:first]:  # before the models: a lane per ordered step, the others sharing one between them
        if out and not step.sees_every_photo and not out[-1].steps[-1].sees_every_photo:
            out[-1] = Lane(out[-1].name, (*out[-1].steps, step), 1)
        else:
            out.append(Lane(step.name, (step,), 1))
    if on_device:
        out.append(Lane("device", tuple(steps[first:last + 1]), 1))
    out.append(Lane("cpu", tuple(steps[last + 1:]), max(1, cpu_workers)))
    return out


def _run_lane(lane: Lane, batch, upstream: Future | None, finish: Callable | None):
    if upstream is not None:
        batch = upstream.result()
    for step in lane.steps:
        batch = step(batch)
    return batch if finish is None else finish(batch)


class LocalRunner:
    def execute(self, pipeline: Pipeline, tasks: Sequence[ShardTask], seen: FirstCopies,
                progress=None) -> Iterator[ShardResult]:
        plan = lanes(pipeline.steps(seen), cpu_workers(pipeline.cfg, pipeline.stages[0].device))
        shards = ShardAssembler(pipeline.schemas, progress)
        pools = [ThreadPoolExecutor(lane.workers, thread_name_prefix=f"colortrend-{lane.name}") for lane in plan]
        window = sum(lane.workers for lane in plan)
        in_flight: deque[Future] = deque()

        def finished(future: Future) -> Iterator[ShardResult]:
            for part in future.result():
                done = shards.add(part)
                if done is not None:
                    yield done

        try:
            for batch in pipeline.batches(shards.planned(tasks)):
                future = None
                for lane, pool in zip(plan, pools):
                    finish = pipeline.shard_parts if lane is plan[-1] else None
                    future = pool.submit(_run_lane, lane, batch, future, finish)
                in_flight.append(future)
                if len(in_flight) >= window:
                    yield from finished(in_flight.popleft())
            while in_flight:
                yield from finished(in_flight.popleft())
        finally:  # a failure or a consumer that stops early: queued work is dropped, running work ends
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=True)
