"""Replaying the released code's training run draw for draw (``train.rng=released``, reference mode only).

With the same seed and the same float32 features, a replayed run takes the released run's path: the same
initial weights, the same batches, the same iterations and evaluations (docs/modes.md, "Replaying a released
run"). The released scripts do, after loading the data::

    torch.manual_seed(seed); torch.cuda.manual_seed_all(seed); np.random.seed(seed)

then build the model, whose only random draws are ``normal_`` (mean 0, std 1) on the CPU generator, one
sub-network after the other: cExp (one sub-network of all attributes), then fExp's sub-networks in cluster
order. Each draws W1 (G x C) and then W3 (G x R); the SUN model draws H1 (G x h), H3 (h x C), then W3. W2 and
W4 start at zero and V is copied from the semantic vectors: they draw nothing.

Batches then come from numpy's global generator (balanced batches, CUB and AWA2) or from torch's CPU
generator right after the initial draws (plain batches, SUN). Here each run holds its own generators,
seeded the same way, so nothing else in the process can shift the sequence; :func:`draw_initial_weights`
and :class:`ReleasedBatches` are the two halves of that sequence.
"""

from __future__ import annotations

import numpy as np
import torch

from dedn.data.dataset import ZSLData
from dedn.errors import ConfigError, DataError
from dedn.models.dedn import DEDN, EXPERT_NAMES
from dedn.training.schedule import Segment


def released_schedule(n_trainval: int, epochs: int, batch_size: int) -> list[Segment]:
    """The released training loop's iterations and evaluations as segments.

    The released loop runs ``niters = n_trainval * epochs // B`` iterations and evaluates on the test split
    after the step of every iteration ``i`` with ``i % (niters // epochs) == 0``: the first evaluation follows
    one step, then one every ``niters // epochs`` steps (CUB at 80 epochs: 81 evaluations). The iterations
    after the last evaluation are a final segment without an evaluation.

    Raises:
        ConfigError: fewer than one batch of trainval images per epoch (the released loop divides by zero).
    """
    niters = n_trainval * epochs // batch_size
    period = niters // epochs if epochs else 0
    if period < 1:
        raise ConfigError(f"train.rng=released: {n_trainval} trainval images make less than one batch of "
                          f"{batch_size} per epoch, so the released schedule has no evaluation period; use "
                          "train.rng=dedn or a smaller train.batch_size")
    segments = [Segment(0, 0, 1, True)]
    last = (niters - 1) // period  # the last evaluated iteration is last * period
    segments += [Segment(k, (k - 1) * period + 1, period, True) for k in range(1, last + 1)]
    tail = niters - 1 - last * period
    if tail:
        segments.append(Segment(last + 1, last * period + 1, tail, False))
    return segments


def released_generators(seed: int) -> tuple[torch.Generator, np.random.RandomState]:
    """torch's CPU generator and numpy's legacy generator as the released scripts seed them.

    ``np.random.seed(seed)`` followed by ``np.random.choice`` draws what ``RandomState(seed).choice`` draws.
    """
    return torch.Generator().manual_seed(int(seed)), np.random.RandomState(int(seed))


def _initial_draws(model: DEDN) -> list[torch.Tensor]:
    """The model's randomly initialised tensors in the released draw order (views into its parameters)."""
    out: list[torch.Tensor] = []
    for name in EXPERT_NAMES:
        if name not in model.experts:
            continue
        expert = model.experts[name]
        for q in range(expert.n_clusters):
            if expert.H1 is not None and expert.H3 is not None:
                out += [expert.H1[q], expert.H3[q]]
            elif expert.W1 is not None:
                out.append(expert.W1[q])
            if expert.W3 is not None:
                out.append(expert.W3[q])
    return out


@torch.no_grad()
def draw_initial_weights(model: DEDN, generator: torch.Generator) -> None:
    """Redraw the model's random weights in place, one sub-network after the other, as the released code."""
    for t in _initial_draws(model):
        t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(generator=generator))


class ReleasedBatches:
    """The released code's training batches, as image indices of the dataset.

    Balanced (CUB, AWA2): the seen classes in ascending label order, each with its images' positions in
    the trainval array (in the order of ``trainval_loc``); per batch ``choice(n_seen, min(n_seen, B),
    replace=False)`` picks the classes, then for each picked class in that order ``choice(positions,
    max(B // n_seen, 1))`` picks images with replacement. Plain (SUN): ``randperm(n_trainval)[:B]`` on the
    torch generator that drew the initial weights.

    The draws are one stream over the run: :meth:`segment` fast-forwards to a segment's first iteration, so
    a resumed run draws what the uninterrupted one did.
    """

    def __init__(self, labels: np.ndarray, trainval_loc: np.ndarray, batch_size: int, balanced: bool,
                 seed: int, model: DEDN) -> None:
        self.trainval = np.asarray(trainval_loc, dtype=np.int64)
        tv_labels = np.asarray(labels)[self.trainval]
        self.classes = np.unique(tv_labels)
        self.positions = [np.flatnonzero(tv_labels == c) for c in self.classes]
        self.batch_size = batch_size
        self.balanced = balanced
        self.seed = seed
        self._model = model
        self._reset()

    def _reset(self) -> None:
        self.torch_gen, self.numpy_gen = released_generators(self.seed)
        # The initial weights came first from the same torch generator: advance it past them.
        for t in _initial_draws(self._model):
            torch.empty(t.shape, dtype=torch.float32).normal_(generator=self.torch_gen)
        self.cursor = 0

    def next_positions(self) -> np.ndarray:
        """Positions in the trainval array of the next batch."""
        self.cursor += 1
        b = self.batch_size
        if not self.balanced:
            return torch.randperm(self.trainval.size, generator=self.torch_gen)[:b].numpy()
        n_seen = self.classes.size
        picked = self.numpy_gen.choice(n_seen, min(n_seen, b), replace=False)
        per_class = max(b // n_seen, 1)
        return np.concatenate([self.numpy_gen.choice(self.positions[c], per_class) for c in picked])

    def segment(self, segment: Segment) -> list[np.ndarray]:
        """Image indices of each batch of ``segment``."""
        if segment.start < self.cursor:
            self._reset()
        while self.cursor < segment.start:
            self.next_positions()
        return [self.trainval[self.next_positions()] for _ in range(segment.steps)]


def check_replay_data(data: ZSLData, path: str | None) -> None:
    """Refuse feature maps that are not float32 as stored: a float16 store cannot replay a released run.

    Raises:
        DataError: the features are stored in float16.
    """
    if data.features.dtype == np.float16:
        raise DataError(f"{path or data.source}: a float16 feature store cannot replay a released run "
                        "(train.rng=released): the released code trains on the HDF5 file's float32 feature maps; "
                        "import the file with `dedn store import --dtype float32`, or read it directly with "
                        "data.source=hdf5")
