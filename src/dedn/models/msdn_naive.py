"""MSDN written out formula by formula, one subnet and one image at a time.

The slow, obvious form of :mod:`dedn.models.msdn`: for each image, each subnet forms its (D, R) score and
attention-logit maps from V, its two weight matrices and the image's region vectors, normalises the
attention over the regions (AV) or over the attributes (VA), and sums over the regions. It reads an
:class:`~dedn.models.msdn.MSDN`'s parameters, so the two can be compared output for output (tests).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dedn.models.msdn import MSDN, MSDNOutput, SubnetOutput


def _subnet(v: Tensor, w_score: Tensor, w_att: Tensor, f: Tensor, softmax_dim: int) -> Tensor:
    """(D,) attribute scores of one image ``f`` (C, R): sum_r softmax(v_i^T w_att f_r) * v_i^T w_score f_r."""
    scores = torch.einsum("ig,gc,cr->ir", v, w_score, f)
    attention = torch.softmax(torch.einsum("ig,gc,cr->ir", v, w_att, f), dim=softmax_dim)
    return (attention * scores).sum(-1)


def naive_forward(model: MSDN, features: Tensor) -> MSDNOutput:
    """The same output as ``model(features)``, image by image."""
    feats = model.prepare_features(features)
    v = model.semantic_rows()
    w1, w2 = model.av.W1, model.av.W2
    assert w1 is not None
    o_av = torch.stack([_subnet(v, w1[0], w2[0], f, softmax_dim=1) for f in feats])  # over the R regions
    o_va = torch.stack([_subnet(v, model.va.U1, model.va.U2, f, softmax_dim=0) for f in feats])  # over the D attributes
    bias = model.calibration_bias()
    return MSDNOutput(av=SubnetOutput(o_av, torch.einsum("bi,ki->bk", o_av, model.class_att) + bias),
                      va=SubnetOutput(o_va, torch.einsum("bi,ki->bk", o_va, model.class_att) + bias),
                      l_e=model.config.l_e)
