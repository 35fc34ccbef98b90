"""The run folder: the one owner of its file names, of which folder of a protocol run holds the model, and of
its lock.

A *trainer run* folder holds the resolved config, the log, the history, checkpoints and, once finished, the
model file with its evaluation. A *protocol run* (``dedn train`` under the validated or published protocol, or
one job of an experiment) holds its job record and the trainer runs of its stages: ``validation/combo-NN/``
and ``final/`` (validated) or ``train/`` (published); the fixed protocol's run folder is itself the trainer
run. Every reader and writer names these files through :class:`RunFolder`.

Run folders are written by one process at a time, and never written over by accident: :meth:`RunFolder.lock`
holds an exclusive lock (``.lock``, through filelock) for as long as a process writes the folder; a second
writer stops at once with a message that names the holder (from ``.lock-owner.json``). The lock is re-entrant
within one process, so a protocol that locks its run folder can hand it to a trainer that locks it again.
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

from dedn.errors import CheckpointError, ConfigError


class RunFolder:
    """A run folder and the names of its files. ``RunFolder(path).model`` is ``path / "model.safetensors"``."""

    # A trainer run.
    CONFIG = "config.json"
    LOG = "train.log"
    HISTORY = "history.jsonl"
    METRICS_CSV = "metrics.csv"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    MODEL = "model.safetensors"
    CLASSES = "classes.json"
    FEATURES = "features.json"
    # An evaluation record (a trainer run's final one, or ``dedn eval``'s); ``metrics.json`` is written last.
    METRICS = "metrics.json"
    PER_CLASS = "per_class.csv"
    CURVE_CSV = "seen_unseen_curve.csv"
    CURVE_PNG = "seen_unseen_curve.png"
    OUTPUTS_SEEN = "outputs_test_seen.npz"
    OUTPUTS_UNSEEN = "outputs_test_unseen.npz"
    SEEN_MASK = "seen_mask.npy"
    # A protocol run (one job).
    JOB = "job.json"
    DONE = "done.json"
    SELECTION = "selection.json"
    GRID = "grid.jsonl"
    SELECTED = "selected"
    SELECTED_EPOCH = "epoch.json"
    SELECTED_SEEN = "outputs_seen.npz"
    SELECTED_UNSEEN = "outputs_unseen.npz"
    # The lock.
    LOCK = ".lock"
    LOCK_OWNER = ".lock-owner.json"
    #: The folder holding the reported model of each protocol, inside its run folder.
    MODEL_FOLDERS = {"validated": "final", "published": "train", "fixed": "."}

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------ files
    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def model(self) -> Path:
        return self.path / self.MODEL

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def history(self) -> Path:
        return self.path / self.HISTORY

    @property
    def job(self) -> Path:
        return self.path / self.JOB

    @property
    def done(self) -> Path:
        return self.path / self.DONE

    @property
    def selection(self) -> Path:
        return self.path / self.SELECTION

    @property
    def grid(self) -> Path:
        return self.path / self.GRID

    @property
    def selected(self) -> Path:
        return self.path / self.SELECTED

    @classmethod
    def selected_outputs(cls, stage: str) -> dict[str, str]:
        """The saved outputs of a stage's selected epoch, relative to the job folder (a result's ``outputs``)."""
        sel = f"{stage}/{cls.SELECTED}"
        return {"seen": f"{sel}/{cls.SELECTED_SEEN}", "unseen": f"{sel}/{cls.SELECTED_UNSEEN}",
                "seen_mask": f"{sel}/{cls.SEEN_MASK}"}

    @classmethod
    def test_outputs(cls, stage: str) -> dict[str, str]:
        """A stage's final test outputs, relative to the job folder (a result's ``outputs``)."""
        return {"seen": f"{stage}/{cls.OUTPUTS_SEEN}", "unseen": f"{stage}/{cls.OUTPUTS_UNSEEN}",
                "seen_mask": f"{stage}/{cls.SEEN_MASK}"}

    def stage(self, name: str) -> RunFolder:
        """The trainer run of one stage of a protocol run (``final``, ``train``, ``validation/combo-00``)."""
        return RunFolder(self.path / name)

    # ------------------------------------------------------------------ which folder holds the model
    def model_folder(self) -> RunFolder:
        """The folder of the reported model: this folder for a trainer run, else the protocol's model folder.

        Raises:
            CheckpointError: neither this folder nor a protocol's model folder inside it is a trained run.
        """
        if self.config.is_file() or self.model.is_file():
            return self
        for name in (self.MODEL_FOLDERS["validated"], self.MODEL_FOLDERS["published"]):
            if self.stage(name).config.is_file():
                return self.stage(name)
        if self.job.is_file():
            raise CheckpointError(f"{self.path}: this run has not finished training its reported model yet; "
                                  f"continue it with `dedn train --resume {self.path}`")
        raise CheckpointError(f"{self.path}: not a dedn run folder (no {self.MODEL} or {self.CONFIG} here, and no "
                              "final/ or train/ run inside)")

    def weights(self) -> Path:
        """The model file, or the last checkpoint's weights of a run that has not finished."""
        last = self.checkpoints / "last.safetensors"
        return last if not self.model.exists() and last.exists() else self.model

    # ------------------------------------------------------------------ a new folder, safely
    @classmethod
    def new(cls, output_dir: str | Path, name: str) -> RunFolder:
        """A folder ``OUTPUT_DIR/NAME-<time>`` that does not exist yet."""
        base = Path(output_dir) / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        path, i = base, 1
        while path.exists():
            path, i = Path(f"{base}-{i}"), i + 1
        return cls(path)

    def is_empty_or_missing(self) -> bool:
        """True when the folder does not exist or is empty (ignoring a lock left by this module)."""
        if not self.path.exists():
            return True
        if not self.path.is_dir():
            return False
        return not [p for p in self.path.iterdir() if p.name not in (self.LOCK, self.LOCK_OWNER)]

    def check_new(self) -> None:
        """Refuse to start a new run in a folder that already holds anything (a run, a store, other files)."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path}: the run folder is an existing file; choose a folder")
        if not self.is_empty_or_missing():
            raise ConfigError(f"{self.path}: the run folder already exists and is not empty; continue a run with "
                              f"`dedn train --resume {self.path}`, or choose another --run-dir")

    @contextmanager
    def lock(self) -> Iterator[RunLock]:
        """Hold the folder's lock for the ``with`` block."""
        lock = RunLock(self.path).acquire()
        try:
            yield lock
        finally:
            lock.release()


class RunLock:
    """An exclusive, re-entrant (per process) lock on a run folder; :meth:`release` as often as acquired."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{self.run_dir}: cannot create the run folder ({exc.strerror or exc}); choose a "
                              "writable output_dir or --run-dir") from None
        self._lock = FileLock(str(self.run_dir.resolve() / RunFolder.LOCK), timeout=0, is_singleton=True,
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
                (self.run_dir / RunFolder.LOCK_OWNER).write_text(json.dumps(record))
            except OSError:  # the owner note is a courtesy; the lock itself is what protects the folder
                pass
        return self

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


def _owner(run_dir: Path) -> str:
    try:
        rec = json.loads((run_dir / RunFolder.LOCK_OWNER).read_text())
        return f"pid {rec['pid']} on {rec['host']}, since {rec['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"
