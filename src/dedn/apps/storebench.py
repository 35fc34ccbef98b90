"""Feature-store benchmark: train from a dataset-sized float16 store on disk with bounded memory.

:func:`run_store_bench` measures what training from a :class:`~dedn.data.store.FeatureStore` costs against
training from the same features held in RAM:

1. **build**: write the generated benchmark of a preset (SUN: 14340 x 2048 x 14 x 14, 11.5 GB in float16)
   into a store, streamed block by block (memory stays bounded by a block), with a progress bar. A complete
   store made from the same generator config at the same path is reused; an interrupted one is resumed.
2. **store run**: a few hundred training iterations reading every batch from the store (eval off), in a
   fresh Python process, reporting its peak resident memory and the iteration rate.
3. **memory run**: the same iterations after loading the whole float16 array into RAM (skipped, with the
   reason, when ``/proc/meminfo`` MemAvailable says it would not fit).

Peak memory is measured in a fresh interpreter per phase (``python -c``): ``ru_maxrss`` of a process started
from a large parent inherits the parent's peak (Linux folds the old address space's high-water mark into it
at ``exec``), so each phase also reports the kernel's ``VmHWM`` of its own address space, which starts
clean, and its ``ru_maxrss`` once its imports are done, so an inherited value is visible. A sampler thread
also follows ``VmRSS`` split into anonymous and file-backed pages: training from a store must keep
``RssFile`` at what it was at the start (the mapped libraries, about 0.3 GB with torch): the store reads
with ``pread``, whereas a memory map would count every page read towards the RSS.

The training loop is the trainer's own step (:meth:`~dedn.train.trainer.Trainer.train_step`, with the next batch
read in a worker thread while the current one computes, as in :meth:`~dedn.train.trainer.Trainer.fit`), driven
here directly because ``fit`` always evaluates at the end, and this benchmark measures training alone.
:func:`store_bench_command` is what ``dedn bench --store PATH`` calls.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dedn.config import RunConfig, SyntheticConfig
from dedn.errors import DataError

__all__ = ["build_store", "format_store_bench", "load_into_memory", "run_store_bench", "store_bench_command",
           "train_phase"]

GB = 1e9
_SAMPLE_SECONDS = 0.2  # RSS sampling interval
_MEMORY_MARGIN = 1 << 30  # free memory kept aside beyond the array and the training itself


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
def _synthetic_config(preset: str | None, synthetic: SyntheticConfig | dict[str, Any] | None) -> SyntheticConfig:
    if synthetic is None:
        return SyntheticConfig(preset=preset)
    return SyntheticConfig(**synthetic) if isinstance(synthetic, dict) else synthetic


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


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
    ``overwrite``. Maps are generated ``block_size`` at a time while a worker thread converts and writes the
    previous block, so memory stays bounded by a few blocks whatever the store's size.

    Returns:
        ``seconds`` (whole build, 0-ish when reused), ``reused``, ``images_written``, ``images_per_s``,
        ``chunks_written`` and the store's ``path``, ``shape``, ``dtype``.

    Raises:
        DataError: ``path`` holds another store (or other files), or the disk is too small.
    """
    from dedn.data.store import STORE_JSON, FeatureStore, SemanticSide
    from dedn.data.synthetic import make_synthetic

    started = time.perf_counter()
    path = Path(path)
    cfg = _synthetic_config(None, synthetic)
    data = make_synthetic(cfg)
    want = _jsonable({"generator": data.provenance["generator"], "config": asdict(cfg)})
    store = None
    if (path / STORE_JSON).exists() and not overwrite:
        store = FeatureStore.open(path)
        prov = store.provenance
        got = {"generator": prov.get("generator"), "config": prov.get("config")}
        if got != want or store.shape != data.features.shape or store.dtype != np.float16:
            raise DataError(f"{path} holds another feature store ({store.shape}, {store.dtype}, made from "
                            f"{got['config']}); choose another path or pass overwrite=True (--overwrite)")
    if store is None:
        store = FeatureStore.create(path, len(data.features), data.feature_shape, dtype="float16",
                                    chunk_size=chunk_size, overwrite=overwrite, labels=data.labels,
                                    provenance={**data.provenance, "dataset": data.name,
                                                "made_by": "dedn.apps.storebench"})
    if "att" not in store.meta():  # new, or interrupted before its semantic side was written
        store.save_semantics(SemanticSide.of(data))
    todo = store.missing_chunks()
    total = sum(store.chunk_range(i)[1] - store.chunk_range(i)[0] for i in todo)
    writing = time.perf_counter()
    # One writer thread, so writes and completion marks keep their order; at most two blocks wait.
    pool = ThreadPoolExecutor(max_workers=1)
    pending: list[Future[None]] = []

    def submit(fn: Callable[..., None], *args: Any) -> None:
        pending.append(pool.submit(fn, *args))
        while len(pending) > 2:
            pending.pop(0).result()

    try:
        with tqdm(total=total, unit="img", desc=f"build store {path.name}", disable=not progress,
                  dynamic_ncols=True) as bar:
            for i in todo:
                start, stop = store.chunk_range(i)
                for s in range(start, stop, block_size):
                    e = min(s + block_size, stop)
                    submit(store.write_rows, s, data.features.generate(np.arange(s, e)))
                    bar.update(e - s)
                submit(store.mark_complete, i)  # syncs the chunk's bytes first
            for fut in pending:
                fut.result()
    finally:
        pool.shutdown(wait=True)
        store.close()
    seconds = time.perf_counter() - started
    return {
        "path": str(path),
        "shape": list(store.shape),
        "dtype": str(store.dtype),
        "reused": not todo,
        "chunks_written": len(todo),
        "images_written": total,
        "seconds": round(seconds, 3),
        "images_per_s": round(total / (time.perf_counter() - writing), 2) if total else None,
    }


def _build_phase(path: str, synthetic: dict[str, Any], chunk_size: int, block_size: int, overwrite: bool,
                 progress: bool) -> dict[str, Any]:
    start_maxrss = _ru_maxrss()
    with _RSSMonitor() as monitor:
        out = build_store(path, synthetic, chunk_size=chunk_size, block_size=block_size, overwrite=overwrite,
                          progress=progress)
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


def _bench_config(path: str, iters: int, batch_size: int, mode: str, seed: int, progress: bool) -> RunConfig:
    """Paper-mode training for ``iters`` iterations of ``batch_size`` on the CPU, no evaluation, own clusters."""
    from dedn.config import config_from_dict, config_to_dict

    cfg = RunConfig(mode=mode, seed=seed, name="storebench")
    cfg.data.source, cfg.data.path = "store", path
    cfg.model.clusters = "auto"  # the store's own clusters (the synthetic SUN ones)
    t = cfg.train
    t.batch_size, t.epochs, t.iters_per_epoch, t.max_iters = batch_size, 1, iters, iters
    t.eval_every, t.checkpoint_every, t.device, t.progress = 0, 0, "cpu", progress
    return config_from_dict(config_to_dict(cfg), "storebench")  # checked like any other config


def _train_loop(trainer: Any, iters: int, progress: bool) -> dict[str, Any]:
    """``iters`` trainer steps with the next batch read in a worker thread, timed (as Trainer.fit does)."""
    batches = trainer.sampler.epoch(0, iters)
    read_times: list[float] = []

    def read(index: np.ndarray) -> Any:
        t0 = time.perf_counter()
        x = trainer._host_batch(index)
        read_times.append(time.perf_counter() - t0)
        return x

    warmup = min(10, iters // 10)  # first iterations excluded from the steady rate
    losses: list[float] = []
    wait = 0.0
    steady_start = None
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        with tqdm(total=iters, desc="training", unit="it", disable=not progress, dynamic_ncols=True) as bar:
            started = time.perf_counter()
            pending = pool.submit(read, batches[0])
            for i in range(iters):
                if i == warmup:
                    steady_start = time.perf_counter()
                t0 = time.perf_counter()
                x = pending.result()
                wait += time.perf_counter() - t0
                if i + 1 < iters:
                    pending = pool.submit(read, batches[i + 1])
                losses.append(trainer.train_step(batches[i], x)["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            ended = time.perf_counter()
    finally:
        pool.shutdown(wait=True)
    seconds = ended - started
    steady = ended - steady_start if steady_start is not None else seconds
    return {
        "iters": iters,
        "seconds": round(seconds, 3),
        "iters_per_s": round(iters / seconds, 4),
        "warmup_iters": warmup,
        "steady_iters_per_s": round((iters - warmup) / steady, 4),
        "batch_read_seconds_mean": round(float(np.mean(read_times)), 5),
        "batch_read_seconds_total": round(float(np.sum(read_times)), 3),
        "data_wait_seconds": round(wait, 3),
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


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
    from dedn.train.trainer import Trainer

    start_maxrss = _ru_maxrss()
    load_before = os.getloadavg()
    io_before = _proc_io()
    available = _mem_available()
    out: dict[str, Any] = {"source": "memory" if in_memory else "store", "mem_available_gb_before": _gb(available),
                           "threads": torch.get_num_threads(), "torch_version": torch.__version__}
    t0 = time.perf_counter()
    data = load_zsldata(path)
    store = data.features
    if in_memory and available is not None and available < store.nbytes + reserve_bytes:
        return {**out, "skipped": True,
                "reason": f"the in-memory run needs about {(store.nbytes + reserve_bytes) / GB:.1f} GB "
                          f"({store.nbytes / GB:.1f} GB of float16 maps + {reserve_bytes / GB:.1f} GB for training "
                          f"and a margin) but MemAvailable is {available / GB:.1f} GB"}
    with _RSSMonitor() as monitor:
        if in_memory:
            t1 = time.perf_counter()
            data = replace(data, features=load_into_memory(store, progress))
            out["load_seconds"] = round(time.perf_counter() - t1, 3)
        store.close()  # the in-memory run reads nothing more from disk; the store run reopens on demand
        trainer = Trainer(_bench_config(str(path), iters, batch_size, mode, seed, progress), data=data)
        out["setup_seconds"] = round(time.perf_counter() - t0, 3)
        out.update(_train_loop(trainer, iters, progress))
    io_after = _proc_io()
    out.update(_resources(start_maxrss, monitor))
    out.update({
        "batch_size": batch_size,
        "mode": mode,
        "clusters": {k: int(v.size) for k, v in (data.clusters or {}).items()},
        "storage_read_gb": _gb(io_after["read_bytes"] - io_before["read_bytes"]) if io_after and io_before
        else None,
        "syscall_read_gb": _gb(io_after["rchar"] - io_before["rchar"]) if io_after and io_before else None,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    })
    return out


# ---------------------------------------------------------------------------------------------- isolation
_PHASES: dict[str, Callable[..., dict[str, Any]]] = {"build": _build_phase, "train": train_phase}
_CHILD = "import sys; from dedn.apps.storebench import _child_main; sys.exit(_child_main(sys.argv[1], sys.argv[2]))"


def _child_main(args_file: str, out_file: str) -> int:
    """Entry point of a phase's fresh process: run it, write its result (or its error) as JSON."""
    spec = json.loads(Path(args_file).read_text())
    try:
        result, rc = _PHASES[spec["phase"]](**spec["kwargs"]), 0
    except Exception as exc:  # handed to the parent, which raises it again
        result, rc = {"error": str(exc), "type": type(exc).__name__}, 1
    Path(out_file).write_text(json.dumps(result))
    return rc


def _run_phase(phase: str, kwargs: dict[str, Any], isolate: bool) -> dict[str, Any]:
    """Run a phase in this process or in a fresh interpreter (``python -c``), and return its result."""
    if not isolate:
        return {**_PHASES[phase](**kwargs), "isolated": False}
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH"))
                                                        if p)}
    with tempfile.TemporaryDirectory(prefix="dedn-storebench-") as tmp:
        args_file, out_file = Path(tmp) / "args.json", Path(tmp) / "result.json"
        args_file.write_text(json.dumps({"phase": phase, "kwargs": kwargs}))
        # stdout is not the parent's (it may be printing JSON); progress bars and errors go to stderr.
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(args_file), str(out_file)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env, check=False)
        result = json.loads(out_file.read_text()) if out_file.exists() else None
    if result is not None and "error" in result:
        raise (DataError if result["type"] == "DataError" else RuntimeError)(
            f"store benchmark, {phase} phase: {result['error']}")
    if proc.returncode != 0 or result is None:
        killed = " (killed: out of memory?)" if proc.returncode == -9 else ""
        raise RuntimeError(f"store benchmark, {phase} phase: the subprocess exited with code "
                           f"{proc.returncode}{killed}")
    return {**result, "isolated": True}


# ---------------------------------------------------------------------------------------------- API
def run_store_bench(
    path: str | os.PathLike[str],
    preset: str | None = "sun",
    iters: int = 300,
    batch_size: int = 50,
    in_memory: bool = True,
    progress: bool = True,
    *,
    synthetic: SyntheticConfig | None = None,
    isolate: bool = True,
    overwrite: bool = False,
    chunk_size: int = 256,
    block_size: int = 32,
    mode: str = "paper",
    seed: int = 0,
    rss_budget_gb: float = 6.0,
) -> dict[str, Any]:
    """Build (or reuse) a float16 store of a synthetic preset at ``path`` and time training from it.

    See the module docstring for the three phases.

    Args:
        path: the store folder (reused when it holds a complete store of the same generator config).
        preset: synthetic preset (``sun``, ``cub``, ``awa2``) giving the real shapes.
        iters, batch_size: training iterations per run and images per batch.
        in_memory: also run from the whole array loaded into RAM (skipped when it would not fit).
        progress: show progress bars (on stderr).
        synthetic: an explicit generator config instead of ``preset`` (small shapes for tests).
        isolate: run every phase in a fresh Python process, so that each peak-memory figure is its own;
            False runs them here (faster, but the figures then include this process's memory).
        overwrite: replace a store made from another config at ``path``.
        chunk_size, block_size: images per completed store chunk and per generated block.
        mode, seed: training mode (paper or reference) and seed.
        rss_budget_gb: the store run's peak resident memory should stay below this (``within_budget``).

    Returns:
        A JSON-serialisable dict: ``store`` (path, shape, dtype, size on disk), ``build``, ``store_run``,
        ``memory_run`` (``skipped`` and ``reason`` when skipped or not asked for), ``memory_speedup``
        (memory / store iteration rate), ``within_budget``, ``machine`` (CPUs, memory, load averages).
    """
    if iters < 1 or batch_size < 1:
        raise ValueError(f"iters and batch_size must be >= 1, got {iters} and {batch_size}")
    from dedn.data.store import FEATURES_BIN

    path = Path(path)
    cfg = _synthetic_config(preset, synthetic)
    load_before = os.getloadavg()
    mem_before = _mem_available()
    build = _run_phase("build", {"path": str(path), "synthetic": asdict(cfg), "chunk_size": chunk_size,
                                 "block_size": block_size, "overwrite": overwrite, "progress": progress}, isolate)
    train_kwargs = {"path": str(path), "iters": iters, "batch_size": batch_size, "progress": progress,
                    "mode": mode, "seed": seed}
    store_run = _run_phase("train", {**train_kwargs, "in_memory": False}, isolate)
    if in_memory:
        reserve = max(int((store_run.get("peak_rss_gb") or 1.0) * GB), 1 << 30) + _MEMORY_MARGIN
        memory_run = _run_phase("train", {**train_kwargs, "in_memory": True, "reserve_bytes": reserve}, isolate)
    else:
        memory_run = {"skipped": True, "reason": "not asked for (in_memory=False)"}
    features = path / FEATURES_BIN
    st = features.stat()
    peak = store_run.get("peak_rss_gb")
    return {
        "preset": cfg.preset,
        "synthetic": asdict(cfg),
        "iters": iters,
        "batch_size": batch_size,
        "mode": mode,
        "store": {"path": str(path), "shape": build["shape"], "dtype": build["dtype"],
                  "size_gb": _gb(st.st_size), "disk_usage_gb": _gb(st.st_blocks * 512)},
        "build": build,
        "store_run": store_run,
        "memory_run": memory_run,
        "memory_speedup": (round(memory_run["steady_iters_per_s"] / store_run["steady_iters_per_s"], 3)
                           if not memory_run.get("skipped") else None),
        "rss_budget_gb": rss_budget_gb,
        "within_budget": None if peak is None else bool(peak < rss_budget_gb),
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


def store_bench_command(path: str | os.PathLike[str], preset: str | None = "sun", iters: int = 300,
                        json_out: bool = False, in_memory: bool = True, **kwargs: Any) -> dict[str, Any]:
    """``dedn bench --store PATH``: run :func:`run_store_bench`, print JSON (``json_out``) or a table.

    Extra keyword arguments go to :func:`run_store_bench` (batch_size, progress, overwrite, ...). Returns the
    result.
    """
    result = run_store_bench(path, preset=preset, iters=iters, in_memory=in_memory, **kwargs)
    print(json.dumps(result, indent=2) if json_out else format_store_bench(result))
    return result
