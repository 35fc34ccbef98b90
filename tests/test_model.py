"""The fast DEDN equals the formula-by-formula implementation: scores, every loss term, every gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dedn.config import LossConfig
from dedn.data.clusters import builtin_clusters
from dedn.models.dedn import DEDN, DEDNConfig
from dedn.models.losses import dedn_loss
from dedn.models.naive import naive_forward
from dedn.models.settings import MethodSettings, resolve_method

N_ATTRIBUTES = {"CUB": 312, "SUN": 102, "AWA2": 85}
LOSS = LossConfig(lamb=0.2)


def _small(semantic: np.ndarray, att: np.ndarray, clusters: list, seen: np.ndarray, c: int, r: int,
           mode: str = "paper", **kw) -> DEDN:
    """A model of the given semantics and classes; ``kw`` are DEDNConfig fields."""
    config = DEDNConfig(n_attributes=semantic.shape[0], semantic_dim=semantic.shape[1], n_channels=c, n_regions=r,
                        clusters=tuple(clusters), method=resolve_method(mode, None, LossConfig()), **kw)
    return DEDN.from_config(config, semantic, att, seen)


def _model(dataset: str, mode: str, dtype: torch.dtype, low_rank: int | None = None, **kw) -> DEDN:
    rng = np.random.default_rng(0)
    d = N_ATTRIBUTES[dataset]
    k = 12
    clusters = builtin_clusters(dataset, "reference" if mode == "reference" else "paper")
    seen = np.zeros(k, dtype=bool)
    seen[:8] = True
    torch.manual_seed(1)
    config = DEDNConfig(n_attributes=d, semantic_dim=6, n_channels=10, n_regions=4, clusters=tuple(clusters.values()),
                        method=resolve_method(mode, dataset, LOSS, low_rank), **kw)
    model = DEDN.from_config(config, rng.normal(size=(d, 6)), rng.random((k, d)), seen).to(dtype)
    with torch.no_grad():  # move W2 and W4 off zero so the attention is not uniform
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


def _run(model: DEDN, forward, x: torch.Tensor, y: torch.Tensor):
    model.zero_grad()
    out = forward(x)
    terms = dedn_loss(out, y, model.seen_mask, LOSS, model.config.method, model.calibration_bias())
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
    fast = _run(model, model, x, y)
    slow = _run(model, lambda t: naive_forward(model, t), x, y)
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
    fast = _run(model, model, x, y)
    slow = _run(model, lambda t: naive_forward(model, t), x, y)
    assert _close(fast[0].combined(), slow[0].combined(), 1e-10)
    for name in fast[2]:
        assert _close(fast[2][name], slow[2][name], 1e-10), name


def test_initial_attention_is_uniform_and_v_is_normalised() -> None:
    rng = np.random.default_rng(0)
    sem = rng.normal(size=(6, 4))
    sem[2] = 0  # a zero word vector (SUN row 88) must not give NaN
    model = _small(sem, rng.random((5, 6)), [[0, 1, 2], [3, 4, 5]], np.array([1, 1, 1, 0, 0], bool), 8, 9)
    v = model.experts["cexp"].V.detach()
    norms = v.norm(dim=1)
    assert torch.isfinite(v).all() and torch.equal(v, model.experts["fexp"].V.detach())
    assert torch.allclose(norms[norms > 0], torch.ones_like(norms[norms > 0]))
    maps = model.attention_maps(torch.rand(2, 8, 3, 3))
    assert torch.allclose(maps["cexp_region"], torch.full_like(maps["cexp_region"], 1 / 9))
    assert torch.allclose(maps["fexp_channel"], torch.full_like(maps["fexp_channel"], 1 / 8))


def test_cluster_order_and_class_scores() -> None:
    rng = np.random.default_rng(3)
    att = rng.random((4, 5))
    model = _small(rng.normal(size=(5, 3)), att, [[3, 1], [0, 2, 4]], np.array([1, 1, 0, 0], bool), 6, 4,
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
    model = _small(rng.normal(size=(4, 3)), rng.random((3, 4)), [[0, 1], [2, 3]], seen, 6, 4, mode="reference",
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
    model = _small(rng.normal(size=(4, 3)), rng.random((3, 4)), [[0, 1], [2, 3]], np.array([1, 1, 0], bool), 6, 4)
    model.set_classes(rng.random((7, 4)), np.zeros(7, bool))
    assert model(torch.rand(2, 6, 2, 2)).combined().shape == (2, 7)
    with pytest.raises(ValueError, match="class attributes"):
        model.set_classes(rng.random((7, 5)), np.zeros(7, bool))
    with pytest.raises(ValueError, match="features must be"):
        model(torch.rand(2, 5, 2, 2))
    with pytest.raises(ValueError, match="disjoint"):
        _small(rng.normal(size=(4, 3)), rng.random((3, 4)), [[0, 1], [1, 3]], np.array([1, 1, 0], bool), 6, 4)
    with pytest.raises(ValueError, match=r"semantic vectors must be \(4, 5\)"):
        DEDN.from_config(DEDNConfig(4, 5, 6, 4, ((0, 1), (2, 3))), rng.normal(size=(4, 3)), rng.random((3, 4)),
                         np.array([1, 1, 0], bool))


# ---------------------------------------------------------------------------------------------- experts and init
def test_expert_layout_and_state_dict_names() -> None:
    rng = np.random.default_rng(6)
    model = _small(rng.normal(size=(5, 3)), rng.random((4, 5)), [[3, 1], [0, 2, 4]], np.array([1, 1, 0, 0], bool), 6, 4)
    assert list(model.experts) == model.config.active_experts == ["cexp", "fexp"]
    assert model.experts["cexp"].cluster_sizes == [5] and model.experts["fexp"].cluster_sizes == [2, 3]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "attribute_order": (5,), "class_att": (4, 5), "seen_mask": (4,),
        "experts.cexp.V": (5, 3), "experts.cexp.W1": (1, 3, 6), "experts.cexp.W2": (1, 3, 6),
        "experts.cexp.W3": (1, 3, 4), "experts.cexp.W4": (1, 3, 4),
        "experts.fexp.V": (5, 3), "experts.fexp.W1": (2, 3, 6), "experts.fexp.W2": (2, 3, 6),
        "experts.fexp.W3": (2, 3, 4), "experts.fexp.W4": (2, 3, 4),
    }
    low = DEDN.from_config(DEDNConfig(5, 3, 6, 4, ((3, 1), (0, 2, 4)), experts="fexp", channel_attention=False,
                                      method=MethodSettings(low_rank=2)),
                           rng.normal(size=(5, 3)), rng.random((4, 5)), np.array([1, 1, 0, 0], bool))
    assert {k: tuple(v.shape) for k, v in low.named_parameters()} == {
        "experts.fexp.V": (5, 3), "experts.fexp.H1": (2, 3, 2), "experts.fexp.H3": (2, 2, 6),
        "experts.fexp.W2": (2, 3, 6)}
    assert low.config.low_rank == 2 and not low.config.channel_attention and list(low.experts) == ["fexp"]


#: W1 and W3 of ``_tiny()`` (seed 0) as the code before the Expert module drew them, under their names of then
#: (``cexp_W1`` (G, C) had no cluster axis). Every tensor has fewer than 16 elements, where torch draws normal
#: numbers one at a time, so the values do not depend on the CPU's vector instructions.
EARLIER_INIT = {
    "cexp_W1": [1.5409960746765137, -0.293428897857666, -2.1787893772125244, 0.5684312582015991, -1.0845223665237427,
                -1.3985954523086548],
    "cexp_W3": [0.40334683656692505, 0.8380263447761536, -0.7192575931549072, -0.40334352850914],
    "fexp_W1": [-0.5966353416442871, 0.18203648924827576, -0.8566746115684509, 1.1006041765213013, -1.0711873769760132,
                0.1227012425661087, -0.5663174986839294, 0.3731146454811096, -0.8919953107833862, -1.5091077089309692,
                0.3703935444355011, 1.4565025568008423],
    "fexp_W3": [0.9398099184036255, 0.7748488187789917, 0.19186942279338837, 1.2637947797775269, -1.2904350757598877,
                -0.7911027073860168, -0.02087947353720665, -0.7184800505638123],
}


def _tiny(**method) -> DEDN:
    torch.manual_seed(0)
    config = DEDNConfig(3, 2, 3, 2, ((0, 2), (1,)), method=MethodSettings(**method))
    return DEDN.from_config(config, np.array([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]]),
                            np.array([[0.2, 0.4, 0.9], [0.7, 0.1, 0.3]]), np.array([True, False]))


def test_init_is_bitwise_the_earlier_layouts() -> None:
    model = _tiny()
    for old, values in EARLIER_INIT.items():
        expert, name = old.split("_")
        got = getattr(model.experts[expert], name).detach().flatten()
        assert torch.equal(got, torch.tensor(values, dtype=torch.float32)), old
    assert not model.experts["cexp"].W2.any() and not model.experts["fexp"].W4.any()


@pytest.mark.parametrize("kw", [{}, {"experts": "cexp"}, {"experts": "fexp"}, {"channel_attention": False},
                                {"low_rank": 2}, {"low_rank": 2, "experts": "fexp", "channel_attention": False}])
def test_init_draws_in_the_earlier_order(kw: dict) -> None:
    """A seed gives the weights it gave before the Expert module: the same normal draws, in the same order
    (cExp: H1, H3 or W1, then W3, each without cluster axis; then fExp: the same with axis Q), as replayed here."""
    low_rank = kw.pop("low_rank", None)
    rng = np.random.default_rng(7)
    g, c, r, clusters = 5, 6, 4, ((4, 0), (1, 5, 2), (3,))
    config = DEDNConfig(6, g, c, r, clusters, method=MethodSettings(low_rank=low_rank), **kw)
    torch.manual_seed(3)
    model = DEDN.from_config(config, rng.normal(size=(6, g)), rng.random((3, 6)), np.array([1, 0, 1], bool))
    torch.manual_seed(3)
    for name in config.active_experts:
        lead = () if name == "cexp" else (len(clusters),)  # the earlier cExp weights had no cluster axis
        expert = model.experts[name]
        want = [("H1", torch.randn(*lead, g, low_rank)), ("H3", torch.randn(*lead, low_rank, c))] if low_rank else \
            [("W1", torch.randn(*lead, g, c))]
        if config.channel_attention:
            want.append(("W3", torch.randn(*lead, g, r)))
        for pname, value in want:
            assert torch.equal(getattr(expert, pname).detach().reshape(value.shape), value), (name, pname)
    after_replay = torch.randn(4)
    torch.manual_seed(3)  # and the model drew nothing else
    DEDN.from_config(config, np.zeros((6, g)), np.ones((3, 6)), np.array([1, 0, 1], bool))
    assert torch.equal(torch.randn(4), after_replay)
