"""Every loss term against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dedn.config import LossConfig, load_config
from dedn.models.dedn import DEDNOutput, ExpertOutput
from dedn.models.losses import (
    dedn_loss,
    discrepancy,
    jensen_shannon,
    margin_aware_loss,
    self_calibration_loss,
)
from dedn.models.settings import MethodSettings, resolve_method


def _softmax(v: list[float]) -> np.ndarray:
    e = np.exp(np.asarray(v) - max(v))
    return e / e.sum()


def _jsd_by_hand(x: list[float], y: list[float]) -> float:
    p, q = _softmax(x), _softmax(y)
    m = (p + q) / 2
    return 0.5 * (sum(p * np.log(p / m)) + sum(q * np.log(q / m)))


def test_jsd_values() -> None:
    x = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    expected = (_jsd_by_hand([1, 0], [0, 1]) + 0.0) / 2  # batch mean; the second row's JSD is 0
    assert jensen_shannon(x, y).item() == pytest.approx(expected, rel=1e-12)
    # Closed form for two-class softmax pairs: p = (a, 1-a), q = (1-a, a).
    a = 1 / (1 + math.exp(-1))
    closed = a * math.log(2 * a) + (1 - a) * math.log(2 * (1 - a))
    assert jensen_shannon(x[:1], y[:1]).item() == pytest.approx(closed, rel=1e-12)


def test_discrepancy_paper_and_reference() -> None:
    x = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    js = _jsd_by_hand([1, 2, 0], [0, 0, 0])
    assert discrepancy(x, y, "paper").item() == pytest.approx(js + (1 + 4 + 0) / 3, rel=1e-12)
    norm = math.sqrt(1 + 4 + 1e-9)
    cubic = (1 ** 3 + 2 ** 3) / norm
    assert discrepancy(x, y, "reference").item() == pytest.approx(js + cubic, rel=1e-12)
    # identical inputs: zero, and no NaN in the reference term (the 1e-9 guard)
    z = discrepancy(x, x.clone(), "reference")
    assert z.item() == pytest.approx(0.0, abs=1e-12)


def test_discrepancy_gradients_flow_into_both() -> None:
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    y = torch.tensor([[0.0, 1.0]], requires_grad=True)
    discrepancy(x, y, "paper").backward()
    assert x.grad is not None and y.grad is not None
    assert x.grad.abs().sum() > 0 and y.grad.abs().sum() > 0


def test_margin_aware_loss_by_hand() -> None:
    scores = torch.tensor([[1.0, 0.5, 0.2, 0.3]], dtype=torch.float64)
    seen = torch.tensor([True, True, False, False])
    label = torch.tensor([0])
    # paper: target P - 2, other seen P + 1, unseen P
    logits = [1.0 - 2.0, 0.5 + 1.0, 0.2, 0.3]
    expected = -math.log(_softmax(logits)[0])
    assert margin_aware_loss(scores, label, seen, 1.0).item() == pytest.approx(expected, rel=1e-12)
    # reference SUN/AWA2: target P - 1
    logits = [1.0 - 1.0, 0.5 + 1.0, 0.2, 0.3]
    expected = -math.log(_softmax(logits)[0])
    assert margin_aware_loss(scores, label, seen, 1.0, target_margin=1.0).item() == pytest.approx(expected)
    # disabled: plain cross-entropy
    expected = -math.log(_softmax([1.0, 0.5, 0.2, 0.3])[0])
    assert margin_aware_loss(scores, label, seen, enabled=False).item() == pytest.approx(expected, rel=1e-12)


def test_target_margin_switch() -> None:
    cfg = LossConfig(margin=1.0)
    assert resolve_method("paper", "SUN", cfg).target_margin == 2.0
    assert resolve_method("reference", "CUB", cfg).target_margin == 2.0
    assert resolve_method("reference", "SUN", cfg).target_margin == 1.0
    assert resolve_method("reference", "AWA2", cfg).target_margin == 1.0
    assert resolve_method("reference", "awa2", LossConfig(margin=0.5)).target_margin == 0.5
    assert resolve_method("paper", "CUB", LossConfig(margin=0.5)).target_margin == 1.0


def test_method_settings_of_each_mode() -> None:
    loss = LossConfig(lamb=0.11, calibration_margin=0.7)
    paper = resolve_method("paper", "AWA2", loss, low_rank=4)
    assert paper == MethodSettings(mode="paper", target_margin=2.0) == resolve_method("paper", None, LossConfig())
    assert (paper.calibration_margin, paper.self_calibration, paper.low_rank, paper.discrepancy) == (0.0, 0.0, None,
                                                                                                       "paper")
    assert not paper.sum_branches_in_training and not paper.clip_negative_attributes
    ref = resolve_method("reference", "AWA2", loss, low_rank=4)
    assert ref == MethodSettings(mode="reference", target_margin=1.0, calibration_margin=0.7,
                                 sum_branches_in_training=True, clip_negative_attributes=True,
                                 discrepancy="reference", self_calibration=0.11, low_rank=4, default_gamma=0.0,
                                 cluster_variant="reference")
    # The fixed calibration nothing else chose: the paper's 2 eps margin; 0 where the margin is in the scores.
    assert resolve_method("paper", None, LossConfig(margin=0.25)).default_gamma == 0.5 and paper.default_gamma == 2.0
    assert not resolve_method("reference", "CUB", loss).clip_negative_attributes
    assert not resolve_method("reference", None, loss).clip_negative_attributes
    assert MethodSettings.from_dict(ref.to_dict()) == ref
    with pytest.raises(ValueError, match="mode must be paper or reference"):
        resolve_method("released", None, loss)
    with pytest.raises(ValueError, match="discrepancy"):
        MethodSettings(discrepancy="cubic")
    with pytest.raises(ValueError, match="low_rank"):
        MethodSettings(low_rank=0)


def test_self_calibration_by_hand() -> None:
    scores = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    unseen = torch.tensor([False, False, True])
    mass = (_softmax([0, 1, 2])[2] + 1 / 3) / 2
    assert self_calibration_loss(scores, unseen).item() == pytest.approx(-math.log(mass), rel=1e-12)


def _expert(o_r, o_c, scores) -> ExpertOutput:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return ExpertOutput(o_r=t(o_r), o_c=t(o_c), o=t(o_r), scores=t(scores))


def test_total_loss_combines_terms() -> None:
    seen = torch.tensor([True, True, False])
    labels = torch.tensor([1])
    c = _expert([[0.1, 0.2]], [[0.3, 0.0]], [[0.5, 0.1, 0.9]])
    f = _expert([[0.0, 0.4]], [[0.2, 0.2]], [[0.2, 0.3, 0.1]])
    out = DEDNOutput(cexp=c, fexp=f, l_e=0.5)
    cfg = LossConfig(beta=0.01, gamma=0.5, lamb=0.3)
    paper = dedn_loss(out, labels, seen, cfg, resolve_method("paper", "CUB", cfg))
    t = paper.terms
    expected = (t["mal_c"] + t["mal_f"] + 0.01 * (t["align_c"] + t["align_f"]) + 0.5 * t["distill"]).item()
    assert paper.total.item() == pytest.approx(expected, rel=1e-12)
    assert "cal_c" not in t  # self-calibration is a reference-mode term only
    assert t["distill"].item() == pytest.approx(discrepancy(c.scores, f.scores, "paper").item())
    bias = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
    ref = dedn_loss(out, labels, seen, cfg, resolve_method("reference", "CUB", cfg), calibration_bias=bias)
    r = ref.terms
    assert r["mal_c"].item() == pytest.approx(margin_aware_loss(c.scores - bias, labels, seen).item())
    assert r["cal_c"].item() == pytest.approx(self_calibration_loss(c.scores, ~seen).item())
    assert r["distill"].item() == pytest.approx(discrepancy(c.scores, f.scores, "reference").item())
    expected = (r["mal_c"] + r["mal_f"] + 0.01 * (r["align_c"] + r["align_f"]) + 0.5 * r["distill"]
                + 0.3 * (r["cal_c"] + r["cal_f"])).item()
    assert ref.total.item() == pytest.approx(expected, rel=1e-12)
    off_cfg = LossConfig(align=False, distill=False)
    off = dedn_loss(out, labels, seen, off_cfg, resolve_method("paper", "CUB", off_cfg))
    assert set(off.terms) == {"mal_c", "mal_f"}


def test_the_papers_two_readings_of_the_discrepancy() -> None:
    from dedn.models.losses import symmetric_kl

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    p, q = torch.softmax(x, -1), torch.softmax(y, -1)
    kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731 - the textbook formula, in float64
    assert float(symmetric_kl(x, y)) == pytest.approx(float((0.5 * (kl(p, q) + kl(q, p))).mean()), rel=1e-12)
    summed = float(((x - y) ** 2).sum(-1).mean())
    assert float(discrepancy(x, y, "paper", "jsd", "sum")) == pytest.approx(float(jensen_shannon(x, y)) + summed)
    # "sum" weights the squared error n times more than "mean" (n = 7 entries here; K on the distill term).
    mean_sq = float(((x - y) ** 2).mean())
    assert summed == pytest.approx(7 * mean_sq)
    assert float(discrepancy(x, y, "paper", "symmetric_kl", "mean")) == pytest.approx(
        float(symmetric_kl(x, y)) + mean_sq)


def test_readings_are_paper_mode_switches() -> None:
    from dedn.errors import ConfigError

    method = resolve_method("paper", "CUB", LossConfig(divergence="symmetric_kl", squared_error="sum"))
    assert (method.divergence, method.squared_error) == ("symmetric_kl", "sum")
    default = resolve_method("paper", None, LossConfig())
    assert (default.divergence, default.squared_error) == ("jsd", "mean")
    with pytest.raises(ConfigError, match="reference mode computes the released"):
        resolve_method("reference", "CUB", LossConfig(divergence="symmetric_kl"))
    with pytest.raises(ConfigError, match="loss.squared_error must be one of"):
        load_config(None, ["loss.squared_error=total"])


def test_readings_reach_the_training_loss() -> None:


    from dedn.training.trainer import Trainer

    from .conftest import TINY

    losses = {}
    for reading in (["loss.divergence=jsd"], ["loss.divergence=symmetric_kl", "loss.squared_error=sum"]):
        trainer = Trainer(load_config(None, [*TINY, *reading]))
        index = trainer.sampler.epoch(0, 1)[0]
        losses[reading[0]] = trainer.train_step(index)
    a, b = losses["loss.divergence=jsd"], losses["loss.divergence=symmetric_kl"]
    assert a["mal_c"] == b["mal_c"]  # same model, same batch: only the discrepancy terms differ
    assert not np.isclose(a["distill"], b["distill"]) and not np.isclose(a["align_c"], b["align_c"])
