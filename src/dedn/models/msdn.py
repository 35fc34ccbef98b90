"""MSDN (Chen et al., CVPR 2022): two mutually distilled semantic subnets over region feature maps.

- The *attribute->visual* (AV) subnet is DEDN's region branch: an :class:`~dedn.models.dedn.Expert` with one
  cluster of all D attributes and no channel attention. Per attribute i and region r,
  S[b, i, r] = v_i^T W1 f_br and the attention A[b, i, r] = softmax over r of v_i^T W2 f_br;
  its attribute score is o_av[b, i] = sum_r A[b, i, r] S[b, i, r].
- The *visual->attribute* (VA) subnet has its own pair of (G, C) matrices U1, U2 but shares V with AV:
  S'[b, i, r] = v_i^T U1 f_br and A'[b, i, r] = softmax over the attributes i (not the regions) of
  v_i^T U2 f_br; o_va[b, i] = sum_r A'[b, i, r] S'[b, i, r].
- Class scores of a subnet: o Z^T + the calibration bias, Z the L2-normalised class attributes. Prediction
  mixes them, ``l_e`` * AV + (1 - ``l_e``) * VA (``l_e`` is MSDN's test weight w_AV).

:class:`MSDNSettings` holds what the mode (paper | reference) and the dataset decide, resolved once by
:func:`resolve_settings` from the one table :data:`DATASET_DEFAULTS`; the model and :func:`msdn_loss` read
only those values. The released code keeps the dataset's attribute order, so ``attribute_order`` is the
identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.checks import Rule, check, number
from dedn.data.xlsa17 import canonical_dataset
from dedn.errors import ConfigError
from dedn.models.class_set import ClassSet
from dedn.models.dedn import Expert, normalize_rows
from dedn.models.losses import LossTerms, jensen_shannon, released_jensen_shannon, self_calibration_loss
from dedn.models.precision import check_precision, product_dtype, round_bf16
from dedn.models.settings import make_plain

#: The released scripts' per-dataset settings (MSDN_{cub,sun,awa2}.py and the test configs): the
#: self-calibration weight, the distillation weight, whether V is renormalised on every forward, and the
#: test-time weight w_AV of the AV subnet (a run's ``model.l_e``). Any other dataset takes CUB's.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "CUB": {"lambda_cal": 0.1, "w_distill": 1e-3, "normalize_v": False, "w_av": 0.9},
    "SUN": {"lambda_cal": 1e-4, "w_distill": 1e-2, "normalize_v": False, "w_av": 0.7},
    "AWA2": {"lambda_cal": 0.12, "w_distill": 1e-7, "normalize_v": True, "w_av": 1.0},
}
#: The method's own options (a run's ``model.options``) and what each must be.
OPTION_RULES: dict[str, Rule] = {
    "lambda_cal": number(0.0),
    "w_distill": number(0.0),
    "normalize_v": Rule(lambda v: isinstance(v, bool), "true or false"),
}
#: Reference mode's fixed margin inside the class scores (the released constructor's ``bias=1``).
RELEASED_MARGIN = 1.0
#: The paper-mode epsilon under the square root of the distillation distance (the released code has none).
DISTANCE_EPS = 1e-9
#: The subnets, in the order of :meth:`MSDNOutput.branches` (the first gets the weight ``l_e``).
SUBNETS = ("av", "va")


def dataset_defaults(dataset: str | None) -> dict[str, Any]:
    """The released settings of ``dataset`` (CUB's for a dataset the released code has no script for)."""
    name = canonical_dataset(dataset) if dataset else None
    return dict(DATASET_DEFAULTS.get(name or "CUB", DATASET_DEFAULTS["CUB"]))


@dataclass(frozen=True)
class MSDNSettings:
    """MSDN's behaviour as explicit values (nothing downstream reads a mode or a dataset name).

    Attributes:
        mode: the mode these were resolved for (a label; nothing branches on it).
        lambda_cal: weight of each subnet's self-calibration loss.
        w_distill: weight of the distillation distance between the two subnets' class scores.
        normalize_v: V is L2-normalised row by row on every forward (the released AWA2 script).
        calibration_margin: the fixed shift inside the class scores, +margin on unseen and -margin on seen
            classes (reference mode: the released code's 1; paper mode: 0).
        clip_negative_attributes: class attributes are clipped at 0 before normalising (the released AWA2
            loader, reference mode only).
        released_distance: the distillation distance as the released code computes it: no epsilon under the
            cubic term's square root (NaN for a batch row where the two subnets agree exactly) and the JSD
            from the log of the averaged probabilities (NaN where both softmaxes underflow for a class).
            False: epsilon :data:`DISTANCE_EPS` and the JSD in log space.
        default_gamma: the calibration an evaluation uses when nothing chose one: 0 where the margin is inside
            the scores (reference), else 2 margins (paper: the same seen/unseen gap at test as the released code).
    """

    mode: str = "paper"
    lambda_cal: float = 0.1
    w_distill: float = 1e-3
    normalize_v: bool = False
    calibration_margin: float = 0.0
    clip_negative_attributes: bool = False
    released_distance: bool = False
    default_gamma: float = 2.0 * RELEASED_MARGIN

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MSDNSettings:
        return cls(**values)


def resolve_settings(mode: str, dataset: str | None, options: Mapping[str, Any] | None = None) -> MSDNSettings:
    """The settings of ``mode`` for ``dataset``: the dataset's released values, overridden by ``options``
    (a run's ``model.options``).

    Paper mode drops the released code's quirks: the fixed ±1 margin inside the scores, the AWA2 clipping of
    the released loader, and the distance's NaNs (no epsilon under its root, JSD from log of averages).

    Raises:
        ConfigError: an unknown option or a bad value, naming ``model.options.<key>``; a mode other than
            paper and reference.
    """
    if mode not in ("paper", "reference"):
        raise ConfigError(f"mode must be one of {{paper, reference}}, got {mode!r}")
    values = dataset_defaults(dataset)
    del values["w_av"]
    for key, value in (options or {}).items():
        if key not in OPTION_RULES:
            raise ConfigError(f"model.options.{key} is not an option of msdn (known: {', '.join(OPTION_RULES)})")
        check(f"model.options.{key}", value, OPTION_RULES[key])
        values[key] = value
    reference = mode == "reference"
    return MSDNSettings(
        mode=mode,
        lambda_cal=float(values["lambda_cal"]),
        w_distill=float(values["w_distill"]),
        normalize_v=bool(values["normalize_v"]),
        calibration_margin=RELEASED_MARGIN if reference else 0.0,
        clip_negative_attributes=reference and canonical_dataset(dataset) == "AWA2",
        released_distance=reference,
        default_gamma=0.0 if reference else 2.0 * RELEASED_MARGIN,
    )


@dataclass(frozen=True)
class MSDNConfig:
    """What fixes an MSDN's architecture and behaviour (model files record it, :meth:`to_dict`).

    Attributes:
        n_attributes: D.
        semantic_dim: G, the length of an attribute's semantic vector.
        n_channels: C of the feature maps.
        n_regions: R = h * w of the feature maps.
        l_rc: kept at 1.0: each subnet has one branch.
        l_e: w_AV, the test-time weight of the AV subnet's class scores (VA gets 1 - l_e).
        settings: the mode's and dataset's resolved settings (:func:`resolve_settings`).
    """

    n_attributes: int
    semantic_dim: int
    n_channels: int
    n_regions: int
    l_rc: float = 1.0
    l_e: float = 0.9
    settings: MSDNSettings = field(default_factory=MSDNSettings)

    def __post_init__(self) -> None:
        make_plain(self)

    @property
    def n_clusters(self) -> int:
        """Attribute groups: one (the method does not cluster attributes)."""
        return 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values; :meth:`from_dict` reads them back."""
        return {"n_attributes": self.n_attributes, "semantic_dim": self.semantic_dim, "n_channels": self.n_channels,
                "n_regions": self.n_regions, "l_rc": self.l_rc, "l_e": self.l_e, "settings": self.settings.to_dict()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MSDNConfig:
        """Read :meth:`to_dict`'s values. Raises TypeError or ValueError on unknown or bad values."""
        values = dict(values)
        values["settings"] = MSDNSettings.from_dict(values["settings"])
        return cls(**values)


@dataclass
class SubnetOutput:
    """One subnet's output for a batch: (B, D) attribute scores ``o`` and (B, K) class scores (bias included)."""

    o: Tensor
    scores: Tensor


@dataclass
class MSDNOutput:
    """Both subnets' outputs and the test-time weight of the AV subnet."""

    av: SubnetOutput
    va: SubnetOutput
    l_e: float

    def branches(self) -> dict[str, Tensor]:
        """The attribute scores, AV first (it gets the weight l_e): ``{"av_o_r": ..., "va_o_r": ...}``."""
        return {"av_o_r": self.av.o, "va_o_r": self.va.o}

    def expert_attributes(self) -> dict[str, Tensor]:
        """Each subnet's (B, D) attribute scores, AV first: ``{"av": ..., "va": ...}``."""
        return {"av": self.av.o, "va": self.va.o}

    def combined(self, l_e: float | None = None) -> Tensor:
        """(B, K) prediction scores l_e * P_AV + (1 - l_e) * P_VA, the calibration bias included."""
        l_e = self.l_e if l_e is None else l_e
        return l_e * self.av.scores + (1.0 - l_e) * self.va.scores


class VisualToAttribute(nn.Module):
    """The VA subnet's own weights, both (G, C) and zero at the start: U1 (the attribute scores) and U2 (the
    attention logits). Its semantic rows V are the AV subnet's."""

    def __init__(self, semantic_dim: int, n_channels: int) -> None:
        super().__init__()
        self.U1 = nn.Parameter(torch.zeros(semantic_dim, n_channels))
        self.U2 = nn.Parameter(torch.zeros(semantic_dim, n_channels))


class MSDN(ClassSet):
    """MSDN: the AV subnet (``model.av``, an :class:`Expert`) and the VA subnet (``model.va``), sharing V.

    Init: V = the normalised semantic rows, AV's W1 ~ N(0, 1) (the only random draw), everything else zero.
    """

    attribute_order: Tensor
    class_att: Tensor
    seen_mask: Tensor

    def __init__(self, config: MSDNConfig, semantic: np.ndarray | Tensor, class_att: np.ndarray | Tensor,
                 seen_mask: np.ndarray | Tensor) -> None:
        super().__init__()
        self.config = config
        d, g = config.n_attributes, config.semantic_dim
        semantic = torch.as_tensor(np.asarray(semantic, dtype=np.float32))
        if tuple(semantic.shape) != (d, g):
            raise ValueError(f"semantic vectors must be ({d}, {g}), got {tuple(semantic.shape)}")
        self.register_buffer("attribute_order", torch.arange(d, dtype=torch.int64))
        self.register_buffer("class_att", torch.zeros(0, d))
        self.register_buffer("seen_mask", torch.zeros(0, dtype=torch.bool))
        self.set_classes(class_att, seen_mask)
        self.av = Expert(normalize_rows(semantic), [d], config.n_channels, config.n_regions, channel_attention=False)
        self.va = VisualToAttribute(g, config.n_channels)

    # ------------------------------------------------------------------ classes
    def scored_class_att(self, class_att: Tensor) -> Tensor:
        """(K, D) class attributes as the model scores against them: clipped at 0 where the settings say, rows
        L2-normalised (dataset attribute order, in the model's dtype and on its device)."""
        att = class_att.clamp_min(0) if self.config.settings.clip_negative_attributes else class_att
        return normalize_rows(att.to(self.attribute_order.device, self.class_att.dtype))

    def calibration_bias(self) -> Tensor:
        """(K,): +margin on unseen, -margin on seen classes (reference mode), or zeros."""
        return self.margin_bias(self.config.settings.calibration_margin)

    # ------------------------------------------------------------------ forward
    def prepare_features(self, features: Tensor) -> Tensor:
        """(B, C, h, w) or (B, C, R) -> (B, C, R) in the model's dtype, each region vector L2-normalised."""
        features = self.region_maps(features)
        return F.normalize(features.to(self.class_att.dtype), dim=1, eps=1e-12)

    def semantic_rows(self) -> Tensor:
        """V as both subnets use it: row-normalised on every forward where the settings say so."""
        v = self.av.V
        return normalize_rows(v) if self.config.settings.normalize_v else v

    def projections(self) -> Tensor:
        """(4 D, C): V W1, V W2 (AV), V U1, V U2 (VA) stacked, so one product over the features does all."""
        v = self.semantic_rows()
        w1, w2 = self.av.W1, self.av.W2
        assert w1 is not None
        return torch.cat([v @ w1[0], v @ w2[0], v @ self.va.U1, v @ self.va.U2])

    def forward(self, features: Tensor, precision: str = "fp32") -> MSDNOutput:
        """Both subnets' attribute and class scores for a batch of feature maps.

        ``precision="bf16"`` rounds the features and the projections to bfloat16 for the product over the
        features (float32 accumulation); the softmaxes and the outputs stay in the model's dtype.
        """
        bf16 = check_precision(precision) == "bf16"
        if bf16 and self.class_att.dtype != torch.float32:
            raise ValueError(f"precision bf16 needs a float32 model, this one is {self.class_att.dtype}")
        feats = self.prepare_features(features)
        m = self.projections()
        if bf16:
            compute = product_dtype(feats.device)
            y = torch.matmul(round_bf16(m, compute), round_bf16(feats, compute)).float()
        else:
            y = torch.matmul(m, feats)  # (B, 4 D, R)
        s_av, a_av, s_va, a_va = torch.chunk(y, 4, dim=1)
        o_av = (s_av * torch.softmax(a_av, dim=-1)).sum(-1)  # attention over the regions
        o_va = (s_va * torch.softmax(a_va, dim=1)).sum(-1)  # attention over the attributes, per region
        bias = self.calibration_bias()
        return MSDNOutput(av=SubnetOutput(o_av, o_av @ self.class_att.T + bias),
                          va=SubnetOutput(o_va, o_va @ self.class_att.T + bias), l_e=self.config.l_e)

    @torch.no_grad()
    def attention_maps(self, features: Tensor) -> dict[str, Tensor]:
        """``{"av_region": ..., "va_region": ...}``, each (B, D, R): AV's sums to 1 over the regions, VA's
        over the attributes (of each region)."""
        feats = self.prepare_features(features)
        _, a_av, _, a_va = torch.chunk(torch.matmul(self.projections(), feats), 4, dim=1)
        return {"av_region": torch.softmax(a_av, dim=-1), "va_region": torch.softmax(a_va, dim=1)}

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"mode={cfg.settings.mode}, D={cfg.n_attributes}, K={self.class_att.shape[0]}, "
                f"C={cfg.n_channels}, R={cfg.n_regions}, l_e={cfg.l_e}")


def msdn_distance(x: Tensor, y: Tensor, released: bool = False) -> Tensor:
    """The distillation distance between two (B, K) score tensors; gradients reach both.

    d = JSD(softmax x, softmax y) + (1/B) sum_b sum_k |x - y|^3 / sqrt(sum_k (x - y)^2 + eps), natural log,
    batch mean. ``released``: as the released code computes it, eps = 0 (NaN for a row where x = y) and the
    JSD from the log of the averaged probabilities; else eps = :data:`DISTANCE_EPS` and the JSD in log space.
    """
    diff = x - y
    sq = diff.pow(2)
    eps = 0.0 if released else DISTANCE_EPS
    cubic = (sq / torch.sqrt(sq.sum(-1, keepdim=True) + eps) * diff.abs()).sum() / x.shape[0]
    return (released_jensen_shannon(x, y) if released else jensen_shannon(x, y)) + cubic


def msdn_loss(model: MSDN, out: MSDNOutput, labels: Tensor, seen_mask: Tensor, loss_settings: Any = None) -> LossTerms:
    """L = sum over AV, VA of [CE + lambda_cal L_cal] + w_distill d(P_AV, P_VA).

    CE is over all K classes on the scores with the calibration bias taken out; L_cal and the distance take
    the scores as the model gives them (bias included, as the released code does). The weights are the model's
    (:class:`MSDNSettings`); ``loss_settings`` (a run's ``loss`` section, DEDN's) is not read.
    """
    settings = model.config.settings
    bias = model.calibration_bias()
    unseen = ~seen_mask
    terms: dict[str, Tensor] = {}
    total = out.av.scores.new_zeros(())
    for name in SUBNETS:
        scores = getattr(out, name).scores
        ce = F.cross_entropy(scores - bias, labels)
        terms[f"ce_{name}"] = ce
        total = total + ce
        if settings.lambda_cal > 0 and bool(unseen.any()):
            cal = self_calibration_loss(scores, unseen)
            terms[f"cal_{name}"] = cal
            total = total + settings.lambda_cal * cal
    if settings.w_distill > 0:
        distill = msdn_distance(out.av.scores, out.va.scores, settings.released_distance)
        terms["distill"] = distill
        total = total + settings.w_distill * distill
    return LossTerms(total=total, terms=terms)
