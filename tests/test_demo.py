"""The out-of-the-box demo, at a tiny size: every stage runs and writes its files; the cache is reused."""

from __future__ import annotations

import json
from pathlib import Path

from dedn.apps.demo import DEMO_SEED_SPREAD, DEMO_TUNE, dedn_command, format_demo, run_demo
from dedn.models.registry import model_entry, model_names

TINY_DEMO = [
    "data.imagebench.n_classes=10",
    "data.imagebench.n_unseen=3",
    "data.imagebench.n_val=2",
    "data.imagebench.images_per_class=8",
    "data.imagebench.image_size=64",
    "train.epochs=2",
    "train.iters_per_epoch=2",
    "train.batch_size=16",
    "train.progress=false",
]


def test_demo_end_to_end(tmp_path: Path) -> None:
    overrides = [*TINY_DEMO, f"data.cache_dir={tmp_path / 'cache'}"]
    result = run_demo(None, overrides, tmp_path / "demo", progress=False)
    rows = result["rows"]
    peers = {model_entry(name).label for name in model_names() if name != "dedn"}
    assert peers >= {"DAZLE", "MSDN"}  # every other registered method beside DEDN, on the same features
    assert set(rows) == {"DEDN", "cExp alone (no distillation)", "fExp alone (no distillation)",
                         "DEDN w/o channel attention", "DEDN w/o MAL", *peers,
                         "ESZSL (pooled features)"}
    for m in rows.values():
        assert set(m) == {"T", "U", "S", "H", "AUSUC", "gamma", "gamma_source", "H_interval"}
        assert m["H_interval"][0] <= m["H"] <= m["H_interval"][1]  # the test-image bootstrap brackets H
        assert all(0 <= m[k] <= 100 for k in ("T", "U", "S", "H", "AUSUC"))
        assert m["gamma_source"] == "validated"  # every H of the demo names its calibration
    saved = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert saved["rows"] == rows and saved["units"] == "percent"
    assert (tmp_path / "demo" / "seen_unseen_curve.png").is_file()
    assert all(Path(p).is_file() for p in result["files"]["heatmaps"])
    for expert in ("cexp", "fexp"):
        loc = result["localisation"][expert]
        assert 0 <= loc["overall"] <= 100 and 0 < loc["chance"] < 100
    text = format_demo(result)
    assert "DEDN" in text and "(validated)" in text and result["model"] in text
    # The measured seed spread beside the one-seed rows, and why DEDN's row differs from `dedn train`.
    spread = DEMO_SEED_SPREAD
    assert result["seed_spread"] == spread.to_dict()
    assert f"H over {spread.n_seeds} seeds was {spread.mean_H:.1f} ± {spread.std_H:.1f}" in text
    assert spread.command in text and "within seed noise" in text
    chosen = result["model_choices"]
    assert chosen["tune"] == DEMO_TUNE and chosen["l_e"] in DEMO_TUNE["model.l_e"]
    assert f"l_e = {chosen['l_e']:g} (of 0.3, 0.5, 0.7, 0.9)" in text and "`dedn train --config demo`" in text
    # It ends with the exact next commands, on the final model.
    assert [c.split()[1] for c in result["next"]] == ["predict", "explain", "eval"]
    assert all(c.split()[0] == dedn_command() for c in result["next"])  # a command this shell can run
    assert all(f"--run {result['model']}" in c and c in text for c in result["next"])
    # A second run reuses the cached features and the finished runs: the same numbers.
    again = run_demo(None, overrides, tmp_path / "demo", progress=False)
    assert again["rows"] == rows


def test_the_printed_command_runs_from_this_shell(monkeypatch, tmp_path: Path) -> None:
    import shutil
    import sys

    monkeypatch.setattr(shutil, "which", lambda name: None)  # dedn not on the PATH: the environment is not active
    monkeypatch.chdir(Path(sys.executable).parents[2])
    command = dedn_command()
    assert Path(command).name == "dedn" and Path(command).is_file() and not Path(command).is_absolute()
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/local/bin/dedn")
    assert dedn_command() == "dedn"
