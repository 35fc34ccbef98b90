"""Numbers a user can trust: explicit calibration, honest validation task, protocols through `dedn train`.

Covers: the validation task holds trainval classes only (real CUB, SUN, AWA2 splits); the published protocol
in paper mode evaluates at gamma = 2 eps (reference mode: 0); `dedn train` under the validated protocol
gives the numbers of `table1 --seeds 1`; the chosen number of epochs carries over to the final run; HDF5
import -> train -> eval -> explain through the CLI; paper-mode JSD stays finite where both softmaxes
underflow.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from dedn.apps import experiments as E
from dedn.apps.protocols import train
from dedn.config import load_config
from dedn.data.dataset import ZSLData
from dedn.data.synthetic import make_synthetic
from dedn.data.xlsa17 import read_semantic_dir
from dedn.errors import ConfigError
from dedn.eval.calibration import default_gamma
from dedn.eval.metrics import METRIC_ORDER
from dedn.models.losses import discrepancy, jensen_shannon, released_jensen_shannon

from .conftest import TINY, run_cli, shared_dir


# ---------------------------------------------------------------------------------------------- validation task
@pytest.mark.parametrize("ds", ["CUB", "SUN", "AWA2"])
def test_real_validation_task_has_no_test_unseen_class(ds: str) -> None:
    sem = read_semantic_dir(shared_dir(ds), dataset=ds)
    data = ZSLData(ds, np.zeros((sem.n_images, 1, 1, 1), np.float32), sem.labels, sem.att, sem.w2v,
                   sem.trainval_loc, sem.test_seen_loc, sem.test_unseen_loc, list(sem.class_names),
                   list(sem.attribute_names), val_classes=sem.val_classes)
    data.validate()
    val = data.validation_split(0.2, seed=0)
    trainval_classes = np.unique(sem.labels[sem.trainval_loc])
    # The candidates are the trainval classes and nothing else.
    np.testing.assert_array_equal(val.class_ids, trainval_classes)
    assert val.n_classes == trainval_classes.size and val.att.shape == (trainval_classes.size, sem.n_attributes)
    np.testing.assert_array_equal(val.att, sem.att[trainval_classes])
    task = val.provenance["validation_task"]
    seen, unseen, test_unseen = (set(task[k]) for k in ("seen_classes", "unseen_classes", "test_unseen_classes"))
    assert not (seen & unseen) and not (seen & test_unseen) and not (unseen & test_unseen)
    assert unseen == set(np.asarray(sem.val_classes).tolist())
    assert test_unseen == set(np.unique(sem.labels[sem.test_unseen_loc]).tolist())
    assert seen | unseen == set(trainval_classes.tolist())
    # Every image of the task carries its task label; the task's classes map back to the dataset's.
    used = np.concatenate([val.trainval_loc, val.test_seen_loc, val.test_unseen_loc])
    np.testing.assert_array_equal(val.class_ids[val.labels[used]], sem.labels[used])
    assert set(val.class_ids[val.unseen_classes].tolist()) == unseen


def test_selection_record_names_the_validation_task(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "train.epochs=2"])
    result = train(cfg, run_dir=tmp_path / "run")
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    task = selection["validation_task"]
    full = make_synthetic(cfg.data.synthetic)
    assert set(task["test_unseen_classes"]) == set(full.unseen_classes.tolist())
    assert not set(task["test_unseen_classes"]) & (set(task["seen_classes"]) | set(task["unseen_classes"]))
    # The chosen number of epochs carries over unchanged to the retraining on all of trainval.
    final = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert final["train"]["epochs"] == selection["epochs"] == selection["epoch"] + 1
    history = (tmp_path / "run" / "final" / "history.jsonl").read_text().splitlines()
    assert len(history) == selection["epochs"]
    metrics = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    assert metrics["gamma"] == selection["gamma"] and metrics["gamma_source"] == "validated"
    assert result.metrics.gamma_source == "validated" and "oracle_on_test" not in metrics
    assert result.metrics.gamma == metrics["gamma"] and result.metrics.H == metrics["H"]


# ---------------------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize(("mode", "margin", "gamma"), [("paper", 1.0, 2.0), ("paper", 0.25, 0.5),
                                                       ("reference", 1.0, 0.0)])
def test_published_protocol_uses_the_mode_default(tmp_path: Path, mode: str, margin: float, gamma: float) -> None:
    cfg = load_config(None, [*TINY, f"mode={mode}", f"loss.margin={margin}", "train.epochs=2"])
    assert default_gamma(cfg, None) == gamma
    exp = E.table1(cfg, seeds=1, protocol="published", out_dir=tmp_path / "t1", methods=["dedn"])
    run = exp.runs_for("dedn", "published")[0]
    assert run.choices["gamma"] == gamma and run.choices["gamma_source"] == "mode default"
    rows = [json.loads(line) for line in (Path(run.folder) / "train" / "history.jsonl").read_text().splitlines()]
    assert all(r["gamma"] == gamma and r["gamma_source"] == "mode default" for r in rows)
    assert all("oracle_H" in r for r in rows)  # an oracle figure appears only under its own name
    md = next(f for f in exp.files if str(f).endswith(".md")).read_text()
    assert f"gamma {gamma:g} (mode default)" in md


def test_fixed_run_reports_mode_default_and_labels_the_oracle(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "eval.protocol=fixed"])
    result = train(cfg, run_dir=tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["gamma"] == 2.0 and metrics["gamma_source"] == "mode default"
    assert result.metrics.gamma_source == "mode default" and result.model_dir == tmp_path / "run"
    assert result.choices["oracle_H"] == metrics["oracle_on_test"]["H"]
    assert "diagnosis only" in metrics["oracle_on_test"]["note"]
    assert metrics["oracle_on_test"]["H"] >= metrics["H"] - 1e-9  # the oracle is optimistic by construction


def test_calibration_values_are_parsed_once_and_checked() -> None:
    from dedn.checks import GammaChoice, parse_calibration
    from dedn.eval.calibration import config_calibration

    assert parse_calibration("auto") is GammaChoice.AUTO and parse_calibration("validated") is GammaChoice.VALIDATED
    assert parse_calibration("0.3") == 0.3 and parse_calibration(2) == 2.0
    assert load_config(None, ["eval.calibration=0.25"]).eval.gamma == 0.25
    assert load_config(None, []).eval.gamma is GammaChoice.AUTO
    assert config_calibration(GammaChoice.AUTO, 2.0, on_validation_task=False).value == 2.0
    assert config_calibration(GammaChoice.AUTO, 2.0, on_validation_task=True).value == "best"
    assert config_calibration(0.3, 0.0, on_validation_task=False).source == "config"
    for bad in ("nan", "abc", "inf", True):
        with pytest.raises(ConfigError, match="eval.calibration must be auto, validated or a finite number"):
            parse_calibration(bad)
    with pytest.raises(ConfigError, match="validated protocol"):
        config_calibration(GammaChoice.VALIDATED, 2.0, on_validation_task=False)


# ---------------------------------------------------------------------------------------------- protocols
def test_train_validated_matches_table1(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "train.epochs=2"])
    result = train(cfg, run_dir=tmp_path / "run")
    exp = E.table1(cfg, seeds=1, protocol="validated", out_dir=tmp_path / "t1", methods=["dedn"])
    run = exp.runs_for("dedn", "validated")[0]
    for key in METRIC_ORDER:
        assert getattr(result.metrics, key) == run.metrics[key], key
    assert result.choices["gamma"] == run.choices["gamma"] and result.choices["epochs"] == run.choices["epochs"]
    assert result.model_dir == tmp_path / "run" / "final"


def test_train_refuses_a_protocol_on_the_validation_split(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "data.split=validation"])
    with pytest.raises(ConfigError, match="data.split=test"):
        train(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- HDF5 path
def _write_h5(path: Path) -> ZSLData:
    cfg = load_config(None, [*TINY, "data.synthetic.n_images=200"]).data.synthetic
    data = make_synthetic(cfg)
    feats = np.asarray(data.features[np.arange(data.n_images)], dtype=np.float32)
    with h5py.File(path, "w") as f:
        f["feature_map"] = feats
        f["labels"] = data.labels
        for key in ("trainval_loc", "test_seen_loc", "test_unseen_loc"):
            f[key] = getattr(data, key)
        f["att"] = data.att
        f["w2v_att"] = data.w2v
    return data


def test_hdf5_import_train_eval_explain(tmp_path: Path, monkeypatch, capsys) -> None:
    from dedn.apps.explain import ExplainOptions, explain_image

    data = _write_h5(tmp_path / "feats.h5")
    store, run = tmp_path / "store", tmp_path / "run"
    code, _, err = run_cli(["store", "import", str(tmp_path / "feats.h5"), str(store)], monkeypatch, capsys)
    assert code == 0, err
    small = [o for o in TINY if not o.startswith("data.synthetic")] + ["model.clusters=kmeans", "model.n_clusters=3"]
    for protocol in ("fixed", "published"):
        folder = run / protocol
        code, out, err = run_cli(["train", "data.source=store", f"data.path={store}", f"eval.protocol={protocol}",
                                  *small, "--run-dir", str(folder)], monkeypatch, capsys)
        assert code == 0, err
        assert "mode default" in out and "AUSUC" in out
        assert not any(folder.rglob("*.tmp*"))
        code, out, err = run_cli(["eval", "--run", str(folder), "--calibration", "auto"], monkeypatch, capsys)
        assert code == 0, err
        assert "(mode default)" in out
    model_dir = run / "published" / "train"
    provenance = json.loads((model_dir / "features.json").read_text())
    assert provenance["backbone"] is None and "precomputed" in provenance["note"]
    # Feature maps explain without a backbone; an image asks for one in one clear line.
    x = torch.as_tensor(np.asarray(data.features[np.array([0])], dtype=np.float32))
    paths = explain_image(run / "published", x, out_dir=tmp_path / "explain", options=ExplainOptions(top=2))
    assert any(p.suffix == ".png" for p in paths)
    Image.new("RGB", (32, 32), (120, 80, 40)).save(tmp_path / "img.png")
    code, _, err = run_cli(["explain", "--run", str(run / "fixed"), str(tmp_path / "img.png"), "--out",
                            str(tmp_path / "ex2")], monkeypatch, capsys)
    assert code == 2 and "--backbone" in err and "Traceback" not in err
    # Resume of a finished imported run works too.
    code, _, err = run_cli(["train", "--resume", str(run / "fixed")], monkeypatch, capsys)
    assert code == 0, err


def test_validated_without_validation_classes_says_what_to_do(tmp_path: Path, monkeypatch, capsys) -> None:
    _write_h5(tmp_path / "feats.h5")
    small = [o for o in TINY if not o.startswith("data.synthetic")] + ["model.clusters=kmeans", "model.n_clusters=3"]
    code, _, err = run_cli(["train", "data.source=hdf5", f"data.path={tmp_path / 'feats.h5'}", *small,
                            "--run-dir", str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 2 and "data.semantic_dir" in err and "eval.protocol" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- losses
def _jsd64(x: np.ndarray, y: np.ndarray) -> float:
    """The JSD in float64 by its definition (reference value for the float32 computation)."""
    p = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    q = np.exp(y - y.max()) / np.exp(y - y.max()).sum()
    m = (p + q) / 2
    return 0.5 * float(np.sum(p * np.log(p / m)) + np.sum(q * np.log(q / m)))


def test_paper_jsd_is_finite_where_both_softmaxes_underflow() -> None:
    x = torch.tensor([[0.0, -120.0, 1.0]], dtype=torch.float32)
    y = torch.tensor([[0.5, -130.0, 0.0]], dtype=torch.float32)
    expected = _jsd64(x.double().numpy()[0], y.double().numpy()[0])
    assert expected == pytest.approx(0.0647, abs=1e-4)
    got = jensen_shannon(x, y)
    assert math.isfinite(float(got)) and float(got) == pytest.approx(expected, rel=1e-5)
    assert math.isfinite(float(discrepancy(x, y, "paper")))
    # Reference mode keeps the released arithmetic, NaN included.
    assert math.isnan(float(released_jensen_shannon(x, y)))
    # Gradients are finite too.
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    jensen_shannon(xg, yg).backward()
    assert torch.isfinite(xg.grad).all() and torch.isfinite(yg.grad).all()


def test_stable_jsd_equals_the_released_one_on_ordinary_scores() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 20, generator=g, dtype=torch.float64), torch.randn(6, 20, generator=g, dtype=torch.float64)
    assert float(jensen_shannon(x, y)) == pytest.approx(float(released_jensen_shannon(x, y)), rel=1e-12)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))


def test_every_protocol_name_has_a_runner() -> None:
    from dedn.apps.protocols import JOB_PROTOCOLS, JOB_RUNNERS, SINGLE_RUNS, ProtocolName
    from dedn.runfolder import RunFolder

    assert set(SINGLE_RUNS) == set(RunFolder.MODEL_FOLDERS) == set(ProtocolName)
    assert JOB_PROTOCOLS == ("validated", "published") and set(JOB_RUNNERS) <= set(ProtocolName)


def test_the_published_figures_keep_the_released_strict_best_h() -> None:
    from dedn.apps.selection import published_figures

    at_t = {"T": 31.0}
    never = {"epoch": 0, "T": 30.0, "U": 12.5, "S": 0.0, "H": 0.0, "AUSUC": 4.0}  # H 0 at every evaluation
    assert published_figures(never, at_t) == {"T": 31.0, "U": 0.0, "S": 0.0, "H": 0.0, "AUSUC": 4.0}
    once = {**never, "S": 2.0, "H": 3.7}
    assert published_figures(once, at_t) == {"T": 31.0, "U": 12.5, "S": 2.0, "H": 3.7, "AUSUC": 4.0}


def test_the_best_over_training_record_keeps_the_released_strict_best_h() -> None:
    from types import SimpleNamespace

    from dedn.training.callbacks import BestOverTraining

    history = [{"epoch": 0, "T": 30.0, "U": 12.5, "S": 0.0, "H": 0.0},
               {"epoch": 1, "T": 33.0, "U": 9.0, "S": 0.0, "H": 0.0}]
    record: dict = {}
    BestOverTraining().on_fit_end(SimpleNamespace(history=history), record)
    assert record["best_over_training"]["H"] == {"epoch": 0, "T": 30.0, "U": 0.0, "S": 0.0, "H": 0.0}
    assert record["best_over_training"]["T"] == {"epoch": 1, "T": 33.0}


def test_the_published_sweep_points_keep_the_released_strict_best_h() -> None:
    """Figure 3's published points follow the same rule: a point whose H is 0 at every epoch reports S = U = 0."""
    from dedn.apps.selection import published_sweep
    from dedn.eval.calibration import Calibration, GammaSource

    def row(epoch: int, l_e: float, u: float, s: float, h: float) -> dict:
        return {"epoch": epoch, "l_rc": 0.8, "l_e": l_e, "T": 20.0 + epoch, "U": u, "S": s, "H": h, "AUSUC": 3.0}

    grid = [row(0, 0.1, 12.5, 0.0, 0.0), row(1, 0.1, 9.0, 0.0, 0.0),  # never a positive H at l_e 0.1
            row(0, 0.9, 10.0, 30.0, 15.0), row(1, 0.9, 12.0, 40.0, 18.5)]
    points = published_sweep(grid, {"model.l_e": [0.1, 0.9]}, 0.8, 0.9, Calibration(2.0, GammaSource.MODE_DEFAULT))
    assert [(p["value"], p["U"], p["S"], p["H"], p["T"]) for p in points] == [(0.1, 0.0, 0.0, 0.0, 21.0),
                                                                           (0.9, 12.0, 40.0, 18.5, 21.0)]
