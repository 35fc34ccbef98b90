"""Compatibility with the authors' released DEDN code (github zjrao/DEDN, ``core/DEDN_*.py``).

For people who trained with the released code and saved ``model.state_dict()``:

- :func:`from_reference_state_dict` / :func:`load_reference_checkpoint` turn such a state dict into a
  reference-mode :class:`~dedn.models.dedn.DEDN` that computes the same scores.
- :func:`reference_scores` gives the released forward's two outputs ``S_pp`` (cExp = ``GNet``,
  fExp = ``Snet0..``), calibration margin included, in training or evaluation mode.
- :func:`reference_loss` gives the released training loss of a batch (``Cub_train.py`` and siblings).

The released state dict (``G`` = 300, ``C`` = 2048, ``R`` = h*w)::

    GNet.V (D, G)  attributes in DATASET order        SnetQ.V (D_q, G)  cluster q's rows, ascending index
    GNet.H_1, GNet.H_2 (G, C)    -> W1, W2            (same names under every Snet)
    GNet.H_3, GNet.H_4 (G, R)    -> W3, W4
    SUN: H_1 (G, h), H_3 (h, C)  -> W1 = H_1 H_3;  H_2 (G, C) -> W2;  H_4, H_5 (G, R) -> W3, W4
    att (K, D) cluster-ordered, row-normalised;  bias (scalar);  mask_bias (1, K): -1 seen, +1 unseen;
    weight_ce (K, K) identity

Where the released code's loss depends on the dataset (all handled here):

- MAL target: CUB subtracts 2 from the target score, SUN and AWA2 subtract 1 (the others seen get +1);
  AWA2 uses ``bias`` as its MAL margin where CUB and SUN hard-code 1, so AWA2's default margin is ``bias``.
- The cubic part of the discrepancy: SUN and AWA2 add 1e-9 under the square root, CUB does not. dedn's
  reference discrepancy always adds it; the difference is far below float32 resolution unless the two
  inputs are equal (where the released CUB code divides 0 by 0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dedn.config import LossConfig, ModelConfig
from dedn.data.benchmarks import BENCHMARKS
from dedn.data.clusters import builtin_clusters
from dedn.data.xlsa17 import canonical_dataset
from dedn.errors import CheckpointError
from dedn.models.dedn import DEDN, DEDNConfig
from dedn.models.losses import dedn_loss
from dedn.models.settings import resolve_method

__all__ = [
    "REFERENCE_PRESETS",
    "ReferenceSettings",
    "from_reference_state_dict",
    "load_reference_checkpoint",
    "reference_loss",
    "reference_scores",
]

#: The released scripts' GZSL settings (``script.sh``) per dataset, from the benchmark table.
REFERENCE_PRESETS: dict[str, dict[str, Any]] = {
    name: {"l_rc": b.presets["gzsl"].l_rc, "l_e": b.presets["gzsl"].l_e, "lamb": b.presets["gzsl"].lamb,
           "low_rank": b.presets["gzsl"].low_rank}
    for name, b in BENCHMARKS.items()
}
_COMMON = {"margin": 1.0, "mal": True, "gamma": 0.1, "beta": 0.001}
_HPARAMS = ("l_rc", "l_e", "lamb", "margin", "gamma", "beta", "low_rank", "mal")


@dataclass
class ReferenceSettings:
    """What :func:`reference_loss` needs besides the model: the dataset (for its MAL quirk) and the loss
    weights. Attached to a loaded model as ``model.reference_settings``."""

    dataset: str
    loss: LossConfig = field(default_factory=LossConfig)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


class _Checker:
    """Fetches state-dict entries by name, checking presence and shape, and remembers what it used."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = state
        self.used: set[str] = set()

    def get(self, key: str, shape: tuple[int | None, ...] | None = None) -> Tensor:
        if key not in self.state:
            raise CheckpointError(f"reference state dict: missing key {key!r}"
                                  + (f" (expected shape {_fmt(shape)})" if shape is not None else ""))
        value = self.state[key]
        if not torch.is_tensor(value):
            raise CheckpointError(f"reference state dict: {key!r} is a {type(value).__name__}, not a tensor")
        found = _shape(value)
        if shape is not None and (len(found) != len(shape)
                                  or any(e is not None and e != f for e, f in zip(shape, found, strict=True))):
            raise CheckpointError(f"reference state dict: {key!r} has shape {found}, expected {_fmt(shape)}")
        self.used.add(key)
        return value.detach()


def _fmt(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def _seen_mask(seen_classes: Any, n_classes: int) -> np.ndarray:
    """(K,) bool from a (K,) bool mask or a list of seen class indices."""
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


def from_reference_state_dict(
    state_dict: Mapping[str, Any],
    dataset: str,
    seen_classes: Any,
    **hparams: Any,
) -> DEDN:
    """A reference-mode :class:`DEDN` holding the weights of a released-code state dict.

    Args:
        state_dict: the released model's ``state_dict()`` (names as in the module docstring; a common
            ``module.`` prefix from DataParallel is accepted).
        dataset: CUB, SUN or AWA2: picks the attribute layout (``builtin_clusters(dataset, "reference")``,
            the released code's ``indicator`` groups in Snet order) and the loss quirks.
        seen_classes: seen class indices (like the released ``seenclasses``) or a (K,) bool mask.
        **hparams: ``l_rc``, ``l_e``, ``lamb``, ``margin``, ``gamma``, ``beta``, ``low_rank``, ``mal``;
            missing ones take the dataset's GZSL preset (AWA2's margin defaults to the
            checkpoint's ``bias``; ``low_rank`` defaults to the checkpoint's ``H_1`` width for SUN).

    The model's dtype is the state dict's (a float64 state dict gives a float64 model). The loss settings
    are attached as ``model.reference_settings`` (:class:`ReferenceSettings`) for :func:`reference_loss`.

    Raises:
        CheckpointError: a key is missing or unexpected, a shape does not fit the dataset's layout, or
            ``mask_bias`` / ``weight_ce`` disagree with ``seen_classes`` / the identity.
        ValueError: an unknown hyperparameter name.
    """
    ds = canonical_dataset(dataset)
    if ds is None:
        raise CheckpointError(f"reference checkpoints exist for CUB, SUN and AWA2, got dataset {dataset!r}")
    unknown = sorted(set(hparams) - set(_HPARAMS))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown}; known: {list(_HPARAMS)}")
    state = _strip_prefix(state_dict)
    low_rank_layout = ds == "SUN"
    clusters = list(builtin_clusters(ds, "reference").values())
    for q, idx in enumerate(clusters):
        # The released Snet q holds init_w2v_att[indicator == q]: its cluster's rows in ascending order.
        if np.any(np.diff(idx) <= 0):  # pragma: no cover - guards the built-in table
            raise CheckpointError(f"built-in {ds} cluster {q} is not in ascending index order")
    d = BENCHMARKS[ds].n_attributes
    chk = _Checker(state)

    v_g = chk.get("GNet.V", (d, None))
    g = v_g.shape[1]
    c = chk.get("GNet.H_2", (g, None)).shape[1]
    r = chk.get("GNet.H_4" if low_rank_layout else "GNet.H_3", (g, None)).shape[1]
    rank: int | None = None
    if low_rank_layout:
        rank = chk.get("GNet.H_1", (g, None)).shape[1]
        wanted = hparams.get("low_rank")
        if wanted is not None and int(wanted) != rank:
            raise CheckpointError(f"reference state dict: 'GNet.H_1' has shape {(g, rank)}, expected "
                                  f"{(g, int(wanted))} (low_rank={wanted})")
    elif hparams.get("low_rank"):
        raise CheckpointError(f"low_rank={hparams['low_rank']} given, but the released {ds} model has a full-rank "
                              "W1 (only SUN's is low-rank)")

    def subnet(prefix: str, n: int) -> dict[str, Tensor]:
        """One released SubNet's tensors under dedn's names (V, W1 or H1/H3, W2, W3, W4)."""
        out = {"V": chk.get(f"{prefix}.V", (n, g))}
        if low_rank_layout:
            out["H1"] = chk.get(f"{prefix}.H_1", (g, rank))
            out["W2"] = chk.get(f"{prefix}.H_2", (g, c))
            out["H3"] = chk.get(f"{prefix}.H_3", (rank, c))
            out["W3"] = chk.get(f"{prefix}.H_4", (g, r))
            out["W4"] = chk.get(f"{prefix}.H_5", (g, r))
        else:
            out["W1"] = chk.get(f"{prefix}.H_1", (g, c))
            out["W2"] = chk.get(f"{prefix}.H_2", (g, c))
            out["W3"] = chk.get(f"{prefix}.H_3", (g, r))
            out["W4"] = chk.get(f"{prefix}.H_4", (g, r))
        return out

    gnet = subnet("GNet", d)
    snets = [subnet(f"Snet{q}", idx.size) for q, idx in enumerate(clusters)]
    att = chk.get("att", (None, d))
    k = att.shape[0]
    has_bias = "bias" in state
    bias = 0.0
    if has_bias:
        bias_t = chk.get("bias")
        if bias_t.numel() != 1:
            raise CheckpointError(f"reference state dict: 'bias' has shape {_shape(bias_t)}, expected a scalar")
        bias = float(bias_t.reshape(()))
    seen = _seen_mask(seen_classes, k)
    if has_bias:
        mask_bias = chk.get("mask_bias", (1, k)).reshape(-1).double().cpu().numpy()
        if not np.array_equal(mask_bias, np.where(seen, -1.0, 1.0)):
            raise CheckpointError("reference state dict: 'mask_bias' (-1 on seen, +1 on unseen classes) disagrees "
                                  "with seen_classes")
    if "weight_ce" in state:
        weight_ce = chk.get("weight_ce", (k, k))
        if not torch.equal(weight_ce.double().cpu(), torch.eye(k, dtype=torch.float64)):
            raise CheckpointError("reference state dict: 'weight_ce' is not the identity; dedn's loss uses "
                                  "one-hot targets")
    extra = sorted(set(state) - chk.used)
    if extra:
        raise CheckpointError(f"reference state dict: unexpected key {extra[0]!r} ({len(extra)} unexpected in all); "
                              f"the released {ds} model has GNet and Snet0..Snet{len(clusters) - 1}")

    preset = {**_COMMON, **REFERENCE_PRESETS[ds]}
    if ds == "AWA2":
        preset["margin"] = bias if has_bias else 1.0  # Awa2's MAL adds bias / subtracts 2 bias
    if not has_bias:
        preset["mal"] = False  # the released code applies MAL only with is_bias
    settings = {**preset, **hparams}
    if ds == "SUN":
        settings["low_rank"] = rank

    order = np.concatenate(clusters)
    dtype = v_g.dtype if v_g.is_floating_point() else torch.float32
    att_dataset = torch.zeros(k, d, dtype=torch.float64)
    att_dataset[:, torch.as_tensor(order)] = att.double().cpu()  # only for construction; overwritten below
    loss = LossConfig(beta=float(settings["beta"]), gamma=float(settings["gamma"]), margin=float(settings["margin"]),
                      mal=bool(settings["mal"]), lamb=float(settings["lamb"]), calibration_margin=bias)
    config = DEDNConfig(
        n_attributes=d, semantic_dim=g, n_channels=c, n_regions=r, clusters=tuple(clusters),
        l_rc=float(settings["l_rc"]), l_e=float(settings["l_e"]),
        method=resolve_method("reference", ds, loss, ModelConfig(low_rank=settings["low_rank"] or None)),
    )
    # cExp's V: GNet.V is in dataset order, dedn keeps cluster order (the released code permutes GNet's
    # outputs by indicator instead; the attribute-wise products are the same).
    gnet["V"] = gnet["V"][torch.as_tensor(order)]
    subnets = {"cexp": [gnet], "fexp": snets}  # each expert's released SubNets, in cluster order
    with torch.no_grad():
        model = DEDN.from_config(config, v_g.float().cpu().numpy(), att_dataset.numpy(), seen).to(dtype)
        for name, expert in model.experts.items():
            expert.V.copy_(torch.cat([s["V"] for s in subnets[name]]).to(dtype))
            for key in (("H1", "H3") if low_rank_layout else ("W1",)) + ("W2", "W3", "W4"):
                getattr(expert, key).copy_(torch.stack([s[key] for s in subnets[name]]).to(dtype))
        # The released att is already cluster-ordered and normalised: take it bit for bit.
        model.class_att = att.to(dtype).cpu().clone()
    model.reference_settings = ReferenceSettings(dataset=ds, loss=loss)
    return model


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a ``module.`` prefix that every key shares (a model saved from DataParallel)."""
    keys = list(state)
    if keys and all(key.startswith("module.") for key in keys):
        return {key[len("module."):]: value for key, value in state.items()}
    return dict(state)


def load_reference_checkpoint(path: str | Path, dataset: str, seen_classes: Any, **hparams: Any) -> DEDN:
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
        return from_reference_state_dict(obj, dataset, seen_classes, **hparams)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _check_reference(model: DEDN) -> None:
    """The released forward sums the branches in training and always has both experts and channel attention."""
    if not model.method.sum_branches_in_training or model.config.experts != "both" or not model.channel_attention:
        raise ValueError("the released code's outputs need a reference-mode model with both experts and channel "
                         f"attention (got mode={model.mode}, experts={model.config.experts}, "
                         f"channel_attention={model.channel_attention})")


def reference_scores(model: DEDN, features: Tensor, training: bool) -> tuple[Tensor, Tensor]:
    """The released forward's two ``S_pp`` outputs: (cExp = GNet, fExp = Snets) class scores, each (B, K).

    ``training=True`` gives the training-time scores (branches summed), ``False`` the evaluation-time ones
    (branches mixed with ``l_rc``); both include the calibration margin. The model's train/eval state is
    restored afterwards; gradients follow the caller's grad mode.

    Args:
        model: a reference-mode model, e.g. from :func:`from_reference_state_dict`.
        features: (B, C, h, w) feature maps.
    """
    _check_reference(model)
    was_training = model.training
    model.train(training)
    try:
        out = model(features)
    finally:
        model.train(was_training)
    assert out.cexp is not None and out.fexp is not None
    return out.cexp.scores, out.fexp.scores


def reference_loss(
    model: DEDN,
    features: Tensor,
    labels: Tensor | np.ndarray,
    loss: LossConfig | None = None,
    dataset: str | None = None,
) -> Tensor:
    """The released code's training loss of one batch (a scalar with gradients).

    loss_c + loss_f + gamma * distill + beta * (align_c + align_f), each loss = MAL-CE + lamb * self-calibration,
    computed in training mode (the model's state is restored afterwards).

    Args:
        model: a reference-mode model.
        features: (B, C, h, w) feature maps.
        labels: (B,) class indices (0-based, among all K classes).
        loss, dataset: default to ``model.reference_settings`` (set by :func:`from_reference_state_dict`).
    """
    _check_reference(model)
    settings: ReferenceSettings | None = getattr(model, "reference_settings", None)
    if loss is None or dataset is None:
        if settings is None:
            raise ValueError("give loss and dataset, or use a model from from_reference_state_dict")
        loss = settings.loss if loss is None else loss
        dataset = settings.dataset if dataset is None else dataset
    was_training = model.training
    model.train()
    try:
        out = model(features)
    finally:
        model.train(was_training)
    y = torch.as_tensor(labels, device=model.class_att.device).long()
    method = resolve_method("reference", dataset, loss)  # the released loss of this dataset, with these weights
    return dedn_loss(out, y, model.seen_mask, loss, method, model.calibration_bias()).total
