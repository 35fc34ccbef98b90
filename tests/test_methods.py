"""Every registered method through every layer above the models: train, evaluate, predict, explain, the CLI.

Nothing above ``models/`` may depend on which method a run uses; each method runs the same path here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import dedn
from dedn.apps.explain import region_attention
from dedn.config import load_config
from dedn.models.registry import model_entry, model_names
from dedn.runfolder import RunFolder
from tests.conftest import TINY, run_cli


def test_the_four_methods_are_registered_dedn_first() -> None:
    assert model_names() == ("dedn", "dazle", "msdn", "transzero")
    assert [model_entry(n).label for n in model_names()] == ["DEDN", "DAZLE", "MSDN", "TransZero"]


@pytest.mark.parametrize("name", model_names())
def test_a_method_trains_evaluates_predicts_and_explains(name: str, tmp_path: Path, monkeypatch, capsys) -> None:
    cfg = load_config(None, [*TINY, f"model.name={name}", "train.epochs=2", "eval.plots=false",
                             f"output_dir={tmp_path}"])
    result = dedn.train(cfg, run_dir=tmp_path / "run")  # validated protocol: selection, retrain, one test
    assert result.metrics.gamma_source == "validated" and 0 <= result.metrics.H <= 100
    folder = RunFolder(tmp_path / "run").model_folder()
    assert folder.path == tmp_path / "run" / "final"
    model = dedn.load_weights(folder.model)
    assert type(model) is model_entry(name).model_type

    code, out, err = run_cli(["eval", "--run", tmp_path / "run", "--out", tmp_path / "eval"], monkeypatch, capsys)
    assert code == 0, err
    assert model_entry(name).label in out
    evaluated = json.loads((tmp_path / "eval" / RunFolder.METRICS).read_text())
    assert evaluated["H"] == pytest.approx(result.metrics.H, abs=1e-6)  # the same model, the same gamma

    predictor = dedn.Predictor.from_run(tmp_path / "run", device="cpu")
    data = dedn.load_data(cfg)
    maps = np.asarray(data.features[data.test_unseen_loc[:3]], dtype=np.float32)
    predictions = predictor.predict_features(maps, top_k=2)
    assert len(predictions) == 3 and all(len(p.top) == 2 for p in predictions)
    regions = region_attention(model, maps)
    assert regions and all(a.shape[:2] == (3, data.n_attributes) for a in regions.values())
    # Attention weights over the regions of each attribute (MSDN's VA subnet normalises over attributes instead).
    assert all(np.isfinite(a).all() and (a >= 0).all() for a in regions.values())


@pytest.mark.parametrize("name", model_names())
def test_each_method_s_cub_preset_trains_on_a_store_from_the_cli(name: str, tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    from tests.test_replay import _write_cub_h5

    h5 = tmp_path / "cub.h5"
    _write_cub_h5(h5)  # CUB's layout: 312 attributes, 200 classes, small maps
    code, _, err = run_cli(["store", "import", h5, tmp_path / "store"], monkeypatch, capsys)
    assert code == 0, err
    preset = "cub-gzsl" if name == "dedn" else f"{name}-cub-gzsl"
    small = ["eval.protocol=fixed", "train.epochs=1", "train.iters_per_epoch=2", "train.progress=false",
             "eval.batch_size=512", "eval.plots=false"]
    code, out, err = run_cli(["train", "--config", preset, f"data.path={tmp_path / 'store'}", *small,
                              "--run-dir", tmp_path / "run"], monkeypatch, capsys)
    assert code == 0, err
    assert model_entry(name).label in out
    assert json.loads((tmp_path / "run" / RunFolder.CONFIG).read_text())["model"]["name"] == name
    code, out, err = run_cli(["eval", "--run", tmp_path / "run", "--out", tmp_path / "eval"], monkeypatch, capsys)
    assert code == 0, err
