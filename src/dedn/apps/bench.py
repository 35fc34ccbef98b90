"""Speed benchmark: one full training step of the fast model against the naive one, at real dataset shapes.

:func:`run_bench` builds a DEDN at a preset's real shapes (CUB, SUN, AWA2: C = 2048, the real attribute
clusters, G = 300, batch 50) with random non-negative features, and times, in one process:

- the machine's float32 matrix-product rate (``gemm_gflops``: best of several large square products, measured
  before and after the steps);
- a full training step of :class:`~dedn.models.dedn.DEDN` (forward, :func:`~dedn.models.losses.dedn_loss`, backward,
  RMSprop step), median over ``repeats`` after warm-up;
- the same step with :func:`~dedn.models.naive.naive_forward` (same parameters), the one-pass-per-sub-network
  version;
- with ``precision="bf16"``: the float32 step as well (``fp32_step_seconds``), the bf16 matrix rate the
  efficiency is counted against, and how far bf16 scores and gradients are from float32 at these shapes
  (:func:`gradient_error`). ``tf32`` lets CUDA products use TF32 (on a CPU it is fp32, and says so).

It reports how close the fast step comes to the machine's matrix rate (``efficiency``, see
:func:`step_flops` for the work counted) and how much faster it is than the naive one (``speedup``). With
``profile`` it also breaks one step down by operator class (:mod:`dedn.apps.stepprofile`). A bf16 step gets
its batch in bf16, converted once outside the step, as a training run's batch reader hands it over.
:func:`bench_command` is what ``dedn bench`` calls.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from dedn.apps.stepprofile import format_profile, profile_step
from dedn.config import LossConfig
from dedn.data.benchmarks import BENCHMARKS
from dedn.data.clusters import builtin_clusters
from dedn.hostmemory import keep_freed_host_memory
from dedn.models.dedn import DEDN, DEDNConfig, DEDNOutput
from dedn.models.losses import dedn_loss
from dedn.models.naive import naive_forward
from dedn.models.precision import native_bf16
from dedn.models.settings import resolve_method

__all__ = ["BENCH_PRECISIONS", "BENCH_PRESETS", "BenchSettings", "BenchShape", "bench_command", "format_bench",
           "gemm_gflops", "gradient_error", "run_bench", "step_flops"]

#: What ``dedn bench --precision`` takes: the model's precisions and TF32 (CUDA products only).
BENCH_PRECISIONS = ("fp32", "bf16", "tf32")


@dataclass(frozen=True)
class BenchShape:
    """The shapes one benchmark runs at.

    ``dataset`` (CUB / SUN / AWA2) selects the built-in paper clusters, and ``n_clusters`` is their number;
    without it the attributes are cut into ``n_clusters`` (default 4) contiguous clusters of (nearly) equal size.
    """

    name: str
    n_channels: int
    height: int
    width: int
    n_attributes: int
    n_classes: int
    n_unseen: int
    semantic_dim: int = 300
    dataset: str | None = None
    n_clusters: int | None = None

    def __post_init__(self) -> None:
        # One source for Q: a dataset's built-in clusters decide it (a fixed default used to be reported
        # next to the dataset's own clusters).
        q = len(builtin_clusters(self.dataset, "paper")) if self.dataset is not None else 4
        if self.n_clusters is None:
            object.__setattr__(self, "n_clusters", q)
        elif self.dataset is not None and self.n_clusters != q:
            raise ValueError(f"{self.dataset} has {q} built-in clusters, got n_clusters={self.n_clusters}")

    @property
    def n_regions(self) -> int:
        return self.height * self.width

    def clusters(self) -> list[np.ndarray]:
        if self.dataset is not None:
            return list(builtin_clusters(self.dataset, "paper").values())
        assert self.n_clusters is not None
        return [c for c in np.array_split(np.arange(self.n_attributes), self.n_clusters) if c.size]


#: Real shapes of the three benchmarks, from the benchmark table.
BENCH_PRESETS: dict[str, BenchShape] = {
    name.lower(): BenchShape(name.lower(), b.feature_channels, b.feature_size, b.feature_size, b.n_attributes,
                             b.n_classes, b.n_unseen, dataset=name)
    for name, b in BENCHMARKS.items()
}


def step_flops(n_attributes: int, n_channels: int, n_regions: int, semantic_dim: int, batch_size: int) -> int:
    """Matrix work of one training step (both experts, four weight kinds, full-rank W1), in flops.

    With D attributes per expert (2D rows over both experts), C channels, R regions, G semantic dims, B images:

    - products over the features: for each weight kind W1..W4 a forward product (2D x C) by (C x R) per image
      and, for the weight gradient, one backward product of the same size (features are frozen, so there is
      no gradient with respect to them): ``8 * 2 * (2D) * C * R * B``;
    - the V W products: per expert ``2 * D * G * (2C + 2R)`` forward, twice that backward (gradients for V
      and for W): ``3 * 2 * 2 * D * G * (2C + 2R)``.

    Work that an implementation adds on top (recomputing the channel scores in backward, softmax,
    elementwise terms, losses) is not counted: this is what the step must do, not what it does.
    """
    d, c, r, g, b = n_attributes, n_channels, n_regions, semantic_dim, batch_size
    features = 8 * 2 * (2 * d) * c * r * b
    projections = 3 * 2 * (2 * d * g * (2 * c + 2 * r))
    return int(features + projections)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> float:
    """The machine's matrix-product rate: best of ``repeats`` (size x size) @ (size x size) products, in GFLOP/s."""
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen, dtype=dtype).to(device)
    b = torch.randn(size, size, generator=gen, dtype=dtype).to(device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    torch.mm(a, b, out=out)  # warm-up: thread pool, caches, kernel selection
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


class _OtherLoad:
    """Share of the machine's CPU capacity that *other* processes used over an interval (Linux: /proc).

    On a shared machine this says whether a timing can be trusted: a step timed while others kept a core
    busy can take several times longer (an OpenMP thread that loses its core stalls the other at every
    barrier). None where /proc is not available.
    """

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> int | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _own() -> int | None:
        try:
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])  # utime + stime of all our threads
        except (OSError, ValueError, IndexError):
            return None

    def share(self) -> float | None:
        busy, own, wall = self._busy(), self._own(), time.perf_counter() - self.t0
        if None in (busy, own, self.busy0, self.own0) or wall <= 0:
            return None
        ticks = os.sysconf("SC_CLK_TCK") * wall * (os.cpu_count() or 1)
        return max(0.0, ((busy - self.busy0) - (own - self.own0)) / ticks)  # type: ignore[operator]


def _time(step: Callable[[], None], repeats: int, warmup: int, device: torch.device,
          probe: Callable[[], float] | None = None) -> tuple[list[float], list[float | None], list[float]]:
    """Wall seconds of each timed step, the other processes' CPU share during it and, with ``probe``, the
    probe's value measured just before it (the matrix rate, to pair each step with the machine's speed)."""
    for _ in range(warmup):
        step()
    times, others, probes = [], [], []
    for _ in range(repeats):
        if probe is not None:
            probes.append(probe())
        _sync(device)
        load = _OtherLoad()
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        others.append(load.share())
    return times, others, probes


def _peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024**3 if sys.platform == "darwin" else 1024**2)


@dataclass(frozen=True)
class BenchSettings:
    """What :func:`run_bench` runs (apart from the shapes).

    Attributes:
        batch_size: images per step (the reference uses 50).
        repeats: timed steps per implementation; the median is reported.
        naive: also time the naive implementation (float32).
        dtype, device: where and in what precision to run.
        warmup: untimed steps before timing each implementation.
        gemm_size: side of the square product that measures the machine's matrix rate.
        mode: ``paper`` or ``reference``: the model's and the loss's method settings, resolved for the preset's
            dataset (:func:`~dedn.models.settings.resolve_method`).
        seed: seeds parameters, features and labels.
        threads: torch CPU threads for this run (restored afterwards); default: leave as set.
        model_class: the fast implementation to time (a DEDN subclass), for comparing candidate versions.
        precision: ``fp32``, ``bf16`` (float32 weights, bf16 products; the float32 step is timed too) or
            ``tf32`` (CUDA products in TF32 for this run; on a CPU the same as fp32).
        profile: also profile one step (and for bf16 one float32 step) by operator class
            (:mod:`dedn.apps.stepprofile`): the result's ``profile`` (and ``fp32_profile``).
    """

    batch_size: int = 50
    repeats: int = 3
    naive: bool = True
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"
    warmup: int = 1
    gemm_size: int = 2048
    mode: str = "paper"
    seed: int = 0
    threads: int | None = None
    model_class: type[DEDN] = DEDN
    precision: str = "fp32"
    profile: bool = False


def run_bench(preset: str | BenchShape = "cub", settings: BenchSettings | None = None,
              **overrides: Any) -> dict[str, Any]:
    """Time one training step of the fast and (optionally) the naive DEDN; see the module docstring.

    Args:
        preset: ``cub``, ``sun``, ``awa2`` (real shapes) or an explicit :class:`BenchShape`.
        settings: what to run (default: :class:`BenchSettings`'s defaults).
        overrides: fields of ``settings`` to replace (``repeats=5``, ``device="cuda"``, ...).

    Returns:
        A JSON-serialisable dict: ``step_seconds`` (median), ``step_seconds_all``, ``naive_step_seconds``,
        ``naive_step_seconds_all``, ``speedup`` (naive / fast), ``gemm_gflops``, ``flops_per_step``,
        ``achieved_gflops``, ``efficiency`` (flops_per_step / gemm rate / step time), ``efficiency_paired``
        (median over the timed steps of flops_per_step / the rate probed just before the step / its time, with
        the probes in ``gemm_gflops_paired``: steadier where the machine's speed drifts), ``peak_rss_gb``
        (whole run) and ``peak_rss_gb_fast`` (before the naive step ran), ``peak_device_memory_gb`` (CUDA),
        ``freed_host_memory_kept`` (see :mod:`dedn.hostmemory`), the shapes, ``torch_version``, ``threads``,
        ``loadavg_before`` / ``loadavg_after`` and ``other_cpu``:
        the share of the machine's CPU that other processes used during the gemm measurement and each timed
        step (Linux; above a few percent the timings are not trustworthy). The precision keys: ``precision``,
        ``precision_note``, and for bf16 (else None) ``fp32_step_seconds`` (+ ``_all``), ``step_ratio_vs_fp32``
        (bf16 / fp32 step), ``fp32_gemm_gflops``, ``bf16_gemm_gflops``, ``bf16_native`` (whether the device
        multiplies bf16 natively; ``gemm_gflops`` is the rate the bf16 products actually run at),
        ``relative_gradient_error`` and ``relative_score_error`` (:func:`gradient_error`). With ``profile``:
        ``profile`` (the run's precision) and for bf16 ``fp32_profile``, each
        :meth:`~dedn.apps.stepprofile.StepProfile.to_dict` (else None).
    """
    unknown = sorted(set(overrides) - {f.name for f in fields(BenchSettings)})
    if unknown:
        raise TypeError(f"unknown bench settings: {', '.join(unknown)}")
    s = replace(settings or BenchSettings(), **overrides)
    if s.precision not in BENCH_PRECISIONS:
        raise ValueError(f"precision must be one of {BENCH_PRECISIONS}, got {s.precision!r}")
    if s.precision != "fp32" and s.dtype != torch.float32:
        raise ValueError(f"precision {s.precision} runs float32 weights, got dtype {s.dtype}")
    old_threads = torch.get_num_threads()
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    if s.threads is not None:
        torch.set_num_threads(s.threads)
    torch.backends.cuda.matmul.allow_tf32 = s.precision == "tf32"
    kept = keep_freed_host_memory()  # as every dedn process does: the step is timed as training runs it
    try:
        result = _run(BENCH_PRESETS[preset.lower()] if isinstance(preset, str) else preset, s,
                      torch.device(s.device))
        result["freed_host_memory_kept"] = kept
        return result
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


@dataclass
class _Setup:
    """The bench's model and batch at a shape (one builder for the timings and :func:`gradient_error`)."""

    model: DEDN
    features: torch.Tensor
    labels: torch.Tensor
    seen: torch.Tensor
    loss_cfg: LossConfig


def _setup(shape: BenchShape, batch_size: int, dtype: torch.dtype, device: torch.device, mode: str, seed: int,
           model_class: type[DEDN] = DEDN) -> _Setup:
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    d, c, r, g, k = shape.n_attributes, shape.n_channels, shape.n_regions, shape.semantic_dim, shape.n_classes
    seen = np.ones(k, dtype=bool)
    seen[rng.permutation(k)[: shape.n_unseen]] = False
    semantic = rng.standard_normal((d, g)).astype(np.float32)
    class_att = rng.random((k, d)).astype(np.float32)
    loss_cfg = LossConfig()
    config = DEDNConfig(n_attributes=d, semantic_dim=g, n_channels=c, n_regions=r, clusters=tuple(shape.clusters()),
                        method=resolve_method(mode, shape.dataset, loss_cfg))
    with torch.random.fork_rng(devices=[]):  # seed the model's N(0, 1) init without touching the caller's RNG
        torch.manual_seed(seed)
        model = model_class.from_config(config, semantic, class_att, seen).to(device, dtype)
    model.train()
    features = torch.rand(batch_size, c, shape.height, shape.width, generator=gen).to(device, dtype)
    labels = torch.as_tensor(rng.choice(np.flatnonzero(seen), size=batch_size), device=device)
    return _Setup(model, features, labels, torch.as_tensor(seen, device=device), loss_cfg)


def _batch(s: _Setup, precision: str) -> torch.Tensor:
    """The batch as training hands it to the model: bf16 runs get it converted once, by the batch reader."""
    return s.features.to(torch.bfloat16) if precision == "bf16" else s.features


def _grads(s: _Setup, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The combined scores and all parameter gradients (flattened, float64) of one step at ``precision``."""
    s.model.zero_grad(set_to_none=True)
    out = s.model(_batch(s, precision), precision=precision)
    dedn_loss(out, s.labels, s.seen, s.loss_cfg, s.model.config.method, s.model.calibration_bias()).total.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in s.model.parameters() if p.grad is not None]).double()
    s.model.zero_grad(set_to_none=True)
    return out.combined().detach().double(), grads


def _gradient_error(s: _Setup, precision: str) -> dict[str, float]:
    scores32, grads32 = _grads(s, "fp32")
    scores, grads = _grads(s, precision)
    return {"relative_gradient_error": float((grads - grads32).norm() / grads32.norm()),
            "relative_score_error": float((scores - scores32).norm() / scores32.norm())}


def gradient_error(preset: str | BenchShape = "cub", precision: str = "bf16", batch_size: int = 50,
                   device: str | torch.device = "cpu", mode: str = "paper", seed: int = 0) -> dict[str, float]:
    """How far one training step's outputs at ``precision`` are from float32, at the bench's model and batch.

    Returns ``relative_gradient_error``: ||g - g32|| / ||g32|| over all parameter gradients together, and
    ``relative_score_error``: the same for the (B, K) combined class scores.
    """
    shape = BENCH_PRESETS[preset.lower()] if isinstance(preset, str) else preset
    return _gradient_error(_setup(shape, batch_size, torch.float32, torch.device(device), mode, seed), precision)


def _make_step(s: _Setup, forward: Callable[[DEDN, torch.Tensor], DEDNOutput],
               features: torch.Tensor | None = None) -> Callable[[], None]:
    """One training step of ``forward`` on the bench's batch (or ``features``), with a fresh RMSprop of the reference
    settings."""
    opt = torch.optim.RMSprop(s.model.parameters(), lr=1e-4, alpha=0.99, eps=1e-8, weight_decay=1e-4, momentum=0.9)
    batch = s.features if features is None else features

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = forward(s.model, batch)
        loss = dedn_loss(out, s.labels, s.seen, s.loss_cfg, s.model.config.method, s.model.calibration_bias()).total
        loss.backward()
        opt.step()

    return step


@dataclass
class _MatrixRates:
    """The matrix-product rates (GFLOP/s) a run's steps are counted against, and how they were measured."""

    rate_dtype: torch.dtype  # the dtype the products of the timed step run in
    native: bool | None  # bf16 runs: whether the device multiplies bf16 natively (else None)
    before: float = 0.0
    after: float = 0.0
    other_cpu: float | None = None  # other processes' CPU share during the first measurement
    fp32: float | None = None
    bf16: float | None = None

    @property
    def best(self) -> float:
        return max(self.before, self.after)


@dataclass
class _StepTimes:
    """Timed steps (seconds) of each implementation, with the other processes' CPU share during each."""

    fast: list[float]
    other_fast: list[float | None]
    rates: list[float]  # the matrix rate probed just before each fast step
    rss_fast: float  # peak RSS (GB) once the fast steps ran
    fp32: list[float]
    other_fp32: list[float | None]
    naive: list[float]
    other_naive: list[float | None]


def _rates_before(s: BenchSettings, device: torch.device) -> _MatrixRates:
    """The matrix rates measured before the steps."""
    # The products of the bf16 path run in bf16 where the device has it natively, else in float32 on rounded
    # operands (dedn.models.precision): its efficiency is counted against the rate of what actually runs.
    bf16 = s.precision == "bf16"
    native = native_bf16(device.type) if bf16 else None
    rates = _MatrixRates(torch.bfloat16 if native else s.dtype, native)
    load = _OtherLoad()
    rates.before = gemm_gflops(s.gemm_size, dtype=rates.rate_dtype, device=device)
    rates.other_cpu = load.share()
    # Native bf16: the float32 rate too. Emulated: a bf16 product is a slow reference loop, timed at a small
    # size only, and the float32 rate is the one the products run at (gemm_gflops).
    rates.fp32 = gemm_gflops(s.gemm_size, dtype=s.dtype, device=device) if native else None
    rates.bf16 = None if native or not bf16 else gemm_gflops(min(s.gemm_size, 256), repeats=2, dtype=torch.bfloat16,
                                                             device=device)
    return rates


def _time_steps(setup: _Setup, s: BenchSettings, device: torch.device, rate_dtype: torch.dtype) -> _StepTimes:
    """Time the fast step (with a matrix-rate probe before each), then the float32 (bf16 runs) and naive steps."""
    bf16 = s.precision == "bf16"
    # A short matrix-rate probe before each fast step: on a machine whose speed drifts (shared cores, clock
    # changes) each step is compared with the rate of its own moment (``efficiency_paired``).
    fast_precision = "bf16" if bf16 else "fp32"
    fast_step = _make_step(setup, lambda m, x: m(x, precision=fast_precision), _batch(setup, fast_precision))
    fast, other_fast, rates = _time(fast_step, s.repeats, s.warmup, device,
                                    probe=lambda: gemm_gflops(s.gemm_size, repeats=2, dtype=rate_dtype, device=device))
    rss_fast = _peak_rss_gb()
    fp32, other_fp32, _ = (_time(_make_step(setup, lambda m, x: m(x)), s.repeats, s.warmup, device) if bf16
                           else ([], [], []))
    naive, other_naive, _ = (_time(_make_step(setup, naive_forward), s.repeats, s.warmup, device) if s.naive
                             else ([], [], []))
    return _StepTimes(fast, other_fast, rates, rss_fast, fp32, other_fp32, naive, other_naive)


def _run(shape: BenchShape, s: BenchSettings, device: torch.device) -> dict[str, Any]:
    load_before = os.getloadavg()
    setup = _setup(shape, s.batch_size, s.dtype, device, s.mode, s.seed, s.model_class)
    accuracy = _gradient_error(setup, s.precision) if s.precision == "bf16" else {}  # before the steps move the weights
    rates = _rates_before(s, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = _time_steps(setup, s, device, rates.rate_dtype)
    # The rate drifts (clock, neighbours): measure again afterwards and take the better one.
    rates.after = gemm_gflops(s.gemm_size, dtype=rates.rate_dtype, device=device)
    if rates.native:
        rates.bf16 = rates.best
    elif s.precision == "bf16":
        rates.fp32 = rates.best
    result = _report(shape, s, device, (rates, times), accuracy, load_before)
    result.update(_profiles(setup, s) if s.profile else {"profile": None, "fp32_profile": None})
    return result


def _profiles(setup: _Setup, s: BenchSettings) -> dict[str, Any]:
    """``profile``: one step of the run's precision by operator class; ``fp32_profile``: the float32 step's (bf16
    runs; else None). Each after a warm-up step of its own optimizer."""
    out: dict[str, Any] = {}
    for key, precision in (("profile", "bf16" if s.precision == "bf16" else "fp32"),
                           ("fp32_profile", "fp32" if s.precision == "bf16" else None)):
        if precision is None:
            out[key] = None
            continue
        step = _make_step(setup, lambda m, x, p=precision: m(x, precision=p), _batch(setup, precision))
        step()
        out[key] = profile_step(step).to_dict()
    return out


def _precision_note(precision: str, device: torch.device, native: bool | None) -> str:
    if precision == "fp32":
        return "float32 throughout"
    if precision == "tf32":
        return ("CUDA products in TF32 (torch.backends.cuda.matmul.allow_tf32)" if device.type == "cuda" else
                "TF32 is a CUDA setting: on the CPU this is the same as fp32")
    if native:
        return ("work over the features in bf16 with float32 accumulation; weights, their gradients, losses, "
                "optimizer float32")
    return ("this device has no bf16 matrix unit: the bf16 products run in float32 on bf16-rounded operands "
            "(no speed-up expected; bf16_gemm_gflops is the native bf16 kernel's rate)")


def _report(shape: BenchShape, s: BenchSettings, device: torch.device, measured: tuple[_MatrixRates, _StepTimes],
            accuracy: dict[str, float], load_before: tuple[float, float, float]) -> dict[str, Any]:
    """The result of :func:`run_bench` (its keys in the order the JSON output shows them)."""
    rates, t = measured
    r = shape.n_regions
    step_s = statistics.median(t.fast)
    fp32_s = statistics.median(t.fp32) if t.fp32 else None
    naive_s = statistics.median(t.naive) if t.naive else None
    flops = step_flops(shape.n_attributes, shape.n_channels, r, shape.semantic_dim, s.batch_size)
    gflops = rates.best
    clusters = shape.clusters()
    return {
        "preset": shape.name,
        "shape": {**asdict(shape), "n_clusters": len(clusters), "n_regions": r, "batch_size": s.batch_size,
                  "cluster_sizes": [int(x.size) for x in clusters]},
        "mode": s.mode,
        "implementation": f"{s.model_class.__module__}.{s.model_class.__qualname__}",
        "dtype": str(s.dtype).replace("torch.", ""),
        "precision": s.precision,
        "precision_note": _precision_note(s.precision, device, rates.native),
        "device": str(device),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "repeats": s.repeats,
        "warmup": s.warmup,
        "gemm_size": s.gemm_size,
        "gemm_gflops": gflops,
        "gemm_gflops_before_after": [rates.before, rates.after],
        "flops_per_step": flops,
        "step_seconds": step_s,
        "step_seconds_all": t.fast,
        "achieved_gflops": flops / step_s / 1e9,
        "efficiency": flops / (gflops * 1e9) / step_s,
        "efficiency_paired": statistics.median([flops / (g * 1e9) / x for g, x in zip(t.rates, t.fast, strict=True)]),
        "gemm_gflops_paired": t.rates,
        "fp32_step_seconds": fp32_s,
        "fp32_step_seconds_all": t.fp32,
        "step_ratio_vs_fp32": step_s / fp32_s if fp32_s else None,
        "fp32_gemm_gflops": rates.fp32,
        "bf16_gemm_gflops": rates.bf16,
        "bf16_native": rates.native,
        "relative_gradient_error": accuracy.get("relative_gradient_error"),
        "relative_score_error": accuracy.get("relative_score_error"),
        "naive_step_seconds": naive_s,
        "naive_step_seconds_all": t.naive,
        "speedup": naive_s / step_s if naive_s else None,
        "peak_rss_gb_fast": t.rss_fast,
        "peak_rss_gb": _peak_rss_gb(),
        "peak_device_memory_gb": (torch.cuda.max_memory_allocated(device) / 1024**3
                                  if device.type == "cuda" else None),
        "other_cpu": {"gemm": rates.other_cpu, "fast": t.other_fast, "fp32": t.other_fp32, "naive": t.other_naive},
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
    }


def format_bench(result: dict[str, Any]) -> str:
    """A readable table of a :func:`run_bench` result."""
    s = result["shape"]

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = [
        ("preset", f"{result['preset']} (B={s['batch_size']}, C={s['n_channels']}, {s['height']}x{s['width']}, "
                   f"D={s['n_attributes']}, K={s['n_classes']}, G={s['semantic_dim']}, "
                   f"Q={len(s['cluster_sizes'])})"),
        ("device", f"{result['device']} {result['dtype']}, {result['threads']} threads, "
                   f"torch {result['torch_version']}"),
        ("precision", f"{result['precision']}: {result['precision_note']}"),
        ("fast step", f"{num(result['step_seconds'], '.3f')} s (median of {result['repeats']})"),
        ("naive step", f"{num(result['naive_step_seconds'], '.3f')} s"),
        ("speedup", f"{num(result['speedup'], '.2f')}x"),
        ("matrix rate", f"{result['gemm_gflops']:.1f} GFLOP/s ({result['gemm_size']}^2 product, best of 5 "
                        "before and 5 after)"),
        ("work per step", f"{result['flops_per_step'] / 1e9:.1f} GFLOP -> {result['achieved_gflops']:.1f} GFLOP/s"),
        ("efficiency", f"{result['efficiency']:.2f} (paired with the rate probed before each step: "
                       f"{result['efficiency_paired']:.2f})"),
        ("peak RSS", f"{result['peak_rss_gb']:.2f} GB (fast only: {result['peak_rss_gb_fast']:.2f} GB)"),
        ("host memory", "freed memory kept for reuse (glibc)" if result.get("freed_host_memory_kept")
         else "system malloc (DEDN_SYSTEM_MALLOC=1, or not glibc)"),
        ("load average", " / ".join(f"{x:.2f}" for x in result["loadavg_before"]) + " before, "
                         + " / ".join(f"{x:.2f}" for x in result["loadavg_after"]) + " after"),
    ]
    if result["fp32_step_seconds"] is not None:
        rows[4:4] = [
            ("fp32 step", f"{result['fp32_step_seconds']:.3f} s (this run; {result['precision']} / fp32 = "
                          f"{result['step_ratio_vs_fp32']:.2f})"),
            ("vs float32", f"relative error of the gradients {num(result['relative_gradient_error'], '.2e')}, "
                           f"of the scores {num(result['relative_score_error'], '.2e')}"),
            ("matrix rates", f"fp32 {num(result['fp32_gemm_gflops'], '.1f')}, "
                             f"bf16 {num(result['bf16_gemm_gflops'], '.1f')} GFLOP/s "
                             f"(bf16 native: {result['bf16_native']})"),
        ]
    other = result["other_cpu"]
    shares = [x for x in [other["gemm"], *other["fast"], *other.get("fp32", []), *other["naive"]] if x is not None]
    if shares:
        worst = max(shares)
        note = "  (timings disturbed: rerun on an idle machine)" if worst > 0.05 else ""
        rows.append(("other processes", f"up to {worst:.0%} of the CPUs during the timings{note}"))
    width = max(len(name) for name, _ in rows)
    table = "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
    if result.get("profile") is None:
        return table
    columns = {result["precision"]: result["profile"]}
    if result.get("fp32_profile") is not None:
        columns["fp32"] = result["fp32_profile"]
    return f"{table}\n\nOne step by operator class (own time under torch.profiler):\n\n{format_profile(columns)}"


def bench_command(preset: str | BenchShape = "cub", settings: BenchSettings | None = None,
                  json_out: bool = False) -> dict[str, Any]:
    """``dedn bench``: run :func:`run_bench` and print the result as JSON (``json_out``) or as a table; returns the
    result."""
    result = run_bench(preset, settings)
    print(json.dumps(result, indent=2) if json_out else format_bench(result))
    return result
