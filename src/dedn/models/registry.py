"""The method registry, in the manner of timm: each GZSL method registers what the layers above need of it.

A method is one :class:`ModelEntry` under its name (a run's ``model.name``): how to build it from the run's
settings and the data, its config type (which model files record), its training loss, and its reference
compatibility (loading the authors' released checkpoints and reproducing their outputs). The layers above
the models ask the registry (:func:`model_entry`, :func:`entry_for`, :func:`create_model`) and never branch
on a method's name.

The built-in methods register themselves when :mod:`dedn.models` is imported (its ``__init__`` imports
them), so any import of a ``dedn.models`` module fills the registry first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import Tensor, nn

from dedn.data.dataset import ZSLData
from dedn.devices import PRECISIONS
from dedn.errors import ConfigError


class RunSettings(Protocol):
    """The parts of a run's config (:class:`dedn.config.RunConfig`) a method is built from, read by attribute:
    the models do not import the run config."""

    mode: str
    seed: int
    model: Any
    loss: Any


class LossResult(Protocol):
    """What a method's training loss returns: the total and its parts (for logging)."""

    total: Tensor

    def items(self) -> dict[str, float]: ...


@dataclass(frozen=True)
class ModelEntry:
    """One registered method.

    Attributes:
        name: the method's name, a run's ``model.name``; model files record it.
        label: how tables and figures name it (``DEDN``, ``DAZLE``, ...).
        model_type: the ``nn.Module`` class of its models (:func:`entry_for` finds a model's entry by it).
        config_type: the config every model of the method holds as ``model.config``: ``to_dict()`` gives
            what model files record, ``config_type.from_dict(values)`` reads it back.
        build: ``build(run, data, dataset, seed)``: a freshly initialised model for ``data`` from the run's
            settings (``dataset`` the canonical benchmark name or None; initialisation seeded by ``seed``).
            Raises ConfigError, naming the key, on an option of the method the run config cannot check.
        from_config: ``from_config(config)``: an architecture-only model, ready for ``load_state_dict``.
        loss: ``loss(model, out, labels, seen_mask, loss_settings)``: the training loss of a batch, from the
            model's forward output ``out``.
        from_reference: ``from_reference(state_dict, dataset, seen_classes, **hparams)``: a model holding the
            weights of the authors' released code (None: the method has none).
        reference_scores: ``reference_scores(model, features, training)``: the released forward's outputs.
        reference_loss: ``reference_loss(model, features, labels, loss, dataset)``: the released training loss.
        default_gamma: ``default_gamma(run, dataset)``: the calibration an evaluation uses when nothing chose
            one (a reference mode whose fixed margin is inside the scores: 0).
        replays_released: whether ``train.rng=released`` can replay the released code's runs draw for draw.
        expert_labels: how figures name each expert of its outputs (``cexp`` -> ``cExp``); default the name.
        precisions: the ``train.precision`` values its forward supports (docs/precision.md).
    """

    name: str
    label: str
    model_type: type[nn.Module]
    config_type: type
    build: Callable[[RunSettings, ZSLData, str | None, int], nn.Module]
    from_config: Callable[[Any], nn.Module]
    loss: Callable[[nn.Module, Any, Tensor, Tensor, Any], LossResult]
    from_reference: Callable[..., nn.Module] | None = None
    reference_scores: Callable[[nn.Module, Tensor, bool], tuple[Tensor, ...]] | None = None
    reference_loss: Callable[[nn.Module, Tensor, Any, Any, str | None], Tensor] | None = None
    default_gamma: Callable[[RunSettings, str | None], float] = lambda run, dataset: 0.0
    replays_released: bool = False
    expert_labels: Mapping[str, str] = field(default_factory=dict)
    precisions: tuple[str, ...] = PRECISIONS

    def check_precision(self, precision: str, key: str = "train.precision") -> str:
        """``precision`` if this method runs in it; else ConfigError naming ``key`` and what it supports."""
        if precision not in self.precisions:
            raise ConfigError(f"{key}={precision}: {self.label} runs in {' or '.join(self.precisions)} only; "
                              f"set {key}={self.precisions[0]}")
        return precision


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    """Register a method under ``entry.name``; a second method of the same name is refused (ValueError)."""
    if entry.name in _REGISTRY:
        raise ValueError(f"a method named {entry.name!r} is registered already")
    _REGISTRY[entry.name] = entry
    return entry


def model_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_REGISTRY)


def model_entry(name: str, key: str = "model.name") -> ModelEntry:
    """The entry registered as ``name``; ConfigError naming ``key`` (where the name came from) if none is."""
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ConfigError(f"{key} must be one of {{{', '.join(_REGISTRY)}}}, got {name!r}")
    return entry


def entry_for(model: nn.Module) -> ModelEntry:
    """The entry of the method ``model`` is a model of (TypeError for a model of no registered method)."""
    for entry in _REGISTRY.values():
        if isinstance(model, entry.model_type):
            return entry
    raise TypeError(f"{type(model).__name__} is not a model of a registered method ({', '.join(_REGISTRY)})")


def create_model(name: str, run: RunSettings, data: ZSLData, dataset: str | None = None,
                 seed: int | None = None) -> nn.Module:
    """A freshly initialised model of method ``name`` (the entry's ``build``), seeded by ``seed`` (default
    ``run.seed``).

    Raises:
        ConfigError: ``name`` is not registered, or the method refuses one of its options.
    """
    return model_entry(name).build(run, data, dataset, run.seed if seed is None else seed)
