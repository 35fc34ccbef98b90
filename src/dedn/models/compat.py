"""Compatibility with the authors' released code of each method: loading their checkpoints, and their outputs.

For people who trained with a method's released code and saved ``model.state_dict()``. Each function here
dispatches through the method registry (:mod:`dedn.models.registry`) to the method's own hooks (DEDN's are
in :mod:`dedn.models.dedn_compat`, where the released layouts and quirks are described):

- :func:`from_reference_state_dict` / :func:`load_reference_checkpoint` turn such a state dict into a
  reference-mode model of the method named by ``model`` that computes the same scores.
- :func:`reference_scores` gives the released forward's outputs, in training or evaluation mode.
- :func:`reference_loss` gives the released training loss of a batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dedn.errors import CheckpointError
from dedn.models.registry import ModelEntry, entry_for, model_entry

__all__ = ["from_reference_state_dict", "load_reference_checkpoint", "reference_loss", "reference_scores"]


def _hook(entry: ModelEntry, hook: str) -> Any:
    found = getattr(entry, hook)
    if found is None:
        raise ValueError(f"method {entry.name!r} has no released-code compatibility ({hook})")
    return found


def from_reference_state_dict(
    state_dict: Mapping[str, Any],
    dataset: str,
    seen_classes: Any,
    model: str = "dedn",
    **hparams: Any,
) -> nn.Module:
    """A reference-mode model of method ``model`` holding the weights of its released code's state dict.

    Args:
        state_dict: the released model's ``state_dict()``.
        dataset: the benchmark the released model was trained on (CUB, SUN or AWA2).
        seen_classes: seen class indices (like the released ``seenclasses``) or a (K,) bool mask.
        model: the registered method (:func:`dedn.models.registry.model_names`).
        **hparams: the method's released settings (DEDN's:
            :func:`dedn.models.dedn_compat.from_reference_state_dict`).

    Raises:
        ConfigError: ``model`` names no registered method.
        CheckpointError: the state dict does not fit the method's released layout.
        ValueError: the method has no released code, or an unknown hyperparameter name.
    """
    build = _hook(model_entry(model, key="model"), "from_reference")
    return build(state_dict, dataset, seen_classes, **hparams)


def load_reference_checkpoint(path: str | Path, dataset: str, seen_classes: Any, model: str = "dedn",
                              **hparams: Any) -> nn.Module:
    """Read a released-code ``.pth`` (a state dict, or a dict holding one under ``state_dict`` / ``model``)
    and build the model with :func:`from_reference_state_dict`.

    The file is read with ``torch.load(..., weights_only=True)``: a checkpoint from elsewhere cannot run code.

    Raises:
        CheckpointError: the file is missing, unreadable, not a state dict, or does not fit (see above).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals, truncated files, non-torch files
        raise CheckpointError(f"{path}: cannot read as a weights-only torch checkpoint: {exc}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    try:
        return from_reference_state_dict(obj, dataset, seen_classes, model=model, **hparams)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def reference_scores(model: nn.Module, features: Tensor, training: bool) -> tuple[Tensor, ...]:
    """The released forward's outputs for ``features`` (DEDN's: the two ``S_pp``, cExp and fExp class scores),
    training-time (``training=True``) or evaluation-time. The model's train/eval state is restored afterwards.
    """
    return _hook(entry_for(model), "reference_scores")(model, features, training)


def reference_loss(
    model: nn.Module,
    features: Tensor,
    labels: Tensor | np.ndarray,
    loss: Any = None,
    dataset: str | None = None,
) -> Tensor:
    """The released code's training loss of one batch (a scalar with gradients).

    ``loss`` (the loss weights, e.g. a run's ``loss`` section) and ``dataset`` default to the settings
    :func:`from_reference_state_dict` attached to the model.
    """
    return _hook(entry_for(model), "reference_loss")(model, features, labels, loss, dataset)
