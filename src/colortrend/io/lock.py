"""One run per output: an exclusively created lock file naming its holder; a dead holder's lock is taken over.

The lock file is created with ``open(mode="xb")``: ``O_EXCL`` on a local disk, the store's exclusive create elsewhere
(S3 conditional writes, memory). Where a filesystem has none it falls back to check-then-write, which only protects
against runs started seconds apart.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from colortrend.errors import LockedError
from colortrend.io.fs import display, filesystem

LOCK_NAME = "_lock"


class RunLock:
    def __init__(self, root: str | os.PathLike):
        self.fs, root_path = filesystem(root)
        self.path = f"{root_path.rstrip('/')}/{LOCK_NAME}"
        self.held = False

    def acquire(self) -> None:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
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

    def release(self) -> None:
        if self.held:
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
