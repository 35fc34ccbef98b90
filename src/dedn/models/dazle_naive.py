"""DAZLE written straight from its formulas, one tensor per symbol (tests compare :mod:`dedn.models.dazle` to it).

Every step forms the whole tensor the equations name: S (B, D, R), the attention alpha (B, D, R), the attribute
features h (B, D, C), the gate beta (B, D), and the class scores summed attribute by attribute. The model instead
forms the small products V W first and never builds h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dedn.models.dazle import DAZLE, DAZLEOutput


def naive_forward(model: DAZLE, features: Tensor) -> DAZLEOutput:
    """The same output as ``model(features)``, formula by formula."""
    fs = features.flatten(2).to(model.class_att.dtype) if features.ndim == 4 else features.to(model.class_att.dtype)
    fs = fs / fs.norm(dim=1, keepdim=True)  # f_{b,r} / ||f_{b,r}|| over the C channels
    v = model.attention.V
    if model.config.normalize_v:
        v = v / v.norm(dim=1, keepdim=True)
    w1, w2, w3 = model.attention.W1[0], model.attention.W2[0], model.W3
    s = torch.einsum("ig,gc,bcr->bir", v, w1, fs)  # S_{b,i,r} = v_i^T W1 f_{b,r}
    alpha = F.softmax(torch.einsum("ig,gc,bcr->bir", v, w2, fs), dim=2)  # over the R regions
    h = torch.einsum("bir,bcr->bic", alpha, fs)  # h_{b,i} = sum_r alpha_{b,i,r} f_{b,r}
    e = torch.einsum("bir,bir->bi", alpha, s)
    if model.config.gate:
        gate = torch.sigmoid(torch.einsum("ig,gc,bic->bi", v, w3, h))  # beta_{b,i} = sigma(v_i^T W3 h_{b,i})
    else:
        gate = torch.ones_like(e)
    z = model.class_att
    k = z.shape[0]
    scores = torch.stack([(z[j] * gate * e).sum(-1) for j in range(k)], dim=1)  # s_{b,k} = sum_i z_ki beta e
    return DAZLEOutput(o=gate * e, e=e, gate=gate, scores=scores + model.calibration_bias())
