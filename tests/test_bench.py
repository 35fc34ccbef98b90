"""dedn.apps.bench on a tiny shape: the report's keys and the flop count (no timing asserts)."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from dedn.apps.bench import BENCH_PRESETS, BenchShape, bench_command, format_bench, run_bench, step_flops

TINY = BenchShape("tiny", n_channels=32, height=3, width=2, n_attributes=12, n_classes=7, n_unseen=2,
                  semantic_dim=5, n_clusters=3)

KEYS = {
    "preset", "shape", "mode", "implementation", "dtype", "device", "torch_version", "threads", "cpu_count",
    "repeats", "warmup", "gemm_size", "gemm_gflops", "gemm_gflops_before_after", "flops_per_step", "step_seconds",
    "step_seconds_all", "achieved_gflops", "efficiency", "naive_step_seconds", "naive_step_seconds_all", "speedup",
    "peak_rss_gb_fast", "peak_rss_gb", "peak_device_memory_gb", "loadavg_before", "loadavg_after", "other_cpu",
    "efficiency_paired", "gemm_gflops_paired",
}


def test_run_bench_tiny_report() -> None:
    res = run_bench(TINY, batch_size=4, repeats=2, gemm_size=64)
    assert set(res) == KEYS
    json.dumps(res)  # serialisable as is
    d, c, r, g, b = 12, 32, 6, 5, 4
    # 8 products over the features (4 weight kinds x forward and weight-gradient) of 2 experts' 2D rows,
    # plus the V W products (forward once, backward twice, both experts).
    want = 8 * 2 * (2 * d) * c * r * b + 3 * 2 * 2 * d * g * (2 * c + 2 * r)
    assert res["flops_per_step"] == want == step_flops(d, c, r, g, b)
    assert res["shape"]["cluster_sizes"] == [4, 4, 4] and res["shape"]["n_regions"] == 6
    assert res["shape"]["batch_size"] == 4 and res["repeats"] == 2 and len(res["step_seconds_all"]) == 2
    assert len(res["naive_step_seconds_all"]) == 2
    assert res["gemm_gflops"] == max(res["gemm_gflops_before_after"])
    assert set(res["other_cpu"]) == {"gemm", "fast", "naive"} and len(res["other_cpu"]["fast"]) == 2
    assert all(x is None or 0 <= x for x in res["other_cpu"]["fast"])
    for key in ("step_seconds", "naive_step_seconds", "gemm_gflops", "speedup", "efficiency", "peak_rss_gb"):
        assert res[key] > 0, key
    assert res["efficiency"] == pytest.approx(res["flops_per_step"] / (res["gemm_gflops"] * 1e9)
                                              / res["step_seconds"])
    paired = [res["flops_per_step"] / (g * 1e9) / t
              for g, t in zip(res["gemm_gflops_paired"], res["step_seconds_all"], strict=True)]
    assert len(paired) == 2 and res["efficiency_paired"] == pytest.approx(statistics.median(paired))
    assert res["speedup"] == pytest.approx(res["naive_step_seconds"] / res["step_seconds"])
    assert res["dtype"] == "float32" and res["torch_version"] == torch.__version__
    assert "tiny" in format_bench(res) and res["implementation"] == "dedn.models.dedn.DEDN"


def test_bench_command_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    res = bench_command(TINY, json_out=True, repeats=1, naive=False, batch_size=3, gemm_size=32, mode="reference")
    printed = json.loads(capsys.readouterr().out)
    assert printed["flops_per_step"] == res["flops_per_step"] and printed["mode"] == "reference"
    assert printed["naive_step_seconds"] is None and printed["speedup"] is None
    bench_command(TINY, json_out=False, repeats=1, naive=False, batch_size=3, gemm_size=32)
    table = capsys.readouterr().out
    assert "fast step" in table and "efficiency" in table and "speedup" in table


def test_presets_are_the_real_shapes() -> None:
    cub = BENCH_PRESETS["cub"]
    assert (cub.n_channels, cub.n_regions, cub.n_attributes, cub.n_classes) == (2048, 196, 312, 200)
    assert [c.size for c in cub.clusters()] == [112, 87, 24, 40, 15, 34]
    assert (BENCH_PRESETS["sun"].n_attributes, BENCH_PRESETS["sun"].n_classes) == (102, 717)
    assert (BENCH_PRESETS["awa2"].n_regions, BENCH_PRESETS["awa2"].n_classes) == (49, 50)
    # CUB, batch 50: about 200 GFLOP per step
    assert step_flops(312, 2048, 196, 300, 50) == 8 * 2 * 624 * 2048 * 196 * 50 + 12 * 312 * 300 * (4096 + 392)
