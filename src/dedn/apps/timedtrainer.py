"""A trainer that notes when each training step starts and ends and its loss (the store benchmark's rates).

:class:`~dedn.train.callbacks.Callback` hooks run once per segment; the benchmark needs every step (its warm-up,
the time it waited for data, the first and last loss), so it overrides the public step instead of copying the
loop. Kept apart from :mod:`dedn.apps.storebench` so that the benchmark's build phase never imports torch.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dedn.train.callbacks import Callback
from dedn.train.trainer import Trainer

__all__ = ["FitStopped", "StopAfterSegments", "TimedTrainer"]


class TimedTrainer(Trainer):
    """:class:`~dedn.train.trainer.Trainer` recording ``(started, ended, loss)`` of every step in ``steps``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[float, float, float]] = []

    def train_step(self, index: np.ndarray, batch: torch.Tensor | None = None,
                   share: float | None = None) -> dict[str, float]:
        """:meth:`Trainer.train_step`, timed."""
        started = time.perf_counter()
        items = super().train_step(index, batch, share)
        self.steps.append((started, time.perf_counter(), items["loss"]))
        return items


class FitStopped(Exception):
    """Raised by :class:`StopAfterSegments` to end a fit early."""


class StopAfterSegments(Callback):
    """Ends the fit (raising :class:`FitStopped`) after ``segments`` segments.

    ``fit(final_evaluation=False)`` still evaluates the schedule's last segment; a benchmark that times training
    alone schedules one segment more than it runs and stops before it.
    """

    def __init__(self, segments: int = 1) -> None:
        self.segments = segments

    def on_segment_end(self, trainer: Any, row: dict[str, Any]) -> None:
        if len(trainer.history) >= self.segments:
            raise FitStopped(f"stopped after {self.segments} segment(s)")
