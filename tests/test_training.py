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
from dedn.training.checkpoint import load_checkpoint, load_weights
from dedn.training.trainer import BatchSampler, Trainer
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
        cub = apply_overrides(tiny_cfg, ["model.clusters=paper", "data.dataset=CUB"])  # CUB's clusters, 12 attributes
        build_model(cub, load_data(cub))
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


# ---------------------------------------------------------------------------------------------- model files
def test_model_files_record_their_method_and_need_their_hash(tiny_cfg: RunConfig, tmp_path: Path) -> None:
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dedn.models.dedn import DEDNConfig
    from dedn.training.checkpoint import save_weights

    model = build_model(tiny_cfg, load_data(tiny_cfg))
    path = tmp_path / "model.safetensors"
    save_weights(model, path, record_hash=True)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == "dedn" and DEDNConfig.from_dict(json.loads(meta["config"])) == model.config
    loaded = load_weights(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    for k, v in _weights(model).items():
        assert torch.equal(_weights(loaded)[k], v), k

    def rewritten(name: str, **changes: str | None) -> Path:
        """The model file with its metadata changed (None drops a key), with a matching .sha256."""
        out = tmp_path / name
        save_file(load_file(str(path)), str(out),
                  metadata={k: v for k, v in {**meta, **changes}.items() if v is not None})
        (tmp_path / f"{name}.sha256").write_text(f"{hashlib.sha256(out.read_bytes()).hexdigest()}  {name}\n")
        return out

    with pytest.raises(CheckpointError, match=r"other\.safetensors: a model of method 'nosuch', which this version"):
        load_weights(rewritten("other.safetensors", model="nosuch"))
    with pytest.raises(CheckpointError, match=r"unnamed\.safetensors: not a dedn model file"):
        load_weights(rewritten("unnamed.safetensors", model=None))
    (tmp_path / "model.safetensors.sha256").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: no model\.safetensors\.sha256 beside it"):
        load_weights(path)


def test_callbacks_are_called_at_their_points_and_the_final_evaluation_can_be_switched_off(
        tiny_cfg: RunConfig, tmp_path: Path) -> None:
    from dedn.training.callbacks import Callback

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


def test_the_method_and_its_options_are_checked_before_work(tiny_cfg: RunConfig) -> None:
    with pytest.raises(ConfigError, match=r"model\.name must be one of \{.*dedn.*\}, got 'nosuch'"):
        load_data(apply_overrides(tiny_cfg, ["model.name=nosuch"]))  # before any data is read
    data = load_data(tiny_cfg)
    with pytest.raises(ConfigError, match=r"model\.name must be one of \{.*dedn.*\}"):
        build_model(apply_overrides(tiny_cfg, ["model.name=nosuch"]), data)
    with pytest.raises(ConfigError, match=r"model\.experts must be one of \{both, cexp, fexp\}, got 'gexp'"):
        Trainer(apply_overrides(tiny_cfg, ["model.experts=gexp"]), data)

