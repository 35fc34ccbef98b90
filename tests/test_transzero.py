"""TransZero: settings, the forward pass against its naive form, losses by hand, released-checkpoint compatibility,
training on the synthetic benchmark, and a run through the layers above the models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dedn
from dedn.apps.explain import region_attention
from dedn.config import load_config
from dedn.errors import CheckpointError, ConfigError
from dedn.factory import build_model, load_data
from dedn.models import compat
from dedn.models.registry import model_entry
from dedn.models.transzero import (
    BRANCH,
    TransZero,
    TransZeroConfig,
    TransZeroOutput,
    relative_geometry,
    resolve_settings,
    transzero_loss,
)
from dedn.models.transzero_method import default_gamma, released_state_dict
from dedn.models.transzero_naive import naive_forward
from dedn.training.trainer import Trainer
from tests.conftest import TINY

D, G, C, K = 5, 4, 6, 7
SEEN = np.array([1, 1, 1, 0, 0, 1, 0], dtype=bool)
SMALL = {"common_dim": 8, "feedforward_dim": 16}


def _model(mode: str = "reference", dataset: str | None = "CUB", grid: tuple[int, int] = (2, 3),
           seed: int = 0, **options) -> TransZero:
    settings = resolve_settings(mode, dataset, {**SMALL, **options})
    config = TransZeroConfig(n_attributes=D, semantic_dim=G, n_channels=C, grid=grid, **settings)
    rng = np.random.default_rng(1)
    torch.manual_seed(seed)
    return TransZero.from_config(config, rng.random((D, G)), rng.random((K, D)) - 0.3, SEEN)


def _perturbed(model: TransZero) -> TransZero:
    """Float64, evaluation mode, every weight moved off its initial value (biases and LayerNorms included)."""
    model = model.double().eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


# ---------------------------------------------------------------------------------------------- settings
def test_settings_per_dataset_and_mode() -> None:
    cub, sun, awa2 = (resolve_settings("reference", ds) for ds in ("CUB", "SUN", "AWA2"))
    assert (cub["common_dim"], cub["feedforward_dim"], cub["dropout"], cub["lambda_sc"], cub["lambda_ar"]) == (
        300, 512, 0.4, 0.3, 0.005)
    assert (sun["common_dim"], sun["feedforward_dim"], sun["self_attention"], sun["aux_embed"]) == (128, 2048, False,
                                                                                                      False)
    assert (awa2["normalize_v"], awa2["lambda_sc"], awa2["clip_negative_attributes"]) == (True, 2.0, True)
    assert (cub["attention_dropout"], cub["calibration_margin"], cub["box_plus_one"], cub["double_residual"]) == (
        0.1, 1.0, True, True)
    paper = resolve_settings("paper", "AWA2")
    assert (paper["attention_dropout"], paper["calibration_margin"], paper["box_plus_one"], paper["double_residual"],
            paper["aux_embed"], paper["clip_negative_attributes"]) == (0.5, 0.0, False, False, False, False)
    assert resolve_settings("paper", None)["common_dim"] == 300  # other data: CUB's values
    assert resolve_settings("paper", "cub", {"lambda_sc": 0.5})["lambda_sc"] == 0.5


def test_bad_options_name_their_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.options\.gate is not an option of transzero"):
        resolve_settings("paper", "CUB", {"gate": False})
    with pytest.raises(ConfigError, match=r"model\.options\.dropout must be a finite number in \[0, 1\)"):
        resolve_settings("paper", "CUB", {"dropout": 1.0})
    with pytest.raises(ConfigError, match=r"model\.options\.common_dim must be an integer >= 1, got 2\.5"):
        resolve_settings("paper", "CUB", {"common_dim": 2.5})
    with pytest.raises(ConfigError, match=r"model\.options\.self_attention must be true or false"):
        resolve_settings("paper", "CUB", {"self_attention": "yes"})


def test_config_round_trip() -> None:
    config = _model().config
    assert TransZeroConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert (config.n_regions, config.n_clusters, config.attribute_order) == (6, 1, list(range(D)))
    with pytest.raises(ValueError, match="grid"):
        TransZeroConfig(n_attributes=D, semantic_dim=G, n_channels=C, grid=(0, 3))


# ---------------------------------------------------------------------------------------------- model
def test_initial_weights_and_shapes() -> None:
    a, b = _model(seed=4), _model(seed=4)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name  # the seed fixes every draw
    assert not torch.equal(a.W1, _model(seed=5).W1)
    assert a.W1.shape == (G, 8) and a.embed_cv.weight.shape == (8, C) and a.embed_attr.weight.shape == (8, G)
    torch.testing.assert_close(a.V.norm(dim=1), torch.ones(D))
    for layer in (a.encoder.fc_q, a.encoder.fc_k, a.encoder.fc_v, a.encoder.fc_o):
        assert torch.equal(layer.bias, torch.zeros(8)) and layer.weight.abs().max() <= math.sqrt(6 / 16)
    assert a.geometry.weight.shape == (1, 64)
    assert torch.equal(a.attribute_order, torch.arange(D))
    torch.testing.assert_close(a.class_att.norm(dim=1), torch.ones(K))
    # reference mode keeps the released unused layer and second LayerNorm; paper mode has neither
    assert a.embed_cv_aux is not None and a.encoder.residual_norm is not None
    paper = _model("paper")
    assert paper.embed_cv_aux is None and paper.encoder.residual_norm is None
    assert _model(dataset="SUN").embed_cv_aux is None


def test_awa2_reference_clips_negative_class_attributes() -> None:
    att = torch.tensor([[0.5, -1.0, 0.5, 0.0, 0.0]] * K)
    ref, paper = _model(dataset="AWA2"), _model("paper", "AWA2")
    torch.testing.assert_close(ref.scored_class_att(att)[0], torch.tensor([1, 0, 1, 0, 0]) / math.sqrt(2))
    torch.testing.assert_close(paper.scored_class_att(att)[0], att[0] / att[0].norm())


@pytest.mark.parametrize(("mode", "dataset", "grid"), [("reference", "CUB", (2, 3)), ("reference", "AWA2", (3, 2)),
                                                        ("paper", "SUN", (2, 2)), ("paper", None, (1, 3))])
def test_fast_forward_equals_the_naive_formulas(mode: str, dataset: str | None, grid: tuple[int, int]) -> None:
    model = _perturbed(_model(mode, dataset, grid))
    x = torch.rand(3, C, *grid, dtype=torch.float64)
    fast, slow = model(x), naive_forward(model, x)
    torch.testing.assert_close(fast.o, slow.o, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast.scores, slow.scores, rtol=0, atol=1e-10)
    torch.testing.assert_close(model(x.flatten(2)).scores, fast.scores, rtol=0, atol=0)  # (B, C, R) input


def test_geometry_embedding_by_hand() -> None:
    # a 1 x 2 grid: cells (0, 0) and (0, 1); both centres at x = 1/2, y = 1/4 and 3/4; box 1 x 1/2
    emb = relative_geometry((1, 2), box_plus_one=False, dtype=torch.float64)
    freqs = [1000.0 ** (-k / 8) for k in range(8)]
    dx, dy = math.log(1e-3), math.log(0.5 / 0.5)
    angles = [100 * o * f for o in (dx, dy, 0.0, 0.0) for f in freqs]
    expected = torch.tensor([math.sin(a) for a in angles] + [math.cos(a) for a in angles], dtype=torch.float64)
    torch.testing.assert_close(emb[0, 1], expected, rtol=0, atol=1e-12)
    # the released box size 1/h + 1: |dy| / (1/2 + 1)
    plus = relative_geometry((1, 2), box_plus_one=True, dtype=torch.float64)
    assert plus[0, 1, 8] == pytest.approx(math.sin(100 * math.log(0.5 / 1.5)), abs=1e-12)
    assert emb.shape == (2, 2, 64) and emb.device.type == "cpu"  # no GPU needed


def test_scores_branches_and_calibration() -> None:
    model = _model().eval()
    out = model(torch.rand(2, C, 2, 3))
    assert list(out.branches()) == [BRANCH] and list(out.expert_attributes()) == ["transzero"]
    bias = model.calibration_bias()
    assert torch.equal(bias, torch.where(torch.as_tensor(SEEN), -1.0, 1.0))
    torch.testing.assert_close(out.scores, out.branches()[BRANCH] @ model.class_att.T + bias)
    assert torch.equal(out.combined(), out.scores) and torch.equal(out.combined(l_e=0.1), out.scores)
    assert torch.equal(_model("paper").calibration_bias(), torch.zeros(K))
    with pytest.raises(ValueError, match=r"features must be \(B, 6, h, w\) with h\*w = 6"):
        model(torch.rand(2, C, 7))


def test_default_calibration_per_mode() -> None:
    paper = load_config(None, [*TINY, "model.name=transzero"])
    reference = load_config(None, [*TINY, "model.name=transzero", "mode=reference"])
    assert (default_gamma(paper, "CUB"), default_gamma(reference, "CUB")) == (2.0, 0.0)
    assert model_entry("transzero").default_gamma(reference, None) == 0.0


def test_set_classes_changes_no_weight() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.named_parameters()}
    model.set_classes(np.eye(3, D), np.array([True, False, False]))
    assert model.class_att.shape == (3, D) and model.calibration_bias().tolist() == [-1.0, 1.0, 1.0]
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in before.items())
    assert model(torch.rand(2, C, 6)).scores.shape == (2, 3)


def test_attention_maps_are_distributions_over_regions() -> None:
    model = _model()  # training mode: the maps are still computed without dropout
    maps = model.attention_maps(torch.rand(2, C, 2, 3))
    assert list(maps) == ["transzero_region"] and maps["transzero_region"].shape == (2, D, 6)
    torch.testing.assert_close(maps["transzero_region"].sum(-1), torch.ones(2, D))
    assert model.training


def test_bf16_precision_rounds_the_features_only() -> None:
    model = _model().eval()
    x = torch.rand(2, C, 6)
    torch.testing.assert_close(model(x, precision="bf16").scores, model(x.bfloat16().float()).scores)


# ---------------------------------------------------------------------------------------------- losses
def test_loss_by_hand() -> None:
    model = _model()
    model.set_classes(np.array([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [0, 0, 3.0, 4.0, 0]]),
                      np.array([True, True, False]))
    o = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0, 1.0]])
    out = TransZeroOutput(o=o, scores=o @ model.class_att.T + model.calibration_bias())
    labels = torch.tensor([0, 1])
    terms = transzero_loss(model, out, labels, model.seen_mask)
    raw = [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]  # o Z^T, Z = [e1, e2, (0, 0, .6, .8, 0)]
    ce = -(math.log(math.e / (math.e + 2)) + math.log(math.e ** 2 / (math.e ** 2 + 2))) / 2
    shifted = [[0.0, -1.0, 1.0], [-1.0, 1.0, 1.0]]  # the margin inside: seen -1, unseen +1
    unseen_mass = [math.exp(s[2]) / sum(math.exp(v) for v in s) for s in shifted]
    cal = -math.log(sum(unseen_mass) / 2)
    ar = ((0.0) + (1.0 + 1.0)) / 10  # (e - z_y)^2 over 2 x 5 entries: image 2 has (2 - 1)^2 + 1^2
    items = terms.items()
    assert torch.allclose(out.scores - model.calibration_bias(), torch.tensor(raw))
    assert items["ce"] == pytest.approx(ce) and items["cal"] == pytest.approx(cal)
    assert items["ar"] == pytest.approx(ar)
    assert items["loss"] == pytest.approx(ce + 0.3 * cal + 0.005 * ar)
    # no unseen class: no self-calibration term
    assert "cal" not in transzero_loss(model, out, labels, torch.ones(3, dtype=torch.bool)).items()


# ---------------------------------------------------------------------------------------------- released code
def _released(dataset: str = "CUB", **options) -> tuple[TransZero, dict[str, torch.Tensor]]:
    model = _perturbed(_model("reference", dataset, grid=(14, 14), **options))
    return model, released_state_dict(model)


@pytest.mark.parametrize("dataset", ["CUB", "SUN", "AWA2"])
def test_released_state_dict_round_trip(dataset: str) -> None:
    model, state = _released(dataset)
    assert ("transformer.embed_cv_aux.0.weight" in state) == (dataset != "SUN")
    assert state["transformer.transformer_encoder.WGs.0.weight"].shape == (1, 64)
    assert state["bias"].dtype == torch.int64 and state["mask_bias"].shape == (1, K)
    loaded = compat.from_reference_state_dict(state, dataset, np.flatnonzero(SEEN), model="transzero")
    assert loaded.config == model.config
    for name, p in model.named_parameters():
        assert torch.equal(p, dict(loaded.named_parameters())[name]), name
    x = torch.rand(2, C, 14, 14, dtype=torch.float64)
    (scores,) = compat.reference_scores(loaded, x, training=False)
    torch.testing.assert_close(scores, model(x).scores, rtol=0, atol=1e-12)
    assert loaded.training  # its state before the call (a new module trains), restored


def test_reference_scores_and_loss_follow_the_formulas() -> None:
    model, state = _released("AWA2")
    loaded = compat.from_reference_state_dict({f"module.{k}": v for k, v in state.items()}, "AWA2", SEEN,
                                              model="transzero", lambda_sc=0.5)
    assert loaded.config.lambda_sc == 0.5 and loaded.config.normalize_v
    x, labels = torch.rand(4, C, 196, dtype=torch.float64), np.array([0, 1, 2, 5])
    torch.manual_seed(9)
    loss = compat.reference_loss(loaded, x, labels)
    torch.manual_seed(9)  # the same dropout draws
    loaded.train()
    out = loaded(x)
    y = torch.as_tensor(labels)
    raw = out.scores - loaded.calibration_bias()
    unseen = torch.softmax(out.scores, dim=-1)[:, ~torch.as_tensor(SEEN)].sum(-1).mean()
    expected = (F.cross_entropy(raw, y) - 0.5 * torch.log(unseen)
                + 0.0005 * ((out.o - loaded.class_att[y]) ** 2).mean())
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.manual_seed(9)
    (train_scores,) = compat.reference_scores(loaded, x, training=True)
    torch.testing.assert_close(train_scores, out.scores, rtol=0, atol=1e-12)


def test_bad_released_state_dicts_are_refused() -> None:
    _, good = _released()
    seen = np.flatnonzero(SEEN)

    def expect(match: str, state: dict, dataset: str = "CUB", **kw) -> None:
        with pytest.raises(CheckpointError, match=match):
            compat.from_reference_state_dict(state, dataset, seen, model="transzero", **kw)

    expect("missing key 'W_1'", {k: v for k, v in good.items() if k != "W_1"})
    expect(r"unexpected key 'transformer\.extra'", {**good, "transformer.extra": torch.zeros(1)})
    expect(r"'transformer\.embed_attr\.0\.weight' has shape \(8, 3\), expected \(8, 4\)",
           {**good, "transformer.embed_attr.0.weight": torch.zeros(8, 3, dtype=torch.float64)})
    expect("'mask_bias'", {**good, "mask_bias": -good["mask_bias"]})
    expect("'weight_ce' is not the identity", {**good, "weight_ce": 2 * good["weight_ce"]})
    expect("for CUB, SUN and AWA2", good, dataset="APY")
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        compat.from_reference_state_dict(good, "CUB", seen, model="transzero", l_rc=0.5)
    with pytest.raises(ValueError, match="reference-mode model"):
        compat.reference_scores(_model("paper"), torch.rand(1, C, 6), training=False)


# ---------------------------------------------------------------------------------------------- training
def _tiny(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY, f"output_dir={tmp_path / 'runs'}", "model.name=transzero",
                              "model.options.common_dim=16", "model.options.feedforward_dim=32",
                              "model.options.dropout=0.1", *extra])


def test_presets_load_and_build() -> None:
    expected = {"cub": ("adam", 200, False, 5), "sun": ("sgd", 400, True, 6), "awa2": ("sgd", 200, True, 17)}
    for name, (optimizer, epochs, balanced, seed) in expected.items():
        cfg = load_config(f"transzero-{name}-gzsl")
        assert (cfg.model.name, cfg.mode, cfg.data.dataset) == ("transzero", "paper", name.upper())
        assert (cfg.train.optimizer, cfg.train.epochs, cfg.train.balanced, cfg.seed) == (optimizer, epochs,
                                                                                          balanced, seed)
        assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.batch_size) == (1e-4, 1e-4, 50)
    assert load_config("transzero-sun-gzsl").train.momentum == 0.9
    assert load_config("transzero-awa2-gzsl").train.momentum == 0.0


def test_build_from_the_run_checks_options_first(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path)
    data = load_data(cfg)
    model = build_model(cfg, data)
    assert isinstance(model, TransZero) and model.config.common_dim == 16
    assert (model.config.l_rc, model.config.l_e, model.config.grid) == (1.0, 1.0, (3, 3))
    with pytest.raises(ConfigError, match=r"model\.options\.heads is not an option"):
        build_model(_tiny(tmp_path, "model.options.heads=2"), data)


def test_short_training_beats_chance(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, "train.epochs=8", "train.iters_per_epoch=6", "train.lr=0.003",
                "train.optimizer=adam", "train.eval_every=0")
    result = Trainer(cfg).fit()
    assert result.losses[-1] < result.losses[0]
    # T: unseen images among the 4 unseen classes, chance 1/4 (a few steps are too few for the seen classes to
    # win against the calibration, so S and H stay near 0 here)
    assert result.metrics["T"] > 1.4 * 100 / 4


def test_trained_and_evaluated_through_the_layers_above_the_models(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path, "train.epochs=2", "eval.protocol=fixed", "eval.plots=false", "mode=reference")
    result = dedn.train(cfg, run_dir=tmp_path / "run")
    assert {"T", "S", "U", "H"} <= set(result.metrics.to_dict())
    model = dedn.load_weights(result.model_dir / "model.safetensors")
    assert isinstance(model, TransZero) and model.config.mode == "reference"
    again = dedn.evaluate_model(model, load_data(cfg), gamma=0.0).summary()  # reference mode's default: 0
    metrics = result.metrics.to_dict()
    assert (again["T"], again["S"], again["U"]) == pytest.approx((metrics["T"], metrics["S"], metrics["U"]))
    # prediction and explanation read the run's model generically
    predictor = dedn.Predictor.from_run(tmp_path / "run")
    x = torch.rand(2, 16, 3, 3)
    top = predictor.predict_features(x, top_k=2)[0].top
    assert len(top) == 2 and top[0].index == int(model.eval()(x).scores[0].argmax())
    assert region_attention(predictor.model, x)["transzero"].shape == (2, 12, 3, 3)
