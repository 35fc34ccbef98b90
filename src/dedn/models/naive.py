"""DEDN written straight from the paper's formulas, one pass per sub-network.

This is deliberately the slow, obvious implementation: each sub-network of each expert (cExp's one, then
each of fExp's Q clusters) is its own pass over the features. Each pass projects the features into the
sub-network's semantic space: W1 F and W2 F are G x R per image, W3 F^T and W4 F^T are G x C. It then compares them
with its attribute vectors V, giving S_r = V (W1 F), A_r = softmax_R(V (W2 F)),
S_c = V (W3 F^T) and A_c = softmax_C(V (W4 F^T)), all formed as whole tensors. The 1 + Q passes
each cost G x C x R per image and weight kind, whatever the size of their cluster. :mod:`dedn.models.dedn`
instead forms the small V W products first and stacks them over all sub-networks, so the work over
the features is that of the D attribute rows alone.

It reads the parameters of a :class:`dedn.models.dedn.DEDN`, so the two can be compared output for output and
gradient for gradient (tests), and timed against each other (:mod:`dedn.apps.bench`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dedn.models.dedn import DEDN, DEDNOutput, Expert, ExpertOutput


def _dan(
    v: Tensor, w1: Tensor, w2: Tensor, w3: Tensor | None, w4: Tensor | None, feats: Tensor
) -> tuple[Tensor, Tensor | None]:
    """One Dual Attention Network: (O_r, O_c), each (B, D_s)."""
    s_r = torch.einsum("dg,bgr->bdr", v, torch.einsum("gc,bcr->bgr", w1, feats))  # S_r = V (W1 F)
    a_r = torch.softmax(torch.einsum("dg,bgr->bdr", v, torch.einsum("gc,bcr->bgr", w2, feats)), dim=-1)
    o_r = (s_r * a_r).sum(-1)  # attention over the R regions
    if w3 is None or w4 is None:
        return o_r, None
    feats_t = feats.transpose(1, 2)  # F^T: (B, R, C)
    s_c = torch.einsum("dg,bgc->bdc", v, torch.einsum("gr,brc->bgc", w3, feats_t))  # S_c = V (W3 F^T)
    a_c = torch.softmax(torch.einsum("dg,bgc->bdc", v, torch.einsum("gr,brc->bgc", w4, feats_t)), dim=-1)
    o_c = (s_c * a_c).sum(-1)  # attention over the C channels
    return o_r, o_c


def _sub_networks(expert: Expert) -> list[tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]]:
    """(V_q, W1_q, W2_q, W3_q, W4_q) of each of the expert's clusters (W3, W4 None without channel attention)."""
    out = []
    for q, v in enumerate(torch.split(expert.V, expert.cluster_sizes)):
        w1 = expert.H1[q] @ expert.H3[q] if expert.H1 is not None and expert.H3 is not None else expert.W1[q]
        w3 = expert.W3[q] if expert.W3 is not None else None
        w4 = expert.W4[q] if expert.W4 is not None else None
        out.append((v, w1, expert.W2[q], w3, w4))
    return out


def naive_forward(model: DEDN, features: Tensor) -> DEDNOutput:
    """The same output as ``model(features)``, computed one sub-network at a time."""
    feats = model.prepare_features(features)
    bias = model.calibration_bias()
    outputs: dict[str, ExpertOutput] = {}
    for name, expert in model.experts.items():
        rs, cs = [], []
        for v, w1, w2, w3, w4 in _sub_networks(expert):
            o_r, o_c = _dan(v, w1, w2, w3, w4, feats)
            rs.append(o_r)
            cs.append(o_c)
        o_r = torch.cat(rs, dim=1)
        o_c = torch.cat(cs, dim=1) if expert.channel_attention else None
        o = model.mix_branches(o_r, o_c)
        outputs[name] = ExpertOutput(o_r, o_c, o, o @ model.class_att.T + bias)
    return DEDNOutput(cexp=outputs.get("cexp"), fexp=outputs.get("fexp"), l_e=model.config.l_e)
