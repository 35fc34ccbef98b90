"""DEDN's training losses, as the paper defines them or as the released code computes them.

Which of the two is given by a :class:`~dedn.models.settings.MethodSettings` (the target margin, the
discrepancy's form, the self-calibration weight); nothing here reads a mode or a dataset name.

- :func:`discrepancy` d(x, y): JSD + MSE (the paper) or JSD + the released code's cubic term.
- :func:`margin_aware_loss` (MAL): cross-entropy over all classes with a margin that pushes the target
  down and the other seen classes up, so unseen classes are not crowded out.
- :func:`self_calibration_loss`: the reference code's extra term that rewards unseen probability mass.
- :func:`dedn_loss`: the weighted total over both experts, returned term by term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dedn.models.dedn import DEDNOutput
from dedn.models.settings import (
    DISCREPANCIES,
    PAPER_DISCREPANCY,
    RELEASED_DISCREPANCY,
    LossSettings,
    MethodSettings,
)


def jensen_shannon(x: Tensor, y: Tensor) -> Tensor:
    """JSD(softmax(x) || softmax(y)) over the last dim, natural log, mean over the batch.

    Computed in log space: log m = logsumexp(log p, log q) - log 2 stays finite where both softmaxes
    underflow to 0 for a class, which would otherwise give 0 * inf = NaN.
    """
    log_p = torch.log_softmax(x, dim=-1)
    log_q = torch.log_softmax(y, dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_p + kl_q).mean()


def released_jensen_shannon(x: Tensor, y: Tensor) -> Tensor:
    """JSD as the released code computes it: log of the averaged probabilities.

    NaN where both softmaxes underflow for one class; kept so that reference mode matches the released
    arithmetic bit for bit.
    """
    p = torch.softmax(x, dim=-1)
    q = torch.softmax(y, dim=-1)
    log_m = torch.log((p + q) / 2)
    kl_p = (p * (torch.log_softmax(x, dim=-1) - log_m)).sum(-1)
    kl_q = (q * (torch.log_softmax(y, dim=-1) - log_m)).sum(-1)
    return 0.5 * (kl_p + kl_q).mean()


def symmetric_kl(x: Tensor, y: Tensor) -> Tensor:
    """1/2 [KL(softmax(x) || softmax(y)) + KL(softmax(y) || softmax(x))] over the last dim, batch mean.

    The paper's equations 7 and 12 print this; computed from log-softmaxes, so it is finite wherever the scores
    are.
    """
    log_p = torch.log_softmax(x, dim=-1)
    log_q = torch.log_softmax(y, dim=-1)
    return 0.5 * ((log_p.exp() * (log_p - log_q)).sum(-1) + (log_q.exp() * (log_q - log_p)).sum(-1)).mean()


def discrepancy(x: Tensor, y: Tensor, form: str = PAPER_DISCREPANCY, divergence: str = "jsd",
                squared_error: str = "mean") -> Tensor:
    """d(x, y) for (B, n) tensors; gradients flow into both arguments.

    ``form`` (:data:`~dedn.models.settings.DISCREPANCIES`): the paper's, a divergence of the two softmaxes
    plus a squared error; or the released code's, JSD + (1/B) sum_b sum_j |x - y|^3 / sqrt(sum_j (x - y)^2
    + 1e-9). In the paper's form ``divergence`` is ``jsd`` (the text) or ``symmetric_kl`` (equations 7, 12)
    and ``squared_error`` is ``mean`` (over batch and entries, the text) or ``sum`` (over the score vector,
    then the batch mean: the printed squared norm).
    """
    diff = x - y
    if form == PAPER_DISCREPANCY:
        div = jensen_shannon(x, y) if divergence == "jsd" else symmetric_kl(x, y)
        sq = diff.pow(2).mean() if squared_error == "mean" else diff.pow(2).sum(-1).mean()
        return div + sq
    if form == RELEASED_DISCREPANCY:
        js = released_jensen_shannon(x, y)
        sq = diff.pow(2)
        norm = torch.sqrt(sq.sum(-1, keepdim=True) + 1e-9)
        return js + (sq / norm * diff.abs()).sum() / x.shape[0]
    raise ValueError(f"unknown discrepancy form {form!r}; known: {DISCREPANCIES}")


def margin_aware_loss(
    scores: Tensor,
    labels: Tensor,
    seen_mask: Tensor,
    margin: float = 1.0,
    target_margin: float | None = None,
    enabled: bool = True,
) -> Tensor:
    """MAL over all K classes: logits P_y - target_margin (target), P_k + margin (other seen), P_k (unseen).

    ``target_margin`` defaults to 2 * margin (the paper's; see :attr:`MethodSettings.target_margin`). With
    ``enabled=False`` this is plain cross-entropy over all classes (the "w/o MAL" ablation).
    """
    if not enabled:
        return F.cross_entropy(scores, labels)
    target_margin = 2.0 * margin if target_margin is None else target_margin
    shift = margin * seen_mask.to(scores.dtype)
    logits = scores + shift
    # The target is a seen class, so it received +margin above; take it back and subtract target_margin.
    onehot = F.one_hot(labels, scores.shape[1]).to(scores.dtype)
    logits = logits - onehot * (shift[labels].unsqueeze(1) + target_margin)
    return F.cross_entropy(logits, labels)


def self_calibration_loss(scores: Tensor, unseen_mask: Tensor) -> Tensor:
    """-log(mean_b sum_{u unseen} softmax(scores_b)_u) (the released code's; not in the paper)."""
    probs = torch.softmax(scores, dim=-1)
    return -torch.log(probs[:, unseen_mask].sum(-1).mean())


@dataclass
class LossTerms:
    """The total loss and every weighted part of it (unweighted values), for logging and tests."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)

    def items(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), **{k: float(v.detach()) for k, v in self.terms.items()}}


def dedn_loss(
    out: DEDNOutput,
    labels: Tensor,
    seen_mask: Tensor,
    cfg: LossSettings,
    method: MethodSettings,
    calibration_bias: Tensor | None = None,
) -> LossTerms:
    """L = MAL(P_c) + MAL(P_f) + beta (align_c + align_f) + gamma distill [+ lamb (cal_c + cal_f)].

    ``out`` is the model output for the batch. Its scores hold the method's calibration margin, which MAL
    removes again through ``calibration_bias`` (``model.calibration_bias()``), as the released code does.
    ``cfg`` gives the weights and switches; ``method`` the target margin, the discrepancy's form and the
    self-calibration weight lamb (the term is left out at 0; only the released code has it).
    """
    unseen_mask = ~seen_mask
    terms: dict[str, Tensor] = {}
    any_scores = (out.cexp or out.fexp).scores  # type: ignore[union-attr]
    total = any_scores.new_zeros(())
    experts = {"c": out.cexp, "f": out.fexp}
    for tag, exp in experts.items():
        if exp is None:
            continue
        raw = exp.scores if calibration_bias is None else exp.scores - calibration_bias
        mal = margin_aware_loss(raw, labels, seen_mask, cfg.margin, method.target_margin, cfg.mal)
        terms[f"mal_{tag}"] = mal
        total = total + mal
        if cfg.align and exp.o_c is not None:
            align = discrepancy(exp.o_r, exp.o_c, method.discrepancy, method.divergence, method.squared_error)
            terms[f"align_{tag}"] = align
            total = total + cfg.beta * align
        if method.self_calibration > 0 and bool(unseen_mask.any()):
            cal = self_calibration_loss(exp.scores, unseen_mask)
            terms[f"cal_{tag}"] = cal
            total = total + method.self_calibration * cal
    if cfg.distill and out.cexp is not None and out.fexp is not None:
        distill = discrepancy(out.cexp.scores, out.fexp.scores, method.discrepancy, method.divergence,
                              method.squared_error)
        terms["distill"] = distill
        total = total + cfg.gamma * distill
    return LossTerms(total=total, terms=terms)
