"""The prepared GPU check: every CUDA path of dedn run once, timed, summarised in one JSON line.

A repository tool, not part of the installed package: it runs the repository's own CUDA tests. From the
repository root, ``python tools/gpu_check.py [--small] [--device cpu|cuda] [--out FILE] [--budget-s S]`` with
dedn importable (installed, or ``src`` on ``PYTHONPATH``, which ``tools/gpu-check.sh`` does), on a CUDA
machine in well under 8 minutes:

- ``cuda_tests``: the repository's CUDA tests (``pytest -m cuda tests``);
- ``bench``: the CUB-shaped training step in fp32, tf32 and bf16 (:func:`dedn.apps.bench.run_bench`);
- ``resident_store``: training from a float16 feature store kept resident on the GPU;
- ``extraction``: autocast feature extraction of generated images into a store;
- ``ddp``: one 2-process DistributedDataParallel training step through torchrun, when two GPUs are present;
- ``train_80_epochs``: a full 80-epoch CUB-shaped training (141 iterations an epoch, 11,280 steps at
  batch 50) on generated features from a resident store, evaluated every epoch, timed, in fp32 and bf16.

Every section reports ``status`` (``ok``, ``failed`` with the error, or ``skipped`` with the reason) and its
``seconds``; a failed section does not stop the others. A section that would start after ``budget_s``
seconds is skipped, so the check ends in time; with ``--out`` the summary so far is rewritten after every
section, so a check cut short still leaves its results. ``--small`` runs the same code at small sizes, on
the CPU when there is no GPU: that is how the tests run it. Exit code 1 when a section failed, 2 for a bad
option.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dedn import __version__
from dedn.atomic import atomic_write_text
from dedn.checks import DEVICE, POSITIVE, Rule, check
from dedn.errors import ConfigError

#: The repository this script belongs to: its tests and its ``src`` folder are found from here.
ROOT = Path(__file__).resolve().parents[1]

#: The generated CUB-shaped benchmark of the 80-epoch run (full) and its small stand-in (tests, CPU).
TRAIN_SHAPES: dict[str, dict[str, int]] = {
    "full": {"n_images": 2400, "n_channels": 2048, "height": 14, "width": 14, "n_classes": 200, "n_unseen": 50,
             "n_val": 50, "n_attributes": 312, "n_clusters": 6, "semantic_dim": 300},
    "small": {"n_images": 240, "n_channels": 16, "height": 3, "width": 3, "n_classes": 12, "n_unseen": 4,
              "n_val": 3, "n_attributes": 12, "n_clusters": 3, "semantic_dim": 8},
}
#: Epochs, iterations per epoch and batch of the timed run: CUB's 7057 // 50 = 141 iterations an epoch.
TRAIN_SCHEDULE: dict[str, tuple[int, int, int]] = {"full": (80, 141, 50), "small": (3, 4, 16)}


def _log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def _section(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section; its result with ``status`` and ``seconds``, or the error that stopped it."""
    _log(f"{name} ...")
    started = time.perf_counter()
    try:
        out = fn()
        out.setdefault("status", "ok")
    except Exception as exc:  # one failing path must not hide the others
        out = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
               "where": traceback.format_exc(limit=-3).strip().splitlines()[-3:]}
    out["seconds"] = round(time.perf_counter() - started, 2)
    _log(f"{name}: {out['status']} in {out['seconds']} s")
    return out


def _synthetic_overrides(scale: str) -> list[str]:
    return [f"data.synthetic.{k}={v}" for k, v in TRAIN_SHAPES[scale].items()]


def _make_store(folder: Path, scale: str) -> Path:
    """A float16 store of the generated benchmark at ``scale`` (features, labels and semantic side)."""
    from dedn.config import load_config
    from dedn.data.store import STORE_JSON, store_zsldata
    from dedn.data.synthetic import make_synthetic

    path = folder / f"store-{scale}"
    if not (path / STORE_JSON).exists():
        cfg = load_config(None, _synthetic_overrides(scale))
        store_zsldata(path, make_synthetic(cfg.data.synthetic))
    return path


def _train(store: Path, device: str, overrides: list[str]) -> dict[str, Any]:
    """Train a fixed-protocol run from ``store``; its timing, the last row and whether the store was resident."""
    from dedn.config import load_config
    from dedn.data.sources import DeviceFeatures
    from dedn.training.trainer import Trainer

    cfg = load_config(None, ["data.source=store", f"data.path={store}", f"train.device={device}",
                             "train.progress=false", "eval.protocol=fixed", "eval.plots=false", *overrides])
    trainer = Trainer(cfg)
    started = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - started
    last = result.history[-1] if result.history else {}
    steps = int(last.get("iterations", 0))  # a fresh run: the iterations done are the steps taken
    train_seconds = sum(h["seconds"] for h in result.history)
    return {"resident": isinstance(trainer.features, DeviceFeatures), "steps": steps, "wall_seconds": round(wall, 2),
            "train_seconds": round(train_seconds, 2), "eval_seconds": round(wall - train_seconds, 2),
            "steps_per_second": round(steps / train_seconds, 1) if train_seconds else None,
            "evaluations": sum("H" in h for h in result.history),
            **{k: round(last[k], 2) for k in ("H", "T", "AUSUC") if k in last}}


def _cuda_tests(root: Path) -> dict[str, Any]:
    tests = root / "tests"
    if not tests.is_dir():
        return {"status": "skipped", "reason": f"no tests folder at {tests}"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", str(tests)],
                          cwd=root, capture_output=True, text=True, timeout=240)
    tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:] or [proc.stderr.strip()[-300:]]
    return {"status": "ok" if proc.returncode == 0 else "failed", "returncode": proc.returncode, "summary": tail[0]}


def _bench(scale: str, device: str) -> dict[str, Any]:
    from dedn.apps.bench import BenchShape, run_bench

    shape: str | BenchShape = "cub" if scale == "full" else BenchShape(
        "small", n_channels=64, height=4, width=4, n_attributes=24, n_classes=10, n_unseen=3, semantic_dim=16)
    out: dict[str, Any] = {}
    for precision in ("fp32", "tf32", "bf16"):
        r = run_bench(shape, repeats=5 if scale == "full" else 2, naive=False, device=device, precision=precision,
                      gemm_size=4096 if scale == "full" else 256)
        out[precision] = {k: r.get(k) for k in (
            "step_seconds", "fp32_step_seconds", "step_ratio_vs_fp32", "efficiency", "gemm_gflops", "bf16_gemm_gflops",
            "achieved_gflops", "bf16_native", "relative_gradient_error", "peak_device_memory_gb", "precision_note")
            if r.get(k) is not None}
    return out


def _extraction(folder: Path, scale: str, device: str) -> dict[str, Any]:
    from PIL import Image

    from dedn.features.backbones import get_backbone
    from dedn.features.extract import ExtractOptions, extract_features

    n, size = (64, 224) if scale == "full" else (6, 64)
    rng = np.random.default_rng(0)
    images = folder / "images"
    images.mkdir(exist_ok=True)
    paths = []
    for i in range(n):
        p = images / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    backbone = get_backbone("resnet101", weights=None)  # random weights: the path is timed, not the features
    started = time.perf_counter()
    options = ExtractOptions(image_size=size, batch_size=16, num_workers=2, device=device, progress=False,
                             check_images=False)
    store = extract_features(paths, np.zeros(n, dtype=np.int64), folder / "extracted", backbone, options)
    seconds = time.perf_counter() - started
    sample = store[np.arange(min(n, 4))]
    return {"images": n, "image_size": size, "images_per_second": round(n / seconds, 1),
            "precision": store.provenance.get("precision"), "finite": bool(np.isfinite(sample).all()),
            "shape": list(store.shape)}


def _ddp(store: Path, root: Path) -> dict[str, Any]:
    from dedn.runfolder import RunFolder

    if torch.cuda.device_count() < 2:
        return {"status": "skipped", "reason": f"{torch.cuda.device_count()} GPU(s): a 2-process step needs two"}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "dedn.cli", "train",
               "data.source=store", f"data.path={store}", "train.device=cuda", "train.max_iters=2",
               "train.epochs=1", "train.progress=false", "eval.protocol=fixed", "eval.plots=false",
               "--run-dir", f"{tmp}/run"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
        ok = proc.returncode == 0 and (Path(tmp) / "run" / RunFolder.METRICS).is_file()
        return {"status": "ok" if ok else "failed", "returncode": proc.returncode,
                **({} if ok else {"error": proc.stderr.strip()[-500:]})}


def run_gpu_check(scale: str = "full", device: str | None = None, workdir: str | Path | None = None,
                  run_tests: bool = True, budget_s: float | None = 450.0,
                  progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every section and return the summary (what the script prints as one JSON line).

    Args:
        scale: ``full`` (the CUB-shaped check, for a CUDA machine) or ``small`` (the same code at small sizes).
        device: ``cuda`` or ``cpu`` (default: CUDA when available).
        workdir: where stores and images are written (default: a temporary folder, removed afterwards).
        run_tests: run the CUDA tests (off inside the test suite itself).
        budget_s: sections that would start later than this many seconds after the start are skipped.
        progress: called with the summary so far after every section.
    """
    if scale not in TRAIN_SHAPES:
        raise ValueError(f"scale must be full or small, got {scale!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    summary: dict[str, Any] = {"check": "dedn gpu-check", "version": __version__, "scale": scale, "device": device,
                               "torch": torch.__version__}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        summary["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                          "count": torch.cuda.device_count()}
    started = time.perf_counter()
    deadline = None if budget_s is None else started + budget_s
    sections: dict[str, Any] = {}

    def record(name: str, result: dict[str, Any]) -> None:
        sections[name] = result
        if progress is not None:
            progress({**summary, **sections, "partial": True})

    def run(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if deadline is not None and time.perf_counter() > deadline:
            record(name, {"status": "skipped", "reason": "the check's time budget was spent"})
        else:
            record(name, _section(name, fn))

    with tempfile.TemporaryDirectory(prefix="dedn-gpu-check-") as tmp:
        folder = Path(workdir) if workdir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)

        @functools.cache
        def store() -> Path:  # made once, by the first section that needs it
            return _make_store(folder, scale)

        if cuda and run_tests:
            run("cuda_tests", lambda: _cuda_tests(ROOT))
        else:
            record("cuda_tests", {"status": "skipped", "reason": "not asked" if cuda else "no CUDA device"})
        run("bench", lambda: _bench(scale, device))
        epochs, per_epoch, batch = TRAIN_SCHEDULE[scale]
        run("resident_store", lambda: {
            **_train(store(), device, ["train.epochs=1", "train.max_iters=20", f"train.batch_size={batch}"]),
            **({} if cuda else {"note": "the CPU reads batches from the file; residency needs CUDA"})})
        run("extraction", lambda: _extraction(folder, scale, device))
        if cuda:
            run("ddp", lambda: _ddp(store(), ROOT))
        else:
            record("ddp", {"status": "skipped", "reason": "no CUDA device"})
        for precision in ("fp32", "bf16"):
            run(f"train_80_epochs_{precision}", lambda p=precision: {
                "epochs": epochs, "iters_per_epoch": per_epoch, "batch_size": batch, "precision": p,
                **_train(store(), device, [f"train.epochs={epochs}", f"train.iters_per_epoch={per_epoch}",
                                           f"train.batch_size={batch}", f"train.precision={p}"])})
    summary.update(sections)
    summary["failed"] = sorted(k for k, v in sections.items() if v.get("status") == "failed")
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    return summary


def gpu_check_command(small: bool = False, device: str | None = None, out: str | None = None,
                      budget_s: float | None = 450.0) -> int:
    """Run the check, print its one JSON line (and keep ``out`` up to date with it); 1 when a section failed."""

    def write(summary: dict[str, Any]) -> None:
        if out:
            atomic_write_text(Path(out), json.dumps(summary) + "\n")

    summary = run_gpu_check("small" if small else "full", device, budget_s=budget_s, progress=write)
    write(summary)
    print(json.dumps(summary), flush=True)
    return 1 if summary["failed"] else 0


def _option(name: str, rule: Rule, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that checks a value against one of dedn's rules (a bad one: usage error, exit 2)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} expects {rule.expects}, got {text!r}") from None
        try:
            check(name, value, rule)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    """The command line: parse the options, run the check; the exit code."""
    parser = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="the same sections at small sizes (on the CPU without a GPU)")
    parser.add_argument("--device", type=_option("--device", DEVICE, str),
                        help="cuda or cpu (default: CUDA when available)")
    parser.add_argument("--out", help="also keep the JSON line in this file, rewritten after every section")
    parser.add_argument("--budget-s", type=_option("--budget-s", POSITIVE, float), default=450.0,
                        help="skip sections that would start later than this many seconds in (default: 450)")
    args = parser.parse_args(argv)
    return gpu_check_command(small=args.small, device=args.device, out=args.out, budget_s=args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
