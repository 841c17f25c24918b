"""The per-photo chain: which stages run, in what order, and how shards of photos go through them.

Everything here is shared by every runner: the steps each batch goes through (:meth:`Pipeline.steps`: intake,
duplicate marking, the model stages, with per-photo error isolation and stage timings), building each shard's
tables and failure list from analysed batches (:meth:`Pipeline.shard_parts`) and putting a shard together from its
parts (:class:`ShardAssembler`). The local runner runs the steps as lanes of threads in this process, the Ray
runner as Ray Data actor pools: runners only decide where a step runs.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa

from colortrend.config import Config
from colortrend.stages.base import Batch, Stage, fail
from colortrend.tables import build_tables, table_schemas

if TYPE_CHECKING:
    from colortrend.io.discover import Listed

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
    listed: list[Listed] = field(default_factory=list)  # each photo's file as planning listed it (its version)


@dataclass
class ShardResult:
    shard_id: str
    tables: dict[str, pa.Table]
    seconds: dict[str, float] = field(default_factory=dict)
    failures: list[tuple[str, str, str, str]] = field(default_factory=list)  # photo_id, path, status, error
    task: ShardTask | None = None  # what was planned for the shard


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
        IntakeStage(cfg.input, device, workers=cfg.decode_workers, output=cfg.output),
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


def run_chain(stages: list[Stage], batch: Batch) -> Batch:
    """``batch`` through ``stages`` as a run analyses it, photo errors isolated, outside any run (``eval``,
    ``train``, ``explain``): no duplicate marking, no tables."""
    for stage in stages:
        batch = run_isolated(stage, batch)
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
        self.photo_key: bytes | None = None  # the output's secret under privacy.hash_paths (io/secret.py)

    def path_key(self) -> bytes | None:
        """Key of the stored path hashes: derived from the output's secret and ``privacy.salt`` (kept for configs
        that set one), distinct from the photo ids' key."""
        if self.photo_key is None:
            return None
        return hmac.new(self.photo_key, b"path\0" + self.cfg.privacy.salt.encode(), hashlib.sha256).digest()

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

    # ---- analysing shards ---------------------------------------------------------------------------------------
    def steps(self, seen: FirstCopies) -> list[Step]:
        """What every batch goes through, in order: intake, duplicate marking against ``seen`` (content hash ->
        first photo_id, updated as photos come: a dict, or the output's :class:`~colortrend.io.hash_index.HashIndex`),
        each model stage. Runners decide where each step runs; the rows
        come out of :meth:`shard_parts`."""
        intake, *models = self.stages
        return [StageStep(intake, isolate=False), DuplicateStep(seen), *(StageStep(stage) for stage in models)]

    def batches(self, tasks: Iterable[ShardTask]) -> Iterator[Batch]:
        """The photos of ``tasks`` in planned order, ``batch_size`` at a time, never two shards in one batch."""
        size = self.cfg.batch_size
        for task in tasks:
            for s in range(0, len(task.paths), size):
                batch = new_batch(task.paths[s:s + size], task.photo_ids[s:s + size])
                batch[SHARD_COLUMN] = [task.shard_id] * len(batch["path"])
                yield batch

    def shard_parts(self, batch: Batch) -> list[ShardPart]:
        """The rows of an analysed batch, one part per shard its photos belong to, with the photos that failed (any
        status but ok, no_face, duplicate) and the stage seconds spent on them."""
        path_key = self.path_key()
        groups: dict[str, list[int]] = {}
        for i, shard_id in enumerate(batch[SHARD_COLUMN]):
            groups.setdefault(shard_id, []).append(i)
        parts = []
        for shard_id, rows in groups.items():
            whole = len(rows) == len(batch[SHARD_COLUMN])
            part = batch if whole else {k: [v[i] for i in rows] for k, v in batch.items()}
            tables = build_tables(part, self.schemas, path_key)
            photos = tables["photos"]
            failures = [(pid, path, status, error or "") for pid, path, status, error in
                        zip(*(photos[c].to_pylist() for c in ("photo_id", "path", "status", "error")))
                        if status not in ("ok", "no_face", "duplicate")]
            seconds: dict[str, float] = {}
            for spent in part[SECONDS_COLUMN]:
                for name, value in spent.items():
                    seconds[name] = seconds.get(name, 0.0) + value
            parts.append(ShardPart(shard_id, tables, len(rows), seconds, failures))
        return parts


#: In-memory bookkeeping columns of a run's batches: the shard of each photo, and the stage seconds spent on it.
SHARD_COLUMN, SECONDS_COLUMN = "shard_id", "stage_seconds"


class Step(Protocol):
    """One step of :meth:`Pipeline.steps`: a picklable batch transform and what a runner needs to place it."""

    name: str
    uses_accelerator: bool  # runs on a GPU when there is one (its own actor pool under Ray)
    sees_every_photo: bool  # must see every photo, in planned order, in one place (one worker)

    def __call__(self, batch: Batch) -> Batch: ...


class StageStep:
    """A stage as a step: photo errors isolated (``isolate``), its seconds shared out over the batch's photos."""

    sees_every_photo = False

    def __init__(self, stage: Stage, isolate: bool = True):
        self.stage, self.isolate = stage, isolate
        self.name, self.uses_accelerator = stage.name, stage.uses_accelerator

    def __call__(self, batch: Batch) -> Batch:
        started = time.perf_counter()
        batch = run_isolated(self.stage, batch) if self.isolate else self.stage(batch)
        n = len(batch["photo_id"])
        share = (time.perf_counter() - started) / max(1, n)
        spent = batch.setdefault(SECONDS_COLUMN, [None] * n)
        for i in range(n):
            spent[i] = {**(spent[i] or {}), self.name: share}
        return batch


class FirstCopies(Protocol):
    """content hash -> photo_id of the first photo with those bytes; ``setdefault`` records a new one (a dict is
    one; a run uses the output's content-hash index, which reads the partitions its hashes touch). One that also
    has ``setdefault_many`` (pairs in, first copies out, in order) is asked once a batch."""

    def setdefault(self, digest: str, photo_id: str, /) -> str: ...


class DuplicateStep:
    """:func:`mark_duplicates` as a step; it holds the hashes seen so far, so every photo must pass through it."""

    name, uses_accelerator, sees_every_photo = "duplicates", False, True

    def __init__(self, seen: FirstCopies):
        self.seen = seen

    def __call__(self, batch: Batch) -> Batch:
        mark_duplicates(batch, self.seen)
        return batch


@dataclass
class ShardPart:
    """What one batch contributes to one shard: its rows, photo count, stage seconds and failed photos."""

    shard_id: str
    tables: dict[str, pa.Table]
    photos: int
    seconds: dict[str, float]
    failures: list[tuple[str, str, str, str]]


class ShardAssembler:
    """Collects the parts of every shard, in whatever order they arrive; a shard is finished when all its photos
    are back (``progress`` counts photos as their part arrives). Tasks are known as a runner takes them
    (:meth:`planned`), so only the shards in flight are held."""

    def __init__(self, schemas: dict[str, pa.Schema], progress=None):
        self.tasks: dict[str, ShardTask] = {}
        self.missing: dict[str, int] = {}
        self.parts: dict[str, list[ShardPart]] = {}
        self.schemas, self.progress = schemas, progress

    def planned(self, tasks: Iterable[ShardTask]) -> Iterator[ShardTask]:
        """``tasks``, each recorded as it is taken."""
        for task in tasks:
            self.tasks[task.shard_id] = task
            self.missing[task.shard_id] = len(task.photo_ids)
            yield task

    def add(self, part: ShardPart) -> ShardResult | None:
        self.parts.setdefault(part.shard_id, []).append(part)
        self.missing[part.shard_id] -= part.photos
        if self.progress is not None:
            self.progress.update(part.photos)
        if self.missing[part.shard_id]:
            return None
        del self.missing[part.shard_id]
        parts = self.parts.pop(part.shard_id)
        seconds: dict[str, float] = {}
        for p in parts:
            for name, value in p.seconds.items():
                seconds[name] = seconds.get(name, 0.0) + value
        tables = {name: _concat([p.tables[name] for p in parts], schema) for name, schema in self.schemas.items()}
        return ShardResult(part.shard_id, tables, seconds, [f for p in parts for f in p.failures],
                           self.tasks.pop(part.shard_id))


def run_isolated(stage: Stage, batch: Batch) -> Batch:
    """Run a stage on the batch; if it raises, rerun photo by photo so only the culprit fails."""
    try:
        return stage(batch)
    except Exception as exc:  # a stage bug or bad photo must not stop the run
        if len(batch["photo_id"]) == 1:
            fail(batch, 0, f"{stage.name}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            return batch
        log.warning("stage %s failed on a batch (%s); retrying photo by photo", stage.name, exc)
    return _merge([run_isolated(stage, _slice(batch, i)) for i in range(len(batch["photo_id"]))])


def mark_duplicates(batch: Batch, seen: FirstCopies) -> None:
    """Second and later copies of the same bytes become ``duplicate`` rows pointing at the first copy."""
    asked = [i for i, (status, digest) in enumerate(zip(batch["status"], batch["content_hash"]))
             if status == "ok" and digest is not None]
    pairs = [(batch["content_hash"][i], batch["photo_id"][i]) for i in asked]
    for i, (_, pid), first in zip(asked, pairs, first_copies(seen, pairs)):
        if first != pid:
            batch["status"][i] = "duplicate"
            batch["duplicate_of"][i] = first
            batch["image"][i] = None


def first_copies(seen: FirstCopies, pairs: list[tuple[str, str]]) -> list[str]:
    """``seen.setdefault`` of each (digest, photo_id) in turn, in one call where ``seen`` takes a batch."""
    many = getattr(seen, "setdefault_many", None)
    return many(pairs) if many is not None else [seen.setdefault(digest, pid) for digest, pid in pairs]


def shard_id_for(photo_ids: list[str]) -> str:
    """A shard's id: a hash of its (sorted) members, so replanning the same photos gives the same id and a stale
    shard is replaced in place instead of duplicated."""
    return hashlib.sha1("\n".join(photo_ids).encode()).hexdigest()[:16]


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
