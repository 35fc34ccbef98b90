"""The dedn command: train, eval, resume, version, and clear errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dedn import __version__

from .conftest import run_cli


def _config_file(tmp_path: Path, overrides: list[str]) -> Path:
    tree: dict = {}
    for o in overrides:
        key, value = o.split("=", 1)
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_version(monkeypatch, capsys) -> None:
    code, out, _ = run_cli(["--version"], monkeypatch, capsys)
    assert code == 0 and out.strip() == f"dedn {__version__}"


def test_train_then_eval(tiny_overrides: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = _config_file(tmp_path, tiny_overrides)
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--config", str(cfg), "--run-dir", str(run), "train.epochs=2"],
                             monkeypatch, capsys)
    assert code == 0, err
    assert "validated protocol" in out and "(validated)" in out and "AUSUC" in out
    assert f"model: {run / 'final'}" in out
    saved = json.loads((run / "final" / "config.json").read_text())
    assert 1 <= saved["train"]["epochs"] <= 2
    chosen = json.loads((run / "selection.json").read_text())["gamma"]
    code, out, err = run_cli(["eval", "--checkpoint", str(run), "--calibration", "0.5"], monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((run / "final" / "eval" / "metrics.json").read_text())
    assert metrics["gamma"] == 0.5 and metrics["gamma_source"] == "config"
    # the fixed gamma's figure has the run's validated one beside it, labelled
    assert f"(%, gamma = {chosen:.4g} (validated))  <- the same outputs at the run's validated gamma" in out
    assert {"T", "S", "U", "H", "AUSUC"} <= set(metrics)
    assert (run / "final" / "eval" / "per_class.csv").is_file()
    # auto: the run's own gamma, the one chosen on validation
    code, out, err = run_cli(["eval", "--checkpoint", str(run), "--calibration", "auto", "--out",
                              str(tmp_path / "ev")], monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["gamma"] == chosen and metrics["gamma_source"] == "validated"
    assert f"({metrics['gamma']:.4g}" not in out and "(validated)" in out
    assert "validated gamma" not in out and "this gamma is fixed" not in out  # nothing to add beside it
    # eval never writes into the run folder itself
    code, _, err = run_cli(["eval", "--checkpoint", str(run), "--out", str(run / "final")], monkeypatch, capsys)
    assert code == 2 and "run folder itself" in err
    # resume of a finished run trains nothing more and keeps the config
    code, out, err = run_cli(["train", "--resume", str(run)], monkeypatch, capsys)
    assert code == 0, err
    # the same command again without --resume is refused: nothing is overwritten
    code, out, err = run_cli(["train", "--config", str(cfg), "--run-dir", str(run), "train.epochs=2"],
                             monkeypatch, capsys)
    assert code == 2 and "--resume" in err


def test_errors_are_one_clear_line(tiny_overrides: list[str], tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = _config_file(tmp_path, tiny_overrides)
    code, _, err = run_cli(["train", "--config", str(cfg), "train.epoch=2"], monkeypatch, capsys)
    assert code == 2 and "epoch" in err and "Traceback" not in err
    code, _, err = run_cli(["train", "--config", str(tmp_path / "missing.yaml")], monkeypatch, capsys)
    assert code == 2 and "missing.yaml" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1, 2\n")
    code, _, err = run_cli(["train", "--config", str(bad)], monkeypatch, capsys)
    assert code == 2 and "bad.yaml" in err
    code, _, err = run_cli(["eval", "--checkpoint", str(tmp_path / "norun")], monkeypatch, capsys)
    assert code == 2 and "norun" in err
    code, _, err = run_cli(["train", "--config", str(cfg), "data.source=store"], monkeypatch, capsys)
    assert code == 2 and "data.path" in err


def test_packaged_presets_resolve(monkeypatch, capsys, tmp_path: Path) -> None:
    from dedn.config import find_config, load_config

    cfg = load_config(find_config("presets/cub-gzsl.yaml"), [f"data.path={tmp_path}"])
    assert cfg.data.dataset == "CUB" and cfg.model.l_e == pytest.approx(0.9)
    code, _, err = run_cli(["train", "--config", "presets/cub-gzsl.yaml", f"data.path={tmp_path / 'x'}"],
                           monkeypatch, capsys)
    assert code == 2 and "no such feature store" in err


def test_train_at_a_fixed_gamma_says_how_to_get_a_validated_one(tiny_overrides: list[str], tmp_path: Path,
                                                                monkeypatch, capsys) -> None:
    code, out, err = run_cli(["train", "--run-dir", str(tmp_path / "run"), *tiny_overrides, "train.epochs=1",
                              "eval.protocol=fixed"], monkeypatch, capsys)
    assert code == 0, err
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "(mode default))" in line)
    assert lines[at + 1].strip().startswith("this gamma is fixed (mode default), chosen on no data")
    assert "eval.protocol=validated" in lines[at + 1]
