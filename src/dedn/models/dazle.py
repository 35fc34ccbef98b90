"""DAZLE (Huynh & Elhamifar, CVPR 2020): dense attribute-based attention, an attribute gate, self-calibration.

What it computes for a batch of feature maps F (B, C, R), each region vector f_{b,r} L2-normalised over C
(docs/methods/dazle.md has the equations and the paper / reference differences):

- attribute -> region attention, exactly DEDN's region branch with one cluster and no channel attention (the
  :class:`~dedn.models.dedn.Expert` is reused): S_{b,i,r} = v_i W1 f_{b,r}, alpha_{b,i,r} = softmax_r(v_i W2 f_{b,r}),
  e_{b,i} = sum_r alpha_{b,i,r} S_{b,i,r};
- the attribute gate beta_{b,i} = sigmoid(v_i W3 h_{b,i}), h_{b,i} = sum_r alpha_{b,i,r} f_{b,r} (off: beta = 1);
- attribute scores o = beta * e, class scores o Z^T + calibration_bias() (Z the row-normalised class attributes).

V (D, G) are the trainable attribute word vectors (initialised as the normalised semantic rows); with
``normalize_v`` they are re-normalised on every forward (the released AWA2 setting).

:func:`resolve_dazle` is the one table of what mode (paper | reference) and dataset change; the model and
:func:`dazle_loss` read only the resolved :class:`DAZLEConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.checks import Rule, check, choice, number
from dedn.data.xlsa17 import canonical_dataset
from dedn.errors import ConfigError
from dedn.models.class_set import ClassSet
from dedn.models.dedn import Expert, normalize_rows
from dedn.models.losses import LossTerms, self_calibration_loss
from dedn.models.precision import check_precision
from dedn.models.settings import make_plain

#: The name of DAZLE's one expert in :meth:`DAZLEOutput.branches` and :meth:`DAZLE.attention_maps`.
EXPERT = "dazle"
#: The classes the cross-entropy's softmax runs over: the seen classes (the paper) or all K (released code).
CE_CLASSES = ("seen", "all")

_BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
_NON_NEGATIVE = number(0.0)
#: Each method option (``model.options.<key>``) and the values it takes.
OPTION_RULES: dict[str, Rule] = {
    "gate": _BOOL,
    "normalize_v": _BOOL,
    "clip_negative_attributes": _BOOL,
    "lambda_cal": _NON_NEGATIVE,
    "calibration_margin": _NON_NEGATIVE,
    "calibration_shift": _NON_NEGATIVE,
    "ce_classes": choice(*CE_CLASSES),
}

#: The released notebooks' per-dataset settings, taken in both modes (another dataset or None: CUB's).
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "CUB": {"gate": True, "normalize_v": False, "clip_negative_attributes": False, "lambda_cal": 0.1},
    "SUN": {"gate": False, "normalize_v": False, "clip_negative_attributes": False, "lambda_cal": 0.1},
    "AWA2": {"gate": True, "normalize_v": True, "clip_negative_attributes": True, "lambda_cal": 0.1},
}
#: What the mode changes. paper: CE over the seen classes, +shift on unseen scores inside the calibration loss
#: only, no margin in the scores. reference: CE over all K, a fixed -margin seen / +margin unseen inside the
#: scores at training and test, the calibration loss on those scores.
MODE_SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {"ce_classes": "seen", "calibration_margin": 0.0, "calibration_shift": 1.0},
    "reference": {"ce_classes": "all", "calibration_margin": 1.0, "calibration_shift": 0.0},
}


@dataclass(frozen=True)
class DAZLEConfig:
    """Everything that fixes a DAZLE's architecture and behaviour; model files record it (:meth:`to_dict`).

    Attributes:
        n_attributes: D.
        semantic_dim: G, the length of an attribute's word vector.
        n_channels: C of the feature maps.
        n_regions: R = h * w of the feature maps.
        mode: the mode the settings were resolved for (a label; nothing branches on it).
        gate: the attribute gate beta (False: beta = 1, the released SUN setting).
        normalize_v: V is L2-normalised row-wise on every forward (the released AWA2 setting).
        clip_negative_attributes: class attributes are clipped at 0 before normalising (the released AWA2 loader).
        calibration_margin: fixed -margin on seen, +margin on unseen class scores inside the scores (reference).
        calibration_shift: added to the unseen scores inside the self-calibration loss only (the paper's +1).
        lambda_cal: weight of the self-calibration loss (0 leaves it out).
        ce_classes: the cross-entropy's softmax over the ``"seen"`` classes or ``"all"`` K.
        l_rc, l_e: the evaluation-time branch and expert weights of every method; DAZLE has one branch of one
            expert, so they stay 1.0 and change nothing.
    """

    n_attributes: int
    semantic_dim: int
    n_channels: int
    n_regions: int
    mode: str = "paper"
    gate: bool = True
    normalize_v: bool = False
    clip_negative_attributes: bool = False
    calibration_margin: float = 0.0
    calibration_shift: float = 1.0
    lambda_cal: float = 0.1
    ce_classes: str = "seen"
    l_rc: float = 1.0
    l_e: float = 1.0

    def __post_init__(self) -> None:
        make_plain(self)
        if self.ce_classes not in CE_CLASSES:
            raise ValueError(f"ce_classes must be one of {CE_CLASSES}, got {self.ce_classes!r}")

    @property
    def n_clusters(self) -> int:
        """Attribute groups: one (the method does not cluster attributes)."""
        return 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values; :meth:`from_dict` reads them back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DAZLEConfig:
        """Read :meth:`to_dict`'s values. Raises TypeError or ValueError on unknown or bad values."""
        return cls(**dict(values))


def resolve_dazle(mode: str, dataset: str | None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """DAZLE's settings (the :class:`DAZLEConfig` fields after the sizes) for ``mode`` and ``dataset``, with the
    run's ``model.options`` on top.

    Raises:
        ValueError: a mode other than paper and reference (configs are checked before they get here).
        ConfigError: an unknown option or a bad value, naming ``model.options.<key>``.
    """
    if mode not in MODE_SETTINGS:
        raise ValueError(f"mode must be paper or reference, got {mode!r}")
    name = canonical_dataset(dataset) if dataset else None
    settings = {"mode": mode, **DATASET_SETTINGS.get(name or "CUB", DATASET_SETTINGS["CUB"]), **MODE_SETTINGS[mode]}
    for key, value in dict(options or {}).items():
        rule = OPTION_RULES.get(key)
        if rule is None:
            raise ConfigError(f"model.options.{key}: unknown option of dazle; known: {', '.join(OPTION_RULES)}")
        check(f"model.options.{key}", value, rule)
        settings[key] = value
    return settings


@dataclass
class DAZLEOutput:
    """DAZLE's forward output for a batch.

    Attributes:
        o: (B, D) attribute scores beta * e, what the class scores are made from.
        e: (B, D) attention-pooled attribute scores before the gate.
        gate: (B, D) the gate beta (ones when the gate is off).
        scores: (B, K) class scores o Z^T, calibration margin included.
    """

    o: Tensor
    e: Tensor
    gate: Tensor
    scores: Tensor

    def branches(self) -> dict[str, Tensor]:
        """The one branch's attribute scores, ``{"dazle_o_r": o}``."""
        return {f"{EXPERT}_o_r": self.o}

    def expert_attributes(self) -> dict[str, Tensor]:
        """The one expert's (B, D) attribute scores, ``{"dazle": o}``."""
        return {EXPERT: self.o}

    def combined(self, l_e: float | None = None) -> Tensor:
        """(B, K) prediction scores; one expert, so ``l_e`` changes nothing."""
        return self.scores


class DAZLE(ClassSet):
    """DAZLE over region feature maps; build it with :meth:`from_config` (seed torch's RNG first).

    ``attention`` is the attribute -> region attention (:class:`~dedn.models.dedn.Expert` with one cluster,
    no channel attention: its ``V``, ``W1``, ``W2``); ``W3`` (G, C) is the gate's weight. Init as released:
    V = normalised word vectors, W1 ~ N(0, 1) (the only random draw), W2 = W3 = 0.
    """

    attribute_order: Tensor
    class_att: Tensor
    seen_mask: Tensor

    def __init__(self, config: DAZLEConfig, semantic: np.ndarray | Tensor, class_att: np.ndarray | Tensor,
                 seen_mask: np.ndarray | Tensor) -> None:
        super().__init__()
        if not isinstance(config, DAZLEConfig):
            raise TypeError("DAZLE is built from a DAZLEConfig: DAZLE.from_config(config, semantic, class_att, "
                            "seen_mask)")
        self.config = config
        d, g = config.n_attributes, config.semantic_dim
        semantic = torch.as_tensor(np.asarray(semantic, dtype=np.float32))
        if tuple(semantic.shape) != (d, g):
            raise ValueError(f"semantic vectors must be ({d}, {g}), got {tuple(semantic.shape)}")
        self.register_buffer("attribute_order", torch.arange(d, dtype=torch.int64))
        self.register_buffer("class_att", torch.zeros(0, d))
        self.register_buffer("seen_mask", torch.zeros(0, dtype=torch.bool))
        self.set_classes(class_att, seen_mask)
        self.attention = Expert(normalize_rows(semantic), [d], config.n_channels, config.n_regions,
                                channel_attention=False)
        self.W3 = nn.Parameter(torch.zeros(g, config.n_channels))

    @classmethod
    def from_config(cls, config: DAZLEConfig, semantic: np.ndarray | Tensor, class_att: np.ndarray | Tensor,
                    seen_mask: np.ndarray | Tensor) -> DAZLE:
        """A freshly initialised model.

        Args:
            config: architecture and settings.
            semantic: (D, G) attribute word vectors (V's initial rows, normalised here).
            class_att: (K, D) class attributes.
            seen_mask: (K,) bool, True for seen classes.
        """
        return cls(config, semantic, class_att, seen_mask)

    def scored_class_att(self, class_att: Tensor) -> Tensor:
        """(K, D) class attributes as the model scores against them: clipped at 0 where the settings say, rows
        L2-normalised, in the model's dtype and on its device."""
        att = class_att.clamp_min(0) if self.config.clip_negative_attributes else class_att
        return normalize_rows(att.to(device=self.class_att.device, dtype=self.class_att.dtype))

    def calibration_bias(self) -> Tensor:
        """(K,) fixed shift inside the class scores: +margin on unseen, -margin on seen classes (zeros without)."""
        return self.margin_bias(self.config.calibration_margin)

    def semantic_rows(self) -> Tensor:
        """V as the forward uses it: re-normalised with ``normalize_v``, else as trained."""
        v = self.attention.V
        return F.normalize(v, dim=1) if self.config.normalize_v else v

    def prepare_features(self, features: Tensor) -> Tensor:
        """(B, C, h, w) or (B, C, R) -> (B, C, R) in the model's dtype, each region vector L2-normalised over C."""
        features = self.region_maps(features)
        return F.normalize(features.to(self.class_att.dtype), dim=1, eps=1e-12)

    def forward(self, features: Tensor, precision: str = "fp32") -> DAZLEOutput:
        """Attribute and class scores for a batch of feature maps (``precision``: only ``fp32`` is supported)."""
        if check_precision(precision) != "fp32":
            raise ValueError("DAZLE runs in fp32 only (precision='fp32')")
        feats = self.prepare_features(features)
        v = self.semantic_rows()
        d = v.shape[0]
        # V W1, V W2 and (with the gate) V W3 against every region of every image in one product: the gate's
        # v_i W3 h_{b,i} equals sum_r alpha_{b,i,r} v_i W3 f_{b,r}, so it needs no (B, D, C) tensor h.
        weights = [self.attention.W1[0], self.attention.W2[0]] + ([self.W3] if self.config.gate else [])
        m = torch.cat([v @ w for w in weights])
        b, c, r = feats.shape
        y = torch.mm(m, feats.permute(1, 0, 2).reshape(c, b * r)).view(len(weights), d, b, r)
        alpha = torch.softmax(y[1], dim=-1)
        e = (alpha * y[0]).sum(-1).t()
        gate = torch.sigmoid((alpha * y[2]).sum(-1).t()) if self.config.gate else torch.ones_like(e)
        o = gate * e
        return DAZLEOutput(o=o, e=e, gate=gate, scores=o @ self.class_att.T + self.calibration_bias())

    @torch.no_grad()
    def attention_maps(self, features: Tensor) -> dict[str, Tensor]:
        """``{"dazle_region": (B, D, R)}``: each attribute's attention over the regions (sums to 1 over R)."""
        feats = self.prepare_features(features)
        m2 = self.semantic_rows() @ self.attention.W2[0]
        return {f"{EXPERT}_region": torch.softmax(torch.matmul(m2, feats), dim=-1)}

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"mode={cfg.mode}, D={cfg.n_attributes}, K={self.class_att.shape[0]}, C={cfg.n_channels}, "
                f"R={cfg.n_regions}, gate={cfg.gate}, normalize_v={cfg.normalize_v}")


def cross_entropy(raw: Tensor, labels: Tensor, seen_mask: Tensor, classes: str) -> Tensor:
    """Mean cross-entropy of ``raw`` (B, K) scores (margin removed), the softmax over the seen classes or all K."""
    if classes == "seen":
        raw = raw.masked_fill(~seen_mask, float("-inf"))  # unseen columns take no part in the softmax
    return F.cross_entropy(raw, labels)


def loss_terms(out: DAZLEOutput, labels: Tensor, seen_mask: Tensor, bias: Tensor, ce_classes: str,
               lambda_cal: float, calibration_shift: float) -> LossTerms:
    """L = CE + lambda_cal * L_cal for a batch whose scores hold the fixed shift ``bias`` (K,).

    CE is on the scores without ``bias``, over the seen classes or all K (``ce_classes``);
    L_cal = -log(mean_b sum_{u unseen} softmax(s_b)_u) on the scores as the model gives them (``bias`` inside)
    plus ``calibration_shift`` on the unseen classes. The term is left out when ``lambda_cal`` is 0 or no
    class is unseen.
    """
    unseen = ~seen_mask
    ce = cross_entropy(out.scores - bias, labels, seen_mask, ce_classes)
    terms = {"ce": ce}
    total = ce
    if lambda_cal > 0 and bool(unseen.any()):
        cal = self_calibration_loss(out.scores + calibration_shift * unseen.to(out.scores.dtype), unseen)
        terms["cal"] = cal
        total = total + lambda_cal * cal
    return LossTerms(total=total, terms=terms)


def dazle_loss(model: DAZLE, out: DAZLEOutput, labels: Tensor, seen_mask: Tensor, loss_settings: Any = None
               ) -> LossTerms:
    """DAZLE's training loss (:func:`loss_terms`) with the model's settings; the run's ``loss`` section
    (``loss_settings``) is DEDN's and unused."""
    cfg = model.config
    return loss_terms(out, labels, seen_mask, model.calibration_bias(), cfg.ce_classes, cfg.lambda_cal,
                      cfg.calibration_shift)
