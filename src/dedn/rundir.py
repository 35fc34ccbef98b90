"""Run folders are written by one process at a time, and never written over by accident.

:func:`lock_run_dir` holds an exclusive lock (``RUN/.lock``, through filelock) for as long as a process
writes a run folder; a second writer stops at once with a message that names the holder (from
``RUN/.lock-owner.json``). The lock is re-entrant within one process, so a protocol that locks its run
folder can hand it to a trainer that locks it again.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import ConfigError

LOCK_FILE = ".lock"
OWNER_FILE = ".lock-owner.json"


class RunLock:
    """An exclusive, re-entrant (per process) lock on a run folder; :meth:`release` as often as acquired."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{self.run_dir}: cannot create the run folder ({exc.strerror or exc}); choose a "
                              "writable output_dir or --run-dir") from None
        self._lock = FileLock(str(self.run_dir.resolve() / LOCK_FILE), timeout=0, is_singleton=True,
                              thread_local=False)

    def acquire(self) -> RunLock:
        """Take the lock now or raise :class:`~dedn.errors.ConfigError` naming the process that holds it."""
        first = not self._lock.is_locked
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(f"{self.run_dir}: this run folder is being written by another process "
                              f"({_owner(self.run_dir)}); wait for it to finish, or use another run folder") from None
        except OSError as exc:
            raise ConfigError(f"{self.run_dir}: cannot lock the run folder ({exc.strerror or exc}); choose a "
                              "writable output_dir or --run-dir") from None
        if first:
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            try:
                (self.run_dir / OWNER_FILE).write_text(json.dumps(record))
            except OSError:  # the owner note is a courtesy; the lock itself is what protects the folder
                pass
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


def _owner(run_dir: Path) -> str:
    try:
        rec = json.loads((run_dir / OWNER_FILE).read_text())
        return f"pid {rec['pid']} on {rec['host']}, since {rec['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


@contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[RunLock]:
    """Hold the run folder's lock for the ``with`` block."""
    lock = RunLock(run_dir).acquire()
    try:
        yield lock
    finally:
        lock.release()


def is_empty_or_missing(path: str | Path) -> bool:
    """True when ``path`` does not exist or is an empty folder (ignoring a lock left by this module)."""
    path = Path(path)
    if not path.exists():
        return True
    if not path.is_dir():
        return False
    return not [p for p in path.iterdir() if p.name not in (LOCK_FILE, OWNER_FILE)]


def check_new_run_dir(path: str | Path) -> None:
    """Refuse to start a new run in a folder that already holds anything (a run, a store, other files)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: the run folder is an existing file; choose a folder")
    if not is_empty_or_missing(path):
        raise ConfigError(f"{path}: the run folder already exists and is not empty; continue a run with "
                          f"`dedn train --resume {path}`, or choose another --run-dir")
