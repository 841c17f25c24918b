"""In-process runner: shards one after another, models loaded once, decoding overlapped with inference."""
from __future__ import annotations

from typing import Iterator

from colortrend.pipeline import FirstCopies, Pipeline, ShardResult, ShardTask


class LocalRunner:
    def execute(self, pipeline: Pipeline, tasks: list[ShardTask], seen: FirstCopies,
                progress=None) -> Iterator[ShardResult]:
        return pipeline.analyse(tasks, seen, progress)
