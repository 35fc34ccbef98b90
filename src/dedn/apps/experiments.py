"""Paper experiments: the driver over jobs and the commands (Table 1, Table 3, Figures 3 and 5, calibration).

The driver (:func:`table1` and the other commands) resolves the config, checks everything before any work,
claims the results folder, makes one :class:`~dedn.apps.protocols.Job` per (row, protocol, seed) and hands the
jobs to the launcher (:mod:`dedn.apps.launch`). Every command runs the config's ``eval.protocol`` unless
``protocol`` says otherwise (``validated``, ``published`` or ``both``); the config's default is ``validated``.
The protocols themselves (``validated``, the honest one, and ``published``, what the released code reports)
are :mod:`dedn.apps.protocols`'s; what the validated protocol chooses on its validation task is
:mod:`dedn.apps.selection`'s (docs/modes.md, "Evaluation protocols"). Every output names its protocol.

A results folder (``out_dir``) holds::

    OUT/experiment.json                  experiment name, config hash, resolved config, and every launch
                                         (launcher, its submitit parameters, devices, when)
    OUT/runs/<row>/<protocol>/seed-<s>/  one folder per (row, protocol, seed)
        job.json                         the job's config hash (written when the job starts)
        done.json                        the result, written atomically when the job is complete
        train/                           published: the trainer's run folder (test split every epoch)
        validation/combo-NN/             validated run 1: one trainer run per training-setting combination
        selection.json                   validated: what run 1 chose
        final/                           validated run 2: retrained on trainval, tested once
    OUT/<experiment>.md .csv _seeds.csv .json .png   the reports (:mod:`dedn.apps.reports`)
    OUT/submitit/                        launchers local and slurm: submitit's job files and logs

Rerunning a command skips finished jobs, resumes unfinished ones from their last checkpoint
(:meth:`dedn.training.trainer.Trainer.resume`) and refuses (:class:`~dedn.errors.ConfigError`) a results folder or
job folder written with another config; a finished result is never overwritten.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dedn import __version__
from dedn.apps import reports
from dedn.apps.datacache import DataCache
from dedn.apps.launch import Launch, LaunchTarget, launch_jobs, parse_devices
from dedn.apps.protocols import (
    JOB_PROTOCOLS,
    UNHASHED_KEYS,
    Job,
    ProtocolName,
    checked_overrides,
    config_row,
    utc_now,
)
from dedn.apps.results import ExperimentResult, Row
from dedn.apps.selection import EVAL_TIME_KEYS, check_validation_task
from dedn.atomic import atomic_write_text
from dedn.config import (
    RunConfig,
    config_hash,
    config_to_dict,
    diff_keys,
    find_config,
    get_key,
    has_key,
    load_config,
    set_keys,
    without_keys,
)
from dedn.errors import ConfigError
from dedn.eval.metrics import ausuc, seen_unseen_curve
from dedn.factory import resolve_model_clusters
from dedn.models.registry import model_entry, model_names

__all__ = [
    "EXPERIMENTS",
    "FIGURE3_VALUES",
    "TABLE3_ROWS",
    "calibration",
    "figure3",
    "figure5",
    "parse_grid",
    "run_experiment",
    "table1",
    "table3",
]

#: Settings the protocols themselves decide; a tune grid may not name them.
PROTOCOL_KEYS = ("seed", "data.split", "train.epochs", "train.eval_every", "eval.protocol", "eval.calibration",
                 "name", "output_dir", "train.device", "train.progress")
#: Figure 3's grid: 0, 0.1, ..., 1.
FIGURE3_VALUES = tuple(round(0.1 * i, 1) for i in range(11))

#: Paper Table 3, in the paper's order.
TABLE3_ROWS: tuple[Row, ...] = (
    # One set of names for the ablations, everywhere (docs/method.md, "Ablations"). The paper's Table 3 calls
    # some of these "DAN w/o CA" and "DAN w/o L_align" (DAN: one attention sub-network); we name what is removed.
    Row("cexp_wo_distill", "cExp alone (no distillation)", ("model.experts=cexp", "loss.distill=false")),
    Row("fexp_wo_distill", "fExp alone (no distillation)", ("model.experts=fexp", "loss.distill=false")),
    Row("dedn_wo_distill", "DEDN w/o distillation", ("loss.distill=false",)),
    Row("wo_channel_attention", "DEDN w/o channel attention", ("model.channel_attention=false",)),
    Row("wo_mal", "DEDN w/o MAL", ("loss.mal=false",)),
    Row("wo_align", "DEDN w/o alignment", ("loss.align=false",)),
    Row("full", "DEDN", ()),
)

#: An experiment's rows: fixed, or made from the resolved config (with the driver's loaded data).
Rows = Sequence[Row] | Callable[[RunConfig, DataCache], list[Row]]
Grid = Mapping[str, Sequence[Any]]


@dataclass(frozen=True)
class ExperimentSettings:
    """What every experiment command takes besides its config (see :func:`table1`)."""

    seeds: int | Sequence[int] = 1
    protocol: str | None = None
    out_dir: str | Path | None = None
    overrides: Sequence[str] = ()
    devices: str | Sequence[str] | None = None
    tune: Grid | None = None
    report: Callable[[str], None] | None = None
    launch: Launch | None = None


# ============================================================================================ configs
def _resolve_config(cfg: RunConfig | str | Path | None, overrides: Sequence[str]) -> RunConfig:
    if cfg is None or isinstance(cfg, (str, Path)):
        return load_config(cfg, list(overrides))
    return checked_overrides(cfg, overrides, "config")


def _protocols(protocol: str | None, cfg: RunConfig) -> list[str]:
    """An experiment's protocols: ``protocol`` (validated, published or both), else the config's
    ``eval.protocol``, which is validated unless the config says otherwise (every experiment alike)."""
    where = "--protocol" if protocol is not None else "eval.protocol"
    protocol = cfg.eval.protocol if protocol is None else protocol
    if protocol == "both":
        return list(JOB_PROTOCOLS)
    if protocol not in JOB_PROTOCOLS:
        raise ConfigError(f"{where} {protocol}: give validated, published or both")
    return [protocol]


def _seed_list(seeds: int | Sequence[int], base: int) -> list[int]:
    if isinstance(seeds, int):
        if seeds < 1:
            raise ConfigError(f"--seeds {seeds}: give how many seeds to run, at least 1")
        return [base + i for i in range(seeds)]
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out):
        raise ConfigError(f"seeds must be a non-empty list of distinct integers, got {list(seeds)}")
    return out


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["model.l_e=0.5,0.9", "loss.beta=0.001,0.01"]`` -> ``{"model.l_e": ["0.5", "0.9"], ...}`` (CLI helper).

    Values stay text; :func:`table1` and friends convert and check them against :class:`RunConfig`.
    """
    grid: dict[str, list[str]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--tune {spec!r}: give dotted.key=v1,v2,... (e.g. --tune model.l_e=0.5,0.9)")
        key, values = spec.split("=", 1)
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def _check_grid(cfg: RunConfig, grid: Grid | None,
                eval_only: bool = False) -> tuple[dict[str, list[float]], list[tuple[str, ...]], dict[str, list[Any]]]:
    """Split a grid into evaluation-time values and training-setting override combinations.

    Returns ``(eval_grid, train_combos, normalised grid)``; ``train_combos`` is ``[()]`` without
    training-time keys.

    Raises:
        ConfigError: a key is not a RunConfig setting, is decided by the protocol, has no or bad values,
            or (``eval_only``) is not an evaluation-time setting.
    """
    eval_grid: dict[str, list[float]] = {}
    train_values: dict[str, list[str]] = {}
    normalised: dict[str, list[Any]] = {}
    for key, values in (grid or {}).items():
        if not has_key(key):
            raise ConfigError(f"sweep/tune parameter {key!r} is not a setting of RunConfig")
        if key in PROTOCOL_KEYS:
            raise ConfigError(f"sweep/tune parameter {key!r} is decided by the protocol and cannot be swept")
        if eval_only and key not in EVAL_TIME_KEYS:
            raise ConfigError(f"sweep parameter {key!r} acts at training time; this sweep covers only "
                              f"evaluation-time settings ({', '.join(EVAL_TIME_KEYS)}); compare training "
                              "settings as separate rows instead")
        values = list(values)
        if not values:
            raise ConfigError(f"sweep/tune parameter {key!r} has no values")
        resolved = [get_key(checked_overrides(cfg, [f"{key}={v}"], f"sweep/tune {key}"), key) for v in values]
        normalised[key] = resolved
        if key in EVAL_TIME_KEYS:
            eval_grid[key] = [float(v) for v in resolved]
        else:
            train_values[key] = [json.dumps(v) if isinstance(v, bool) or v is None else str(v) for v in resolved]
    combos = [tuple(f"{k}={v}" for k, v in zip(train_values, combo, strict=True))
              for combo in itertools.product(*train_values.values())] if train_values else [()]
    return eval_grid, combos, normalised


# ============================================================================================ driver
@dataclass
class _Plan:
    """An experiment, resolved and checked: what :func:`_run` makes its jobs from."""

    base: RunConfig
    protocols: list[str]
    seeds: list[int]
    eval_grid: dict[str, list[float]]
    combos: list[tuple[str, ...]]
    tune: dict[str, list[Any]]
    sweep: dict[str, list[float]]
    devices: list[str] | None
    rows: list[Row]
    row_cfgs: dict[str, RunConfig] = field(default_factory=dict)


def _plan(name: str, cfg: RunConfig | str | Path | None, settings: ExperimentSettings, rows: Rows, sweep: Grid | None,
          cache: DataCache) -> _Plan:
    """Resolve and check everything an experiment needs, before any work (ConfigError / DataError)."""
    base = _resolve_config(cfg, settings.overrides)
    if base.train.epochs < 1:
        raise ConfigError(f"{name}: train.epochs must be at least 1 (the protocols choose among epochs), "
                          f"got {base.train.epochs}")
    protocols = _protocols(settings.protocol, base)
    validated = ProtocolName.VALIDATED.value in protocols
    if base.train.rng == "released" and validated:
        raise ConfigError(f"{name}: train.rng=released replays the released runs, which have no validation task; "
                          "use --protocol published")
    seed_list = _seed_list(settings.seeds, base.seed)
    eval_grid, combos, tune_norm = _check_grid(base, settings.tune)
    if settings.tune and not validated:
        raise ConfigError(f"{name}: a tune grid is chosen on the validation split, so it needs the validated "
                          "protocol; the published protocol uses the configured settings")
    sweep_grid = _check_grid(base, sweep, eval_only=True)[0] if sweep else {}
    device_list = parse_devices(settings.devices)
    (settings.launch or Launch()).check(device_list)
    row_list = list(rows(base, cache) if callable(rows) else rows)
    if len({r.key for r in row_list}) != len(row_list):
        raise ConfigError(f"{name}: row keys must be distinct")
    row_cfgs = {r.key: checked_overrides(base, r.overrides, f"row {r.key}") for r in row_list}
    if validated:  # before any training: the validation task must be sound for every seed
        for seed in seed_list:
            check_validation_task(base, seed, cache)
    return _Plan(base, protocols, seed_list, eval_grid, combos, tune_norm, sweep_grid, device_list, row_list,
                 row_cfgs)


def _claim_folder(out: Path, record: dict[str, Any]) -> None:
    """Write ``experiment.json`` or check that the folder was written by the same experiment and config."""
    path = out / "experiment.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("config_hash") != record["config_hash"]:
            what = ("experiment " + str(old.get("experiment")) if old.get("experiment") != record["experiment"]
                    else "a config differing in " + (", ".join(diff_keys(old.get("definition", {}),
                                                                          record["definition"])[:6]) or "?"))
            raise ConfigError(f"{out}: this results folder was written by {what}; finished results are not "
                              "overwritten: use another --out folder or the same config")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, default=str))


def _record_launch(out: Path, launch: dict[str, Any]) -> None:
    """Append one launch (launcher, its parameters, devices, when) to ``experiment.json``'s ``launches``:
    a resumed folder may have been run by several launchers, and its record names each one."""
    path = out / "experiment.json"
    record = json.loads(path.read_text())
    record["launches"] = [*record.get("launches", []), {**launch, "started": utc_now()}]
    atomic_write_text(path, json.dumps(record, indent=2, default=str))


def _jobs(plan: _Plan, out: Path) -> list[Job]:
    """One job per (row, protocol, seed), in that order."""
    jobs = []
    for row in plan.rows:
        for proto in plan.protocols:
            validated = proto == ProtocolName.VALIDATED
            for seed in plan.seeds:
                jobs.append(Job(row, proto, seed, set_keys(plan.row_cfgs[row.key], {"seed": seed}),
                                str((out / "runs" / row.key / proto / f"seed-{seed}").resolve()),
                                plan.eval_grid if validated else {}, plan.combos if validated else [()],
                                plan.sweep))
    return jobs


def _run(name: str, cfg: RunConfig | str | Path | None, settings: ExperimentSettings, rows: Rows,
         sweep: Grid | None = None) -> ExperimentResult:
    """Resolve, check everything, claim the results folder, then run every (row, protocol, seed) job."""
    cache = DataCache()  # the driver's loaded data: its checks, and the jobs run in this process
    plan = _plan(name, cfg, settings, rows, sweep, cache)
    base = plan.base
    out = Path(settings.out_dir) if settings.out_dir is not None else Path(base.output_dir) / f"experiment-{name}"
    drop = (*UNHASHED_KEYS, "seed")  # an experiment runs its own seeds
    rest = {"experiment": name, "rows": [asdict(r) for r in plan.rows], "tune": plan.tune, "sweep": plan.sweep}
    definition = {"experiment": name, "config": without_keys(config_to_dict(base), drop), **rest}
    _claim_folder(out, {"experiment": name, "config_hash": config_hash(base, drop, extra=rest, length=16),
                        "definition": definition, "version": __version__, "created": utc_now()})
    jobs = _jobs(plan, out)
    launch = settings.launch or Launch()
    job_name = f"dedn-{name}"
    launched = {**launch.record(job_name), "devices": plan.devices}
    _record_launch(out, launched)
    runs = launch_jobs(jobs, launch, LaunchTarget(plan.devices, out / "submitit", job_name, settings.report, cache))
    return ExperimentResult(name, out, plan.protocols, plan.seeds, config_to_dict(base), plan.rows, runs, plan.tune,
                            {"devices": plan.devices, "sweep": plan.sweep, "launch": launched})


# ============================================================================================ commands
def method_rows(base: RunConfig, methods: Sequence[str], keep: Sequence[str] = ()) -> list[Row]:
    """One row per registered method (``model.name``), each with its own hyperparameters on the same data.

    Where the base config is a packaged preset P (its ``name``) and a preset ``METHOD-P`` exists (``dazle-cub-gzsl``
    beside ``cub-gzsl``), the row carries every setting in which the method's preset differs from P, except
    the ``keep`` keys (those the user set on the command line). Otherwise the row only names the method.

    Raises:
        ConfigError: a name is not a registered method, or a method is named twice.
    """
    if len(set(methods)) != len(methods) or not methods:
        raise ConfigError(f"--methods must name distinct methods, got {', '.join(methods) or 'none'}")
    rows = []
    for name in methods:
        entry = model_entry(name, "--methods")
        overrides = [f"model.name={name}"]
        preset = _method_preset(base.name, name)
        if preset is not None:
            own, theirs = config_to_dict(load_config(base.name)), config_to_dict(load_config(preset))
            overrides += [f"{key}={json.dumps(get_key(theirs, key))}" for key in diff_keys(own, theirs)
                          if key not in ("name", "model.name") and key not in keep]
        rows.append(Row(name, entry.label, tuple(overrides)))
    return rows


def _method_preset(base_name: str, method: str) -> str | None:
    """The packaged preset ``METHOD-BASE`` when it exists (for DEDN the base preset itself is its preset)."""
    try:
        find_config(f"{method}-{base_name}")
    except ConfigError:
        return None
    return f"{method}-{base_name}"


def table1(cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1, protocol: str | None = None,
           out_dir: str | Path | None = None, overrides: Sequence[str] = (), *,
           devices: str | Sequence[str] | None = None,
           tune: Grid | None = None, methods: Sequence[str] | None = None,
           report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Paper Table 1: T, U, S, H (and AUSUC) of each of ``methods`` (registered names; default all) on the
    config's dataset, mean +- std over ``seeds``; reports ``table1.*`` in ``out_dir`` (:func:`method_rows` says
    which settings each method gets). ``protocol="both"`` adds the test-selected figure the released code
    reports (published protocol) and its gap to the validated one."""
    settings = ExperimentSettings(seeds, protocol, out_dir, overrides, devices, tune, report, launch)
    keep = [item.split("=", 1)[0].strip() for item in overrides]
    names = list(model_names() if methods is None else methods)
    exp = _run("table1", cfg, settings, lambda base, cache: method_rows(base, names, keep))
    exp.files = reports.report_table1(exp)
    return exp


def table3(cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1, protocol: str | None = None,
           out_dir: str | Path | None = None, overrides: Sequence[str] = (), *,
           devices: str | Sequence[str] | None = None, tune: Grid | None = None,
           rows: Sequence[Row] = TABLE3_ROWS,
           report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Paper Table 3: the seven ablation rows (:data:`TABLE3_ROWS`), T, U, S, H each; reports ``table3.*``."""
    settings = ExperimentSettings(seeds, protocol, out_dir, overrides, devices, tune, report, launch)
    exp = _run("table3", cfg, settings, rows)
    exp.files = reports.report_table3(exp)
    return exp


def figure3(cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1, protocol: str | None = None,
            out_dir: str | Path | None = None, overrides: Sequence[str] = (), *,
            devices: str | Sequence[str] | None = None, tune: Grid | None = None,
            grid: Grid | None = None,
            report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Paper Figure 3: H (and T) against l_e and against l_rc (default 0, 0.1, ..., 1), the other held fixed.

    Both settings act only at evaluation, so every point comes from the saved outputs of one trained model
    per seed and protocol (validated: the final model, each point's gamma chosen on the validation outputs
    of the selected epoch; published: the best value over training epochs at the fixed calibration). No
    point retrains. ``grid`` replaces the axes; a key that is not an evaluation-time setting is refused.
    """
    grid = grid if grid is not None else {"model.l_e": FIGURE3_VALUES, "model.l_rc": FIGURE3_VALUES}
    settings = ExperimentSettings(seeds, protocol, out_dir, overrides, devices, tune, report, launch)
    exp = _run("figure3", cfg, settings, lambda base, cache: [config_row(base)], sweep=grid)
    exp.files = reports.report_figure3(exp)
    return exp


def _figure5_rows(cfg: RunConfig, cache: DataCache) -> list[Row]:
    """Manual clusters, K-means with the same Q, and the half variant (paper Figure 5 a and b)."""
    data = cache.load(set_keys(cfg, {"data.split": "test"}))
    q = len(resolve_model_clusters(cfg, data))
    q_half = len(resolve_model_clusters(set_keys(cfg, {"model.clusters": "half"}), data))
    return [Row("manual", f"manual (Q={q})"),
            Row("kmeans", f"K-means (Q={q})", ("model.clusters=kmeans", f"model.n_clusters={q}")),
            Row("half", f"half (Q={q_half})", ("model.clusters=half",))]


def figure5(cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1, protocol: str | None = None,
            out_dir: str | Path | None = None, overrides: Sequence[str] = (), *,
            devices: str | Sequence[str] | None = None,
            tune: Grid | None = None,
            report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Paper Figure 5: the config's (manual) clusters against K-means with the same number of clusters (a)
    and against the half variant, neighbours merged (b); H and T (and S, U) reported, bar charts drawn."""
    settings = ExperimentSettings(seeds, protocol, out_dir, overrides, devices, tune, report, launch)
    exp = _run("figure5", cfg, settings, _figure5_rows)
    exp.extra["n_clusters"] = {r.row: r.n_clusters for r in exp.runs}
    exp.files = reports.report_figure5(exp)
    return exp


def calibration(cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1,
                protocol: str | None = None, out_dir: str | Path | None = None, overrides: Sequence[str] = (), *,
                devices: str | Sequence[str] | None = None, tune: Grid | None = None,
                n_points: int = 201,
                report: Callable[[str], None] | None = None, launch: Launch | None = None) -> ExperimentResult:
    """Calibrated stacking: the test seen-unseen curve of each seed's reported model (gamma swept), its
    AUSUC, the operating point the protocol chose, and the mean curve over seeds (S averaged on a common
    grid of ``n_points`` U values, for display)."""
    settings = ExperimentSettings(seeds, protocol, out_dir, overrides, devices, tune, report, launch)
    exp = _run("calibration", cfg, settings, lambda base, cache: [config_row(base)])
    curves: dict[str, list[dict[str, Any]]] = {}
    grid_u = np.linspace(0.0, 1.0, n_points)
    for proto in exp.protocols:
        for run in exp.runs_for(exp.rows[0].key, proto):
            seen, unseen, mask = run.load_outputs()
            l_rc, l_e = run.choices["l_rc"], run.choices["l_e"]
            gammas, s, u = seen_unseen_curve(seen.scores(l_rc, l_e), seen.labels, unseen.scores(l_rc, l_e),
                                             unseen.labels, mask)
            gamma = run.choices["gamma"] if proto == ProtocolName.VALIDATED else run.choices["calibration"]
            curves.setdefault(proto, []).append({
                "seed": run.seed, "gamma": gammas, "S": s, "U": u, "AUSUC": ausuc(s, u) * 100,
                "chosen_gamma": gamma, "chosen_S": run.metrics["S"], "chosen_U": run.metrics["U"],
                "S_on_grid": _s_on_u_grid(s, u, grid_u)})
    exp.extra["curves"] = curves
    exp.extra["u_grid"] = grid_u
    exp.files = reports.report_calibration(exp)
    return exp


def _s_on_u_grid(s: np.ndarray, u: np.ndarray, grid_u: np.ndarray) -> np.ndarray:
    """S of a seen-unseen curve at given U values (linear between points; 0 beyond the curve's last U)."""
    order = np.lexsort((-s, u))
    return np.interp(grid_u, u[order], s[order], right=0.0)


#: Command name -> function, for :func:`run_experiment` and the CLI.
EXPERIMENTS: dict[str, Callable[..., ExperimentResult]] = {
    "table1": table1, "table3": table3, "figure3": figure3, "figure5": figure5, "calibration": calibration,
}


def run_experiment(name: str, cfg: RunConfig | str | Path | None = None, seeds: int | Sequence[int] = 1,
                   protocol: str | None = None, out_dir: str | Path | None = None, overrides: Sequence[str] = (),
                   **kwargs: Any) -> ExperimentResult:
    """Run the experiment command ``name`` (table1, table3, figure3, figure5, calibration); ``kwargs``
    (``devices``, ``tune``, ``launch``, ...) go to that command. ``protocol`` None: the command's default.

    Raises:
        ConfigError: unknown experiment name, or any bad setting (see the commands).
    """
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    fn = EXPERIMENTS[name]
    if protocol is None:
        return fn(cfg, seeds, out_dir=out_dir, overrides=overrides, **kwargs)
    return fn(cfg, seeds, protocol, out_dir, overrides, **kwargs)
