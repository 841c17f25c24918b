"""One run per output folder: an exclusive lock file naming its holder; a dead holder's lock is taken over."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from colortrend.errors import LockedError


class RunLock:
    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / "_lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder and _alive(holder):
                    raise LockedError(
                        f"{self.path.parent} is in use by pid {holder['pid']} on {holder['host']} "
                        f"(since {holder.get('since', '?')}); remove {self.path} if that process is gone"
                    ) from None
                self.path.unlink(missing_ok=True)  # left by a process that died: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise LockedError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
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
