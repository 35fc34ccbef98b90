"""dedn.apps.bench on a tiny shape: the report's keys and the flop count (no timing asserts)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from dedn.apps.bench import (
    BENCH_PRESETS,
    BenchSettings,
    BenchShape,
    bench_command,
    format_bench,
    gradient_error,
    run_bench,
    step_flops,
)

TINY = BenchShape("tiny", n_channels=32, height=3, width=2, n_attributes=12, n_classes=7, n_unseen=2,
                  semantic_dim=5, n_clusters=3)

KEYS = {
    "preset", "shape", "mode", "implementation", "dtype", "device", "torch_version", "threads", "cpu_count",
    "repeats", "warmup", "gemm_size", "gemm_gflops", "gemm_gflops_before_after", "flops_per_step", "step_seconds",
    "step_seconds_all", "achieved_gflops", "efficiency", "naive_step_seconds", "naive_step_seconds_all", "speedup",
    "peak_rss_gb_fast", "peak_rss_gb", "peak_device_memory_gb", "loadavg_before", "loadavg_after", "other_cpu",
    "efficiency_paired", "gemm_gflops_paired", "precision", "precision_note", "fp32_step_seconds",
    "fp32_step_seconds_all", "step_ratio_vs_fp32", "fp32_gemm_gflops", "bf16_gemm_gflops", "bf16_native",
    "relative_gradient_error", "relative_score_error", "profile", "fp32_profile", "freed_host_memory_kept",
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
    assert set(res["other_cpu"]) == {"gemm", "fast", "fp32", "naive"} and len(res["other_cpu"]["fast"]) == 2
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
    assert res["precision"] == "fp32" and res["fp32_step_seconds"] is None and res["relative_gradient_error"] is None


def test_run_bench_bf16_times_fp32_in_the_same_run() -> None:
    res = run_bench(TINY, batch_size=4, repeats=2, gemm_size=64, naive=False, precision="bf16")
    assert set(res) == KEYS
    json.dumps(res)
    assert res["precision"] == "bf16" and res["dtype"] == "float32" and isinstance(res["bf16_native"], bool)
    assert len(res["fp32_step_seconds_all"]) == 2 and len(res["other_cpu"]["fp32"]) == 2
    assert res["step_ratio_vs_fp32"] == pytest.approx(res["step_seconds"] / res["fp32_step_seconds"])
    assert res["fp32_gemm_gflops"] > 0 and res["bf16_gemm_gflops"] > 0
    # the efficiency counts against the rate of the products as they run: bf16 where native, else float32
    assert res["efficiency"] == pytest.approx(res["flops_per_step"] / (res["gemm_gflops"] * 1e9)
                                              / res["step_seconds"])
    assert 0 < res["relative_gradient_error"] < 0.05 and 0 < res["relative_score_error"] < 0.05
    table = format_bench(res)
    assert "fp32 step" in table and "relative error of the gradients" in table


def test_run_bench_tf32_on_the_cpu_says_it_is_fp32() -> None:
    res = run_bench(TINY, batch_size=3, repeats=1, gemm_size=32, naive=False, precision="tf32")
    assert res["precision"] == "tf32" and "same as fp32" in res["precision_note"]
    assert not torch.backends.cuda.matmul.allow_tf32  # restored
    with pytest.raises(ValueError, match="precision"):
        run_bench(TINY, batch_size=3, repeats=1, gemm_size=32, naive=False, precision="fp16")


def test_run_bench_settings_and_keyword_overrides() -> None:
    settings = BenchSettings(batch_size=3, repeats=2, gemm_size=32, naive=False)
    res = run_bench(TINY, settings, repeats=1)  # a keyword replaces that field of the settings
    assert res["repeats"] == 1 and res["shape"]["batch_size"] == 3 and res["naive_step_seconds"] is None
    with pytest.raises(TypeError, match="unknown bench settings: repeat"):
        run_bench(TINY, settings, repeat=1)


def test_gradient_error_is_small_and_zero_for_fp32() -> None:
    err = gradient_error(TINY, "bf16", batch_size=4)
    assert 0 < err["relative_gradient_error"] < 0.05 and 0 < err["relative_score_error"] < 0.05
    assert gradient_error(TINY, "fp32", batch_size=4) == {"relative_gradient_error": 0.0,
                                                          "relative_score_error": 0.0}


def test_bench_command_json_and_table(capsys: pytest.CaptureFixture[str]) -> None:
    settings = BenchSettings(repeats=1, naive=False, batch_size=3, gemm_size=32, mode="reference")
    res = bench_command(TINY, settings, json_out=True)
    printed = json.loads(capsys.readouterr().out)
    assert printed["flops_per_step"] == res["flops_per_step"] and printed["mode"] == "reference"
    assert printed["naive_step_seconds"] is None and printed["speedup"] is None
    assert list(printed) == list(res)  # the JSON keys in the report's order
    bench_command(TINY, BenchSettings(repeats=1, naive=False, batch_size=3, gemm_size=32))
    table = capsys.readouterr().out
    assert "fast step" in table and "efficiency" in table and "speedup" in table


def test_presets_are_the_real_shapes() -> None:
    cub = BENCH_PRESETS["cub"]
    assert (cub.n_channels, cub.n_regions, cub.n_attributes, cub.n_classes) == (2048, 196, 312, 200)
    assert [c.size for c in cub.clusters()] == [112, 87, 24, 40, 15, 34]
    assert cub.n_clusters == 6  # the dataset's clusters decide Q (the report's shape.n_clusters)
    with pytest.raises(ValueError, match="n_clusters"):
        BenchShape("x", 2048, 14, 14, 312, 200, 50, dataset="CUB", n_clusters=4)
    assert BenchShape("y", 8, 2, 2, 12, 5, 2).n_clusters == 4
    assert (BENCH_PRESETS["sun"].n_attributes, BENCH_PRESETS["sun"].n_classes) == (102, 717)
    assert (BENCH_PRESETS["awa2"].n_regions, BENCH_PRESETS["awa2"].n_classes) == (49, 50)
    # CUB, batch 50: about 200 GFLOP per step
    assert step_flops(312, 2048, 196, 300, 50) == 8 * 2 * 624 * 2048 * 196 * 50 + 12 * 312 * 300 * (4096 + 392)


def test_run_bench_bf16_native_counts_against_the_bf16_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    import dedn.apps.bench as bench
    import dedn.models.precision as precision

    for module in (bench, precision):  # as on a GPU or a CPU with bf16 matrix units (slow here, tiny shape)
        monkeypatch.setattr(module, "native_bf16", lambda device_type: True)
    res = run_bench(TINY, batch_size=3, repeats=1, gemm_size=32, naive=False, precision="bf16")
    assert res["bf16_native"] is True and res["gemm_gflops"] == res["bf16_gemm_gflops"]
    assert res["fp32_gemm_gflops"] > 0 and res["fp32_step_seconds"] > 0
    assert "float32 accumulation" in res["precision_note"]
    assert 0 < res["relative_gradient_error"] < 0.05


def test_the_command_maps_its_options_onto_the_settings(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import dedn.apps.bench as bench
    import dedn.apps.storebench as storebench
    from dedn.apps.storebench import StoreBenchSettings
    from tests.conftest import run_cli

    calls = []
    monkeypatch.setattr(bench, "bench_command", lambda *a, **kw: calls.append(("bench", a, kw)))
    monkeypatch.setattr(storebench, "store_bench_command", lambda *a, **kw: calls.append(("store", a, kw)))
    assert run_cli(["bench", "--preset", "sun", "--repeats", "2", "--no-naive", "--precision", "bf16", "--json",
                    "--profile"], monkeypatch, capsys)[0] == 0
    assert run_cli(["bench", "--store", "S", "--preset", "cub", "--iters", "7", "--no-in-memory"], monkeypatch,
                   capsys)[0] == 0
    assert calls == [
        ("bench", ("sun", BenchSettings(repeats=2, naive=False, precision="bf16", profile=True)), {"json_out": True}),
        ("store", (Path("S"), StoreBenchSettings(preset="cub", iters=7, in_memory=False)), {"json_out": False}),
    ]


def test_profile_breaks_the_step_down_by_class_in_both_precisions() -> None:
    from dedn.apps.stepprofile import PROFILE_CLASSES

    res = run_bench(TINY, repeats=1, naive=False, gemm_size=64, precision="bf16", profile=True)
    for key in ("profile", "fp32_profile"):
        prof = res[key]
        assert set(PROFILE_CLASSES) <= set(prof)
        assert abs(sum(prof[c]["share"] for c in PROFILE_CLASSES) - 1.0) < 1e-9
        assert all(prof[c]["seconds"] >= 0 and prof[c]["calls"] >= 0 for c in PROFILE_CLASSES)
        assert prof["matrix_products"]["calls"] > 0 and prof["optimizer"]["calls"] > 0
    assert res["profile"]["bytes_converted"] > 0  # bf16: the weights are rounded for the products
    assert res["fp32_profile"]["conversions"]["calls"] <= res["profile"]["conversions"]["calls"]
    json.dumps(res)
    table = format_bench(res)
    assert "| conversions |" in table and "| class | bf16 s |" in table and "fp32 s" in table
    assert run_bench(TINY, repeats=1, naive=False, gemm_size=64)["profile"] is None
