"""One run per output: an exclusively created lock file naming its holder; a dead holder's lock is taken over.

On a local disk the lock file appears whole and already locked: the holder record is written to a private file,
``flock``-ed, then hard-linked to the lock's name (``link`` fails if the name exists), and the holder keeps the
``flock`` for the whole run, so the kernel releases it the moment the holder dies. A run finding a lock checks the
``flock`` first and the holder's pid second; it takes over a dead holder's lock only while holding that lock's
``flock`` itself, so two runs can never both take it over, nor read a half-written holder as a dead one.

Elsewhere the lock file is created with ``open(mode="xb")``: the store's exclusive create (S3 conditional writes,
memory). Where a filesystem has none it falls back to check-then-write, which only protects against runs started
seconds apart.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time

from fsspec.implementations.local import LocalFileSystem

try:
    import fcntl
except ImportError:  # Windows: the exclusive-create lock below
    fcntl = None

from colortrend.errors import LockedError, OutputError
from colortrend.io.fs import display, filesystem

LOCK_NAME = "_lock"


class RunLock:
    def __init__(self, root: str | os.PathLike):
        self.fs, root_path = filesystem(root)
        self.path = f"{root_path.rstrip('/')}/{LOCK_NAME}"
        self.held = False

    def acquire(self) -> None:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        if self.fs.isdir(self.path):  # someone made a folder of its name: it can never be a lock
            raise self._folder()
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if isinstance(self.fs, LocalFileSystem) and fcntl is not None:
            self._acquire_local(me.encode())
            return
        for _ in range(3):
            try:
                self._create(me.encode())
            except FileExistsError:
                holder = self._holder()
                if holder and _alive(holder):
                    where = display(self.fs, self.path)
                    raise LockedError(
                        f"{where.rsplit('/', 1)[0]} is in use by pid {holder['pid']} on {holder['host']} "
                        f"(since {holder.get('since', '?')}); remove {where} if that process is gone"
                    ) from None
                with contextlib.suppress(FileNotFoundError):  # left by a process that died: take it over
                    self.fs.rm_file(self.path)
                continue
            self.held = True
            return
        raise LockedError(f"could not take the lock {display(self.fs, self.path)}")

    def _create(self, data: bytes) -> None:
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(data)
        except (ValueError, NotImplementedError):  # this filesystem has no exclusive create
            if self.fs.exists(self.path):
                raise FileExistsError(self.path) from None
            self.fs.pipe_file(self.path, data)

    def _acquire_local(self, me: bytes) -> None:
        for _ in range(20):
            try:
                self._fd = _create_locked(self.path, me)
                self.held = True
                return
            except FileExistsError:
                pass
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except IsADirectoryError:
                raise self._folder() from None
            try:
                if not _try_flock(fd):  # a live run holds it
                    raise self._locked(self._holder())
                holder = self._holder()
                if holder and _alive(holder):  # written by a live process that does not flock (or still writing)
                    raise self._locked(holder)
                if not _same_file(fd, self.path):
                    continue  # replaced meanwhile
                os.unlink(self.path)  # a dead holder's: removed while we hold its flock, so by us alone
            finally:
                os.close(fd)
        raise LockedError(f"could not take the lock {display(self.fs, self.path)}")

    def live_holder(self) -> dict | None:
        """The record of the run holding this lock now, or None (no lock, or one left by a run that died)."""
        holder = self._holder()
        if not (isinstance(self.fs, LocalFileSystem) and fcntl is not None):
            return holder if holder and _alive(holder) else None
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError):
            return None
        if os.path.isdir(self.path):  # a folder in the lock's place holds nothing
            os.close(fd)
            return None
        try:
            if not _try_flock(fd):
                return holder or {"pid": "?", "host": "?"}
            return holder if holder and _alive(holder) else None
        finally:
            os.close(fd)  # closing drops the flock this check took

    def _folder(self) -> OutputError:
        return OutputError(f"output: the lock {display(self.fs, self.path)} is a folder, not colortrend's lock "
                           "file; remove it (no run can hold the output while it is there)")

    def _locked(self, holder: dict | None) -> LockedError:
        where = display(self.fs, self.path)
        if not holder:
            return LockedError(f"{where.rsplit('/', 1)[0]} is in use by another run")
        return LockedError(f"{where.rsplit('/', 1)[0]} is in use by pid {holder['pid']} on {holder['host']} "
                           f"(since {holder.get('since', '?')}); remove {where} if that process is gone")

    def release(self) -> None:
        if self.held:
            fd = getattr(self, "_fd", None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    if _same_file(fd, self.path):
                        os.unlink(self.path)  # before unlocking: a waiting run then finds no lock, or a new one
                os.close(fd)
                self._fd = None
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.path)
            self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (OSError, ValueError):
            return None  # unreadable or half-written by a process that died mid-write

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _create_locked(path: str, data: bytes) -> int:
    """The lock file at ``path``, created whole and flock-ed (its descriptor); FileExistsError if one exists."""
    private = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to every file
    try:
        os.write(fd, data)
        os.fsync(fd)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.link(private, path)  # atomic: the name appears with its content, or not at all
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(private)
    return fd


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes: assume it is alive
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, KeyError):
        return True
    return True
