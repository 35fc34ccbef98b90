"""The DEDN model: two experts of Dual Attention Networks (DANs) over region feature maps.

- :class:`Expert`: one DAN sub-network per attribute cluster. Sub-network q maps its attributes' semantic
  rows V_q (D_q x G) into visual space through four matrices (W1, W2: G x C; W3, W4: G x R).
  cExp is an Expert with one cluster of all D attributes, fExp one with Q attribute clusters.
- :class:`DEDNConfig`: the architecture and the :class:`~dedn.models.settings.MethodSettings` it runs with;
  :meth:`DEDN.from_config` builds a model from it, and model files record it.
- :class:`DEDN`: both experts (``model.experts["cexp"]``, ``["fexp"]``) and the fused forward pass. The
  products V_q W_q are small (D_q x C or D_q x R), so they are formed first and stacked row-wise over both
  experts and all clusters: the whole model is then one large matrix product over the features for the
  region branch and one batched attention for the channel branch, instead of 1 + Q separate passes
  (:mod:`dedn.models.naive` writes the formulas out one sub-network at a time; this module must equal it).

Attribute order: inside the model every attribute axis is in *cluster order* (cluster 0's attributes
in ascending index order, then cluster 1's, ...); :attr:`DEDN.attribute_order` maps positions back to
dataset attribute indices. Class attributes are given in dataset order and permuted here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dedn.models.class_set import ClassSet
from dedn.models.precision import check_precision, product_dtype, round_bf16
from dedn.models.settings import MethodSettings, make_plain

#: The experts a DEDN may hold, in the order they are built (their random init is drawn in this order).
EXPERT_NAMES = ("cexp", "fexp")
#: The choices of :attr:`DEDNConfig.experts` (a run's ``model.experts``): both experts, or one alone.
EXPERT_CHOICES = ("both", *EXPERT_NAMES)


@dataclass
class ExpertOutput:
    """What one expert computes for a batch; attribute axes in cluster order.

    Attributes:
        o_r: (B, D) region-branch attribute scores.
        o_c: (B, D) channel-branch attribute scores, or None without channel attention.
        o: (B, D) the combined attribute scores the class scores are made from.
        scores: (B, K) class scores, with the method's fixed calibration margin added (the released code's;
            :meth:`DEDN.calibration_bias`).
    """

    o_r: Tensor
    o_c: Tensor | None
    o: Tensor
    scores: Tensor


@dataclass
class DEDNOutput:
    """Both experts' outputs (an expert switched off is None) and the inference mix weight."""

    cexp: ExpertOutput | None
    fexp: ExpertOutput | None
    l_e: float

    def _experts(self) -> dict[str, ExpertOutput]:
        return {name: e for name, e in (("cexp", self.cexp), ("fexp", self.fexp)) if e is not None}

    def branches(self) -> dict[str, Tensor]:
        """Each branch's (B, D) attribute scores, experts in order: ``cexp_o_r``, ``cexp_o_c``, ``fexp_o_r``,
        ``fexp_o_c`` (those the model has): what evaluation saves and scores any l_rc / l_e from."""
        out: dict[str, Tensor] = {}
        for name, e in self._experts().items():
            out[f"{name}_o_r"] = e.o_r
            if e.o_c is not None:
                out[f"{name}_o_c"] = e.o_c
        return out

    def expert_attributes(self) -> dict[str, Tensor]:
        """Each expert's (B, D) attribute scores (its branches mixed at the model's l_rc), experts in order."""
        return {name: e.o for name, e in self._experts().items()}

    def combined(self, l_e: float | None = None) -> Tensor:
        """(B, K) prediction scores l_e * P_cExp + (1 - l_e) * P_fExp, before calibrated stacking."""
        l_e = self.l_e if l_e is None else l_e
        if self.cexp is None:
            assert self.fexp is not None
            return self.fexp.scores
        if self.fexp is None:
            return self.cexp.scores
        return l_e * self.cexp.scores + (1.0 - l_e) * self.fexp.scores


@dataclass(frozen=True)
class DEDNConfig:
    """Everything that fixes a DEDN's architecture and behaviour; the weights and the class set are not in it.

    A model file records this (as JSON, :meth:`to_dict`) to rebuild the model before loading its weights.

    Attributes:
        n_attributes: D.
        semantic_dim: G, the length of an attribute's semantic vector.
        n_channels: C of the feature maps.
        n_regions: R = h * w of the feature maps.
        clusters: fExp's Q clusters of attribute indices (disjoint, covering 0..D-1); cExp has one cluster of
            all attributes, in the same order.
        experts: ``"both"``, ``"cexp"`` or ``"fexp"``.
        channel_attention: False drops the channel branch (O = O_r).
        l_rc: region/channel mix at inference (and in training unless the method sums the branches).
        l_e: cExp/fExp mix used by :meth:`DEDNOutput.combined`.
        method: the paper / reference-code differences (:func:`dedn.models.settings.resolve_method`).
    """

    n_attributes: int
    semantic_dim: int
    n_channels: int
    n_regions: int
    clusters: tuple[tuple[int, ...], ...]
    experts: str = "both"
    channel_attention: bool = True
    l_rc: float = 0.8
    l_e: float = 0.9
    method: MethodSettings = field(default_factory=MethodSettings)

    def __post_init__(self) -> None:
        make_plain(self)
        clusters = tuple(tuple(int(i) for i in np.asarray(c, dtype=np.int64).ravel()) for c in self.clusters)
        object.__setattr__(self, "clusters", clusters)
        d = self.n_attributes
        order = np.asarray([i for c in clusters for i in c], dtype=np.int64)
        if order.size != d or np.unique(order).size != d or (d and (order.min() < 0 or order.max() >= d)):
            raise ValueError(f"clusters must be disjoint and cover all {d} attributes")
        if self.experts not in EXPERT_CHOICES:
            raise ValueError(f"experts must be one of {EXPERT_CHOICES}, got {self.experts!r}")

    @property
    def low_rank(self) -> int | None:
        """The rank of W1 = H1 H3, or None for a full W1 (a method setting: only the released SUN model has one)."""
        return self.method.low_rank

    @property
    def cluster_sizes(self) -> list[int]:
        """fExp's cluster sizes (whether or not fExp is active)."""
        return [len(c) for c in self.clusters]

    @property
    def n_clusters(self) -> int:
        """Q, fExp's number of clusters."""
        return len(self.clusters)

    @property
    def attribute_order(self) -> list[int]:
        """Dataset attribute index of each position of the model's (cluster-ordered) attribute axis."""
        return [i for c in self.clusters for i in c]

    @property
    def active_experts(self) -> list[str]:
        return list(EXPERT_NAMES) if self.experts == "both" else [self.experts]

    def expert_clusters(self, name: str) -> list[int]:
        """Cluster sizes of one expert: cExp is one cluster of all attributes, fExp has :attr:`clusters`."""
        return [self.n_attributes] if name == "cexp" else self.cluster_sizes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (clusters as lists); :meth:`from_dict` reads them back."""
        return {
            "n_attributes": self.n_attributes, "semantic_dim": self.semantic_dim, "n_channels": self.n_channels,
            "n_regions": self.n_regions, "clusters": [list(c) for c in self.clusters], "experts": self.experts,
            "channel_attention": self.channel_attention, "l_rc": self.l_rc, "l_e": self.l_e,
            "method": self.method.to_dict(),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DEDNConfig:
        """Read :meth:`to_dict`'s values. Raises TypeError or ValueError on unknown or bad values."""
        values = dict(values)
        values["method"] = MethodSettings.from_dict(values["method"])
        return cls(**values)


def normalize_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """L2-normalise rows; an all-zero row stays zero (SUN's "man-made" word vector is zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


class _ChannelAttention(torch.autograd.Function):
    """Channel-branch scores of all attribute rows at once, as attention over the C channel vectors.

    O[b, d] = M3[d] . (softmax_C(M4[d] F_b^T) F_b): the queries are the rows of M4, the keys and values
    the C channel vectors of image b (each of length R). Per image that is two matrix products forward
    (logits, then the attention-weighted sum U) and two backward (S = M3 F_b^T recomputed, then
    dM4 += dL F_b); dM3 = sum_b g_b U_b needs no large product. Only the attention A is kept. Features are
    frozen: no gradient flows to them.

    bfloat16 features, and any features on a GPU, take the batched path (:meth:`_forward_batched`): the
    logits, S and dM4 are each one product over all images and channels, instead of B small ones. On bf16
    features everything runs in bf16 (each product accumulates in float32 and rounds its result once; so do the
    softmax and the sums over C and R), with m3 and m4 rounded once on entry and the gradients converted back
    to float32 once on exit: nothing is converted per image or per chunk. On a CPU the per-image loop is
    faster in float32 (fewer bytes moved), and on a GPU B small products would each be a kernel launch.
    """

    @staticmethod
    def forward(ctx, m3: Tensor, m4: Tensor, feats: Tensor) -> Tensor:  # type: ignore[override]
        if _ChannelAttention.batched(feats):
            return _ChannelAttention._forward_batched(ctx, m3, m4, feats)
        ctx.batched = False
        b, c, r = feats.shape
        d = m3.shape[0]
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        att = feats.new_empty(b, d, c) if keep else feats.new_empty(1, d, c)
        u = feats.new_empty(b, d, r)
        logits = feats.new_empty(d, c)
        for i in range(b):
            f, a = feats[i], att[i if keep else 0]
            torch.mm(m4, f.t(), out=logits)
            torch._softmax(logits, -1, False, out=a)  # one fused pass (max, exp, sum, scale) per row
            torch.mm(a, f, out=u[i])
        out = torch.einsum("dr,bdr->bd", m3, u)
        if keep:
            ctx.save_for_backward(m3, feats, att, u, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if ctx.batched:
            return _ChannelAttention._backward_batched(ctx, grad_out)
        m3, feats, att, u, out = ctx.saved_tensors
        grad3 = torch.einsum("bd,bdr->dr", grad_out, u)
        grad4 = torch.zeros_like(m3)
        s = feats.new_empty(m3.shape[0], feats.shape[1])
        t = torch.empty_like(m3)
        for i in range(feats.shape[0]):
            f = feats[i]
            torch.mm(m3, f.t(), out=s)  # S recomputed: cheaper than keeping a second (B, D, C) tensor
            s.sub_(out[i, :, None]).mul_(att[i])  # dL = A (S - O) g, with g applied to the (D, R) product
            grad4.addcmul_(torch.mm(s, f, out=t), grad_out[i, :, None])
        return grad3, grad4, None

    @staticmethod
    def batched(feats: Tensor) -> bool:
        """Whether ``feats`` take the batched path: bf16 features, or features on a GPU."""
        return feats.dtype == torch.bfloat16 or feats.device.type == "cuda"

    @staticmethod
    def _forward_batched(ctx: Any, m3: Tensor, m4: Tensor, feats: Tensor) -> Tensor:
        """The batched forward: the attention A (B, D, C) of all images, softmax over its last axis, and
        U = A F (B, D, R), each one batched product."""
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        m3c, m4c = m3.detach().to(feats.dtype), m4.detach().to(feats.dtype)  # rounded once
        att = torch.softmax(torch.matmul(m4c, feats.transpose(1, 2)), dim=-1)  # logits M4 F_b^T of every image
        u = torch.bmm(att, feats)
        out = (u * m3c).sum(-1)
        ctx.batched = True
        if keep:
            ctx.save_for_backward(m3c, feats, att, u, out)
        return out.to(m3.dtype)

    @staticmethod
    def _backward_batched(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        m3c, feats, att, u, out = ctx.saved_tensors
        b, c, r = feats.shape
        flat = feats.reshape(b * c, r)
        g = grad_out.to(feats.dtype)
        grad3 = torch.einsum("bd,bdr->dr", g, u).to(grad_out.dtype)
        # S of all images in one product, laid out (D, B, C); then dL = A (S - O) g in place
        s = torch.mm(m3c, flat.t()).view(-1, b, c)
        s.sub_(out.t()[:, :, None]).mul_(att.transpose(0, 1)).mul_(g.t()[:, :, None])
        # dM4 = sum over images and channels at once: one product, float32 accumulation, one rounding
        grad4 = torch.mm(s.view(-1, b * c), flat).to(grad_out.dtype)
        return grad3, grad4, None


class Expert(nn.Module):
    """One expert: a DAN sub-network per attribute cluster, its parameters stacked over the Q clusters.

    cExp is the Expert with one cluster of all D attributes (Q = 1), fExp the one with the attribute clusters.
    ``V`` (D, G) holds all sub-networks' semantic rows in cluster order; every weight has a leading cluster
    axis: W1, W2 (Q, G, C), W3, W4 (Q, G, R), or with ``low_rank`` h: W1_q = H1_q H3_q with H1 (Q, G, h),
    H3 (Q, h, C). Without channel attention W3 and W4 are None (as are W1 or H1, H3, whichever is unused).

    Init: V = the normalised semantic rows ``v0``; W1 (or H1, H3) and W3 ~ N(0, 1); W2, W4 = 0, so every
    attention starts uniform. The normal draws come in the order H1, H3 (or W1), then W3: a seed gives the
    same weights as long as that order stays.

    An Expert has no forward of its own: :class:`DEDN` runs the :meth:`projections` of all its experts in one
    fused pass over the features, and :mod:`dedn.models.naive` runs them one sub-network at a time.
    """

    V: nn.Parameter
    W1: nn.Parameter | None
    H1: nn.Parameter | None
    H3: nn.Parameter | None
    W2: nn.Parameter
    W3: nn.Parameter | None
    W4: nn.Parameter | None

    def __init__(self, v0: Tensor, cluster_sizes: Sequence[int], n_channels: int, n_regions: int,
                 low_rank: int | None = None, channel_attention: bool = True) -> None:
        super().__init__()
        self.cluster_sizes = [int(s) for s in cluster_sizes]
        if sum(self.cluster_sizes) != v0.shape[0]:
            raise ValueError(f"cluster sizes {self.cluster_sizes} do not add up to the {v0.shape[0]} rows of V")
        q, g, c, r = len(self.cluster_sizes), int(v0.shape[1]), int(n_channels), int(n_regions)
        self.V = nn.Parameter(v0.clone())
        if low_rank:
            self.H1, self.H3 = nn.Parameter(torch.randn(q, g, low_rank)), nn.Parameter(torch.randn(q, low_rank, c))
            self.register_parameter("W1", None)
        else:
            self.W1 = nn.Parameter(torch.randn(q, g, c))
            self.register_parameter("H1", None)
            self.register_parameter("H3", None)
        self.W2 = nn.Parameter(torch.zeros(q, g, c))
        if channel_attention:
            self.W3, self.W4 = nn.Parameter(torch.randn(q, g, r)), nn.Parameter(torch.zeros(q, g, r))
        else:
            self.register_parameter("W3", None)
            self.register_parameter("W4", None)

    @property
    def n_clusters(self) -> int:
        return len(self.cluster_sizes)

    @property
    def channel_attention(self) -> bool:
        return self.W3 is not None

    def _stacked(self, v: Tensor, w: Tensor) -> Tensor:
        """Row-stacked V_q W_q over the clusters: (D, X) from V (D, G) and W (Q, G, X)."""
        if len(self.cluster_sizes) == 1:  # cExp: one product, and a view (not a copy) of W in backward
            return v @ w.squeeze(0)
        # unbind, not w[i]: its backward stacks the Q gradients once, where indexing would build a zero-filled
        # (Q, G, X) gradient per cluster and add them all up (Q^2 passes over W)
        parts = torch.split(v, self.cluster_sizes)
        return torch.cat([p @ wq for p, wq in zip(parts, w.unbind(0), strict=True)])

    def projections(self) -> dict[str, Tensor]:
        """M1..M4: the row-stacked V_q W1_q .. V_q W4_q, (D, C), (D, C), (D, R), (D, R); m3, m4 only with
        channel attention. All the expert's work over the features is done with these."""
        v = self.V
        if self.W1 is None:
            assert self.H1 is not None and self.H3 is not None
            m1 = self._stacked(self._stacked(v, self.H1), self.H3)
        else:
            m1 = self._stacked(v, self.W1)
        out = {"m1": m1, "m2": self._stacked(v, self.W2)}
        if self.W3 is not None and self.W4 is not None:
            out["m3"], out["m4"] = self._stacked(v, self.W3), self._stacked(v, self.W4)
        return out

    def extra_repr(self) -> str:
        low = "" if self.H1 is None else f", low_rank={self.H1.shape[-1]}"
        return f"Q={self.n_clusters}, D={self.V.shape[0]}, G={self.V.shape[1]}{low}"


class DEDN(ClassSet):
    """Dual Expert Distillation Network: cExp and fExp (:class:`Expert`) and their fused forward pass.

    Build it with :meth:`from_config`. ``model.experts`` is an ``nn.ModuleDict`` of the active experts
    (``"cexp"``, ``"fexp"``, in that order); ``model.config`` the :class:`DEDNConfig` it was built from.
    The class set (``class_att`` and ``seen_mask`` buffers) can be replaced with :meth:`set_classes`.
    """

    experts: nn.ModuleDict
    attribute_order: Tensor
    class_att: Tensor
    seen_mask: Tensor

    def __init__(
        self,
        config: DEDNConfig,
        semantic: np.ndarray | Tensor,
        class_att: np.ndarray | Tensor,
        seen_mask: np.ndarray | Tensor,
    ) -> None:
        super().__init__()
        if not isinstance(config, DEDNConfig):
            raise TypeError("DEDN is built from a DEDNConfig: DEDN.from_config(config, semantic, class_att, seen_mask)")
        self.config = config
        semantic = torch.as_tensor(np.asarray(semantic, dtype=np.float32))
        if tuple(semantic.shape) != (config.n_attributes, config.semantic_dim):
            raise ValueError(f"semantic vectors must be ({config.n_attributes}, {config.semantic_dim}), "
                             f"got {tuple(semantic.shape)}")
        order = torch.as_tensor(config.attribute_order, dtype=torch.int64)
        self.register_buffer("attribute_order", order)
        self.register_buffer("class_att", torch.zeros(0, config.n_attributes))
        self.register_buffer("seen_mask", torch.zeros(0, dtype=torch.bool))
        self.set_classes(class_att, seen_mask)
        v0 = normalize_rows(semantic[order])  # cluster-ordered, normalised semantic rows: every V's initial value
        self.experts = nn.ModuleDict({
            name: Expert(v0, config.expert_clusters(name), config.n_channels, config.n_regions,
                         config.low_rank, config.channel_attention)
            for name in config.active_experts
        })

    @classmethod
    def from_config(
        cls,
        config: DEDNConfig,
        semantic: np.ndarray | Tensor,
        class_att: np.ndarray | Tensor,
        seen_mask: np.ndarray | Tensor,
    ) -> DEDN:
        """A freshly initialised model (seed torch's global RNG first for reproducible weights).

        Args:
            config: architecture and method settings.
            semantic: (D, G) attribute semantic vectors in dataset attribute order (V's initial rows).
            class_att: (K, D) class attributes in dataset attribute order.
            seen_mask: (K,) bool, True for seen classes (the calibration margin's sign).
        """
        return cls(config, semantic, class_att, seen_mask)

    # ------------------------------------------------------------------ classes
    def scored_class_att(self, class_att: Tensor) -> Tensor:
        """(K, D) class attributes in dataset order as the model scores against them: clipped at 0 where the
        method's settings say, in cluster order, rows L2-normalised."""
        att = class_att.clamp_min(0) if self.config.method.clip_negative_attributes else class_att
        return normalize_rows(att.to(self.attribute_order.device)[:, self.attribute_order])

    def calibration_bias(self) -> Tensor:
        """(K,) fixed shift inside the class scores: +margin on unseen, -margin on seen classes (zeros when the
        method has no calibration margin)."""
        margin = self.config.method.calibration_margin
        if margin == 0:
            return torch.zeros(self.seen_mask.shape, dtype=self.class_att.dtype, device=self.class_att.device)
        return self.margin_bias(margin)

    # ------------------------------------------------------------------ forward
    def prepare_features(self, features: Tensor, precision: str = "fp32") -> Tensor:
        """(B, C, h, w) or (B, C, R) -> (B, C, R), each region vector L2-normalised over C.

        ``fp32``: in the model's dtype. ``bf16``: bfloat16. bf16 maps (what a bf16 training run's batch
        reader hands over, converted once from the store) are normalised in bf16 arithmetic: the norm
        accumulated in float32 and rounded, each value divided and rounded once, with no float32 copy of the
        maps. Maps of another dtype (float32, a float16 store's) get their norm and division in float32 and are
        rounded once.
        """
        features = self.region_maps(features)
        bf16 = check_precision(precision) == "bf16"
        if not bf16:
            features = features.to(self.class_att.dtype)
        out_dtype = torch.bfloat16 if bf16 else features.dtype
        norm_dtype = features.dtype if features.dtype == out_dtype else torch.float32
        norm = torch.linalg.vector_norm(features, dim=1, keepdim=True, dtype=norm_dtype).clamp_min_(1e-12)
        out = torch.empty(features.shape, dtype=out_dtype, device=features.device)
        return torch.div(features, norm, out=out)

    def _region_scores(self, m12: Tensor, feats: Tensor, compute: torch.dtype) -> Tensor:
        """(B, D_all) region-branch scores of all sub-networks from one product of the stacked M1, M2 (2 D_all, C)
        with the features laid out (C, B R), the images side by side: a single large matrix product.

        Native bf16 (``compute`` bfloat16, bf16 features): M1, M2 rounded once, and the product, the softmax over
        R and the weighted sum run in bf16 (each accumulating in float32 and rounding its result once); only the
        (B, D_all) scores are converted back. Otherwise everything in float32 (emulated bf16: on the
        bf16-rounded operands).
        """
        b, c, r = feats.shape
        d_all = m12.shape[0] // 2
        flat = feats.transpose(0, 1).reshape(c, b * r)  # the one copy of the features a step makes
        if compute == torch.bfloat16:
            y = torch.mm(m12.to(torch.bfloat16), flat).view(2 * d_all, b, r)
        elif feats.dtype == torch.bfloat16:  # emulated bf16
            y = torch.mm(round_bf16(m12, compute), flat.to(compute)).view(2 * d_all, b, r)
        else:
            y = torch.mm(m12, flat).view(2 * d_all, b, r)
        # chunk, not y[:d_all] and y[d_all:]: its backward joins the two gradients in one pass, where each slice
        # would scatter its own into a zero-filled gradient of the whole of y
        scores, logits = y.chunk(2)
        return (scores * torch.softmax(logits, dim=-1)).sum(-1).t().to(m12.dtype)

    def forward(self, features: Tensor, precision: str = "fp32") -> DEDNOutput:
        """Both experts' attribute and class scores for a batch of feature maps.

        ``precision="bf16"`` (float32 models only) runs the work over the features in bf16 with float32
        accumulation (:mod:`dedn.models.precision`, docs/precision.md); the weights, their gradients and the
        outputs stay float32.
        """
        bf16 = check_precision(precision) == "bf16"
        if bf16 and self.class_att.dtype != torch.float32:
            raise ValueError(f"precision bf16 needs a float32 model, this one is {self.class_att.dtype}")
        feats = self.prepare_features(features, precision)
        # bf16 where the device multiplies bf16 natively, else float32 on the bf16-rounded values
        compute = product_dtype(feats.device) if bf16 else feats.dtype
        experts = list(self.experts)
        proj = {e: self.experts[e].projections() for e in experts}
        sizes = [proj[e]["m1"].shape[0] for e in experts]
        m12 = torch.cat([proj[e]["m1"] for e in experts] + [proj[e]["m2"] for e in experts])
        o_r_all = self._region_scores(m12, feats, compute)
        o_c_all = None
        if self.config.channel_attention:
            m3 = torch.cat([proj[e]["m3"] for e in experts])
            m4 = torch.cat([proj[e]["m4"] for e in experts])
            if bf16 and compute != torch.bfloat16:  # emulated: the float32 path on the bf16-rounded operands
                m3, m4, feats = round_bf16(m3, compute), round_bf16(m4, compute), feats.to(compute)
            o_c_all = _ChannelAttention.apply(m3, m4, feats)  # bf16 features: its bf16 path
        bias = self.calibration_bias()
        outputs: dict[str, ExpertOutput] = {}
        for e, o_r, o_c in zip(
            experts,
            torch.split(o_r_all, sizes, dim=1),
            torch.split(o_c_all, sizes, dim=1) if o_c_all is not None else [None] * len(experts), strict=False,
        ):
            o = self.mix_branches(o_r, o_c)
            outputs[e] = ExpertOutput(o_r=o_r, o_c=o_c, o=o, scores=o @ self.class_att.T + bias)
        return DEDNOutput(cexp=outputs.get("cexp"), fexp=outputs.get("fexp"), l_e=self.config.l_e)

    def mix_branches(self, o_r: Tensor, o_c: Tensor | None) -> Tensor:
        """Combine region and channel scores: the l_rc mix, or in training their plain sum where the method
        says so (the released code)."""
        if o_c is None:
            return o_r
        if self.config.method.sum_branches_in_training and self.training:
            return o_r + o_c
        return self.config.l_rc * o_r + (1.0 - self.config.l_rc) * o_c

    # ------------------------------------------------------------------ explanation
    @torch.no_grad()
    def attention_maps(self, features: Tensor) -> dict[str, Tensor]:
        """Attention of each expert, attributes in cluster order.

        Returns ``{"cexp_region": (B, D, R), "cexp_channel": (B, D, C), ...}`` (channel maps only with
        channel attention); region maps sum to 1 over R, channel maps over C.
        """
        feats = self.prepare_features(features)
        maps: dict[str, Tensor] = {}
        for e in self.experts:
            p = self.experts[e].projections()
            maps[f"{e}_region"] = torch.softmax(torch.matmul(p["m2"], feats), dim=-1)
            if self.config.channel_attention:
                maps[f"{e}_channel"] = torch.softmax(torch.matmul(p["m4"], feats.transpose(1, 2)), dim=-1)
        return maps

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"mode={cfg.method.mode}, D={cfg.n_attributes}, Q={cfg.n_clusters}, K={self.class_att.shape[0]}, "
                f"C={cfg.n_channels}, R={cfg.n_regions}, channel_attention={cfg.channel_attention}, "
                f"low_rank={cfg.low_rank}")
