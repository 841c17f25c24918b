"""Where photos and outputs live: local paths, or fsspec URLs (``s3://bucket/photos``, ``gs://``, ``hdfs://``,
``memory://``) for anything else.

Local paths keep the operating system's guarantees (exclusive create, fsync, atomic rename). On other filesystems
the store relies on what object stores do give: a whole-object PUT appears complete or not at all, and
``open(mode="xb")`` is an exclusive create (S3 conditional writes, memory). Their renames are copy + delete, which
the store's marker protocol already tolerates (see ``store.py``). The filesystem packages (``s3fs``, ``gcsfs``...)
are the user's to install; fsspec names the missing one when a URL needs it.
"""
from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem


def is_url(path: str | os.PathLike) -> bool:
    """True for ``protocol://...`` locations other than ``file://`` (which is just a local path)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def url_schemes(path: str | os.PathLike) -> frozenset[str]:
    """Every protocol that opening ``path`` would use: ``{"s3"}`` for ``s3://bucket/key``, each link of a chained
    URL (``zip://a.jpg::ftp://host/b.zip`` opens ftp too), nothing for a local path."""
    if not is_url(path):
        return frozenset()
    return frozenset(part.split("://", 1)[0].lower() if "://" in part else part.lower()
                     for part in str(path).split("::"))


def local_path(path: str | os.PathLike) -> str:
    """A ``file://`` URL or a plain path as an absolute local path."""
    text = str(path)
    return os.path.abspath(text.removeprefix("file://"))


def filesystem(url: str | os.PathLike) -> tuple["AbstractFileSystem", str]:
    """The fsspec filesystem of ``url`` and the path on it (protocol stripped; absolute for local paths)."""
    from fsspec.core import url_to_fs

    return url_to_fs(str(url) if is_url(url) else local_path(url))


def display(fs: "AbstractFileSystem", path: str) -> str:
    """How a user should see ``path`` on ``fs``: a plain path when local, a full URL otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def is_local(fs: "AbstractFileSystem") -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def file_size(path: str) -> int:
    """Size in bytes of a regular file; ``OSError`` for anything else (a named pipe or a device named ``x.jpg``
    would block or never end if read)."""
    if not is_url(path):
        return _local_file_size(path)
    info = _remote(path, lambda fs, inner: fs.info(inner))  # one request for type and size
    if info.get("type") == "directory":
        raise IsADirectoryError(21, "Is a directory", path)
    return int(info["size"])


def _local_file_size(path: str) -> int:
    info = os.stat(path)
    mode = info.st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(21, "Is a directory", path)
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFIFO: "a named pipe", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
                stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "not a regular file")
        raise OSError(f"{kind}, not a regular file")
    return info.st_size


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """The bytes of one input file, at most ``limit`` + 1 of them (a file may grow after its size was checked).

    Call :func:`file_size` first: it refuses named pipes and devices, which this would block on or never finish.
    """
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read(-1 if limit is None else limit + 1)
    end = None if limit is None else limit + 1
    return _remote(path, lambda fs, inner: fs.cat_file(inner, start=0 if end else None, end=end))


def _remote(path: str, operation):
    """Run ``operation(fs, inner_path)``; errors surface as ``OSError``, like those of local files."""
    try:
        fs, inner = filesystem(path)  # may connect (ftp, sftp) or need a package: this file's problem, not the run's
        return operation(fs, inner)
    except OSError:
        raise
    except Exception as exc:  # botocore & co. raise their own types; callers handle OSError
        raise OSError(f"{type(exc).__name__}: {exc}") from exc
