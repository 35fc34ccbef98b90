"""Hooks into :meth:`dedn.training.trainer.Trainer.fit`, in the manner of Lightning's callbacks.

A callback is handed to the trainer (``Trainer(..., callbacks=[...])``) and called at a few well-named points
of the loop; each hook gets the trainer itself, so it can read the run's config, data, model and folder. The
model-selection protocols use them to score extra settings at every evaluation and to keep the outputs of the
best epoch; the trainer itself does not know which protocol it serves.
"""

from __future__ import annotations

import time
from typing import Any

from dedn.eval.evaluate import Evaluation
from dedn.eval.metrics import METRIC_ORDER


class Callback:
    """Base class: every hook does nothing; override the ones you need.

    Hooks receive the :class:`~dedn.training.trainer.Trainer` (typed ``Any`` here: the trainer module imports this
    one). They run on the process that writes the run folder (rank 0 under torchrun), except
    :meth:`on_step_start`, :meth:`on_step_end` and :meth:`on_segment_end`, which every process calls.
    """

    def on_step_start(self, trainer: Any) -> None:
        """Before each training step, once its batch has been read."""

    def on_step_end(self, trainer: Any, items: dict[str, float]) -> None:
        """After each training step, with its loss terms (``items["loss"]``: the batch's total loss)."""

    def on_segment_end(self, trainer: Any, row: dict[str, Any]) -> None:
        """After each segment of the schedule (dedn's epoch), once its history ``row`` is complete."""

    def on_evaluate(self, trainer: Any, epoch: int, evaluation: Evaluation) -> None:
        """After each evaluation during training (not the final one made when training ends unevaluated)."""

    def on_checkpoint(self, trainer: Any, epoch: int, name: str) -> None:
        """After checkpoint ``name`` (``last`` or ``best``) of ``epoch`` was written."""

    def on_fit_end(self, trainer: Any, record: dict[str, Any]) -> None:
        """Before the final metrics are written: add entries to ``record`` (it becomes part of ``metrics.json``)."""


def released_best_h(best: dict[str, Any]) -> dict[str, Any]:
    """The released code's record of its best-H evaluation, given the evaluation with the highest H (``best``).

    That record starts at 0 and is replaced only by an evaluation with a higher H (a strict comparison), so a
    run whose H is 0 at every evaluation reports S = U = H = 0, whatever U it reached.
    """
    return dict(best) if best["H"] > 0 else {**best, "U": 0.0, "S": 0.0, "H": 0.0}


class BestOverTraining(Callback):
    """Adds ``best_over_training`` to the final record: the best H (with its T, S, U) and the best T over the
    evaluations made during training. On the test split these are what the released code reports (the
    published protocol); they are never a tuned result."""

    def on_fit_end(self, trainer: Any, record: dict[str, Any]) -> None:
        history = trainer.history
        best_h = max((h for h in history if "H" in h), key=lambda h: h["H"], default=None)
        best_t = max((h for h in history if "T" in h), key=lambda h: h["T"], default=None)
        released = None if best_h is None else released_best_h(best_h)
        record["best_over_training"] = {
            "note": "best test-split values over evaluations (published protocol; not a tuned result)",
            "H": released and {k: released[k] for k in ("epoch", *METRIC_ORDER[:4])},
            "T": best_t and {"epoch": best_t["epoch"], "T": best_t["T"]},
        }


class StepTimes(Callback):
    """Records ``(started, ended, loss)`` of every training step in :attr:`steps` (``time.perf_counter`` times):
    what a speed benchmark needs to tell warm-up, data waits and the steady rate apart."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, float, float]] = []
        self._started = 0.0

    def on_step_start(self, trainer: Any) -> None:
        self._started = time.perf_counter()

    def on_step_end(self, trainer: Any, items: dict[str, float]) -> None:
        self.steps.append((self._started, time.perf_counter(), items["loss"]))
