"""Ray Data runner: the same stage objects, one actor pool per model stage, on a local or remote Ray cluster.

Photos flow as rows; each stage is a ``map_batches`` step whose actors call ``setup()`` once (CUDA stages get a
GPU each when the cluster has GPUs). Duplicate detection needs a global order: the dataset preserves the planned
order, and one ``DuplicateMarker`` actor right after intake applies the local runner's rule (the first copy in
planned order wins) to the hashes intake computed, so each file is read once and both runners write identical
tables. Shards are committed on the driver as soon as all their photos are back.
"""
from __future__ import annotations

import logging
import pickle
from collections import defaultdict
from typing import Iterator

from colortrend.pipeline import Pipeline, ShardResult, ShardTask, mark_duplicates, run_isolated
from colortrend.stages.base import Batch, Stage

log = logging.getLogger(__name__)
GPU_STAGES = ("detect", "age", "segment")


class RayRunner:
    def __init__(self, address: str | None = None):
        self.address = address

    def execute(self, pipeline: Pipeline, tasks: list[ShardTask], seen: dict[str, str],
                progress=None) -> Iterator[ShardResult]:
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True, configure_logging=False)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.execution_options.preserve_order = True  # the duplicate rule needs the planned order
        shard_of = {pid: t.shard_id for t in tasks for pid in t.photo_ids}
        payloads = [{"payload": _pack({"photo_id": pid, "path": path})}
                    for t in tasks for pid, path in zip(t.photo_ids, t.paths)]

        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0) > 0 and pipeline.stages[1].device == "cuda"
        # Every stage holds an actor at all times (a streaming pipeline): share the CPUs among them and keep one
        # free for Ray's own tasks, or a small cluster cannot place them all and the run waits forever.
        cpus = min(1.0, max(0.05, (resources.get("CPU", 1) - 1) / (len(pipeline.stages) + 2)))
        size = pipeline.cfg.batch_size
        ds = ray.data.from_items(payloads, override_num_blocks=max(1, len(payloads) // size))
        for stage in pipeline.stages:
            ds = ds.map_batches(
                StageActor,
                fn_constructor_args=(stage,),
                batch_size=size,
                batch_format="pandas",
                concurrency=1,
                num_cpus=cpus,
                num_gpus=1 if gpus and stage.name in GPU_STAGES else 0,
            )
            if stage.name == "intake":  # one actor sees every photo, in planned order
                ds = ds.map_batches(DuplicateMarker, fn_constructor_args=(seen,), batch_size=size,
                                    batch_format="pandas", concurrency=1, num_cpus=cpus)
        ds = ds.map_batches(TableBuilder, fn_constructor_args=(pipeline,), batch_size=size, batch_format="pandas",
                            concurrency=1, num_cpus=cpus)

        expected = defaultdict(int)
        for pid, sid in shard_of.items():
            expected[sid] += 1
        pending: dict[str, list] = defaultdict(list)
        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            for payload in batch["tables"]:
                tables, seconds, failures = payload
                for shard_id, part in _split_by_shard(tables, shard_of).items():
                    pending[shard_id].append((part, seconds, failures))
                    expected[shard_id] -= part["photos"].num_rows
                    if progress is not None:
                        progress.update(part["photos"].num_rows)
                    if expected[shard_id] == 0:
                        yield _shard_result(shard_id, pending.pop(shard_id), pipeline, shard_of)


class StageActor:
    """Holds one stage per Ray worker; its model loads once, on the first batch."""

    def __init__(self, stage: Stage):
        self.stage = stage

    def __call__(self, df):
        batch = _unpack(df)
        batch = self.stage(batch) if self.stage.name == "intake" else run_isolated(self.stage, batch, {})
        return _frame(batch)


class DuplicateMarker:
    """The content hashes seen so far (committed ones first): later copies become ``duplicate`` rows."""

    def __init__(self, seen: dict[str, str]):
        self.seen = dict(seen)

    def __call__(self, df):
        batch = _unpack(df)
        mark_duplicates(batch, self.seen)
        return _frame(batch)


class TableBuilder:
    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def __call__(self, df):
        import pandas as pd

        from colortrend.tables import build_tables

        batch = _unpack(df)
        privacy = self.pipeline.cfg.privacy
        tables = build_tables(batch, self.pipeline.schemas, privacy.salt if privacy.hash_paths else None)
        failures = [(p, path, s, e or "") for p, path, s, e in zip(
            *(tables["photos"][c].to_pylist() for c in ("photo_id", "path", "status", "error")))
            if s not in ("ok", "no_face", "duplicate")]
        return pd.DataFrame({"tables": [(tables, {}, failures)]})


# Between stages each photo travels as one pickled record: images, ragged per-face arrays and nulls pass through
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


def _split_by_shard(tables, shard_of):
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = {}
    for name, table in tables.items():
        shard = pa.array([shard_of[p] for p in table["photo_id"].to_pylist()], pa.string())
        for sid in set(shard.to_pylist()) if len(shard) else ():
            parts.setdefault(sid, {})[name] = table.filter(pc.equal(shard, sid))
    for sid in parts:
        for name, table in tables.items():
            parts[sid].setdefault(name, table.slice(0, 0))
    return parts


def _shard_result(shard_id, pieces, pipeline: Pipeline, shard_of) -> ShardResult:
    import pyarrow as pa

    tables = {name: pa.concat_tables([p[0][name] for p in pieces]) for name in pipeline.schemas}
    failures = [f for p in pieces for f in p[2] if shard_of.get(f[0]) == shard_id]
    return ShardResult(shard_id, tables, {}, failures)
