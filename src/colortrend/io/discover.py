"""Turn ``input.paths`` (folders, globs, manifest files; local or fsspec URLs) into the files a run must account
for, streamed one at a time with the size and modification time the listing gives (what planning compares with
the committed ones to notice changed files).

What is never listed: the run's own output (compared by real path: the output inside an input folder, reached
through a symlink, or matched by a glob), hidden files and folders, and symlinked folders (in walks and globs alike:
a link cycle cannot multiply the files or hang the listing). A folder reached twice (two inputs naming it, or a
symlinked input root) is walked once.
"""
from __future__ import annotations

import datetime
import fnmatch
import glob
import hashlib
import hmac
import logging
import os
from typing import Iterator, NamedTuple

from colortrend.errors import ConfigError
from colortrend.io.fs import filesystem, is_url, local_path

log = logging.getLogger(__name__)
MANIFEST_SUFFIXES = (".csv", ".parquet")
MANIFEST_BATCH_ROWS = 65536
FOLDERS_REMEMBERED = 65536  # folders of a manifest whose place (inside the output or not) is remembered at a time


class Listed(NamedTuple):
    """One input file as listed: its path (a URL for remote inputs) and what the listing says of its version."""

    path: str
    size: int | None  # bytes; None where the listing gives none (a dangling link, a remote manifest row)
    mtime_ns: int | None  # modification time; None where unknown
    etag: str | None = None  # an object store's version tag, where it gives one


def discover(paths: tuple[str, ...], exclude: str | None = None) -> list[str]:
    """Absolute paths (URLs for remote inputs) of every input file, sorted and unique (see :func:`iter_inputs`)."""
    return sorted({entry.path for entry in iter_inputs(paths, exclude)})


def iter_inputs(paths: tuple[str, ...], exclude: str | None = None) -> Iterator[Listed]:
    """Every input file of ``paths``, one at a time, in no particular order; a file may come twice when two
    inputs name it (callers de-duplicate by path).

    Folders are walked recursively, globs expand recursively (``**``), a ``.csv``/``.parquet`` file is a manifest
    whose ``path`` column lists the inputs (relative to the manifest). ``exclude`` is the run's own output: nothing
    inside it is listed, and an input inside it is a config error. A path that matches nothing is a config error:
    a typo must not look like an empty collection.
    """
    output = _Output(exclude)
    walked: set[tuple[int, int]] = set()  # (device, inode) of every folder walked: each one once
    for i, entry in enumerate(paths):
        yield from _iter_entry(entry, f"input.paths[{i}]", exclude, output, walked)


def check_inputs(paths: tuple[str, ...], exclude: str | None = None) -> None:
    """The config errors :func:`iter_inputs` would raise, found without listing everything: each input is
    listed up to its first file (a pattern that matches nothing is listed whole)."""
    output = _Output(exclude)
    for i, entry in enumerate(paths):
        next(_iter_entry(entry, f"input.paths[{i}]", exclude, output, set()), None)


def _iter_entry(entry: str, key: str, exclude: str | None, output: "_Output",
                walked: set[tuple[int, int]]) -> Iterator[Listed]:
    if is_url(entry):
        yield from _iter_url(entry, key, exclude)
        return
    entry = entry.removeprefix("file://")
    if glob.has_magic(entry):
        base = _glob_base(os.path.abspath(entry))
        if output.holds(os.path.realpath(base)):
            raise ConfigError(f"{key}: {entry} is inside the output folder {exclude}; colortrend never reads "
                              "its own output")
        found = False
        for listed in _glob(os.path.abspath(entry), output, walked):
            found = True
            yield listed
        if not found:
            raise ConfigError(f"{key}: pattern {entry!r} matches no file")
        return
    if not os.path.lexists(entry):
        raise ConfigError(f"{key}: {entry!r} does not exist")
    if output.holds(os.path.realpath(entry)):
        raise ConfigError(f"{key}: {entry} is inside the output folder {exclude}; colortrend never reads its "
                          "own output")
    if os.path.isdir(entry):
        yield from _walk(os.path.abspath(entry), output, walked)
    elif os.path.isfile(entry) and entry.lower().endswith(MANIFEST_SUFFIXES):
        yield from _manifest_rows(entry, key, output)
    else:
        yield _listed_local(os.path.abspath(entry))


class _Output:
    """The run's output folder, recognised by real path and by (device, inode), however a path reaches it."""

    def __init__(self, output: str | None):
        self.real = None
        self.identity = None
        if output and not is_url(output):
            self.real = os.path.realpath(local_path(output))
            try:
                st = os.stat(self.real)
                self.identity = (st.st_dev, st.st_ino)
            except OSError:
                pass  # not created yet: nothing of it can be listed

    def holds(self, real_path: str) -> bool:
        """True if ``real_path`` (already resolved) is the output folder or inside it."""
        return self.real is not None and (real_path == self.real or real_path.startswith(self.real.rstrip("/") + "/"))

    def is_folder(self, entry: os.DirEntry) -> bool:
        """True if the folder ``entry`` is the output (the inode from the directory listing is free; the device
        is looked up only when the inode matches)."""
        if self.identity is None or entry.inode() != self.identity[1]:
            return False
        try:
            return os.stat(entry.path).st_dev == self.identity[0]
        except OSError:
            return False


def _listed_local(path: str, entry: os.DirEntry | None = None) -> Listed:
    try:
        st = entry.stat() if entry is not None else os.stat(path)  # follows a symlinked file to what it names
    except OSError:
        return Listed(path, None, None)  # a dangling link, or gone meanwhile: intake gives it its error row
    return Listed(path, st.st_size, st.st_mtime_ns)


def _visit_once(path: str, walked: set[tuple[int, int]]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    identity = (st.st_dev, st.st_ino)
    if identity in walked:
        return False
    walked.add(identity)
    return True


def _walk(root: str, output: _Output, walked: set[tuple[int, int]]) -> Iterator[Listed]:
    """Files under the folder ``root`` (itself may be a symlink the user named; links below it are not followed)."""
    stack = [root]
    while stack:
        folder = stack.pop()
        if not _visit_once(folder, walked):
            continue
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s (%s): its files are not counted", folder, exc.strerror or exc)
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            listed = _entry(entry, output)
            if listed is _FOLDER:
                subfolders.append(entry.path)
            elif listed is not None:
                yield listed
        stack.extend(reversed(subfolders))


_FOLDER = Listed("", None, None)  # sentinel: the entry is a real folder to descend into


def _entry(entry: os.DirEntry, output: _Output) -> Listed | None:
    """What one directory entry is to the listing: a file, a folder to enter, or nothing (skipped)."""
    try:
        if entry.is_dir(follow_symlinks=False):
            return None if output.is_folder(entry) else _FOLDER
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.isdir(target) or output.holds(target):
                return None  # a symlinked folder is not followed; a link into the output is the output
    except OSError:
        pass
    return _listed_local(entry.path, entry)


def _glob(pattern: str, output: _Output, walked: set[tuple[int, int]]) -> Iterator[Listed]:
    """Local glob with ``**``, as :func:`glob.glob` matches (hidden names only by a pattern starting with ``.``),
    except that symlinked folders are never followed and the output is never entered. A matched folder is walked."""
    base = _glob_base(pattern)
    yield from _glob_in(base, [p for p in pattern[len(base):].split("/") if p], output, walked)


def _glob_base(pattern: str) -> str:
    """The folder a pattern's first wildcard part is in (``/a/b`` of ``/a/b/*/c.jpg``)."""
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    return "/".join(parts[:first]) or "/"


def _glob_in(folder: str, parts: list[str], output: _Output, walked: set[tuple[int, int]]) -> Iterator[Listed]:
    if not parts:
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        if rest:
            yield from _glob_in(folder, rest, output, walked)  # ** matching no folder at all
        else:
            yield from _walk(folder, output, walked)  # a trailing ** matches everything below
            return
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") and not part.startswith("."):
            continue
        if part != "**" and not fnmatch.fnmatchcase(entry.name, part):
            continue
        listed = _entry(entry, output)
        if listed is _FOLDER:
            if part == "**":
                yield from _glob_in(entry.path, parts, output, walked)
            elif rest:
                yield from _glob_in(entry.path, rest, output, walked)
            else:
                yield from _walk(entry.path, output, walked)
        elif listed is not None and not rest and part != "**":
            yield listed


def _manifest_rows(manifest: str, key: str, output: _Output) -> Iterator[Listed]:
    """The files a local manifest lists, read in batches (a manifest of millions of rows is never all in memory)."""
    base = os.path.dirname(os.path.abspath(manifest))
    inside_output: dict[str, bool] = {}  # per folder: are its files inside the output (one realpath per folder)
    skipped = 0
    for batch in _manifest_batches(manifest, key):
        if len(inside_output) > FOLDERS_REMEMBERED:  # a manifest may name a folder per file: memory stays bounded
            inside_output.clear()
        for path in batch:
            if is_url(path):
                yield Listed(path, None, None)
                continue
            path = os.path.abspath(os.path.join(base, path))
            folder = os.path.dirname(path)
            if folder not in inside_output:
                inside_output[folder] = output.holds(os.path.realpath(folder))
            if inside_output[folder] or output.holds(path):
                skipped += 1
                continue
            yield _listed_local(path)
    if skipped:
        log.warning("%s: %d rows name files inside the output folder; colortrend never reads its own output",
                    manifest, skipped)


def read_manifest(manifest: str, key: str = "input.paths") -> list[str]:
    """The paths a manifest lists, absolute (relative ones are relative to the manifest)."""
    if is_url(manifest):
        return [entry.path for entry in _url_manifest_rows(manifest, key)]
    return [entry.path for entry in _manifest_rows(manifest, key, _Output(None))]


def _manifest_batches(manifest: str, key: str) -> Iterator[list[str]]:
    """The non-empty values of the manifest's ``path`` column, in batches."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if is_url(manifest):
            fs, inner = filesystem(manifest)
            source = fs.open(inner, "rb")
        else:
            source = open(manifest, "rb")
        with source:
            if manifest.lower().endswith(".parquet"):
                reader = pq.ParquetFile(source)
                if "path" not in reader.schema_arrow.names:
                    raise KeyError("path")
                batches = reader.iter_batches(batch_size=MANIFEST_BATCH_ROWS, columns=["path"])
            else:
                batches = pacsv.open_csv(
                    source, read_options=pacsv.ReadOptions(block_size=1 << 22),
                    parse_options=pacsv.ParseOptions(newlines_in_values=True),  # a file name may hold one
                    convert_options=pacsv.ConvertOptions(include_columns=["path"],
                                                         column_types={"path": pa.string()},
                                                         strings_can_be_null=False))
            for batch in batches:
                column = batch.column(batch.schema.get_field_index("path"))
                yield [p for p in column.cast(pa.string()).to_pylist() if p]
    except (KeyError, ValueError, OSError, pa.ArrowException) as exc:
        raise ConfigError(f"{key}: manifest {manifest} needs a `path` column "
                          f"({' '.join(str(exc).split())[:200]})") from None


def _url_manifest_rows(manifest: str, key: str) -> Iterator[Listed]:
    base = manifest.rsplit("/", 1)[0]
    for batch in _manifest_batches(manifest, key):
        for path in batch:
            # A remote manifest row is not looked up (one request per row): its version is unknown.
            yield Listed(path if is_url(path) else f"{base}/{path.lstrip('/')}", None, None)


def _iter_url(url: str, key: str, exclude: str | None) -> Iterator[Listed]:
    """:func:`iter_inputs` for one fsspec URL: a folder (prefix), a glob, a manifest or a single file."""
    try:
        fs, path = filesystem(url)
    except (ImportError, ValueError) as exc:  # e.g. s3fs not installed, or an unknown protocol
        raise ConfigError(f"{key}: {url!r}: {exc}") from None
    skip = filesystem(exclude)[1].rstrip("/") if exclude and is_url(exclude) else None

    def outside(found: str) -> bool:
        return not (skip and (found == skip or found.startswith(skip + "/")))

    try:
        if glob.has_magic(path):
            static = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            roots = {m: info for m, info in fs.glob(path, detail=True).items()
                     if not _hidden(m[len(static):]) and outside(m)}  # as local globs skip dot-files
            if not roots:
                raise ConfigError(f"{key}: pattern {url!r} matches no file")
        elif fs.isfile(path) and path.lower().endswith(MANIFEST_SUFFIXES):
            yield from _url_manifest_rows(url, key)
            return
        elif fs.exists(path):
            roots = {path: fs.info(path)}
        else:
            raise ConfigError(f"{key}: {url!r} does not exist")
        if not outside(path.rstrip("/")):
            raise ConfigError(f"{key}: {url} is inside the output {exclude}; colortrend never reads its own output")
        for root, info in sorted(roots.items()):
            if info.get("type") != "directory":
                yield _listed_remote(fs, root, info)
                continue
            for found, found_info in sorted(fs.find(root, detail=True).items()):
                if not _hidden(found[len(root.rstrip("/")):]) and outside(found):
                    yield _listed_remote(fs, found, found_info)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot list {url!r} ({exc})") from None


def _listed_remote(fs, path: str, info: dict) -> Listed:
    """What ``fs.info`` says of a file's version: its size, and its mtime and ETag where the store gives them."""
    size = info.get("size")
    stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated", "created") if info.get(k)),
                 None)
    etag = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "md5") if info.get(k)), None)
    return Listed(fs.unstrip_protocol(path), None if size is None else int(size), _ns(stamp), etag)


def _ns(stamp) -> int | None:
    """A listing's timestamp (datetime, epoch seconds, ISO text) as integer nanoseconds; None if not one."""
    try:
        if isinstance(stamp, str):
            stamp = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        if isinstance(stamp, datetime.datetime):
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=datetime.timezone.utc)
            return int(stamp.timestamp() * 1e6) * 1000
        if isinstance(stamp, (int, float)):
            return int(stamp * 1e9)
    except (ValueError, OverflowError):
        pass
    return None


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def photo_id_for(path: str) -> str:
    """Stable id of an input file: the same path always gets the same id, in every run and on every worker."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def keyed_photo_id(path: str, key: bytes | None) -> str:
    """``photo_id_for`` keyed with the output's secret (``privacy.hash_paths``): an HMAC, so a guessed path cannot
    be confirmed without the key. Without a key, the plain id (outputs keep the ids they were written with)."""
    if key is None:
        return photo_id_for(path)
    return hmac.new(key, path.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]
