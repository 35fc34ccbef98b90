"""bf16 precision: fp32 unchanged, bf16 scores and gradients close to float32, on both bf16 code paths.

A CPU without a bf16 matrix unit runs the bf16 products in float32 on bf16-rounded operands ("emulated");
``native`` forces the path that multiplies in bf16 itself (what CUDA and bf16-capable CPUs run), slow here
but exact in what it computes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dedn.models.precision as precision_module
from dedn.config import RunConfig, apply_overrides, load_config
from dedn.errors import ConfigError
from dedn.eval.inference import collect_outputs
from dedn.models.dedn import _ChannelAttention
from dedn.models.precision import round_bf16, run_precision
from dedn.training.trainer import Trainer

from .conftest import run_cli
from .test_model import _model, _run

#: Relative error bounds of bf16 against float32 (max-norm relative, as tests/test_model.py compares):
#: bf16 keeps about 3 significant digits in each product.
SCORE_RTOL = 2e-2
GRAD_RTOL = 5e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(params=["emulated", "native"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(precision_module, "native_bf16", lambda device_type: request.param == "native")
    return request.param


def _batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return torch.rand(5, 10, 2, 2, generator=gen).to(dtype), torch.tensor([0, 3, 7, 1, 2])


def test_fp32_is_the_default_and_unchanged() -> None:
    model = _model("CUB", "paper", torch.float32)
    x, _ = _batch()
    a, b = model(x), model(x, precision="fp32")
    for expert in ("cexp", "fexp"):
        for field in ("o_r", "o_c", "o", "scores"):
            assert torch.equal(getattr(getattr(a, expert), field), getattr(getattr(b, expert), field))
    assert torch.equal(model.prepare_features(x), F.normalize(x.flatten(2), dim=1, eps=1e-12))


@pytest.mark.parametrize("dataset", ["CUB", "AWA2"])
@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_bf16_scores_losses_and_gradients_are_close_to_fp32(dataset: str, mode: str, path: str) -> None:
    model = _model(dataset, mode, torch.float32)
    x, y = _batch()
    fp32 = _run(model, model, x, y)
    bf16 = _run(model, lambda t: model(t, precision="bf16"), x, y)
    for expert in ("cexp", "fexp"):
        for field in ("o_r", "o_c", "o", "scores"):
            got = getattr(getattr(bf16[0], expert), field)
            assert got.dtype == torch.float32, (expert, field)
            assert _rel(got, getattr(getattr(fp32[0], expert), field)) < SCORE_RTOL, (expert, field)
    for name in fp32[1]:
        assert _rel(bf16[1][name], fp32[1][name]) < SCORE_RTOL, name
    assert set(bf16[2]) == set(fp32[2])
    for name, g in bf16[2].items():
        assert g.dtype == torch.float32, name  # master weights and their gradients stay float32
        assert _rel(g, fp32[2][name]) < GRAD_RTOL, name


def test_bf16_features_from_float16_maps_are_rounded_once() -> None:
    model = _model("AWA2", "paper", torch.float32)
    x, _ = _batch()
    x[0, :, 0, 0] = 0  # an all-zero region vector stays zero, not NaN
    half = x.half()
    got = model.prepare_features(half, "bf16")
    want = F.normalize(half.float().flatten(2), dim=1, eps=1e-12)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got.float()).all()
    assert torch.equal(got, want.to(torch.bfloat16))  # norm in float32, one rounding to bf16
    assert torch.equal(model.prepare_features(x, "bf16"), model.prepare_features(x).to(torch.bfloat16))


def _channel_case(seed: int, b: int, c: int, r: int, d: int):
    """Features, M3, M4, and ``run(features)``: the channel attention's output and its gradients for M3, M4."""
    gen = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.rand(b, c, r, generator=gen), dim=1)
    m3 = torch.randn(d, r, generator=gen, requires_grad=True)
    m4 = (0.5 * torch.randn(d, r, generator=gen)).requires_grad_()
    grad_out = torch.randn(b, d, generator=gen)

    def run(f: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = _ChannelAttention.apply(m3, m4, f)
        return (out.detach(), *torch.autograd.grad(out, (m3, m4), grad_out))

    return feats, m3, m4, run


def test_channel_attention_bf16_path_matches_float32() -> None:
    feats, m3, m4, run = _channel_case(0, 7, 32, 5, 9)
    want = run(feats)
    got = run(feats.bfloat16())
    for w, g in zip(want, got, strict=True):
        assert g.dtype == torch.float32
        assert _rel(g, w) < GRAD_RTOL
    with torch.no_grad():  # no gradient: the same output
        assert torch.equal(_ChannelAttention.apply(m3, m4, feats.bfloat16()), got[0])


def test_round_bf16_rounds_values_and_passes_gradients() -> None:
    x = torch.randn(50, dtype=torch.float32, requires_grad=True)
    y = round_bf16(x, torch.float32)
    assert torch.equal(y.detach(), x.detach().bfloat16().float())
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, torch.ones_like(x))
    assert round_bf16(x, torch.bfloat16).dtype == torch.bfloat16


def test_precision_checks() -> None:
    with pytest.raises(ConfigError, match=r"train\.precision must be one of \{fp32, bf16\}, got .fp16."):
        load_config(None, ["train.precision=fp16"])
    assert load_config(None, ["train.precision=bf16"]).train.precision == "bf16"
    with pytest.raises(ConfigError, match="train.precision=bf16 needs train.dtype=float32"):
        run_precision("bf16", "float64")
    with pytest.raises(ValueError, match="precision"):
        _model("AWA2", "paper", torch.float32)(_batch()[0], precision="fp16")
    with pytest.raises(ValueError, match="float32 model"):
        _model("AWA2", "paper", torch.float64)(_batch(torch.float64)[0], precision="bf16")


def test_bf16_training_and_evaluation(tiny_cfg: RunConfig) -> None:
    cfg = apply_overrides(tiny_cfg, ["train.epochs=2", "train.eval_every=0"])
    fp32 = Trainer(cfg).fit()
    bf16_trainer = Trainer(apply_overrides(cfg, ["train.precision=bf16"]))
    bf16 = bf16_trainer.fit()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in bf16.model.parameters())
    np.testing.assert_allclose(bf16.losses, fp32.losses, rtol=2e-2)
    assert abs(bf16.metrics["H"] - fp32.metrics["H"]) <= 10.0  # percent; same run, bf16 products
    # evaluation follows the run's precision: the outputs are the bf16 ones, close to float32's
    data, model = bf16_trainer.data, bf16.model
    idx = data.test_unseen_loc
    ours = collect_outputs(model, data.features, idx, batch_size=cfg.eval.batch_size, precision="bf16").branches
    ref = collect_outputs(model, data.features, idx, batch_size=cfg.eval.batch_size).branches
    got = bf16_trainer.evaluate().unseen.branches
    for name in ref:
        np.testing.assert_array_equal(got[name], ours[name])
        assert _rel(torch.from_numpy(got[name]), torch.from_numpy(ref[name])) < SCORE_RTOL, name


@pytest.mark.parametrize("args", [["bench", "--precision", "fp16"],
                                  ["eval", "--run", "no-such-run", "--precision", "fp16"],
                                  ["predict", "--run", "no-such-run", "--precision", "fp16", "x.png"]])
def test_cli_refuses_an_unknown_precision(args: list[str], monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and "--precision must be one of" in err, err


def test_cli_eval_takes_the_runs_precision_or_the_option(tiny_overrides: list[str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--run-dir", str(run), *tiny_overrides, "train.epochs=2", "eval.protocol=fixed",
                            "train.precision=bf16"], monkeypatch, capsys)
    assert code == 0, err
    found = {}
    for name, extra in (("default", []), ("fp32", ["--precision", "fp32"])):
        code, _, err = run_cli(["eval", "--run", str(run), "--out", str(tmp_path / name), *extra], monkeypatch,
                               capsys)
        assert code == 0, err
        found[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert found["default"]["precision"] == "bf16" and found["fp32"]["precision"] == "fp32"
    assert abs(found["default"]["H"] - found["fp32"]["H"]) <= 10.0


def test_bf16_runs_read_a_float16_store_batch_straight_to_bf16(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    from dedn.data.store import store_zsldata
    from dedn.factory import load_data

    store = store_zsldata(tmp_path / "store", load_data(tiny_cfg))
    cfg = apply_overrides(tiny_cfg, ["data.source=store", f"data.path={tmp_path / 'store'}"])
    index = np.array([7, 3, 3, 0])
    batch = Trainer(apply_overrides(cfg, ["train.precision=bf16"]))._host_batch(index)
    assert batch.dtype == torch.bfloat16  # converted once, in the batch reader
    half = store.read(index, stored_dtype=True)
    assert half.dtype == torch.float16 and torch.equal(batch, half.to(torch.bfloat16))
    assert Trainer(cfg)._host_batch(index).dtype == torch.float32
    with pytest.raises(IndexError):
        store.take(np.array([len(store)]))
    trainer = Trainer(apply_overrides(cfg, ["train.precision=bf16"]))
    assert np.isfinite(trainer.train_step(index)["loss"])


def test_channel_attention_batched_path_equals_the_loop_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched layout (what a GPU runs in float32, and bf16 everywhere) computes the per-image loop's
    output and gradients; here both in float32 on the CPU."""
    c, d = 24, 10
    feats, _, _, run = _channel_case(1, 6, c, 7, d)
    assert not _ChannelAttention.batched(feats)
    loop = run(feats)
    monkeypatch.setattr(_ChannelAttention, "batched", staticmethod(lambda f: True))
    for a, w in zip(run(feats), loop, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-6)


def test_a_bf16_step_converts_each_weight_and_the_batch_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion budget of one bf16 training step (trainer's batch conversion, forward, loss, backward,
    optimizer) on a small CUB-like shape: about one conversion per weight tensor each way and one per feature
    batch. The products' weights (M1, M2 stacked; M3; M4) are rounded once and their gradients converted back
    once; the batch goes from float16 to bf16 once; the rest are (B, D) scores and (B, K) labels. Nothing the
    size of the features times the attributes is converted (the channel attention used to convert its logits,
    attention and scores per chunk), so no conversion is larger than the largest weight or the batch."""
    from dedn.apps.bench import BenchShape, _make_step, _setup
    from dedn.apps.stepprofile import profile_step

    monkeypatch.setattr(precision_module, "native_bf16", lambda device_type: True)  # the same path on any CPU
    shape = BenchShape("small", 64, 4, 4, 312, 20, 5, semantic_dim=30, dataset="CUB")
    s = _setup(shape, 8, torch.float32, torch.device("cpu"), "paper", 0)
    half = s.features.half()
    batch = half.to(torch.bfloat16)
    step = _make_step(s, lambda m, x: m(x, precision="bf16"), batch)
    step()  # the optimizer's state is made on its first step

    def trainer_step() -> None:
        batch.copy_(half)  # the batch reader's one conversion, float16 -> bf16
        step()

    prof = profile_step(trainer_step)
    d_all, c, r = 2 * shape.n_attributes, shape.n_channels, shape.n_regions
    weights = 2 * d_all * c + 2 * d_all * r  # M1 M2 stacked, M3, M4 of both experts
    small = 8 * d_all + 8 * shape.n_classes + shape.n_classes  # scores, one-hot labels, seen mask
    n_weight_tensors = len(list(s.model.parameters()))
    assert prof.conversion_count <= 2 * n_weight_tensors + 1
    # bf16 <-> float32 moves 6 bytes an element, float16 -> bf16 4, int64 -> float32 12
    budget = 2 * 6 * weights + 4 * half.numel() + 12 * 4 * small
    assert prof.bytes_converted <= budget, (prof.bytes_converted, budget)
    assert prof.largest_conversion_bytes <= 6 * max(2 * d_all * c, half.numel())
    assert prof.seconds["conversions"] <= prof.total_seconds
