"""What a run does, once for every runner: validate, lock, recover, plan, analyse, commit, aggregate, record.

``run()`` is what ``colortrend run`` calls. Work is skipped when its completion marker says it was done with the
same stage fingerprints, so cron can rerun the same command every night and only new or stale photos are analysed;
with nothing to do no model is loaded.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from colortrend import __version__
from colortrend.combine import COMBINED
from colortrend.config import Config, recorded, to_dict
from colortrend.errors import ConfigError, OutputError, environment_problem
from colortrend.io import hash_index
from colortrend.io.discover import check_inputs
from colortrend.io.hash_index import HashIndex
from colortrend.io.fs import is_url, local_path
from colortrend.io.lock import LOCK_NAME, RunLock
from colortrend.io.secret import KEY_NAME, output_key
from colortrend.io.store import FOLDERS, MARKERS, SHARD_TABLES, Store
from colortrend.pipeline import Pipeline, ShardTask, sort_rows, status_counts
from colortrend.plan import Plan, plan

__all__ = ["Plan", "RunSummary", "plan", "run", "status", "read", "report"]

log = logging.getLogger(__name__)
AGGREGATES_STATE = "_aggregates.json"  # what the last histograms and report were built from


@dataclass
class RunSummary:
    photos: Counter = field(default_factory=Counter)  # this run's photos by status
    faces: int = 0
    persons: int = 0
    shards: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, summed over batches (lanes overlap)
    analysis_seconds: float = 0.0  # wall time from the first batch to the last shard committed
    elapsed: float = 0.0
    recovered: list[str] = field(default_factory=list)
    aggregates: str = "skipped"

    def line(self) -> str:
        total = sum(self.photos.values())
        by_status = ", ".join(f"{k} {v}" for k, v in sorted(self.photos.items(), key=lambda kv: -kv[1]))
        return (f"{total} photos ({by_status or 'nothing new'}), {self.faces} faces, {self.persons} persons measured, "
                f"{self.shards} shards, {self.elapsed:.1f} s")


def check_environment(cfg: Config) -> None:
    """Problems that must stop a run before anything is written."""
    if cfg.device == "cuda":
        from colortrend.models import pick_device

        pick_device(cfg.device)  # a ConfigError without CUDA
    from colortrend.aggregate.age_error import load_age_calibration
    from colortrend.aggregate.histograms import load_sales

    for key, path, loader in (("histograms.sales_path", cfg.histograms.sales_path, load_sales),
                              ("histograms.age_calibration_path", cfg.histograms.age_calibration_path,
                               load_age_calibration)):
        if path:
            try:
                loader(path)
            except (OSError, ValueError, KeyError) as exc:
                raise ConfigError(f"{key}: {' '.join(str(exc).split())}") from None
    if is_url(cfg.output):
        return  # a remote store's permissions show on the first write, before any shard is analysed
    out = local_path(cfg.output)
    _check_own_folder(cfg.output, out)
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output: cannot write to {cfg.output} ({parent} is not a writable folder)")


#: What colortrend writes at the top of an output folder: anything else there was written by someone else.
OWN_ENTRIES = {*FOLDERS, "histograms", "report", AGGREGATES_STATE, LOCK_NAME, KEY_NAME}


def _check_own_folder(output: str, out: str) -> None:
    """Refuse an existing folder that holds what colortrend did not write: a run must never delete or overwrite
    someone else's files (recovery cleans what looks like its own leftovers)."""
    if os.path.realpath(out) == os.path.realpath(os.sep):
        raise ConfigError(f"output: {output} is the filesystem root; name a folder of its own")
    if not os.path.isdir(out):
        return
    entries = set(os.listdir(out))
    if COMBINED in entries:
        raise ConfigError(f"output: {output} is the output of `colortrend combine`; a run needs a folder of its own")
    foreign = sorted(entries - OWN_ENTRIES)
    if foreign:
        shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise ConfigError(f"output: {output} already exists and holds {shown}, which colortrend did not write; "
                          "choose a new or empty folder")
    if MARKERS not in entries:  # no commit ever: any table file there is someone else's
        stray = [os.path.join(root, name) for table in (*SHARD_TABLES, "histograms", "report")
                 for root, _, files in os.walk(os.path.join(out, table)) for name in files]
        if stray:
            raise ConfigError(f"output: {output} holds {stray[0]} but no colortrend commit record; it is not a "
                              "colortrend output: choose a new or empty folder")


def ray_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


def run(cfg: Config, executor: str = "local", full: bool = False, address: str | None = None,
        progress: bool | None = None) -> RunSummary:
    check_environment(cfg)
    if executor == "ray" and not ray_installed():
        raise ConfigError('--executor ray: Ray is not installed (pip install "colortrend[ray]")')
    if executor == "ray" and any(p.startswith("memory://") for p in (cfg.output, *cfg.input.paths)):
        raise ConfigError("memory:// lives in one process; Ray workers cannot see it (use the local executor)")
    t0 = time.perf_counter()
    store = Store(cfg.output)
    pipeline = Pipeline(cfg)
    pipeline.check_models()
    check_inputs(cfg.input.paths, exclude=cfg.output)  # a missing input is a config error, before any write
    output_key(store, cfg.privacy.hash_paths)  # so is switching privacy.hash_paths on an output with commits
    summary = RunSummary()
    try:
        store.prepare()
    except Exception as exc:  # OSError locally; remote filesystems raise their own types
        raise ConfigError(f"output: cannot write to {cfg.output} ({getattr(exc, 'strerror', None) or exc})") from None
    with RunLock(cfg.output):
        summary.recovered = store.recover()
        for action in summary.recovered:
            log.info("recovery: %s", action)
        pipeline.photo_key = output_key(store, cfg.privacy.hash_paths, create=True)
        the_plan = plan(cfg, pipeline, store, full)  # under the lock: what another run committed counts
        for shard_id, problem in the_plan.damaged.items():
            # Its files are colortrend's (its marker names them); its photos are already planned as new.
            log.warning("shard %s is damaged (%s): its photos are analysed again", shard_id, problem)
            store.drop_shard(shard_id)
        try:
            if the_plan.tasks:
                _analyse(cfg, pipeline, store, the_plan, executor, address, progress, summary)
        finally:
            the_plan.tasks.close()  # a spilled plan's temporary files (its counts stay)
        # The models of this run go into the report directly: _runs/latest.json is written after it.
        try:
            summary.aggregates = build_aggregates(cfg, store, force=bool(the_plan.tasks or the_plan.damaged) or full,
                                                  models=pipeline.model_checksums())
        except OSError as exc:  # the report's own files (disk full, read-only): one line, like the shards' writes
            raise OutputError(f"output: {environment_problem(exc, store.uri('report'))}") from None
        summary.elapsed = time.perf_counter() - t0
        _record(cfg, pipeline, store, the_plan, summary)
    return summary


def _analyse(cfg: Config, pipeline: Pipeline, store: Store, the_plan: Plan, executor: str, address: str | None,
             progress: bool | None, summary: RunSummary) -> None:
    from tqdm import tqdm

    from colortrend.models import pick_device
    from colortrend.runners import get_runner

    device = pick_device(cfg.device)
    for stage in pipeline.stages:
        stage.device = device
    tokens = _index_tokens(store, the_plan)
    seen = HashIndex(store, dict(tokens))  # a replaced shard's photos are not earlier copies of themselves
    runner = get_runner(executor, **({"address": address} if executor == "ray" else {}))
    fingerprints = pipeline.fingerprints()
    started = time.perf_counter()
    quiet = None if progress is None else not progress
    with tqdm(total=the_plan.tasks.photos, unit="photo", desc="analyse", disable=quiet) as bar:
        for result in runner.execute(pipeline, the_plan.tasks, seen, bar):
            task = result.task
            result.tables["photos"] = _with_listing(result.tables["photos"], task)
            statuses = status_counts(result.tables["photos"])
            marker = {  # the shard's photo ids are in its photos file (input columns included), not here
                "fingerprint": the_plan.fingerprint,
                "stages": fingerprints,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
                "replaces": task.replaces,
                "statuses": dict(sorted(statuses.items())),  # `status` counts from these, not the photos files
            }
            committed = store.commit_shard(result.shard_id, sort_rows(result.tables), marker)
            tokens[result.shard_id] = committed["hash_index"]
            for old in marker["replaces"]:
                if old != result.shard_id:
                    store.drop_shard(old)
                    tokens.pop(old, None)
            if result.failures:
                _write_failures(store, result.shard_id, result.failures)
            summary.shards += 1
            summary.photos.update(statuses)
            summary.faces += result.tables["faces"].num_rows
            summary.persons += result.tables["garments"].num_rows
            for k, v in result.seconds.items():
                summary.seconds[k] = summary.seconds.get(k, 0.0) + v
    summary.analysis_seconds = time.perf_counter() - started
    hash_index.compact(store, tokens)


def _index_tokens(store: Store, the_plan: Plan) -> dict[str, str]:
    """shard -> hash index token of the committed shards this run keeps, indexing those committed before the index
    existed (once); compacted first if a killed run left many deltas."""
    kept = {sid: token for sid, token in the_plan.index_tokens.items() if sid not in the_plan.tasks.replaced}
    unindexed = {sid: marker for sid, token in kept.items() if token is None and (marker := store.read_marker(sid))}
    tokens = {sid: token for sid, token in kept.items() if token} | hash_index.rebuild(store, unindexed)
    hash_index.compact(store, tokens)
    return tokens


def _with_listing(photos, task: ShardTask):
    """The photos rows with the size, mtime and ETag their files had when listed (``input_*`` columns)."""
    import pyarrow as pa

    listed = dict(zip(task.photo_ids, task.listed))
    entries = [listed.get(pid) for pid in photos.column("photo_id").to_pylist()]
    values = {"input_bytes": [e and e.size for e in entries], "input_mtime_ns": [e and e.mtime_ns for e in entries],
              "input_etag": [e and e.etag for e in entries]}
    for name, column in values.items():
        i = photos.schema.get_field_index(name)
        photos = photos.set_column(i, photos.schema.field(i), pa.array(column, photos.schema.field(i).type))
    return photos


def build_aggregates(cfg: Config, store: Store, force: bool = False, models: dict | None = None) -> str:
    """Histograms and report from all committed shards; skipped when neither the shards nor their settings changed.
    Markers are read one at a time: nothing here grows with the number of photos."""
    from colortrend.aggregate.partials import committed_shards

    digest = hashlib.sha256()
    for shard_id, marker in committed_shards(store):
        digest.update(json.dumps([shard_id, marker.get("created")]).encode())
    digest.update(json.dumps([to_dict(cfg.histograms), to_dict(cfg.report), __version__], default=str).encode())
    key = digest.hexdigest()[:16]
    state = store.read_json(AGGREGATES_STATE) or {}
    if not force and state.get("key") == key and store.exists("report/index.html"):
        return "up to date"
    write_aggregates(cfg, store, models)
    store.write_json(AGGREGATES_STATE, {"key": key})
    return "rebuilt"


def write_aggregates(cfg: Config, store: Store, models: dict | None = None) -> None:
    """The ``histograms/`` table and the report, from the merged per-shard partials (never from all rows)."""
    from colortrend.aggregate.histograms import histograms_from_partial
    from colortrend.aggregate.partials import merged_partial
    from colortrend.aggregate.report import publish_report

    # With nothing committed (an empty input folder on a cron night) the table is empty but keeps its columns.
    merged = merged_partial(store, cfg.histograms)
    histograms = histograms_from_partial(merged.histogram, cfg.histograms)
    store.write_table("histograms", histograms)
    publish_report(store, histograms.to_pandas(), merged.samples, run_info(cfg, store, models), cfg.report)


def run_info(cfg: Config, store: Store, models: dict | None = None) -> dict:
    """What the report shows of the run: ``models`` (checksums), else those of the last recorded run."""
    if models is None:
        models = (store.read_json("_runs/latest.json") or {}).get("models", {})
    return {"name": cfg.name, "version": __version__, "config": recorded(cfg), "models": models}


def _record(cfg: Config, pipeline: Pipeline, store: Store, the_plan: Plan, summary: RunSummary) -> None:
    stamp = datetime.datetime.now(datetime.timezone.utc)
    record = {
        "name": cfg.name,
        "finished": stamp.isoformat(timespec="seconds"),
        "version": __version__,
        "config": recorded(cfg),
        "models": pipeline.model_checksums(),
        "fingerprints": pipeline.fingerprints(),
        "inputs": the_plan.inputs,
        "summary": {"photos": dict(summary.photos), "faces": summary.faces, "persons": summary.persons,
                    "shards": summary.shards, "stale_shards": len(the_plan.stale),
                    "stage_seconds": {k: round(v, 3) for k, v in summary.seconds.items()},
                    "analysis_seconds": round(summary.analysis_seconds, 3),
                    "elapsed": round(summary.elapsed, 3), "recovered": summary.recovered,
                    "aggregates": summary.aggregates},
    }
    store.write_json(f"_runs/{stamp:%Y%m%dT%H%M%S}-{os.getpid()}.json", record)
    store.write_json("_runs/latest.json", record)


def _write_failures(store: Store, shard_id: str, failures: list[tuple[str, str, str, str]]) -> None:
    escape = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})  # a file name may hold any of them
    lines = ["photo_id\tpath\tstatus\terror"] + ["\t".join(v.translate(escape) for v in f) for f in failures]
    store.write_bytes(f"_logs/{shard_id}.tsv", ("\n".join(lines) + "\n").encode("utf-8"))


def status(cfg: Config) -> dict:
    """Done / pending / stale work and photos by status, without loading any model."""
    store = Store(cfg.output)
    pipeline = Pipeline(cfg)
    pipeline.check_models()
    pipeline.photo_key = output_key(store, cfg.privacy.hash_paths)
    markers = store.markers()
    the_plan = plan(cfg, pipeline, store, markers=markers)
    the_plan.tasks.close()  # only its counts are wanted
    markers = {sid: m for sid, m in markers.items() if sid not in the_plan.damaged}
    by_status = Counter()
    for marker in markers.values():
        by_status.update(marker.get("statuses", {}))
    older = {sid: m for sid, m in markers.items() if "statuses" not in m}  # committed before records held them
    for _, photos in store.iter_table("photos", columns=["status"], markers=older):
        by_status.update(status_counts(photos))
    return {
        "output": store.url,
        "inputs": the_plan.inputs,
        "shards_committed": len(markers),
        "shards_stale": len(the_plan.stale),
        "shards_damaged": the_plan.damaged,
        "photos_committed": the_plan.committed_photos,
        "photos_changed": the_plan.changed,
        "photos_pending": the_plan.tasks.photos,
        "photos_by_status": dict(by_status),
        "faces": sum(m.get("rows", {}).get("faces", 0) for m in markers.values()),
        "persons": sum(m.get("rows", {}).get("garments", 0) for m in markers.values()),
        "failure_logs": store.list("_logs", ".tsv"),
        "stage_fingerprints": pipeline.fingerprints(),
        "running": _running(cfg.output),
        "report": store.uri("report", "index.html") if store.exists("report/index.html") else None,
    }


def _running(output: str) -> str | None:
    """Who holds the output's lock now, as one line; None when no live run does (a dead run's lock says nothing)."""
    holder = RunLock(output).live_holder()
    return f"pid {holder['pid']} on {holder['host']} since {holder.get('since', '?')}" if holder else None


def committed_photos(output: str) -> int:
    """Photos in the committed shards of ``output`` (what a stopped run leaves for the next one to build on)."""
    try:
        return sum(m.get("rows", {}).get("photos", 0) for m in Store(output).markers().values())
    except Exception:  # only a message depends on it: an unreadable store counts none
        return 0


def read(output: str | os.PathLike, table: str):
    """Committed rows of one output table (``output``: a folder or fsspec URL) as a pandas DataFrame."""
    return Store(output).read_table(table).to_pandas()


def report(cfg: Config) -> str:
    """Rebuild histograms and report from the committed rows."""
    store = Store(cfg.output)
    if not store.has_commits():
        raise ConfigError(f"output: nothing committed in {cfg.output} yet; run `colortrend run` first")
    with RunLock(cfg.output):
        # Cached partials would still draw a page, but from shards that no longer hold what was committed.
        for problem in store.damage(store.markers()).values():
            raise OutputError(f"output: {problem}; `colortrend run` redoes that shard, then the report")
        write_aggregates(cfg, store)
    return store.uri("report", "index.html")
