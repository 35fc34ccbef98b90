"""DEDN's compatibility with the authors' released code (github zjrao/DEDN, ``core/DEDN_*.py``).

For people who trained with the released code and saved ``model.state_dict()`` (reached through
:mod:`dedn.models.compat`, which dispatches to a method's hooks; these are DEDN's):

- :func:`from_reference_state_dict` turns such a state dict into a
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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dedn.data.benchmarks import BENCHMARKS
from dedn.data.clusters import builtin_clusters
from dedn.errors import CheckpointError
from dedn.models.dedn import DEDN, DEDNConfig
from dedn.models.losses import dedn_loss
from dedn.models.released import StateReader, open_released, read_class_side, shape_of, training_mode
from dedn.models.settings import LossSettings, resolve_method

__all__ = [
    "REFERENCE_PRESETS",
    "ReferenceSettings",
    "ReleasedLoss",
    "from_reference_state_dict",
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


@dataclass(frozen=True)
class ReleasedLoss:
    """The released code's loss weights (a :class:`~dedn.models.settings.LossSettings`): the ones a released
    script sets, and what its loss always does (align, distill, the released discrepancy)."""

    beta: float
    gamma: float
    margin: float
    mal: bool
    lamb: float
    calibration_margin: float
    align: bool = True
    distill: bool = True
    divergence: str = "jsd"
    squared_error: str = "mean"


@dataclass
class ReferenceSettings:
    """What :func:`reference_loss` needs besides the model: the dataset (for its MAL quirk) and the loss
    weights. Attached to a loaded model as ``model.reference_settings``."""

    dataset: str
    loss: ReleasedLoss


@dataclass
class _Released:
    """A released state dict read and checked: each SubNet's tensors under dedn's names, and the class side."""

    dataset: str
    clusters: list[np.ndarray]
    gnet: dict[str, Tensor]  # cExp's SubNet; its V in dataset order
    snets: list[dict[str, Tensor]]  # fExp's SubNets, in cluster order
    att: Tensor  # (K, D) cluster-ordered, row-normalised
    rank: int | None  # SUN's W1 rank

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(D, G, C, R)."""
        d, g = shape_of(self.gnet["V"])
        return d, g, shape_of(self.gnet["W2"])[1], shape_of(self.gnet["W3"])[1]


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
    ds, chk = open_released(state_dict, dataset, hparams, _HPARAMS)
    released = _read_subnets(chk, ds, hparams.get("low_rank"))
    seen, bias = _read_class_side(chk, released, seen_classes)
    settings = {**_preset(ds, bias), **hparams}
    if ds == "SUN":
        settings["low_rank"] = released.rank
    loss = ReleasedLoss(beta=float(settings["beta"]), gamma=float(settings["gamma"]),
                        margin=float(settings["margin"]), mal=bool(settings["mal"]), lamb=float(settings["lamb"]),
                        calibration_margin=bias or 0.0)
    d, g, c, r = released.shape
    config = DEDNConfig(
        n_attributes=d, semantic_dim=g, n_channels=c, n_regions=r, clusters=tuple(released.clusters),
        l_rc=float(settings["l_rc"]), l_e=float(settings["l_e"]),
        method=resolve_method("reference", ds, loss, low_rank=settings["low_rank"] or None),
    )
    model = _load_released(config, released, seen)
    model.reference_settings = ReferenceSettings(dataset=ds, loss=loss)
    return model


def _read_subnets(chk: StateReader, ds: str, wanted_rank: int | None) -> _Released:
    """GNet's and every Snet's tensors, checked against the dataset's layout (the class side comes later)."""
    low_rank_layout = ds == "SUN"
    clusters = list(builtin_clusters(ds, "reference").values())
    for q, idx in enumerate(clusters):
        # The released Snet q holds init_w2v_att[indicator == q]: its cluster's rows in ascending order.
        if np.any(np.diff(idx) <= 0):  # pragma: no cover - guards the built-in table
            raise CheckpointError(f"built-in {ds} cluster {q} is not in ascending index order")
    d = BENCHMARKS[ds].n_attributes
    g = chk.get("GNet.V", (d, None)).shape[1]
    c = chk.get("GNet.H_2", (g, None)).shape[1]
    r = chk.get("GNet.H_4" if low_rank_layout else "GNet.H_3", (g, None)).shape[1]
    rank: int | None = None
    if low_rank_layout:
        rank = chk.get("GNet.H_1", (g, None)).shape[1]
        if wanted_rank is not None and int(wanted_rank) != rank:
            raise CheckpointError(f"reference state dict: 'GNet.H_1' has shape {(g, rank)}, expected "
                                  f"{(g, int(wanted_rank))} (low_rank={wanted_rank})")
    elif wanted_rank:
        raise CheckpointError(f"low_rank={wanted_rank} given, but the released {ds} model has a full-rank "
                              "W1 (only SUN's is low-rank)")
    dims = (g, c, r, rank)
    return _Released(dataset=ds, clusters=clusters, gnet=_subnet(chk, "GNet", d, dims),
                     snets=[_subnet(chk, f"Snet{q}", idx.size, dims) for q, idx in enumerate(clusters)],
                     att=chk.get("att", (None, d)), rank=rank)


def _subnet(chk: StateReader, prefix: str, n: int, dims: tuple[int, int, int, int | None]) -> dict[str, Tensor]:
    """One released SubNet's tensors under dedn's names (V, W1 or H1/H3, W2, W3, W4); ``dims`` = (G, C, R, rank)
    with a rank for SUN's low-rank layout only."""
    g, c, r, rank = dims
    out = {"V": chk.get(f"{prefix}.V", (n, g))}
    if rank is not None:
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


def _read_class_side(chk: StateReader, released: _Released, seen_classes: Any) -> tuple[np.ndarray, float | None]:
    """The seen mask and the calibration margin ``bias`` (None: the model has none, the released ``is_bias``
    off), with ``mask_bias`` and ``weight_ce`` checked against them; then no key may be left unread."""
    seen, bias = read_class_side(chk, released.att.shape[0], seen_classes)
    chk.check_all_read(f"the released {released.dataset} model has GNet and "
                       f"Snet0..Snet{len(released.clusters) - 1}")
    return seen, bias


def _preset(ds: str, bias: float | None) -> dict[str, Any]:
    """The released script's settings for ``ds``, given the checkpoint's ``bias`` (None: it has none)."""
    preset = {**_COMMON, **REFERENCE_PRESETS[ds]}
    if ds == "AWA2":
        preset["margin"] = bias if bias is not None else 1.0  # Awa2's MAL adds bias / subtracts 2 bias
    if bias is None:
        preset["mal"] = False  # the released code applies MAL only with is_bias
    return preset


def _load_released(config: DEDNConfig, released: _Released, seen: np.ndarray) -> DEDN:
    """A model of ``config`` holding the released tensors, in the state dict's dtype."""
    order = np.concatenate(released.clusters)
    v_g, att = released.gnet["V"], released.att
    dtype = v_g.dtype if v_g.is_floating_point() else torch.float32
    att_dataset = torch.zeros(att.shape[0], config.n_attributes, dtype=torch.float64)
    att_dataset[:, torch.as_tensor(order)] = att.double().cpu()  # only for construction; overwritten below
    # cExp's V: GNet.V is in dataset order, dedn keeps cluster order (the released code permutes GNet's
    # outputs by indicator instead; the attribute-wise products are the same).
    gnet = {**released.gnet, "V": v_g[torch.as_tensor(order)]}
    subnets = {"cexp": [gnet], "fexp": released.snets}  # each expert's released SubNets, in cluster order
    weights = (("H1", "H3") if released.rank is not None else ("W1",)) + ("W2", "W3", "W4")
    with torch.no_grad():
        model = DEDN.from_config(config, v_g.float().cpu().numpy(), att_dataset.numpy(), seen).to(dtype)
        for name, expert in model.experts.items():
            expert.V.copy_(torch.cat([s["V"] for s in subnets[name]]).to(dtype))
            for key in weights:
                getattr(expert, key).copy_(torch.stack([s[key] for s in subnets[name]]).to(dtype))
        # The released att is already cluster-ordered and normalised: take it bit for bit.
        model.class_att = att.to(dtype).cpu().clone()
    return model


def _check_reference(model: DEDN) -> None:
    """The released forward sums the branches in training and always has both experts and channel attention."""
    cfg = model.config
    if not cfg.method.sum_branches_in_training or cfg.experts != "both" or not cfg.channel_attention:
        raise ValueError("the released code's outputs need a reference-mode model with both experts and channel "
                         f"attention (got mode={cfg.method.mode}, experts={cfg.experts}, "
                         f"channel_attention={cfg.channel_attention})")


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
    with training_mode(model, training):
        out = model(features)
    assert out.cexp is not None and out.fexp is not None
    return out.cexp.scores, out.fexp.scores


def reference_loss(
    model: DEDN,
    features: Tensor,
    labels: Tensor | np.ndarray,
    loss: LossSettings | None = None,
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
    with training_mode(model, True):
        out = model(features)
    y = torch.as_tensor(labels, device=model.class_att.device).long()
    method = resolve_method("reference", dataset, loss)  # the released loss of this dataset, with these weights
    return dedn_loss(out, y, model.seen_mask, loss, method, model.calibration_bias()).total
