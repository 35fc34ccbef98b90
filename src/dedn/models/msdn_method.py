"""MSDN as a registered method (:mod:`dedn.models.registry`): built from a run's settings, trained with its
loss, loaded from the authors' released code (github shiming-chen/MSDN).

The run's settings read: ``mode``, ``model.l_e`` (w_AV, the test weight of the AV subnet) and the method's
own options ``model.options`` (``lambda_cal``, ``w_distill``, ``normalize_v``; defaults per dataset in
:data:`dedn.models.msdn.DATASET_DEFAULTS`). ``model.l_rc`` and the run's ``loss`` section (DEDN's) are not read.

The released training model's ``state_dict()`` (``core/MSDN.py``; G = 300, C = 2048)::

    V (D, G)        the shared attribute vectors, dataset attribute order      -> av.V
    W_1, W_2 (G, C) the AV subnet's score and attention matrices             -> av.W1[0], av.W2[0]
    W_1_1 (C, G)    the VA subnet's score matrix, stored transposed           -> va.U1 = W_1_1^T
    W_2_1 (G, C)    the VA subnet's attention matrix                          -> va.U2
    W_3 (G, C), W_3_1 (C, G)  created but never used by the forward           (dropped)
    att (K, D) normalised class attributes;  bias (scalar);  mask_bias (1, K): -1 seen, +1 unseen;
    weight_ce (K, K) identity;  prob_prune (scalar, unused)

The released test model (``MSDN.py``) has the same names without ``weight_ce`` and with its ResNet-101 under
``resnet101.``; dedn computes features with its own frozen backbone, so those keys are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dedn.data.dataset import ZSLData
from dedn.errors import CheckpointError
from dedn.models.msdn import (
    MSDN,
    RELEASED_MARGIN,
    MSDNConfig,
    MSDNSettings,
    dataset_defaults,
    msdn_loss,
    resolve_settings,
)
from dedn.models.registry import ModelEntry, RunSettings, register_model
from dedn.models.released import (
    StateReader,
    check_mask_bias,
    check_weight_ce,
    open_released,
    seen_mask_from,
    training_mode,
)

#: ``from_reference``'s hyperparameters: w_AV (``l_e``), the loss weights, V's normalisation, and R (the
#: released layout has no R-shaped weight; its scripts use 448 px images, 14 x 14 = 196 regions).
REFERENCE_HPARAMS = ("l_e", "lambda_cal", "w_distill", "normalize_v", "n_regions")
#: The released test model's backbone, which dedn's features replace.
BACKBONE_PREFIX = "resnet101."


def build(run: RunSettings, data: ZSLData, dataset: str | None, seed: int) -> MSDN:
    """A freshly initialised MSDN for ``data``; its settings resolved once, here, from the run's mode, the
    dataset and ``model.options``.

    Raises:
        ConfigError: an unknown ``model.options`` key or a bad value.
    """
    settings = resolve_settings(run.mode, dataset, run.model.options)
    c, h, w = data.feature_shape
    d, g = np.shape(data.w2v)
    config = MSDNConfig(n_attributes=d, semantic_dim=g, n_channels=c, n_regions=h * w, l_rc=1.0,
                        l_e=run.model.l_e, settings=settings)
    torch.manual_seed(seed)
    return MSDN(config, data.w2v, data.att, data.seen_mask)


# ---------------------------------------------------------------------------------------------- released code
def from_reference(state_dict: Mapping[str, Any], dataset: str, seen_classes: Any, **hparams: Any) -> MSDN:
    """A reference-mode MSDN holding the weights of a released-code state dict (names in the module docstring).

    Args:
        state_dict: the released model's ``state_dict()`` (a common ``module.`` prefix is accepted).
        dataset: CUB, SUN or AWA2: the released script's settings (:data:`~dedn.models.msdn.DATASET_DEFAULTS`).
        seen_classes: seen class indices (like the released ``seenclasses``) or a (K,) bool mask.
        **hparams: ``l_e`` (w_AV), ``lambda_cal``, ``w_distill``, ``normalize_v``, ``n_regions`` (default 196).

    The model's dtype is the state dict's.

    Raises:
        CheckpointError: a key is missing or unexpected, a shape is wrong, or ``mask_bias`` / ``weight_ce``
            disagree with ``seen_classes`` / the identity.
        ValueError: an unknown hyperparameter name.
    """
    ds, chk = open_released(state_dict, dataset, hparams, REFERENCE_HPARAMS, skip_prefix=BACKBONE_PREFIX)
    v = chk.get("V", (None, None))
    d, g = v.shape
    w1 = chk.get("W_1", (g, None))
    c = w1.shape[1]
    weights = {"W1": w1, "W2": chk.get("W_2", (g, c)), "U1": chk.get("W_1_1", (c, g)).t(),
               "U2": chk.get("W_2_1", (g, c))}
    chk.get("W_3", (g, c))
    chk.get("W_3_1", (c, g))
    att = chk.get("att", (None, d))
    seen = _read_class_side(chk, att.shape[0], seen_classes)
    defaults = dataset_defaults(ds)
    options = {key: hparams.get(key, defaults[key]) for key in ("lambda_cal", "w_distill", "normalize_v")}
    config = MSDNConfig(n_attributes=d, semantic_dim=g, n_channels=c, n_regions=int(hparams.get("n_regions", 196)),
                        l_rc=1.0, l_e=float(hparams.get("l_e", defaults["w_av"])),
                        settings=resolve_settings("reference", ds, options))
    dtype = v.dtype if v.is_floating_point() else torch.float32
    with torch.no_grad():
        model = MSDN(config, v.float().cpu().numpy(), att.float().cpu().numpy(), seen).to(dtype)
        model.av.V.copy_(v)
        model.av.W1[0].copy_(weights["W1"])
        model.av.W2[0].copy_(weights["W2"])
        model.va.U1.copy_(weights["U1"])
        model.va.U2.copy_(weights["U2"])
        model.class_att = att.to(dtype).cpu().clone()  # the released att, normalised already: bit for bit
    return model


def _read_class_side(chk: StateReader, k: int, seen_classes: Any) -> np.ndarray:
    """The seen mask, checked against ``bias`` (the released margin, 1), ``mask_bias`` and ``weight_ce``; then no
    key may be left unread."""
    seen = seen_mask_from(seen_classes, k)
    bias = chk.get("bias")
    if bias.numel() != 1 or float(bias.reshape(())) != 1.0:
        raise CheckpointError(f"reference state dict: 'bias' must be the scalar 1 (the released margin), got {bias}")
    check_mask_bias(chk, seen)
    check_weight_ce(chk, k)
    if "prob_prune" in chk.state:
        chk.get("prob_prune")  # a constant the released loss never reads
    chk.check_all_read("the released MSDN has V, W_1.., att, bias, mask_bias, weight_ce, prob_prune")
    return seen


def _check_reference(model: MSDN) -> MSDNSettings:
    settings = model.config.settings
    if settings.calibration_margin != RELEASED_MARGIN or not settings.released_distance:
        raise ValueError(f"the released code's outputs need a reference-mode model (got mode={settings.mode})")
    return settings


def reference_scores(model: MSDN, features: Tensor, training: bool) -> tuple[Tensor, Tensor]:
    """The released forward's two ``S_pp``: (AV, VA) class scores, each (B, K), margin included.

    The released forward is the same in training and evaluation (no dropout, no normalisation layers), so
    ``training`` only sets the mode the model runs in; its train/eval state is restored afterwards.
    """
    _check_reference(model)
    with training_mode(model, training):
        out = model(features)
    return out.av.scores, out.va.scores


def reference_loss(model: MSDN, features: Tensor, labels: Tensor | np.ndarray, loss: Any = None,
                   dataset: str | None = None) -> Tensor:
    """The released training loss of one batch (``MSDN_*.py``): for each subnet CE + lambda_cal * L_cal, plus
    w_distill * the distance of the two subnets' scores (no epsilon under its root).

    ``loss`` and ``dataset`` are not read: the weights are the model's (set by :func:`from_reference` from the
    dataset's released script, or its ``lambda_cal`` / ``w_distill`` hyperparameters).
    """
    _check_reference(model)
    with training_mode(model, True):
        out = model(features)
    y = torch.as_tensor(labels, device=model.class_att.device).long()
    return msdn_loss(model, out, y, model.seen_mask).total


register_model(ModelEntry(
    name="msdn",
    label="MSDN",
    expert_labels={"av": "AV subnet", "va": "VA subnet"},
    model_type=MSDN,
    config_type=MSDNConfig,
    build=build,
    from_config=MSDN.architecture_only,
    loss=msdn_loss,
    from_reference=from_reference,
    reference_scores=reference_scores,
    reference_loss=reference_loss,
    default_gamma=lambda run, dataset: resolve_settings(run.mode, dataset, run.model.options).default_gamma,
))
