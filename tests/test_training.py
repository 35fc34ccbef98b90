"""Training: determinism, resume, checkpoints, NaN handling and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from dedn.config import RunConfig, apply_overrides
from dedn.errors import CheckpointError, ConfigError, DataError, TrainingError
from dedn.factory import build_model, load_data
from dedn.train.checkpoint import load_checkpoint, load_weights
from dedn.train.trainer import BatchSampler, Trainer
from tests.conftest import interrupted_at_step, run_trainer


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_same_seed_same_losses(tiny_cfg: RunConfig) -> None:
    data = load_data(tiny_cfg)
    a = Trainer(tiny_cfg, data).fit()
    b = Trainer(tiny_cfg, data).fit()
    assert a.losses == b.losses
    c = Trainer(apply_overrides(tiny_cfg, ["seed=5"]), data).fit()
    assert c.losses != a.losses


def test_training_reduces_the_loss(tiny_cfg: RunConfig) -> None:
    cfg = apply_overrides(tiny_cfg, ["train.epochs=6", "train.lr=0.001", "train.eval_every=0"])
    result = Trainer(cfg).fit()
    assert result.losses[-1] < result.losses[0]
    assert {"T", "S", "U", "H"} <= set(result.metrics)


def test_resume_gives_the_same_weights(tiny_cfg: RunConfig, tmp_path: Path, monkeypatch) -> None:
    data = load_data(tiny_cfg)
    full = run_trainer(tiny_cfg, run_dir=tmp_path / "full", data=data)

    with interrupted_at_step(monkeypatch, 2 * 3 + 2):  # in the third epoch, after two were checkpointed
        run_trainer(tiny_cfg, run_dir=tmp_path / "cut", data=data)
    _, record = load_checkpoint(tmp_path / "cut" / "checkpoints")
    assert record["epoch"] == 1
    resumed = run_trainer(tiny_cfg, run_dir=tmp_path / "cut", data=data, resume=True)
    a, b = _weights(full.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.losses == full.losses
    reloaded = load_weights(tmp_path / "cut" / "model.safetensors")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, b[k])


def test_run_directory_contents(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_trainer(tiny_cfg, run_dir=run)
    for name in ("config.json", "train.log", "history.jsonl", "metrics.json", "per_class.csv",
                 "model.safetensors", "seen_unseen_curve.png", "outputs_test_seen.npz"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"T", "S", "U", "H", "AUSUC", "gamma"} <= set(metrics)
    assert len((run / "history.jsonl").read_text().splitlines()) == 3
    # a run directory made with another config is refused
    with pytest.raises(ConfigError, match="another config"):
        Trainer(apply_overrides(tiny_cfg, ["seed=9"]), run_dir=run)


def test_corrupt_and_missing_checkpoints(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_trainer(tiny_cfg, run_dir=run)
    folder = run / "checkpoints"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")
    blob = (folder / "last.safetensors").read_bytes()
    (folder / "last.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(folder)
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(run / "model.safetensors")


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_cfg: RunConfig, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    trainer = Trainer(tiny_cfg, run_dir=run)
    calls = {"n": 0}
    forward = type(trainer.model).forward

    def poisoned(self, features, precision="fp32"):
        calls["n"] += 1
        out = forward(self, features, precision)
        if self.training and calls["n"] > 4:  # after the first epoch (3 steps + its evaluation)
            out.cexp.scores = out.cexp.scores * float("nan")
        return out

    monkeypatch.setattr(type(trainer.model), "forward", poisoned)
    with pytest.raises(TrainingError, match="last good checkpoint"):
        trainer.fit()
    _, record = load_checkpoint(run / "checkpoints")
    assert record["epoch"] == 0


def test_nan_features_are_refused(tiny_cfg: RunConfig) -> None:
    data = load_data(tiny_cfg)
    feats = np.asarray(data.features[np.arange(data.n_images)], dtype=np.float32)
    feats[data.trainval_loc[3], 0, 0, 0] = np.nan
    bad = replace(data, features=feats)
    with pytest.raises(DataError, match="NaN or infinite"):
        Trainer(tiny_cfg, bad)


def test_bad_inputs_are_refused_before_training(tiny_cfg: RunConfig) -> None:
    data = load_data(tiny_cfg)
    with pytest.raises(DataError, match="labels must lie"):
        bad = replace(data, labels=data.labels.copy())
        bad.labels[0] = 99
        bad.validate()
    with pytest.raises(DataError, match="empty"):
        replace(data, test_unseen_loc=np.zeros(0, dtype=np.int64)).validate()
    with pytest.raises(DataError, match="semantic vectors"):
        replace(data, w2v=data.w2v[:-1]).validate()
    with pytest.raises(DataError, match="share"):
        replace(data, test_seen_loc=np.concatenate([data.test_seen_loc, data.trainval_loc[:1]])).validate()
    with pytest.raises(DataError):
        build_model(apply_overrides(tiny_cfg, ["model.clusters=paper", "data.dataset=CUB"]), data)
    with pytest.raises(ConfigError, match="epoch"):
        apply_overrides(tiny_cfg, ["train.epoch=3"])
    with pytest.raises(ConfigError, match="model.l_rc"):
        apply_overrides(tiny_cfg, ["model.l_rc=1.5"])


def test_balanced_batches() -> None:
    labels = np.repeat(np.arange(5), 10)
    sampler = BatchSampler(labels, np.arange(50), batch_size=4, balanced=True, seed=0)
    batch = sampler.epoch(0, 1)[0]
    assert batch.size == 4 and np.unique(labels[batch]).size == 4  # min(n_seen, B) distinct classes
    sampler = BatchSampler(labels, np.arange(50), batch_size=12, balanced=True, seed=0)
    batch = sampler.epoch(0, 1)[0]
    assert batch.size == 10 and np.bincount(labels[batch]).tolist() == [2] * 5  # B // n_seen of each
    plain = BatchSampler(labels, np.arange(50), batch_size=12, balanced=False, seed=0)
    assert np.unique(plain.epoch(0, 1)[0]).size == 12
    assert np.array_equal(plain.epoch(3, 2)[1], plain.epoch(3, 2)[1])


# ---------------------------------------------------------------------------------------------- earlier layout
def _earlier_name(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The earlier parameter layout, written out: ``experts.cexp.W1`` (1, G, C) was ``cexp_W1`` (G, C) (cExp
    had no cluster axis), ``experts.fexp.W1`` (Q, G, C) was ``fexp_W1``; V and the buffers were the same."""
    if not name.startswith("experts."):
        return name, value
    _, expert, param = name.split(".")
    if expert == "cexp" and param != "V" and value.ndim == 3:
        value = value[0]
    return f"{expert}_{param}", value


def _write_earlier_checkpoint(folder: Path, model, optimizer: torch.optim.Optimizer, cfg: RunConfig) -> None:
    """A checkpoint as the code before the Expert module wrote it: old names and shapes, ``hparams`` metadata."""
    import hashlib

    from safetensors.torch import save_file

    folder.mkdir()
    order, clusters = model.attribute_order.tolist(), []
    for size in model.cluster_sizes:
        clusters.append(order[:size])
        order = order[size:]
    reference = cfg.mode == "reference"
    hparams = {"n_attributes": model.n_attributes, "semantic_dim": model.semantic_dim,
               "n_classes": int(model.class_att.shape[0]), "clusters": clusters, "n_channels": model.n_channels,
               "n_regions": model.n_regions, "mode": cfg.mode, "l_rc": cfg.model.l_rc, "l_e": cfg.model.l_e,
               "low_rank": cfg.model.low_rank if reference else None,
               "channel_attention": cfg.model.channel_attention, "experts": cfg.model.experts,
               "calibration_margin": cfg.loss.calibration_margin if reference else 0.0, "clip_negative_att": False}
    weights = dict(_earlier_name(k, v.detach().clone()) for k, v in model.state_dict().items())
    save_file(weights, str(folder / "last.safetensors"),
              metadata={"format": "dedn-checkpoint-1", "hparams": json.dumps(hparams)})
    names = {id(p): n for n, p in model.named_parameters()}
    optim = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            name, value = _earlier_name(names[id(p)], value.detach().clone())
            optim[f"{name}/{key}"] = value
    save_file(optim, str(folder / "last-optim.safetensors"), metadata={"format": "dedn-checkpoint-1"})
    files = {f: hashlib.sha256((folder / f).read_bytes()).hexdigest()
             for f in ("last.safetensors", "last-optim.safetensors")}
    (folder / "last.json").write_text(json.dumps({"format": "dedn-checkpoint-1", "epoch": 0, "files": files}))


@pytest.mark.parametrize("overrides", [[], ["mode=reference", "model.low_rank=2", "loss.calibration_margin=0.5"]])
def test_checkpoints_of_the_earlier_layout_load_and_resume_exactly(tiny_cfg: RunConfig, tmp_path: Path,
                                                                    overrides: list[str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from dedn.models.dedn import DEDNConfig
    from dedn.models.losses import dedn_loss
    from dedn.train.checkpoint import save_weights

    cfg = apply_overrides(tiny_cfg, overrides)
    data = load_data(cfg)
    x = torch.as_tensor(np.asarray(data.features[data.trainval_loc[:8]], dtype=np.float32))
    y = torch.as_tensor(data.labels[data.trainval_loc[:8]])
    seen = torch.as_tensor(data.seen_mask)

    def step(model, optimizer) -> None:
        model.train()
        optimizer.zero_grad()
        dedn_loss(model(x), y, seen, cfg.loss, model.method, model.calibration_bias()).total.backward()
        optimizer.step()

    def rmsprop(model) -> torch.optim.Optimizer:
        return torch.optim.RMSprop(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-4)

    model = build_model(cfg, data)
    opt = rmsprop(model)
    step(model, opt)
    _write_earlier_checkpoint(tmp_path / "old", model, opt, cfg)
    assert {"cexp_V", "cexp_W2", "fexp_W2"} <= set(load_file(str(tmp_path / "old" / "last.safetensors")))

    loaded = load_weights(tmp_path / "old" / "last.safetensors")
    assert loaded.config == model.config  # here the mode's defaults are the loss settings the run used
    assert _weights(loaded).keys() == _weights(model).keys()
    for k, v in _weights(model).items():
        assert torch.equal(_weights(loaded)[k], v), k

    save_weights(loaded, tmp_path / "new.safetensors")  # written again: the config as JSON, current names
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert "hparams" not in meta and DEDNConfig.from_dict(json.loads(meta["config"])) == model.config
    assert keys == set(_weights(model))

    resumed = build_model(cfg, data, seed=cfg.seed + 1)  # other weights: the checkpoint must replace them all
    resumed_opt = rmsprop(resumed)
    load_checkpoint(tmp_path / "old", optimizer_for=resumed, optimizer=resumed_opt)
    step(model, opt)
    step(resumed, resumed_opt)
    for k, v in _weights(model).items():
        assert torch.equal(_weights(resumed)[k], v), k


def test_callbacks_are_called_at_their_points_and_the_final_evaluation_can_be_switched_off(
        tiny_cfg: RunConfig, tmp_path: Path) -> None:
    from dedn.train.callbacks import Callback

    class Recorder(Callback):
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def on_segment_end(self, trainer, row):
            self.calls.append(("segment", row["epoch"], "H" in row))

        def on_evaluate(self, trainer, epoch, evaluation):
            self.calls.append(("evaluate", epoch, round(evaluation.summary()["H"], 6)))

        def on_checkpoint(self, trainer, epoch, name):
            self.calls.append(("checkpoint", epoch, name))

        def on_fit_end(self, trainer, record):
            record["recorded"] = len(self.calls)

    cfg = apply_overrides(tiny_cfg, ["train.eval_every=2", "train.checkpoint_every=0"])
    rec = Recorder()
    result = run_trainer(cfg, run_dir=tmp_path / "run", callbacks=(rec,))
    assert rec.calls[0] == ("segment", 0, False)
    kinds = [c[0] for c in rec.calls]
    assert kinds == ["segment", "evaluate", "segment", "evaluate", "checkpoint", "segment"]
    assert [c[1] for c in rec.calls] == [0, 1, 1, 2, 2, 2]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["recorded"] == len(rec.calls)
    assert result.metrics["recorded"] == len(rec.calls)

    quiet = Trainer(cfg, run_dir=tmp_path / "no-final")
    try:
        out = quiet.fit(final_evaluation=False)
    finally:
        quiet.close()
    assert out.metrics == {} and len(out.history) == 3
    assert not (tmp_path / "no-final" / "metrics.json").exists()
    assert not (tmp_path / "no-final" / "model.safetensors").exists()
    assert (tmp_path / "no-final" / "checkpoints" / "last.json").exists()
