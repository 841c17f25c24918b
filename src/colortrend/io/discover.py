"""Turn ``input.paths`` (folders, globs, manifest files; local or fsspec URLs) into the sorted list of files a run
must account for."""
from __future__ import annotations

import glob
import hashlib
import hmac
import os

from colortrend.errors import ConfigError
from colortrend.io.fs import filesystem, is_url, local_path

MANIFEST_SUFFIXES = (".csv", ".parquet")


def discover(paths: tuple[str, ...], exclude: str | None = None) -> list[str]:
    """Absolute paths (URLs for remote inputs) of every input file, sorted and unique.

    Folders are walked recursively (hidden sub-folders and ``exclude``, the run's own output, are not entered;
    symlinked folders are not followed, so a link cycle cannot hang the walk). Glob patterns expand recursively.
    A ``.csv``/``.parquet`` file is a manifest whose ``path`` column lists the inputs (relative to the manifest).
    A path that matches nothing is a config error: a typo must not look like an empty collection.
    """
    found: set[str] = set()
    excluded = local_path(exclude) if exclude and not is_url(exclude) else None
    for i, entry in enumerate(paths):
        key = f"input.paths[{i}]"
        if is_url(entry):
            found.update(_discover_url(entry, key, exclude))
            continue
        entry = entry.removeprefix("file://")
        if glob.has_magic(entry):
            matches = glob.glob(entry, recursive=True)
            if not matches:
                raise ConfigError(f"{key}: pattern {entry!r} matches no file")
            for match in matches:
                _add(found, match, excluded)
        elif os.path.isdir(entry):
            _walk(found, entry, excluded)
        elif os.path.isfile(entry) and entry.lower().endswith(MANIFEST_SUFFIXES):
            found.update(read_manifest(entry, key))
        elif os.path.lexists(entry):
            found.add(os.path.abspath(entry))
        else:
            raise ConfigError(f"{key}: {entry!r} does not exist")
    return sorted(found)


def read_manifest(manifest: str, key: str = "input.paths") -> list[str]:
    import pandas as pd

    try:
        if manifest.lower().endswith(".parquet"):
            table = pd.read_parquet(manifest, columns=["path"])
        else:
            table = pd.read_csv(manifest, usecols=["path"], dtype=str, keep_default_na=False)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"{key}: manifest {manifest} needs a `path` column ({exc})") from None
    if is_url(manifest):
        base = manifest.rsplit("/", 1)[0]
        return [p if is_url(p) else f"{base}/{p.lstrip('/')}" for p in table["path"].astype(str) if p]
    base = os.path.dirname(os.path.abspath(manifest))
    return [p if is_url(p) else os.path.abspath(os.path.join(base, p)) for p in table["path"].astype(str) if p]


def _discover_url(url: str, key: str, exclude: str | None) -> list[str]:
    """``discover`` for one fsspec URL: a folder (prefix), a glob, a manifest or a single file."""
    try:
        fs, path = filesystem(url)
    except (ImportError, ValueError) as exc:  # e.g. s3fs not installed, or an unknown protocol
        raise ConfigError(f"{key}: {url!r}: {exc}") from None
    skip = filesystem(exclude)[1].rstrip("/") + "/" if exclude and is_url(exclude) else None
    try:
        if glob.has_magic(path):
            static = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
            roots = [m for m in fs.glob(path) if not _hidden(m[len(static) :])]  # as local globs skip dot-files
            if not roots:
                raise ConfigError(f"{key}: pattern {url!r} matches no file")
        elif fs.isfile(path) and path.lower().endswith(MANIFEST_SUFFIXES):
            return read_manifest(url, key)
        elif fs.exists(path):
            roots = [path]
        else:
            raise ConfigError(f"{key}: {url!r} does not exist")
        files = []
        for root in roots:
            if not fs.isdir(root):
                files.append(root)
                continue
            for found in fs.find(root):
                if not _hidden(found[len(root.rstrip("/")) :]) and not (skip and found.startswith(skip)):
                    files.append(found)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot list {url!r} ({exc})") from None
    return [fs.unstrip_protocol(f) for f in files]


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def _walk(found: set[str], root: str, excluded: str | None) -> None:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = os.path.abspath(dirpath)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and os.path.join(here, d) != excluded and not os.path.islink(os.path.join(here, d))
        )
        for name in filenames:
            if not name.startswith("."):
                found.add(os.path.join(here, name))


def _add(found: set[str], match: str, excluded: str | None) -> None:
    if os.path.isdir(match):
        _walk(found, match, excluded)
    else:
        found.add(os.path.abspath(match))


def photo_id_for(path: str) -> str:
    """Stable id of an input file: the same path always gets the same id, in every run and on every worker."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def keyed_photo_id(path: str, key: bytes | None) -> str:
    """``photo_id_for`` keyed with the output's secret (``privacy.hash_paths``): an HMAC, so a guessed path cannot
    be confirmed without the key. Without a key, the plain id (outputs keep the ids they were written with)."""
    if key is None:
        return photo_id_for(path)
    return hmac.new(key, path.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()[:16]
