"""A training run's iterations, cut into segments that each end in one history row (an "epoch")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """A stretch of training iterations that ends in one history row (its ``epoch``).

    Attributes:
        index: the history row's ``epoch`` number.
        start: the first iteration of the segment (0-based, counted over the whole run).
        steps: how many optimizer steps it takes.
        evaluate: whether the model is evaluated after its last step.
    """

    index: int
    start: int
    steps: int
    evaluate: bool


def epoch_schedule(epochs: int, iters_per_epoch: int, eval_every: int) -> list[Segment]:
    """dedn's schedule: ``epochs`` epochs of ``iters_per_epoch`` iterations, evaluated every ``eval_every``
    epochs (0: never) and after the last one."""
    return [Segment(e, e * iters_per_epoch, iters_per_epoch,
                    bool(eval_every and (e + 1) % eval_every == 0) or e == epochs - 1) for e in range(epochs)]
