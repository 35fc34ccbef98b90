"""Feature-store benchmark: train from a dataset-sized float16 store on disk with bounded memory.

:func:`run_store_bench` measures what training from a :class:`~dedn.data.store.FeatureStore` costs against
training from the same features held in RAM:

1. **build**: write the generated benchmark of a preset (SUN: 14340 x 2048 x 14 x 14, 11.5 GB in float16)
   into a store with :meth:`~dedn.data.store.FeatureStore.fill_missing` (block by block, the next block
   generated while the last one is written, so memory stays bounded by a few blocks), with a progress bar. A
   complete store made from the same generator config at the same path is reused; an interrupted one is resumed.
2. **store run**: a few hundred training iterations reading every batch from the store (eval off), in a
   fresh Python process, reporting its peak resident memory and the iteration rate.
3. **memory run**: the same iterations after loading the whole float16 array into RAM (skipped, with the
   reason, when ``/proc/meminfo`` MemAvailable says it would not fit).

Peak memory is measured in a fresh interpreter per phase (a ``multiprocessing`` spawn): ``ru_maxrss`` of a
process started from a large parent inherits the parent's peak (Linux folds the old address space's high-water
mark into it at ``exec``), so each phase also reports the kernel's ``VmHWM`` of its own address space, which
starts clean, and its ``ru_maxrss`` once its imports are done, so an inherited value is visible. A sampler
thread also follows ``VmRSS`` split into anonymous and file-backed pages: training from a store must keep
``RssFile`` at what it was at the start (the mapped libraries, about 0.3 GB with torch): the store reads
with ``pread``, whereas a memory map would count every page read towards the RSS.

The runs are the trainer's own :meth:`~dedn.training.trainer.Trainer.fit` (``final_evaluation=False``, with the next
batch read in a worker thread while the current one computes), timed step by step by
:class:`~dedn.training.callbacks.StepTimes`. :func:`store_bench_command` is what ``dedn bench --store PATH``
calls.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dedn.config import RunConfig, SyntheticConfig
from dedn.data.sources import FeatureSource
from dedn.errors import DataError

__all__ = ["StoreBenchSettings", "build_store", "format_store_bench", "load_into_memory", "run_store_bench",
           "store_bench_command", "train_phase"]

GB = 1e9
_SAMPLE_SECONDS = 0.2  # RSS sampling interval
_MEMORY_MARGIN = 1 << 30  # free memory kept aside beyond the array and the training itself


@dataclass(frozen=True)
class StoreBenchSettings:
    """What :func:`run_store_bench` runs.

    Attributes:
        preset: synthetic preset (``sun``, ``cub``, ``awa2``) giving the real shapes.
        synthetic: an explicit generator config instead of ``preset`` (small shapes for tests).
        iters, batch_size: training iterations per run and images per batch.
        in_memory: also run from the whole array loaded into RAM (skipped when it would not fit).
        progress: show progress bars (on stderr).
        isolate: run every phase in a fresh Python process, so that each peak-memory figure is its own;
            False runs them here (faster, but the figures then include this process's memory).
        overwrite: replace a store made from another config at the path.
        chunk_size, block_size: images per completed store chunk and per generated block.
        mode, seed: training mode (paper or reference) and seed.
        rss_budget_gb: the store run's peak resident memory should stay below this (``within_budget``).
    """

    preset: str | None = "sun"
    synthetic: SyntheticConfig | None = None
    iters: int = 300
    batch_size: int = 50
    in_memory: bool = True
    progress: bool = True
    isolate: bool = True
    overwrite: bool = False
    chunk_size: int = 256
    block_size: int = 32
    mode: str = "paper"
    seed: int = 0
    rss_budget_gb: float = 6.0

    def generator(self) -> SyntheticConfig:
        """The generator config of the benchmark's data: ``synthetic``, else the ``preset``'s."""
        return self.synthetic if self.synthetic is not None else SyntheticConfig(preset=self.preset)


# ---------------------------------------------------------------------------------------------- process facts
def _proc_status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of this process in bytes (empty where /proc is not available)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024  # reported in kB
    except OSError:
        pass
    return out


def _proc_io() -> dict[str, int]:
    """Bytes this process read through system calls (rchar) and from storage (read_bytes)."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f) if k in ("rchar", "read_bytes")}
    except (OSError, ValueError):
        return {}


def _mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ru_maxrss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _gb(value: int | float | None) -> float | None:
    return None if value is None else round(value / GB, 3)


class _RSSMonitor:
    """Samples VmRSS (and its anonymous and file-backed parts) of this process in a background thread."""

    def __init__(self, interval: float = _SAMPLE_SECONDS) -> None:
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.first: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)

    def _sample(self) -> None:
        status = _proc_status()
        if not self.samples:
            self.first = status
        for key, value in status.items():
            if key != "VmHWM":
                self.peak[key] = max(self.peak.get(key, 0), value)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> _RSSMonitor:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _resources(start_maxrss: int, monitor: _RSSMonitor | None = None) -> dict[str, Any]:
    """Peak memory of this process: kernel high-water mark, ru_maxrss, and the sampled RSS parts (GB)."""
    out: dict[str, Any] = {
        "peak_rss_gb": _gb(_proc_status().get("VmHWM")),
        "ru_maxrss_gb": _gb(_ru_maxrss()),
        "ru_maxrss_at_start_gb": _gb(start_maxrss),
    }
    if monitor is not None:
        out.update({"vmrss_max_gb": _gb(monitor.peak.get("VmRSS")),
                    "rss_anon_max_gb": _gb(monitor.peak.get("RssAnon")),
                    "rss_file_max_gb": _gb(monitor.peak.get("RssFile")),
                    "rss_file_start_gb": _gb(monitor.first.get("RssFile")), "rss_samples": monitor.samples})
    return out


# ---------------------------------------------------------------------------------------------- build
def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _open_or_create(path: Path, cfg: SyntheticConfig, data: Any, chunk_size: int, overwrite: bool) -> Any:
    """The store at ``path`` made from ``cfg`` (possibly incomplete), or a new one; DataError for another store."""
    from dedn.data.store import STORE_JSON, FeatureStore

    want = _jsonable({"generator": data.provenance["generator"], "config": asdict(cfg)})
    if (path / STORE_JSON).exists() and not overwrite:
        store = FeatureStore.open(path)
        prov = store.provenance
        got = {"generator": prov.get("generator"), "config": prov.get("config")}
        if got != want or store.shape != data.features.shape or store.dtype != np.float16:
            raise DataError(f"{path} holds another feature store ({store.shape}, {store.dtype}, made from "
                            f"{got['config']}); choose another path or pass overwrite=True (--overwrite)")
        return store
    return FeatureStore.create(path, len(data.features), data.feature_shape, dtype="float16", chunk_size=chunk_size,
                               overwrite=overwrite, labels=data.labels,
                               provenance={**data.provenance, "dataset": data.name, "made_by": "dedn.apps.storebench"})


def build_store(
    path: str | os.PathLike[str],
    synthetic: SyntheticConfig | dict[str, Any],
    *,
    chunk_size: int = 256,
    block_size: int = 32,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the generated benchmark of ``synthetic`` into a float16 store at ``path``, or reuse it.

    A complete store at ``path`` made from the same generator config is reused as it is; an incomplete one
    (an interrupted build) gets its missing chunks. A store made from another config is refused unless
    ``overwrite``. Maps are generated ``block_size`` at a time while a worker thread writes the previous block
    (:meth:`~dedn.data.store.FeatureStore.fill_missing`), so memory stays bounded by a few blocks whatever the
    store's size.

    Returns:
        ``seconds`` (whole build, 0-ish when reused), ``reused``, ``images_written``, ``images_per_s``,
        ``chunks_written`` and the store's ``path``, ``shape``, ``dtype``.

    Raises:
        DataError: ``path`` holds another store (or other files), or the disk is too small.
    """
    from dedn.data.store import SemanticSide
    from dedn.data.synthetic import make_synthetic

    started = time.perf_counter()
    path = Path(path)
    cfg = SyntheticConfig(**synthetic) if isinstance(synthetic, dict) else synthetic
    data = make_synthetic(cfg)
    store = _open_or_create(path, cfg, data, chunk_size, overwrite)
    try:
        if "att" not in store.meta():  # new, or interrupted before its semantic side was written
            store.save_semantics(SemanticSide.of(data))
        chunks = len(store.missing_chunks())
        writing = time.perf_counter()
        total = store.fill_missing(lambda s, e: data.features.generate(np.arange(s, e)), block_size,
                                   desc=f"build store {path.name}", progress=progress, write_behind=True)
    finally:
        store.close()
    ended = time.perf_counter()
    return {
        "path": str(path),
        "shape": list(store.shape),
        "dtype": str(store.dtype),
        "reused": not chunks,
        "chunks_written": chunks,
        "images_written": total,
        "seconds": round(ended - started, 3),
        "images_per_s": round(total / (ended - writing), 2) if total else None,
    }


def _build_phase(path: str, synthetic: SyntheticConfig, settings: StoreBenchSettings) -> dict[str, Any]:
    start_maxrss = _ru_maxrss()
    with _RSSMonitor() as monitor:
        out = build_store(path, synthetic, chunk_size=settings.chunk_size, block_size=settings.block_size,
                          overwrite=settings.overwrite, progress=settings.progress)
    return {**out, **_resources(start_maxrss, monitor)}


# ---------------------------------------------------------------------------------------------- training
def load_into_memory(store: Any, progress: bool = True, block_bytes: int = 256 << 20) -> np.ndarray:
    """The whole store as one in-memory array of its own dtype (float16), read in blocks of ``block_bytes``."""
    arr = np.empty(store.shape, dtype=store.dtype)
    rows = max(1, block_bytes // max(1, arr[0].nbytes))
    with tqdm(total=len(store), unit="img", desc="load store into RAM", disable=not progress,
              dynamic_ncols=True) as bar:
        for s in range(0, len(store), rows):
            e = min(s + rows, len(store))
            store.read_raw(s, e, out=arr[s:e])
            bar.update(e - s)
    return arr


class _TimedReads(FeatureSource):
    """A feature source that times each batch read: the trainer's reads, made in its prefetch thread."""

    def __init__(self, features: FeatureSource) -> None:
        self.features = features
        self.shape, self.dtype = features.shape, features.dtype
        self.seconds: list[float] = []

    @property
    def identity(self) -> str | None:
        return self.features.identity

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.features[index]

    def read(self, index: np.ndarray, stored_dtype: bool = False) -> Any:
        t0 = time.perf_counter()
        out = self.features.read(index, stored_dtype)
        self.seconds.append(time.perf_counter() - t0)
        return out


def _bench_config(path: str, iters: int, batch_size: int, mode: str, seed: int, progress: bool) -> RunConfig:
    """Paper-mode training of ``iters`` iterations of ``batch_size`` on the CPU, no evaluation, own clusters."""
    from dedn.config import config_from_dict, config_to_dict

    cfg = RunConfig(mode=mode, seed=seed, name="storebench")
    cfg.data.source, cfg.data.path = "store", path
    cfg.model.clusters = "auto"  # the store's own clusters (the synthetic SUN ones)
    t = cfg.train
    t.batch_size, t.epochs, t.iters_per_epoch = batch_size, 1, iters
    t.eval_every, t.checkpoint_every, t.device, t.progress = 0, 0, "cpu", progress
    return config_from_dict(config_to_dict(cfg), "storebench")  # checked like any other config


def _train(cfg: RunConfig, data: Any, setup_started: float) -> dict[str, Any]:
    """Train ``cfg.train.iters_per_epoch`` steps with the trainer's fit, timed step by step (the setup from
    ``setup_started``, a ``perf_counter`` time, to the fit's start)."""
    from dedn.training.callbacks import StepTimes
    from dedn.training.trainer import Trainer

    reads = _TimedReads(data.features)
    times = StepTimes()
    trainer = Trainer(cfg, data=replace(data, features=reads), callbacks=[times])
    started = time.perf_counter()
    setup = round(started - setup_started, 3)
    trainer.fit(final_evaluation=False)
    steps = times.steps
    iters = len(steps)
    ended = steps[-1][1]
    warmup = min(10, iters // 10)  # first iterations excluded from the steady rate
    steady_start = steps[warmup - 1][1] if warmup else started
    # A step waited for its batch from the end of the step before it (the start of the fit for the first).
    wait = sum(s[0] - e for s, e in zip(steps, [started] + [x[1] for x in steps[:-1]], strict=True))
    return {
        "setup_seconds": setup,
        "iters": iters,
        "seconds": round(ended - started, 3),
        "iters_per_s": round(iters / (ended - started), 4),
        "warmup_iters": warmup,
        "steady_iters_per_s": round((iters - warmup) / (ended - steady_start), 4),
        "batch_read_seconds_mean": round(float(np.mean(reads.seconds)), 5),
        "batch_read_seconds_total": round(float(np.sum(reads.seconds)), 3),
        "data_wait_seconds": round(wait, 3),
        "loss_first": steps[0][2],
        "loss_last": steps[-1][2],
    }


def _memory_shortfall(nbytes: int, reserve_bytes: int, available: int | None) -> str | None:
    """Why an in-memory run of ``nbytes`` of maps would not fit (None when it fits or memory is unknown)."""
    if available is None or available >= nbytes + reserve_bytes:
        return None
    return (f"the in-memory run needs about {(nbytes + reserve_bytes) / GB:.1f} GB ({nbytes / GB:.1f} GB of "
            f"float16 maps + {reserve_bytes / GB:.1f} GB for training and a margin) but MemAvailable is "
            f"{available / GB:.1f} GB")


def train_phase(
    path: str | os.PathLike[str],
    iters: int = 300,
    batch_size: int = 50,
    in_memory: bool = False,
    progress: bool = True,
    mode: str = "paper",
    seed: int = 0,
    reserve_bytes: int = 2 << 30,
) -> dict[str, Any]:
    """Train ``iters`` iterations from the store at ``path``, or (``in_memory``) from all of it loaded in RAM.

    Memory is measured for this whole process (best run in a fresh one, see the module docstring). The
    in-memory run is skipped, with ``skipped`` and ``reason``, when MemAvailable is below the array's size
    plus ``reserve_bytes`` (the training itself and a margin).
    """
    import torch

    from dedn.data.store import load_zsldata

    start_maxrss = _ru_maxrss()
    load_before = os.getloadavg()
    io_before = _proc_io()
    available = _mem_available()
    out: dict[str, Any] = {"source": "memory" if in_memory else "store", "mem_available_gb_before": _gb(available),
                           "threads": torch.get_num_threads(), "torch_version": torch.__version__}
    t0 = time.perf_counter()
    data = load_zsldata(path)
    store = data.features
    reason = _memory_shortfall(store.nbytes, reserve_bytes, available) if in_memory else None
    if reason is not None:
        return {**out, "skipped": True, "reason": reason}
    with _RSSMonitor() as monitor:
        if in_memory:
            t1 = time.perf_counter()
            data = replace(data, features=load_into_memory(store, progress))
            out["load_seconds"] = round(time.perf_counter() - t1, 3)
        store.close()  # the in-memory run reads nothing more from disk; the store run reopens on demand
        out.update(_train(_bench_config(str(path), iters, batch_size, mode, seed, progress), data, t0))
    io_after = _proc_io()
    out.update(_resources(start_maxrss, monitor))
    read = bool(io_after and io_before)
    out.update({
        "batch_size": batch_size,
        "mode": mode,
        "clusters": {k: int(v.size) for k, v in (data.clusters or {}).items()},
        "storage_read_gb": _gb(io_after["read_bytes"] - io_before["read_bytes"]) if read else None,
        "syscall_read_gb": _gb(io_after["rchar"] - io_before["rchar"]) if read else None,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    })
    return out


# ---------------------------------------------------------------------------------------------- isolation
_PHASES: dict[str, Callable[..., dict[str, Any]]] = {"build": _build_phase, "train": train_phase}


def _phase_process(conn: Connection, phase: str, kwargs: dict[str, Any]) -> None:
    """A phase's fresh process: run it and send its result (or its error) to the parent."""
    try:
        # stdout is the parent's (it may be printing JSON); progress bars and errors go to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            reply = {"result": _PHASES[phase](**kwargs)}
    except Exception as exc:  # handed to the parent, which raises it again
        reply = {"error": str(exc), "type": type(exc).__name__}
    conn.send(reply)
    conn.close()


def _run_phase(phase: str, kwargs: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """Run a phase in this process or in a fresh interpreter (a spawned process), and return its result."""
    if not isolate:
        return {**_PHASES[phase](**kwargs), "isolated": False}
    ctx = multiprocessing.get_context("spawn")  # a new interpreter: its own address space and peak memory
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_phase_process, args=(send, phase, kwargs), name=f"storebench-{phase}")
    proc.start()
    send.close()  # the child holds the only sending end now: recv ends with EOFError if it dies
    try:
        reply = receive.recv()
    except EOFError:
        reply = None
    finally:
        receive.close()
        proc.join()
    if reply is not None and "error" in reply:
        raise (DataError if reply["type"] == "DataError" else RuntimeError)(
            f"store benchmark, {phase} phase: {reply['error']}")
    if proc.exitcode != 0 or reply is None:
        killed = " (killed: out of memory?)" if proc.exitcode == -9 else ""
        raise RuntimeError(f"store benchmark, {phase} phase: the subprocess exited with code {proc.exitcode}{killed}")
    return {**reply["result"], "isolated": True}


# ---------------------------------------------------------------------------------------------- API
def _settings(settings: StoreBenchSettings | None, overrides: dict[str, Any]) -> StoreBenchSettings:
    """``settings`` (default: the defaults) with the fields named in ``overrides`` replaced."""
    unknown = sorted(set(overrides) - {f.name for f in fields(StoreBenchSettings)})
    if unknown:
        raise TypeError(f"unknown store benchmark settings: {', '.join(unknown)}")
    return replace(settings or StoreBenchSettings(), **overrides)


def _store_runs(path: Path, s: StoreBenchSettings) -> tuple[dict[str, Any], dict[str, Any]]:
    """The store run and the memory run (or why it was skipped)."""
    train = {"path": str(path), "iters": s.iters, "batch_size": s.batch_size, "progress": s.progress,
             "mode": s.mode, "seed": s.seed}
    store_run = _run_phase("train", {**train, "in_memory": False}, s.isolate)
    if not s.in_memory:
        return store_run, {"skipped": True, "reason": "not asked for (in_memory=False)"}
    reserve = max(int((store_run.get("peak_rss_gb") or 1.0) * GB), 1 << 30) + _MEMORY_MARGIN
    return store_run, _run_phase("train", {**train, "in_memory": True, "reserve_bytes": reserve}, s.isolate)


def run_store_bench(path: str | os.PathLike[str], settings: StoreBenchSettings | None = None,
                    **overrides: Any) -> dict[str, Any]:
    """Build (or reuse) a float16 store of a synthetic preset at ``path`` and time training from it.

    See the module docstring for the three phases.

    Args:
        path: the store folder (reused when it holds a complete store of the same generator config).
        settings: what to run (default: :class:`StoreBenchSettings`'s defaults, the SUN preset).
        overrides: fields of ``settings`` to replace (``iters=3``, ``isolate=False``, ...).

    Returns:
        A JSON-serialisable dict: ``store`` (path, shape, dtype, size on disk), ``build``, ``store_run``,
        ``memory_run`` (``skipped`` and ``reason`` when skipped or not asked for), ``memory_speedup``
        (memory / store iteration rate), ``within_budget``, ``machine`` (CPUs, memory, load averages).
    """
    s = _settings(settings, overrides)
    if s.iters < 1 or s.batch_size < 1:
        raise ValueError(f"iters and batch_size must be >= 1, got {s.iters} and {s.batch_size}")
    from dedn.data.store import FEATURES_BIN

    path = Path(path)
    cfg = s.generator()
    load_before = os.getloadavg()
    mem_before = _mem_available()
    build = _run_phase("build", {"path": str(path), "synthetic": cfg, "settings": s}, s.isolate)
    store_run, memory_run = _store_runs(path, s)
    st = (path / FEATURES_BIN).stat()
    peak = store_run.get("peak_rss_gb")
    return {
        "preset": cfg.preset,
        "synthetic": asdict(cfg),
        "iters": s.iters,
        "batch_size": s.batch_size,
        "mode": s.mode,
        "store": {"path": str(path), "shape": build["shape"], "dtype": build["dtype"],
                  "size_gb": _gb(st.st_size), "disk_usage_gb": _gb(st.st_blocks * 512)},
        "build": build,
        "store_run": store_run,
        "memory_run": memory_run,
        "memory_speedup": (round(memory_run["steady_iters_per_s"] / store_run["steady_iters_per_s"], 3)
                           if not memory_run.get("skipped") else None),
        "rss_budget_gb": s.rss_budget_gb,
        "within_budget": None if peak is None else bool(peak < s.rss_budget_gb),
        "machine": {"cpu_count": os.cpu_count(), "mem_available_gb_before": _gb(mem_before),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "python": sys.version.split()[0], "numpy": np.__version__},
    }


def format_store_bench(result: dict[str, Any]) -> str:
    """A readable table of a :func:`run_store_bench` result."""

    def gb(value: Any) -> str:
        return "-" if value is None else f"{value:.2f} GB"

    def run_rows(name: str, run: dict[str, Any]) -> list[tuple[str, str]]:
        if run.get("skipped"):
            return [(name, f"skipped: {run['reason']}")]
        load = f", loading {run['load_seconds']:.1f} s" if "load_seconds" in run else ""
        return [
            (name, f"{run['steady_iters_per_s']:.3f} it/s steady ({run['iters_per_s']:.3f} overall, "
                   f"{run['iters']} its in {run['seconds']:.1f} s{load})"),
            ("  peak RSS", f"{gb(run['peak_rss_gb'])} VmHWM, {gb(run['ru_maxrss_gb'])} ru_maxrss "
                           f"({gb(run['ru_maxrss_at_start_gb'])} after imports)"),
            ("  sampled RSS", f"max {gb(run.get('vmrss_max_gb'))} (anon {gb(run.get('rss_anon_max_gb'))}, "
                              f"file {gb(run.get('rss_file_max_gb'))}; file at start "
                              f"{gb(run.get('rss_file_start_gb'))})"),
            ("  batches", f"{run['batch_read_seconds_mean'] * 1e3:.1f} ms per read (prefetch thread), "
                          f"{run['data_wait_seconds']:.1f} s waited for data; {gb(run.get('storage_read_gb'))} "
                          "read from storage"),
            ("  load average", " / ".join(f"{x:.2f}" for x in run["loadavg_before"]) + " before, "
                               + " / ".join(f"{x:.2f}" for x in run["loadavg_after"]) + " after"),
        ]

    s, b, m = result["store"], result["build"], result["machine"]
    build = "reused" if b["reused"] else f"{b['seconds']:.1f} s ({b['images_per_s']:.0f} img/s)"
    speedup = result["memory_speedup"]
    budget = result["within_budget"]
    rows = [
        ("store", f"{s['path']}: {' x '.join(map(str, s['shape']))} {s['dtype']}, {gb(s['size_gb'])} "
                  f"({gb(s['disk_usage_gb'])} on disk)"),
        ("build", f"{build}, peak RSS {gb(b.get('peak_rss_gb'))}"),
        ("training", f"{result['iters']} iterations of {result['batch_size']}, {result['mode']} mode, eval off"),
        *run_rows("from store", result["store_run"]),
        *run_rows("from RAM", result["memory_run"]),
        ("RAM / store", "-" if speedup is None else f"{speedup:.2f}x the store run's rate"),
        ("budget", "-" if budget is None else f"store run peak RSS {'<' if budget else '>='} "
                                               f"{result['rss_budget_gb']:.1f} GB"),
        ("machine", f"{m['cpu_count']} CPUs, MemAvailable {gb(m['mem_available_gb_before'])} at start, load "
                    + " / ".join(f"{x:.2f}" for x in m["loadavg_before"]) + " before, "
                    + " / ".join(f"{x:.2f}" for x in m["loadavg_after"]) + " after"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def store_bench_command(path: str | os.PathLike[str], settings: StoreBenchSettings | None = None,
                        json_out: bool = False) -> dict[str, Any]:
    """``dedn bench --store PATH``: run :func:`run_store_bench`, print JSON (``json_out``) or a table; returns
    the result."""
    result = run_store_bench(path, settings)
    print(json.dumps(result, indent=2) if json_out else format_store_bench(result))
    return result
