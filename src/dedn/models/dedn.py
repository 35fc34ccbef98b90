"""The DEDN model: two experts of Dual Attention Networks over region feature maps.

cExp is one DAN over all D attributes; fExp is Q DANs, one per attribute cluster. Every sub-network
maps its attributes' semantic rows V (D_s x G) into visual space through four matrices (W1, W2: G x C;
W3, W4: G x R). Because the products V W are small (D_s x C or D_s x R), they are formed first and
stacked row-wise over both experts and all clusters, so the whole model is a few large matrix
products over the features instead of 1 + Q separate passes (see :mod:`dedn.models.naive` for the formulas
written out one sub-network at a time, which this module must equal).

Attribute order: inside the model every attribute axis is in *cluster order* (cluster 0's attributes
in ascending index order, then cluster 1's, ...); :attr:`DEDN.attribute_order` maps positions back to
dataset attribute indices. Class attributes are given in dataset order and permuted here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("paper", "reference")
EXPERTS = ("both", "cexp", "fexp")


@dataclass
class ExpertOutput:
    """What one expert computes for a batch; attribute axes in cluster order.

    Attributes:
        o_r: (B, D) region-branch attribute scores.
        o_c: (B, D) channel-branch attribute scores, or None without channel attention.
        o: (B, D) the combined attribute scores the class scores are made from.
        scores: (B, K) class scores (reference mode: with the fixed calibration margin added).
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

    def combined(self, l_e: float | None = None) -> Tensor:
        """(B, K) prediction scores l_e * P_cExp + (1 - l_e) * P_fExp, before calibrated stacking."""
        l_e = self.l_e if l_e is None else l_e
        if self.cexp is None:
            assert self.fexp is not None
            return self.fexp.scores
        if self.fexp is None:
            return self.cexp.scores
        return l_e * self.cexp.scores + (1.0 - l_e) * self.fexp.scores


def normalize_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """L2-normalise rows; an all-zero row stays zero (SUN's "man-made" word vector is zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


class _ChannelAttention(torch.autograd.Function):
    """Channel-branch scores of all attribute rows at once, as attention over the C channel vectors.

    O[b, d] = M3[d] . (softmax_C(M4[d] F_b^T) F_b): the queries are the rows of M4, the keys and values
    the C channel vectors of image b (each of length R). Per image that is two matrix products forward
    (logits, then the attention-weighted sum U) and two backward (S = M3 F_b^T recomputed, then
    dM4 += dL F_b); dM3 = sum_b g_b U_b needs no large product. Only the attention A (B, D, C) is kept,
    and the softmax and its backward run in place. Features are frozen: no gradient flows to them.
    """

    @staticmethod
    def forward(ctx, m3: Tensor, m4: Tensor, feats: Tensor) -> Tensor:  # type: ignore[override]
        b, c, r = feats.shape
        d = m3.shape[0]
        keep = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        att = feats.new_empty(b, d, c) if keep else feats.new_empty(1, d, c)
        u = feats.new_empty(b, d, r)
        for i in range(b):
            f, a = feats[i], att[i if keep else 0]
            torch.mm(m4, f.t(), out=a)
            a.sub_(a.amax(-1, keepdim=True)).exp_()
            a.div_(a.sum(-1, keepdim=True))
            torch.mm(a, f, out=u[i])
        out = torch.einsum("dr,bdr->bd", m3, u)
        if keep:
            ctx.save_for_backward(m3, feats, att, u, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        m3, feats, att, u, out = ctx.saved_tensors
        grad3 = torch.einsum("bd,bdr->dr", grad_out, u)
        grad4 = torch.zeros_like(m3)
        s = feats.new_empty(m3.shape[0], feats.shape[1])
        for i in range(feats.shape[0]):
            f = feats[i]
            torch.mm(m3, f.t(), out=s)  # S recomputed: cheaper than keeping a second (B, D, C) tensor
            s.sub_(out[i, :, None]).mul_(att[i]).mul_(grad_out[i, :, None])  # dL = A (S - O) g
            grad4.addmm_(s, f)
        return grad3, grad4, None


class DEDN(nn.Module):
    """Dual Expert Distillation Network.

    Args:
        semantic: (D, G) attribute semantic vectors in dataset attribute order.
        class_att: (K, D) class attributes in dataset attribute order.
        clusters: Q sequences of attribute indices (disjoint, covering 0..D-1), fExp's sub-networks.
        seen_mask: (K,) bool, True for seen classes (used by the reference calibration margin).
        n_channels: C of the feature maps.
        n_regions: R = h * w of the feature maps.
        mode: ``"paper"`` or ``"reference"`` (SPEC section 2: reference trains on O_r + O_c and keeps a
            fixed calibration margin inside the scores).
        l_rc: region/channel mix at inference (and in paper-mode training).
        l_e: cExp/fExp mix used by :meth:`DEDNOutput.combined`.
        low_rank: when set, W1 = H1 H3 with H1 (G x h), H3 (h x C) (the reference SUN model).
        channel_attention: False drops the channel branch (O = O_r).
        experts: ``"both"``, ``"cexp"`` or ``"fexp"``.
        calibration_margin: reference mode: +margin on unseen, -margin on seen class scores.
        clip_negative_att: clip class attributes at 0 before normalising (reference AWA2).
    """

    def __init__(
        self,
        semantic: np.ndarray | Tensor,
        class_att: np.ndarray | Tensor,
        clusters: Sequence[Sequence[int] | np.ndarray],
        seen_mask: np.ndarray | Tensor,
        n_channels: int,
        n_regions: int,
        *,
        mode: str = "paper",
        l_rc: float = 0.8,
        l_e: float = 0.9,
        low_rank: int | None = None,
        channel_attention: bool = True,
        experts: str = "both",
        calibration_margin: float = 1.0,
        clip_negative_att: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if experts not in EXPERTS:
            raise ValueError(f"experts must be one of {EXPERTS}, got {experts!r}")
        semantic = torch.as_tensor(np.asarray(semantic, dtype=np.float32))
        d, g = semantic.shape
        cluster_lists = [np.asarray(c, dtype=np.int64) for c in clusters]
        order = np.concatenate(cluster_lists) if cluster_lists else np.zeros(0, dtype=np.int64)
        if order.size != d or np.unique(order).size != d or order.min() < 0 or order.max() >= d:
            raise ValueError(f"clusters must be disjoint and cover all {d} attributes")
        self.mode = mode
        self.l_rc = float(l_rc)
        self.l_e = float(l_e)
        self.low_rank = low_rank
        self.channel_attention = bool(channel_attention)
        self.experts = experts
        self.calibration_margin = float(calibration_margin)
        self.clip_negative_att = bool(clip_negative_att)
        self.n_channels = int(n_channels)
        self.n_regions = int(n_regions)
        self.semantic_dim = int(g)
        self.cluster_sizes: list[int] = [int(c.size) for c in cluster_lists]
        self.register_buffer("attribute_order", torch.as_tensor(order))
        # Cluster-ordered, normalised semantic rows: the initial value of every V.
        v0 = normalize_rows(semantic[torch.as_tensor(order)])
        self.register_buffer("class_att", torch.zeros(0, d))
        self.register_buffer("seen_mask", torch.zeros(0, dtype=torch.bool))
        self.set_classes(class_att, seen_mask)

        q = len(cluster_lists)
        c, r = self.n_channels, self.n_regions

        def normal(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape))

        def zeros(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(*shape))

        # Parameters are stored per expert, stacked over sub-networks for fExp (leading axis Q).
        # Init (SPEC): V = normalised semantic rows; W1, W3 ~ N(0, 1); W2, W4 = 0.
        if experts in ("both", "cexp"):
            self.cexp_V = nn.Parameter(v0.clone())
            if low_rank:
                self.cexp_H1, self.cexp_H3 = normal(g, low_rank), normal(low_rank, c)
            else:
                self.cexp_W1 = normal(g, c)
            self.cexp_W2 = zeros(g, c)
            if self.channel_attention:
                self.cexp_W3, self.cexp_W4 = normal(g, r), zeros(g, r)
        if experts in ("both", "fexp"):
            self.fexp_V = nn.Parameter(v0.clone())
            if low_rank:
                self.fexp_H1, self.fexp_H3 = normal(q, g, low_rank), normal(q, low_rank, c)
            else:
                self.fexp_W1 = normal(q, g, c)
            self.fexp_W2 = zeros(q, g, c)
            if self.channel_attention:
                self.fexp_W3, self.fexp_W4 = normal(q, g, r), zeros(q, g, r)

    # ------------------------------------------------------------------ classes
    @property
    def n_attributes(self) -> int:
        return int(self.attribute_order.numel())

    @property
    def n_clusters(self) -> int:
        return len(self.cluster_sizes)

    def set_classes(self, class_att: np.ndarray | Tensor, seen_mask: np.ndarray | Tensor) -> None:
        """Replace the class set: (K', D) attributes in dataset order and a (K',) seen mask.

        Used to recognise classes given only at prediction time; no weight changes.
        """
        att = torch.as_tensor(np.asarray(class_att, dtype=np.float32))
        seen = torch.as_tensor(np.asarray(seen_mask, dtype=bool))
        if att.ndim != 2 or att.shape[1] != self.n_attributes:
            raise ValueError(f"class attributes must be (K, {self.n_attributes}), got {tuple(att.shape)}")
        if seen.shape != (att.shape[0],):
            raise ValueError(f"seen mask must have shape ({att.shape[0]},), got {tuple(seen.shape)}")
        if self.clip_negative_att:
            att = att.clamp_min(0)
        dev = self.attribute_order.device
        self.class_att = normalize_rows(att.to(dev)[:, self.attribute_order])
        self.seen_mask = seen.to(dev)

    def calibration_bias(self) -> Tensor:
        """(K,) fixed score shift of reference mode (+margin unseen, -margin seen); zeros in paper mode."""
        if self.mode != "reference" or self.calibration_margin == 0:
            return torch.zeros(self.seen_mask.shape, dtype=self.class_att.dtype, device=self.class_att.device)
        sign = 1.0 - 2.0 * self.seen_mask.to(self.class_att.dtype)
        return self.calibration_margin * sign

    # ------------------------------------------------------------------ projections
    def _cluster_products(self, v: Tensor, w: Tensor) -> Tensor:
        """Row-stacked V_q W_q over clusters: (D, X) from V (D, G) and W (Q, G, X)."""
        parts = torch.split(v, self.cluster_sizes)
        return torch.cat([p @ w[i] for i, p in enumerate(parts)])

    def expert_projections(self, expert: str) -> dict[str, Tensor]:
        """M1..M4 = V W1..V W4 of one expert: (D, C), (D, C), (D, R), (D, R) in cluster order."""
        v = getattr(self, f"{expert}_V")
        out: dict[str, Tensor] = {}
        if expert == "cexp":
            out["m1"] = (v @ self.cexp_H1) @ self.cexp_H3 if self.low_rank else v @ self.cexp_W1
            out["m2"] = v @ self.cexp_W2
            if self.channel_attention:
                out["m3"], out["m4"] = v @ self.cexp_W3, v @ self.cexp_W4
        else:
            if self.low_rank:
                out["m1"] = self._cluster_products(self._cluster_products(v, self.fexp_H1), self.fexp_H3)
            else:
                out["m1"] = self._cluster_products(v, self.fexp_W1)
            out["m2"] = self._cluster_products(v, self.fexp_W2)
            if self.channel_attention:
                out["m3"] = self._cluster_products(v, self.fexp_W3)
                out["m4"] = self._cluster_products(v, self.fexp_W4)
        return out

    @property
    def active_experts(self) -> list[str]:
        return ["cexp", "fexp"] if self.experts == "both" else [self.experts]

    # ------------------------------------------------------------------ forward
    def prepare_features(self, features: Tensor) -> Tensor:
        """(B, C, h, w) or (B, C, R) -> (B, C, R) float, each region vector L2-normalised over C."""
        if features.ndim == 4:
            features = features.flatten(2)
        if features.ndim != 3 or features.shape[1] != self.n_channels or features.shape[2] != self.n_regions:
            raise ValueError(
                f"features must be (B, {self.n_channels}, h, w) with h*w = {self.n_regions}, "
                f"got {tuple(features.shape)}"
            )
        dtype = self.class_att.dtype
        return F.normalize(features.to(dtype), dim=1, eps=1e-12)

    def forward(self, features: Tensor) -> DEDNOutput:
        """Both experts' attribute and class scores for a batch of feature maps."""
        feats = self.prepare_features(features)
        experts = self.active_experts
        proj = {e: self.expert_projections(e) for e in experts}
        sizes = [proj[e]["m1"].shape[0] for e in experts]
        d_all = sum(sizes)
        # Region branch: one product over F for M1 and M2 of every sub-network of both experts, with the
        # images side by side (C, B R) so that it is a single large matrix product.
        b, c, r = feats.shape
        m12 = torch.cat([proj[e]["m1"] for e in experts] + [proj[e]["m2"] for e in experts])
        y = torch.mm(m12, feats.permute(1, 0, 2).reshape(c, b * r)).view(2 * d_all, b, r)
        o_r_all = (y[:d_all] * torch.softmax(y[d_all:], dim=-1)).sum(-1).t()
        o_c_all = None
        if self.channel_attention:
            m3 = torch.cat([proj[e]["m3"] for e in experts])
            m4 = torch.cat([proj[e]["m4"] for e in experts])
            o_c_all = _ChannelAttention.apply(m3, m4, feats)
        bias = self.calibration_bias()
        outputs: dict[str, ExpertOutput] = {}
        for e, o_r, o_c in zip(
            experts,
            torch.split(o_r_all, sizes, dim=1),
            torch.split(o_c_all, sizes, dim=1) if o_c_all is not None else [None] * len(experts), strict=False,
        ):
            o = self.mix_branches(o_r, o_c)
            outputs[e] = ExpertOutput(o_r=o_r, o_c=o_c, o=o, scores=o @ self.class_att.T + bias)
        return DEDNOutput(cexp=outputs.get("cexp"), fexp=outputs.get("fexp"), l_e=self.l_e)

    def mix_branches(self, o_r: Tensor, o_c: Tensor | None) -> Tensor:
        """Combine region and channel scores: l_rc mix, or (reference, training) their plain sum."""
        if o_c is None:
            return o_r
        if self.mode == "reference" and self.training:
            return o_r + o_c
        return self.l_rc * o_r + (1.0 - self.l_rc) * o_c

    # ------------------------------------------------------------------ explanation
    @torch.no_grad()
    def attention_maps(self, features: Tensor) -> dict[str, Tensor]:
        """Attention of each expert, attributes in cluster order.

        Returns ``{"cexp_region": (B, D, R), "cexp_channel": (B, D, C), ...}`` (channel maps only with
        channel attention); region maps sum to 1 over R, channel maps over C.
        """
        feats = self.prepare_features(features)
        maps: dict[str, Tensor] = {}
        for e in self.active_experts:
            p = self.expert_projections(e)
            maps[f"{e}_region"] = torch.softmax(torch.matmul(p["m2"], feats), dim=-1)
            if self.channel_attention:
                maps[f"{e}_channel"] = torch.softmax(torch.matmul(p["m4"], feats.transpose(1, 2)), dim=-1)
        return maps

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, D={self.n_attributes}, Q={self.n_clusters}, K={self.class_att.shape[0]}, "
                f"C={self.n_channels}, R={self.n_regions}, experts={self.experts}, "
                f"channel_attention={self.channel_attention}, low_rank={self.low_rank}")
