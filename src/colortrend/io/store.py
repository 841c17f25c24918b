"""The output dataset: tables of Parquet shards, committed atomically with a marker per shard.

Layout under the config's ``output`` (a folder, or an fsspec URL such as ``s3://bucket/colortrend/2016``)::

    photos/part-<id>.parquet   faces/...   garments/...     one file per shard and table
    histograms/part-all.parquet                              rebuilt from all committed rows after each run
    report/index.html
    _markers/<id>.json         the commit record of shard <id>: its files with their sizes and sha256, row counts,
                               photos by status, stage fingerprints (the shard's photo ids, sizes and mtimes are in
                               photos/part-<id>)
    _staging/                  files being written (a reader globbing *.parquet never sees them)
    _runs/<time>.json          resolved config, versions, model checksums and summary of each run
    _logs/<id>.tsv             per-shard list of photos that failed, with their status and error
    _partials/<id>.<key>.parquet   what aggregation needs of shard <id> under histogram settings <key> (a cache)
    _index/hashes/             content_hash -> photo_id of the committed analysed photos, partitioned by hash
                               (``colortrend.io.hash_index``: a delta per commit, written before its marker)

A shard commits in three steps: write every table's file under ``_staging/``, write the marker (the commit point),
move the files into their table folders. ``recover()`` finishes the moves of a shard whose marker exists and deletes
staging files of shards that never reached their marker, so a run killed at any moment leaves either the whole
shard or nothing. Readers that must see only committed rows use ``read_table`` (files named by markers).
On object stores the moves are copies and deletes, not renames; the marker still decides what is committed.

A committed file can still be damaged afterwards (truncated, zeroed, replaced, deleted). ``damage()`` finds it
cheaply from one listing per table folder: sizes always, and on a local disk the sha256 of any file whose mtime
moved since its commit (rename keeps the mtime, so an untouched file is never read); ``read_table`` checks the
sha256 of every file it reads whole, since it holds the bytes anyway. Object stores get the size check only:
reading every object each night would cost a GET per file.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from colortrend.errors import OutputError, environment_problem
from colortrend.io import hash_index
from colortrend.io.fs import display, filesystem, is_local

SHARD_TABLES = ("photos", "faces", "garments")
MARKERS = "_markers"
STAGING = "_staging"
#: Per-shard partial tables of the aggregation (``colortrend.aggregate.partials``), named ``<shard>.<key>.parquet``.
PARTIALS = "_partials"
#: The content-hash index duplicate marking reads (``colortrend.io.hash_index``).
INDEX = "_index"
_PARTIAL_NAME = re.compile(r"^(?P<shard>.+)\.[0-9a-f]{16}\.parquet$")
#: The folders every output starts with (``prepare``); aggregates add ``histograms/`` and ``report/``.
FOLDERS = (*SHARD_TABLES, MARKERS, STAGING, "_runs", "_logs", PARTIALS, INDEX)


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
        """Replace a file atomically: readers see the old file or the new one, never a part. A failed write (disk
        full, read-only) leaves nothing behind and is an ``OutputError`` naming the file."""
        with self._writing(rel):
            if self.local:
                atomic_write(Path(self.path(rel)), data)
            else:
                self.fs.pipe_file(self.path(rel), data)  # one PUT: an object appears whole or not at all

    @contextlib.contextmanager
    def _writing(self, rel: str):
        try:
            yield
        except OSError as exc:
            raise OutputError(f"output: {environment_problem(exc, self.uri(rel))}") from None

    def write_json(self, rel: str, obj: dict) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode("utf-8"))

    def move(self, src: str, dst: str) -> None:
        with self._writing(dst):
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
    def commit_shard(self, shard_id: str, tables: dict[str, pa.Table], marker: dict) -> dict:
        """Write a shard's tables atomically (see module docstring); replaces an older shard of the same id.

        The marker records each file's size and sha256 (and, locally, its mtime): what ``damage()`` checks. The
        shard's content-hash index delta is written before the marker, under a token the marker records: until
        the marker is written it does not count (``hash_index``). Returns the marker written."""
        files = {t: f"{t}/part-{shard_id}.parquet" for t in tables}
        sizes, digests, mtimes = {}, {}, {}
        token = hash_index.new_token()
        previous = self.read_marker(shard_id)  # a shard of the same id, replaced by this commit
        try:
            if "photos" in tables:
                hash_index.write_delta(self, shard_id, token, tables["photos"])
            for table, data in tables.items():
                payload = parquet_bytes(data)
                self.write_bytes(_staged(table, shard_id), payload)
                sizes[table], digests[table] = len(payload), hashlib.sha256(payload).hexdigest()
                if self.local:  # a rename keeps it: a file whose mtime moved was touched after its commit
                    mtimes[table] = os.stat(self.path(_staged(table, shard_id))).st_mtime_ns
            record = {**marker, "shard": shard_id, "files": files, "rows": {t: d.num_rows for t, d in tables.items()},
                      "bytes": sizes, "sha256": digests, **({"mtime_ns": mtimes} if mtimes else {}),
                      "hash_index": token}
            self.write_json(self.marker(shard_id), record)  # the commit point
        except BaseException:
            if (self.read_marker(shard_id) or {}).get("hash_index") != token:  # never committed: leave nothing
                for rel in (*(_staged(table, shard_id) for table in tables), hash_index.delta_path(shard_id, token)):
                    with contextlib.suppress(Exception):
                        self.delete(rel)
            raise
        if previous and previous.get("hash_index") not in (None, token):
            self.delete(hash_index.delta_path(shard_id, previous["hash_index"]))
        self._finish_moves(shard_id, files)
        return record

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
        if marker and "hash_index" in marker:  # its entries stopped counting with the marker; compacted ones stay
            self.delete(hash_index.delta_path(shard_id, marker["hash_index"]))

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
        actions += [f"removed partial of uncommitted shard {shard}" for shard in self.remove_partials(set(markers))]
        actions += hash_index.clean(self, hash_index.tokens_of(markers))
        return actions

    def remove_partials(self, keep: set[str]) -> list[str]:
        """Delete the aggregation's cached partials (files named like one) of shards not in ``keep``; nothing else
        in ``_partials/`` is touched. Returns the shard of each partial deleted."""
        removed = []
        for name in self.list(PARTIALS, ".parquet"):
            shard = partial_shard(name)
            if shard is not None and shard not in keep:
                self.delete(f"{PARTIALS}/{name}")
                removed.append(shard)
        return removed

    # ---- read ---------------------------------------------------------------------------------------------------
    def markers(self) -> dict[str, dict]:
        """Every commit record, by shard id. A record of the wrong shape stops with an ``OutputError`` naming it.

        Why not skip it as uncommitted: markers are written atomically, so a malformed one was never written by a
        run; it was damaged or written by someone else. The marker decides which rows count and which files
        recovery moves or deletes, so guessing could delete a shard's files or count its photos twice; the user
        who moves the file away gets that shard redone by the next run.
        """
        out = {}
        shared: dict[str, str] = {}  # one copy of the keys and short values (fingerprints, tokens) every record holds

        def compact(pairs: list[tuple]) -> dict:
            return {sys.intern(k): shared.setdefault(v, v) if type(v) is str and len(v) <= 16 else v for k, v in pairs}

        for name in self.list(MARKERS, ".json"):
            shard_id = name[: -len(".json")]
            rel = f"{MARKERS}/{name}"
            try:
                text = self.fs.cat_file(self.path(rel)).decode("utf-8")
                marker = json.loads(text, object_pairs_hook=compact)
            except FileNotFoundError:
                continue  # dropped by a concurrent replacement between listing and reading
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise OutputError(f"output: {self.uri(rel)} is not a colortrend commit record ({_reason(exc)}); "
                                  "move it away and the next run redoes that shard") from None
            problem = marker_problem(shard_id, marker)
            if problem:
                raise OutputError(f"output: {self.uri(rel)} is not a colortrend commit record ({problem}); "
                                  "move it away and the next run redoes that shard")
            out[shard_id] = marker
        return out

    def has_commits(self) -> bool:
        """Whether any shard is committed: one listing of ``_markers/``, no record read (:meth:`markers` reads and
        checks every one, seconds at tens of thousands)."""
        return bool(self.list(MARKERS, ".json"))

    def read_marker(self, shard_id: str) -> dict | None:
        marker = self.read_json(self.marker(shard_id))
        return marker if isinstance(marker, dict) and not marker_problem(shard_id, marker) else None

    # ---- damage -------------------------------------------------------------------------------------------------
    def damage(self, markers: dict[str, dict]) -> dict[str, str]:
        """Shards whose committed files are missing or not the bytes committed -> what is wrong, naming the file.

        One listing per table folder gives every size (and locally every mtime); only a local file whose mtime
        moved is read (its sha256 decides). Markers written before sizes were recorded get their Parquet footer
        read instead (its row count must match the marker's)."""
        listed = {table: self._file_stats(table) for table in SHARD_TABLES}
        damaged = {}
        for shard_id, marker in markers.items():
            for table, rel in marker["files"].items():
                problem = self._file_problem(marker, table, rel, listed.get(table, {}).get(rel.rsplit("/", 1)[-1]))
                if problem == "is missing" and self.exists(_staged(table, shard_id)):
                    continue  # committed, still being moved into place (or killed meanwhile: recovery moves it)
                if problem:
                    damaged[shard_id] = f"{self.uri(rel)} {problem}"
                    break
        return damaged

    def _file_stats(self, folder: str) -> dict[str, tuple[int, int | None]]:
        """name -> (size, mtime_ns or None) of the regular files directly in ``folder``."""
        if self.local:
            try:
                with os.scandir(self.path(folder)) as entries:
                    return {e.name: (st.st_size, st.st_mtime_ns) for e in entries
                            if e.is_file(follow_symlinks=False) and (st := e.stat(follow_symlinks=False))}
            except (FileNotFoundError, NotADirectoryError):
                return {}
        try:
            entries = self.fs.ls(self.path(folder), detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: (int(e.get("size") or 0), None)
                for e in entries if e.get("type") != "directory"}

    def _file_problem(self, marker: dict, table: str, rel: str, stat: tuple[int, int | None] | None) -> str | None:
        if stat is None:
            return "is missing"
        size, mtime = stat
        expected = marker.get("bytes", {}).get(table)
        if expected is None:  # committed before sizes were recorded: the footer must parse and agree
            return self._footer_problem(rel, marker.get("rows", {}).get(table))
        if size != expected:
            return f"is {size:,} bytes; its commit record says {expected:,}"
        committed_mtime = marker.get("mtime_ns", {}).get(table)
        if committed_mtime is not None and mtime is not None and mtime != committed_mtime:
            try:
                digest = _sha256_file(self.path(rel))
            except OSError as exc:
                return f"cannot be read ({exc.strerror or exc})"
            if digest != marker["sha256"][table]:
                return "holds other bytes than those committed (its sha256 differs)"
        return None

    def _footer_problem(self, rel: str, rows: int | None) -> str | None:
        import pyarrow.parquet as pq

        try:
            with self.fs.open(self.path(rel), "rb") as f:
                found = pq.ParquetFile(f).metadata.num_rows
        except (OSError, pa.ArrowException) as exc:
            return f"is not a readable Parquet file ({_reason(exc)})"
        if rows is not None and found != rows:
            return f"holds {found:,} rows; its commit record says {rows:,}"
        return None

    # ---- read committed rows ------------------------------------------------------------------------------------
    def iter_table(self, table: str, columns: list[str] | None = None, schema: pa.Schema | None = None,
                   markers: dict[str, dict] | None = None) -> Iterator[tuple[str, pa.Table]]:
        """(shard id, rows) of each committed file of a shard table, one file at a time (of ``markers``, default
        all). A file read whole has its sha256 checked; a damaged file is an ``OutputError`` naming it."""
        for shard_id, marker in (self.markers() if markers is None else markers).items():
            rows = self.read_shard(shard_id, marker, table, columns, schema)
            if rows is not None:
                yield shard_id, rows

    def read_shard(self, shard_id: str, marker: dict, table: str, columns: list[str] | None = None,
                   schema: pa.Schema | None = None, present_only: bool = False) -> pa.Table | None:
        """One committed shard's rows of ``table`` (None when the shard has no such file, or it is being moved
        into place or was just replaced). ``present_only`` reads those of ``columns`` the file has (older shards
        may lack some). A file read whole has its sha256 checked; a damaged file is an ``OutputError`` naming it."""
        import pyarrow.parquet as pq

        rel = marker["files"].get(table)
        if rel is None:
            return None
        try:
            if columns is None:  # the whole file is read anyway: check it is the one committed
                data = self.fs.cat_file(self.path(rel))
                expected = marker.get("sha256", {}).get(table)
                if expected is not None and hashlib.sha256(data).hexdigest() != expected:
                    raise OutputError(f"output: {self.uri(rel)} holds other bytes than those committed (its "
                                      "sha256 differs); `colortrend run` redoes that shard")
                source = pa.BufferReader(data)
            else:
                source = self.fs.open(self.path(rel), "rb")
            with source:
                if present_only and columns is not None:
                    parquet = pq.ParquetFile(source)
                    return parquet.read(columns=[c for c in columns if c in parquet.schema_arrow.names])
                return pq.read_table(source, columns=columns, schema=schema)
        except FileNotFoundError:
            if self.exists(_staged(table, shard_id)):
                return None  # committed, still being moved into place: its rows are visible once it is
            if self.exists(self.marker(shard_id)):
                raise OutputError(f"output: {self.uri(rel)} is missing; `colortrend run` redoes that "
                                  "shard") from None
            return None  # dropped by a concurrent replacement between listing and reading
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"output: {self.uri(rel)} is damaged ({_reason(exc)}); `colortrend run` redoes "
                              "that shard") from None

    def read_table(self, table: str, schema: pa.Schema | None = None, columns: list[str] | None = None,
                   markers: dict[str, dict] | None = None) -> pa.Table:
        """All committed rows of a table as one Arrow table (empty, with ``schema``, when nothing is committed)."""
        if table in SHARD_TABLES:
            parts = [rows for _, rows in self.iter_table(table, columns, schema, markers)]
        else:
            parts = [self._read_file(f"{table}/{name}", columns, schema) for name in self.list(table, ".parquet")]
        if not parts:
            if schema is None:
                return pa.table({})
            return schema.empty_table().select(columns) if columns else schema.empty_table()
        return pa.concat_tables(parts, promote_options="permissive")

    def _read_file(self, rel: str, columns: list[str] | None, schema: pa.Schema | None) -> pa.Table:
        import pyarrow.parquet as pq

        try:
            with self.fs.open(self.path(rel), "rb") as f:
                return pq.read_table(f, columns=columns, schema=schema)
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"output: {self.uri(rel)} is damaged ({_reason(exc)}); `colortrend report` "
                              "rebuilds it") from None

    def write_parquet(self, rel: str, data: pa.Table) -> None:
        """One Parquet file (zstd), written atomically."""
        self.write_bytes(rel, parquet_bytes(data))

    def write_table(self, table: str, data: pa.Table, name: str = "part-all") -> str:
        """Replace a whole (small, aggregate) table with one file, atomically."""
        self.fs.makedirs(self.path(table), exist_ok=True)
        rel = f"{table}/{name}.parquet"
        self.write_parquet(rel, data)
        for stale in self.list(table, ".parquet"):
            if stale != f"{name}.parquet":
                self.delete(f"{table}/{stale}")
        return rel


def marker_problem(shard_id: str, marker) -> str | None:
    """What makes ``marker`` not a commit record of ``shard_id`` (None when it is one). Its files must be exactly
    the names a commit gives them: recovery and replacement move and delete the files a marker names."""
    if not isinstance(marker, dict):
        return f"a JSON {type(marker).__name__}, not an object"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "no `files`"
    for table, rel in files.items():
        if table not in SHARD_TABLES or rel != f"{table}/part-{shard_id}.parquet":
            return f"`files` names {str(rel)[:80]!r} for {str(table)[:40]!r}"
    if marker.get("shard", shard_id) != shard_id:
        return f"its `shard` is {str(marker['shard'])[:40]!r}, its name says {shard_id!r}"
    for key, kind in (("fingerprint", str), ("hash_index", str), ("photo_ids", list), ("replaces", list),
                      ("rows", dict), ("bytes", dict), ("sha256", dict), ("mtime_ns", dict), ("statuses", dict)):
        if key in marker and not isinstance(marker[key], kind):
            return f"`{key}` is a {type(marker[key]).__name__}"
    if "hash_index" in marker and not hash_index.is_token(marker["hash_index"]):  # it names a file we delete
        return f"`hash_index` is {str(marker['hash_index'])[:40]!r}, not a token"
    for key in ("photo_ids", "replaces"):
        if not all(isinstance(v, str) for v in marker.get(key, [])):
            return f"`{key}` holds something other than ids"
    for key, kind in (("rows", int), ("bytes", int), ("sha256", str), ("mtime_ns", int)):
        values = marker.get(key, {})
        if any(t not in files or not isinstance(v, kind) or isinstance(v, bool) for t, v in values.items()):
            return f"`{key}` is not one {kind.__name__} per file"
    if not all(type(count) is int for count in marker.get("statuses", {}).values()):  # (JSON keys are strings)
        return "`statuses` is not a count per status"
    if "bytes" in marker and set(marker.get("sha256", {})) != set(marker["bytes"]):
        return "`bytes` and `sha256` name different files"
    return None


def _reason(exc: BaseException) -> str:
    return " ".join(str(getattr(exc, "strerror", None) or exc).split())[:200]


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _staged(table: str, shard_id: str) -> str:
    return f"{STAGING}/{table}-part-{shard_id}.parquet"


def parquet_bytes(data: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(data, buffer, compression="zstd")
    return buffer.getvalue()


def atomic_write(path: Path, data: bytes) -> None:
    """Write next to the target under a hidden name, fsync, rename: the final name only ever holds a whole file.
    A failed write (disk full) removes the hidden file and raises.

    The file is created with mode 0666 and the umask applied, as ``open()`` creates files (``mkstemp`` would
    make it 0600: analysts sharing a group could not read the tables)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[_write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_write = os.write  # the one low-level write of output files (a test makes it fail as a full disk does)
