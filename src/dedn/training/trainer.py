"""Training a model of any registered method: batches, the optimiser, periodic evaluation, checkpoints and
resume (docs/method.md, "Training").

A run lives in a run directory::

    RUN/config.json          the resolved config
    RUN/train.log            the log
    RUN/history.jsonl        one line per epoch (loss; T / U / S / H, gamma, AUSUC when evaluated)
    RUN/metrics.csv          the same, one CSV row per epoch, for spreadsheets and plotting tools
    RUN/tensorboard/         the same scalars for TensorBoard, with ``train.tensorboard=true``
    RUN/checkpoints/last.*   the latest complete checkpoint (see :mod:`dedn.training.checkpoint`)
    RUN/checkpoints/best.*   on a validation task: the checkpoint of the best validation H so far
    RUN/model.safetensors    the final weights (and ``.sha256``)
    RUN/metrics.json         final T / U / S / H, gamma and its source, AUSUC; per-class CSV, curve

Batches are drawn from a generator seeded by (seed, epoch), so a run resumed from the checkpoint of
epoch e draws exactly the batches an uninterrupted run would: both end with the same weights. With
``train.rng=released`` (reference mode) the initial weights, the batches and the schedule are the released
code's instead (:mod:`dedn.training.released`); a resumed replay fast-forwards its draws to the checkpoint.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dedn import __version__
from dedn.atomic import atomic_write_text
from dedn.config import RunConfig, config_hash, config_to_dict, diff_keys, without_keys
from dedn.data.dataset import ZSLData, data_fingerprint
from dedn.data.sources import ArrayFeatures, FeatureSource
from dedn.devices import join_process_group, process_rank, resolve_device
from dedn.errors import CheckpointError, ConfigError, TrainingError
from dedn.eval.calibration import Calibration, GammaSource
from dedn.eval.evaluate import Evaluation, calibration_value, evaluate_model, write_evaluation
from dedn.eval.metrics import METRIC_ORDER
from dedn.factory import build_model, load_data
from dedn.models.precision import run_precision
from dedn.models.registry import entry_for, model_entry
from dedn.runfolder import RunFolder, RunLock
from dedn.training.callbacks import Callback
from dedn.training.checkpoint import checkpoint_record, load_checkpoint, save_checkpoint, save_weights
from dedn.training.released import (
    ReleasedBatches,
    check_replay_data,
    draw_initial_weights,
    released_generators,
    released_schedule,
)
from dedn.training.rundir import read_json, write_class_file, write_feature_provenance
from dedn.training.schedule import Segment, epoch_schedule

log = logging.getLogger("dedn")


# ---------------------------------------------------------------------------------------------- batches
class BatchSampler:
    """Image indices of each training batch, deterministic in (seed, epoch).

    Balanced (the reference): min(n_seen, B) distinct seen classes, max(B // n_seen, 1) images of each,
    drawn with replacement. Otherwise B distinct trainval images at random.
    """

    def __init__(self, labels: np.ndarray, trainval_loc: np.ndarray, batch_size: int, balanced: bool,
                 seed: int) -> None:
        self.trainval = np.asarray(trainval_loc, dtype=np.int64)
        self.labels = np.asarray(labels)
        self.batch_size = batch_size
        self.balanced = balanced
        self.seed = seed
        tv_labels = self.labels[self.trainval]
        self.classes = np.unique(tv_labels)
        self.by_class = [self.trainval[tv_labels == c] for c in self.classes]

    def epoch(self, epoch: int, n_iters: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        return [self._draw(rng) for _ in range(n_iters)]

    def segment(self, segment: Segment) -> list[np.ndarray]:
        """The batches of one segment of the schedule (an epoch)."""
        return self.epoch(segment.index, segment.steps)

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        if not self.balanced:
            return rng.choice(self.trainval, size=min(self.batch_size, self.trainval.size), replace=False)
        n_seen = self.classes.size
        n_classes = min(n_seen, self.batch_size)
        per_class = max(self.batch_size // n_seen, 1)
        picked = rng.choice(n_seen, size=n_classes, replace=False)
        return np.concatenate([rng.choice(self.by_class[c], size=per_class, replace=True) for c in picked])


# ---------------------------------------------------------------------------------------------- optimisers
#: ``train.optimizer`` -> the optimiser over a model's trainable parameters (names: :data:`dedn.config.OPTIMIZERS`).
#: Weight decay is the coupled L2 term of each torch optimiser, as in the published code.
OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter], Any], torch.optim.Optimizer]] = {
    "rmsprop": lambda params, t: torch.optim.RMSprop(params, lr=t.lr, alpha=t.alpha, eps=t.eps,
                                                     weight_decay=t.weight_decay, momentum=t.momentum),
    "adam": lambda params, t: torch.optim.Adam(params, lr=t.lr, eps=t.eps, weight_decay=t.weight_decay),
    "sgd": lambda params, t: torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay),
}


# ---------------------------------------------------------------------------------------------- trainer
def _summary_writer_class() -> Any:
    """TensorBoard's ``SummaryWriter``; ConfigError with the install line when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install 'dedn[tensorboard]' "
                          "(or pip install tensorboard), or set train.tensorboard=false") from None
    return SummaryWriter


def _tensorboard_writer(folder: Path) -> Any:
    """A TensorBoard writer on ``folder``."""
    return _summary_writer_class()(str(folder))


@dataclass
class TrainResult:
    """What a finished run produced."""

    run_dir: Path | None
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def best(self, key: str = "H") -> dict[str, Any] | None:
        """The evaluation with the highest ``key`` (the published protocol's best-over-training)."""
        rows = [h for h in self.history if key in h]
        return max(rows, key=lambda h: h[key]) if rows else None


class Trainer:
    """Train one model (of the method ``model.name`` names).

    Under ``torchrun --nproc_per_node N`` each process takes every N-th image of each batch. Its loss is
    weighted by its share of the batch, and DistributedDataParallel averages the gradients, so for losses
    that are means over the batch (all paper-mode terms, and reference mode's except the self-calibration
    term, a log of a batch mean) the update is the one of a single process on the whole batch, also for
    uneven shards. Rank 0 evaluates and writes the run directory.

    Args:
        cfg: the run configuration.
        data: the dataset (loaded from ``cfg`` when None).
        run_dir: where to write config, log, checkpoints and metrics (nothing is written when None).
        model: a model to train (built from ``cfg`` and ``data`` when None).
        calibration: the calibration of its evaluations (default: what ``eval.calibration`` asks for; the
            validated protocol passes the value it chose on the validation task).
    """

    def __init__(self, cfg: RunConfig, data: ZSLData | None = None, run_dir: str | Path | None = None,
                 model: nn.Module | None = None, calibration: Calibration | None = None,
                 callbacks: Sequence[Callback] = ()) -> None:
        self.cfg = cfg
        if cfg.train.tensorboard:
            _summary_writer_class()  # refused before any work when tensorboard is missing
        self.precision = run_precision(cfg.train.precision, cfg.train.dtype)  # checked once, before any work
        self.data = data if data is not None else load_data(cfg)
        self.calibration = calibration if calibration is not None else calibration_value(cfg, self.data)
        self.callbacks = list(callbacks)
        self.device = resolve_device(cfg.train.device)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}.get(cfg.train.dtype)
        if self.dtype is None:
            raise ConfigError(f"train.dtype must be float32 or float64, got {cfg.train.dtype!r}")
        self.dataset = self.data.name
        replay = cfg.train.rng == "released"
        if replay:
            if not model_entry(cfg.model.name).replays_released:
                raise ConfigError(f"train.rng=released: model.name={cfg.model.name} has no released run to "
                                  "replay draw for draw; use train.rng=dedn")
            check_replay_data(self.data, cfg.data.path)
        self.model = self._initial_model(model, replay).to(self.device, self.dtype)
        self.entry = entry_for(self.model)
        join_process_group(self.device)
        self.rank, self.world = process_rank()
        self.forward = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.optimizer = self._optimizer()
        self.iters_per_epoch = cfg.train.iters_per_epoch or max(self.data.trainval_loc.size // cfg.train.batch_size, 1)
        self.sampler, self.schedule = self._batches_and_schedule(replay)
        # The released loop evaluates only on its schedule; dedn's also evaluates a run cut short by max_iters.
        self._evaluate_last = not replay
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.writer = self.rank == 0  # only rank 0 writes the run directory
        self._tensorboard: Any = None
        self.start_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.losses: list[float] = []
        self._check_features()
        self.features = self._features_on_device()
        self.seen_mask_t = torch.as_tensor(self.data.seen_mask, device=self.device)
        if self.run_dir is not None and self.writer:
            self._open_run_dir()

    def _initial_model(self, model: nn.Module | None, replay: bool) -> nn.Module:
        """The given model, or one built from the config (with the released code's draws when replaying)."""
        if model is not None:
            return model
        model = build_model(self.cfg, self.data)
        if replay:
            draw_initial_weights(model, released_generators(self.cfg.seed)[0])
        return model

    def _optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return OPTIMIZERS[self.cfg.train.optimizer](params, self.cfg.train)

    def _batches_and_schedule(self, replay: bool) -> tuple[BatchSampler | ReleasedBatches, list[Segment]]:
        """dedn's sampler and epochs, or the released code's batches and iteration/evaluation schedule."""
        t, data = self.cfg.train, self.data
        if replay:
            return (ReleasedBatches(data.labels, data.trainval_loc, t.batch_size, t.balanced, self.cfg.seed,
                                    self.model),
                    released_schedule(data.trainval_loc.size, t.epochs, t.batch_size))
        return (BatchSampler(data.labels, data.trainval_loc, t.batch_size, t.balanced, self.cfg.seed),
                epoch_schedule(t.epochs, self.iters_per_epoch, t.eval_every))

    # -------------------------------------------------------------------------- run directory
    def _open_run_dir(self) -> None:
        assert self.run_dir is not None
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"{self.run_dir}: the run folder is an existing file; choose a folder")
        self._lock = RunLock(self.run_dir).acquire()  # held until close(): one writer per run folder
        try:
            self._write_run_files()
            if self.cfg.train.tensorboard:
                self._tensorboard = _tensorboard_writer(self.run_dir / RunFolder.TENSORBOARD)
        except BaseException:
            self.close()
            raise

    def _write_run_files(self) -> None:
        assert self.run_dir is not None
        cfg_file = self.run_dir / RunFolder.CONFIG
        resolved = config_to_dict(self.cfg)
        if cfg_file.exists():
            old = read_json(cfg_file, "config")
            changed = diff_keys(without_keys(old), without_keys(resolved))
            if changed:
                raise ConfigError(f"{cfg_file}: this run folder was made with another config (differs in "
                                  f"{', '.join(changed[:5])}); use another run folder, or resume with the same "
                                  "config")
            if old != resolved:  # only where or how visibly it runs changed (device, threads, progress bar)
                atomic_write_text(cfg_file, json.dumps(resolved, indent=2))
        else:
            atomic_write_text(cfg_file, json.dumps(resolved, indent=2))
        handler = logging.FileHandler(self.run_dir / RunFolder.LOG)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        self._log_handler = handler

    def _check_features(self, limit_bytes: float = 4e9) -> None:
        """Refuse NaN or infinite feature maps before training: a full scan of stored features up to
        ``limit_bytes``; larger (and generated) features are checked batch by batch as they are read."""
        from dedn.data.store import FeatureStore

        feats = self.data.features
        if not isinstance(feats, (ArrayFeatures, FeatureStore)):
            return
        if int(np.prod(feats.shape)) * 4 > limit_bytes:
            return
        used = np.concatenate([self.data.trainval_loc, self.data.test_seen_loc, self.data.test_unseen_loc])
        for s in range(0, used.size, 512):
            self.data.check_features_finite(used[s : s + 512])

    def _features_on_device(self) -> FeatureSource:
        """Keep the features resident on the GPU when the source can and they fit (a feature store); otherwise
        read batches from the host."""
        if self.device.type == "cuda":
            resident = self.data.features.resident_copy(self.device)
            if resident is not None:
                log.info("feature store resident on %s", self.device)
                return resident
        return self.data.features

    def _host_batch(self, index: np.ndarray) -> torch.Tensor:
        """The batch's feature maps: read from the source (in a worker thread) or gathered on the device."""
        # bf16 runs convert the batch once, here in the reader's thread and off the step: a float16 store's maps
        # straight to bf16 (no float32 copy), the model then normalises them in bf16
        if self.precision != "bf16":
            return self.features.read(index)
        return self.features.read(index, stored_dtype=True).to(torch.bfloat16)

    def resume(self) -> bool:
        """Continue from the run directory's last checkpoint; False when the run has not trained yet.

        Raises:
            CheckpointError: the run trained (history or checkpoint files exist) but its checkpoint record is
                missing, or the data or the resolved config changed since the checkpoint was written.
        """
        if self.run_dir is None:
            return False
        folder = self.run_dir / RunFolder.CHECKPOINTS
        history_file = self.run_dir / RunFolder.HISTORY
        if not checkpoint_record(folder).exists():
            trained = (history_file.exists() and history_file.stat().st_size > 0) or (
                folder.is_dir() and any(p.name.startswith("last") for p in folder.iterdir()))
            if trained:
                raise CheckpointError(f"{checkpoint_record(folder)}: the checkpoint record is missing, so this run "
                                      "cannot be resumed exactly; restore it, or start a new run in another folder")
            return False
        _, record = load_checkpoint(folder, optimizer_for=self.model, optimizer=self.optimizer,
                                    device=self.device)
        for key, now, what in (("data_fingerprint", self.identity["data_fingerprint"], "the data (features, labels, "
                                "splits or semantic side)"),
                               ("config_hash", self.identity["config_hash"], "the resolved config")):
            if key in record and record[key] != now:
                raise CheckpointError(f"{checkpoint_record(folder)}: {what} changed since this checkpoint was written; "
                                      "resuming would mix two runs: restore them, or start a new run in another "
                                      "folder")
        self.start_epoch = int(record["epoch"]) + 1
        self.history = list(record.get("history", []))
        self.losses = list(record.get("losses", []))
        if self.writer:  # epochs after the checkpoint are trained again: drop their history lines
            atomic_write_text(history_file, "".join(json.dumps(r) + "\n" for r in self.history))
        log.info("resumed from %s at epoch %d", folder, self.start_epoch)
        return True

    @functools.cached_property
    def identity(self) -> dict[str, str]:
        """What a checkpoint records so that resume can refuse other data or another config (computed once)."""
        return {"data_fingerprint": data_fingerprint(self.data), "config_hash": config_hash(self.cfg)}

    def _is_best(self, row: dict[str, Any]) -> bool:
        """Whether ``row`` has the best validation H so far (ties keep the earlier epoch); never on test data."""
        if self.data.provenance.get("split") != "validation":
            return False
        earlier = [h["H"] for h in self.history[:-1] if "H" in h]
        return not earlier or row["H"] > max(earlier)

    def _write_epoch_logs(self, row: dict[str, Any]) -> None:
        """``metrics.csv`` (one row per epoch, rewritten whole so a resumed run has no duplicates) and, with
        ``train.tensorboard``, the same scalars for TensorBoard."""
        assert self.run_dir is not None
        keys = ["epoch", "loss", "seconds", *METRIC_ORDER, "gamma", "gamma_source"]
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(keys)
        for h in self.history:
            w.writerow(["" if h.get(k) is None else h.get(k) for k in keys])
        atomic_write_text(self.run_dir / RunFolder.METRICS_CSV, buf.getvalue())
        if self._tensorboard is not None:
            for k in ("loss", *METRIC_ORDER, "gamma"):
                if isinstance(row.get(k), (int, float)):
                    self._tensorboard.add_scalar(k, row[k], row["epoch"])
            self._tensorboard.flush()

    def _checkpoint(self, epoch: int, name: str = "last") -> None:
        if self.run_dir is None or not self.writer:
            return
        state = {"epoch": epoch, "history": self.history, "losses": self.losses, "version": __version__,
                 **self.identity}
        save_checkpoint(self.run_dir / RunFolder.CHECKPOINTS, self.model, self.optimizer, state, name=name)
        for cb in self.callbacks:
            cb.on_checkpoint(self, epoch, name)

    # -------------------------------------------------------------------------- loop
    def train_step(self, index: np.ndarray, batch: torch.Tensor | None = None,
                   share: float | None = None) -> dict[str, float]:
        """One optimisation step on the images ``index``; raises TrainingError on a non-finite loss.

        Under torch.distributed ``index`` is this rank's shard of the batch and ``share`` its fraction of
        the whole batch (default ``1 / world``). The loss is weighted by ``world * share`` so that
        DistributedDataParallel's gradient average is the gradient of the whole batch's mean loss, also
        when the shards are uneven (a batch of 50 on 4 ranks: 13/13/12/12).

        With ``train.precision=bf16`` the maps arrive in bf16 (converted once by :meth:`_host_batch`) and keep that
        dtype here; the model runs its bf16 path.
        """
        self.model.train()
        x = self._host_batch(index) if batch is None else batch
        x = x.to(self.device) if self.precision == "bf16" else x.to(self.device, self.dtype)
        if not torch.isfinite(x).all():
            self.data.check_features_finite(index)  # names the images
        y = torch.as_tensor(self.data.labels[index], device=self.device)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.forward(x, precision=self.precision)
        terms = self.entry.loss(self.model, out, y, self.seen_mask_t, self.cfg.loss)
        finite = torch.isfinite(terms.total.detach()).to(torch.float32)
        if self.world > 1:  # every rank must stop together, or the others hang in the gradient all-reduce
            import torch.distributed as dist

            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            raise TrainingError(f"the loss became {float(terms.total.detach())} ({terms.items()}); training stopped "
                                "before the update")
        weight = 1.0 if self.world == 1 else self.world * (1.0 / self.world if share is None else share)
        (terms.total * weight if weight != 1.0 else terms.total).backward()
        self.optimizer.step()
        items = terms.items()
        if self.world > 1:  # log the loss of the whole batch, as one process would
            import torch.distributed as dist

            loss = torch.tensor([items["loss"] * weight / self.world], dtype=torch.float64)
            dist.all_reduce(loss)
            items["loss"] = float(loss)
        return items

    def evaluate(self, progress: bool = False) -> Evaluation:
        """Evaluate the model on the test (or validation) split, in the run's ``train.precision``.

        A copy resident on the GPU is evaluated from there, its batches in the stored dtype (the model converts
        them on the device); maps read from the host arrive in float32.
        """
        resident = self.features is not self.data.features
        data = replace(self.data, features=self.features) if resident else self.data
        return evaluate_model(self.model, data, self.calibration, self.cfg.eval.batch_size, self.device,
                              progress, precision=self.precision,
                              stored_dtype=resident)

    def fit(self, final_evaluation: bool = True) -> TrainResult:
        """Train through the schedule (from the resumed segment), evaluating and checkpointing.

        The schedule is ``train.epochs`` epochs, or with ``train.rng=released`` the released code's
        iterations and evaluations; each segment of it is one history row. With ``final_evaluation`` (the
        default) the last segment is evaluated (once more when it ended unevaluated) and the weights, class file
        and metrics are written; without it the run ends with the last segment's checkpoint, unevaluated (what a
        speed benchmark measures).
        """
        t = self.cfg.train
        total_iters = sum(s.steps for s in self.schedule)
        if t.max_iters is not None:
            total_iters = min(total_iters, t.max_iters)
        done = min(sum(s.steps for s in self.schedule[: self.start_epoch]), total_iters)
        bar = tqdm(total=total_iters, initial=done, desc="training", unit="it",
                   disable=not (t.progress and self.writer), dynamic_ncols=True)
        pool = ThreadPoolExecutor(max_workers=1)  # reads the next batch while this one computes
        last_eval: Evaluation | None = None
        try:
            for seg in self.schedule[self.start_epoch :]:
                if done >= total_iters:
                    break
                n = min(seg.steps, total_iters - done)
                final = seg is self.schedule[-1] or done + n >= total_iters
                evaluate_last = final and final_evaluation
                last_eval = self._run_segment(seg, n, done, (final, evaluate_last), (pool, bar))
                done += n
            metrics: dict[str, Any] = {}
            if self.writer and final_evaluation:
                metrics = self._finish(last_eval if last_eval is not None else self.evaluate())
        finally:
            bar.close()
            pool.shutdown(wait=True)
            self.close()
        return TrainResult(self.run_dir, self.model, self.history, metrics, self.losses)

    def _run_segment(self, seg: Segment, n: int, done: int, last: tuple[bool, bool],
                     loop: tuple[ThreadPoolExecutor, Any]) -> Evaluation | None:
        """Train the first ``n`` steps of one segment (``done`` steps came before it), evaluate when the schedule
        says so, log and checkpoint. ``last``: whether this is the last segment, and whether that one is
        evaluated; ``loop``: the batch reader's thread pool and the progress bar.

        Returns the segment's evaluation, or None when it was not evaluated.
        """
        pool, bar = loop
        epoch = seg.index
        batches = self.sampler.segment(seg)
        started = time.perf_counter()
        sizes = [len(b) for b in batches]
        batches = [b[self.rank :: self.world] for b in batches]  # this process's share of each batch
        epoch_losses: list[float] = []
        pending = pool.submit(self._host_batch, batches[0]) if n else None
        for i in range(n):
            assert pending is not None
            x = pending.result()
            if i + 1 < n:
                pending = pool.submit(self._host_batch, batches[i + 1])
            for cb in self.callbacks:
                cb.on_step_start(self)
            try:
                items = self.train_step(batches[i], x, share=len(batches[i]) / sizes[i])
            except TrainingError as exc:
                saved = self.run_dir is not None and bool(self.history)
                where = f"; the last good checkpoint is in {self.run_dir}/checkpoints" if saved else ""
                raise TrainingError(f"epoch {epoch} iteration {i}: {exc}{where}") from None
            for cb in self.callbacks:
                cb.on_step_end(self, items)
            epoch_losses.append(items["loss"])
            bar.update(1)
            bar.set_postfix(loss=f"{items['loss']:.3f}", epoch=epoch)
        mean_loss = float(np.mean(epoch_losses)) if epoch_losses else math.nan
        self.losses.append(mean_loss)
        row: dict[str, Any] = {"epoch": epoch, "iterations": done + n, "loss": mean_loss,
                               "seconds": round(time.perf_counter() - started, 3)}
        evaluation = None  # the weights changed: an earlier evaluation no longer describes them
        final, evaluate_final = last
        scheduled = (seg.evaluate and n == seg.steps) or (final and self._evaluate_last)
        if self.writer and scheduled and (evaluate_final or not final):
            evaluation = self.evaluate()
            row.update(evaluation.summary())
            for cb in self.callbacks:
                cb.on_evaluate(self, epoch, evaluation)
            bar.set_postfix(loss=f"{mean_loss:.3f}", H=f"{row['H']:.1f}", epoch=epoch)
        self._log_segment(row)
        if (self.cfg.train.checkpoint_every and (epoch + 1) % self.cfg.train.checkpoint_every == 0) or final:
            self._checkpoint(epoch)
        if "H" in row and self._is_best(row):  # only a validation task's H may choose a checkpoint
            self._checkpoint(epoch, name="best")
        for cb in self.callbacks:
            cb.on_segment_end(self, row)
        return evaluation

    def _log_segment(self, row: dict[str, Any]) -> None:
        """Append the segment's row to the history, the log, ``history.jsonl`` and the epoch logs."""
        self.history.append(row)
        log.info(json.dumps(row))
        if self.run_dir is not None and self.writer:
            with open(self.run_dir / RunFolder.HISTORY, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            self._write_epoch_logs(row)

    def close(self) -> None:
        """Detach the run's log file and release the run folder's lock (idempotent)."""
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()
            self._log_handler = None
        board = getattr(self, "_tensorboard", None)
        if board is not None:
            board.close()
            self._tensorboard = None
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
            self._lock = None

    def _finish(self, ev: Evaluation) -> dict[str, Any]:
        """Final weights, class file, metrics and outputs (rank 0)."""
        extra = self._final_record(ev.gamma)
        if ev.gamma_source != GammaSource.VALIDATED:
            extra["oracle_on_test"] = {"note": "diagnosis only, not a result: gamma chosen on these test scores",
                                       "H": ev.best.H * 100, "gamma": ev.best_gamma}
        if self.run_dir is None:
            out = ev.result.to_dict(percent=True)
            out.update(extra)
            return out
        save_weights(self.model, self.run_dir / RunFolder.MODEL, record_hash=True)
        write_class_file(self.run_dir, self.data, calibration=ev.gamma)
        write_feature_provenance(self.run_dir, self.data.provenance)
        return write_evaluation(ev, self.run_dir, self.data.class_names, extra, plots=self.cfg.eval.plots,
                                label=self.entry.label)

    def _final_record(self, last_gamma: float | None) -> dict[str, Any]:
        """What the final metrics record says about the run, with the callbacks' entries."""
        record: dict[str, Any] = {
            "mode": self.cfg.mode,
            "split": self.cfg.data.split,
            "gamma": last_gamma,
            "gamma_source": self.calibration.source,
            "l_rc": self.model.config.l_rc,
            "l_e": self.model.config.l_e,
            "dataset": self.dataset,
            "epochs_trained": len(self.history),
        }
        for cb in self.callbacks:
            cb.on_fit_end(self, record)
        record["version"] = __version__
        return record
