"""The feature-store benchmark on a tiny generated dataset: result keys, store reuse, isolation."""

from __future__ import annotations

import json

import pytest

from dedn.apps.storebench import StoreBenchSettings, format_store_bench, run_store_bench, store_bench_command
from dedn.config import SyntheticConfig
from dedn.errors import DataError

TINY = SyntheticConfig(n_images=60, n_channels=8, height=3, width=3, n_classes=6, n_unseen=2, n_val=1,
                       n_attributes=6, n_clusters=2, semantic_dim=4)
RUN_KEYS = {"iters", "seconds", "iters_per_s", "steady_iters_per_s", "peak_rss_gb", "ru_maxrss_gb",
            "vmrss_max_gb", "rss_file_max_gb", "rss_file_start_gb", "batch_read_seconds_mean", "data_wait_seconds",
            "loadavg_before", "isolated"}


SETTINGS = StoreBenchSettings(iters=3, batch_size=8, progress=False, synthetic=TINY, chunk_size=16, block_size=8,
                              isolate=False)


def _bench(path, **overrides):
    return run_store_bench(path, SETTINGS, **overrides)


def test_store_bench_keys_and_reuse(tmp_path):
    path = tmp_path / "store"
    first = _bench(path)
    json.dumps(first)  # JSON-serialisable
    assert {"store", "build", "store_run", "memory_run", "memory_speedup", "within_budget", "machine"} <= set(first)
    assert first["store"]["shape"] == [60, 8, 3, 3] and first["store"]["dtype"] == "float16"
    assert first["store"]["size_gb"] == round(60 * 8 * 9 * 2 / 1e9, 3)
    build = first["build"]
    assert not build["reused"] and build["images_written"] == 60 and build["chunks_written"] == 4
    assert RUN_KEYS <= set(first["store_run"]) and RUN_KEYS | {"load_seconds"} <= set(first["memory_run"])
    assert first["store_run"]["source"] == "store" and first["memory_run"]["source"] == "memory"
    assert first["store_run"]["iters"] == 3 and first["memory_speedup"] > 0
    assert first["store_run"]["clusters"] == {"part0": 3, "part1": 3}  # the generated data's own clusters
    # Same data, same model seed, same batches: both runs take the same first step.
    assert first["store_run"]["loss_first"] == pytest.approx(first["memory_run"]["loss_first"], rel=1e-5)
    assert "from store" in format_store_bench(first)

    mtime = (path / "features.bin").stat().st_mtime_ns
    second = _bench(path, in_memory=False)
    assert second["build"]["reused"] and second["build"]["images_written"] == 0
    assert (path / "features.bin").stat().st_mtime_ns == mtime
    assert second["memory_run"]["skipped"] and second["memory_speedup"] is None
    assert "skipped" in format_store_bench(second)

    with pytest.raises(DataError, match="another feature store"):
        _bench(path, synthetic=SyntheticConfig(**{**TINY.__dict__, "seed": 1}))


def test_store_bench_trains_with_fit_and_never_evaluates(tmp_path, monkeypatch, capsys):
    from dedn.training.trainer import Trainer

    def evaluate(self, progress=False):
        raise AssertionError("the store benchmark times training alone")

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    result = store_bench_command(tmp_path / "store", SETTINGS, json_out=True)
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))
    for run in (result["store_run"], result["memory_run"]):
        assert run["iters"] == 3 and run["warmup_iters"] == 0 and run["steady_iters_per_s"] == pytest.approx(
            run["iters_per_s"], rel=0.01)
        assert 0 <= run["data_wait_seconds"] <= run["seconds"] and run["setup_seconds"] >= 0
    with pytest.raises(TypeError, match="unknown store benchmark settings: iterations"):
        _bench(tmp_path / "store", iterations=3)


def test_store_bench_resumes_interrupted_build(tmp_path):
    path = tmp_path / "store"
    _bench(path, in_memory=False)
    info = json.loads((path / "store.json").read_text())
    info["complete_chunks"] = info["complete_chunks"][:2]  # as if stopped after two chunks
    (path / "store.json").write_text(json.dumps(info))
    again = _bench(path, in_memory=False)
    assert not again["build"]["reused"] and again["build"]["chunks_written"] == 2


@pytest.mark.slow
def test_store_bench_isolated_subprocess(tmp_path):
    path = tmp_path / "store"
    result = _bench(path, isolate=True, in_memory=False, iters=2)
    run = result["store_run"]
    assert result["build"]["isolated"] and run["isolated"] and result["memory_run"]["skipped"]
    assert run["peak_rss_gb"] > 0 and run["iters"] == 2 and run["threads"] >= 1
    # an error in a phase's process is raised here, with its kind
    with pytest.raises(DataError, match="build phase: .* holds another feature store"):
        _bench(path, isolate=True, in_memory=False, synthetic=SyntheticConfig(**{**TINY.__dict__, "seed": 1}))
