"""Paper experiments: two model-selection protocols, several seeds, and the paper's tables and figures.

Protocols (docs/modes.md, "Evaluation protocols"), always named in every output:

- ``validated`` (the default, honest): run 1 trains on the validation task (``data.split=validation``:
  trainval minus held-out images, evaluated every epoch on val-seen / val-unseen) and chooses the epoch,
  the calibration gamma (H-maximising on the validation scores) and, when a ``tune`` grid is given, the
  settings of that grid. Evaluation-time settings (``model.l_rc``, ``model.l_e``) are chosen from the
  saved validation outputs without retraining; a training-time setting (``loss.beta``, ...) costs one
  validation run per value. Run 2 retrains on all of trainval (``data.split=test``) for the chosen number
  of epochs and evaluates on the test split once, with the chosen gamma, l_rc and l_e.
- ``published``: what the released code reports. Train on trainval, evaluate on the test split after every
  epoch at a fixed calibration (``eval.calibration``, default 0; reference mode keeps its built-in margin),
  report the best H over training (and, separately, the best T). Optimistic; use it only to compare with
  published numbers.

A results folder (``out_dir``) holds::

    OUT/experiment.json                  experiment name, config hash, resolved config, and every launch
                                         (launcher, its submitit parameters, devices, when)
    OUT/runs/<row>/<protocol>/seed-<s>/  one folder per (row, protocol, seed)
        job.json                         the job's config hash (written when the job starts)
        done.json                        the result, written atomically when the job is complete
        train/                           published: the trainer's run folder (test split every epoch)
        validation/combo-NN/             validated run 1: one trainer run per training-setting combination
        selection.json                   validated: what run 1 chose
        final/                           validated run 2: retrained on trainval, tested once
    OUT/<experiment>.md .csv _seeds.csv .json .png   the reports (:mod:`dedn.apps.reports`)
    OUT/submitit/                        launchers local and slurm: submitit's job files and logs

Rerunning a command skips finished jobs, resumes unfinished ones from their last checkpoint
(:meth:`dedn.train.trainer.Trainer.resume`) and refuses (:class:`~dedn.errors.ConfigError`) a results folder or
job folder written with another config; a finished result is never overwritten.

Launchers (:class:`Launch`, ``dedn experiment --launcher``): ``pool``, the default, runs jobs one after the
other in this process, on ``train.device``; with ``devices=["cuda:0", "cuda:1"]`` independent jobs are
dispatched to a :class:`concurrent.futures.ProcessPoolExecutor` (spawn context) with one worker per device;
each worker runs its jobs on its own device. ``local`` and ``slurm`` submit each unfinished job through
submitit (:func:`submit_jobs`): a subprocess on this machine, or a SLURM job (one job array) with the
partition, GPUs, CPUs, memory and time limit given. A SLURM job that times out or is preempted is requeued
and resumes from its checkpoint; one killed for good is rerun, from its checkpoint, by rerunning the command.
One run spread over several GPUs is :class:`~dedn.train.trainer.Trainer`'s business: launch it with
``torchrun`` (distributed data parallel).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing as mp
import re
import time
import typing
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, is_dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dedn import __version__
from dedn.apps import reports
from dedn.apps.results import ExperimentResult, Row, RunResult
from dedn.atomic import atomic_write_text
from dedn.checks import parse_calibration
from dedn.config import VOLATILE_KEYS, RunConfig, apply_overrides, config_to_dict, diff_keys, load_config, without_keys
from dedn.data.dataset import ZSLData
from dedn.devices import use_threads
from dedn.errors import CheckpointError, ConfigError, DataError, TrainingError
from dedn.eval.calibration import Calibration, GammaSource, config_calibration
from dedn.eval.evaluate import Evaluation, evaluate_outputs
from dedn.eval.inference import ModelOutputs
from dedn.eval.metrics import ausuc, seen_unseen_curve
from dedn.factory import load_data, resolve_model_clusters
from dedn.runfolder import RunFolder
from dedn.train.callbacks import BestOverTraining, Callback
from dedn.train.trainer import Trainer, TrainResult

log = logging.getLogger("dedn")

__all__ = [
    "EXPERIMENTS",
    "EVAL_TIME_KEYS",
    "FIGURE3_VALUES",
    "LAUNCHERS",
    "PROTOCOLS",
    "TABLE3_ROWS",
    "ExperimentResult",
    "Job",
    "Launch",
    "Row",
    "RunResult",
    "calibration",
    "check_validation_split",
    "figure3",
    "figure5",
    "finished_result",
    "make_executor",
    "parse_devices",
    "parse_grid",
    "read_grid",
    "run_experiment",
    "run_job",
    "run_jobs",
    "submit_jobs",
    "submitit_parameters",
    "table1",
    "table3",
]

PROTOCOLS = ("validated", "published")
#: Settings that act only at evaluation: chosen or swept from saved outputs, never by retraining.
EVAL_TIME_KEYS = ("model.l_rc", "model.l_e")
#: Settings the protocols themselves decide; a tune grid may not name them.
PROTOCOL_KEYS = ("seed", "data.split", "train.epochs", "train.eval_every", "eval.protocol", "eval.calibration",
                 "name", "output_dir", "train.device", "train.progress")
#: Keys left out of config hashes: they change neither a result nor where it is stored.
UNHASHED_KEYS = (*VOLATILE_KEYS, "name", "output_dir")
#: Figure 3's grid: 0, 0.1, ..., 1.
FIGURE3_VALUES = tuple(round(0.1 * i, 1) for i in range(11))
METRICS = ("T", "S", "U", "H", "AUSUC")


# ============================================================================================ data types


#: Paper Table 3, in the paper's order.
TABLE3_ROWS: tuple[Row, ...] = (
    # One set of names for the ablations, everywhere (docs/method.md, "Ablations"). The paper's Table 3 calls
    # some of these "DAN w/o CA" and "DAN w/o L_align" (DAN: one attention sub-network); we name what is removed.
    Row("cexp_wo_distill", "cExp alone (no distillation)", ("model.experts=cexp", "loss.distill=false")),
    Row("fexp_wo_distill", "fExp alone (no distillation)", ("model.experts=fexp", "loss.distill=false")),
    Row("dedn_wo_distill", "DEDN w/o distillation", ("loss.distill=false",)),
    Row("wo_channel_attention", "DEDN w/o channel attention", ("model.channel_attention=false",)),
    Row("wo_mal", "DEDN w/o MAL", ("loss.mal=false",)),
    Row("wo_align", "DEDN w/o alignment", ("loss.align=false",)),
    Row("full", "DEDN", ()),
)



# ============================================================================================ configs
def _with_overrides(cfg: RunConfig, overrides: Sequence[str], origin: str) -> RunConfig:
    """``cfg`` with ``dotted.key=value`` overrides applied and checked (ConfigError names the key)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" in item and not _has_key(key):
            raise ConfigError(f"{origin}: {key!r} is not a setting of RunConfig")
    return apply_overrides(cfg, overrides, origin)


def _has_key(dotted: str) -> bool:
    """Whether ``dotted`` names a leaf setting of :class:`RunConfig`."""
    node: Any = RunConfig
    for part in dotted.split("."):
        if not (isinstance(node, type) and is_dataclass(node)):
            return False
        hints = typing.get_type_hints(node)  # annotations are strings under ``from __future__``
        if part not in hints:
            return False
        node = hints[part]
    return not (isinstance(node, type) and is_dataclass(node))


def _set(cfg: RunConfig, changes: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with typed values set by dotted key (the protocol's own settings; no parsing, no OmegaConf)."""
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        nodes = [cfg]
        for p in parents:
            nodes.append(getattr(nodes[-1], p))
        new = replace(nodes[-1], **{last: value})
        for node, name in zip(reversed(nodes[:-1]), reversed(parents), strict=True):
            new = replace(node, **{name: new})
        cfg = new
    return cfg


def _get(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _resolve_config(cfg: RunConfig | str | Path | None, overrides: Sequence[str]) -> RunConfig:
    if cfg is None or isinstance(cfg, (str, Path)):
        return load_config(cfg, list(overrides))
    return _with_overrides(cfg, overrides, "config")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _protocols(protocol: str | None, cfg: RunConfig) -> list[str]:
    protocol = cfg.eval.protocol if protocol is None else protocol
    if protocol == "both":
        return list(PROTOCOLS)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be validated, published or both, got {protocol!r}")
    return [protocol]


def _seed_list(seeds: int | Sequence[int], base: int) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"seeds must be at least 1, got {seeds}")
        return [base + i for i in range(seeds)]
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)}")
    return out


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["model.l_e=0.5,0.9", "loss.beta=0.001,0.01"]`` -> ``{"model.l_e": ["0.5", "0.9"], ...}`` (CLI helper).

    Values stay text; :func:`table1` and friends convert and check them against :class:`RunConfig`.
    """
    grid: dict[str, list[str]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"tune grid entry {spec!r} must look like dotted.key=v1,v2,...")
        key, values = spec.split("=", 1)
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def _check_grid(cfg: RunConfig, grid: Mapping[str, Sequence[Any]] | None,
                eval_only: bool = False) -> tuple[dict[str, list[float]], list[tuple[str, ...]], dict[str, list[Any]]]:
    """Split a grid into evaluation-time values and training-setting override combinations.

    Returns ``(eval_grid, train_combos, normalised grid)``; ``train_combos`` is ``[()]`` without
    training-time keys.

    Raises:
        ConfigError: a key is not a RunConfig setting, is decided by the protocol, has no or bad values,
            or (``eval_only``) is not an evaluation-time setting.
    """
    eval_grid: dict[str, list[float]] = {}
    train_values: dict[str, list[str]] = {}
    normalised: dict[str, list[Any]] = {}
    for key, values in (grid or {}).items():
        if not _has_key(key):
            raise ConfigError(f"sweep/tune parameter {key!r} is not a setting of RunConfig")
        if key in PROTOCOL_KEYS:
            raise ConfigError(f"sweep/tune parameter {key!r} is decided by the protocol and cannot be swept")
        if eval_only and key not in EVAL_TIME_KEYS:
            raise ConfigError(f"sweep parameter {key!r} acts at training time; this sweep covers only "
                              f"evaluation-time settings ({', '.join(EVAL_TIME_KEYS)}); compare training "
                              "settings as separate rows instead")
        values = list(values)
        if not values:
            raise ConfigError(f"sweep/tune parameter {key!r} has no values")
        resolved = [_get(_with_overrides(cfg, [f"{key}={v}"], f"sweep/tune {key}"), key) for v in values]
        normalised[key] = resolved
        if key in EVAL_TIME_KEYS:
            eval_grid[key] = [float(v) for v in resolved]
        else:
            train_values[key] = [json.dumps(v) if isinstance(v, bool) or v is None else str(v) for v in resolved]
    combos = [tuple(f"{k}={v}" for k, v in zip(train_values, combo, strict=True))
              for combo in itertools.product(*train_values.values())] if train_values else [()]
    return eval_grid, combos, normalised


def parse_devices(devices: str | Sequence[str] | None) -> list[str] | None:
    """``"cuda:0,cuda:1"`` or a list -> checked device names; None or empty -> None (sequential, in-process).

    Raises:
        ConfigError: a name is not cpu / cuda / cuda:N, or names a CUDA device this machine lacks.
    """
    if devices is None:
        return None
    names = [d.strip() for d in (devices.split(",") if isinstance(devices, str) else devices) if d.strip()]
    if not names:
        return None
    import torch

    for name in names:
        kind, _, index = name.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ConfigError(f"devices: {name!r} is not cpu, cuda or cuda:N")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"devices: {name} asked for but no CUDA device is available")
            if index and int(index) >= torch.cuda.device_count():
                raise ConfigError(f"devices: {name} asked for but only {torch.cuda.device_count()} CUDA "
                                  "device(s) exist")
    return names


# ============================================================================================ data
_DATA_CACHE: OrderedDict[str, ZSLData] = OrderedDict()


def _load_data(cfg: RunConfig) -> ZSLData:
    """:func:`dedn.factory.load_data`, memoised per process: rows and seeds share one loaded dataset
    (generated benchmarks keep their generated features)."""
    if cfg.data.source == "imagebench":  # built from the whole config; not shared
        return load_data(cfg)
    key = json.dumps({"data": asdict(cfg.data), "seed": cfg.seed if cfg.data.split == "validation" else None},
                     sort_keys=True)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_data(cfg)
        while len(_DATA_CACHE) > 4:
            _DATA_CACHE.popitem(last=False)
    _DATA_CACHE.move_to_end(key)
    return _DATA_CACHE[key]


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


def _check_validation(cfg: RunConfig, seed: int) -> None:
    full = _load_data(_set(cfg, {"seed": seed, "data.split": "test"}))
    val = _load_data(_set(cfg, {"seed": seed, "data.split": "validation"}))
    check_validation_split(full, val)


# ============================================================================================ one job
@dataclass
class Job:
    """One (row, protocol, seed) job of an experiment, picklable (sent to worker processes as it is).

    Attributes:
        row, protocol, seed: what to run.
        config: the row's resolved config at this seed.
        folder: the job folder (``OUT/runs/<row>/<protocol>/seed-<s>``).
        eval_grid: validated protocol: evaluation-time settings to choose from saved outputs.
        train_combos: validated protocol: training-setting override combinations, one validation run each.
        sweep: evaluation-time axis -> values to score from the reported model's outputs (Figure 3).
    """

    row: Row
    protocol: str
    seed: int
    config: RunConfig
    folder: str
    eval_grid: dict[str, list[float]]
    train_combos: list[tuple[str, ...]]
    sweep: dict[str, list[float]]

    def hash(self) -> str:
        """The job's identity: its config (without device, progress, name, output_dir), protocol and grids."""
        return _hash({"config": without_keys(config_to_dict(self.config), UNHASHED_KEYS), "protocol": self.protocol,
                      "eval_grid": self.eval_grid, "train_combos": self.train_combos, "sweep": self.sweep,
                      "row": asdict(self.row)})


class _SelectOutputs(Callback):
    """At each evaluation of a trainer run, score extra (l_rc, l_e) points from the same outputs (``grid.jsonl``)
    and keep the outputs of the best epoch so far (``selected/``)."""

    def __init__(self, points: list[tuple[float, float]], select: list[tuple[float, float]],
                 calibration: Calibration) -> None:
        self.points, self.select, self.calibration = points, select, calibration

    def on_evaluate(self, trainer: Trainer, epoch: int, ev: Evaluation) -> None:
        grid_file, selected_dir = trainer.run_dir / "grid.jsonl", trainer.run_dir / "selected"
        rows = [{"epoch": epoch, "l_rc": p[0], "l_e": p[1],
                 **_point(ev.seen, ev.unseen, ev.seen_mask, self.calibration, *p)} for p in self.points]
        earlier = [r for r in read_grid(grid_file) if r["epoch"] < epoch]
        with open(grid_file, "a", encoding="utf-8") as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))
        score = max(r["H"] for r in rows if (r["l_rc"], r["l_e"]) in self.select)
        best = max((r["H"] for r in earlier if (r["l_rc"], r["l_e"]) in self.select), default=None)
        if best is None or score > best:  # ties keep the earlier epoch (fewer epochs)
            selected_dir.mkdir(exist_ok=True)
            ev.seen.save(selected_dir / "outputs_seen.npz")
            ev.unseen.save(selected_dir / "outputs_unseen.npz")
            np.save(selected_dir / "seen_mask.npy", ev.seen_mask)
            atomic_write_text(selected_dir / "epoch.json", json.dumps({"epoch": epoch}))


def _point(seen: ModelOutputs, unseen: ModelOutputs, seen_mask: np.ndarray, calibration: Calibration,
           l_rc: float, l_e: float) -> dict[str, Any]:
    """T, S, U, H, gamma, AUSUC (percent) and the gamma's source, of saved outputs at one (l_rc, l_e)."""
    s = evaluate_outputs(seen, unseen, seen_mask, calibration, l_rc, l_e).summary()
    return {**{k: float(s[k]) for k in ("T", "S", "U", "H", "gamma", "AUSUC")}, "gamma_source": s["gamma_source"]}


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


def _train_stage(cfg: RunConfig, data: ZSLData, run_dir: Path, calibration: Calibration | None = None,
                 callbacks: Sequence[Callback] = ()) -> tuple[TrainResult, Trainer]:
    """Train (or resume and finish) one trainer run in ``run_dir``."""
    trainer = Trainer(cfg, data=data, run_dir=run_dir, calibration=calibration,
                      callbacks=[*callbacks, BestOverTraining()])
    try:
        trainer.resume()
        return trainer.fit(), trainer
    finally:
        trainer.close()  # its log file and the stage folder's lock, also when training failed


def _stage_config(cfg: RunConfig, job: Job, stage: str, combo: Sequence[str], changes: Mapping[str, Any]) -> RunConfig:
    """The config of one trainer run: a tuned training-setting combination, then the protocol's settings."""
    # Location-independent name and output_dir: the trainer compares them when a run is resumed.
    rel = f"runs/{job.row.key}/{job.protocol}/seed-{job.seed}/{stage}"
    cfg = _with_overrides(cfg, combo, f"{rel} config")
    return _set(cfg, {**changes, "name": rel, "output_dir": rel})


def _sweep_points(sweep: Mapping[str, Sequence[float]], l_rc: float,
                  l_e: float) -> list[tuple[str, float, float, float]]:
    """(axis, value, l_rc, l_e) for each swept value, the other setting held at (l_rc, l_e)."""
    out = []
    for axis, values in sweep.items():
        for v in values:
            out.append((axis, float(v), float(v) if axis == "model.l_rc" else l_rc,
                        float(v) if axis == "model.l_e" else l_e))
    return out


def _run_published(job: Job, cfg: RunConfig, folder: Path) -> RunResult:
    calib = cfg.eval.calibration if isinstance(cfg.eval.gamma, float) else "auto"
    scfg = _stage_config(cfg, job, "train", (), {"data.split": "test", "train.eval_every": 1,
                                                 "eval.protocol": "published", "eval.calibration": calib})
    data = _load_data(scfg)
    # A fixed calibration, as the released code: the configured number, else the mode's default (2 eps in
    # paper mode, the margin of eq. 14; 0 in reference mode, whose margin is inside the scores).
    fixed = config_calibration(parse_calibration(calib), cfg.mode, cfg.loss.margin, on_validation_task=False)
    gamma = float(fixed.value)
    l_rc, l_e = cfg.model.l_rc, cfg.model.l_e
    sweep = _sweep_points(job.sweep, l_rc, l_e)
    points = list(dict.fromkeys([(l_rc, l_e)] + [(p[2], p[3]) for p in sweep]))
    run_dir = folder / "train"
    result, trainer = _train_stage(scfg, data, run_dir, fixed, [_SelectOutputs(points, [(l_rc, l_e)], fixed)])
    grid = read_grid(run_dir / "grid.jsonl")

    def best(lrc: float, le: float, key: str) -> dict[str, Any]:
        rows = [r for r in grid if (r["l_rc"], r["l_e"]) == (lrc, le)]
        return max(rows, key=lambda r: (r[key], -r["epoch"]))  # ties: the earliest epoch

    at_h, at_t = best(l_rc, l_e, "H"), best(l_rc, l_e, "T")
    _check_selected(run_dir, at_h["epoch"])
    metrics = {"T": at_t["T"], "S": at_h["S"], "U": at_h["U"], "H": at_h["H"], "AUSUC": at_h["AUSUC"]}
    choices = {"how": "best test-split H over training (and best T separately), fixed calibration",
               "calibration": gamma, "gamma": gamma, "gamma_source": fixed.source, "l_rc": l_rc, "l_e": l_e,
               "epoch_best_H": at_h["epoch"],
               "epoch_best_T": at_t["epoch"], "T_at_best_H": at_h["T"], "epochs_trained": len(result.history)}
    points_out = []
    for axis, value, prc, pe in sweep:
        h, t = best(prc, pe, "H"), best(prc, pe, "T")
        points_out.append({"axis": axis, "value": value, "l_rc": prc, "l_e": pe, "H": h["H"], "S": h["S"],
                           "U": h["U"], "T": t["T"], "gamma": gamma, "gamma_source": fixed.source,
                           "epoch_H": h["epoch"], "epoch_T": t["epoch"]})
    return RunResult(job.row.key, job.row.label, job.protocol, job.seed, metrics, choices, trainer.dataset,
                     str(folder), _selected_outputs("train"), points_out, trainer.model.config.n_clusters)


def _selected_outputs(stage: str) -> dict[str, str]:
    return {"seen": f"{stage}/selected/outputs_seen.npz", "unseen": f"{stage}/selected/outputs_unseen.npz",
            "seen_mask": f"{stage}/selected/seen_mask.npy"}


def _check_selected(run_dir: Path, epoch: int) -> None:
    path = run_dir / "selected" / "epoch.json"
    kept = json.loads(path.read_text())["epoch"] if path.exists() else None
    if kept != epoch:
        raise CheckpointError(f"{run_dir}/selected holds the outputs of epoch {kept}, but epoch {epoch} was "
                              "selected (an interrupted resume re-evaluated differently); delete "
                              f"{run_dir} to retrain that stage")


def _run_validated(job: Job, cfg: RunConfig, folder: Path) -> RunResult:
    fixed = isinstance(cfg.eval.gamma, float)
    calibration = (Calibration(cfg.eval.gamma, GammaSource.CONFIG) if fixed
                   else Calibration("best", GammaSource.VALIDATED))
    lrcs = job.eval_grid.get("model.l_rc", [cfg.model.l_rc])
    les = job.eval_grid.get("model.l_e", [cfg.model.l_e])
    tune_points = [(float(a), float(b)) for a, b in itertools.product(lrcs, les)]
    selection_file = folder / "selection.json"
    if selection_file.exists():
        selection = json.loads(selection_file.read_text())
    else:
        selection = _validate_stage(job, cfg, folder, tune_points, calibration)
        atomic_write_text(selection_file, json.dumps(selection, indent=2))

    combo = list(selection["overrides"])
    fcfg = _stage_config(cfg, job, "final", combo, {
        "data.split": "test", "train.epochs": int(selection["epochs"]), "train.eval_every": 0,
        "eval.protocol": "validated", "eval.calibration": repr(float(selection["gamma"])),
        "model.l_rc": float(selection["l_rc"]), "model.l_e": float(selection["l_e"])})
    data = _load_data(fcfg)
    run_dir = folder / "final"
    chosen = Calibration(float(selection["gamma"]), GammaSource.CONFIG if fixed else GammaSource.VALIDATED)
    result, trainer = _train_stage(fcfg, data, run_dir, chosen)
    np.save(run_dir / "seen_mask.npy", data.seen_mask)
    metrics = {k: float(result.metrics[k]) for k in METRICS}
    outputs = {"seen": "final/outputs_test_seen.npz", "unseen": "final/outputs_test_unseen.npz",
               "seen_mask": "final/seen_mask.npy"}

    points_out = []
    if job.sweep:
        seen, unseen = ModelOutputs.load(folder / outputs["seen"]), ModelOutputs.load(folder / outputs["unseen"])
        vdir = folder / selection["stage"] / "selected"
        vseen, vunseen = ModelOutputs.load(vdir / "outputs_seen.npz"), ModelOutputs.load(vdir / "outputs_unseen.npz")
        vmask = np.load(vdir / "seen_mask.npy")
        for axis, value, prc, pe in _sweep_points(job.sweep, selection["l_rc"], selection["l_e"]):
            val = _point(vseen, vunseen, vmask, calibration, prc, pe)  # gamma chosen on validation
            test = _point(seen, unseen, data.seen_mask, Calibration(val["gamma"], chosen.source), prc, pe)
            points_out.append({"axis": axis, "value": value, "l_rc": prc, "l_e": pe, "H": test["H"],
                               "S": test["S"], "U": test["U"], "T": test["T"], "gamma": val["gamma"],
                               "val_H": val["H"]})
    choices = {"how": ("epoch, calibration and tuned settings chosen on the validation split; retrained on "
                       "trainval for that many epochs and tested once"),
               **{k: selection[k] for k in ("epochs", "gamma", "l_rc", "l_e", "overrides")},
               "gamma_source": chosen.source, "validation": selection["validation"],
               "validation_task": selection.get("validation_task")}
    return RunResult(job.row.key, job.row.label, job.protocol, job.seed, metrics, choices, trainer.dataset,
                     str(folder), outputs, points_out, trainer.model.config.n_clusters)


def _validate_stage(job: Job, cfg: RunConfig, folder: Path, tune_points: list[tuple[float, float]],
                    calibration: Calibration) -> dict[str, Any]:
    """Run 1 of the validated protocol: one validation run per training combination; choose the best."""
    candidates = []
    for i, combo in enumerate(job.train_combos):
        stage = f"validation/combo-{i:02d}"
        vcfg = _stage_config(cfg, job, stage, combo, {"data.split": "validation", "train.eval_every": 1,
                                                      "eval.protocol": "validated"})
        data = _load_data(vcfg)
        run_dir = folder / stage
        _train_stage(vcfg, data, run_dir, calibration, [_SelectOutputs(tune_points, tune_points, calibration)])
        rows = read_grid(run_dir / "grid.jsonl")
        order = {p: j for j, p in enumerate(tune_points)}
        # Highest validation H; ties: fewer epochs, then the earlier grid point.
        top = max(rows, key=lambda r: (r["H"], -r["epoch"], -order[(r["l_rc"], r["l_e"])]))
        _check_selected(run_dir, top["epoch"])
        candidates.append((top, i, combo, stage, data.provenance.get("validation_task")))
    top, i, combo, stage, task = max(candidates, key=lambda c: (c[0]["H"], -c[1]))
    return {"hash": job.hash(), "validation_task": task,
            "combo": i, "overrides": list(combo), "stage": stage,
            "epoch": top["epoch"], "epochs": top["epoch"] + 1, "gamma": top["gamma"], "l_rc": top["l_rc"],
            "l_e": top["l_e"], "validation": {k: top[k] for k in METRICS},
            "candidates": [{"overrides": list(c[2]), "epoch": c[0]["epoch"], "l_rc": c[0]["l_rc"],
                            "l_e": c[0]["l_e"], "H": c[0]["H"]} for c in candidates]}


def finished_result(job: Job) -> RunResult | None:
    """The job's result from its ``done.json`` (marked reused), or None while the job is unfinished.

    Raises:
        ConfigError: the job folder was finished with another config.
    """
    folder = Path(job.folder)
    done = folder / "done.json"
    if not done.exists():
        return None
    record = json.loads(done.read_text())
    h = job.hash()
    if record.get("hash") != h:
        raise ConfigError(f"{folder}: finished with another config (hash {record.get('hash')} != {h}); the "
                          "finished result is not overwritten: use another results folder")
    result = RunResult.from_dict(record["result"], reused=True)
    result.folder = str(folder)  # the results folder may have moved since
    return result


def run_job(job: Job, device: str | None = None) -> RunResult:
    """Run one (row, protocol, seed) job, or return its finished result.

    Raises:
        ConfigError: the job folder was started or finished with another config (nothing is overwritten).
    """
    finished = finished_result(job)
    if finished is not None:
        return finished
    folder = Path(job.folder)
    h = job.hash()
    done = folder / "done.json"
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "job.json"
    stable = without_keys(config_to_dict(job.config), UNHASHED_KEYS)
    if marker.exists():
        old = json.loads(marker.read_text())
        if old.get("hash") != h:
            diff = ", ".join(diff_keys(old.get("config", {}), stable)[:5])
            raise ConfigError(f"{folder}: started with another config (differs in {diff or 'rows, grid or sweep'}); "
                              "it is not overwritten: use another results folder")
    else:
        atomic_write_text(marker, json.dumps({"hash": h, "config": stable}, indent=2))
    cfg = job.config if device is None else _set(job.config, {"train.device": device})
    use_threads(cfg.train.threads)
    runner = _run_validated if job.protocol == "validated" else _run_published
    started = time.perf_counter()
    with RunFolder(folder).lock():  # one writer per job folder
        result = runner(job, cfg, folder)
    result.folder = str(folder)
    result.seconds = round(time.perf_counter() - started, 1)
    atomic_write_text(done, json.dumps({"hash": h, "finished": _now(), "result": result.to_dict()}, indent=2))
    return result


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ============================================================================================ dispatch
_WORKER_DEVICE: str | None = None


def _init_worker(queue: Any) -> None:
    """Pool initializer: each worker process takes one device for all its jobs."""
    global _WORKER_DEVICE
    _WORKER_DEVICE = queue.get()


def _worker_run(job: Job) -> RunResult:
    return run_job(job, _WORKER_DEVICE)


def job_line(result: RunResult, done: int, total: int) -> str:
    """One progress line for a finished job: its H with gamma and source, and its time (or "reused")."""
    m, c = result.metrics, result.choices
    gamma = c.get("gamma", c.get("calibration"))
    took = "reused" if result.reused else f"{result.seconds:.0f} s" if result.seconds is not None else ""
    where = f"gamma {gamma:.3g} ({c.get('gamma_source', '?')})" if isinstance(gamma, (int, float)) else ""
    return (f"[{done}/{total}] {result.label} ({result.protocol}, seed {result.seed}): H {m['H']:.1f}, "
            f"AUSUC {m['AUSUC']:.1f}, {where}, {took}")


def run_jobs(jobs: Sequence[Job], devices: Sequence[str] | None = None,
             report: Callable[[str], None] | None = None) -> list[RunResult]:
    """Run independent jobs: in this process one after another (``devices`` None), or one worker process
    per device (spawn context) taking jobs as it frees up. Results come back in job order; ``report`` gets
    one line per finished job (:func:`job_line`) as it finishes.

    With workers, every job is attempted; the first error is raised once all have ended, so finished jobs
    keep their ``done.json``.
    """
    say = report or (lambda line: None)
    if not devices:
        out = []
        for job in jobs:
            out.append(run_job(job))
            say(job_line(out[-1], len(out), len(jobs)))
        return out
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    for d in devices:
        queue.put(d)
    with ProcessPoolExecutor(max_workers=len(devices), mp_context=ctx, initializer=_init_worker,
                             initargs=(queue,)) as pool:
        futures: list[Future[RunResult]] = [pool.submit(_worker_run, job) for job in jobs]
        for done, f in enumerate(as_completed(futures), 1):
            if f.exception() is None:
                say(job_line(f.result(), done, len(jobs)))
        errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return [f.result() for f in futures]


# ============================================================================================ launchers
#: ``pool``: in this process, or one worker process per ``devices`` entry (:func:`run_jobs`); ``local`` and
#: ``slurm``: each job submitted through submitit (:func:`submit_jobs`), a subprocess or a SLURM job.
LAUNCHERS = ("pool", "local", "slurm")
#: Time limit of a submitit job when none is given. A job that reaches it is requeued and resumes from its
#: last checkpoint (at most 3 times, submitit's default), so it bounds one stretch of training, not a job.
DEFAULT_TIME_MIN = 240
#: Seconds between polls of running submitit jobs: a local job's process is cheap to poll, sacct is not.
POLL_S = {"local": 0.2, "slurm": 15.0}


@dataclass(frozen=True)
class Launch:
    """How an experiment's jobs run (``dedn experiment --launcher`` and its options); None: not given.

    Attributes:
        launcher: one of :data:`LAUNCHERS`.
        partition: slurm: the SLURM partition (default: the cluster's).
        gpus_per_job: local, slurm: GPUs each job sees (default 1; 0 for CPU jobs). One training process
            uses one GPU; local jobs all see this machine's first ones (the pool's ``devices`` spreads
            jobs over GPUs).
        cpus_per_job: slurm: CPUs per job (default: the cluster's).
        mem_gb: slurm: memory per job in GB (default: the cluster's).
        time_min: local, slurm: time limit per job in minutes (default :data:`DEFAULT_TIME_MIN`).
        max_running: local, slurm: most jobs running at once (default: local 1, slurm no limit).
    """

    launcher: str = "pool"
    partition: str | None = None
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem_gb: int | None = None
    time_min: int | None = None
    max_running: int | None = None

    def check(self, devices: Sequence[str] | None = None) -> None:
        """Refuse an unknown launcher, a bad value, or an option its launcher does not use.

        Raises:
            ConfigError: one line naming the option (as ``dedn experiment`` spells it) and the problem.
        """
        from dedn.checks import COUNT, NON_NEGATIVE_COUNT, Rule, check, choice

        check("--launcher", self.launcher, choice(*LAUNCHERS))
        submitted = ("local", "slurm")
        options: dict[str, tuple[Any, Rule, tuple[str, ...]]] = {
            "--partition": (self.partition, Rule(lambda v: isinstance(v, str) and bool(v.strip()),
                                                 "a partition name"), ("slurm",)),
            "--gpus-per-job": (self.gpus_per_job, NON_NEGATIVE_COUNT, submitted),
            "--cpus-per-job": (self.cpus_per_job, COUNT, ("slurm",)),
            "--mem-gb": (self.mem_gb, COUNT, ("slurm",)),
            "--time-min": (self.time_min, COUNT, submitted),
            "--max-running": (self.max_running, COUNT, submitted),
        }
        for option, (value, rule, launchers) in options.items():
            if value is None:
                continue
            if self.launcher not in launchers:
                raise ConfigError(f"{option} is for --launcher {' or '.join(launchers)}, not {self.launcher}")
            check(option, value, rule)
        if devices and self.launcher != "pool":
            raise ConfigError(f"--devices is for --launcher pool (one worker per device); a {self.launcher} job "
                              "gets its GPUs from the launcher (--gpus-per-job)")
        if self.launcher == "slurm":
            import submitit

            if submitit.SlurmExecutor.affinity() <= 0:
                raise ConfigError("--launcher slurm: no SLURM on this machine (srun is not on PATH); submit from a "
                                  "cluster login node, or use --launcher local or pool")

    def record(self, job_name: str) -> dict[str, Any]:
        """What ``experiment.json`` keeps of this launch: the launcher and, when submitted, its parameters."""
        out: dict[str, Any] = {"launcher": self.launcher}
        if self.launcher != "pool":
            out["parameters"] = submitit_parameters(self, job_name)
        return out


def submitit_parameters(launch: Launch, job_name: str) -> dict[str, Any]:
    """The :class:`submitit.AutoExecutor` parameters of a local or slurm launch (``update_parameters``).

    Generic keys (``name``, ``timeout_min``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``) apply to
    both executors where they can; ``slurm_*`` keys only to SLURM. Options not given are left out, so the
    cluster's defaults apply. One task per job: a job is one training process.
    """
    params: dict[str, Any] = {"name": job_name, "timeout_min": launch.time_min or DEFAULT_TIME_MIN,
                              "gpus_per_node": 1 if launch.gpus_per_job is None else launch.gpus_per_job}
    if launch.launcher == "slurm":
        params.update(nodes=1, tasks_per_node=1)
        given = {"slurm_partition": launch.partition, "cpus_per_task": launch.cpus_per_job,
                 "mem_gb": launch.mem_gb, "slurm_array_parallelism": launch.max_running}
        params.update({k: v for k, v in given.items() if v is not None})
    return params


def make_executor(launch: Launch, folder: Path, job_name: str) -> Any:
    """A submitit executor for ``launch`` (local or slurm) logging to ``folder``, its parameters set."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm" if launch.launcher == "slurm" else "local")
    executor.update_parameters(**submitit_parameters(launch, job_name))
    return executor


class _SubmittedJob:
    """:func:`run_job` as a submitit callable. Having ``checkpoint``, it is requeued rather than failed when
    the scheduler times it out or preempts it; the requeued job resumes its folder from the last checkpoint
    (the killed process's folder lock went with it)."""

    def __call__(self, job: Job) -> RunResult:
        return run_job(job)

    def checkpoint(self, job: Job) -> Any:
        from submitit.core.utils import DelayedSubmission

        return DelayedSubmission(self, job)


def _error_line(exc: BaseException) -> str:
    """The exception line of a submitit job's error (its message carries the job's whole traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line):
            return line
    return lines[0] if lines else type(exc).__name__


def submit_jobs(jobs: Sequence[Job], launch: Launch, folder: Path, job_name: str = "dedn",
                report: Callable[[str], None] | None = None,
                poll_s: float | None = None) -> list[RunResult]:
    """Run independent jobs through submitit (``launch.launcher`` local or slurm), logs in ``folder``.

    Finished jobs are read here and not submitted again; the others are submitted (slurm: as one job array)
    and polled every ``poll_s`` seconds (default :data:`POLL_S`). ``report`` gets one line per job as it
    finishes (:func:`job_line`). Every job is attempted; failures are raised together once all have ended,
    so finished jobs keep their ``done.json``. Interrupted here (Ctrl-C), the running jobs are cancelled;
    rerunning resumes them.

    Raises:
        TrainingError: some jobs failed; names the first one's folder, its error and its log file.
    """
    say = report or (lambda line: None)
    total = len(jobs)
    results: dict[int, RunResult] = {}
    todo = []
    for i, job in enumerate(jobs):
        reused = finished_result(job)
        if reused is None:
            todo.append(i)
        else:
            results[i] = reused
            say(job_line(reused, len(results), total))
    if not todo:
        return [results[i] for i in range(total)]
    executor = make_executor(launch, folder, job_name)
    # SLURM queues the whole array itself (--max-running is its array parallelism); locally, this loop does.
    room = len(todo) if launch.launcher == "slurm" else launch.max_running or 1
    poll = POLL_S[launch.launcher] if poll_s is None else poll_s
    pending, running, failed = list(todo), {}, []
    try:
        while pending or running:
            batch, pending = pending[:room - len(running)], pending[room - len(running):]
            if batch:
                with executor.batch():
                    submitted = [executor.submit(_SubmittedJob(), jobs[i]) for i in batch]
                running.update(zip(batch, submitted, strict=True))
            for i, sub in list(running.items()):
                if not sub.done():
                    continue
                del running[i]
                exc = sub.exception()
                if exc is None:
                    results[i] = sub.result()
                    say(job_line(results[i], len(results) + len(failed), total))
                else:
                    failed.append((i, sub, exc))
                    job = jobs[i]
                    say(f"[{len(results) + len(failed)}/{total}] {job.row.label} ({job.protocol}, seed {job.seed}): "
                        f"failed, log {sub.paths.stderr}")
            if running:
                time.sleep(poll)
    except BaseException:
        for sub in running.values():
            sub.cancel(check=False)
        raise
    if failed:
        i, sub, exc = failed[0]
        raise TrainingError(f"{len(failed)} of {len(todo)} jobs failed; the first, {jobs[i].folder}: "
                            f"{_error_line(exc)} (log {sub.paths.stderr}); finished jobs keep their results: "
                            "rerun the command to retry the others")
    return [results[i] for i in range(total)]


# ============================================================================================ driver
def _claim_folder(out: Path, record: dict[str, Any]) -> None:
    """Write ``experiment.json`` or check that the folder was written by the same experiment and config."""
    path = out / "experiment.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("config_hash") != record["config_hash"]:
            what = ("experiment " + str(old.get("experiment")) if old.get("experiment") != record["experiment"]
                    else "a config differing in " + (", ".join(diff_keys(old.get("definition", {}),
                                                                          record["definition"])[:6]) or "?"))
            raise ConfigError(f"{out}: this results folder was written by {what}; finished results are not "
                              "overwritten: use another --out folder or the same config")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, default=str))


def _record_launch(out: Path, launch: dict[str, Any]) -> None:
    """Append one launch (launcher, its parameters, devices, when) to ``experiment.json``'s ``launches``:
    a resumed folder may have been run by several launchers, and its record names each one."""
    path = out / "experiment.json"
    record = json.loads(path.read_text())
    record["launches"] = [*record.get("launches", []), {**launch, "started": _now()}]
    atomic_write_text(path, json.dumps(record, indent=2, default=str))


def _run(name: str, cfg: RunConfig | str | Path | None, seeds: int | Sequence[int], protocol: str | None,
         out_dir: str | Path | None, overrides: Sequence[str], rows: Sequence[Row] | Callable[[RunConfig], list[Row]],
         devices: str | Sequence[str] | None, tune: Mapping[str, Sequence[Any]] | None,
         sweep: Mapping[str, Sequence[Any]] | None = None,
         report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Resolve, check everything, claim the results folder, then run every (row, protocol, seed) job."""
    launch = launch or Launch()
    base = _resolve_config(cfg, overrides)
    if base.train.epochs < 1:
        raise ConfigError(f"{name}: train.epochs must be at least 1 (the protocols choose among epochs), "
                          f"got {base.train.epochs}")
    protocols = _protocols(protocol, base)
    if base.train.rng == "released" and "validated" in protocols:
        raise ConfigError(f"{name}: train.rng=released replays the released runs, which have no validation task; "
                          "use --protocol published")
    seed_list = _seed_list(seeds, base.seed)
    eval_grid, combos, tune_norm = _check_grid(base, tune)
    if tune and "validated" not in protocols:
        raise ConfigError(f"{name}: a tune grid is chosen on the validation split, so it needs the validated "
                          "protocol; the published protocol uses the configured settings")
    sweep_grid = _check_grid(base, sweep, eval_only=True)[0] if sweep else {}
    device_list = parse_devices(devices)
    launch.check(device_list)
    row_list = list(rows(base) if callable(rows) else rows)
    if len({r.key for r in row_list}) != len(row_list):
        raise ConfigError(f"{name}: row keys must be distinct")
    row_cfgs = {r.key: _with_overrides(base, r.overrides, f"row {r.key}") for r in row_list}
    if "validated" in protocols:  # before any training: the validation task must be sound for every seed
        for seed in seed_list:
            _check_validation(base, seed)
    out = Path(out_dir) if out_dir is not None else Path(base.output_dir) / f"experiment-{name}"
    definition = {"experiment": name, "config": without_keys(config_to_dict(base), (*UNHASHED_KEYS, "seed")),
                  "rows": [asdict(r) for r in row_list], "tune": tune_norm, "sweep": sweep_grid}
    _claim_folder(out, {"experiment": name, "config_hash": _hash(definition), "definition": definition,
                        "version": __version__, "created": _now()})
    jobs = []
    for row in row_list:
        for proto in protocols:
            for seed in seed_list:
                jobs.append(Job(row, proto, seed, _set(row_cfgs[row.key], {"seed": seed}),
                                 str((out / "runs" / row.key / proto / f"seed-{seed}").resolve()),
                                 eval_grid if proto == "validated" else {},
                                 combos if proto == "validated" else [()], sweep_grid))
    job_name = f"dedn-{name}"
    launched = {**launch.record(job_name), "devices": device_list}
    _record_launch(out, launched)
    if launch.launcher == "pool":
        runs = run_jobs(jobs, device_list, report)
    else:
        runs = submit_jobs(jobs, launch, out / "submitit", job_name, report)
    return ExperimentResult(name, out, protocols, seed_list, config_to_dict(base), row_list, runs, tune_norm,
                            {"devices": device_list, "sweep": sweep_grid, "launch": launched})


def protocol_job(cfg: RunConfig, folder: str | Path, protocol: str | None = None) -> Job:
    """The job of one model under ``protocol`` (default ``eval.protocol``) at ``cfg.seed``, in ``folder``:
    the very job ``table1`` runs for that config and seed, so both give the same numbers.

    Raises:
        ConfigError: the protocol is unknown or the config cannot run under it.
        DataError: the validated protocol's validation task is unsound (checked before any training).
    """
    protocol = cfg.eval.protocol if protocol is None else protocol
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be at least 1 (the {protocol} protocol chooses among epochs), "
                          f"got {cfg.train.epochs}")
    if cfg.data.split != "test":
        raise ConfigError(f"eval.protocol={protocol} builds its own validation task from trainval; set "
                          "data.split=test (or eval.protocol=fixed to train once on the validation task)")
    if protocol == "validated":
        _check_validation(cfg, cfg.seed)
    return Job(Row("dedn", "DEDN"), protocol, cfg.seed, cfg, str(Path(folder).resolve()), {}, [()], {})


# ============================================================================================ commands
def table1(cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1, protocol: str | None = "both",
           out_dir: str | Path | None = None, overrides: Sequence[str] = (), *,
           devices: str | Sequence[str] | None = None,
           tune: Mapping[str, Sequence[Any]] | None = None,
           report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Paper Table 1 row: T, U, S, H (and AUSUC) of DEDN on the config's dataset, under both protocols by
    default, mean +- std over ``seeds``; reports ``table1.*`` in ``out_dir``."""
    exp = _run("table1", cfg, seeds, protocol, out_dir, overrides, [Row("dedn", "DEDN")], devices, tune,
               report=report, launch=launch)
    exp.files = reports.report_table1(exp)
    return exp


def table3(cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1, protocol: str | None = None,
           out_dir: str | Path | None = None, overrides: Sequence[str] = (), *,
           devices: str | Sequence[str] | None = None, tune: Mapping[str, Sequence[Any]] | None = None,
           rows: Sequence[Row] = TABLE3_ROWS,
           report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Paper Table 3: the seven ablation rows (:data:`TABLE3_ROWS`), T, U, S, H each; reports ``table3.*``."""
    exp = _run("table3", cfg, seeds, protocol, out_dir, overrides, rows, devices, tune, report=report, launch=launch)
    exp.files = reports.report_table3(exp)
    return exp


def figure3(cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1, protocol: str | None = None,
            out_dir: str | Path | None = None, overrides: Sequence[str] = (), *,
            devices: str | Sequence[str] | None = None, tune: Mapping[str, Sequence[Any]] | None = None,
            grid: Mapping[str, Sequence[Any]] | None = None,
            report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Paper Figure 3: H (and T) against l_e and against l_rc (default 0, 0.1, ..., 1), the other held fixed.

    Both settings act only at evaluation, so every point comes from the saved outputs of one trained model
    per seed and protocol (validated: the final model, each point's gamma chosen on the validation outputs
    of the selected epoch; published: the best value over training epochs at the fixed calibration). No
    point retrains. ``grid`` replaces the axes; a key that is not an evaluation-time setting is refused.
    """
    grid = grid if grid is not None else {"model.l_e": FIGURE3_VALUES, "model.l_rc": FIGURE3_VALUES}
    exp = _run("figure3", cfg, seeds, protocol, out_dir, overrides, [Row("dedn", "DEDN")], devices, tune,
               sweep=grid, report=report, launch=launch)
    exp.files = reports.report_figure3(exp)
    return exp


def _figure5_rows(cfg: RunConfig) -> list[Row]:
    """Manual clusters, K-means with the same Q, and the half variant (paper Figure 5 a and b)."""
    data = _load_data(_set(cfg, {"data.split": "test"}))
    q = len(resolve_model_clusters(cfg, data))
    q_half = len(resolve_model_clusters(_set(cfg, {"model.clusters": "half"}), data))
    return [Row("manual", f"manual (Q={q})"),
            Row("kmeans", f"K-means (Q={q})", ("model.clusters=kmeans", f"model.n_clusters={q}")),
            Row("half", f"half (Q={q_half})", ("model.clusters=half",))]


def figure5(cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1, protocol: str | None = None,
            out_dir: str | Path | None = None, overrides: Sequence[str] = (), *,
            devices: str | Sequence[str] | None = None,
            tune: Mapping[str, Sequence[Any]] | None = None,
            report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Paper Figure 5: the config's (manual) clusters against K-means with the same number of clusters (a)
    and against the half variant, neighbours merged (b); H and T (and S, U) reported, bar charts drawn."""
    exp = _run("figure5", cfg, seeds, protocol, out_dir, overrides, _figure5_rows, devices, tune, report=report,
               launch=launch)
    exp.extra["n_clusters"] = {r.row: r.n_clusters for r in exp.runs}
    exp.files = reports.report_figure5(exp)
    return exp


def calibration(cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1,
                protocol: str | None = None, out_dir: str | Path | None = None, overrides: Sequence[str] = (), *,
                devices: str | Sequence[str] | None = None, tune: Mapping[str, Sequence[Any]] | None = None,
                n_points: int = 201,
                report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Calibrated stacking: the test seen-unseen curve of each seed's reported model (gamma swept), its
    AUSUC, the operating point the protocol chose, and the mean curve over seeds (S averaged on a common
    grid of ``n_points`` U values, for display)."""
    exp = _run("calibration", cfg, seeds, protocol, out_dir, overrides, [Row("dedn", "DEDN")], devices, tune,
               report=report, launch=launch)
    curves: dict[str, list[dict[str, Any]]] = {}
    grid_u = np.linspace(0.0, 1.0, n_points)
    for proto in exp.protocols:
        for run in exp.runs_for("dedn", proto):
            seen, unseen, mask = run.load_outputs()
            l_rc, l_e = run.choices["l_rc"], run.choices["l_e"]
            gammas, s, u = seen_unseen_curve(seen.scores(l_rc, l_e), seen.labels, unseen.scores(l_rc, l_e),
                                             unseen.labels, mask)
            gamma = run.choices["gamma"] if proto == "validated" else run.choices["calibration"]
            curves.setdefault(proto, []).append({
                "seed": run.seed, "gamma": gammas, "S": s, "U": u, "AUSUC": ausuc(s, u) * 100,
                "chosen_gamma": gamma, "chosen_S": run.metrics["S"], "chosen_U": run.metrics["U"],
                "S_on_grid": _s_on_u_grid(s, u, grid_u)})
    exp.extra["curves"] = curves
    exp.extra["u_grid"] = grid_u
    exp.files = reports.report_calibration(exp)
    return exp


def _s_on_u_grid(s: np.ndarray, u: np.ndarray, grid_u: np.ndarray) -> np.ndarray:
    """S of a seen-unseen curve at given U values (linear between points; 0 beyond the curve's last U)."""
    order = np.lexsort((-s, u))
    return np.interp(grid_u, u[order], s[order], right=0.0)


#: Command name -> function, for :func:`run_experiment` and the CLI.
EXPERIMENTS: dict[str, Callable[..., ExperimentResult]] = {
    "table1": table1, "table3": table3, "figure3": figure3, "figure5": figure5, "calibration": calibration,
}


def run_experiment(name: str, cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1,
                   protocol: str | None = None, out_dir: str | Path | None = None, overrides: Sequence[str] = (),
                   **kwargs: Any) -> ExperimentResult:
    """Run the experiment command ``name`` (table1, table3, figure3, figure5, calibration); ``kwargs``
    (``devices``, ``tune``, ``launch``, ...) go to that command. ``protocol`` None: the command's default.

    Raises:
        ConfigError: unknown experiment name, or any bad setting (see the commands).
    """
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    fn = EXPERIMENTS[name]
    if protocol is None:
        return fn(cfg, seeds, out_dir=out_dir, overrides=overrides, **kwargs)
    return fn(cfg, seeds, protocol, out_dir, overrides, **kwargs)
