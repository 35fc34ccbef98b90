"""Train one model under a model-selection protocol: what ``dedn train`` and :func:`train` run.

``eval.protocol`` says how the reported numbers are obtained, and every result names it:

- ``validated`` (the default, honest): choose the number of epochs and the calibration gamma on a validation
  task made of trainval images and trainval classes only, retrain on all of trainval for that many epochs,
  and test once with that gamma. The run folder holds ``selection.json`` (what was chosen, and the
  validation task's classes), ``validation/`` (the selection run) and ``final/`` (the final model).
- ``published``: what the released code reports: evaluate on the test split after every epoch at a fixed
  calibration (``eval.calibration``, else the mode default) and report the best H over training. Optimistic;
  use it only to compare with published numbers. The model is in ``train/``.
- ``fixed``: one plain run: train for ``train.epochs`` on the split the config names and evaluate once at a
  fixed calibration (``eval.calibration``, else the mode default). The run folder is the model folder.

``validated`` and ``published`` run the very job that ``dedn experiment table1 --seeds 1`` runs for the same
config and seed (:func:`dedn.apps.experiments.protocol_job`), so the two give the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dedn.config import RunConfig, config_from_dict
from dedn.devices import use_threads
from dedn.errors import CheckpointError, ConfigError
from dedn.train.callbacks import BestOverTraining
from dedn.train.rundir import check_new_run_dir, load_run_config, lock_run_dir, new_run_dir
from dedn.train.trainer import Trainer

#: The model folder of each protocol, inside its run folder.
MODEL_FOLDERS = {"validated": "final", "published": "train", "fixed": "."}
JOB_RECORD = "job.json"


@dataclass
class ProtocolResult:
    """What :func:`train` produced.

    Attributes:
        protocol: validated, published or fixed.
        run_dir: the run folder.
        model_dir: the folder holding the reported model (``model.safetensors``, ``metrics.json``).
        metrics: T, S, U, H, AUSUC (percent, test split), ``gamma`` and ``gamma_source``.
        choices: what the protocol chose or read off (epochs, gamma, validation scores, ...).
    """

    protocol: str
    run_dir: Path
    model_dir: Path
    metrics: dict[str, Any]
    choices: dict[str, Any] = field(default_factory=dict)


def train(cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False) -> ProtocolResult:
    """Train and evaluate as ``cfg.eval.protocol`` says; write to ``run_dir`` (default OUTPUT_DIR/NAME-TIME).

    ``resume`` continues an interrupted run in ``run_dir`` (finished stages are reused, the unfinished one
    continues from its last checkpoint).

    Raises:
        ConfigError: ``run_dir`` already holds something and ``resume`` is not set, or a bad setting.
    """
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    if not resume:
        check_new_run_dir(run_dir)
    elif not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder to resume")
    protocol = cfg.eval.protocol
    job = None
    if protocol != "fixed":  # checked (validation task included) before anything is written into the folder
        from dedn.apps.experiments import protocol_job

        job = protocol_job(cfg, run_dir)
    with lock_run_dir(run_dir):  # one writer per run folder, for the whole protocol
        if job is None:
            return _train_fixed(cfg, run_dir, resume)
        from dedn.apps.experiments import run_job

        run = run_job(job)
    metrics = {**run.metrics, "gamma": run.choices.get("gamma"), "gamma_source": run.choices.get("gamma_source")}
    return ProtocolResult(protocol, run_dir, run_dir / MODEL_FOLDERS[protocol], metrics, run.choices)


def _train_fixed(cfg: RunConfig, run_dir: Path, resume: bool) -> ProtocolResult:
    use_threads(cfg.train.threads)
    trainer = Trainer(cfg, run_dir=run_dir, callbacks=[BestOverTraining()])
    try:
        if resume:
            trainer.resume()
        result = trainer.fit()
    finally:
        trainer.close()
    metrics = {k: result.metrics.get(k) for k in ("T", "S", "U", "H", "AUSUC", "gamma", "gamma_source")}
    oracle = result.metrics.get("oracle_on_test")
    if oracle:
        metrics.update(oracle_H=oracle["H"], oracle_gamma=oracle["gamma"])
    choices = {"epochs": cfg.train.epochs, "split": cfg.data.split}
    return ProtocolResult("fixed", run_dir, run_dir, metrics, choices)


def load_protocol_config(run_dir: str | Path) -> RunConfig:
    """The config of a run folder written by :func:`train` (any protocol), for ``--resume``."""
    run_dir = Path(run_dir)
    job = run_dir / JOB_RECORD
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
    run_dir = Path(run_dir)
    if (run_dir / "config.json").is_file() or (run_dir / "model.safetensors").is_file():
        return run_dir
    for sub in (MODEL_FOLDERS["validated"], MODEL_FOLDERS["published"]):
        if (run_dir / sub / "config.json").is_file():
            return run_dir / sub
    if (run_dir / JOB_RECORD).is_file():
        raise CheckpointError(f"{run_dir}: this run has not finished training its reported model yet; continue it "
                              f"with `dedn train --resume {run_dir}`")
    raise CheckpointError(f"{run_dir}: not a dedn run folder (no model.safetensors or config.json here, and no "
                          "final/ or train/ run inside)")
