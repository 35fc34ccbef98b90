"""TransZero written out formula by formula, in evaluation mode (no dropout).

The slow, obvious form of :class:`dedn.models.transzero.TransZero`'s forward pass: the geometry embedding cell
pair by cell pair with Python's ``math``, layer norms, attentions and feed-forward blocks as einsums over the
parameters, the decoder's attention projections sliced out of torch's packed ``in_proj`` by hand. It reads the
parameters of a model, so tests can compare the two output for output (float64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dedn.models.transzero import GEOMETRY_DIM, GEOMETRY_WAVE_LENGTH, TransZero, TransZeroOutput


def _geometry_embedding(grid: tuple[int, int], box_plus_one: bool) -> Tensor:
    """(R, R, 64) float64, one cell pair at a time."""
    h, w = grid
    n_freq = GEOMETRY_DIM // 8
    freqs = [GEOMETRY_WAVE_LENGTH ** (-k / n_freq) for k in range(n_freq)]
    bw, bh = 1.0 / h + box_plus_one, 1.0 / w + box_plus_one
    cells = [((i + 0.5) / h, (j + 0.5) / w) for i in range(h) for j in range(w)]
    out = torch.zeros(len(cells), len(cells), GEOMETRY_DIM, dtype=torch.float64)
    for m, (cx_m, cy_m) in enumerate(cells):
        for n, (cx_n, cy_n) in enumerate(cells):
            offsets = [math.log(max(abs(cx_m - cx_n) / bw, 1e-3)), math.log(max(abs(cy_m - cy_n) / bh, 1e-3)),
                       0.0, 0.0]  # every cell has the same size: log(bw / bw) = log(bh / bh) = 0
            angles = [100.0 * o * f for o in offsets for f in freqs]
            values = [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
            out[m, n] = torch.tensor(values, dtype=torch.float64)
    return out


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    return torch.einsum("...i,oi->...o", x, layer.weight) + layer.bias


def _layer_norm(layer: nn.LayerNorm, x: Tensor) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias


def _attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    """Single-head attention softmax(q k^T / sqrt(d) - bias) v, batch first."""
    logits = torch.einsum("bqd,bkd->bqk", q, k) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits - bias
    return torch.einsum("bqk,bkd->bqd", torch.softmax(logits, dim=-1), v)


def _torch_attention(mha: nn.MultiheadAttention, q: Tensor, kv: Tensor) -> Tensor:
    """One head of torch's MultiheadAttention from its packed projection weights."""
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    proj = (torch.einsum("bnd,ed->bne", q, wq) + bq, torch.einsum("bnd,ed->bne", kv, wk) + bk,
            torch.einsum("bnd,ed->bne", kv, wv) + bv)
    return _linear(mha.out_proj, _attention(*proj))


def naive_forward(model: TransZero, features: Tensor) -> TransZeroOutput:
    """The same output as ``model.eval()(features)``, from the formulas."""
    cfg = model.config
    feats = features.flatten(2).to(model.class_att.dtype)
    feats = feats / feats.norm(dim=1, keepdim=True)  # each region vector over C
    v = model.V / model.V.norm(dim=1, keepdim=True) if cfg.normalize_v else model.V
    emb = _geometry_embedding(cfg.grid, cfg.box_plus_one).to(feats.dtype)
    geometry = torch.relu(_linear(model.geometry, emb)).squeeze(-1)  # (R, R)
    enc = model.encoder
    x = _linear(model.embed_cv, feats.transpose(1, 2))
    y = _layer_norm(enc.attention_norm,
                    x + _linear(enc.fc_o, _attention(_linear(enc.fc_q, x), _linear(enc.fc_k, x),
                                                     _linear(enc.fc_v, x), geometry)))
    if enc.residual_norm is not None:
        y = _layer_norm(enc.residual_norm, x + y)
    memory = _layer_norm(enc.ffn_norm, y + _linear(enc.fc2, torch.relu(_linear(enc.fc1, y))))
    dec = model.decoder
    q = _linear(model.embed_attr, v).unsqueeze(0).repeat(feats.shape[0], 1, 1)
    if cfg.self_attention:
        q = _layer_norm(dec.norm1, q + _torch_attention(dec.self_attn, q, q))
    q = _layer_norm(dec.norm2, q + _torch_attention(dec.multihead_attn, q, memory))
    o = _layer_norm(dec.norm3, q + _linear(dec.linear2, torch.relu(_linear(dec.linear1, q))))
    e = torch.einsum("ig,gd,bid->bi", v, model.W1, o)  # e_i = v_i^T W1 o_i
    return TransZeroOutput(o=e, scores=e @ model.class_att.T + model.calibration_bias())
