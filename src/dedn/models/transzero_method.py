"""TransZero as a registered method (:mod:`dedn.models.registry`): built from a run's settings, trained with its
loss, loaded from the authors' released code (github shiming-chen/TransZero, ``model.py``).

The run's settings read: ``mode``, ``model.options`` (:data:`~dedn.models.transzero.OPTION_RULES`) and the
dataset; the optimiser is the run's ``train.*``. ``model.l_rc`` / ``model.l_e`` are kept at 1.0: one branch.

The released state dict (D attributes, G = 300, C = 2048, d = ``tf_common_dim``, F = ``tf_dim_feedforward``,
K classes; ``E`` = ``transformer.transformer_encoder.``, ``T`` = ``transformer.transformer_decoder.layers.0.``)::

    att (K, D) normalised class attributes          V (D, G) -> V          W_1 (G, d) -> W1
    bias () margin (an int64 1)                     mask_bias (1, K): -1 seen, +1 unseen
    weight_ce (K, K) identity
    transformer.embed_cv.0.*      -> embed_cv.*     transformer.embed_cv_aux.0.* -> embed_cv_aux.* (CUB, AWA2)
    transformer.embed_attr.0.*    -> embed_attr.*   E WGs.0.*                    -> geometry.*
    E layers.0.mhatt.attention.fc_{q,k,v,o}.* -> encoder.fc_{q,k,v,o}.*
    E layers.0.mhatt.layer_norm.* -> encoder.attention_norm.*     E layers.0.lnorm.* -> encoder.residual_norm.*
    E layers.0.pwff.fc1.*, fc2.*  -> encoder.fc1.*, fc2.*         E layers.0.pwff.layer_norm.* -> encoder.ffn_norm.*
    T<name>                       -> decoder.<name> (self_attn, multihead_attn, linear1, linear2, norm1..3)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dedn.data.dataset import ZSLData
from dedn.models.losses import LossTerms
from dedn.models.registry import ModelEntry, RunSettings, register_model
from dedn.models.released import (
    StateReader,
    check_mask_bias,
    check_weight_ce,
    open_released,
    seen_mask_from,
    training_mode,
)
from dedn.models.transzero import (
    DATASET_SETTINGS,
    TransZero,
    TransZeroConfig,
    TransZeroOutput,
    resolve_settings,
    settings_default_gamma,
    transzero_loss,
)

__all__ = ["from_reference", "reference_loss", "reference_scores", "released_state_dict"]

#: The released model's grid: its encoder hard-codes 14 x 14 regions (448-px images).
RELEASED_GRID = (14, 14)
#: The released settings :func:`from_reference` takes from its ``hparams`` (the rest come from the shapes).
REFERENCE_HPARAMS = ("lambda_sc", "lambda_ar", "normalize_v", "self_attention", "dropout")

_ENCODER = "transformer.transformer_encoder."
_DECODER = "transformer.transformer_decoder.layers.0."
#: dedn's module prefix -> the released one (their parameter names below the prefix are the same).
_PREFIXES = {
    "embed_cv.": "transformer.embed_cv.0.",
    "embed_cv_aux.": "transformer.embed_cv_aux.0.",
    "embed_attr.": "transformer.embed_attr.0.",
    "geometry.": _ENCODER + "WGs.0.",
    "encoder.fc_q.": _ENCODER + "layers.0.mhatt.attention.fc_q.",
    "encoder.fc_k.": _ENCODER + "layers.0.mhatt.attention.fc_k.",
    "encoder.fc_v.": _ENCODER + "layers.0.mhatt.attention.fc_v.",
    "encoder.fc_o.": _ENCODER + "layers.0.mhatt.attention.fc_o.",
    "encoder.attention_norm.": _ENCODER + "layers.0.mhatt.layer_norm.",
    "encoder.residual_norm.": _ENCODER + "layers.0.lnorm.",
    "encoder.fc1.": _ENCODER + "layers.0.pwff.fc1.",
    "encoder.fc2.": _ENCODER + "layers.0.pwff.fc2.",
    "encoder.ffn_norm.": _ENCODER + "layers.0.pwff.layer_norm.",
    "decoder.": _DECODER,
    "V": "V",
    "W1": "W_1",
}


def released_name(name: str) -> str:
    """The released state-dict key of one of dedn's parameter names."""
    for ours, theirs in _PREFIXES.items():
        if name == ours or (ours.endswith(".") and name.startswith(ours)):
            return theirs + name[len(ours):]
    raise KeyError(f"{name!r} has no counterpart in the released TransZero")


# ---------------------------------------------------------------------------------------------- the run
def build(run: RunSettings, data: ZSLData, dataset: str | None, seed: int) -> TransZero:
    """A freshly initialised TransZero for ``data``; its settings are resolved once, here.

    Raises:
        ConfigError: an unknown ``model.options`` key or a bad value, naming it.
    """
    settings = resolve_settings(run.mode, dataset, run.model.options)
    c, h, w = data.feature_shape
    d, g = np.shape(data.w2v)
    config = TransZeroConfig(n_attributes=d, semantic_dim=g, n_channels=c, grid=(h, w), **settings)
    torch.manual_seed(seed)
    return TransZero.from_config(config, data.w2v, data.att, data.seen_mask)


def training_loss(model: TransZero, out: TransZeroOutput, labels: Tensor, seen_mask: Tensor,
                  loss: Any = None) -> LossTerms:
    """TransZero's loss of a batch (:func:`~dedn.models.transzero.transzero_loss`); its weights are the model's
    config, so the run's ``loss`` section (DEDN's) is not read."""
    return transzero_loss(model, out, labels, seen_mask)


def default_gamma(run: RunSettings, dataset: str | None) -> float:
    """The evaluation's calibration when nothing chose one (:func:`~dedn.models.transzero.settings_default_gamma`)."""
    return settings_default_gamma(resolve_settings(run.mode, dataset, run.model.options))


# ---------------------------------------------------------------------------------------------- released code
def released_state_dict(model: TransZero) -> dict[str, Tensor]:
    """``model``'s weights under the released code's names, with its class side (``att``, ``bias``,
    ``mask_bias``, ``weight_ce``): what the released ``model.state_dict()`` holds for the same model."""
    state = {released_name(name): value.detach().clone() for name, value in model.named_parameters()}
    k = model.class_att.shape[0]
    state["att"] = model.class_att.detach().clone()
    state["bias"] = torch.tensor(int(model.config.calibration_margin))
    state["mask_bias"] = torch.where(model.seen_mask, -1.0, 1.0).reshape(1, k).to(model.class_att.dtype)
    state["weight_ce"] = torch.eye(k, dtype=model.class_att.dtype)
    return state


def _reference_config(chk: StateReader, ds: str, hparams: Mapping[str, Any]) -> TransZeroConfig:
    """The config of the released model the state dict comes from: sizes from its shapes, settings from the
    dataset's released values and ``hparams``."""
    n_att, g = chk.get("V", (None, None)).shape
    d = chk.get("W_1", (g, None)).shape[1]
    c = chk.get("transformer.embed_cv.0.weight", (d, None)).shape[1]
    ff = chk.get(_DECODER + "linear1.weight", (None, d)).shape[0]
    bias = chk.get("bias", ())
    options = {key: hparams.get(key, DATASET_SETTINGS[ds][key]) for key in REFERENCE_HPARAMS}
    settings = resolve_settings("reference", ds, {**options, "common_dim": int(d), "feedforward_dim": int(ff),
                                                  "calibration_margin": float(bias)})
    settings["aux_embed"] = "transformer.embed_cv_aux.0.weight" in chk.state
    return TransZeroConfig(n_attributes=n_att, semantic_dim=g, n_channels=c, grid=RELEASED_GRID, **settings)


def from_reference(state_dict: Mapping[str, Any], dataset: str, seen_classes: Any, **hparams: Any) -> TransZero:
    """A reference-mode :class:`TransZero` holding the weights of a released-code state dict.

    Args:
        state_dict: the released model's ``state_dict()`` (names in the module docstring; a common ``module.``
            prefix from DataParallel is accepted).
        dataset: CUB, SUN or AWA2: the released settings the loss and the decoder use.
        seen_classes: seen class indices (the released ``seenclasses``) or a (K,) bool mask.
        **hparams: ``lambda_sc``, ``lambda_ar``, ``normalize_v``, ``self_attention``, ``dropout``; missing ones
            take the dataset's released values. The sizes, the margin and ``embed_cv_aux`` come from the state.

    The model's dtype is the state dict's; its class attributes are the released ``att``, bit for bit.

    Raises:
        CheckpointError: a key is missing or unexpected, a shape does not fit, or ``mask_bias`` / ``weight_ce``
            disagree with ``seen_classes`` / the identity; an unknown dataset.
        ValueError: an unknown hyperparameter name.
    """
    ds, chk = open_released(state_dict, dataset, hparams, REFERENCE_HPARAMS)
    config = _reference_config(chk, ds, hparams)
    att = chk.get("att", (None, config.n_attributes))
    seen = _read_class_side(chk, seen_classes, att.shape[0])
    model = TransZero.architecture_only(config).to(att.dtype if att.is_floating_point() else torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(chk.get(released_name(name), tuple(param.shape)))
    chk.check_all_read()
    model.set_classes(att, seen)
    # The released att is what the released code scores against (clipped where it clips, rows normalised):
    # kept bit for bit rather than normalised a second time.
    model.class_att = att.to(device=model.class_att.device, dtype=model.class_att.dtype).clone()
    return model


def _read_class_side(chk: StateReader, seen_classes: Any, k: int) -> np.ndarray:
    """The seen mask, with ``mask_bias`` (and ``weight_ce`` where present) checked against it."""
    seen = seen_mask_from(seen_classes, k)
    check_mask_bias(chk, seen)
    check_weight_ce(chk, k)
    return seen


def _check_reference(model: TransZero) -> None:
    cfg = model.config
    if not (cfg.box_plus_one and cfg.double_residual):
        raise ValueError(f"the released code's outputs need a reference-mode model (got mode={cfg.mode})")


def _forward(model: TransZero, features: Tensor, training: bool) -> TransZeroOutput:
    with training_mode(model, training):
        return model(features)


def reference_scores(model: TransZero, features: Tensor, training: bool) -> tuple[Tensor]:
    """The released forward's class scores (``S_pp``, margin included), as a one-element tuple; training-time
    (dropout on) or evaluation-time. The model's train/eval state is restored afterwards."""
    _check_reference(model)
    return (_forward(model, features, training).scores,)


def reference_loss(model: TransZero, features: Tensor, labels: Tensor | np.ndarray, loss: Any = None,
                   dataset: str | None = None) -> Tensor:
    """The released ``compute_loss`` of one batch in training mode: L_CE + lambda_ * L_cal + lambda_reg * L_reg.

    The weights are the model's config (:func:`from_reference` sets them for the dataset), so ``loss`` and
    ``dataset`` are not read.
    """
    _check_reference(model)
    out = _forward(model, features, True)
    y = torch.as_tensor(labels, device=model.class_att.device).long()
    return transzero_loss(model, out, y, model.seen_mask).total


register_model(ModelEntry(
    name="transzero",
    label="TransZero",
    expert_labels={"transzero": "TransZero"},
    model_type=TransZero,
    config_type=TransZeroConfig,
    build=build,
    from_config=TransZero.architecture_only,
    loss=training_loss,
    from_reference=from_reference,
    reference_scores=reference_scores,
    reference_loss=reference_loss,
    default_gamma=default_gamma,
))
