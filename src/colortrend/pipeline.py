"""The per-photo chain: which stages run, in what order, and how one shard of photos goes through them.

Everything here is shared by every runner: planning (what is new or stale), duplicate detection, per-photo error
isolation, stage timings and building the shard tables. Runners only decide where ``analyse_shard`` runs.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow as pa

from colortrend.config import Config
from colortrend.stages.base import Batch, Stage, fail
from colortrend.tables import build_tables, table_schemas

log = logging.getLogger(__name__)
#: The columns a chain starts from: what planning knows of each photo.
INPUT_COLUMNS = ("photo_id", "path")


class ChainError(ValueError):
    """A chain whose stages do not fit together: a stage reads a column no earlier stage adds."""


@dataclass
class ShardTask:
    """A unit of work and of commit: photos analysed together and written as one shard of each table."""

    shard_id: str
    photo_ids: list[str]
    paths: list[str]
    replaces: list[str] = field(default_factory=list)  # stale shards this one supersedes once committed


@dataclass
class ShardResult:
    shard_id: str
    tables: dict[str, pa.Table]
    seconds: dict[str, float] = field(default_factory=dict)
    failures: list[tuple[str, str, str, str]] = field(default_factory=list)  # photo_id, path, status, error


def build_stages(cfg: Config, device: str, upto: str | tuple[str, ...] | None = None) -> list[Stage]:
    """The chain, in order, with ``cfg``'s settings; ``upto`` (stage names): only those stages and the stages they
    need, for commands that stop part-way (``eval``, ``train``). Importing a stage module is cheap: models load in
    ``setup()``."""
    from colortrend.stages.age import AgeStage
    from colortrend.stages.align import AlignStage
    from colortrend.stages.correct import CorrectStage
    from colortrend.stages.detect import DetectStage
    from colortrend.stages.dominant import DominantStage
    from colortrend.stages.intake import IntakeStage
    from colortrend.stages.segment import SegmentStage

    stages: list[Stage] = [
        IntakeStage(cfg.input, device, workers=cfg.decode_workers),
        DetectStage(cfg.detect, device),
        AlignStage(cfg.align, device),
        AgeStage(cfg.age, device),
        SegmentStage(cfg.segment, device),
        CorrectStage(cfg.color, device),
        DominantStage(cfg.color, device),
    ]
    return check_chain(stages if upto is None else needed_by(stages, (upto,) if isinstance(upto, str) else upto))


def needed_by(stages: list[Stage], targets: tuple[str, ...]) -> list[Stage]:
    """The ``targets`` and the stages they need, in chain order: each earlier stage that adds a column read by a
    target or by another stage they need (``segment`` needs ``detect`` and ``intake``, not ``align`` or ``age``)."""
    names = [s.name for s in stages]
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ValueError(f"no stage named {unknown[0]!r} (stages: {', '.join(names)})")
    needed: list[Stage] = []
    reads: set[str] = set()
    for stage in reversed(stages):
        if stage.name in targets or reads & set(stage.provides()):
            needed.append(stage)
            reads |= set(stage.reads)
    return needed[::-1]


def new_batch(paths: list[str], photo_ids: list[str] | None = None) -> Batch:
    """The batch a chain starts from (photo ids default to the paths)."""
    return {"photo_id": list(paths if photo_ids is None else photo_ids), "path": list(paths)}


def run_chain(stages: list[Stage], batch: Batch, seconds: dict[str, float] | None = None) -> Batch:
    """``batch`` through ``stages`` as a run analyses it, photo errors isolated, outside any run (``eval``,
    ``train``, ``explain``): no duplicate marking, no tables."""
    for stage in stages:
        batch = run_isolated(stage, batch, {} if seconds is None else seconds)
    return batch


def check_chain(stages: list[Stage], given: tuple[str, ...] = INPUT_COLUMNS) -> list[Stage]:
    """``stages``, once every column each one reads is in ``given`` or added by an earlier stage; else ChainError."""
    available = set(given)
    for stage in stages:
        missing = [column for column in stage.reads if column not in available]
        if missing:
            chain = " -> ".join(s.name for s in stages)
            raise ChainError(f"stage {stage.name} reads {', '.join(missing)}, which no stage before it adds "
                             f"(chain: {chain})")
        available.update(stage.provides())
    return stages


class Pipeline:
    def __init__(self, cfg: Config, device: str = "cpu"):
        self.cfg = cfg
        self.stages = build_stages(cfg, device)
        self.schemas = table_schemas(self.stages)

    def check_models(self) -> None:
        """Every weight file the chain needs exists (a wrong ``weights:`` path is a config error, found early)."""
        from colortrend.errors import ConfigError

        for stage in self.stages:
            try:
                stage.model_files()
            except FileNotFoundError as exc:
                raise ConfigError(str(exc).strip("'\"")) from None

    # ---- identity of the work -----------------------------------------------------------------------------------
    def fingerprints(self) -> dict[str, str]:
        """Per stage, a hash of its settings and model *and of every stage before it*: a change reruns downstream."""
        chain, out = hashlib.sha256(), {}
        for stage in self.stages:
            chain.update(stage.fingerprint().encode())
            out[stage.name] = chain.hexdigest()[:16]
        return out

    def model_checksums(self) -> dict[str, str]:
        from colortrend.models import file_checksum

        return {f"{s.name}:{p.rsplit('/', 1)[-1]}": file_checksum(p) for s in self.stages for p in s.model_files()}

    # ---- one shard ----------------------------------------------------------------------------------------------
    def analyse_shard(self, task: ShardTask, seen: dict[str, str], progress=None) -> ShardResult:
        """Run every stage over a shard, ``batch_size`` photos at a time, decoding the next batch meanwhile.

        ``seen`` maps content hashes of photos already analysed (committed or earlier in this run) to their
        photo_id; it is updated, so identical files under several names are analysed once.
        """
        intake, models = self.stages[0], self.stages[1:]
        size = self.cfg.batch_size
        result = ShardResult(task.shard_id, {})
        starts = range(0, len(task.paths), size)
        batches = ({"photo_id": task.photo_ids[s:s + size], "path": task.paths[s:s + size]} for s in starts)
        parts: list[dict[str, pa.Table]] = []
        with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
            pending = None
            for raw in batches:
                future = pool.submit(timed, intake, raw, result.seconds)
                if pending is not None:
                    parts.append(self._finish(pending.result(), models, seen, result, progress))
                pending = future
            if pending is not None:
                parts.append(self._finish(pending.result(), models, seen, result, progress))
        result.tables = {name: _concat([p[name] for p in parts], schema) for name, schema in self.schemas.items()}
        return result

    def _finish(self, batch: Batch, models: list[Stage], seen: dict[str, str], result: ShardResult,
                progress) -> dict[str, pa.Table]:
        mark_duplicates(batch, seen)
        for stage in models:
            batch = run_isolated(stage, batch, result.seconds)
        tables = build_tables(batch, self.schemas, self.cfg.privacy.salt if self.cfg.privacy.hash_paths else None)
        photos = tables["photos"]
        for pid, path, status, error in zip(*(photos[c].to_pylist() for c in ("photo_id", "path", "status", "error"))):
            if status not in ("ok", "no_face", "duplicate"):
                result.failures.append((pid, path, status, error or ""))
        if progress is not None:
            progress.update(len(batch["photo_id"]))
        return tables


def timed(stage: Stage, batch: Batch, seconds: dict[str, float]) -> Batch:
    t0 = time.perf_counter()
    out = stage(batch)
    seconds[stage.name] = seconds.get(stage.name, 0.0) + time.perf_counter() - t0
    return out


def run_isolated(stage: Stage, batch: Batch, seconds: dict[str, float]) -> Batch:
    """Run a stage on the batch; if it raises, rerun photo by photo so only the culprit fails."""
    try:
        return timed(stage, batch, seconds)
    except Exception as exc:  # a stage bug or bad photo must not stop the run
        if len(batch["photo_id"]) == 1:
            fail(batch, 0, f"{stage.name}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            return batch
        log.warning("stage %s failed on a batch (%s); retrying photo by photo", stage.name, exc)
    return _merge([run_isolated(stage, _slice(batch, i), seconds) for i in range(len(batch["photo_id"]))])


def mark_duplicates(batch: Batch, seen: dict[str, str]) -> None:
    """Second and later copies of the same bytes become ``duplicate`` rows pointing at the first copy."""
    for i, (pid, status, digest) in enumerate(zip(batch["photo_id"], batch["status"], batch["content_hash"])):
        if status != "ok" or digest is None:
            continue
        first = seen.setdefault(digest, pid)
        if first != pid:
            batch["status"][i] = "duplicate"
            batch["duplicate_of"][i] = first
            batch["image"][i] = None


def shard_tasks(photo_ids: list[str], paths: list[str], shard_size: int) -> list[ShardTask]:
    """Cut the (sorted) pending photos into shards whose id is a hash of their members: replanning the same
    photos gives the same id, so a stale shard is replaced in place instead of duplicated."""
    tasks = []
    for s in range(0, len(photo_ids), shard_size):
        ids = photo_ids[s:s + shard_size]
        shard_id = hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
        tasks.append(ShardTask(shard_id, ids, paths[s:s + shard_size]))
    return tasks


def sort_rows(tables: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Rows in (photo_id, face_idx) order, whatever order the runner produced them in: identical output tables."""
    out = {}
    for name, table in tables.items():
        keys = [(k, "ascending") for k in ("photo_id", "face_idx") if k in table.column_names]
        out[name] = table.sort_by(keys) if keys and table.num_rows else table
    return out


def status_counts(photos: pa.Table) -> Counter:
    return Counter(photos.column("status").to_pylist()) if photos.num_rows else Counter()


def _slice(batch: Batch, i: int) -> Batch:
    return {k: v[i:i + 1] for k, v in batch.items()}


def _merge(parts: list[Batch]) -> Batch:
    keys = list(dict.fromkeys(k for p in parts for k in p))
    return {k: [x for p in parts for x in p.get(k, [None])] for k in keys}


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables) if tables else schema.empty_table()
