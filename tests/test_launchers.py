"""Experiment launchers: submitit's local executor end to end, SLURM parameters without a cluster, bad options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import submitit

from dedn.apps import experiments as E
from dedn.apps import launch as L
from dedn.apps.protocols import Job
from dedn.config import load_config
from dedn.errors import TrainingError

from .conftest import interrupted_at_step, run_cli

SLURM = L.Launch("slurm", partition="gpu", gpus_per_job=2, cpus_per_job=8, mem_gb=32, time_min=90, max_running=3)
SLURM_OPTIONS = ["--launcher", "slurm", "--partition", "gpu", "--gpus-per-job", "2", "--cpus-per-job", "8",
                 "--mem-gb", "32", "--time-min", "90", "--max-running", "3"]
SLURM_PARAMETERS = {"name": "dedn-table1", "timeout_min": 90, "gpus_per_node": 2, "nodes": 1, "tasks_per_node": 1,
                    "slurm_partition": "gpu", "cpus_per_task": 8, "mem_gb": 32, "slurm_array_parallelism": 3}


def _launches(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "experiment.json").read_text())["launches"]


def test_local_launcher_resumes_a_killed_job_and_reuses_finished_ones(tiny_overrides, tmp_path, monkeypatch,
                                                                         capsys):
    # The job subprocesses inherit the environment: one thread each on a small shared machine.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = [*tiny_overrides, "train.epochs=2"]
    out = tmp_path / "t1"
    # Seed 1 dies in its second epoch (three iterations an epoch), after epoch 0's checkpoint.
    with interrupted_at_step(monkeypatch, 3 + 1, counts=lambda trainer: trainer.cfg.seed == 1):
        E.table1(load_config(None, overrides), seeds=2, protocol="published", out_dir=out, methods=["dedn"])
    killed = out / "runs/dedn/published/seed-1"
    assert (out / "runs/dedn/published/seed-0/done.json").exists() and not (killed / "done.json").exists()
    # What a killed process leaves: its lock files (the kernel released the lock itself) and a partial run.
    (killed / "train/.lock-owner.json").write_text(json.dumps({"pid": 999999, "host": "gone", "since": "then"}))

    args = ["experiment", "table1", "--methods", "dedn", *overrides, "--seeds", "2", "--protocol", "published",
            "--out", out, "--launcher", "local", "--max-running", "2", "--time-min", "5"]
    code, stdout, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("[")]
    assert len(lines) == 2 and "seed 0" in lines[0] and lines[0].endswith("reused")
    assert "seed 1" in lines[1] and not lines[1].endswith("reused")
    assert "at epoch 1" in (killed / "train/train.log").read_text()  # resumed from its checkpoint, not retrained
    assert json.loads((killed / "done.json").read_text())["result"]["choices"]["epochs_trained"] == 2
    assert "reports in" in stdout and (out / "table1.md").exists()
    assert "- launcher: local (submitit: timeout_min 5, gpus_per_node 1)" in (out / "table1.md").read_text()
    assert json.loads((out / "table1.json").read_text())["launch"]["launcher"] == "local"
    logs = sorted(p.name for p in (out / "submitit").iterdir())
    assert any(name.endswith("_log.err") for name in logs)
    assert [(la["launcher"], la.get("parameters")) for la in _launches(out)] == [
        ("pool", None), ("local", {"name": "dedn-table1", "timeout_min": 5, "gpus_per_node": 1})]

    code, _, err = run_cli(args, monkeypatch, capsys)  # a rerun submits nothing
    assert code == 0, err
    assert [ln.endswith("reused") for ln in err.splitlines() if ln.startswith("[")] == [True, True]
    assert sorted(p.name for p in (out / "submitit").iterdir()) == logs
    assert [la["launcher"] for la in _launches(out)] == ["pool", "local", "local"]


def test_slurm_parameters_and_executor(tmp_path, monkeypatch):
    assert L.submitit_parameters(SLURM, "dedn-table1") == SLURM_PARAMETERS
    # Options not given are left to the cluster's defaults.
    assert L.submitit_parameters(L.Launch("slurm"), "dedn-table3") == {
        "name": "dedn-table3", "timeout_min": L.DEFAULT_TIME_MIN, "gpus_per_node": 1, "nodes": 1,
        "tasks_per_node": 1}
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # srun "found"
    ex = L.make_executor(SLURM, tmp_path / "submitit", "dedn-table1")
    assert ex.cluster == "slurm" and Path(ex.folder) == (tmp_path / "submitit").resolve()
    assert ex._executor.parameters == {"job_name": "dedn-table1", "time": 90, "gpus_per_node": 2, "nodes": 1,
                                       "ntasks_per_node": 1, "partition": "gpu", "cpus_per_task": 8,
                                       "mem": "32GB", "array_parallelism": 3}


class _FakeSlurmJob:
    """A submitted job run in this process when first polled (no cluster), with submitit's job interface."""

    def __init__(self, fn: Any, job: Job, folder: Path) -> None:
        self.fn, self.job, self.out, self.exc = fn, job, None, None
        self.paths = type("Paths", (), {"stderr": folder / "0_0_log.err"})()

    def done(self) -> bool:
        if self.out is None and self.exc is None:
            try:
                self.out = self.fn(self.job)
            except Exception as exc:  # submitit hands the job's error back as an exception object
                self.exc = exc
        return True

    def exception(self) -> Exception | None:
        return self.exc

    def result(self) -> Any:
        return self.out

    def cancel(self, check: bool = True) -> None:
        pass


class _FakeSlurmExecutor:
    def __init__(self, folder: Path) -> None:
        self.folder, self.submitted = folder, []

    def batch(self) -> Any:
        import contextlib

        return contextlib.nullcontext()

    def submit(self, fn: Any, job: Job) -> _FakeSlurmJob:
        self.submitted.append(job)
        return _FakeSlurmJob(fn, job, self.folder)


def test_slurm_launcher_through_the_cli(tiny_overrides, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    made: list[dict[str, Any]] = []
    real = L.make_executor

    def fake_make_executor(launch, folder, job_name):
        ex = real(launch, folder, job_name)  # submitit checks the parameters as it would on a cluster
        made.append({"parameters": ex._executor.parameters, "folder": Path(folder)})
        return _FakeSlurmExecutor(Path(folder))

    monkeypatch.setattr(L, "make_executor", fake_make_executor)
    out = tmp_path / "t1"
    args = ["experiment", "table1", "--methods", "dedn", *tiny_overrides, "train.epochs=1", "--protocol", "published",
            "--out", out, *SLURM_OPTIONS]
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    assert made == [{"parameters": {"job_name": "dedn-table1", "time": 90, "gpus_per_node": 2, "nodes": 1,
                                    "ntasks_per_node": 1, "partition": "gpu", "cpus_per_task": 8, "mem": "32GB",
                                    "array_parallelism": 3}, "folder": out / "submitit"}]
    assert (out / "runs/dedn/published/seed-0/done.json").exists()
    launch = _launches(out)[0]
    assert launch["launcher"] == "slurm" and launch["parameters"] == SLURM_PARAMETERS

    # A job that fails on the cluster: one line naming its folder, its error and its log; exit 2.
    (out / "runs/dedn/published/seed-0/done.json").unlink()
    marker = out / "runs/dedn/published/seed-0/job.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "hash": "another"}))
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 2
    error = err.strip().splitlines()[-1]
    assert error.startswith("error: 1 of 1 jobs failed") and "started with another config" in error
    assert "seed-0" in error and "0_0_log.err" in error
    with pytest.raises(TrainingError):
        E.table1(load_config(None, [*tiny_overrides, "train.epochs=1"]), methods=["dedn"], protocol="published",
                 out_dir=out, launch=SLURM)


@pytest.mark.parametrize("options, message", [
    (["--launcher", "cloud"], "--launcher must be one of {pool, local, slurm}, got 'cloud'"),
    (["--partition", "gpu"], "--partition is for --launcher slurm, not pool"),
    (["--launcher", "local", "--mem-gb", "8"], "--mem-gb is for --launcher slurm, not local"),
    (["--time-min", "10"], "--time-min is for --launcher local or slurm, not pool"),
    (["--launcher", "local", "--gpus-per-job", "-1"], "--gpus-per-job must be an integer >= 0, got -1"),
    (["--launcher", "slurm", "--max-running", "0"], "--max-running must be an integer >= 1, got 0"),
    (["--launcher", "local", "--devices", "cpu"], "--devices is for --launcher pool"),
    (["--launcher", "slurm"], "--launcher slurm: no SLURM on this machine"),
])
def test_bad_launcher_options_are_one_line_before_any_work(options, message, tiny_overrides, tmp_path,
                                                            monkeypatch, capsys):
    srun = 2 if "--max-running" in options else -1  # found, or not on PATH
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: srun))
    out = tmp_path / "x"
    code, _, err = run_cli(["experiment", "table1", "--methods", "dedn", *tiny_overrides, "--out", out, *options],
                           monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), err
    assert not out.exists()


def test_pool_hands_each_job_a_free_device_one_job_per_device(monkeypatch):
    """The pool submits every job with a device no running job holds; results come back in job order."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from dedn.apps.results import RunResult

    lock, held, used = threading.Lock(), set(), []

    def fake_run_job(seed: int, device: str | None = None) -> RunResult:
        with lock:
            assert device not in held, f"{device} given to two running jobs"
            held.add(device)
            used.append(device)
        time.sleep(0.02 * (seed % 3))  # finish out of order
        with lock:
            held.discard(device)
        return RunResult("dedn", "DEDN", "published", seed, {"H": float(seed), "AUSUC": 0.0}, {}, None, "", {})

    # Threads instead of spawned processes, so the fake job runner is the one called.
    monkeypatch.setattr(L, "ProcessPoolExecutor", lambda max_workers, mp_context: ThreadPoolExecutor(max_workers))
    monkeypatch.setattr(L, "run_job", fake_run_job)
    lines: list[str] = []
    results = L.run_jobs(list(range(7)), ["cuda:0", "cuda:1", "cuda:2"], lines.append)  # type: ignore[arg-type]
    assert [r.seed for r in results] == list(range(7))
    assert len(used) == 7 and set(used) == {"cuda:0", "cuda:1", "cuda:2"}
    assert len(lines) == 7 and lines[-1].startswith("[7/7]")


def test_every_launcher_name_has_a_launcher():
    assert set(L.LAUNCHERS) == set(L.LauncherName)
    assert L.Launch("slurm").name is L.LauncherName.SLURM and L.Launch().record("x") == {"launcher": "pool"}
