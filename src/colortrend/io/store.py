"""The output dataset: tables of Parquet shards, committed atomically with a marker per shard.

Layout under the config's ``output`` (a folder, or an fsspec URL such as ``s3://bucket/colortrend/2016``)::

    photos/part-<id>.parquet   faces/...   garments/...     one file per shard and table
    histograms/part-all.parquet                              rebuilt from all committed rows after each run
    report/index.html
    _markers/<id>.json         the commit record of shard <id>: its files, row counts, stage fingerprints
    _staging/                  files being written (a reader globbing *.parquet never sees them)
    _runs/<time>.json          resolved config, versions, model checksums and summary of each run
    _logs/<id>.tsv             per-shard list of photos that failed, with their status and error
    _partials/<id>.<key>.parquet   what aggregation needs of shard <id> under histogram settings <key> (a cache)

A shard commits in three steps: write every table's file under ``_staging/``, write the marker (the commit point),
move the files into their table folders. ``recover()`` finishes the moves of a shard whose marker exists and deletes
staging files of shards that never reached their marker, so a run killed at any moment leaves either the whole
shard or nothing. Readers that must see only committed rows use ``read_table`` (files named by markers).
On object stores the moves are copies and deletes, not renames; the marker still decides what is committed.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa

from colortrend.io.fs import display, filesystem, is_local

SHARD_TABLES = ("photos", "faces", "garments")
MARKERS = "_markers"
STAGING = "_staging"
#: Per-shard partial tables of the aggregation (``colortrend.aggregate.partials``), named ``<shard>.<key>.parquet``.
PARTIALS = "_partials"
_PARTIAL_NAME = re.compile(r"^(?P<shard>.+)\.[0-9a-f]{16}\.parquet$")
#: The folders every output starts with (``prepare``); aggregates add ``histograms/`` and ``report/``.
FOLDERS = (*SHARD_TABLES, MARKERS, STAGING, "_runs", "_logs", PARTIALS)


def partial_shard(name: str) -> str | None:
    """The shard of a file in ``_partials/`` named like a partial; None for any other name (not ours)."""
    match = _PARTIAL_NAME.match(name)
    return match.group("shard") if match else None


class Store:
    """The output dataset at a local path or an fsspec URL. Locations inside it are ``/``-joined relative parts."""

    def __init__(self, root: str | os.PathLike):
        self.fs, path = filesystem(root)
        self.root = path.rstrip("/")
        self.local = is_local(self.fs)
        self.url = display(self.fs, self.root)

    # ---- layout -------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Location of ``parts`` on the store's filesystem."""
        return "/".join((self.root, *parts))

    def uri(self, *parts: str) -> str:
        """Location of ``parts`` as a user should see it (a plain path when local, a URL otherwise)."""
        return display(self.fs, self.path(*parts))

    def marker(self, shard_id: str) -> str:
        return f"{MARKERS}/{shard_id}.json"

    def prepare(self) -> None:
        for sub in FOLDERS:
            self.fs.makedirs(self.path(sub), exist_ok=True)

    # ---- files --------------------------------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Names (not paths) of the files directly in ``folder`` ending in ``suffix``, sorted; [] if none."""
        try:
            entries = self.fs.ls(self.path(folder), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") != "directory")
        return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))

    def read_text(self, rel: str) -> str | None:
        """The file's text, or None when it does not exist or cannot be read."""
        try:
            return self.fs.cat_file(self.path(rel)).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    def read_json(self, rel: str) -> dict | None:
        text = self.read_text(rel)
        try:
            return json.loads(text) if text is not None else None
        except json.JSONDecodeError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace a file atomically: readers see the old file or the new one, never a part."""
        if self.local:
            with atomic_file(Path(self.path(rel))) as f:
                f.write(data)
        else:
            self.fs.pipe_file(self.path(rel), data)  # one PUT: an object appears whole or not at all

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode("utf-8"))

    def move(self, src: str, dst: str) -> None:
        if self.local:
            os.replace(self.path(src), self.path(dst))
        else:
            self.fs.mv(self.path(src), self.path(dst))

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))

    def upload_folder(self, rel: str, local_dir: str | os.PathLike, last: str | None = None) -> None:
        """Copy a local folder's files to ``rel`` (``last`` after all others), then delete files it no longer has."""
        names = sorted(p.name for p in Path(local_dir).iterdir() if p.is_file())
        for name in sorted(names, key=lambda n: n == last):
            self.write_bytes(f"{rel}/{name}", (Path(local_dir) / name).read_bytes())
        for stale in set(self.list(rel)) - set(names):
            self.delete(f"{rel}/{stale}")

    # ---- commit -------------------------------------------------------------------------------------------------
    def commit_shard(self, shard_id: str, tables: dict[str, pa.Table], marker: dict) -> None:
        """Write a shard's tables atomically (see module docstring); replaces an older shard of the same id."""
        for table, data in tables.items():
            self.write_bytes(_staged(table, shard_id), parquet_bytes(data))
        files = {t: f"{t}/part-{shard_id}.parquet" for t in tables}
        record = {**marker, "shard": shard_id, "files": files, "rows": {t: d.num_rows for t, d in tables.items()}}
        self.write_json(self.marker(shard_id), record)  # the commit point
        self._finish_moves(shard_id, files)

    def _finish_moves(self, shard_id: str, files: dict[str, str]) -> None:
        for table, rel in files.items():
            if self.exists(_staged(table, shard_id)):
                self.move(_staged(table, shard_id), rel)

    def drop_shard(self, shard_id: str) -> None:
        """Remove a committed shard: the marker goes first, so a crash leaves at worst orphan files to clean."""
        marker = self.read_marker(shard_id)
        self.delete(self.marker(shard_id))
        for rel in (marker or {}).get("files", {}).values():
            self.delete(rel)

    def recover(self) -> list[str]:
        """Complete interrupted commits and clear abandoned work. Returns what it did, for the log."""
        actions = []
        if not self.fs.exists(self.root):
            return actions
        markers = self.markers()
        for shard_id, marker in list(markers.items()):
            for old in marker.get("replaces", []):  # the new shard committed but the old one was not yet dropped
                if old != shard_id and old in markers:
                    self.drop_shard(old)
                    markers.pop(old)
                    actions.append(f"dropped shard {old}, superseded by {shard_id}")
        for shard_id, marker in markers.items():
            if any(self.exists(_staged(t, shard_id)) for t in marker["files"]):
                self._finish_moves(shard_id, marker["files"])
                actions.append(f"finished commit of shard {shard_id}")
        if self.local and os.path.isdir(self.path(STAGING)):  # also hidden temporary files of killed writes
            leftovers = sorted(os.listdir(self.path(STAGING)))
        else:
            leftovers = self.list(STAGING)
        for name in leftovers:
            self.fs.rm(self.path(STAGING, name), recursive=True)
            actions.append(f"removed unfinished {name}")
        committed = {rel for m in markers.values() for rel in m["files"].values()}
        for table in SHARD_TABLES:
            for name in self.list(table, ".parquet"):
                if name.startswith("part-") and f"{table}/{name}" not in committed:
                    self.delete(f"{table}/{name}")  # a shard dropped half-way: its marker is already gone
                    actions.append(f"removed uncommitted {table}/{name}")
        for name in self.list(PARTIALS, ".parquet"):
            shard = partial_shard(name)
            if shard is not None and shard not in markers:
                self.delete(f"{PARTIALS}/{name}")
                actions.append(f"removed partial of uncommitted shard {shard}")
        return actions

    # ---- read ---------------------------------------------------------------------------------------------------
    def markers(self) -> dict[str, dict]:
        out = {}
        for name in self.list(MARKERS, ".json"):
            marker = self.read_json(f"{MARKERS}/{name}")
            if marker is not None:  # only complete markers exist (atomic write); anything else is not a commit
                out[name[: -len(".json")]] = marker
        return out

    def read_marker(self, shard_id: str) -> dict | None:
        return self.read_json(self.marker(shard_id))

    def committed_files(self, table: str) -> list[str]:
        """Relative locations of a table's committed files."""
        if table in SHARD_TABLES:
            return [m["files"][table] for m in self.markers().values() if table in m["files"]]
        return [f"{table}/{name}" for name in self.list(table, ".parquet")]

    def read_table(self, table: str, schema: pa.Schema | None = None, columns: list[str] | None = None) -> pa.Table:
        """All committed rows of a table as one Arrow table (empty, with ``schema``, when nothing is committed)."""
        import pyarrow.parquet as pq

        parts = []
        for rel in self.committed_files(table):
            try:
                if self.local:
                    parts.append(pq.read_table(self.path(rel), columns=columns, schema=schema))
                else:
                    with self.fs.open(self.path(rel), "rb") as f:
                        parts.append(pq.read_table(f, columns=columns, schema=schema))
            except FileNotFoundError:
                continue  # dropped by a concurrent replacement between listing and reading
        if not parts:
            if schema is None:
                return pa.table({})
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        return pa.concat_tables(parts, promote_options="permissive")

    def write_table(self, table: str, data: pa.Table, name: str = "part-all") -> str:
        """Replace a whole (small, aggregate) table with one file, atomically."""
        self.fs.makedirs(self.path(table), exist_ok=True)
        rel = f"{table}/{name}.parquet"
        self.write_bytes(rel, parquet_bytes(data))
        for stale in self.list(table, ".parquet"):
            if stale != f"{name}.parquet":
                self.delete(f"{table}/{stale}")
        return rel


def _staged(table: str, shard_id: str) -> str:
    return f"{STAGING}/{table}-part-{shard_id}.parquet"


def parquet_bytes(data: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(data, buffer, compression="zstd")
    return buffer.getvalue()


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
