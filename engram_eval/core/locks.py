"""Locks: one writer at a time for a run directory or a store key, the holder named, a dead holder's lock taken over.

An advisory `flock` on a small lock file that records the holder (pid, host, start time). The operating system
releases the lock when its process dies, however it dies, so a lock is never stale in the sense of blocking; the file a
killed holder leaves behind still names it, and the next writer says that it took that lock over. The file is removed on
release; a writer that locked a file which has since been removed (and perhaps replaced) retries on the new one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .errors import EngramEvalError

POLL_SECONDS = 0.2


def holder_text(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('since', '?')}"


def read_holder(path: Path) -> dict:
    """What a lock file says about its holder ({} when it says nothing readable)."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def is_held(path: Path) -> bool:
    """Whether a live process holds this lock now (without taking it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class FileLock:
    """`with FileLock(path, what, ...)`: exclusive, or one line naming the holder (`wait=True`: wait for it instead)."""

    def __init__(self, path: Path, what: str, *, wait: bool = False, hint: str = "",
                 on_message: Callable[[str], None] = lambda message: None):
        self.path, self.what, self.wait, self.hint, self.on_message = path, what, wait, hint, on_message
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        said_waiting = False
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as exc:
                raise EngramEvalError(f"{self.path}: cannot lock {self.what} ({exc.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = read_holder(self.path)
                if not self.wait:
                    raise EngramEvalError(self._held_by(holder)) from None
                if not said_waiting:
                    self.on_message(f"waiting for {holder_text(holder)}, which is writing {self.what}")
                    said_waiting = True
                time.sleep(POLL_SECONDS)
                continue
            if not self._still_the_file(fd):
                os.close(fd)
                continue
            break
        if previous := read_holder(self.path):
            self.on_message(f"took over the lock on {self.what} left by {holder_text(previous)}, which no longer runs")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd

    def refuse_if_held(self) -> None:
        """Without `wait`, fail now as acquire would when a live process holds the lock, taking nothing: a command
        refuses before it loads a model, and acquires the lock later."""
        if not self.wait and is_held(self.path):
            raise EngramEvalError(self._held_by(read_holder(self.path)))

    def _held_by(self, holder: dict) -> str:
        return f"{self.what} is being written by {holder_text(holder)} (lock {self.path}); wait for it to finish{self.hint}"

    def _still_the_file(self, fd: int) -> bool:
        """The locked file is still the one at the path (a releasing holder may have removed it meanwhile)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # removed while still locked: a waiter that opened it retries on a new file
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
