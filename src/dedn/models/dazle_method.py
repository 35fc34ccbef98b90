"""DAZLE as a registered method (:mod:`dedn.models.registry`): built from a run's settings, trained with its loss,
loaded from the authors' released code (github hbdat/cvpr20_DAZLE, ``core/DAZLE.py``).

The run's settings read: ``mode``, the ``model.options`` mapping (:data:`~dedn.models.dazle.OPTION_RULES`); the
run's ``loss`` section and ``model.l_rc`` / ``model.l_e`` are DEDN's and change nothing here (DAZLE has one
branch of one expert).

The released state dict (``G`` = 300 word-vector dim, ``C`` = 2048; the notebooks' settings, ``is_bias=True``,
no ``is_conv``, no ``non_linear_emb``)::

    V (D, G)                 the trained attribute word vectors          -> attention.V
    W_1, W_2 (G, C)          attribute score and attention weights       -> attention.W1[0], attention.W2[0]
    W_3 (G, C)               the attribute gate's weight                 -> W3
    att (K, D)               row-normalised class attributes (AWA2: clipped at 0 first), taken as they are
    weight_ce (K, K)         identity;  prob_prune (scalar) unused
    bias (scalar), mask_bias (1, K): -1 seen, +1 unseen   -> the calibration margin (absent: none)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dedn.data.dataset import ZSLData
from dedn.models.dazle import DAZLE, DAZLEConfig, dazle_loss, loss_terms, resolve_dazle
from dedn.models.registry import ModelEntry, RunSettings, register_model
from dedn.models.released import StateReader, open_released, read_class_side, training_mode

#: What :func:`from_reference` takes besides the state dict: DAZLE's own settings, and R (the state dict has
#: no region count; the released features are 7 x 7).
REFERENCE_HPARAMS = ("gate", "normalize_v", "lambda_cal", "n_regions")


def build(run: RunSettings, data: ZSLData, dataset: str | None, seed: int) -> DAZLE:
    """A freshly initialised DAZLE for ``data``, its settings resolved once here from mode, dataset and
    ``model.options``.

    Raises:
        ConfigError: an unknown ``model.options`` key or a bad value.
    """
    settings = resolve_dazle(run.mode, dataset, getattr(run.model, "options", None))
    c, h, w = data.feature_shape
    d, g = np.shape(data.w2v)
    config = DAZLEConfig(n_attributes=d, semantic_dim=g, n_channels=c, n_regions=h * w, **settings)
    torch.manual_seed(seed)
    return DAZLE.from_config(config, data.w2v, data.att, data.seen_mask)


def from_reference(state_dict: Mapping[str, Any], dataset: str, seen_classes: Any, **hparams: Any) -> DAZLE:
    """A reference-mode :class:`DAZLE` holding the weights of a released-code state dict.

    Args:
        state_dict: the released model's ``state_dict()`` (names in the module docstring; a common ``module.``
            prefix from DataParallel is accepted).
        dataset: CUB, SUN or AWA2: the released notebook's settings (SUN: no gate; AWA2: V normalised on every
            forward).
        seen_classes: seen class indices (like the released ``seenclass``) or a (K,) bool mask.
        **hparams: ``gate``, ``normalize_v``, ``lambda_cal`` (the released ``lambda_``), overriding the
            dataset's; ``n_regions`` (default 49).

    The model's dtype is the state dict's. A state dict without ``bias`` (``is_bias=False``) gives a model
    without the calibration margin.

    Raises:
        CheckpointError: a key is missing or unexpected, a shape does not fit, or ``mask_bias`` / ``weight_ce``
            disagree with ``seen_classes`` / the identity.
        ValueError: an unknown hyperparameter name.
    """
    ds, chk = open_released(state_dict, dataset, hparams, REFERENCE_HPARAMS)
    v = chk.get("V", (None, None))
    d, g = v.shape
    w1 = chk.get("W_1", (g, None))
    c = w1.shape[1]
    w2, w3 = chk.get("W_2", (g, c)), chk.get("W_3", (g, c))
    att = chk.get("att", (None, d))
    seen, bias = _class_side(chk, att.shape[0], seen_classes)
    options = {k: hparams[k] for k in ("gate", "normalize_v", "lambda_cal") if k in hparams}
    settings = {**resolve_dazle("reference", ds, options), "calibration_margin": bias or 0.0}
    config = DAZLEConfig(n_attributes=d, semantic_dim=g, n_channels=c, n_regions=int(hparams.get("n_regions", 49)),
                         **settings)
    dtype = v.dtype if v.is_floating_point() else torch.float32
    with torch.no_grad():
        model = DAZLE.from_config(config, v.float().cpu().numpy(), att.float().cpu().numpy(), seen).to(dtype)
        model.attention.V.copy_(v.to(dtype))
        model.attention.W1.copy_(w1.to(dtype)[None])
        model.attention.W2.copy_(w2.to(dtype)[None])
        model.W3.copy_(w3.to(dtype))
        model.class_att = att.to(dtype).cpu().clone()  # normalised (and AWA2-clipped) already: bit for bit
    return model


def _class_side(chk: StateReader, k: int, seen_classes: Any) -> tuple[np.ndarray, float | None]:
    """The seen mask and the margin ``bias`` (None without), ``mask_bias`` and ``weight_ce`` checked; then no
    key may be left unread."""
    seen, bias = read_class_side(chk, k, seen_classes)
    if "prob_prune" in chk.state:
        chk.get("prob_prune")  # a constant the released loss never reads
    chk.check_all_read("the released DAZLE has V, W_1, W_2, W_3, att, weight_ce, bias, mask_bias, prob_prune")
    return seen, bias


def _check_reference(model: DAZLE) -> None:
    cfg = model.config
    if cfg.ce_classes != "all" or cfg.calibration_shift != 0:
        raise ValueError("the released code's outputs need a reference-mode DAZLE (cross-entropy over all classes, "
                         f"no extra calibration shift); got mode={cfg.mode}")


def reference_scores(model: DAZLE, features: Tensor, training: bool) -> tuple[Tensor]:
    """The released forward's one output ``S_pp``: (B, K) class scores, calibration margin included.

    The released forward is the same in training and evaluation; ``training`` only sets the model's state for
    the call (restored afterwards). Gradients follow the caller's grad mode.
    """
    _check_reference(model)
    with training_mode(model, training):
        return (model(features).scores,)


def reference_loss(model: DAZLE, features: Tensor, labels: Tensor | np.ndarray, loss: Any = None,
                   dataset: str | None = None) -> Tensor:
    """The released ``compute_loss`` of one batch: CE over all K on S_pp - margin, plus lambda_ times the
    self-calibration loss on S_pp (a scalar with gradients).

    ``loss``: the released ``lambda_`` as a number (default: the model's ``lambda_cal``); ``dataset`` is not
    needed (the model holds the dataset's settings) and is ignored.
    """
    _check_reference(model)
    cfg = model.config
    out = model(features)  # the released forward does not depend on train / eval
    y = torch.as_tensor(labels, device=model.class_att.device).long()
    lambda_cal = cfg.lambda_cal if loss is None else float(loss)
    return loss_terms(out, y, model.seen_mask, model.calibration_bias(), cfg.ce_classes, lambda_cal,
                      cfg.calibration_shift).total


register_model(ModelEntry(
    name="dazle",
    label="DAZLE",
    expert_labels={"dazle": "DAZLE"},
    precisions=("fp32",),  # the released model has no bf16 path, and none was written for it
    model_type=DAZLE,
    config_type=DAZLEConfig,
    build=build,
    from_config=DAZLE.architecture_only,
    loss=dazle_loss,  # its weights are the model's settings; the run's loss section is DEDN's
    from_reference=from_reference,
    reference_scores=reference_scores,
    reference_loss=reference_loss,
    # No margin inside the scores (paper mode): the released code's effective test-time gap, 2, as MSDN and
    # TransZero do; with the released margin inside them, nothing on top.
    default_gamma=lambda run, dataset: (
        0.0 if resolve_dazle(run.mode, dataset, run.model.options)["calibration_margin"] > 0 else 2.0),
))
