"""MSDN: the fast forward against the naive one, its settings, losses, released-code compatibility, and a run
through the layers above the models (training, evaluation, model files) with ``model.name=msdn``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dedn
from dedn.config import RunConfig, apply_overrides
from dedn.errors import CheckpointError, ConfigError
from dedn.eval.evaluate import evaluate_model
from dedn.factory import build_model, load_data
from dedn.models import compat
from dedn.models.msdn import MSDN, MSDNConfig, msdn_distance, msdn_loss, resolve_settings
from dedn.models.msdn_method import from_reference, reference_loss, reference_scores
from dedn.models.msdn_naive import naive_forward
from dedn.models.registry import entry_for, model_entry
from dedn.training.trainer import Trainer

D, G, C, R, K = 6, 5, 7, 4, 5
SEEN = np.array([True, True, True, False, False])


def _model(mode: str = "paper", dataset: str | None = "CUB", options: dict | None = None, seed: int = 0,
           random_weights: bool = True, l_e: float = 0.7) -> MSDN:
    """A float64 model with every weight drawn at random (the zero-initialised ones too) unless asked not to."""
    rng = np.random.default_rng(seed)
    cfg = MSDNConfig(D, G, C, R, l_e=l_e, settings=resolve_settings(mode, dataset, options))
    torch.manual_seed(seed)
    model = MSDN(cfg, rng.normal(size=(D, G)), rng.normal(size=(K, D)), SEEN).double()
    if random_weights:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    return model


def _features(b: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, C, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize(("mode", "dataset", "options"), [
    ("paper", "CUB", None), ("reference", "CUB", None), ("reference", "AWA2", None),
    ("paper", "SUN", {"normalize_v": True}),
])
def test_fast_forward_equals_the_naive_one_with_gradients(mode, dataset, options):
    model = _model(mode, dataset, options)
    x = _features()
    fast, slow = model(x), naive_forward(model, x)
    for name in ("av", "va"):
        torch.testing.assert_close(getattr(fast, name).o, getattr(slow, name).o, rtol=0, atol=1e-10)
        torch.testing.assert_close(getattr(fast, name).scores, getattr(slow, name).scores, rtol=0, atol=1e-10)
    grads = []
    for out in (fast, slow):
        model.zero_grad()
        (out.combined() ** 2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_initial_weights_shapes_and_attention():
    rng = np.random.default_rng(3)
    w2v = rng.normal(size=(D, G))
    cfg = MSDNConfig(D, G, C, R, settings=resolve_settings("reference", "CUB"))
    torch.manual_seed(11)
    model = MSDN(cfg, w2v, rng.normal(size=(K, D)), SEEN)
    torch.manual_seed(11)
    expected_w1 = torch.randn(1, G, C)  # the only random draw, as in the released constructor
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == {
        "av.V": (D, G), "av.W1": (1, G, C), "av.W2": (1, G, C), "va.U1": (G, C), "va.U2": (G, C)}
    torch.testing.assert_close(model.av.V.detach(), F.normalize(torch.as_tensor(w2v, dtype=torch.float32)))
    assert torch.equal(model.av.W1.detach(), expected_w1)
    for p in (model.av.W2, model.va.U1, model.va.U2):
        assert not p.detach().any()
    assert torch.equal(model.attribute_order, torch.arange(D))
    x = torch.rand(2, C, R)
    out = model(x)
    assert not out.va.o.any()  # VA starts at exactly zero: its scores are the margin alone
    torch.testing.assert_close(out.va.scores, model.calibration_bias().expand(2, K))
    maps = model.attention_maps(x)
    assert maps["av_region"].shape == maps["va_region"].shape == (2, D, R)
    torch.testing.assert_close(maps["av_region"], torch.full((2, D, R), 1 / R))
    torch.testing.assert_close(maps["va_region"], torch.full((2, D, R), 1 / D))


def test_attention_maps_sum_over_regions_for_av_and_over_attributes_for_va():
    maps = _model().attention_maps(_features())
    torch.testing.assert_close(maps["av_region"].sum(-1), torch.ones(3, D, dtype=torch.float64))
    torch.testing.assert_close(maps["va_region"].sum(1), torch.ones(3, R, dtype=torch.float64))


def test_branches_give_the_combined_scores_the_way_evaluation_computes_them():
    model = _model("reference")
    out = model(_features())
    branches = out.branches()
    assert list(branches) == ["av_o_r", "va_o_r"] and list(out.expert_attributes()) == ["av", "va"]
    bias = model.calibration_bias()
    p_av, p_va = (branches[n] @ model.class_att.T + bias for n in ("av_o_r", "va_o_r"))
    torch.testing.assert_close(out.combined(), 0.7 * p_av + 0.3 * p_va, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.combined(1.0), p_av, rtol=0, atol=1e-12)
    assert torch.equal(bias, torch.tensor([-1.0, -1, -1, 1, 1], dtype=torch.float64))
    assert not _model("paper").calibration_bias().any()


def test_class_attributes_are_normalised_and_clipped_only_for_reference_awa2():
    att = np.array([[3.0, -4.0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 2.0]])
    ref = _model("reference", "AWA2")
    ref.set_classes(att, [True, False])
    assert torch.allclose(ref.class_att[0], torch.tensor([1.0, 0, 0, 0, 0, 0], dtype=torch.float64))
    paper = _model("paper", "AWA2")
    paper.set_classes(att, [True, False])
    assert torch.allclose(paper.class_att[0], torch.tensor([0.6, -0.8, 0, 0, 0, 0], dtype=torch.float64))
    with pytest.raises(ValueError, match="seen mask"):
        paper.set_classes(att, [True])


def test_bf16_forward_stays_close_to_fp32():
    model = _model().float()
    x = _features().float()
    with torch.no_grad():
        a, b = model(x).combined(), model(x, precision="bf16").combined()
    assert not torch.equal(a, b)
    assert torch.allclose(a, b, rtol=0.05, atol=0.05 * float(a.abs().max()))


# ---------------------------------------------------------------------------------------------- settings
def test_settings_per_dataset_and_mode_and_options():
    ref = resolve_settings("reference", "SUN")
    assert (ref.lambda_cal, ref.w_distill, ref.normalize_v, ref.calibration_margin, ref.released_distance) == (
        1e-4, 1e-2, False, 1.0, True)
    paper = resolve_settings("paper", "awa2")
    assert (paper.lambda_cal, paper.w_distill, paper.normalize_v, paper.calibration_margin) == (0.12, 1e-7, True, 0.0)
    assert not paper.clip_negative_attributes and resolve_settings("reference", "AWA2").clip_negative_attributes
    assert resolve_settings("paper", None) == resolve_settings("paper", "CUB")
    mine = resolve_settings("paper", "CUB", {"lambda_cal": 0.5, "normalize_v": True})
    assert (mine.lambda_cal, mine.normalize_v, mine.w_distill) == (0.5, True, 1e-3)
    with pytest.raises(ConfigError, match=r"model\.options\.gate is not an option of msdn"):
        resolve_settings("paper", "CUB", {"gate": False})
    with pytest.raises(ConfigError, match=r"model\.options\.w_distill must be a finite number >= 0"):
        resolve_settings("paper", "CUB", {"w_distill": -1})
    with pytest.raises(ConfigError, match=r"model\.options\.normalize_v must be true or false"):
        resolve_settings("paper", "CUB", {"normalize_v": "yes"})


def test_default_calibration_is_the_released_gap_in_paper_mode_and_zero_in_reference(tiny_cfg: RunConfig):
    entry = model_entry("msdn")
    assert entry.label == "MSDN" and not entry.replays_released
    assert entry.default_gamma(_msdn_cfg(tiny_cfg), "CUB") == 2.0
    assert entry.default_gamma(_msdn_cfg(tiny_cfg, "mode=reference"), "CUB") == 0.0


def test_config_round_trips_through_json():
    cfg = _model("reference", "AWA2").config
    assert MSDNConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


# ---------------------------------------------------------------------------------------------- losses
def test_distance_against_hand_computed_values():
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    q1 = math.e / (1 + math.e)
    m = [(0.5 + q1) / 2, (0.5 + 1 - q1) / 2]
    kl_p = sum(0.5 * math.log(0.5 / mi) for mi in m)
    kl_q = q1 * math.log(q1 / m[0]) + (1 - q1) * math.log((1 - q1) / m[1])
    cubic = 1.0  # |x - y|^3 / ||x - y|| = 1 / 1
    expected = 0.5 * (kl_p + kl_q) + cubic
    assert float(msdn_distance(x, y, released=True)) == pytest.approx(expected, rel=1e-12)
    assert float(msdn_distance(x, y)) == pytest.approx(expected, rel=1e-8)
    assert torch.isnan(msdn_distance(x, x, released=True))  # the released code's missing epsilon
    assert float(msdn_distance(x, x)) == 0.0


def test_loss_against_hand_computed_values():
    model = _model("reference", options={"lambda_cal": 0.5, "w_distill": 0.25})
    out = model(_features(2))
    labels = torch.tensor([0, 2])
    terms = msdn_loss(model, out, labels, model.seen_mask)
    bias = torch.tensor([-1.0, -1, -1, 1, 1], dtype=torch.float64)
    expected = 0.0
    for sub in (out.av, out.va):
        raw = (sub.scores - bias).detach()
        ce = -np.mean([float(raw[b, labels[b]] - torch.logsumexp(raw[b], 0)) for b in range(2)])
        probs = torch.softmax(sub.scores.detach(), -1)
        cal = -math.log(float(probs[:, 3:].sum(-1).mean()))
        expected += ce + 0.5 * cal
    expected += 0.25 * float(msdn_distance(out.av.scores, out.va.scores, released=True).detach())
    assert float(terms.total.detach()) == pytest.approx(expected, rel=1e-12)
    assert set(terms.items()) == {"loss", "ce_av", "cal_av", "ce_va", "cal_va", "distill"}
    no_cal = msdn_loss(_model("paper", options={"lambda_cal": 0.0, "w_distill": 0.0}), out, labels, model.seen_mask)
    assert set(no_cal.items()) == {"loss", "ce_av", "ce_va"}


# ---------------------------------------------------------------------------------------------- released code
def _released_state(model: MSDN) -> dict[str, torch.Tensor]:
    """The released training model's state dict layout, filled from a dedn model's weights."""
    v = model.av.V.detach()
    k = model.class_att.shape[0]
    mask = torch.where(model.seen_mask, -1.0, 1.0).reshape(1, k)
    return {"V": v.clone(), "att": model.class_att.clone(), "W_1": model.av.W1[0].detach().clone(),
            "W_2": model.av.W2[0].detach().clone(), "W_3": torch.zeros_like(model.va.U2),
            "W_1_1": model.va.U1.detach().t().clone(), "W_2_1": model.va.U2.detach().clone(),
            "W_3_1": torch.zeros_like(model.va.U1).t(), "weight_ce": torch.eye(k), "bias": torch.tensor(1),
            "mask_bias": mask, "prob_prune": torch.tensor(0)}


def _released_scores(state: dict[str, torch.Tensor], x: torch.Tensor, normalize_v: bool) -> tuple[torch.Tensor, ...]:
    """The released forward from its own tensors, as peers-spec §2.3 states it."""
    f = F.normalize(x.flatten(2), dim=1)
    v = F.normalize(state["V"]) if normalize_v else state["V"]
    margin = state["mask_bias"] * state["bias"]
    s = torch.einsum("ig,gc,bcr->bir", v, state["W_1"], f)
    a = torch.softmax(torch.einsum("ig,gc,bcr->bir", v, state["W_2"], f), dim=2)
    av = torch.einsum("ki,bi->bk", state["att"], (a * s).sum(2)) + margin
    s2 = torch.einsum("bcr,cg,ig->bri", f, state["W_1_1"], v)
    a2 = torch.softmax(torch.einsum("ig,gc,bcr->bir", v, state["W_2_1"], f), dim=1)
    va = torch.einsum("ki,bi->bk", state["att"], torch.einsum("bir,bri->bi", a2, s2)) + margin
    return av, va


@pytest.mark.parametrize("dataset", ["CUB", "AWA2"])
def test_released_state_dict_round_trip_scores_and_loss(dataset):
    source = _model("reference", dataset)
    state = _released_state(source)
    loaded = compat.from_reference_state_dict({f"module.{k}": v for k, v in state.items()}, dataset,
                                              np.flatnonzero(SEEN), model="msdn", n_regions=R)
    assert isinstance(loaded, MSDN) and loaded.av.V.dtype == torch.float64
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert loaded.config.l_e == {"CUB": 0.9, "AWA2": 1.0}[dataset]
    x = _features(4)
    expected = _released_scores(state, x, normalize_v=dataset == "AWA2")
    for got in (reference_scores(loaded, x, training=True), compat.reference_scores(loaded, x, training=False)):
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    labels = torch.tensor([0, 1, 2, 0])
    settings = loaded.config.settings
    onehot = torch.eye(K, dtype=torch.float64)[labels]
    total = torch.zeros((), dtype=torch.float64)
    for s in expected:
        ce = -(torch.log_softmax(s - state["mask_bias"], dim=1) * onehot).sum(1).mean()
        cal = -torch.log(torch.softmax(s, dim=1)[:, ~torch.as_tensor(SEEN)].sum(1).mean())
        total = total + ce + settings.lambda_cal * cal
    diff = expected[0] - expected[1]
    cubic = (diff.pow(2) / diff.pow(2).sum(1, keepdim=True).sqrt() * diff.abs()).sum() / 4
    p, q = torch.softmax(expected[0], 1), torch.softmax(expected[1], 1)
    log_m = ((p + q) / 2).log()
    jsd = (F.kl_div(log_m, q, reduction="batchmean") + F.kl_div(log_m, p, reduction="batchmean")) / 2
    total = total + settings.w_distill * (cubic + jsd)
    got = reference_loss(loaded, x, labels)
    assert got.requires_grad
    torch.testing.assert_close(got, total, rtol=1e-12, atol=1e-12)


def test_released_test_model_keys_and_bad_state_dicts():
    source = _model("reference")
    state = _released_state(source)
    test_model = {k: v for k, v in state.items() if k != "weight_ce"}
    test_model["resnet101.0.weight"] = torch.zeros(2, 3)  # the released test model's backbone: skipped
    assert isinstance(from_reference(test_model, "CUB", SEEN, n_regions=R), MSDN)
    with pytest.raises(CheckpointError, match="missing key 'W_2_1'"):
        from_reference({k: v for k, v in state.items() if k != "W_2_1"}, "CUB", SEEN)
    with pytest.raises(CheckpointError, match="'W_1_1' has shape"):
        from_reference({**state, "W_1_1": state["W_1_1"].t()}, "CUB", SEEN)
    with pytest.raises(CheckpointError, match="mask_bias"):
        from_reference(state, "CUB", ~SEEN)
    with pytest.raises(CheckpointError, match="unexpected key 'extra'"):
        from_reference({**state, "extra": torch.zeros(1)}, "CUB", SEEN)
    with pytest.raises(CheckpointError, match="CUB, SUN and AWA2"):
        from_reference(state, "imagenet", SEEN)
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        from_reference(state, "CUB", SEEN, gate=True)
    with pytest.raises(ValueError, match="reference-mode"):
        reference_scores(_model("paper"), _features(), training=True)


# ---------------------------------------------------------------------------------------------- layers above
def _msdn_cfg(tiny_cfg: RunConfig, *overrides: str) -> RunConfig:
    return apply_overrides(tiny_cfg, ["model.name=msdn", *overrides])


def test_trained_and_evaluated_through_the_layers_above_the_models(tiny_cfg: RunConfig, tmp_path: Path):
    cfg = _msdn_cfg(tiny_cfg, "eval.protocol=fixed", "train.epochs=2", "model.l_e=0.6",
                    "model.options.lambda_cal=0.2", "train.optimizer=adam")
    result = dedn.train(cfg, run_dir=tmp_path / "run")
    assert 0.0 <= result.metrics.H <= 100.0
    model = dedn.load_weights(result.model_dir / "model.safetensors")
    assert isinstance(model, MSDN) and entry_for(model) is model_entry("msdn")
    assert (model.config.l_e, model.config.l_rc, model.config.settings.lambda_cal) == (0.6, 1.0, 0.2)
    data = load_data(cfg)
    evaluation = evaluate_model(model, data, 0.0, batch_size=64)
    assert set("TUSH") <= set(evaluation.summary())


def test_bad_options_are_refused_before_training(tiny_cfg: RunConfig):
    data = load_data(_msdn_cfg(tiny_cfg))
    with pytest.raises(ConfigError, match=r"model\.options\.gate"):
        build_model(_msdn_cfg(tiny_cfg, "model.options.gate=false"), data)
    with pytest.raises(ConfigError, match=r"model\.options\.lambda_cal"):
        Trainer(_msdn_cfg(tiny_cfg, "model.options.lambda_cal=-1"), data)


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_short_training_beats_chance(tiny_cfg: RunConfig, mode: str):
    cfg = _msdn_cfg(tiny_cfg, f"mode={mode}", "train.epochs=10", "train.lr=0.003", "train.eval_every=0")
    data = load_data(cfg)
    result = Trainer(cfg, data).fit()
    assert result.losses[-1] < result.losses[0]
    model = result.model.eval()
    idx = data.trainval_loc
    with torch.no_grad():
        scores = model(torch.as_tensor(np.asarray(data.features[idx]))).combined()[:, data.seen_mask]
    seen = np.flatnonzero(data.seen_mask)
    accuracy = float(np.mean(seen[scores.argmax(1).numpy()] == data.labels[idx]))
    assert accuracy > 1.6 / seen.size  # chance among the seen classes is 1 / 8
