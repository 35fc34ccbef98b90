"""Reading the authors' released checkpoints: the parts every released codebase shares.

The released models of DEDN, DAZLE, MSDN and TransZero are plain ``state_dict()``s whose class side is built the
same way: the class attributes ``att``, a scalar margin ``bias`` with its sign per class ``mask_bias`` (-1 on seen,
+1 on unseen classes) and an identity ``weight_ce``. Each method's compatibility module reads its own weights
with a :class:`StateReader` and checks the class side with the functions here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dedn.data.xlsa17 import canonical_dataset
from dedn.errors import CheckpointError


def shape_of(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _fmt(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


class StateReader:
    """Fetches state-dict entries by name, checking presence and shape, and remembers what it used."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = state
        self.used: set[str] = set()

    def get(self, key: str, shape: tuple[int | None, ...] | None = None) -> Tensor:
        """The tensor ``key`` (shape checked where given: None matches any size).

        Raises:
            CheckpointError: the key is missing, is not a tensor, or has another shape.
        """
        if key not in self.state:
            raise CheckpointError(f"reference state dict: missing key {key!r}"
                                  + (f" (expected shape {_fmt(shape)})" if shape is not None else ""))
        value = self.state[key]
        if not torch.is_tensor(value):
            raise CheckpointError(f"reference state dict: {key!r} is a {type(value).__name__}, not a tensor")
        found = shape_of(value)
        if shape is not None and (len(found) != len(shape)
                                  or any(e is not None and e != f for e, f in zip(shape, found, strict=True))):
            raise CheckpointError(f"reference state dict: {key!r} has shape {found}, expected {_fmt(shape)}")
        self.used.add(key)
        return value.detach()

    def unread(self) -> list[str]:
        """The keys nothing has read, sorted: a released model of another layout, or a wrong method."""
        return sorted(set(self.state) - self.used)

    def check_all_read(self, layout: str = "") -> None:
        """Refuse a state dict with keys nothing read; ``layout`` says what the released model holds."""
        extra = self.unread()
        if extra:
            raise CheckpointError(f"reference state dict: unexpected key {extra[0]!r} ({len(extra)} unexpected in "
                                  f"all){'; ' + layout if layout else ''}")


def strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a ``module.`` prefix that every key shares (a model saved from DataParallel)."""
    keys = list(state)
    if keys and all(key.startswith("module.") for key in keys):
        return {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def seen_mask_from(seen_classes: Any, n_classes: int) -> np.ndarray:
    """(K,) bool from a (K,) bool mask or a list of seen class indices.

    Raises:
        CheckpointError: a mask of another length, or an index outside 0..K-1.
    """
    arr = np.asarray(seen_classes.cpu() if torch.is_tensor(seen_classes) else seen_classes)
    if arr.dtype == bool:
        if arr.shape != (n_classes,):
            raise CheckpointError(f"seen_classes: a boolean mask must have shape ({n_classes},), got {arr.shape}")
        return arr.copy()
    idx = arr.astype(np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= n_classes):
        raise CheckpointError(f"seen_classes: class indices must lie in 0..{n_classes - 1} (the state dict's "
                              f"'att' has {n_classes} rows)")
    mask = np.zeros(n_classes, dtype=bool)
    mask[idx] = True
    return mask


def read_margin(reader: StateReader) -> float | None:
    """The released margin ``bias`` (a scalar), or None where the state dict has none (``is_bias`` off)."""
    if "bias" not in reader.state:
        return None
    bias = reader.get("bias")
    if bias.numel() != 1:
        raise CheckpointError(f"reference state dict: 'bias' has shape {shape_of(bias)}, expected a scalar")
    return float(bias.reshape(()))


def check_mask_bias(reader: StateReader, seen: np.ndarray) -> None:
    """``mask_bias`` must be -1 on the seen and +1 on the unseen classes of ``seen``."""
    mask = reader.get("mask_bias", (1, seen.size)).reshape(-1).double().cpu().numpy()
    if not np.array_equal(mask, np.where(seen, -1.0, 1.0)):
        raise CheckpointError("reference state dict: 'mask_bias' (-1 on seen, +1 on unseen classes) disagrees "
                              "with seen_classes")


def check_weight_ce(reader: StateReader, n_classes: int) -> None:
    """``weight_ce``, where present, must be the identity: dedn's losses take one-hot targets."""
    if "weight_ce" in reader.state:
        weight = reader.get("weight_ce", (n_classes, n_classes))
        if not torch.equal(weight.double().cpu(), torch.eye(n_classes, dtype=torch.float64)):
            raise CheckpointError("reference state dict: 'weight_ce' is not the identity; dedn's loss uses "
                                  "one-hot targets")


def read_class_side(reader: StateReader, n_classes: int, seen_classes: Any) -> tuple[np.ndarray, float | None]:
    """The seen mask (from ``seen_classes``) and the margin ``bias`` (None without), with ``mask_bias`` (where
    there is a margin) and ``weight_ce`` checked against them: the class side of a released model whose
    margin is optional (the released ``is_bias``).

    Raises:
        CheckpointError: see :func:`seen_mask_from`, :func:`read_margin`, :func:`check_mask_bias` and
            :func:`check_weight_ce`.
    """
    seen = seen_mask_from(seen_classes, n_classes)
    bias = read_margin(reader)
    if bias is not None:
        check_mask_bias(reader, seen)
    check_weight_ce(reader, n_classes)
    return seen, bias


def open_released(state_dict: Mapping[str, Any], dataset: str, hparams: Mapping[str, Any],
                  known: Sequence[str], skip_prefix: str | None = None) -> tuple[str, StateReader]:
    """The canonical benchmark name and a reader of a released ``state_dict`` (a shared ``module.`` prefix
    dropped; keys under ``skip_prefix`` left out), after checking the dataset and the ``hparams`` names.

    Raises:
        CheckpointError: a dataset other than CUB, SUN and AWA2 (the released checkpoints' benchmarks).
        ValueError: a hyperparameter name not in ``known``.
    """
    ds = canonical_dataset(dataset)
    if ds is None:
        raise CheckpointError(f"reference checkpoints exist for CUB, SUN and AWA2, got dataset {dataset!r}")
    unknown = sorted(set(hparams) - set(known))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown}; known: {list(known)}")
    state = strip_prefix(state_dict)
    if skip_prefix is not None:
        state = {k: v for k, v in state.items() if not k.startswith(skip_prefix)}
    return ds, StateReader(state)


@contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Run the block with ``model`` in train (``training``) or eval mode, its own mode restored afterwards."""
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)
