"""``colortrend combine``: one cohort table and report from several outputs.

A collection too large for one output (one coordinator, one lock) is cut into outputs by disjoint inputs (a month, a
source, a slice of the manifest), each run and rerun on its own. ``combine`` merges their committed shards'
partials (:mod:`colortrend.aggregate.partials`: counts, never rows) into the ``histograms/`` table and report of a
folder of its own, the config's ``output``, with the config's ``histograms`` and ``report`` settings. The statistics
are those of one output holding every shard (tested): the partials are exact sums.

It reads each output's cached partials where they were built with the same settings, and otherwise builds them in
memory from the shard files; it never writes into, locks or repairs an output it reads (a damaged shard there stops
it with one line naming the file: run that output first). Persons are de-duplicated within an output, not across
outputs: the same photo in two of them counts twice, so cut by inputs that do not overlap.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

from colortrend import __version__
from colortrend.config import Config, recorded
from colortrend.errors import ConfigError
from colortrend.io.fs import is_url, local_path
from colortrend.io.lock import LOCK_NAME, RunLock
from colortrend.io.store import Store

#: The record that makes a folder a combined output (and tells ``run`` it is not a run's output).
COMBINED = "_combined.json"
#: What a combined output holds: nothing else may be in a folder ``combine`` writes to.
COMBINED_ENTRIES = {"histograms", "report", COMBINED, LOCK_NAME}


@dataclass
class CombineSummary:
    outputs: int
    shards: int
    persons: int
    report: str

    def line(self) -> str:
        return (f"combined {self.outputs} outputs ({self.shards} shards, {self.persons} persons counted); "
                f"report {self.report}")


def combine(cfg: Config, outputs: Sequence[str]) -> CombineSummary:
    """Histograms and report of every committed shard of ``outputs``, written under ``cfg.output``."""
    from colortrend.aggregate.histograms import Partial, histograms_from_partial
    from colortrend.aggregate.partials import SampleCounts, settings_key, shard_partial
    from colortrend.aggregate.report import publish_report

    sources = _sources(cfg, outputs)
    target = Store(cfg.output)
    _check_target(cfg.output, target)
    key = settings_key(cfg.histograms)
    samples, shards, models = SampleCounts(), 0, {}

    def partials():
        nonlocal samples, shards
        for store in sources:
            for shard_id, marker in sorted(store.markers().items()):
                part = shard_partial(store, shard_id, marker, cfg.histograms, key, cache=False)
                samples += part.samples
                shards += 1
                yield part.histogram

    try:
        target.fs.makedirs(target.root, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output: cannot write to {cfg.output} ({exc.strerror or exc})") from None
    with RunLock(cfg.output):
        merged = Partial.merge(partials())
        histograms = histograms_from_partial(merged, cfg.histograms)
        for store in sources:  # the models of each source's last run, shown in the report
            for model, checksum in (store.read_json("_runs/latest.json") or {}).get("models", {}).items():
                models.setdefault(model, set()).add(checksum)
        # Outputs analysed with other weights are combinable (the counts are), but the page must say so.
        shown = {m: next(iter(c)) if len(c) == 1 else f"differs between outputs: {', '.join(sorted(c))}"
                 for m, c in models.items()}
        info = {"name": cfg.name, "version": __version__, "config": recorded(cfg), "models": shown}
        target.write_table("histograms", histograms)
        index = publish_report(target, histograms.to_pandas(), samples, info, cfg.report)
        target.write_json(COMBINED, {
            "outputs": [s.url for s in sources], "shards": shards, "persons": merged.persons, "settings_key": key,
            "version": __version__,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
    return CombineSummary(len(sources), shards, merged.persons, index)


def _sources(cfg: Config, outputs: Sequence[str]) -> list[Store]:
    if not outputs:
        raise ConfigError("combine: name at least one output to read")
    stores, seen = [], set()
    for output in outputs:
        store = Store(output)
        if store.url in seen:
            raise ConfigError(f"combine: {output} is named twice (its persons would count twice)")
        seen.add(store.url)
        if _same_place(output, cfg.output):
            raise ConfigError(f"combine: {output} is the config's output, where the combined table goes")
        if not store.markers():  # a malformed commit record there is the store's OutputError, naming it
            raise ConfigError(f"combine: {output} holds no committed shard (not a colortrend output, or never run)")
        stores.append(store)
    return stores


def _check_target(output: str, target: Store) -> None:
    """The combined output is a folder of its own: new, empty, or an earlier ``combine``'s (never a run's output,
    never a folder holding files colortrend did not write)."""
    if not target.local:
        return
    out = local_path(output)
    if not os.path.isdir(out):
        return
    entries = set(os.listdir(out)) - {LOCK_NAME}  # a combine that failed leaves its (released) lock file, no more
    if entries and COMBINED not in entries:
        raise ConfigError(f"output: {output} already exists and is not a combined output (it holds "
                          f"{', '.join(sorted(entries)[:3])}); choose a new or empty folder")
    foreign = sorted(entries - COMBINED_ENTRIES)
    if foreign:
        raise ConfigError(f"output: {output} holds {', '.join(foreign[:3])}, which colortrend combine did not "
                          "write; choose a new or empty folder")


def _same_place(a: str, b: str) -> bool:
    if is_url(a) or is_url(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(local_path(a)) == os.path.realpath(local_path(b))
