"""Launchers: how an experiment's independent jobs (:class:`dedn.apps.protocols.Job`) run.

``dedn experiment --launcher`` (:class:`LauncherName`, :class:`Launch`):

- ``pool``, the default: the jobs one after the other in this process, on ``train.device``; with
  ``devices=["cuda:0", "cuda:1"]`` they go to a :class:`concurrent.futures.ProcessPoolExecutor` (spawn
  context) with one worker per device, each job submitted together with a device that is free, at most one
  job in flight per device (:func:`run_jobs`).
- ``local`` and ``slurm``: each unfinished job submitted through submitit (:func:`submit_jobs`): a subprocess
  on this machine, or a SLURM job (one job array) with the partition, GPUs, CPUs, memory and time limit
  given. A SLURM job that times out or is preempted is requeued and resumes from its checkpoint; one killed
  for good is rerun, from its checkpoint, by rerunning the command.

:func:`launch_jobs` picks the launcher from :data:`LAUNCHERS` (name -> function). One run spread over several
GPUs is :class:`~dedn.training.trainer.Trainer`'s business: launch it with ``torchrun`` (distributed data parallel).
"""

from __future__ import annotations

import multiprocessing as mp
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dedn.apps.datacache import DataCache
from dedn.apps.protocols import Job, finished_result, run_job
from dedn.apps.results import RunResult
from dedn.checks import Choice
from dedn.errors import ConfigError, TrainingError


class LauncherName(Choice):
    """The launchers (``dedn experiment --launcher``); each value is the name the CLI and records use."""

    POOL = "pool"
    LOCAL = "local"
    SLURM = "slurm"


#: The launchers that submit each job through submitit.
SUBMITIT_LAUNCHERS = (LauncherName.LOCAL, LauncherName.SLURM)
#: Time limit of a submitit job when none is given. A job that reaches it is requeued and resumes from its
#: last checkpoint (at most 3 times, submitit's default), so it bounds one stretch of training, not a job.
DEFAULT_TIME_MIN = 240
#: Seconds between polls of running submitit jobs: a local job's process is cheap to poll, sacct is not.
POLL_S = {LauncherName.LOCAL: 0.2, LauncherName.SLURM: 15.0}

Report = Callable[[str], None]


def parse_devices(devices: str | Sequence[str] | None) -> list[str] | None:
    """``"cuda:0,cuda:1"`` or a list -> checked device names; None or empty -> None (sequential, in-process).

    Raises:
        ConfigError: a name is not cpu / cuda / cuda:N, or names a CUDA device this machine lacks.
    """
    if devices is None:
        return None
    names = [d.strip() for d in (devices.split(",") if isinstance(devices, str) else devices) if d.strip()]
    if not names:
        return None
    import torch

    for name in names:
        kind, _, index = name.partition(":")
        if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
            raise ConfigError(f"--devices {name!r}: not a device; give cpu, cuda or cuda:N, comma-separated, one "
                              "worker each (e.g. --devices cpu,cpu or --devices cuda:0,cuda:1)")
        if kind == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"--devices {name}: no CUDA device is available here; give cpu (e.g. --devices "
                                  "cpu,cpu)")
            if index and int(index) >= torch.cuda.device_count():
                raise ConfigError(f"--devices {name}: only {torch.cuda.device_count()} CUDA device(s) exist; "
                                  f"give cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return names


@dataclass(frozen=True)
class Launch:
    """How an experiment's jobs run (``dedn experiment --launcher`` and its options); None: not given.

    Attributes:
        launcher: a :class:`LauncherName` value: pool, local or slurm.
        partition: slurm: the SLURM partition (default: the cluster's).
        gpus_per_job: local, slurm: GPUs each job sees (default 1; 0 for CPU jobs). One training process
            uses one GPU; local jobs all see this machine's first ones (the pool's ``devices`` spreads
            jobs over GPUs).
        cpus_per_job: slurm: CPUs per job (default: the cluster's).
        mem_gb: slurm: memory per job in GB (default: the cluster's).
        time_min: local, slurm: time limit per job in minutes (default :data:`DEFAULT_TIME_MIN`).
        max_running: local, slurm: most jobs running at once (default: local 1, slurm no limit).
    """

    launcher: str = LauncherName.POOL.value
    partition: str | None = None
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem_gb: int | None = None
    time_min: int | None = None
    max_running: int | None = None

    @property
    def name(self) -> LauncherName:
        """The launcher (after :meth:`check`; ValueError for an unknown one)."""
        return LauncherName(self.launcher)

    def check(self, devices: Sequence[str] | None = None) -> None:
        """Refuse an unknown launcher, a bad value, or an option its launcher does not use.

        Raises:
            ConfigError: one line naming the option (as ``dedn experiment`` spells it) and the problem.
        """
        from dedn.checks import COUNT, NON_NEGATIVE_COUNT, Rule, check, choice

        check("--launcher", self.launcher, choice(*(n.value for n in LauncherName)))
        submitted = tuple(n.value for n in SUBMITIT_LAUNCHERS)
        slurm = (LauncherName.SLURM.value,)
        options: dict[str, tuple[Any, Rule, tuple[str, ...]]] = {
            "--partition": (self.partition, Rule(lambda v: isinstance(v, str) and bool(v.strip()),
                                                 "a partition name"), slurm),
            "--gpus-per-job": (self.gpus_per_job, NON_NEGATIVE_COUNT, submitted),
            "--cpus-per-job": (self.cpus_per_job, COUNT, slurm),
            "--mem-gb": (self.mem_gb, COUNT, slurm),
            "--time-min": (self.time_min, COUNT, submitted),
            "--max-running": (self.max_running, COUNT, submitted),
        }
        for option, (value, rule, launchers) in options.items():
            if value is None:
                continue
            if self.launcher not in launchers:
                raise ConfigError(f"{option} is for --launcher {' or '.join(launchers)}, not {self.launcher}")
            check(option, value, rule)
        if devices and self.name != LauncherName.POOL:
            raise ConfigError(f"--devices is for --launcher pool (one worker per device); a {self.launcher} job "
                              "gets its GPUs from the launcher (--gpus-per-job)")
        if self.name == LauncherName.SLURM:
            import submitit

            if submitit.SlurmExecutor.affinity() <= 0:
                raise ConfigError("--launcher slurm: no SLURM on this machine (srun is not on PATH); submit from a "
                                  "cluster login node, or use --launcher local or pool")

    def record(self, job_name: str) -> dict[str, Any]:
        """What ``experiment.json`` keeps of this launch: the launcher and, when submitted, its parameters."""
        out: dict[str, Any] = {"launcher": self.name.value}
        if self.name in SUBMITIT_LAUNCHERS:
            out["parameters"] = submitit_parameters(self, job_name)
        return out


def job_line(result: RunResult, done: int, total: int) -> str:
    """One progress line for a finished job: its H with gamma and source, and its time (or "reused")."""
    m, c = result.metrics, result.choices
    gamma = c.get("gamma", c.get("calibration"))
    took = "reused" if result.reused else f"{result.seconds:.0f} s" if result.seconds is not None else ""
    where = f"gamma {gamma:.3g} ({c.get('gamma_source', '?')})" if isinstance(gamma, (int, float)) else ""
    return (f"[{done}/{total}] {result.label} ({result.protocol}, seed {result.seed}): H {m['H']:.1f}, "
            f"AUSUC {m['AUSUC']:.1f}, {where}, {took}")


# ============================================================================================ pool
def run_jobs(jobs: Sequence[Job], devices: Sequence[str] | None = None, report: Report | None = None,
             cache: DataCache | None = None) -> list[RunResult]:
    """Run independent jobs: in this process one after another (``devices`` None; they share ``cache``), or
    one worker process per device (spawn context), each job handed a free device. Results come back in job
    order; ``report`` gets one line per finished job (:func:`job_line`) as it finishes.

    With workers, every job is attempted; the first error is raised once all have ended, so finished jobs
    keep their ``done.json``.
    """
    say = report or (lambda line: None)
    if not devices:
        cache = cache or DataCache()
        out: list[RunResult] = []
        for job in jobs:
            out.append(run_job(job, cache=cache))
            say(job_line(out[-1], len(out), len(jobs)))
        return out
    futures = _run_on_devices(jobs, devices, say)
    first = next((f.exception() for f in futures if f.exception() is not None), None)
    if first is not None:
        raise first
    return [f.result() for f in futures]


def _run_on_devices(jobs: Sequence[Job], devices: Sequence[str], say: Report) -> list[Future[RunResult]]:
    """Every job run by a worker process, on a device no other running job holds; the futures in job order."""
    futures: dict[int, Future[RunResult]] = {}
    pending, free = list(range(len(jobs))), list(devices)
    running: dict[Future[RunResult], tuple[int, str]] = {}
    finished = 0
    with ProcessPoolExecutor(max_workers=len(devices), mp_context=mp.get_context("spawn")) as pool:
        while pending or running:
            while pending and free:
                i, device = pending.pop(0), free.pop(0)
                futures[i] = pool.submit(run_job, jobs[i], device)
                running[futures[i]] = (i, device)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in sorted(done, key=lambda f: running[f][0]):
                free.append(running.pop(f)[1])
                finished += 1
                if f.exception() is None:
                    say(job_line(f.result(), finished, len(jobs)))
    return [futures[i] for i in range(len(jobs))]


# ============================================================================================ submitit
def submitit_parameters(launch: Launch, job_name: str) -> dict[str, Any]:
    """The :class:`submitit.AutoExecutor` parameters of a local or slurm launch (``update_parameters``).

    Generic keys (``name``, ``timeout_min``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``) apply to
    both executors where they can; ``slurm_*`` keys only to SLURM. Options not given are left out, so the
    cluster's defaults apply. One task per job: a job is one training process.
    """
    params: dict[str, Any] = {"name": job_name, "timeout_min": launch.time_min or DEFAULT_TIME_MIN,
                              "gpus_per_node": 1 if launch.gpus_per_job is None else launch.gpus_per_job}
    if launch.name == LauncherName.SLURM:
        params.update(nodes=1, tasks_per_node=1)
        given = {"slurm_partition": launch.partition, "cpus_per_task": launch.cpus_per_job,
                 "mem_gb": launch.mem_gb, "slurm_array_parallelism": launch.max_running}
        params.update({k: v for k, v in given.items() if v is not None})
    return params


def make_executor(launch: Launch, folder: Path, job_name: str) -> Any:
    """A submitit executor for ``launch`` (local or slurm) logging to ``folder``, its parameters set."""
    import submitit

    # submitit's cluster names are the launchers' names.
    executor = submitit.AutoExecutor(folder=folder, cluster=launch.name.value)
    executor.update_parameters(**submitit_parameters(launch, job_name))
    return executor


class _SubmittedJob:
    """:func:`run_job` as a submitit callable. Having ``checkpoint``, it is requeued rather than failed when
    the scheduler times it out or preempts it; the requeued job resumes its folder from the last checkpoint
    (the killed process's folder lock went with it)."""

    def __call__(self, job: Job) -> RunResult:
        return run_job(job)

    def checkpoint(self, job: Job) -> Any:
        from submitit.core.utils import DelayedSubmission

        return DelayedSubmission(self, job)


def _error_line(exc: BaseException) -> str:
    """The exception line of a submitit job's error (its message carries the job's whole traceback)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", line):
            return line
    return lines[0] if lines else type(exc).__name__


def submit_jobs(jobs: Sequence[Job], launch: Launch, folder: Path, job_name: str = "dedn",
                report: Report | None = None, poll_s: float | None = None) -> list[RunResult]:
    """Run independent jobs through submitit (``launch.launcher`` local or slurm), logs in ``folder``.

    Finished jobs are read here and not submitted again; the others are submitted (slurm: as one job array)
    and polled every ``poll_s`` seconds (default :data:`POLL_S`). ``report`` gets one line per job as it
    finishes (:func:`job_line`). Every job is attempted; failures are raised together once all have ended,
    so finished jobs keep their ``done.json``. Interrupted here (Ctrl-C), the running jobs are cancelled;
    rerunning resumes them.

    Raises:
        TrainingError: some jobs failed; names the first one's folder, its error and its log file.
    """
    say = report or (lambda line: None)
    results: dict[int, RunResult] = {}
    todo = []
    for i, job in enumerate(jobs):
        reused = finished_result(job)
        if reused is None:
            todo.append(i)
        else:
            results[i] = reused
            say(job_line(reused, len(results), len(jobs)))
    if todo:
        failed = _submit_and_poll(jobs, todo, launch, make_executor(launch, folder, job_name), results, say,
                                  POLL_S[launch.name] if poll_s is None else poll_s)
        if failed:
            i, sub, exc = failed[0]
            raise TrainingError(f"{len(failed)} of {len(todo)} jobs failed; the first, {jobs[i].folder}: "
                                f"{_error_line(exc)} (log {sub.paths.stderr}); finished jobs keep their results: "
                                "rerun the command to retry the others")
    return [results[i] for i in range(len(jobs))]


def _submit_and_poll(jobs: Sequence[Job], todo: list[int], launch: Launch, executor: Any,
                     results: dict[int, RunResult], say: Report, poll: float) -> list[tuple[int, Any, BaseException]]:
    """Submit the ``todo`` jobs, at most ``max_running`` at once locally, and poll them until all have ended;
    results go into ``results``; returns the failures (index, submitit job, error)."""
    total = len(jobs)
    # SLURM queues the whole array itself (--max-running is its array parallelism); locally, this loop does.
    room = len(todo) if launch.name == LauncherName.SLURM else launch.max_running or 1
    pending, running, failed = list(todo), {}, []
    try:
        while pending or running:
            batch, pending = pending[:room - len(running)], pending[room - len(running):]
            if batch:
                with executor.batch():
                    submitted = [executor.submit(_SubmittedJob(), jobs[i]) for i in batch]
                running.update(zip(batch, submitted, strict=True))
            for i, sub in list(running.items()):
                if not sub.done():
                    continue
                del running[i]
                exc = sub.exception()
                if exc is None:
                    results[i] = sub.result()
                    say(job_line(results[i], len(results) + len(failed), total))
                else:
                    failed.append((i, sub, exc))
                    job = jobs[i]
                    say(f"[{len(results) + len(failed)}/{total}] {job.row.label} ({job.protocol}, seed {job.seed}): "
                        f"failed, log {sub.paths.stderr}")
            if running:
                time.sleep(poll)
    except BaseException:
        for sub in running.values():
            sub.cancel(check=False)
        raise
    return failed


# ============================================================================================ registry
@dataclass(frozen=True)
class LaunchTarget:
    """Where and how a launcher hands back its jobs' results: the pool's devices, submitit's log folder and
    job name, the progress ``report`` and the driver's loaded data (used by the in-process pool only)."""

    devices: list[str] | None
    folder: Path
    job_name: str
    report: Report | None = None
    cache: DataCache | None = None


def _launch_pool(jobs: Sequence[Job], launch: Launch, target: LaunchTarget) -> list[RunResult]:
    return run_jobs(jobs, target.devices, target.report, target.cache)


def _launch_submitit(jobs: Sequence[Job], launch: Launch, target: LaunchTarget) -> list[RunResult]:
    return submit_jobs(jobs, launch, target.folder, target.job_name, target.report)


#: Launcher -> how it runs a list of jobs: (jobs, launch, target) -> results in job order.
LAUNCHERS: dict[LauncherName, Callable[[Sequence[Job], Launch, LaunchTarget], list[RunResult]]] = {
    LauncherName.POOL: _launch_pool,
    LauncherName.LOCAL: _launch_submitit,
    LauncherName.SLURM: _launch_submitit,
}


def launch_jobs(jobs: Sequence[Job], launch: Launch, target: LaunchTarget) -> list[RunResult]:
    """Run independent jobs with ``launch``'s launcher (:data:`LAUNCHERS`); results in job order."""
    return LAUNCHERS[launch.name](jobs, launch, target)
