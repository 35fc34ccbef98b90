"""Model selection on a validation task, and the scores the protocols read off saved outputs.

- :class:`SelectOutputs`, a trainer callback: at every evaluation it scores extra (l_rc, l_e) points from the
  same outputs (``grid.jsonl``) and keeps the outputs of the best epoch so far (``selected/``).
- :func:`read_grid`, :func:`score_point`: a grid file's rows; one (l_rc, l_e) point of saved outputs.
- :func:`choose_on_validation`, :func:`selection_record`: the epoch, gamma and tuned settings the validated
  protocol chooses (``selection.json``); :func:`best_over_epochs`: what the published protocol reads off.
- :func:`sweep_points`, :func:`published_sweep`, :func:`validated_sweep`: evaluation-time sweeps (Figure 3),
  scored from saved outputs without retraining.
- :func:`check_validation_split`, :func:`check_validation_task`: the validation task is sound (before training).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dedn.apps.datacache import DataCache
from dedn.atomic import atomic_write_text
from dedn.config import RunConfig, set_keys
from dedn.data.dataset import ZSLData
from dedn.errors import CheckpointError, DataError
from dedn.eval.calibration import Calibration, GammaSource
from dedn.eval.evaluate import Evaluation, evaluate_outputs
from dedn.eval.inference import ModelOutputs
from dedn.eval.metrics import METRIC_ORDER
from dedn.runfolder import RunFolder
from dedn.training.callbacks import Callback, released_best_h

#: Settings that act only at evaluation: chosen or swept from saved outputs, never by retraining.
EVAL_TIME_KEYS = ("model.l_rc", "model.l_e")

#: A point of the evaluation-time settings: (l_rc, l_e).
Point = tuple[float, float]


class SelectOutputs(Callback):
    """At each evaluation of a trainer run, score extra (l_rc, l_e) points from the same outputs (``grid.jsonl``)
    and keep the outputs of the best epoch so far (``selected/``), judged by H over the ``select`` points."""

    def __init__(self, points: list[Point], select: list[Point], calibration: Calibration) -> None:
        self.points, self.select, self.calibration = points, select, calibration

    def on_evaluate(self, trainer: Any, epoch: int, evaluation: Evaluation) -> None:
        ev = evaluation
        run = RunFolder(trainer.run_dir)
        grid_file, selected_dir = run.grid, run.selected
        rows = [{"epoch": epoch, "l_rc": p[0], "l_e": p[1],
                 **score_point(ev.seen, ev.unseen, ev.seen_mask, self.calibration, *p)} for p in self.points]
        earlier = [r for r in read_grid(grid_file) if r["epoch"] < epoch]
        with open(grid_file, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
        score = max(r["H"] for r in rows if (r["l_rc"], r["l_e"]) in self.select)
        best = max((r["H"] for r in earlier if (r["l_rc"], r["l_e"]) in self.select), default=None)
        if best is None or score > best:  # ties keep the earlier epoch (fewer epochs)
            selected_dir.mkdir(exist_ok=True)
            ev.seen.save(selected_dir / RunFolder.SELECTED_SEEN)
            ev.unseen.save(selected_dir / RunFolder.SELECTED_UNSEEN)
            np.save(selected_dir / RunFolder.SEEN_MASK, ev.seen_mask)
            atomic_write_text(selected_dir / RunFolder.SELECTED_EPOCH, json.dumps({"epoch": epoch}))


def score_point(seen: ModelOutputs, unseen: ModelOutputs, seen_mask: np.ndarray, calibration: Calibration,
                l_rc: float, l_e: float) -> dict[str, Any]:
    """T, S, U, H, gamma, AUSUC (percent) and the gamma's source, of saved outputs at one (l_rc, l_e)."""
    s = evaluate_outputs(seen, unseen, seen_mask, calibration, l_rc, l_e).summary()
    return {**{k: float(s[k]) for k in (*METRIC_ORDER, "gamma")}, "gamma_source": s["gamma_source"]}


def read_grid(path: Path) -> list[dict[str, Any]]:
    """Rows of a ``grid.jsonl``; a resumed epoch's rows replace the ones written before the interruption."""
    if not path.exists():
        return []
    rows: dict[tuple[int, float, float], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows[(r["epoch"], r["l_rc"], r["l_e"])] = r
    return sorted(rows.values(), key=lambda r: r["epoch"])


def check_selected(run_dir: Path, epoch: int) -> None:
    """Refuse a ``selected/`` folder that does not hold the outputs of the selected ``epoch``.

    Raises:
        CheckpointError: it holds another epoch's outputs (names the folder to delete).
    """
    path = RunFolder(run_dir).selected / RunFolder.SELECTED_EPOCH
    kept = json.loads(path.read_text())["epoch"] if path.exists() else None
    if kept != epoch:
        raise CheckpointError(f"{run_dir}/selected holds the outputs of epoch {kept}, but epoch {epoch} was "
                              "selected (an interrupted resume re-evaluated differently); delete "
                              f"{run_dir} to retrain that stage")


def validation_calibration(cfg: RunConfig) -> Calibration:
    """How gamma is set on the validation task: the configured number, else chosen there (H-maximising)."""
    gamma = cfg.eval.gamma
    if isinstance(gamma, float):
        return Calibration(gamma, GammaSource.CONFIG)
    return Calibration("best", GammaSource.VALIDATED)


def best_over_epochs(grid: Sequence[Mapping[str, Any]], l_rc: float, l_e: float, key: str) -> dict[str, Any]:
    """The grid row at (l_rc, l_e) with the highest ``key`` over epochs; ties: the earliest epoch."""
    rows = [r for r in grid if (r["l_rc"], r["l_e"]) == (l_rc, l_e)]
    return dict(max(rows, key=lambda r: (r[key], -r["epoch"])))


def published_figures(at_h: Mapping[str, Any], at_t: Mapping[str, Any]) -> dict[str, float]:
    """What the released code reports from its best-H and best-T evaluations: T, U, S, H, AUSUC (percent); S, U
    and H as its strict best-H record keeps them (:func:`~dedn.training.callbacks.released_best_h`: all 0 when H
    is 0 at every evaluation)."""
    h = released_best_h(dict(at_h))
    return {"T": at_t["T"], "U": h["U"], "S": h["S"], "H": h["H"], "AUSUC": at_h["AUSUC"]}


def choose_on_validation(rows: Sequence[Mapping[str, Any]], points: Sequence[Point]) -> dict[str, Any]:
    """The grid row of one validation run with the highest validation H; ties: fewer epochs, then the
    earlier grid point."""
    order = {p: j for j, p in enumerate(points)}
    return dict(max(rows, key=lambda r: (r["H"], -r["epoch"], -order[(r["l_rc"], r["l_e"])])))


def selection_record(job_hash: str, candidates: Sequence[tuple[dict[str, Any], int, Sequence[str], str, Any]]
                     ) -> dict[str, Any]:
    """``selection.json``: the best of the validation runs' choices (ties: the earlier combination).

    Args:
        job_hash: the job's hash.
        candidates: per training-setting combination: (its chosen grid row, its index, its overrides, its
            stage folder, its validation task's provenance).
    """
    top, i, combo, stage, task = max(candidates, key=lambda c: (c[0]["H"], -c[1]))
    return {"hash": job_hash, "validation_task": task,
            "combo": i, "overrides": list(combo), "stage": stage,
            "epoch": top["epoch"], "epochs": top["epoch"] + 1, "gamma": top["gamma"], "l_rc": top["l_rc"],
            "l_e": top["l_e"], "validation": {k: top[k] for k in METRIC_ORDER},
            "candidates": [{"overrides": list(c[2]), "epoch": c[0]["epoch"], "l_rc": c[0]["l_rc"],
                            "l_e": c[0]["l_e"], "H": c[0]["H"]} for c in candidates]}


def sweep_points(sweep: Mapping[str, Sequence[float]], l_rc: float,
                 l_e: float) -> list[tuple[str, float, float, float]]:
    """(axis, value, l_rc, l_e) for each swept value, the other setting held at (l_rc, l_e)."""
    out = []
    for axis, values in sweep.items():
        for v in values:
            out.append((axis, float(v), float(v) if axis == "model.l_rc" else l_rc,
                        float(v) if axis == "model.l_e" else l_e))
    return out


def published_sweep(grid: Sequence[Mapping[str, Any]], sweep: Mapping[str, Sequence[float]], l_rc: float,
                    l_e: float, fixed: Calibration) -> list[dict[str, Any]]:
    """Sweep points of a published run: the best H (and, separately, T) over training at each point, as the
    released code reports them (:func:`published_figures`)."""
    out = []
    for axis, value, prc, pe in sweep_points(sweep, l_rc, l_e):
        h, t = best_over_epochs(grid, prc, pe, "H"), best_over_epochs(grid, prc, pe, "T")
        figures = published_figures(h, t)
        out.append({"axis": axis, "value": value, "l_rc": prc, "l_e": pe, "H": figures["H"], "S": figures["S"],
                    "U": figures["U"], "T": figures["T"], "gamma": float(fixed.value), "gamma_source": fixed.source,
                    "epoch_H": h["epoch"], "epoch_T": t["epoch"]})
    return out


def validated_sweep(folder: Path, selection: Mapping[str, Any], test_outputs: Mapping[str, str],
                    test_mask: np.ndarray, calibration: Calibration, chosen_source: str,
                    sweep: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    """Sweep points of a validated run: each point's gamma chosen on the selected validation outputs, then
    scored on the final model's test outputs."""
    seen = ModelOutputs.load(folder / test_outputs["seen"])
    unseen = ModelOutputs.load(folder / test_outputs["unseen"])
    vdir = RunFolder(folder).stage(selection["stage"]).selected
    vseen = ModelOutputs.load(vdir / RunFolder.SELECTED_SEEN)
    vunseen = ModelOutputs.load(vdir / RunFolder.SELECTED_UNSEEN)
    vmask = np.load(vdir / RunFolder.SEEN_MASK)
    out = []
    for axis, value, prc, pe in sweep_points(sweep, selection["l_rc"], selection["l_e"]):
        val = score_point(vseen, vunseen, vmask, calibration, prc, pe)  # gamma chosen on validation
        test = score_point(seen, unseen, test_mask, Calibration(val["gamma"], chosen_source), prc, pe)
        out.append({"axis": axis, "value": value, "l_rc": prc, "l_e": pe, "H": test["H"],
                    "S": test["S"], "U": test["U"], "T": test["T"], "gamma": val["gamma"], "val_H": val["H"]})
    return out


def check_validation_split(full: ZSLData, val: ZSLData) -> None:
    """Refuse a validation task that is empty or touches test images (checked before any training).

    Args:
        full: the dataset with its real test split.
        val: the validation task made from it (:meth:`ZSLData.validation_split`).

    Raises:
        DataError: an empty part, an image outside trainval, a test image, or a validation-unseen class
            that also has training images.
    """
    src = full.source
    parts = {"training": val.trainval_loc, "val-seen": val.test_seen_loc, "val-unseen": val.test_unseen_loc}
    for name, loc in parts.items():
        if np.asarray(loc).size == 0:
            raise DataError(f"{src}: the validation split has no {name} images")
    used = np.concatenate(list(parts.values()))
    test = np.concatenate([full.test_seen_loc, full.test_unseen_loc])
    leak = np.intersect1d(used, test)
    if leak.size:
        raise DataError(f"{src}: the validation split uses {leak.size} test images (first {leak[:3].tolist()}); "
                        "the validated protocol must never see test images before its single test evaluation")
    outside = np.setdiff1d(used, full.trainval_loc)
    if outside.size:
        raise DataError(f"{src}: the validation split uses {outside.size} images outside trainval")
    overlap = np.intersect1d(val.labels[val.test_unseen_loc], val.labels[val.trainval_loc])
    if overlap.size:
        raise DataError(f"{src}: validation-unseen classes {overlap[:5].tolist()} also have training images")
    task_classes = val.class_ids if val.class_ids is not None else np.arange(val.n_classes)
    test_unseen = np.intersect1d(task_classes, full.unseen_classes)
    if test_unseen.size:
        raise DataError(f"{src}: the validation task has test-unseen classes {test_unseen[:5].tolist()} among its "
                        "candidates; it must hold the trainval classes only")


def check_validation_task(cfg: RunConfig, seed: int, cache: DataCache) -> None:
    """Load the test split and the validation task of ``cfg`` at ``seed`` and check them
    (:func:`check_validation_split`)."""
    full = cache.load(set_keys(cfg, {"seed": seed, "data.split": "test"}))
    val = cache.load(set_keys(cfg, {"seed": seed, "data.split": "validation"}))
    check_validation_split(full, val)
