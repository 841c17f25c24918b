"""Ray Data runner: the same stage objects, one actor pool per model stage, on a local or remote Ray cluster.

Photos flow as rows; each stage is a ``map_batches`` step whose actors call ``setup()`` once (CUDA stages get a
GPU each when the cluster has GPUs). Duplicate detection needs a global order, so the content hashes are computed
first and the driver decides, with the same rule as the local runner (first copy in planned order wins), which
makes the tables of both runners identical. Shards are committed on the driver as soon as all their photos are back.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
from collections import defaultdict
from typing import Iterator

from colortrend.io.fs import read_bytes
from colortrend.pipeline import Pipeline, ShardResult, ShardTask, run_isolated
from colortrend.stages.base import Batch, Stage

log = logging.getLogger(__name__)
GPU_STAGES = ("detect", "age", "segment")


class RayRunner:
    def __init__(self, address: str | None = None, actors_per_stage: int = 1):
        self.address = address
        self.actors_per_stage = actors_per_stage

    def execute(self, pipeline: Pipeline, tasks: list[ShardTask], seen: dict[str, str],
                progress=None) -> Iterator[ShardResult]:
        import pandas as pd
        import ray

        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        shard_of = {pid: t.shard_id for t in tasks for pid in t.photo_ids}
        photo_ids = [pid for t in tasks for pid in t.photo_ids]
        paths = [p for t in tasks for p in t.paths]
        # Paths travel as bytes in Arrow tables: a file name that is not UTF-8 cannot be an Arrow string.
        rows = pd.DataFrame({"photo_id": photo_ids, "path": [os.fsencode(p) for p in paths]})
        first_copy = self._first_copies(rows, seen, pipeline.cfg.input.max_bytes)
        payloads = [{"payload": _pack({"photo_id": pid, "path": path, "first_copy": first_copy.get(pid)})}
                    for pid, path in zip(photo_ids, paths)]

        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0) > 0 and pipeline.stages[1].device == "cuda"
        # Every stage holds an actor at all times (a streaming pipeline): share the CPUs among them and keep one
        # free for Ray's own tasks, or a small cluster cannot place them all and the run waits forever.
        cpus = min(1.0, max(0.05, (resources.get("CPU", 1) - 1) / (len(pipeline.stages) + 1)))
        size = pipeline.cfg.batch_size
        ds = ray.data.from_items(payloads, override_num_blocks=max(1, len(rows) // size))
        for stage in pipeline.stages:
            ds = ds.map_batches(
                StageActor,
                fn_constructor_args=(stage,),
                batch_size=size,
                batch_format="pandas",
                concurrency=self.actors_per_stage,
                num_cpus=cpus,
                num_gpus=1 if gpus and stage.name in GPU_STAGES else 0,
            )
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

    @staticmethod
    def _first_copies(rows, seen: dict[str, str], max_bytes: int) -> dict[str, str]:
        """photo_id -> photo_id of the first copy of the same bytes (committed, or earlier in planned order)."""
        import ray

        def digest(batch):
            out = []
            for path in batch["path"]:
                try:
                    data = read_bytes(os.fsdecode(path), limit=max_bytes)
                    out.append(hashlib.sha256(data).hexdigest() if len(data) <= max_bytes else None)
                except OSError:
                    out.append(None)
            batch["content_hash"] = out
            return batch

        hashed = ray.data.from_pandas(rows).map_batches(digest, batch_format="pandas").to_pandas()
        order = {pid: i for i, pid in enumerate(rows["photo_id"])}
        hashed = hashed.assign(order=hashed["photo_id"].map(order)).sort_values("order")
        first, known = {}, dict(seen)
        for pid, h in zip(hashed["photo_id"], hashed["content_hash"]):
            if h is not None:
                first[pid] = known.setdefault(h, pid)
        return first


class StageActor:
    """Holds one stage per Ray worker; its model loads once, on the first batch."""

    def __init__(self, stage: Stage):
        self.stage = stage

    def __call__(self, df):
        batch = _unpack(df)
        if self.stage.name == "intake":
            batch = self.stage(batch)
            _mark_known_duplicates(batch)
        else:
            batch = run_isolated(self.stage, batch, {})
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


def _mark_known_duplicates(batch: Batch) -> None:
    for i, (pid, first, status) in enumerate(zip(batch["photo_id"], batch["first_copy"], batch["status"])):
        if status == "ok" and first is not None and first != pid:
            batch["status"][i] = "duplicate"
            batch["duplicate_of"][i] = first
            batch["image"][i] = None


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
