"""DAZLE: settings per mode and dataset, the forward against its formulas, the losses by hand, released-code
compatibility, and a run through the layers above the models (training, evaluation, model files)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dedn
from dedn.config import RunConfig, apply_overrides
from dedn.errors import CheckpointError, ConfigError
from dedn.factory import build_model, load_data
from dedn.models.compat import (
    from_reference_state_dict,
    load_reference_checkpoint,
    reference_loss,
    reference_scores,
)
from dedn.models.dazle import DAZLE, DAZLEConfig, DAZLEOutput, dazle_loss, loss_terms, resolve_dazle
from dedn.models.dazle_naive import naive_forward
from dedn.models.registry import entry_for, model_entry
from dedn.training.checkpoint import load_weights, save_weights
from dedn.training.trainer import Trainer

D, G, C, H, W, K = 5, 4, 6, 2, 3, 7
SEEN = np.array([True, True, False, True, False, True, False])


def _model(mode: str = "reference", dataset: str | None = "CUB", dtype: torch.dtype = torch.float64,
           randomise: bool = True, **options: object) -> DAZLE:
    """A tiny DAZLE; with ``randomise`` every weight is drawn (W2, W3 start at zero otherwise)."""
    rng = np.random.default_rng(0)
    config = DAZLEConfig(n_attributes=D, semantic_dim=G, n_channels=C, n_regions=H * W,
                         **resolve_dazle(mode, dataset, options))
    torch.manual_seed(0)
    model = DAZLE.from_config(config, rng.normal(size=(D, G)), rng.normal(size=(K, D)), SEEN).to(dtype)
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_()
    return model


def _features(b: int = 3, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(b, C, H, W, generator=torch.Generator().manual_seed(1), dtype=dtype).abs()


# ---------------------------------------------------------------------------------------------- settings
def test_settings_per_mode_and_dataset() -> None:
    ref = {ds: resolve_dazle("reference", ds) for ds in ("CUB", "SUN", "AWA2")}
    assert [ref[ds]["gate"] for ds in ref] == [True, False, True]  # SUN: uniform_att_2
    assert [ref[ds]["normalize_v"] for ds in ref] == [False, False, True]
    assert [ref[ds]["clip_negative_attributes"] for ds in ref] == [False, False, True]
    assert {ref[ds]["lambda_cal"] for ds in ref} == {0.1}
    assert {(r["ce_classes"], r["calibration_margin"], r["calibration_shift"]) for r in ref.values()} == {
        ("all", 1.0, 0.0)}
    paper = resolve_dazle("paper", "sun")
    assert (paper["ce_classes"], paper["calibration_margin"], paper["calibration_shift"], paper["gate"]) == (
        "seen", 0.0, 1.0, False)
    assert resolve_dazle("paper", None) == {**resolve_dazle("paper", "CUB")}
    assert resolve_dazle("paper", "SUN", {"gate": True, "lambda_cal": 0.5})["gate"] is True
    with pytest.raises(ConfigError, match=r"model\.options\.gates: unknown option of dazle"):
        resolve_dazle("paper", "CUB", {"gates": False})
    with pytest.raises(ConfigError, match=r"model\.options\.gate must be true or false, got 'no'"):
        resolve_dazle("paper", "CUB", {"gate": "no"})
    with pytest.raises(ConfigError, match=r"model\.options\.lambda_cal must be"):
        resolve_dazle("paper", "CUB", {"lambda_cal": -1})
    with pytest.raises(ConfigError, match=r"model\.options\.ce_classes must be one of \{seen, all\}"):
        resolve_dazle("paper", "CUB", {"ce_classes": "unseen"})


def test_config_round_trip() -> None:
    config = _model("reference", "AWA2").config
    values = json.loads(json.dumps(config.to_dict()))
    assert DAZLEConfig.from_dict(values) == config
    assert config.l_rc == 1.0 and config.l_e == 1.0
    with pytest.raises(TypeError):
        DAZLEConfig.from_dict({**values, "clusters": []})
    with pytest.raises(ValueError, match="ce_classes"):
        DAZLEConfig.from_dict({**values, "ce_classes": "some"})


# ---------------------------------------------------------------------------------------------- model
def test_initial_weights_and_shapes() -> None:
    rng = np.random.default_rng(3)
    w2v, att = rng.normal(size=(D, G)), rng.normal(size=(K, D))
    config = DAZLEConfig(n_attributes=D, semantic_dim=G, n_channels=C, n_regions=H * W)
    torch.manual_seed(11)
    model = DAZLE.from_config(config, w2v, att, SEEN)
    torch.manual_seed(11)
    w1 = torch.randn(G, C)  # W1 is the only random draw, as in the released constructor
    assert torch.equal(model.attention.W1[0], w1)
    assert model.attention.W1.shape == (1, G, C) and model.attention.W2.shape == (1, G, C)
    assert model.attention.W3 is None and model.W3.shape == (G, C)
    assert not model.attention.W2.any() and not model.W3.any()
    v0 = w2v / np.linalg.norm(w2v, axis=1, keepdims=True)
    np.testing.assert_allclose(model.attention.V.detach().numpy(), v0, rtol=1e-6)
    np.testing.assert_allclose(model.class_att.numpy(), att / np.linalg.norm(att, axis=1, keepdims=True), rtol=1e-6)
    assert torch.equal(model.attribute_order, torch.arange(D)) and torch.equal(model.seen_mask, torch.from_numpy(SEEN))
    names = [n for n, _ in model.named_parameters()]
    assert names == ["W3", "attention.V", "attention.W1", "attention.W2"]
    out = model(_features(dtype=torch.float32))
    assert out.scores.shape == (3, K) and out.o.shape == (3, D)
    assert torch.allclose(out.gate, torch.full_like(out.gate, 0.5))  # W3 = 0: the gate starts at 1/2
    maps = model.attention_maps(_features(dtype=torch.float32))
    assert list(maps) == ["dazle_region"] and maps["dazle_region"].shape == (3, D, H * W)
    assert torch.allclose(maps["dazle_region"], torch.full_like(maps["dazle_region"], 1 / (H * W)))  # W2 = 0


@pytest.mark.parametrize("mode,dataset,options", [
    ("reference", "CUB", {}), ("reference", "SUN", {}), ("reference", "AWA2", {}), ("paper", "CUB", {}),
    ("paper", "AWA2", {"gate": False}),
])
def test_forward_equals_the_formulas(mode: str, dataset: str, options: dict) -> None:
    model = _model(mode, dataset, **options)
    feats = _features()
    fast, slow = model(feats), naive_forward(model, feats)
    for name in ("o", "e", "gate", "scores"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name), rtol=0, atol=1e-10)
    # the same gradients, through every weight
    grads = []
    for out in (model(feats), naive_forward(model, feats)):
        model.zero_grad()
        (out.scores.sin().sum() + out.o.pow(2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert ("W3" in grads[0]) == model.config.gate  # no gate: W3 receives no gradient
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=1e-9)


def test_branches_and_combined_agree_with_the_class_scores() -> None:
    model = _model("reference", "CUB")
    out = model(_features())
    assert list(out.branches()) == ["dazle_o_r"] and list(out.expert_attributes()) == ["dazle"]
    bias = model.calibration_bias()
    torch.testing.assert_close(bias, torch.from_numpy(np.where(SEEN, -1.0, 1.0)))
    torch.testing.assert_close(out.branches()["dazle_o_r"] @ model.class_att.T + bias, out.combined(), rtol=0,
                               atol=1e-12)
    assert torch.equal(out.combined(0.3), out.combined())
    assert not _model("paper", "CUB").calibration_bias().any()


def test_awa2_clips_and_renormalises() -> None:
    model = _model("paper", "AWA2", randomise=False)
    att = torch.tensor([[1.0, -1.0, 2.0, 0.0, -3.0]] * 2)
    model.set_classes(att, np.array([True, False]))
    clipped = torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0], dtype=torch.float64) / math.sqrt(5)
    torch.testing.assert_close(model.class_att[0], clipped)
    assert model.class_att.dtype == torch.float64 and model.class_att.shape == (2, D)
    with torch.no_grad():
        model.attention.V.mul_(3.0)  # normalize_v: the forward uses n(V) whatever V's norm
    a = model(_features())
    with torch.no_grad():
        model.attention.V.div_(3.0)
    torch.testing.assert_close(a.scores, model(_features()).scores)
    with pytest.raises(ValueError, match="class attributes must be"):
        model.set_classes(torch.ones(2, D + 1), np.array([True, False]))
    with pytest.raises(ValueError, match="features must be"):
        model(torch.zeros(1, C + 1, H, W, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- losses
def _out(scores: list[list[float]]) -> DAZLEOutput:
    s = torch.tensor(scores, dtype=torch.float64)
    zeros = torch.zeros(s.shape[0], 1, dtype=torch.float64)
    return DAZLEOutput(o=zeros, e=zeros, gate=zeros, scores=s)


def test_losses_by_hand() -> None:
    seen = torch.tensor([True, True, False])
    out = _out([[1.0, 0.0, 2.0], [0.0, 3.0, 1.0]])
    labels = torch.tensor([0, 1])
    bias = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)  # inside the scores, as the reference model has
    # reference: CE over all K on the scores minus the margin; L_cal on the scores as given
    ref = loss_terms(out, labels, seen, bias, "all", 0.1, 0.0)
    # scores minus the margin: [[2, 1, 1], [1, 4, 0]]
    ce = -(math.log(math.exp(2) / (2 * math.e + math.exp(2))) + math.log(math.exp(4) / (math.e + math.exp(4) + 1))) / 2
    mass = [math.exp(2) / (math.e + 1 + math.exp(2)), math.e / (1 + math.exp(3) + math.e)]
    cal = -math.log(sum(mass) / 2)
    assert ref.items() == pytest.approx({"loss": ce + 0.1 * cal, "ce": ce, "cal": cal}, rel=1e-12)
    # paper: CE over the seen classes only, +1 on the unseen scores inside L_cal only, no margin in the scores
    paper = loss_terms(out, labels, seen, torch.zeros(3, dtype=torch.float64), "seen", 0.5, 1.0)
    ce_p = -(math.log(math.e / (math.e + 1)) + math.log(math.exp(3) / (1 + math.exp(3)))) / 2
    mass_p = [math.exp(3) / (math.e + 1 + math.exp(3)), math.exp(2) / (1 + math.exp(3) + math.exp(2))]
    cal_p = -math.log(sum(mass_p) / 2)
    assert paper.items() == pytest.approx({"loss": ce_p + 0.5 * cal_p, "ce": ce_p, "cal": cal_p}, rel=1e-12)
    # no weight or no unseen class: the term is left out
    assert "cal" not in loss_terms(out, labels, seen, bias, "all", 0.0, 0.0).terms
    assert "cal" not in loss_terms(out, labels, torch.ones(3, dtype=torch.bool), bias, "all", 0.1, 0.0).terms


def test_paper_loss_keeps_falling_as_unseen_scores_rise() -> None:
    """Why paper mode is weak on the built-in benchmark (docs/methods/dazle.md): with the cross-entropy over the
    seen classes nothing in the loss holds the unseen scores of a training image down, so L_cal lowers the loss
    for ever as they rise. With the cross-entropy over all K the loss has a minimum in that direction."""
    seen = torch.tensor([True, True, False, False])
    labels = torch.tensor([0, 1])
    unseen = (~seen).to(torch.float64)
    zero = torch.zeros(4, dtype=torch.float64)

    def loss(ce_classes: str, t: float) -> float:
        out = _out([[3.0, 0.0, 1.0, -1.0], [0.0, 2.0, 0.5, 0.0]])
        out.scores = out.scores + t * unseen  # every unseen score raised by t
        return loss_terms(out, labels, seen, zero, ce_classes, 0.1, 1.0).items()["loss"]

    shifts = [0.0, 2.0, 5.0, 10.0, 20.0]
    paper = [loss("seen", t) for t in shifts]
    assert all(a > b for a, b in itertools.pairwise(paper))  # strictly falling: no finite optimum
    everything = [loss("all", t) for t in shifts]
    assert everything[-1] > everything[0]  # over all K, raising the unseen scores far costs


def test_the_training_loss_reads_the_model_settings() -> None:
    model = _model("paper", "CUB", lambda_cal=0.25)
    out = model(_features())
    labels = torch.tensor([0, 1, 3])
    terms = dazle_loss(model, out, labels, model.seen_mask, loss_settings=object())
    expected = loss_terms(out, labels, model.seen_mask, model.calibration_bias(), "seen", 0.25, 1.0)
    assert terms.items() == expected.items()
    assert model_entry("dazle").loss(model, out, labels, model.seen_mask, None).items() == expected.items()


# ---------------------------------------------------------------------------------------------- released code
def released_state(model: DAZLE, bias: int | None = 1) -> dict[str, torch.Tensor]:
    """A released-layout state dict holding ``model``'s weights (key names and shapes of core/DAZLE.py)."""
    k = model.class_att.shape[0]
    state = {"V": model.attention.V.detach().clone(), "att": model.class_att.clone(),
             "W_1": model.attention.W1[0].detach().clone(), "W_2": model.attention.W2[0].detach().clone(),
             "W_3": model.W3.detach().clone(), "weight_ce": torch.eye(k), "prob_prune": torch.tensor(0)}
    if bias is not None:
        state["bias"] = torch.tensor(bias)
        state["mask_bias"] = torch.from_numpy(np.where(model.seen_mask.numpy(), -1.0, 1.0)[None]).float()
    return state


def _released_scores(state: dict[str, torch.Tensor], feats: torch.Tensor, gate: bool, normalize_v: bool
                     ) -> torch.Tensor:
    """The released forward's S_pp, written out from core/DAZLE.py's einsums."""
    fs = torch.nn.functional.normalize(feats.flatten(2), dim=1)
    v = torch.nn.functional.normalize(state["V"]) if normalize_v else state["V"]
    s = torch.einsum("iv,vf,bfr->bir", v, state["W_1"], fs)
    a = torch.softmax(torch.einsum("iv,vf,bfr->bir", v, state["W_2"], fs), dim=-1)
    f_p = torch.einsum("bir,bfr->bif", a, fs)
    s_p = torch.einsum("bir,bir->bi", a, s)
    a_p = torch.sigmoid(torch.einsum("iv,vf,bif->bi", v, state["W_3"], f_p)) if gate else torch.ones_like(s_p)
    s_pp = torch.einsum("ki,bi,bi->bk", state["att"], a_p, s_p)
    return s_pp + state["mask_bias"] * state["bias"] if "bias" in state else s_pp


@pytest.mark.parametrize("dataset", ["CUB", "SUN", "AWA2"])
def test_released_round_trip_scores_and_loss(dataset: str) -> None:
    source = _model("reference", dataset)
    state = released_state(source)
    model = from_reference_state_dict(state, dataset.lower(), np.flatnonzero(SEEN), model="dazle", n_regions=H * W)
    assert isinstance(model, DAZLE) and entry_for(model).name == "dazle"
    assert model.config == source.config and model.attention.V.dtype == torch.float64
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    feats = _features()
    expected = _released_scores(state, feats, source.config.gate, source.config.normalize_v)
    (scores,) = reference_scores(model, feats, training=True)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(reference_scores(model, feats, training=False)[0], expected, rtol=0, atol=1e-10)
    labels = torch.tensor([0, 1, 3])
    raw = expected - state["mask_bias"] * state["bias"]
    ce = torch.nn.functional.cross_entropy(raw, labels)  # is_conservative: over all K
    cal = -torch.log(torch.softmax(expected, dim=-1)[:, ~torch.from_numpy(SEEN)].sum(-1).mean())
    loss = reference_loss(model, feats, labels)
    torch.testing.assert_close(loss, ce + 0.1 * cal, rtol=0, atol=1e-10)
    torch.testing.assert_close(reference_loss(model, feats, labels, 0.5), ce + 0.5 * cal, rtol=0, atol=1e-10)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n != "W3" or model.config.gate)


def test_released_without_bias_and_with_settings() -> None:
    source = _model("reference", "CUB")
    state = released_state(source, bias=None)
    model = from_reference_state_dict({f"module.{k}": v for k, v in state.items()}, "CUB", SEEN, model="dazle",
                                      gate=False, lambda_cal=0.3, n_regions=H * W)
    assert model.config.calibration_margin == 0.0 and not model.config.gate and model.config.lambda_cal == 0.3
    feats = _features()
    torch.testing.assert_close(reference_scores(model, feats, False)[0], _released_scores(state, feats, False, False),
                               rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="reference-mode DAZLE"):
        reference_scores(_model("paper", "CUB"), feats, False)


def test_released_checkpoint_file(tmp_path: Path) -> None:
    source = _model("reference", "SUN", dtype=torch.float32)
    path = tmp_path / "DAZLE_SUN.pth"
    torch.save(released_state(source), path)
    model = load_reference_checkpoint(path, "SUN", SEEN, model="dazle", n_regions=H * W)
    assert model.config == source.config and not model.config.gate
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_released_errors_name_the_key() -> None:
    good = released_state(_model("reference", "CUB"))
    seen = np.flatnonzero(SEEN)

    def expect(match: str, state: dict, dataset: str = "CUB", **hparams: object) -> None:
        with pytest.raises(CheckpointError, match=match):
            from_reference_state_dict(state, dataset, seen, model="dazle", **hparams)

    expect(r"missing key 'W_3'", {k: v for k, v in good.items() if k != "W_3"})
    expect(r"'W_2' has shape \(4, 5\), expected \(4, 6\)", dict(good, W_2=torch.zeros(G, C - 1)))
    expect(r"'att' has shape \(7, 4\), expected \(\*, 5\)", dict(good, att=torch.zeros(K, D - 1)))
    expect(r"unexpected key 'emb_func\.0\.weight'", dict(good, **{"emb_func.0.weight": torch.zeros(2, 2)}))
    flipped = good["mask_bias"].clone()
    flipped[0, 0] *= -1
    expect("mask_bias", dict(good, mask_bias=flipped))
    expect("weight_ce", dict(good, weight_ce=torch.ones(K, K)))
    expect("CUB, SUN and AWA2", good, "APY")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        from_reference_state_dict(good, "CUB", seen, model="dazle", l_rc=0.5)


# ---------------------------------------------------------------------------------------------- the layers above
def _dazle_cfg(tiny_cfg: RunConfig, *more: str) -> RunConfig:
    return apply_overrides(tiny_cfg, ["model.name=dazle", *more])


def test_build_reads_mode_dataset_and_options(tiny_cfg: RunConfig) -> None:
    data = load_data(tiny_cfg)
    model = build_model(_dazle_cfg(tiny_cfg, "mode=reference", "model.options={gate: false, lambda_cal: 0.2}"), data)
    assert isinstance(model, DAZLE)
    c, h, w = data.feature_shape
    assert (model.config.n_channels, model.config.n_regions, model.config.n_attributes) == (c, h * w, data.n_attributes)
    assert (model.config.mode, model.config.gate, model.config.lambda_cal, model.config.calibration_margin) == (
        "reference", False, 0.2, 1.0)
    awa2 = model_entry("dazle").build(_dazle_cfg(tiny_cfg), data, "AWA2", 0)
    assert awa2.config.normalize_v and awa2.config.clip_negative_attributes
    with pytest.raises(ConfigError, match=r"model\.options\.gait: unknown option of dazle"):
        Trainer(_dazle_cfg(tiny_cfg, "model.options={gait: false}"), data)


def test_trained_through_dedn_train_and_evaluated(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    cfg = _dazle_cfg(tiny_cfg, "eval.protocol=fixed", "train.epochs=2", f"output_dir={tmp_path / 'runs'}")
    result = dedn.train(cfg, run_dir=tmp_path / "run")
    metrics = result.metrics
    assert all(math.isfinite(getattr(metrics, k)) for k in ("T", "U", "S", "H"))
    files = sorted(tmp_path.joinpath("run").rglob("model.safetensors"))
    assert files
    loaded = load_weights(files[0])
    assert isinstance(loaded, DAZLE) and loaded.config.mode == "paper"


def test_model_files_record_dazle(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    model = build_model(_dazle_cfg(tiny_cfg, "model.options={gate: false}"), load_data(tiny_cfg))
    path = tmp_path / "model.safetensors"
    save_weights(model, path, record_hash=True)
    loaded = load_weights(path)
    assert type(loaded) is DAZLE and loaded.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_short_training_beats_chance(tiny_cfg: RunConfig) -> None:
    cfg = _dazle_cfg(tiny_cfg, "train.epochs=40", "train.lr=0.001", "train.eval_every=0")
    result = Trainer(cfg).fit()
    assert result.losses[-1] < result.losses[0]
    n_unseen = int((~load_data(cfg).seen_mask).sum())
    assert result.metrics["T"] > 100.0 / n_unseen  # ZSL accuracy over the unseen classes, in %


@pytest.mark.parametrize("dataset,epochs,balanced,momentum", [
    ("CUB", 20, False, 0.9), ("SUN", 100, True, 0.9), ("AWA2", 20, True, 0.0)])
def test_presets_hold_the_released_hyperparameters(dataset: str, epochs: int, balanced: bool,
                                                   momentum: float) -> None:
    cfg = dedn.load_config(f"dazle-{dataset.lower()}-gzsl")
    assert (cfg.name, cfg.mode, cfg.seed, cfg.model.name, cfg.model.options) == (
        f"dazle-{dataset.lower()}-gzsl", "paper", 214, "dazle", {})
    assert (cfg.data.source, cfg.data.dataset) == ("store", dataset)
    assert (cfg.train.epochs, cfg.train.balanced, cfg.train.momentum) == (epochs, balanced, momentum)
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size) == (
        "rmsprop", 1e-4, 1e-4, 50)
