"""TransZero (Chen et al., AAAI 2022): a transformer between region features and attribute word vectors.

- :func:`resolve_settings`: the one table of TransZero's settings per dataset and mode (paper | reference), with
  a run's ``model.options`` checked and applied on top.
- :class:`TransZeroConfig`: the architecture and those settings; model files record it.
- :class:`TransZero`: the model. Region features are embedded into a common space of width d and refined by one
  encoder layer whose self-attention logits have a learned bias from the relative geometry of the grid cells
  subtracted (the feature augmentation encoder); then each attribute's embedded word vector queries the
  refined regions in one decoder layer (the visual-semantic decoder). Attribute score i is v_i^T W1 o_i, and
  class scores are the attribute scores against the class attributes.
- :func:`transzero_loss`: cross-entropy over all classes + lambda_SC self-calibration + lambda_AR attribute
  regression.

The attribute axis is in dataset order throughout (``attribute_order`` is ``arange(D)``). The geometry bias is
computed on the features' device and in the model's dtype, so the model runs on a CPU as well as a GPU.
:mod:`dedn.models.transzero_naive` writes the forward pass out formula by formula (tests compare the two).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dedn.checks import Rule, check, integer, number
from dedn.data.xlsa17 import canonical_dataset
from dedn.errors import ConfigError
from dedn.models.class_set import ClassSet
from dedn.models.dedn import normalize_rows
from dedn.models.losses import LossTerms, self_calibration_loss
from dedn.models.precision import check_precision
from dedn.models.released import training_mode
from dedn.models.settings import make_plain

#: TransZero's one expert, and the name of its one branch in :meth:`TransZeroOutput.branches`.
EXPERT = "transzero"
BRANCH = f"{EXPERT}_o_r"
#: The width of the relative-geometry embedding (4 offsets x 8 frequencies x sin, cos) and its wave length.
GEOMETRY_DIM = 64
GEOMETRY_WAVE_LENGTH = 1000.0

_BOOL = Rule(lambda v: isinstance(v, bool), "true or false")

#: ``model.options`` a run may set, each with its rule.
OPTION_RULES: dict[str, Rule] = {
    "common_dim": integer(1),
    "feedforward_dim": integer(1),
    "dropout": number(0.0, 1.0, high_open=True),
    "self_attention": _BOOL,
    "normalize_v": _BOOL,
    "lambda_sc": number(0.0),
    "lambda_ar": number(0.0),
    "calibration_margin": number(0.0),
}

#: The released GZSL settings per dataset (wandb_config/*_gzsl.yaml); other data take CUB's.
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "CUB": {"common_dim": 300, "feedforward_dim": 512, "dropout": 0.4, "self_attention": True,
            "normalize_v": False, "lambda_sc": 0.3, "lambda_ar": 0.005, "aux_embed": True},
    "SUN": {"common_dim": 128, "feedforward_dim": 2048, "dropout": 0.3, "self_attention": False,
            "normalize_v": False, "lambda_sc": 0.25, "lambda_ar": 0.001, "aux_embed": False},
    "AWA2": {"common_dim": 300, "feedforward_dim": 512, "dropout": 0.5, "self_attention": True,
             "normalize_v": True, "lambda_sc": 2.0, "lambda_ar": 0.0005, "aux_embed": True},
}

#: The released code's fixed margin inside the scores (its ``bias``): seen classes -1, unseen +1.
RELEASED_MARGIN = 1.0

#: What the mode changes (docs/methods/transzero.md lists each difference). Reference mode reproduces the
#: released code's quirks: the +1 box size, the second residual + LayerNorm, the encoder attention's dropout
#: fixed at 0.1, the unused ``embed_cv_aux`` layer, the fixed +-1 margin inside the scores, AWA2's clipping.
MODE_SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {"calibration_margin": 0.0, "box_plus_one": False, "double_residual": False,
              "attention_dropout": None, "aux_embed": False},
    "reference": {"calibration_margin": RELEASED_MARGIN, "box_plus_one": True, "double_residual": True,
                  "attention_dropout": 0.1},
}


def resolve_settings(mode: str, dataset: str | None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """TransZero's settings for ``mode`` and ``dataset`` (CUB, SUN, AWA2, another name or None), with
    ``options`` (a run's ``model.options``) on top: the keyword arguments of :class:`TransZeroConfig` other
    than the sizes and l_rc, l_e.

    Raises:
        ValueError: a mode other than paper and reference (configs are checked before they get here).
        ConfigError: an unknown option or a bad value, naming ``model.options.<key>``.
    """
    if mode not in MODE_SETTINGS:
        raise ValueError(f"mode must be paper or reference, got {mode!r}")
    options = dict(options or {})
    for key, value in options.items():
        if key not in OPTION_RULES:
            raise ConfigError(f"model.options.{key} is not an option of transzero; known: {', '.join(OPTION_RULES)}")
        check(f"model.options.{key}", value, OPTION_RULES[key])
    name = canonical_dataset(dataset)
    settings = {**DATASET_SETTINGS[name or "CUB"], **MODE_SETTINGS[mode], **options}
    if settings["attention_dropout"] is None:
        settings["attention_dropout"] = settings["dropout"]
    settings["clip_negative_attributes"] = mode == "reference" and name == "AWA2"
    settings["mode"] = mode
    return settings


def settings_default_gamma(settings: Mapping[str, Any]) -> float:
    """The calibration an evaluation uses when nothing chose one: 0 where a margin is inside the scores (the
    released code's), else the released code's effective gap 2 * :data:`RELEASED_MARGIN` (paper mode)."""
    return 0.0 if settings["calibration_margin"] > 0 else 2.0 * RELEASED_MARGIN


@dataclass(frozen=True)
class TransZeroConfig:
    """Everything that fixes a TransZero's architecture and behaviour; the weights and the class set are not in it.

    Attributes:
        n_attributes: D.
        semantic_dim: G, the length of an attribute's word vector.
        n_channels: C of the feature maps.
        grid: (h, w) of the feature maps; R = h * w regions, flattened row by row.
        common_dim: d, the width of the transformer.
        feedforward_dim: the width of both feed-forward blocks.
        dropout: p, of every dropout but (in reference mode) the encoder attention's.
        attention_dropout: the dropout on the encoder's attention weights (the released code's is fixed at 0.1).
        self_attention: the decoder's attribute self-attention (off for SUN).
        normalize_v: attribute vectors re-normalised at every forward (the released AWA2 setting).
        lambda_sc, lambda_ar: the weights of the self-calibration and attribute-regression losses.
        calibration_margin: the fixed shift inside the class scores, +margin unseen and -margin seen (0: none).
        box_plus_one: the released geometry's box size 1/h + 1 (instead of a cell's 1/h).
        double_residual: the released encoder's second residual from the input and second LayerNorm.
        aux_embed: the released, never used ``embed_cv_aux`` layer exists (weights and random draws).
        clip_negative_attributes: class attributes clipped at 0 before normalising (the released AWA2 loader).
        mode: the mode these settings were resolved for; a label, nothing branches on it.
        l_rc, l_e: the evaluation-time weights every method has; TransZero has one branch and ignores them.
    """

    n_attributes: int
    semantic_dim: int
    n_channels: int
    grid: tuple[int, int]
    common_dim: int = 300
    feedforward_dim: int = 512
    dropout: float = 0.4
    attention_dropout: float = 0.4
    self_attention: bool = True
    normalize_v: bool = False
    lambda_sc: float = 0.3
    lambda_ar: float = 0.005
    calibration_margin: float = 0.0
    box_plus_one: bool = False
    double_residual: bool = False
    aux_embed: bool = False
    clip_negative_attributes: bool = False
    mode: str = "paper"
    l_rc: float = 1.0
    l_e: float = 1.0

    def __post_init__(self) -> None:
        make_plain(self)
        grid = tuple(int(s) for s in self.grid)
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be two positive sizes (h, w), got {self.grid!r}")
        object.__setattr__(self, "grid", grid)

    @property
    def n_regions(self) -> int:
        """R = h * w."""
        return self.grid[0] * self.grid[1]

    @property
    def n_clusters(self) -> int:
        """1: TransZero has no attribute groups."""
        return 1

    @property
    def attribute_order(self) -> list[int]:
        """Dataset order: TransZero does not reorder attributes."""
        return list(range(self.n_attributes))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values; :meth:`from_dict` reads them back."""
        values = asdict(self)
        values["grid"] = list(self.grid)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TransZeroConfig:
        """Read :meth:`to_dict`'s values. Raises TypeError or ValueError on unknown or bad values."""
        values = dict(values)
        values["grid"] = tuple(values["grid"])
        return cls(**values)


def relative_geometry(grid: tuple[int, int], box_plus_one: bool, dtype: torch.dtype,
                      device: torch.device | str = "cpu") -> Tensor:
    """(R, R, 64) sinusoidal embedding of the relative geometry of every pair (m, n) of grid cells.

    Cell r = (i, j) = (r // w, r % w) spans [i/h, (i+1)/h] x [j/w, (j+1)/w]. Its four offsets to cell n are
    log max(|cx_m - cx_n| / bw_m, 1e-3), log max(|cy_m - cy_n| / bh_m, 1e-3), log(bw_m / bw_n),
    log(bh_m / bh_n), with box sizes bw = 1/h, bh = 1/w (+1 each with ``box_plus_one``, the released code).
    Each is scaled by 100 and by 1000^(-k/8), k = 0..7; the embedding is the sines of those 32 values followed
    by their cosines. The arithmetic follows the released code step by step, in ``dtype`` on ``device``.
    """
    h, w = grid
    rows = torch.arange(h, dtype=dtype, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=dtype, device=device).repeat(h)
    x_min, x_max = rows / h, (rows + 1) / h
    y_min, y_max = cols / w, (cols + 1) / w
    cx, cy = (x_min + x_max) * 0.5, (y_min + y_max) * 0.5
    bw, bh = x_max - x_min, y_max - y_min
    if box_plus_one:
        bw, bh = bw + 1.0, bh + 1.0
    dx = torch.log(torch.clamp(torch.abs((cx[:, None] - cx[None, :]) / bw[:, None]), min=1e-3))
    dy = torch.log(torch.clamp(torch.abs((cy[:, None] - cy[None, :]) / bh[:, None]), min=1e-3))
    dw = torch.log(bw[:, None] / bw[None, :])
    dh = torch.log(bh[:, None] / bh[None, :])
    offsets = 100.0 * torch.stack((dx, dy, dw, dh), dim=-1)  # (R, R, 4)
    n_freq = GEOMETRY_DIM // 8
    freq = 1.0 / torch.pow(GEOMETRY_WAVE_LENGTH, torch.arange(n_freq, dtype=dtype, device=device) / n_freq)
    angles = (offsets[..., None] * freq).flatten(2)  # (R, R, 32): offset-major, frequency-minor
    return torch.cat((torch.sin(angles), torch.cos(angles)), dim=-1)


class GeometryEncoderLayer(nn.Module):
    """The feature augmentation encoder's one layer: single-head self-attention over the regions with the
    geometry bias subtracted from its logits, then a feed-forward block (post-norm).

    Y1 = LN_a(X + drop(fc_o(softmax(q k^T / sqrt(d) - G) v))); with ``double_residual`` (the released code)
    Y2 = LN_r(X + drop(Y1)), else Y2 = Y1; out = LN_f(Y2 + drop(fc2(drop(relu(fc1 Y2))))).
    The four attention projections are xavier-uniform with zero biases; they are created (and drawn) before
    being re-initialised, as in the released code, so a seed gives the same weights.
    """

    def __init__(self, d: int, feedforward: int, dropout: float, attention_dropout: float,
                 double_residual: bool) -> None:
        super().__init__()
        self.fc_q, self.fc_k, self.fc_v, self.fc_o = (nn.Linear(d, d) for _ in range(4))
        for layer in (self.fc_q, self.fc_k, self.fc_v, self.fc_o):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.dropout = nn.Dropout(dropout)
        self.attention_norm = nn.LayerNorm(d)
        self.residual_norm = nn.LayerNorm(d) if double_residual else None
        self.fc1, self.fc2 = nn.Linear(d, feedforward), nn.Linear(feedforward, d)
        self.ffn_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, geometry: Tensor) -> Tensor:
        """x (B, R, d), geometry (R, R) the non-negative bias -> (B, R, d)."""
        logits = torch.matmul(self.fc_q(x), self.fc_k(x).transpose(1, 2)) / math.sqrt(x.shape[-1])
        att = self.attention_dropout(torch.softmax(logits - geometry, dim=-1))
        y = self.attention_norm(x + self.dropout(self.fc_o(torch.matmul(att, self.fc_v(x)))))
        if self.residual_norm is not None:
            y = self.residual_norm(x + self.dropout(y))
        return self.ffn_norm(y + self.dropout(self.fc2(self.dropout(F.relu(self.fc1(y))))))


@dataclass
class TransZeroOutput:
    """What TransZero computes for a batch.

    Attributes:
        o: (B, D) attribute scores e_i = v_i^T W1 o_i, dataset attribute order.
        scores: (B, K) class scores o Z^T, with the fixed calibration margin added
            (:meth:`TransZero.calibration_bias`).
    """

    o: Tensor
    scores: Tensor

    def branches(self) -> dict[str, Tensor]:
        """TransZero's one branch: ``{"transzero_o_r": o}``."""
        return {BRANCH: self.o}

    def expert_attributes(self) -> dict[str, Tensor]:
        """The one expert's attribute scores: ``{"transzero": o}``."""
        return {EXPERT: self.o}

    def combined(self, l_e: float | None = None) -> Tensor:
        """(B, K) prediction scores; one expert, so ``l_e`` changes nothing."""
        return self.scores


class TransZero(ClassSet):
    """TransZero over precomputed feature maps. Build it with :meth:`from_config`.

    Parameters: ``V`` (D, G) the attribute word vectors (trainable, initialised to the normalised ``semantic``),
    ``W1`` (G, d) ~ N(0, 1), ``embed_cv`` Linear(C, d), ``embed_attr`` Linear(G, d), ``encoder``
    (:class:`GeometryEncoderLayer`), ``geometry`` Linear(64, 1) (the bias G = relu(geometry(embedding))), and
    ``decoder`` (a torch ``TransformerDecoderLayer`` whose sub-modules this class runs in its own post-norm
    order). They are created in the released code's order, so the same seed draws the same initial weights.
    """

    attribute_order: Tensor
    class_att: Tensor
    seen_mask: Tensor
    embed_cv_aux: nn.Linear | None

    def __init__(self, config: TransZeroConfig, semantic: np.ndarray | Tensor, class_att: np.ndarray | Tensor,
                 seen_mask: np.ndarray | Tensor) -> None:
        super().__init__()
        if not isinstance(config, TransZeroConfig):
            raise TypeError("TransZero is built from a TransZeroConfig")
        self.config = config
        d, g, c = config.common_dim, config.semantic_dim, config.n_channels
        semantic = torch.as_tensor(np.asarray(semantic, dtype=np.float32))
        if tuple(semantic.shape) != (config.n_attributes, g):
            raise ValueError(f"semantic vectors must be ({config.n_attributes}, {g}), got {tuple(semantic.shape)}")
        self.register_buffer("attribute_order", torch.arange(config.n_attributes))
        self.register_buffer("class_att", torch.zeros(0, config.n_attributes))
        self.register_buffer("seen_mask", torch.zeros(0, dtype=torch.bool))
        self.set_classes(class_att, seen_mask)
        self.V = nn.Parameter(normalize_rows(semantic))
        self.W1 = nn.Parameter(torch.randn(g, d))
        self.embed_cv = nn.Linear(c, d)
        self.embed_cv_aux = nn.Linear(c, d) if config.aux_embed else None
        self.embed_attr = nn.Linear(g, d)
        self.encoder = GeometryEncoderLayer(d, config.feedforward_dim, config.dropout, config.attention_dropout,
                                            config.double_residual)
        self.geometry = nn.Linear(GEOMETRY_DIM, 1)
        self.decoder = nn.TransformerDecoderLayer(d, 1, config.feedforward_dim, config.dropout, batch_first=True)

    @classmethod
    def from_config(cls, config: TransZeroConfig, semantic: np.ndarray | Tensor, class_att: np.ndarray | Tensor,
                    seen_mask: np.ndarray | Tensor) -> TransZero:
        """A freshly initialised model (seed torch's global RNG first for reproducible weights).

        Args:
            config: architecture and settings.
            semantic: (D, G) attribute word vectors in dataset order (V's initial rows, normalised here).
            class_att: (K, D) class attributes in dataset order.
            seen_mask: (K,) bool, True for seen classes (the calibration margin's sign).
        """
        return cls(config, semantic, class_att, seen_mask)

    # ------------------------------------------------------------------ classes
    def scored_class_att(self, class_att: Tensor) -> Tensor:
        """(K, D) class attributes (dataset order, which is the model's) as the model scores against them:
        clipped at 0 where the settings say (reference AWA2), rows L2-normalised."""
        att = class_att.clamp_min(0) if self.config.clip_negative_attributes else class_att
        return normalize_rows(att.to(device=self.attribute_order.device, dtype=self.class_att.dtype))

    def calibration_bias(self) -> Tensor:
        """(K,) fixed shift inside the class scores: +margin unseen, -margin seen (zeros without a margin)."""
        return self.margin_bias(self.config.calibration_margin)

    # ------------------------------------------------------------------ forward
    def prepare_features(self, features: Tensor, precision: str = "fp32") -> Tensor:
        """(B, C, h, w) or (B, C, R) -> (B, C, R) in the model's dtype, each region vector L2-normalised over C.

        ``bf16``: the maps are rounded to bfloat16 first (their storage precision); everything after runs in the
        model's dtype.
        """
        features = self.region_maps(features)
        if check_precision(precision) == "bf16":
            features = features.to(torch.bfloat16)
        return F.normalize(features.to(self.class_att.dtype), dim=1, eps=1e-12)

    def semantic_vectors(self) -> Tensor:
        """The attribute vectors the forward uses: V, re-normalised with ``normalize_v``."""
        return normalize_rows(self.V) if self.config.normalize_v else self.V

    def geometry_bias(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """(R, R) G = relu(geometry(embedding)): subtracted from the encoder's attention logits."""
        emb = relative_geometry(self.config.grid, self.config.box_plus_one, dtype, device)
        return F.relu(self.geometry(emb)).squeeze(-1)

    def memory(self, feats: Tensor) -> Tensor:
        """(B, R, d) the encoder's refined regions from prepared features (B, C, R)."""
        x = self.embed_cv(feats.transpose(1, 2))
        return self.encoder(x, self.geometry_bias(x.dtype, x.device))

    def decode(self, v: Tensor, memory: Tensor, need_weights: bool = False) -> tuple[Tensor, Tensor | None]:
        """The decoder, post-norm: (B, D, d) attribute features o_i and, with ``need_weights``, the (B, D, R)
        cross-attention of each attribute over the regions."""
        layer = self.decoder
        q = self.embed_attr(v).unsqueeze(0).expand(memory.shape[0], -1, -1)
        if self.config.self_attention:
            q = layer.norm1(q + layer.dropout1(layer.self_attn(q, q, q, need_weights=False)[0]))
        cross, weights = layer.multihead_attn(q, memory, memory, need_weights=need_weights)
        q = layer.norm2(q + layer.dropout2(cross))
        q = layer.norm3(q + layer.dropout3(layer.linear2(layer.dropout(F.relu(layer.linear1(q))))))
        return q, weights

    def forward(self, features: Tensor, precision: str = "fp32") -> TransZeroOutput:
        """Attribute and class scores for a batch of feature maps (B, C, h, w) or (B, C, R)."""
        feats = self.prepare_features(features, precision)
        v = self.semantic_vectors()
        o, _ = self.decode(v, self.memory(feats))
        e = torch.einsum("ig,gd,bid->bi", v, self.W1, o)
        return TransZeroOutput(o=e, scores=e @ self.class_att.T + self.calibration_bias())

    # ------------------------------------------------------------------ explanation
    @torch.no_grad()
    def attention_maps(self, features: Tensor) -> dict[str, Tensor]:
        """``{"transzero_region": (B, D, R)}``: each attribute's decoder attention over the regions (sums to 1),
        computed in evaluation mode (no dropout); the model's train/eval state is restored afterwards."""
        with training_mode(self, False):
            feats = self.prepare_features(features)
            _, weights = self.decode(self.semantic_vectors(), self.memory(feats), need_weights=True)
        assert weights is not None
        return {f"{EXPERT}_region": weights}

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"mode={cfg.mode}, D={cfg.n_attributes}, K={self.class_att.shape[0]}, C={cfg.n_channels}, "
                f"grid={cfg.grid}, d={cfg.common_dim}, self_attention={cfg.self_attention}")


def transzero_loss(model: TransZero, out: TransZeroOutput, labels: Tensor, seen_mask: Tensor) -> LossTerms:
    """L = CE + lambda_SC * L_SC + lambda_AR * L_AR, the weights from ``model.config``.

    CE: cross-entropy over all K classes of the scores with the calibration margin taken out. L_SC: the
    self-calibration loss -log(mean_b sum_{u unseen} softmax(s_b)_u) on the scores as they are, margin included
    (left out when no class is unseen). L_AR: the mean squared error between the attribute scores and the
    target class's (normalised) attributes.
    """
    terms: dict[str, Tensor] = {}
    raw = out.scores - model.calibration_bias()
    terms["ce"] = F.cross_entropy(raw, labels)
    total = terms["ce"]
    unseen = ~seen_mask
    if bool(unseen.any()):
        terms["cal"] = self_calibration_loss(out.scores, unseen)
        total = total + model.config.lambda_sc * terms["cal"]
    terms["ar"] = F.mse_loss(out.o, model.class_att[labels])
    total = total + model.config.lambda_ar * terms["ar"]
    return LossTerms(total=total, terms=terms)
