"""Runners decide only *where* shards are analysed; planning, commits, markers and stats live in ``colortrend.run``."""
from __future__ import annotations

from typing import Callable, Iterator, Protocol, Sequence

from colortrend.pipeline import FirstCopies, Pipeline, ShardResult, ShardTask


class Runner(Protocol):
    def execute(self, pipeline: Pipeline, tasks: Sequence[ShardTask], seen: FirstCopies,
                progress=None) -> Iterator[ShardResult]:
        """Yield each shard's result as it completes; the caller commits it. ``tasks`` is a list or the planner's
        :class:`~colortrend.plan.PlannedShards`, which makes each task when it is taken."""


def get_runner(name: str, **options) -> Runner:
    factories: dict[str, Callable[..., Runner]] = {"local": _local, "ray": _ray}
    return factories[name](**options)


def _local(**options) -> Runner:
    from colortrend.runners.local import LocalRunner

    return LocalRunner(**options)


def _ray(**options) -> Runner:
    from colortrend.runners.ray import RayRunner

    return RayRunner(**options)
