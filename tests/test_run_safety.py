"""Nothing lost, nothing silent: run folders are locked, never overwritten, and resumed only when exact.

Each refused case exits 2 with one `error:` line and no traceback, and leaves every file that was already
written byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dedn.training.trainer import Trainer

from .conftest import TINY, run_cli

FIXED = [*TINY, "eval.protocol=fixed"]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (".lock", ".lock-owner.json")}


def _refused(args: list[str], folder: Path, monkeypatch, capsys, match: str) -> None:
    before = _snapshot(folder) if folder.exists() else {}
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    assert (_snapshot(folder) if folder.exists() else {}) == before


@pytest.fixture
def run(tmp_path: Path, monkeypatch, capsys) -> Path:
    folder = tmp_path / "run"
    code, _, err = run_cli(["train", *FIXED, "--run-dir", str(folder)], monkeypatch, capsys)
    assert code == 0, err
    return folder


def test_finished_run_is_never_written_over(run: Path, monkeypatch, capsys) -> None:
    _refused(["train", *FIXED, "--run-dir", str(run)], run, monkeypatch, capsys, "--resume")
    assert not [p for p in run.rglob("*") if ".tmp" in p.name]


def test_run_dir_into_a_store_or_a_file_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    from dedn.data.store import store_from_array

    store = tmp_path / "store"
    store_from_array(store, np.zeros((4, 2, 1, 1), np.float32), chunk_size=2)
    _refused(["train", *FIXED, "--run-dir", str(store)], store, monkeypatch, capsys, "not empty")
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    _refused(["train", *FIXED, "--run-dir", str(afile)], tmp_path / "store", monkeypatch, capsys, "existing file")


def test_resume_without_checkpoint_record_is_refused(run: Path, monkeypatch, capsys) -> None:
    (run / "checkpoints" / "last.json").unlink()
    _refused(["train", "--resume", str(run)], run, monkeypatch, capsys, "checkpoint record is missing")


def test_resume_after_the_config_was_edited_is_refused(run: Path, monkeypatch, capsys) -> None:
    cfg = json.loads((run / "config.json").read_text())
    cfg["data"]["synthetic"]["seed"] = 7
    (run / "config.json").write_text(json.dumps(cfg))
    _refused(["train", "--resume", str(run)], run, monkeypatch, capsys, "changed since this checkpoint")


def test_resume_after_an_architecture_edit_is_refused(run: Path, monkeypatch, capsys) -> None:
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["experts"] = "cexp"
    (run / "config.json").write_text(json.dumps(cfg))
    _refused(["train", "--resume", str(run)], run, monkeypatch, capsys, "architecture differs")


def test_corrupt_final_weights_are_refused_everywhere(run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    weights = run / "model.safetensors"
    assert (run / "model.safetensors.sha256").is_file()
    raw = bytearray(weights.read_bytes())
    for i in range(16):  # flip 16 values near the end of the file (tensor data, not the header)
        raw[-(i * 8 + 4)] ^= 0x40
    weights.write_bytes(bytes(raw))
    _refused(["eval", "--run", str(run), "--out", str(tmp_path / "ev")], run, monkeypatch, capsys, "SHA-256")
    x = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(x)
    _refused(["predict", "--run", str(run), str(x)], run, monkeypatch, capsys, "SHA-256")
    _refused(["explain", "--run", str(run), str(x), "--out", str(tmp_path / "ex")], run, monkeypatch, capsys,
             "SHA-256")


def test_history_keeps_one_line_per_epoch_after_a_kill(tmp_path: Path, monkeypatch, capsys) -> None:
    folder = tmp_path / "run"
    overrides = [*FIXED, "train.epochs=4"]
    original = Trainer._checkpoint

    def killed_before_third_checkpoint(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # history line of epoch 2 written, its checkpoint not
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_checkpoint", killed_before_third_checkpoint)
    code, _, err = run_cli(["train", *overrides, "--run-dir", str(folder)], monkeypatch, capsys)
    assert code == 130 and "--resume" in err
    assert len((folder / "history.jsonl").read_text().splitlines()) == 3
    monkeypatch.setattr(Trainer, "_checkpoint", original)
    code, _, err = run_cli(["train", "--resume", str(folder)], monkeypatch, capsys)
    assert code == 0, err
    epochs = [json.loads(line)["epoch"] for line in (folder / "history.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2, 3]


def test_two_processes_on_one_run_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "dedn.cli", "train", *FIXED, "train.epochs=40", "train.iters_per_epoch=6",
            "--run-dir", str(folder)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 60
        while not (folder / "config.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        started = time.time()
        second = subprocess.run([sys.executable, "-m", "dedn.cli", "train", "--resume", str(folder)],
                                capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode == 2, second.stderr
        assert "being written by another process" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert time.time() - started < 30  # at once: it does not wait for the first to finish
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    epochs = [json.loads(line)["epoch"] for line in (folder / "history.jsonl").read_text().splitlines()]
    assert epochs == list(range(40))


def test_nan_features_name_the_image(tmp_path: Path) -> None:
    from dedn.config import load_config
    from dedn.errors import DataError
    from dedn.eval.evaluate import evaluate_model
    from dedn.factory import load_data

    cfg = load_config(None, TINY)
    data = load_data(cfg)
    feats = np.asarray(data.features[np.arange(data.n_images)], dtype=np.float32)
    bad = int(data.test_unseen_loc[3])
    feats[bad, 0, 0, 0] = np.nan
    from dataclasses import replace

    from dedn.factory import build_model

    model = build_model(cfg, data)
    with pytest.raises(DataError, match=rf"images \[{bad}\]"):
        evaluate_model(model, replace(data, features=feats))


def test_unwritable_output_dir_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    _refused(["train", *FIXED, f"output_dir={blocker / 'runs'}"], tmp_path, monkeypatch, capsys,
             "cannot create the run folder")


def test_resume_on_changed_store_contents_is_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    from dedn.config import load_config
    from dedn.data.store import store_zsldata
    from dedn.factory import load_data

    data = load_data(load_config(None, TINY))
    feats = np.asarray(data.features[np.arange(data.n_images)], dtype=np.float32)
    from dataclasses import replace

    store_zsldata(tmp_path / "store", replace(data, features=feats))
    small = [o for o in FIXED if not o.startswith("data.synthetic")] + ["model.clusters=kmeans", "model.n_clusters=3"]
    args = ["train", "data.source=store", f"data.path={tmp_path / 'store'}", *small]
    code, _, err = run_cli([*args, "--run-dir", str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 0, err
    import shutil

    shutil.rmtree(tmp_path / "store")
    store_zsldata(tmp_path / "store", replace(data, features=feats * 2))  # same shape, other contents
    _refused(["train", "--resume", str(tmp_path / "run")], tmp_path / "run", monkeypatch, capsys,
             "the data (features")


def test_one_based_locs_get_a_hint() -> None:
    from dataclasses import replace

    from dedn.config import load_config
    from dedn.errors import DataError
    from dedn.factory import load_data

    data = load_data(load_config(None, TINY))
    shifted = {k: getattr(data, k) + 1 for k in ("trainval_loc", "test_seen_loc", "test_unseen_loc")}
    with pytest.raises(DataError, match="1-based"):
        replace(data, **shifted).validate()
    # 1-based indices whose maximum stays below N (one image never listed) end in the class check
    lower = {k: v[v < data.n_images] for k, v in shifted.items()}
    with pytest.raises(DataError, match="1-based"):
        replace(data, **lower).validate()


def test_metrics_csv_and_best_checkpoint(tmp_path: Path, monkeypatch, capsys) -> None:
    import csv

    folder = tmp_path / "run"
    code, _, err = run_cli(["train", *TINY, "eval.protocol=fixed", "data.split=validation", "--run-dir", str(folder)],
                           monkeypatch, capsys)
    assert code == 0, err
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines()]
    assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in history] == [0, 1, 2]
    assert all(float(r["H"]) == pytest.approx(h["H"]) and r["gamma_source"] == "validated"
               for r, h in zip(rows, history, strict=True))
    best = json.loads((folder / "checkpoints" / "best.json").read_text())
    hs = [h["H"] for h in history]
    assert best["epoch"] == hs.index(max(hs))  # the earliest epoch with the best validation H
    # No best checkpoint is chosen on the test split.
    code, _, err = run_cli(["train", *FIXED, "--run-dir", str(tmp_path / "test-run")], monkeypatch, capsys)
    assert code == 0, err
    assert not (tmp_path / "test-run" / "checkpoints" / "best.json").exists()
    assert (tmp_path / "test-run" / "metrics.csv").is_file()


def test_tensorboard_writer(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("tensorboard")
    folder = tmp_path / "run"
    code, _, err = run_cli(["train", *FIXED, "train.tensorboard=true", "--run-dir", str(folder)], monkeypatch, capsys)
    assert code == 0, err
    events = list((folder / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"))
    acc.Reload()
    assert {"loss", "H", "AUSUC"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [0, 1, 2]


def test_tensorboard_missing_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    _refused(["train", *FIXED, "train.tensorboard=true", "--run-dir", str(tmp_path / "run")], tmp_path,
             monkeypatch, capsys, "pip install 'dedn[tensorboard]'")
