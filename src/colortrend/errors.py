"""Typed errors the library raises; the CLI turns each into one line and an exit code."""
from __future__ import annotations

import errno
import os


class ColortrendError(Exception):
    """Base class: something the user can fix, reported as one line."""

    exit_code = 1


class ConfigError(ColortrendError):
    """The config (or the environment it asks for) is invalid. Raised before anything is written."""

    exit_code = 2


class LockedError(ColortrendError):
    """Another live run holds the output folder."""

    exit_code = 3


class OutputError(ColortrendError):
    """The output folder is damaged (a file its commit record names is missing or altered, a record of the wrong
    shape) or cannot be written (disk full, read-only). One line naming the file and the problem."""

    exit_code = 2


#: What the environment refuses (full disk, read-only or forbidden folder): the user's to fix, not a bug.
ENVIRONMENT_ERRORS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only "
                      "filesystem", errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                      errno.EFBIG: "file too large"}


def environment_problem(exc: OSError, where: str | None = None) -> str:
    """``disk full writing in out/report (No space left on device); ...``: what, where, and that it is safe to retry.

    ``where`` names the place when the error does not (a remote store's, or a folder being written)."""
    what = ENVIRONMENT_ERRORS.get(exc.errno, "cannot write")
    path = str(exc.filename or "")
    # A file being created (often under a temporary name): its folder is what the user must look at.
    place = (f" at {path}" if path and os.path.exists(path) else f" in {os.path.dirname(path)}" if path
             else f" in {where}" if where else "")
    return f"{what}{place} ({exc.strerror or exc}); nothing committed was lost, run again once it is fixed"
