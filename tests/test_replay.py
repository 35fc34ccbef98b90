"""``train.rng=released``: the released code's initial draws, batches and schedule, draw for draw.

Every expectation here is written out by hand the way the released scripts draw (``torch.manual_seed`` then
``torch.randn`` per weight, ``np.random.seed`` then ``np.random.choice``), independently of dedn's code.
"""
# ruff: noqa: NPY002  (the released code's legacy global numpy generator is what these tests spell out)

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dedn.config import ConfigError, apply_overrides, load_config
from dedn.factory import build_model, load_data
from dedn.models.compat import reference_loss
from dedn.training.released import released_schedule
from dedn.training.trainer import Trainer
from tests.conftest import interrupted_at_step, run_cli

LAYOUTS = {"CUB": (312, 200, True), "SUN": (102, 717, False), "AWA2": (85, 50, True)}  # D, K, balanced
SEED = 7
G, C, H, W, LOW_RANK = 6, 8, 2, 2, 3


def _cfg(dataset: str, *extra: str):
    d, k, balanced = LAYOUTS[dataset]
    return load_config(None, [
        "mode=reference", "train.rng=released", "eval.protocol=fixed", f"seed={SEED}", f"data.dataset={dataset}",
        f"data.synthetic.n_attributes={d}", f"data.synthetic.n_classes={k}", f"data.synthetic.n_unseen={k // 4}",
        f"data.synthetic.n_images={3 * k}", f"data.synthetic.n_channels={C}", f"data.synthetic.height={H}",
        f"data.synthetic.width={W}", f"data.synthetic.semantic_dim={G}", "model.clusters=reference",
        f"train.balanced={str(balanced).lower()}", "train.progress=false", "eval.batch_size=512",
        *([f"model.low_rank={LOW_RANK}"] if dataset == "SUN" else []), *extra])


def _released_init(dataset: str, cluster_sizes: list[int]) -> list[torch.Tensor]:
    """The released model's random weights: torch.randn per weight, cExp first, then fExp's sub-networks."""
    torch.manual_seed(SEED)
    draws = []
    for _ in [sum(cluster_sizes), *cluster_sizes]:
        if dataset == "SUN":
            draws += [torch.randn(G, LOW_RANK), torch.randn(LOW_RANK, C), torch.randn(G, H * W)]  # H1, H3, W3
        else:
            draws += [torch.randn(G, C), torch.randn(G, H * W)]  # W1, W3
    return draws


def _model_draws(model, dataset: str) -> list[torch.Tensor]:
    out = []
    for name in ("cexp", "fexp"):
        e = model.experts[name]
        for q in range(e.n_clusters):
            out += [e.H1[q], e.H3[q], e.W3[q]] if dataset == "SUN" else [e.W1[q], e.W3[q]]
    return out


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_initial_weights_follow_the_released_draw_order(dataset: str) -> None:
    trainer = Trainer(_cfg(dataset))
    model = trainer.model
    expected = _released_init(dataset, model.config.cluster_sizes)
    got = _model_draws(model, dataset)
    assert len(got) == len(expected) == (3 if dataset == "SUN" else 2) * (1 + len(model.config.cluster_sizes))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.detach(), b)
    for name in ("cexp", "fexp"):  # W2, W4 start at zero, V at the normalised semantic vectors
        e = model.experts[name]
        assert not e.W2.detach().any() and not e.W4.detach().any()
    if dataset == "CUB":  # the released clusters: seven sub-networks drawn, cExp and six of fExp
        assert model.config.cluster_sizes == [112, 87, 24, 40, 15, 34]


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_first_batches_are_the_released_draws(dataset: str) -> None:
    cfg = _cfg(dataset)
    trainer = Trainer(cfg)
    data, b = trainer.data, cfg.train.batch_size
    tv = data.trainval_loc
    got = [batch for seg in trainer.schedule[:6] for batch in trainer.sampler.segment(seg)][:5]
    if LAYOUTS[dataset][2]:  # balanced: numpy's global generator, as np.random.seed and np.random.choice
        np.random.seed(SEED)
        tv_labels = data.labels[tv]
        classes = np.unique(tv_labels)
        want = []
        for _ in range(5):
            picked = np.random.choice(classes.size, min(classes.size, b), replace=False)
            per = max(b // classes.size, 1)
            want.append(tv[np.concatenate([np.random.choice(np.where(tv_labels == classes[c])[0], per)
                                           for c in picked])])
    else:  # plain: torch.randperm on the generator that drew the initial weights
        _released_init(dataset, trainer.model.config.cluster_sizes)
        want = [tv[torch.randperm(tv.size)[:b].numpy()] for _ in range(5)]
    for a, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, w)
    # A later segment drawn first (a resumed run) fast-forwards to the same batches.
    fresh = Trainer(cfg).sampler
    third = trainer.schedule[2]
    np.testing.assert_array_equal(fresh.segment(third)[0], trainer.sampler.segment(third)[0])


@pytest.mark.parametrize("dataset", sorted(LAYOUTS))
def test_parameters_after_steps_are_the_released_run(dataset: str) -> None:
    steps = 4
    cfg = _cfg(dataset, f"train.max_iters={steps}")
    trainer = Trainer(cfg)
    result = trainer.fit()

    # By hand: the released initial weights, batches and RMSprop on the released loss.
    data = load_data(cfg)
    model = build_model(cfg, data)
    with torch.no_grad():
        for t, v in zip(_model_draws(model, dataset), _released_init(dataset, model.config.cluster_sizes), strict=True):
            t.copy_(v)
    tv = data.trainval_loc
    b = cfg.train.batch_size
    if LAYOUTS[dataset][2]:
        np.random.seed(SEED)
        tv_labels = data.labels[tv]
        classes = np.unique(tv_labels)

        def draw() -> np.ndarray:
            picked = np.random.choice(classes.size, min(classes.size, b), replace=False)
            per = max(b // classes.size, 1)
            return tv[np.concatenate([np.random.choice(np.where(tv_labels == classes[c])[0], per) for c in picked])]
    else:
        def draw() -> np.ndarray:
            return tv[torch.randperm(tv.size)[:b].numpy()]
    t = cfg.train
    opt = torch.optim.RMSprop(model.parameters(), lr=t.lr, alpha=t.alpha, eps=t.eps, weight_decay=t.weight_decay,
                              momentum=t.momentum)
    for _ in range(steps):
        idx = draw()
        x = torch.as_tensor(np.asarray(data.features[idx], dtype=np.float32))
        opt.zero_grad()
        reference_loss(model, x, torch.as_tensor(data.labels[idx]), cfg.loss, dataset).backward()
        opt.step()
    want = dict(model.named_parameters())
    for name, p in result.model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name].detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_schedule_counts_and_places_the_evaluations() -> None:
    for n, epochs, evals in ((7057, 80, 81), (10320, 80, 81), (23527, 20, 21)):  # CUB, SUN, AWA2 trainval
        niters = n * epochs // 50
        period = niters // epochs
        segments = released_schedule(n, epochs, 50)
        assert sum(s.steps for s in segments) == niters
        ends = [s.start + s.steps - 1 for s in segments if s.evaluate]
        assert ends == [i for i in range(niters) if i % period == 0]
        assert len(ends) == evals and ends[0] == 0
        assert all(s.start == prev.start + prev.steps for prev, s in zip(segments, segments[1:], strict=False))
    assert released_schedule(7057, 80, 50)[-1].steps == 11291 - 1 - 80 * 141  # the steps after the last one
    with pytest.raises(ConfigError, match="less than one batch"):
        released_schedule(30, 10, 50)


def test_a_replay_evaluates_on_the_released_schedule_and_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    from tests.conftest import run_trainer as train

    cfg = _cfg("CUB", "train.epochs=2", "eval.plots=false")  # 360 trainval images: 14 iterations, period 7
    data = load_data(cfg)
    full = train(cfg, run_dir=tmp_path / "full", data=data)
    segments = released_schedule(data.trainval_loc.size, 2, 50)
    assert [s.steps for s in segments] == [1, 7, 6]  # evaluated after iterations 0 and 7; 6 more steps
    assert [h["iterations"] for h in full.history] == [1, 8, 14]
    assert [h["epoch"] for h in full.history if "H" in h] == [0, 1]
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    best = metrics["best_over_training"]
    rows = [h for h in full.history if "H" in h]
    assert best["H"]["H"] == max(r["H"] for r in rows) and best["T"]["T"] == max(r["T"] for r in rows)

    with interrupted_at_step(monkeypatch, 5):  # in the second segment, after the first was checkpointed
        train(cfg, run_dir=tmp_path / "cut", data=data)
    resumed = train(cfg, run_dir=tmp_path / "cut", data=data, resume=True)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_replay_is_refused_outside_reference_mode_and_with_settings_it_fixes() -> None:
    cfg = _cfg("CUB")
    for overrides, match in ((["mode=paper"], "set mode=reference"),
                             (["train.iters_per_epoch=3"], "train.iters_per_epoch cannot be set"),
                             (["train.eval_every=2"], "train.eval_every cannot be set"),
                             (["eval.protocol=validated"], "eval.protocol=published"),
                             (["train.rng=numpy"], "train.rng must be one of")):
        with pytest.raises(ConfigError, match=match):
            apply_overrides(cfg, overrides)


def _write_cub_h5(path: Path) -> None:
    """A small CUB-layout DAZLE HDF5 file: 312 attributes, 200 classes, 8 x 2 x 2 feature maps."""
    data = load_data(_cfg("CUB"))
    with h5py.File(path, "w") as f:
        f["feature_map"] = np.asarray(data.features[np.arange(data.n_images)], dtype=np.float32)
        f["labels"] = data.labels
        for key in ("trainval_loc", "test_seen_loc", "test_unseen_loc"):
            f[key] = getattr(data, key)
        f["att"] = data.att
        f["w2v_att"] = data.w2v


def test_the_cub_replay_preset_runs_end_to_end_on_a_float32_store(tmp_path: Path, monkeypatch, capsys) -> None:
    h5 = tmp_path / "cub.h5"
    _write_cub_h5(h5)
    code, _, err = run_cli(["store", "import", h5, tmp_path / "half"], monkeypatch, capsys)
    assert code == 0, err
    small = ["train.epochs=2", "train.progress=false", "eval.batch_size=512", "eval.plots=false"]
    code, _, err = run_cli(["train", "--config", "cub-released", f"data.path={tmp_path / 'half'}", *small,
                            "--run-dir", tmp_path / "refused"], monkeypatch, capsys)
    assert code == 2 and "a float16 feature store cannot replay a released run" in err
    assert "dedn store import --dtype float32" in err and len(err.strip().splitlines()) == 1

    code, _, err = run_cli(["store", "import", h5, tmp_path / "store", "--dtype", "float32"], monkeypatch, capsys)
    assert code == 0, err
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--config", "cub-released", f"data.path={tmp_path / 'store'}", *small,
                              "--run-dir", run], monkeypatch, capsys)
    assert code == 0, err
    assert "published" in out
    config = json.loads((run / "train" / "config.json").read_text())
    assert (config["mode"], config["seed"], config["train"]["rng"]) == ("reference", 214, "released")
    history = [json.loads(line) for line in (run / "train" / "history.jsonl").read_text().splitlines()]
    segments = released_schedule(load_data(_cfg("CUB")).trainval_loc.size, 2, 50)
    assert [h["iterations"] for h in history] == np.cumsum([s.steps for s in segments]).tolist()
    assert sum("H" in h for h in history) == sum(s.evaluate for s in segments)


def test_an_experiment_refuses_to_validate_a_replay(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["experiment", "table1", "--methods", "dedn", "--config", "cub-released", "--protocol",
                            "validated", "--out", tmp_path / "out", "data.path=nowhere"], monkeypatch, capsys)
    assert code == 2 and "use --protocol published" in err and not (tmp_path / "out").exists()
