"""Speed benchmark: one full training step of the fast model against the naive one, at real dataset shapes.

:func:`run_bench` builds a DEDN at a preset's real shapes (CUB, SUN, AWA2: C = 2048, the real attribute
clusters, G = 300, batch 50) with random non-negative features, and times, in one process:

- the machine's float32 matrix-product rate (``gemm_gflops``: best of several large square products, measured
  before and after the steps);
- a full training step of :class:`~dedn.models.dedn.DEDN` (forward, :func:`~dedn.models.losses.dedn_loss`, backward,
  RMSprop step), median over ``repeats`` after warm-up;
- the same step with :func:`~dedn.models.naive.naive_forward` (same parameters), the one-pass-per-sub-network
  version.

It reports how close the fast step comes to the machine's matrix rate (``efficiency``, see
:func:`step_flops` for the work counted) and how much faster it is than the naive one (``speedup``).
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
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from dedn.config import LossConfig
from dedn.data.benchmarks import BENCHMARKS
from dedn.data.clusters import builtin_clusters
from dedn.models.dedn import DEDN, DEDNConfig, DEDNOutput
from dedn.models.losses import dedn_loss
from dedn.models.naive import naive_forward
from dedn.models.settings import resolve_method

__all__ = ["BENCH_PRESETS", "BenchShape", "bench_command", "format_bench", "gemm_gflops", "run_bench", "step_flops"]


@dataclass(frozen=True)
class BenchShape:
    """The shapes one benchmark runs at.

    ``dataset`` (CUB / SUN / AWA2) selects the built-in paper clusters; without it the attributes are cut
    into ``n_clusters`` contiguous clusters of (nearly) equal size.
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
    n_clusters: int = 4

    @property
    def n_regions(self) -> int:
        return self.height * self.width

    def clusters(self) -> list[np.ndarray]:
        if self.dataset is not None:
            return list(builtin_clusters(self.dataset, "paper").values())
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


def run_bench(
    preset: str | BenchShape = "cub",
    batch_size: int = 50,
    repeats: int = 3,
    naive: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    warmup: int = 1,
    gemm_size: int = 2048,
    mode: str = "paper",
    seed: int = 0,
    threads: int | None = None,
    model_class: type[DEDN] = DEDN,
) -> dict[str, Any]:
    """Time one training step of the fast and (optionally) the naive DEDN; see the module docstring.

    Args:
        preset: ``cub``, ``sun``, ``awa2`` (real shapes) or an explicit :class:`BenchShape`.
        batch_size: images per step (the reference uses 50).
        repeats: timed steps per implementation; the median is reported.
        naive: also time the naive implementation.
        dtype, device: where and in what precision to run.
        warmup: untimed steps before timing each implementation.
        gemm_size: side of the square product that measures the machine's matrix rate.
        mode: ``paper`` or ``reference``: the model's and the loss's method settings, resolved for the preset's
            dataset (:func:`~dedn.models.settings.resolve_method`).
        seed: seeds parameters, features and labels.
        threads: torch CPU threads for this run (restored afterwards); default: leave as set.
        model_class: the fast implementation to time (a DEDN subclass), for comparing candidate versions.

    Returns:
        A JSON-serialisable dict: ``step_seconds`` (median), ``step_seconds_all``, ``naive_step_seconds``,
        ``naive_step_seconds_all``, ``speedup`` (naive / fast), ``gemm_gflops``, ``flops_per_step``,
        ``achieved_gflops``, ``efficiency`` (flops_per_step / gemm rate / step time), ``efficiency_paired``
        (median over the timed steps of flops_per_step / the rate probed just before the step / its time, with
        the probes in ``gemm_gflops_paired``: steadier where the machine's speed drifts), ``peak_rss_gb``
        (whole run) and ``peak_rss_gb_fast`` (before the naive step ran), ``peak_device_memory_gb`` (CUDA),
        the shapes, ``torch_version``, ``threads``, ``loadavg_before`` / ``loadavg_after`` and ``other_cpu``:
        the share of the machine's CPU that other processes used during the gemm measurement and each timed
        step (Linux; above a few percent the timings are not trustworthy).
    """
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(BENCH_PRESETS[preset.lower()] if isinstance(preset, str) else preset, batch_size, repeats, naive,
                    dtype, torch.device(device), warmup, gemm_size, mode, seed, model_class)
    finally:
        torch.set_num_threads(old_threads)


def _run(shape: BenchShape, batch_size: int, repeats: int, naive: bool, dtype: torch.dtype, device: torch.device,
         warmup: int, gemm_size: int, mode: str, seed: int, model_class: type[DEDN]) -> dict[str, Any]:
    load_before = os.getloadavg()
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
    seen_t = torch.as_tensor(seen, device=device)

    def make_step(forward: Callable[[DEDN, torch.Tensor], DEDNOutput]) -> Callable[[], None]:
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.99, eps=1e-8, weight_decay=1e-4,
                                  momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            out = forward(model, features)
            loss = dedn_loss(out, labels, seen_t, loss_cfg, model.method, model.calibration_bias()).total
            loss.backward()
            opt.step()

        return step

    load = _OtherLoad()
    gflops = gemm_gflops(gemm_size, dtype=dtype, device=device)
    other_gemm = load.share()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # A short matrix-rate probe before each fast step: on a machine whose speed drifts (shared cores, clock
    # changes) each step is compared with the rate of its own moment (``efficiency_paired``).
    fast, other_fast, rates = _time(make_step(lambda m, x: m(x)), repeats, warmup, device,
                                    probe=lambda: gemm_gflops(gemm_size, repeats=2, dtype=dtype, device=device))
    rss_fast = _peak_rss_gb()
    naive_times, other_naive, _ = _time(make_step(naive_forward), repeats, warmup, device) if naive else ([], [], [])
    # The rate drifts (clock, neighbours): measure again afterwards and take the better one.
    gflops_after = gemm_gflops(gemm_size, dtype=dtype, device=device)
    gflops_before, gflops = gflops, max(gflops, gflops_after)

    step_s = statistics.median(fast)
    flops = step_flops(d, c, r, g, batch_size)
    result: dict[str, Any] = {
        "preset": shape.name,
        "shape": {**asdict(shape), "n_regions": r, "batch_size": batch_size,
                  "cluster_sizes": [int(x.size) for x in shape.clusters()]},
        "mode": mode,
        "implementation": f"{model_class.__module__}.{model_class.__qualname__}",
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "repeats": repeats,
        "warmup": warmup,
        "gemm_size": gemm_size,
        "gemm_gflops": gflops,
        "gemm_gflops_before_after": [gflops_before, gflops_after],
        "flops_per_step": flops,
        "step_seconds": step_s,
        "step_seconds_all": fast,
        "achieved_gflops": flops / step_s / 1e9,
        "efficiency": flops / (gflops * 1e9) / step_s,
        "efficiency_paired": statistics.median([flops / (rate * 1e9) / t for rate, t in zip(rates, fast, strict=True)]),
        "gemm_gflops_paired": rates,
        "naive_step_seconds": statistics.median(naive_times) if naive_times else None,
        "naive_step_seconds_all": naive_times,
        "speedup": statistics.median(naive_times) / step_s if naive_times else None,
        "peak_rss_gb_fast": rss_fast,
        "peak_rss_gb": _peak_rss_gb(),
        "peak_device_memory_gb": (torch.cuda.max_memory_allocated(device) / 1024**3
                                  if device.type == "cuda" else None),
        "other_cpu": {"gemm": other_gemm, "fast": other_fast, "naive": other_naive},
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
    }
    return result


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
        ("fast step", f"{num(result['step_seconds'], '.3f')} s (median of {result['repeats']})"),
        ("naive step", f"{num(result['naive_step_seconds'], '.3f')} s"),
        ("speedup", f"{num(result['speedup'], '.2f')}x"),
        ("matrix rate", f"{result['gemm_gflops']:.1f} GFLOP/s ({result['gemm_size']}^2 product, best of 5 "
                        "before and 5 after)"),
        ("work per step", f"{result['flops_per_step'] / 1e9:.1f} GFLOP -> {result['achieved_gflops']:.1f} GFLOP/s"),
        ("efficiency", f"{result['efficiency']:.2f} (paired with the rate probed before each step: "
                       f"{result['efficiency_paired']:.2f})"),
        ("peak RSS", f"{result['peak_rss_gb']:.2f} GB (fast only: {result['peak_rss_gb_fast']:.2f} GB)"),
        ("load average", " / ".join(f"{x:.2f}" for x in result["loadavg_before"]) + " before, "
                         + " / ".join(f"{x:.2f}" for x in result["loadavg_after"]) + " after"),
    ]
    shares = [x for x in [result["other_cpu"]["gemm"], *result["other_cpu"]["fast"], *result["other_cpu"]["naive"]]
              if x is not None]
    if shares:
        worst = max(shares)
        note = "  (timings disturbed: rerun on an idle machine)" if worst > 0.05 else ""
        rows.append(("other processes", f"up to {worst:.0%} of the CPUs during the timings{note}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def bench_command(preset: str | BenchShape = "cub", json_out: bool = False, repeats: int = 3,
                  naive: bool = True, **kwargs: Any) -> dict[str, Any]:
    """``dedn bench``: run :func:`run_bench` and print the result as JSON (``json_out``) or as a table.

    Extra keyword arguments go to :func:`run_bench` (batch_size, dtype, device, ...). Returns the result.
    """
    result = run_bench(preset, repeats=repeats, naive=naive, **kwargs)
    print(json.dumps(result, indent=2) if json_out else format_bench(result))
    return result
