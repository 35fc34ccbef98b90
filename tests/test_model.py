"""The fast DEDN equals the formula-by-formula implementation: scores, every loss term, every gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dedn.config import LossConfig
from dedn.data.clusters import builtin_clusters
from dedn.models.dedn import DEDN
from dedn.models.losses import dedn_loss
from dedn.models.naive import naive_forward

N_ATTRIBUTES = {"CUB": 312, "SUN": 102, "AWA2": 85}


def _model(dataset: str, mode: str, dtype: torch.dtype, low_rank: int | None = None, **kw) -> DEDN:
    rng = np.random.default_rng(0)
    d = N_ATTRIBUTES[dataset]
    k = 12
    clusters = builtin_clusters(dataset, "reference" if mode == "reference" else "paper")
    seen = np.zeros(k, dtype=bool)
    seen[:8] = True
    torch.manual_seed(1)
    model = DEDN(rng.normal(size=(d, 6)), rng.random((k, d)), list(clusters.values()), seen,
                 n_channels=10, n_regions=4, mode=mode, low_rank=low_rank, **kw).to(dtype)
    with torch.no_grad():  # move W2 and W4 off zero so the attention is not uniform
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def _run(model: DEDN, forward, x: torch.Tensor, y: torch.Tensor, mode: str, dataset: str):
    model.zero_grad()
    out = forward(x)
    terms = dedn_loss(out, y, model.seen_mask, LossConfig(lamb=0.2), mode, dataset, model.calibration_bias())
    terms.total.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    values = {k: v.detach() for k, v in terms.terms.items()}
    values["total"] = terms.total.detach()
    return out, values, grads


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    scale = b.abs().max().clamp_min(1e-12)
    return bool(((a - b).abs().max() / scale) <= rtol)


@pytest.mark.parametrize("dataset", ["CUB", "SUN", "AWA2"])
@pytest.mark.parametrize("mode", ["paper", "reference"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
@pytest.mark.parametrize("training", [True, False])
def test_fast_equals_naive(dataset: str, mode: str, dtype: torch.dtype, rtol: float, training: bool) -> None:
    low_rank = 3 if (dataset == "SUN" and mode == "reference") else None
    model = _model(dataset, mode, dtype, low_rank=low_rank)
    model.train(training)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(5, 10, 2, 2, generator=gen, dtype=dtype)
    y = torch.tensor([0, 3, 7, 1, 2])
    fast = _run(model, model, x, y, mode, dataset)
    slow = _run(model, lambda t: naive_forward(model, t), x, y, mode, dataset)
    for expert in ("cexp", "fexp"):
        a, b = getattr(fast[0], expert), getattr(slow[0], expert)
        for field in ("o_r", "o_c", "o", "scores"):
            assert _close(getattr(a, field), getattr(b, field), rtol), (expert, field)
    assert set(fast[1]) == set(slow[1])
    for name in fast[1]:
        assert _close(fast[1][name], slow[1][name], rtol), name
    assert set(fast[2]) == set(slow[2])
    for name in fast[2]:
        assert _close(fast[2][name], slow[2][name], rtol), name


@pytest.mark.parametrize("kw", [{"experts": "cexp"}, {"experts": "fexp"}, {"channel_attention": False}])
def test_variants_equal_naive(kw: dict) -> None:
    model = _model("AWA2", "paper", torch.float64, **kw)
    x = torch.rand(3, 10, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 3, 5])
    fast = _run(model, model, x, y, "paper", "AWA2")
    slow = _run(model, lambda t: naive_forward(model, t), x, y, "paper", "AWA2")
    assert _close(fast[0].combined(), slow[0].combined(), 1e-10)
    for name in fast[2]:
        assert _close(fast[2][name], slow[2][name], 1e-10), name


def test_initial_attention_is_uniform_and_v_is_normalised() -> None:
    rng = np.random.default_rng(0)
    sem = rng.normal(size=(6, 4))
    sem[2] = 0  # a zero word vector (SUN row 88) must not give NaN
    model = DEDN(sem, rng.random((5, 6)), [[0, 1, 2], [3, 4, 5]], np.array([1, 1, 1, 0, 0], bool), 8, 9)
    norms = model.cexp_V.detach().norm(dim=1)
    assert torch.isfinite(model.cexp_V).all()
    assert torch.allclose(norms[norms > 0], torch.ones_like(norms[norms > 0]))
    maps = model.attention_maps(torch.rand(2, 8, 3, 3))
    assert torch.allclose(maps["cexp_region"], torch.full_like(maps["cexp_region"], 1 / 9))
    assert torch.allclose(maps["fexp_channel"], torch.full_like(maps["fexp_channel"], 1 / 8))


def test_cluster_order_and_class_scores() -> None:
    rng = np.random.default_rng(3)
    att = rng.random((4, 5))
    model = DEDN(rng.normal(size=(5, 3)), att, [[3, 1], [0, 2, 4]], np.array([1, 1, 0, 0], bool), 6, 4,
                 channel_attention=False).double()
    assert model.attribute_order.tolist() == [3, 1, 0, 2, 4]
    expected = att[:, [3, 1, 0, 2, 4]]
    expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(model.class_att.numpy(), expected, rtol=1e-6)
    out = model(torch.rand(2, 6, 2, 2, dtype=torch.float64))
    assert out.cexp is not None
    np.testing.assert_allclose(out.cexp.scores.detach().numpy(), out.cexp.o.detach().numpy() @ expected.T,
                               rtol=1e-6)


def test_reference_margin_and_branch_sum() -> None:
    rng = np.random.default_rng(4)
    seen = np.array([1, 1, 0], bool)
    model = DEDN(rng.normal(size=(4, 3)), rng.random((3, 4)), [[0, 1], [2, 3]], seen, 6, 4, mode="reference",
                 l_rc=0.7).double()
    assert model.calibration_bias().tolist() == [-1.0, -1.0, 1.0]
    x = torch.rand(2, 6, 2, 2, dtype=torch.float64)
    model.train()
    out = model(x)
    assert torch.allclose(out.cexp.o, out.cexp.o_r + out.cexp.o_c)
    model.eval()
    out = model(x)
    assert torch.allclose(out.cexp.o, 0.7 * out.cexp.o_r + 0.3 * out.cexp.o_c)
    assert torch.allclose(out.cexp.scores, out.cexp.o @ model.class_att.T + model.calibration_bias())


def test_set_classes_and_bad_shapes() -> None:
    rng = np.random.default_rng(5)
    model = DEDN(rng.normal(size=(4, 3)), rng.random((3, 4)), [[0, 1], [2, 3]], np.array([1, 1, 0], bool), 6, 4)
    model.set_classes(rng.random((7, 4)), np.zeros(7, bool))
    assert model(torch.rand(2, 6, 2, 2)).combined().shape == (2, 7)
    with pytest.raises(ValueError, match="class attributes"):
        model.set_classes(rng.random((7, 5)), np.zeros(7, bool))
    with pytest.raises(ValueError, match="features must be"):
        model(torch.rand(2, 5, 2, 2))
    with pytest.raises(ValueError, match="disjoint"):
        DEDN(rng.normal(size=(4, 3)), rng.random((3, 4)), [[0, 1], [1, 3]], np.array([1, 1, 0], bool), 6, 4)
