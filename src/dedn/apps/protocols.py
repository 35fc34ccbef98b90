"""The model-selection protocols, one job and its record, and the single-run API (``dedn train``).

``eval.protocol`` (:class:`ProtocolName`) says how the reported numbers are obtained, and every result names it:

- ``validated`` (the default, honest): choose the number of epochs, the calibration gamma and, when a tune grid
  is given, the settings of that grid on a validation task made of trainval images and trainval classes only
  (:mod:`dedn.apps.selection`), retrain on all of trainval for that many epochs, and test once with that gamma.
  The job folder holds ``selection.json`` (what was chosen, and the validation task's classes),
  ``validation/combo-NN/`` (one selection run per training-setting combination) and ``final/`` (the final model).
- ``published``: what the released code reports: evaluate on the test split after every epoch at a fixed
  calibration (``eval.calibration``, else the mode default) and report the best H over training (and,
  separately, the best T). Optimistic; use it only to compare with published numbers. The model is in ``train/``.
- ``fixed``: one plain run: train for ``train.epochs`` on the split the config names and evaluate once at a
  fixed calibration (``eval.calibration``, else the mode default). The run folder is the model folder.

``validated`` and ``published`` run as a :class:`Job` (:func:`run_job`): ``job.json`` (the job's config hash,
written when it starts) and ``done.json`` (its result, written atomically when it is complete). :func:`train`
runs the very job (:func:`protocol_job`) that ``dedn experiment table1 --seeds 1`` runs for the same config and
seed, so the two give the same numbers. This module knows nothing of experiments or launchers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from dedn.apps.datacache import DataCache
from dedn.apps.results import Row, RunResult
from dedn.apps.selection import (
    SelectOutputs,
    best_over_epochs,
    check_selected,
    check_validation_task,
    choose_on_validation,
    published_figures,
    published_sweep,
    read_grid,
    selection_record,
    sweep_points,
    validated_sweep,
    validation_calibration,
)
from dedn.atomic import atomic_write_text
from dedn.checks import Choice, parse_calibration
from dedn.config import (
    VOLATILE_KEYS,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_hash,
    config_to_dict,
    diff_keys,
    has_key,
    set_keys,
    without_keys,
)
from dedn.data.dataset import ZSLData
from dedn.devices import use_threads
from dedn.errors import CheckpointError, ConfigError
from dedn.eval.calibration import Calibration, config_calibration, default_gamma
from dedn.eval.metrics import METRIC_ORDER, Metrics
from dedn.hostmemory import keep_freed_host_memory
from dedn.models.registry import model_entry
from dedn.runfolder import RunFolder
from dedn.training.callbacks import BestOverTraining, Callback
from dedn.training.rundir import load_run_config
from dedn.training.trainer import Trainer, TrainResult


class ProtocolName(Choice):
    """The model-selection protocols (``eval.protocol``); each value is the name configs and the CLI use."""

    VALIDATED = "validated"
    PUBLISHED = "published"
    FIXED = "fixed"


#: Keys left out of config hashes: they change neither a result nor where it is stored.
UNHASHED_KEYS = (*VOLATILE_KEYS, "name", "output_dir")


def utc_now() -> str:
    """The time now, UTC, to the second (ISO 8601): when a job finished or a launch started."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def checked_overrides(cfg: RunConfig, overrides: Sequence[str], origin: str) -> RunConfig:
    """``cfg`` with ``dotted.key=value`` overrides applied and checked (ConfigError names the key)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" in item and not has_key(key):
            raise ConfigError(f"{origin}: {key!r} is not a setting of RunConfig")
    return apply_overrides(cfg, overrides, origin)


# ============================================================================================ one job
def config_row(base: RunConfig) -> Row:
    """The one row of an experiment on the config's own method, named after it."""
    return Row(base.model.name, model_entry(base.model.name).label)


@dataclass
class Job:
    """One (row, protocol, seed) job of an experiment, picklable (sent to worker processes as it is).

    Attributes:
        row, protocol, seed: what to run (``protocol``: validated or published).
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
        return config_hash(self.config, UNHASHED_KEYS, length=16, extra={
            "protocol": self.protocol, "eval_grid": self.eval_grid, "train_combos": self.train_combos,
            "sweep": self.sweep, "row": asdict(self.row)})


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
    cfg = checked_overrides(cfg, combo, f"{rel} config")
    return set_keys(cfg, {**changes, "name": rel, "output_dir": rel})


def _run_published(job: Job, cfg: RunConfig, folder: Path, cache: DataCache) -> RunResult:
    calib = cfg.eval.calibration if isinstance(cfg.eval.gamma, float) else "auto"
    stage = RunFolder.MODEL_FOLDERS[ProtocolName.PUBLISHED]
    scfg = _stage_config(cfg, job, stage, (), {"data.split": "test", "train.eval_every": 1,
                                                 "eval.protocol": "published", "eval.calibration": calib})
    data = cache.load(scfg)
    # A fixed calibration, as the released code: the configured number, else the mode's default (2 eps in
    # paper mode, the margin of eq. 14; 0 in reference mode, whose margin is inside the scores).
    fixed = config_calibration(parse_calibration(calib), default_gamma(cfg, data.name), on_validation_task=False)
    gamma = float(fixed.value)
    l_rc, l_e = cfg.model.l_rc, cfg.model.l_e
    points = list(dict.fromkeys([(l_rc, l_e)] + [(p[2], p[3]) for p in sweep_points(job.sweep, l_rc, l_e)]))
    run_dir = folder / stage
    result, trainer = _train_stage(scfg, data, run_dir, fixed, [SelectOutputs(points, [(l_rc, l_e)], fixed)])
    grid = read_grid(RunFolder(run_dir).grid)
    at_h, at_t = best_over_epochs(grid, l_rc, l_e, "H"), best_over_epochs(grid, l_rc, l_e, "T")
    check_selected(run_dir, at_h["epoch"])
    metrics = published_figures(at_h, at_t)
    choices = {"how": "best test-split H over training (and best T separately), fixed calibration",
               "calibration": gamma, "gamma": gamma, "gamma_source": fixed.source, "l_rc": l_rc, "l_e": l_e,
               "epoch_best_H": at_h["epoch"],
               "epoch_best_T": at_t["epoch"], "T_at_best_H": at_h["T"], "epochs_trained": len(result.history)}
    points_out = published_sweep(grid, job.sweep, l_rc, l_e, fixed)
    return RunResult(job.row.key, job.row.label, job.protocol, job.seed, metrics, choices, trainer.dataset,
                     str(folder), RunFolder.selected_outputs(stage), points_out, trainer.model.config.n_clusters)


def _run_validated(job: Job, cfg: RunConfig, folder: Path, cache: DataCache) -> RunResult:
    calibration = validation_calibration(cfg)
    lrcs = job.eval_grid.get("model.l_rc", [cfg.model.l_rc])
    les = job.eval_grid.get("model.l_e", [cfg.model.l_e])
    tune_points = [(float(a), float(b)) for a in lrcs for b in les]
    selection_file = RunFolder(folder).selection
    if selection_file.exists():
        selection = json.loads(selection_file.read_text())
    else:
        selection = _validate_stage(job, cfg, folder, tune_points, calibration, cache)
        atomic_write_text(selection_file, json.dumps(selection, indent=2))

    stage = RunFolder.MODEL_FOLDERS[ProtocolName.VALIDATED]
    fcfg = _stage_config(cfg, job, stage, list(selection["overrides"]), {
        "data.split": "test", "train.epochs": int(selection["epochs"]), "train.eval_every": 0,
        "eval.protocol": "validated", "eval.calibration": repr(float(selection["gamma"])),
        "model.l_rc": float(selection["l_rc"]), "model.l_e": float(selection["l_e"])})
    data = cache.load(fcfg)
    run_dir = folder / stage
    chosen = Calibration(float(selection["gamma"]), calibration.source)
    result, trainer = _train_stage(fcfg, data, run_dir, chosen)
    np.save(run_dir / RunFolder.SEEN_MASK, data.seen_mask)
    metrics = {k: float(result.metrics[k]) for k in METRIC_ORDER}
    outputs = RunFolder.test_outputs(stage)
    points_out = (validated_sweep(folder, selection, outputs, data.seen_mask, calibration, chosen.source, job.sweep)
                  if job.sweep else [])
    choices = {"how": ("epoch, calibration and tuned settings chosen on the validation split; retrained on "
                       "trainval for that many epochs and tested once"),
               **{k: selection[k] for k in ("epochs", "gamma", "l_rc", "l_e", "overrides")},
               "gamma_source": chosen.source, "validation": selection["validation"],
               "validation_task": selection.get("validation_task")}
    return RunResult(job.row.key, job.row.label, job.protocol, job.seed, metrics, choices, trainer.dataset,
                     str(folder), outputs, points_out, trainer.model.config.n_clusters)


def _validate_stage(job: Job, cfg: RunConfig, folder: Path, tune_points: list[tuple[float, float]],
                    calibration: Calibration, cache: DataCache) -> dict[str, Any]:
    """Run 1 of the validated protocol: one validation run per training combination; choose the best."""
    candidates = []
    for i, combo in enumerate(job.train_combos):
        stage = f"validation/combo-{i:02d}"
        vcfg = _stage_config(cfg, job, stage, combo, {"data.split": "validation", "train.eval_every": 1,
                                                      "eval.protocol": "validated"})
        data = cache.load(vcfg)
        run_dir = folder / stage
        _train_stage(vcfg, data, run_dir, calibration, [SelectOutputs(tune_points, tune_points, calibration)])
        top = choose_on_validation(read_grid(RunFolder(run_dir).grid), tune_points)
        check_selected(run_dir, top["epoch"])
        candidates.append((top, i, combo, stage, data.provenance.get("validation_task")))
    return selection_record(job.hash(), candidates)


#: Protocol -> the runner of its job: (job, config on the job's device, job folder, data cache) -> result.
JOB_RUNNERS: dict[ProtocolName, Callable[[Job, RunConfig, Path, DataCache], RunResult]] = {
    ProtocolName.VALIDATED: _run_validated,
    ProtocolName.PUBLISHED: _run_published,
}
#: The protocols that run as jobs (experiments, ``dedn experiment --protocol``), in the order they are run.
JOB_PROTOCOLS: tuple[str, ...] = tuple(p.value for p in JOB_RUNNERS)


def protocol_job(cfg: RunConfig, folder: str | Path, protocol: str | None = None,
                 cache: DataCache | None = None) -> Job:
    """The job of one model under ``protocol`` (default ``eval.protocol``) at ``cfg.seed``, in ``folder``:
    the very job ``table1`` runs for that config and seed, so both give the same numbers.

    Raises:
        ConfigError: the protocol is unknown or the config cannot run under it.
        DataError: the validated protocol's validation task is unsound (checked before any training).
    """
    protocol = cfg.eval.protocol if protocol is None else protocol
    if protocol not in JOB_PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(JOB_PROTOCOLS)}, got {protocol!r}")
    if cfg.train.epochs < 1:
        raise ConfigError(f"train.epochs must be at least 1 (the {protocol} protocol chooses among epochs), "
                          f"got {cfg.train.epochs}")
    if cfg.data.split != "test":
        raise ConfigError(f"eval.protocol={protocol} builds its own validation task from trainval; set "
                          "data.split=test (or eval.protocol=fixed to train once on the validation task)")
    if protocol == ProtocolName.VALIDATED:
        check_validation_task(cfg, cfg.seed, cache or DataCache())
    return Job(config_row(cfg), protocol, cfg.seed, cfg, str(Path(folder).resolve()), {}, [()], {})


def finished_result(job: Job) -> RunResult | None:
    """The job's result from its ``done.json`` (marked reused), or None while the job is unfinished.

    Raises:
        ConfigError: the job folder was finished with another config.
    """
    folder = Path(job.folder)
    done = RunFolder(folder).done
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


def _claim_job_folder(job: Job) -> None:
    """Write ``job.json``, or check that the folder was started by the same job."""
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = RunFolder(folder).job
    stable = without_keys(config_to_dict(job.config), UNHASHED_KEYS)
    h = job.hash()
    if marker.exists():
        old = json.loads(marker.read_text())
        if old.get("hash") != h:
            diff = ", ".join(diff_keys(old.get("config", {}), stable)[:5])
            raise ConfigError(f"{folder}: started with another config (differs in {diff or 'rows, grid or sweep'}); "
                              "it is not overwritten: use another results folder")
    else:
        atomic_write_text(marker, json.dumps({"hash": h, "config": stable}, indent=2))


def run_job(job: Job, device: str | None = None, cache: DataCache | None = None) -> RunResult:
    """Run one (row, protocol, seed) job, or return its finished result.

    Args:
        job: the job.
        device: the device to train on (default the config's ``train.device``); not part of the job's identity.
        cache: the caller's loaded data, shared with its other jobs (default: a cache of this job's own).

    Raises:
        ConfigError: the job folder was started or finished with another config (nothing is overwritten).
    """
    finished = finished_result(job)
    if finished is not None:
        return finished
    folder = Path(job.folder)
    _claim_job_folder(job)
    cfg = job.config if device is None else set_keys(job.config, {"train.device": device})
    use_threads(cfg.train.threads)
    keep_freed_host_memory()
    runner = JOB_RUNNERS[ProtocolName(job.protocol)]
    started = time.perf_counter()
    with RunFolder(folder).lock():  # one writer per job folder
        result = runner(job, cfg, folder, cache or DataCache())
    result.folder = str(folder)
    result.seconds = round(time.perf_counter() - started, 1)
    atomic_write_text(RunFolder(folder).done,
                      json.dumps({"hash": job.hash(), "finished": utc_now(), "result": result.to_dict()}, indent=2))
    return result


# ============================================================================================ one model
@dataclass
class ProtocolResult:
    """What :func:`train` produced.

    Attributes:
        protocol: validated, published or fixed.
        run_dir: the run folder.
        model_dir: the folder holding the reported model (``model.safetensors``, ``metrics.json``).
        metrics: T, U, S, H, AUSUC (percent, test split), gamma and its source.
        choices: what the protocol chose or read off (epochs, gamma, validation scores, ...; for a fixed run
            the oracle-on-test diagnosis).
    """

    protocol: str
    run_dir: Path
    model_dir: Path
    metrics: Metrics
    choices: dict[str, Any] = field(default_factory=dict)


def train(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False) -> ProtocolResult:
    """Train and evaluate as ``cfg.eval.protocol`` says; write to ``run_dir`` (default OUTPUT_DIR/NAME-TIME).

    ``resume`` continues an interrupted run in ``run_dir`` (finished stages are reused, the unfinished one
    continues from its last checkpoint).

    Raises:
        ConfigError: ``run_dir`` already holds something and ``resume`` is not set, or a bad setting.
    """
    run_dir = Path(run_dir) if run_dir is not None else RunFolder.new(cfg.output_dir, cfg.name).path
    if not resume:
        RunFolder(run_dir).check_new()
    elif not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder to resume")
    return SINGLE_RUNS[ProtocolName(cfg.eval.protocol)](cfg, run_dir, resume)


def _train_job(cfg: RunConfig, run_dir: Path, resume: bool) -> ProtocolResult:
    """A validated or published run: its job (the experiments' job for this config and seed) in ``run_dir``;
    a resumed job continues by itself, so ``resume`` only told :func:`train` to accept the folder."""
    cache = DataCache()
    job = protocol_job(cfg, run_dir, cache=cache)  # checked, validation task included, before anything is written
    with RunFolder(run_dir).lock():  # one writer per run folder, for the whole protocol
        run = run_job(job, cache=cache)
    metrics = Metrics.from_dict({**run.metrics, "gamma": run.choices.get("gamma"),
                                 "gamma_source": run.choices.get("gamma_source")})
    protocol = ProtocolName(cfg.eval.protocol)
    return ProtocolResult(protocol.value, run_dir, run_dir / RunFolder.MODEL_FOLDERS[protocol], metrics,
                          run.choices)


def _train_fixed(cfg: RunConfig, run_dir: Path, resume: bool) -> ProtocolResult:
    """A fixed run: one trainer run in ``run_dir``, evaluated once at the end."""
    with RunFolder(run_dir).lock():  # one writer per run folder
        use_threads(cfg.train.threads)
        keep_freed_host_memory()
        trainer = Trainer(cfg, run_dir=run_dir, callbacks=[BestOverTraining()])
        try:
            if resume:
                trainer.resume()
            result = trainer.fit()
        finally:
            trainer.close()
    metrics = Metrics.from_dict(result.metrics)
    choices: dict[str, Any] = {"epochs": cfg.train.epochs, "split": cfg.data.split}
    oracle = result.metrics.get("oracle_on_test")
    if oracle:  # a diagnosis, never a result: gamma chosen on the test scores themselves
        choices.update(oracle_H=oracle["H"], oracle_gamma=oracle["gamma"])
    return ProtocolResult(ProtocolName.FIXED.value, run_dir, run_dir, metrics, choices)


#: Protocol -> how :func:`train` runs one model under it: (config, run folder, resume) -> result.
SINGLE_RUNS: dict[ProtocolName, Callable[[RunConfig, Path, bool], ProtocolResult]] = {
    ProtocolName.VALIDATED: _train_job,
    ProtocolName.PUBLISHED: _train_job,
    ProtocolName.FIXED: _train_fixed,
}


def load_protocol_config(run_dir: str | Path) -> RunConfig:
    """The config of a run folder written by :func:`train` (any protocol), for ``--resume``."""
    run_dir = Path(run_dir)
    job = RunFolder(run_dir).job
    if job.is_file():
        try:
            record = json.loads(job.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{job}: unreadable ({exc})") from None
        return config_from_dict(record.get("config", {}), str(job))
    return load_run_config(run_dir)


def model_dir(run_dir: str | Path) -> Path:
    """The folder of the reported model in a run folder of any protocol (the folder itself for a plain run).

    Raises:
        CheckpointError: neither the folder nor a protocol's model folder inside it is a finished run.
    """
    return RunFolder(run_dir).model_folder().path
