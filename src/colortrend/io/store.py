"""The output dataset: tables of Parquet shards, committed atomically with a marker per shard.

Layout under the config's ``output`` folder::

    photos/part-<id>.parquet   faces/...   garments/...     one file per shard and table
    histograms/part-all.parquet                              rebuilt from all committed rows after each run
    report/index.html
    _markers/<id>.json         the commit record of shard <id>: its files, row counts, stage fingerprints
    _staging/                  files being written (a reader globbing *.parquet never sees them)
    _runs/<time>.json          resolved config, versions, model checksums and summary of each run
    _logs/<id>.log             per-shard log of photos that failed

A shard commits in three steps: write every table's file under ``_staging/``, write the marker (the commit point),
move the files into their table folders. ``recover()`` finishes the moves of a shard whose marker exists and deletes
staging files of shards that never reached their marker, so a run killed at any moment leaves either the whole
shard or nothing. Readers that must see only committed rows use ``read_table`` (files named by markers).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
import pyarrow as pa

SHARD_TABLES = ("photos", "faces", "garments")
MARKERS = "_markers"
STAGING = "_staging"


class Store:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # ---- layout -------------------------------------------------------------------------------------------------
    def table_dir(self, table: str) -> Path:
        return self.root / table

    def marker_path(self, shard_id: str) -> Path:
        return self.root / MARKERS / f"{shard_id}.json"

    def prepare(self) -> None:
        for sub in (*SHARD_TABLES, MARKERS, STAGING, "_runs", "_logs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- commit -------------------------------------------------------------------------------------------------
    def commit_shard(self, shard_id: str, tables: dict[str, pa.Table], marker: dict) -> None:
        """Write a shard's tables atomically (see module docstring); replaces an older shard of the same id."""
        staged = {}
        for table, data in tables.items():
            path = self.root / STAGING / f"{table}-part-{shard_id}.parquet"
            write_parquet(data, path)
            staged[table] = path
        files = {t: f"{t}/part-{shard_id}.parquet" for t in tables}
        record = {**marker, "shard": shard_id, "files": files, "rows": {t: d.num_rows for t, d in tables.items()}}
        write_json_atomic(self.marker_path(shard_id), record)  # the commit point
        self._finish_moves(shard_id, files)

    def _finish_moves(self, shard_id: str, files: dict[str, str]) -> None:
        for table, rel in files.items():
            src = self.root / STAGING / f"{table}-part-{shard_id}.parquet"
            if src.exists():
                os.replace(src, self.root / rel)

    def drop_shard(self, shard_id: str) -> None:
        """Remove a committed shard: the marker goes first, so a crash leaves at worst orphan files to clean."""
        marker = self.read_marker(shard_id)
        self.marker_path(shard_id).unlink(missing_ok=True)
        for rel in (marker or {}).get("files", {}).values():
            (self.root / rel).unlink(missing_ok=True)

    def recover(self) -> list[str]:
        """Complete interrupted commits and clear abandoned work. Returns what it did, for the log."""
        actions = []
        if not self.root.exists():
            return actions
        markers = self.markers()
        for shard_id, marker in list(markers.items()):
            for old in marker.get("replaces", []):  # the new shard committed but the old one was not yet dropped
                if old != shard_id and old in markers:
                    self.drop_shard(old)
                    markers.pop(old)
                    actions.append(f"dropped shard {old}, superseded by {shard_id}")
        for shard_id, marker in markers.items():
            if any((self.root / STAGING / f"{t}-part-{shard_id}.parquet").exists() for t in marker["files"]):
                self._finish_moves(shard_id, marker["files"])
                actions.append(f"finished commit of shard {shard_id}")
        staging = self.root / STAGING
        if staging.exists():
            for leftover in staging.iterdir():
                leftover.unlink() if leftover.is_file() else shutil.rmtree(leftover)
                actions.append(f"removed unfinished {leftover.name}")
        committed = {rel for m in markers.values() for rel in m["files"].values()}
        for table in SHARD_TABLES:
            folder = self.root / table
            for f in folder.glob("part-*.parquet") if folder.exists() else []:
                if f"{table}/{f.name}" not in committed:  # a shard dropped half-way: its marker is already gone
                    f.unlink()
                    actions.append(f"removed uncommitted {table}/{f.name}")
        return actions

    # ---- read ---------------------------------------------------------------------------------------------------
    def markers(self) -> dict[str, dict]:
        folder = self.root / MARKERS
        out = {}
        for path in sorted(folder.glob("*.json")) if folder.exists() else []:
            try:
                out[path.stem] = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # only complete markers exist (atomic write); anything else is not a commit
        return out

    def read_marker(self, shard_id: str) -> dict | None:
        try:
            return json.loads(self.marker_path(shard_id).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def committed_files(self, table: str) -> list[Path]:
        if table in SHARD_TABLES:
            return [self.root / m["files"][table] for m in self.markers().values() if table in m["files"]]
        folder = self.root / table
        return sorted(folder.glob("*.parquet")) if folder.exists() else []

    def read_table(self, table: str, schema: pa.Schema | None = None, columns: list[str] | None = None) -> pa.Table:
        """All committed rows of a table as one Arrow table (empty, with ``schema``, when nothing is committed)."""
        import pyarrow.parquet as pq

        files = [f for f in self.committed_files(table) if f.exists()]
        if not files:
            if schema is None:
                return pa.table({})
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        parts = [pq.read_table(f, columns=columns, schema=schema) for f in files]
        return pa.concat_tables(parts, promote_options="permissive")

    def write_table(self, table: str, data: pa.Table, name: str = "part-all") -> Path:
        """Replace a whole (small, aggregate) table with one file, atomically."""
        folder = self.table_dir(table)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.parquet"
        write_parquet(data, path)
        for stale in folder.glob("*.parquet"):
            if stale != path:
                stale.unlink()
        return path


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Write next to the target under a hidden name, fsync, rename: the final name only ever holds a whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_parquet(data: pa.Table, path: Path) -> None:
    import pyarrow.parquet as pq

    with atomic_file(path) as f:
        pq.write_table(data, f, compression="zstd")


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)
