"""The dedn command: train, eval, resume, version, and clear errors with exit status 2."""

from __future__ import annotations

import json
import re
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


def _help(args: list[str], columns: int, monkeypatch, capsys) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, err = run_cli([*args, "--help"], monkeypatch, capsys)
    assert code == 0, err
    return out


def test_help_lists_the_registered_choices(monkeypatch, capsys) -> None:
    from dedn.config import packaged_configs
    from dedn.features.backbones import BACKBONES
    from dedn.models.registry import model_names

    flat = {c: " ".join(_help([c], 250, monkeypatch, capsys).replace("│", " ").split())  # panel borders out
            for c in ("train", "extract", "predict", "explain", "experiment")}
    for command in ("extract", "predict", "explain"):
        assert ", ".join(BACKBONES) in flat[command], command  # from the registry: new backbones appear by themselves
    for command in ("train", "experiment"):
        assert ", ".join(packaged_configs()) in flat[command] and "cub-gzsl" in flat[command], command
    assert ", ".join(model_names()) in flat["experiment"] and "table1, table3, figure3" in flat["experiment"]


def test_one_name_for_one_thing(monkeypatch, capsys) -> None:
    predict = _help(["predict"], 250, monkeypatch, capsys)
    explain = _help(["explain"], 250, monkeypatch, capsys)
    describe = _help(["describe"], 250, monkeypatch, capsys)
    assert "--top-k" in predict and "--new-classes" in predict and "--classes " not in predict
    assert "--top-attributes" in explain and "--top " not in explain and "--top-k" not in explain.replace(
        "predict's --top-k", "")
    assert "--new-classes-template" in describe
    assert "index.csv" in predict and "index.csv" in explain  # where the true class comes from


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("command", [["experiment"], ["extract"], ["samples"], ["predict"], ["bench"]])
def test_help_paragraphs_wrap_as_paragraphs(command: list[str], columns: int, monkeypatch, capsys) -> None:
    # The description between the usage line and the first panel: each line of a paragraph but its last fills
    # the width (a docstring's own line breaks would end lines mid-sentence).
    text = _help(command, columns, monkeypatch, capsys).split("Usage:", 1)[1].split("╭", 1)[0]
    paragraphs = [[line.rstrip() for line in p.splitlines() if line.strip()]
                  for p in re.split(r"\n\s*\n", "\n".join(line.rstrip() for line in text.splitlines()))]
    for lines in (p for p in paragraphs if len(p) > 1):
        if lines[0].lstrip().startswith("dedn") or "[OPTIONS]" in lines[0]:
            continue  # the usage line
        assert all(len(line) > columns - 25 for line in lines[:-1]), lines
