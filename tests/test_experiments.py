"""Paper experiments: both protocols, seeds, resume, every command's reports, and bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dedn.apps import experiments as E
from dedn.apps.launch import parse_devices
from dedn.apps.results import ExperimentResult, Row, RunResult
from dedn.apps.selection import check_validation_split, read_grid
from dedn.config import RunConfig, load_config
from dedn.errors import ConfigError, DataError
from dedn.eval.evaluate import evaluate_outputs
from dedn.eval.inference import ModelOutputs
from dedn.factory import load_data
from dedn.training.trainer import Trainer

REPORT_SUFFIXES = (".md", ".csv", "_seeds.csv", ".json")


@pytest.fixture
def cfg(tiny_overrides: list[str]) -> RunConfig:
    # conftest's tiny benchmark, two epochs: every training run takes well under a second.
    return load_config(None, [*tiny_overrides, "train.epochs=2"])


@pytest.fixture
def fits(monkeypatch) -> list[dict]:
    """Record every Trainer.fit call (seed, split, protocol, epochs, resumed start epoch) as runs train."""
    calls: list[dict] = []
    original = Trainer.fit

    def counting(self):
        calls.append({"seed": self.cfg.seed, "split": self.cfg.data.split, "protocol": self.cfg.eval.protocol,
                      "epochs": self.cfg.train.epochs, "start": self.start_epoch})
        return original(self)

    monkeypatch.setattr(Trainer, "fit", counting)
    return calls


def _reports(out: Path, name: str, pngs: tuple[str, ...]) -> dict:
    for suffix in REPORT_SUFFIXES:
        assert (out / f"{name}{suffix}").stat().st_size > 0, suffix
    for png in pngs:
        assert (out / png).read_bytes()[:4] == b"\x89PNG", png
    record = json.loads((out / f"{name}.json").read_text())
    assert record["code"]["dedn"]
    assert record["config"]["model"]["l_rc"] == 0.8
    assert set(record["protocol_notes"]) == set(record["protocols"])
    md = (out / f"{name}.md").read_text()
    for proto in record["protocols"]:
        assert f"**{proto}**" in md
    return record


def test_table1_both_protocols_resume_after_interruption(cfg, fits, tmp_path, monkeypatch):
    out = tmp_path / "t1"
    step, counting = Trainer.train_step, Trainer.fit
    steps = {"n": 0}

    # seed 1's validation run, after epoch 0's checkpoint
    def dies_in_second_epoch(self, index, batch=None, share=None):
        if self.cfg.seed == 1 and self.cfg.data.split == "validation":
            steps["n"] += 1
            if steps["n"] == 3 + 1:
                raise KeyboardInterrupt
        return step(self, index, batch, share)

    monkeypatch.setattr(Trainer, "train_step", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        E.table1(cfg, seeds=2, protocol="both", out_dir=out, methods=["dedn"])
    seed0 = out / "runs/dedn/validated/seed-0/done.json"
    finished = seed0.read_bytes()
    assert not (out / "runs/dedn/validated/seed-1/done.json").exists()

    def dies_at_retraining(self):  # second try: seed 1's retraining on trainval dies before it starts
        if self.cfg.seed == 1 and self.cfg.eval.protocol == "validated" and self.cfg.data.split == "test":
            raise KeyboardInterrupt
        return counting(self)

    fits.clear()
    monkeypatch.setattr(Trainer, "train_step", step)
    monkeypatch.setattr(Trainer, "fit", dies_at_retraining)
    with pytest.raises(KeyboardInterrupt):
        E.table1(cfg, seeds=2, protocol="both", out_dir=out, methods=["dedn"])
    # Seed 0 was skipped; seed 1's validation run went on from its checkpoint (epoch 1, not 0).
    assert [(c["seed"], c["split"], c["start"]) for c in fits] == [(1, "validation", 1)]
    assert (out / "runs/dedn/validated/seed-1/selection.json").exists()

    fits.clear()
    monkeypatch.setattr(Trainer, "fit", counting)
    exp = E.table1(cfg, seeds=2, protocol="both", out_dir=out, methods=["dedn"])
    # Only the unfinished work trained: seed 1's retraining (its validation choice was kept) and the
    # published runs.
    assert sorted((c["protocol"], c["seed"], c["split"]) for c in fits) == [
        ("published", 0, "test"), ("published", 1, "test"), ("validated", 1, "test")]
    assert seed0.read_bytes() == finished
    assert [(r.protocol, r.seed, r.reused) for r in exp.runs] == [
        ("validated", 0, True), ("validated", 1, False), ("published", 0, False), ("published", 1, False)]

    record = _reports(out, "table1", ("table1.png",))
    assert record["seeds"] == [0, 1] and record["protocols"] == ["validated", "published"]
    assert record["published"] is None  # synthetic data: no paper numbers beside ours
    # The gap no paper prints: the test-selected (published) H against the validated H, seed by seed.
    (gap,) = record["gap"]
    val = [r.metrics["H"] for r in exp.runs_for("dedn", "validated")]
    sel = [r.metrics["H"] for r in exp.runs_for("dedn", "published")]
    assert gap["label"] == "DEDN" and gap["n_seeds"] == 2
    assert gap["gap_H"]["mean"] == pytest.approx(np.mean(sel) - np.mean(val))
    assert gap["test_selected_H"]["mean"] == pytest.approx(np.mean(sel))
    assert "Test-selected against validated H" in (out / "table1.md").read_text()
    for s in record["summary"]:
        hs = [r.metrics["H"] for r in exp.runs_for("dedn", s["protocol"])]
        assert s["H"]["mean"] == pytest.approx(np.mean(hs))
        assert s["H"]["std"] == pytest.approx(np.std(hs, ddof=1))

    for run in exp.runs_for("dedn", "validated"):
        c = run.choices
        assert 1 <= c["epochs"] <= 2 and c["gamma_source"] == "validated"
        final = json.loads((Path(run.folder) / "final/config.json").read_text())
        assert final["train"]["epochs"] == c["epochs"] and final["data"]["split"] == "test"
        assert float(final["eval"]["calibration"]) == c["gamma"]
        # The single test evaluation at the chosen gamma is what is reported.
        seen, unseen, mask = run.load_outputs()
        ev = evaluate_outputs(seen, unseen, mask, c["gamma"], c["l_rc"], c["l_e"])
        assert ev.result.H * 100 == pytest.approx(run.metrics["H"])
        # Retraining for the chosen epochs reproduces the published run's model at that epoch (same seed).
        grid = read_grid(Path(run.folder).parent.parent / f"published/seed-{run.seed}/train/grid.jsonl")
        t_then = [r["T"] for r in grid if r["epoch"] == c["epochs"] - 1 and (r["l_rc"], r["l_e"]) == (0.8, 0.9)]
        assert run.metrics["T"] == pytest.approx(t_then[0])
    for run in exp.runs_for("dedn", "published"):
        grid = read_grid(Path(run.folder) / "train/grid.jsonl")
        assert run.metrics["H"] == pytest.approx(max(r["H"] for r in grid))
        assert run.metrics["T"] == pytest.approx(max(r["T"] for r in grid))


def test_results_folder_of_another_config_is_refused(cfg, fits, tmp_path):
    out = tmp_path / "t1"
    E.table1(cfg, seeds=1, protocol="published", out_dir=out, methods=["dedn"])
    done = out / "runs/dedn/published/seed-0/done.json"
    finished = done.read_bytes()
    with pytest.raises(ConfigError, match=str(out)) as err:
        E.table1(cfg, seeds=1, protocol="published", out_dir=out, overrides=["loss.beta=0.01"],
                 methods=["dedn"])
    assert "loss.beta" in str(err.value)
    assert done.read_bytes() == finished
    # Settings that do not change results (progress bar, device) may differ when resuming an unfinished run.
    done.unlink()
    n = len(fits)
    E.table1(cfg, seeds=1, protocol="published", out_dir=out, overrides=["train.progress=true"],
             methods=["dedn"])
    assert len(fits) == n + 1 and fits[-1]["start"] == 2  # resumed after its last epoch: nothing retrained
    # A job folder started by another config is refused too, even without a finished result.
    marker = out / "runs/dedn/published/seed-0/job.json"
    old = json.loads(marker.read_text())
    marker.write_text(json.dumps({**old, "hash": "something-else"}))
    done.unlink()
    with pytest.raises(ConfigError, match="started with another config"):
        E.table1(cfg, seeds=1, protocol="published", out_dir=out, methods=["dedn"])


def test_bad_sweeps_and_settings_are_refused_before_any_work(cfg, fits, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(ConfigError, match="model.l_x"):
        E.figure3(cfg, out_dir=out, grid={"model.l_x": [0.1]})
    with pytest.raises(ConfigError, match="loss.beta.*training time"):
        E.figure3(cfg, out_dir=out, grid={"loss.beta": [0.1]})
    with pytest.raises(ConfigError, match="loss.betta"):
        E.table1(cfg, out_dir=out, tune={"loss.betta": [0.1, 0.2]}, methods=["dedn"])
    with pytest.raises(ConfigError, match="train.epochs.*decided by the protocol"):
        E.table1(cfg, out_dir=out, tune={"train.epochs": [1, 2]}, methods=["dedn"])
    with pytest.raises(ConfigError, match="model.l_e"):
        E.table1(cfg, out_dir=out, tune={"model.l_e": [1.5]}, methods=["dedn"])
    with pytest.raises(ConfigError, match="validated protocol"):
        E.table1(cfg, protocol="published", out_dir=out, tune={"model.l_e": [0.5]}, methods=["dedn"])
    with pytest.raises(ConfigError, match="train.epochs"):
        E.table1(cfg, out_dir=out, overrides=["train.epochs=0"], methods=["dedn"])
    with pytest.raises(ConfigError, match="table2"):
        E.run_experiment("table2", cfg, out_dir=out)
    with pytest.raises(ConfigError, match="protocol"):
        E.table1(cfg, protocol="honest", out_dir=out, methods=["dedn"])
    with pytest.raises(ConfigError, match="gpu:0"):
        E.table1(cfg, out_dir=out, devices="gpu:0", methods=["dedn"])
    assert E.parse_grid(["model.l_e=0.5, 0.9", "loss.beta=0.01"]) == {"model.l_e": ["0.5", "0.9"],
                                                                        "loss.beta": ["0.01"]}
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"] and parse_devices("") is None
    assert not out.exists() and not fits


def test_validation_split_checks(cfg, tiny_overrides, fits, tmp_path):
    no_val = load_config(None, [*tiny_overrides, "data.synthetic.n_val=0"])
    with pytest.raises(DataError, match="validation"):
        E.table1(no_val, protocol="validated", out_dir=tmp_path / "x", methods=["dedn"])
    assert not (tmp_path / "x").exists() and not fits
    full = load_data(cfg)
    val = full.validation_split(0.2, seed=0)
    check_validation_split(full, val)
    leaky = replace(val, test_seen_loc=np.concatenate([val.test_seen_loc, full.test_seen_loc[:2]]))
    with pytest.raises(DataError, match="test images"):
        check_validation_split(full, leaky)
    with pytest.raises(DataError, match="no val-unseen"):
        check_validation_split(full, replace(val, test_unseen_loc=np.zeros(0, dtype=np.int64)))


def test_figure3_sweeps_saved_outputs_without_retraining(cfg, fits, tmp_path):
    out = tmp_path / "f3"
    exp = E.figure3(cfg, seeds=2, protocol="both", out_dir=out)
    # One model per seed and protocol (validated: its validation run and its retraining), whatever the grid.
    assert len(fits) == 2 * (2 + 1)
    for proto in ("validated", "published"):
        assert sorted(p.name for p in (out / "runs/dedn" / proto).iterdir()) == ["seed-0", "seed-1"]
    for run in exp.runs:
        assert len(run.sweep) == 2 * len(E.FIGURE3_VALUES)
        centre = next(p for p in run.sweep if p["axis"] == "model.l_e" and p["value"] == 0.9)
        assert (centre["l_rc"], centre["l_e"]) == (0.8, 0.9)
        assert centre["H"] == pytest.approx(run.metrics["H"])  # the configured point is the reported result
        assert {p["l_rc"] for p in run.sweep if p["axis"] == "model.l_e"} == {0.8}
    record = _reports(out, "figure3", ("figure3_validated.png", "figure3_published.png"))
    assert len(record["sweep"]) == 2 * 2 * len(E.FIGURE3_VALUES)
    assert (out / "figure3_sweep.csv").exists() and (out / "figure3_sweep_seeds.csv").exists()


def test_table3_rows(cfg, fits, tmp_path):
    out = tmp_path / "t3"
    exp = E.table3(cfg, seeds=1, protocol="published", out_dir=out)
    assert [r.row for r in exp.runs] == [row.key for row in E.TABLE3_ROWS]
    expected = {"cexp_wo_distill": ("cexp", False, True, True, True), "fexp_wo_distill": ("fexp", False, True, True,
                                                                                          True),
                "dedn_wo_distill": ("both", False, True, True, True),
                "wo_channel_attention": ("both", True, False, True, True),
                "wo_mal": ("both", True, True, False, True), "wo_align": ("both", True, True, True, False),
                "full": ("both", True, True, True, True)}
    for run in exp.runs:
        c = json.loads((Path(run.folder) / "train/config.json").read_text())
        got = (c["model"]["experts"], c["loss"]["distill"], c["model"]["channel_attention"], c["loss"]["mal"],
               c["loss"]["align"])
        assert got == expected[run.row], run.row
    record = _reports(out, "table3", ("table3.png",))
    assert len(record["summary"]) == 7


def test_figure5_clusters(cfg, fits, tmp_path):
    out = tmp_path / "f5"
    exp = E.figure5(cfg, seeds=1, protocol="published", out_dir=out)
    # The tiny benchmark has 3 clusters: K-means with the same Q, and 3 halved to 1 (the odd one joins the last pair).
    assert exp.extra["n_clusters"] == {"manual": 3, "kmeans": 3, "half": 1}
    _reports(out, "figure5", ("figure5_published.png",))


def test_calibration_curves(cfg, fits, tmp_path):
    out = tmp_path / "cal"
    exp = E.calibration(cfg, seeds=2, protocol="validated", out_dir=out)
    curves = exp.extra["curves"]["validated"]
    assert [c["seed"] for c in curves] == [0, 1]
    for c, run in zip(curves, exp.runs, strict=True):
        assert c["AUSUC"] == pytest.approx(run.metrics["AUSUC"])
        assert np.all(np.diff(c["U"]) >= 0) and np.all(np.diff(c["S"]) <= 0)
    record = _reports(out, "calibration", ("calibration_validated.png",))
    assert record["calibration"][0]["n_seeds"] == 2
    rows = (out / "calibration_curves.csv").read_text().splitlines()
    assert rows[0] == "protocol,seed,gamma,S,U" and len(rows) > 4
    assert (out / "calibration_mean_curve.csv").exists()


def test_tune_grid_is_chosen_on_validation(cfg, fits, tmp_path):
    out = tmp_path / "tune"
    exp = E.table1(cfg, seeds=1, protocol="validated", out_dir=out, methods=["dedn"],
                   tune={"model.l_e": [0.2, 0.9], "loss.beta": ["0.001", "0.01"]})
    # One validation run per training setting (l_e comes from the saved outputs), then one retraining.
    assert [(c["split"], c["epochs"]) for c in fits][:2] == [("validation", 2), ("validation", 2)]
    assert len(fits) == 3 and fits[2]["split"] == "test"
    run = exp.runs[0]
    selection = json.loads((Path(run.folder) / "selection.json").read_text())
    assert len(selection["candidates"]) == 2
    assert run.choices["l_e"] in (0.2, 0.9) and run.choices["overrides"] in (["loss.beta=0.001"], ["loss.beta=0.01"])
    final = json.loads((Path(run.folder) / "final/config.json").read_text())
    assert final["model"]["l_e"] == run.choices["l_e"]
    assert str(final["loss"]["beta"]) == run.choices["overrides"][0].split("=")[1]
    seen = ModelOutputs.load(Path(run.folder) / "final/outputs_test_seen.npz")
    assert seen.labels is not None and exp.tune == {"model.l_e": [0.2, 0.9], "loss.beta": [0.001, 0.01]}


def test_runs_on_device_workers(cfg, tmp_path):
    # One spawned worker per listed device; the CPU stands in for a GPU here.
    out = tmp_path / "pool"
    exp = E.table1(cfg, seeds=1, protocol="published", out_dir=out, devices=["cpu"], methods=["dedn"],
                   overrides=["train.epochs=1"])
    assert (out / "runs/dedn/published/seed-0/done.json").exists()
    assert json.loads((out / "runs/dedn/published/seed-0/train/config.json").read_text())["train"]["device"] == "cpu"
    assert exp.extra["devices"] == ["cpu"] and exp.runs[0].metrics["H"] >= 0


def test_paper_numbers_beside_ours_for_real_datasets(tmp_path):
    from dedn.apps import reports
    from dedn.config import config_to_dict

    real = config_to_dict(load_config(None, ["data.source=hdf5", "data.dataset=CUB", "data.path=cub.h5"]))
    choices = {"calibration": 0.0, "l_rc": 0.8, "l_e": 0.9, "epoch_best_H": 3, "epoch_best_T": 4,
               "epochs_trained": 80}
    runs = [RunResult(row.key, row.label, "published", seed, {"T": 70.0 + seed, "U": 60.0, "S": 65.0, "H": 62.0,
                                                               "AUSUC": 40.0}, choices, "CUB",
                        str(tmp_path / "runs" / row.key), {}) for row in E.TABLE3_ROWS for seed in (0, 1)]
    exp = ExperimentResult("table3", tmp_path, ["published"], [0, 1], real, list(E.TABLE3_ROWS), runs)
    reports.report_table3(exp)
    md = (tmp_path / "table3.md").read_text()
    assert "paper H" in md and "| DEDN | published | 70.5 ± 0.7 |" in md and "| 70.4 |" in md
    summary = {r["row"]: r for r in json.loads((tmp_path / "table3.json").read_text())["summary"]}
    assert summary["wo_channel_attention"]["paper"]["H"] == 65.3 and summary["full"]["T"]["std"] > 0
    assert "66.6" in (tmp_path / "table3.csv").read_text()  # cExp w/o distill, CUB H
    one = ExperimentResult("table1", tmp_path, ["published"], [0], real, [Row("dedn", "DEDN")],
                             [replace(runs[0], row="dedn", label="DEDN", seed=0)])
    reports.report_table1(one)
    record = json.loads((tmp_path / "table1.json").read_text())
    assert record["published"]["values"] == {"dedn": {"T": 77.4, "U": 70.9, "S": 70.0, "H": 70.4}}
    assert record["summary"][0]["H"]["std"] is None  # one seed: no standard deviation
    assert (tmp_path / "table1.png").exists() and (tmp_path / "table3.png").exists()


def test_every_experiment_runs_the_configs_protocol_validated_by_default():
    import inspect

    assert all(inspect.signature(fn).parameters["protocol"].default is None for fn in E.EXPERIMENTS.values())
    assert E._protocols(None, load_config(None, [])) == ["validated"]
    assert E._protocols(None, load_config("cub-released", [])) == ["published"]  # the config says so
    assert E._protocols("both", load_config(None, [])) == ["validated", "published"]
    with pytest.raises(ConfigError, match="eval.protocol fixed: give validated, published or both"):
        E._protocols(None, load_config(None, ["eval.protocol=fixed"]))


def _fake_runs(tmp_path: Path, protocols: list[str], rows: list[Row]) -> list[RunResult]:
    choices = {"validated": {"epochs": 3, "gamma": 6.5, "gamma_source": "validated", "l_rc": 0.8, "l_e": 0.9,
                             "validation": {"H": 60.0}},
               "published": {"calibration": 2.0, "gamma": 2.0, "gamma_source": "mode default", "l_rc": 0.8,
                             "l_e": 0.9, "epoch_best_H": 3, "epoch_best_T": 4, "epochs_trained": 10}}
    return [RunResult(row.key, row.label, proto, seed, {"T": 70.0, "U": 60.0, "S": 65.0 + seed,
                                                        "H": 62.0 if proto == "validated" else 20.0, "AUSUC": 40.0},
                      choices[proto], "synthetic", str(tmp_path / "runs" / row.key / proto), {})
            for row in rows for proto in protocols for seed in (0, 1)]


def test_a_fixed_gamma_figure_never_stands_alone_in_a_report(tmp_path):
    from dedn.apps import reports
    from dedn.config import config_to_dict

    base = config_to_dict(load_config(None, []))
    rows = [Row("dedn", "DEDN")]
    # Validated only (the default): the gap section says how to add the test-selected figure.
    val = ExperimentResult("table1", tmp_path / "v", ["validated"], [0, 1], base, rows,
                           _fake_runs(tmp_path, ["validated"], rows))
    val.out_dir.mkdir()
    reports.report_table1(val)
    md = (val.out_dir / "table1.md").read_text()
    assert "--protocol both" in md and reports.FIXED_ONLY_NOTE not in md
    gap = json.loads((val.out_dir / "table1.json").read_text())["gap"][0]
    assert gap["validated_H"]["mean"] == 62.0 and gap["n_seeds"] == 2 and gap["test_selected_H"]["mean"] is None
    assert (val.out_dir / "table1.png").is_file()
    # Published only: every report says its figures are at a fixed gamma and how to get the validated ones.
    pub = ExperimentResult("table3", tmp_path / "p", ["published"], [0, 1], base, rows,
                           _fake_runs(tmp_path, ["published"], rows))
    pub.out_dir.mkdir()
    reports.report_table3(pub)
    assert reports.FIXED_ONLY_NOTE in (pub.out_dir / "table3.md").read_text()
    # Both: the fixed gamma's test-selected H with the validated H and both gammas beside it.
    both = ExperimentResult("table1", tmp_path / "b", ["validated", "published"], [0, 1], base, rows,
                            _fake_runs(tmp_path, ["validated", "published"], rows))
    both.out_dir.mkdir()
    reports.report_table1(both)
    md = (both.out_dir / "table1.md").read_text()
    assert "| DEDN | 62.0 ± 0.0 | 20.0 ± 0.0 | -42.0 ± 0.0 |  | 2 | 6.5 / 2 |" in md
    assert reports.FIXED_ONLY_NOTE not in md
