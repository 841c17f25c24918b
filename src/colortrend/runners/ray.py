"""Ray Data runner: the pipeline's own steps, each a ``map_batches`` actor pool, on a local or remote Ray cluster.

The steps, their order and the shard tables are the pipeline's (:meth:`Pipeline.steps`, :meth:`Pipeline.shard_parts`,
:class:`ShardAssembler`): this module only places them. A step that must see every photo in planned order
(duplicate marking) gets one actor and the dataset keeps the planned order, while the content-hash index it asks
lives in ``index_workers`` actors of its own, each holding the partitions of its share of the hashes; a step that
``uses_accelerator`` gets ``gpu_workers`` actors per GPU, each holding its own models and a share of its GPU, when
the cluster has GPUs and the run's device is CUDA (one process's host work cannot keep a GPU busy; one actor on
CPUs, which the models fill); every other step gets ``cpu_workers`` actors. The dataset starts from the planned
shards' indices and a worker turns each into its photos' records, so the driver holds only the shards in flight,
whatever the run's size; shards are committed on the driver as soon as all their photos are back.

Without ``--address`` the runner starts a Ray instance of its own for the run: every Ray server listens on
127.0.0.1 only, no dashboard, and it is shut down when the run ends. Ray starts its processes bound to the
driver's life (Linux ``PR_SET_PDEATHSIG``), so a killed run leaves none behind either.
"""
from __future__ import annotations

import inspect
import logging
import os
import pickle
from typing import Iterator, Sequence

from colortrend.config import cpu_workers, gpu_workers, index_workers
from colortrend.io.hash_index import partition_of
from colortrend.pipeline import FirstCopies, Pipeline, ShardAssembler, ShardResult, ShardTask, Step, first_copies
from colortrend.stages.base import Batch

log = logging.getLogger(__name__)
#: Ray's own switch for a single-machine instance: its servers bind the loopback address, not every interface.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: Blocks the planned shards' indices are cut into (a block per shard would cost the driver one object each).
INDEX_BLOCKS = 256


class RayRunner:
    def __init__(self, address: str | None = None):
        self.address = address

    def execute(self, pipeline: Pipeline, tasks: Sequence[ShardTask], seen: FirstCopies,
                progress=None) -> Iterator[ShardResult]:
        ray, started = self._connect()
        owners = []
        try:
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            owners = index_owners(ray, seen, index_workers(pipeline.cfg, nodes))
            yield from self._execute(ray, pipeline, tasks, SpreadFirstCopies(owners), progress)
        finally:
            for owner in owners:  # on a cluster of the user's, the actors would otherwise outlive the run
                ray.kill(owner)
            if started:
                ray.shutdown()

    def _connect(self):
        """Ray, connected to ``address`` or to a new local instance on 127.0.0.1, and whether this run started it
        (a process already connected stays as it is)."""
        if self.address is None:
            os.environ.update(LOOPBACK_ONLY)  # before Ray is imported: it reads the switch once, at import
        import ray

        if ray.is_initialized():
            return ray, False
        options = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if self.address is not None:
            ray.init(address=self.address, **options)
            return ray, False
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False  # the same switch, where Ray was imported before this run
        ray.init(address="local", _node_ip_address="127.0.0.1", **options)
        return ray, True

    def _execute(self, ray, pipeline: Pipeline, tasks: Sequence[ShardTask], seen: FirstCopies,
                 progress) -> Iterator[ShardResult]:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True  # the duplicate rule needs the planned order
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if pipeline.stages[0].device == "cuda" else 0
        steps = pipeline.steps(seen)
        workers = cpu_workers(pipeline.cfg, pipeline.stages[0].device)
        per_gpu = gpu_workers(pipeline.cfg, resources.get("CPU", 1) / gpus) if gpus else 1
        # Every step holds an actor at all times (a streaming pipeline): share the CPUs among them and keep one
        # free for Ray's own tasks, or a small cluster cannot place them all and the run waits forever.
        cpus = min(1.0, max(0.05, (resources.get("CPU", 1) - 1) / (len(steps) + 3)))
        size = pipeline.cfg.batch_size
        # The driver holds no record: each block is one shard's index, turned into its photos' records by a worker
        # from the plan (put in Ray's object store once), so the driver's memory does not grow with the run.
        ds = ray.data.range(len(tasks), override_num_blocks=min(len(tasks), INDEX_BLOCKS))
        ds = ds.map_batches(TaskRecords, fn_constructor_args=(pipeline, tasks), batch_size=1, batch_format="pandas",
                            concurrency=1, num_cpus=cpus, **on_driver_node(ray, ds.map_batches))
        for step in steps:
            actors, gpu_share = placement(step, gpus, per_gpu, workers)
            ds = ds.map_batches(StepActor, fn_constructor_args=(step,), batch_size=size, batch_format="pandas",
                                concurrency=actors, num_cpus=cpus, num_gpus=gpu_share)
        ds = ds.map_batches(PartsActor, fn_constructor_args=(pipeline,), batch_size=size, batch_format="pandas",
                            concurrency=1, num_cpus=cpus)
        shards = ShardAssembler(pipeline.schemas, progress)
        planned = shards.planned(tasks)
        for frame in ds.iter_batches(batch_format="pandas", batch_size=None):
            for blob in frame["part"]:
                part = pickle.loads(blob)
                while part.shard_id not in shards.missing:  # parts come in planned order: it is the next task's
                    next(planned)
                done = shards.add(part)
                if done is not None:
                    yield done


def on_driver_node(ray, map_batches) -> dict:
    """``map_batches`` options that keep its workers on the driver's machine, where a plan too large for memory is
    a file: Ray's node-id label where ``map_batches`` takes a label selector (its remote arguments are deprecated
    there), else a node-affinity strategy."""
    node = ray.get_runtime_context().get_node_id()
    if "label_selector" in inspect.signature(map_batches).parameters:
        return {"label_selector": {"ray.io/node-id": node}}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}


def placement(step: Step, gpus: int, per_gpu: int, cpu_workers: int) -> tuple[int, float]:
    """A step's actors and the share of a GPU each takes: one actor where it must see every photo in order,
    ``per_gpu`` on each of ``gpus`` GPUs for a model step (one on CPUs, where each would hold its own copy of the
    models on the same cores), ``cpu_workers`` for the rest."""
    if step.sees_every_photo:
        return 1, 0.0
    if step.uses_accelerator:
        return (gpus * per_gpu, 1.0 / per_gpu) if gpus else (1, 0.0)
    return max(1, cpu_workers), 0.0


def index_owners(ray, seen: FirstCopies, count: int) -> list:
    """``count`` actors, each holding a copy of ``seen`` (the output's index reads its partitions when first asked:
    each actor only those of its own share). On the driver's node where the output is a local folder; spread over
    the nodes otherwise."""
    store = getattr(seen, "store", None)
    if store is not None and store.local:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        where = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    else:
        where = "SPREAD"
    actor = ray.remote(IndexPartitions).options(num_cpus=0, scheduling_strategy=where)
    return [actor.remote(seen) for _ in range(count)]


class IndexPartitions:
    """One actor's share of the first copies (a copy of the run's ``FirstCopies``, asked only about its hashes)."""

    def __init__(self, seen: FirstCopies):
        self.seen = seen

    def setdefault_many(self, pairs: list[tuple[str, str]]) -> list[str]:
        return first_copies(self.seen, pairs)

    def partitions_read(self) -> int | None:
        return getattr(self.seen, "partitions_read", None)


class SpreadFirstCopies:
    """First copies whose hashes live in ``owners`` (actors), a hash with the owner of its partition: a batch asks
    each owner once, all in flight at a time. The planned order holds, since the one duplicate step asks batch after
    batch and each owner answers its pairs in the order given."""

    def __init__(self, owners: list):
        self.owners = owners

    def setdefault(self, digest: str, photo_id: str) -> str:
        return self.setdefault_many([(digest, photo_id)])[0]

    def setdefault_many(self, pairs: list[tuple[str, str]]) -> list[str]:
        import ray

        asked: dict[int, list[int]] = {}
        for i, (digest, _) in enumerate(pairs):
            asked.setdefault(owner_of(digest, len(self.owners)), []).append(i)
        replies = [self.owners[k].setdefault_many.remote([pairs[i] for i in rows]) for k, rows in asked.items()]
        firsts: list[str] = [""] * len(pairs)
        for rows, answers in zip(asked.values(), ray.get(replies)):
            for i, first in zip(rows, answers):
                firsts[i] = first
        return firsts


def owner_of(digest: str, owners: int) -> int:
    """Which of ``owners`` holds the partition of ``digest``: its hex digits modulo the owners (256 partitions
    spread evenly), a checksum of them for a hash that is not hex."""
    prefix = partition_of(digest)
    try:
        return int(prefix, 16) % owners
    except ValueError:
        import zlib

        return zlib.crc32(prefix.encode()) % owners


class TaskRecords:
    """Each planned shard's photos as the records the steps take, made on a worker from the shard's index."""

    def __init__(self, pipeline: Pipeline, tasks: Sequence[ShardTask]):
        self.pipeline, self.tasks = pipeline, tasks

    def __call__(self, df):
        import pandas as pd

        records = [_pack({k: v[i] for k, v in batch.items()})
                   for index in df["id"] for batch in self.pipeline.batches([self.tasks[int(index)]])
                   for i in range(len(batch["path"]))]
        return pd.DataFrame({"payload": records})


class StepActor:
    """Holds one step per Ray worker (a stage's model loads once, on its first batch)."""

    def __init__(self, step: Step):
        self.step = step

    def __call__(self, df):
        return _frame(self.step(_unpack(df)))


class PartsActor:
    """The pipeline's shard parts of each analysed batch, pickled for the driver."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def __call__(self, df):
        import pandas as pd

        parts = self.pipeline.shard_parts(_unpack(df))
        return pd.DataFrame({"part": [pickle.dumps(p, protocol=pickle.HIGHEST_PROTOCOL) for p in parts]})


# Between steps each photo travels as one pickled record: images, ragged per-face arrays and nulls pass through
# Ray's Arrow blocks untouched (pandas/Arrow conversion would turn None into NaN and ragged arrays into errors).
def _pack(record: dict) -> bytes:
    return pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)


def _unpack(df) -> Batch:
    records = [pickle.loads(b) for b in df["payload"]]
    keys = list(dict.fromkeys(k for r in records for k in r))
    return {k: [r.get(k) for r in records] for k in keys}


def _frame(batch: Batch):
    import pandas as pd

    n = len(batch["photo_id"])
    return pd.DataFrame({"payload": [_pack({k: v[i] for k, v in batch.items()}) for i in range(n)]})
