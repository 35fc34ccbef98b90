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
from dedn.runfolder import RunFolder
from dedn.train.callbacks import BestOverTraining
from dedn.train.rundir import load_run_config
from dedn.train.trainer import Trainer


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
    run_dir = Path(run_dir) if run_dir is not None else RunFolder.new(cfg.output_dir, cfg.name).path
    if not resume:
        RunFolder(run_dir).check_new()
    elif not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run folder to resume")
    protocol = cfg.eval.protocol
    job = None
    if protocol != "fixed":  # checked (validation task included) before anything is written into the folder
        from dedn.apps.experiments import protocol_job

        job = protocol_job(cfg, run_dir)
    with RunFolder(run_dir).lock():  # one writer per run folder, for the whole protocol
        if job is None:
            return _train_fixed(cfg, run_dir, resume)
        from dedn.apps.experiments import run_job

        run = run_job(job)
    metrics = {**run.metrics, "gamma": run.choices.get("gamma"), "gamma_source": run.choices.get("gamma_source")}
    return ProtocolResult(protocol, run_dir, run_dir / RunFolder.MODEL_FOLDERS[protocol], metrics, run.choices)


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
