"""Reports of the paper experiments (:mod:`dedn.apps.experiments`): Markdown, CSV and JSON, and PNG figures.

Every report of an experiment ``NAME`` is written into its results folder:

- ``NAME.md``: the tables (mean +- std over seeds, then one row per seed) and what produced them;
- ``NAME.csv``: the mean / std table; ``NAME_seeds.csv``: the per-seed rows;
- ``NAME.json``: everything, including the resolved config, the protocol, the seeds, the code version
  (``dedn.__version__`` and the git commit when the package sits in a git checkout) and each run's choices;
- PNG plots, drawn at their printed size in a two-column paper (one column or the page wide, 9 pt text):
  the tables as grouped bars (a group per metric, T, U, S, H; a bar per row; one panel per protocol), Figure
  3's two panels, Figure 5's bar charts, the seen-unseen curves. Bar charts have zero-based value axes, error
  bars (sample std) only with several seeds, the paper's figures as black lines across the bars where the
  dataset has them, and one legend below the axes. Baseline rows an experiment carries in
  ``extra["baselines"]`` (label -> T, U, S, H, or label -> protocol -> those), e.g. ESZSL, are drawn hatched
  after the table's rows. The seen-unseen curves mark each seed's operating point (the gamma its protocol
  used) on top of every curve.

Accuracies are in percent. Standard deviations are sample standard deviations (n - 1); with one seed
there is none. The paper's numbers (paper Tables 1 and 3, kept in :mod:`dedn.data.benchmarks`) are shown
beside ours only when the dataset is CUB, SUN or AWA2 read from real features (``data.source`` store or hdf5).
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dedn import __version__
from dedn.data.benchmarks import BENCHMARKS, PEER_SOURCES
from dedn.data.imagebench import DISPLAY_NAME as IMAGEBENCH_DISPLAY_NAME
from dedn.data.imagebench import NAME as IMAGEBENCH_NAME
from dedn.eval.metrics import METRIC_ORDER, ausuc

if TYPE_CHECKING:
    from dedn.apps.results import ExperimentResult, RunResult

__all__ = [
    "PROTOCOL_NOTES",
    "PUBLISHED_FIGURE5_HALF_DROP",
    "PUBLISHED_TABLE1",
    "PUBLISHED_TABLE3",
    "code_version",
    "mean_std",
    "published_numbers",
    "report_calibration",
    "report_figure3",
    "report_figure5",
    "report_table1",
    "report_table3",
    "summarize",
]

# The paper's numbers live in the benchmark table (dedn.data.benchmarks); these names keep the report's view.
#: Table 1 as printed, dataset -> method -> T, U, S, H in percent (DEDN's paper; the peers' sources in
#: :data:`~dedn.data.benchmarks.PEER_SOURCES`).
PUBLISHED_TABLE1: dict[str, dict[str, dict[str, float]]] = {
    ds: {"dedn": dict(b.table1), **{m: dict(v) for m, v in b.peers_table1.items()}} for ds, b in BENCHMARKS.items()
}
#: Paper Table 3, dataset -> row key -> T, U, S, H in percent.
PUBLISHED_TABLE3: dict[str, dict[str, dict[str, float]]] = {
    ds: {row: dict(values) for row, values in b.table3.items()} for ds, b in BENCHMARKS.items()
}
#: Paper section 4.3 (Figure 5b): how much H and T drop, in points, when the clusters are halved.
PUBLISHED_FIGURE5_HALF_DROP: dict[str, dict[str, float]] = {
    ds: dict(b.half_clusters_drop) for ds, b in BENCHMARKS.items()
}

PROTOCOL_NOTES = {
    "validated": ("epoch, calibration gamma (and any tuned settings) chosen on a validation task made from "
                  "trainval images and trainval classes only; then retrained on all of trainval for the chosen "
                  "number of epochs and evaluated on the test split once"),
    "published": ("as the released code reports: trained on trainval, evaluated on the test split after every "
                  "epoch at a fixed calibration (eval.calibration, else the mode default: 2 eps in paper mode, "
                  "0 in reference mode), best H (and separately best T) over training; optimistic, "
                  "only for comparison with published numbers"),
}

#: Beside a report with published-protocol figures only: what they are, and how to get the validated ones.
FIXED_ONLY_NOTE = ("every figure here is read at a fixed gamma chosen on no data, which may not suit these scores; "
                   "the validated protocol's figures (gamma chosen on validation) stand beside them when the same "
                   "command runs with --protocol both (finished jobs are reused)")


# ============================================================================================ basics
def code_version() -> dict[str, Any]:
    """``{"dedn": version, "git_commit": sha, "git_dirty": bool}``; the git entries only inside a git checkout."""
    out: dict[str, Any] = {"dedn": __version__}
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode == 0 and sha.stdout.strip():
            out["git_commit"] = sha.stdout.strip()
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, timeout=10)
            if status.returncode == 0:
                out["git_dirty"] = bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1) of the finite values; NaN where undefined."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def summarize(runs: Sequence[RunResult], metrics: Sequence[str] = METRIC_ORDER) -> dict[str, Any]:
    """``{"n_seeds": n, "T": {"mean": m, "std": s}, ...}`` over the runs of one row and protocol."""
    out: dict[str, Any] = {"n_seeds": len(runs)}
    for m in metrics:
        mean, std = mean_std(r.metrics.get(m, math.nan) for r in runs)
        out[m] = {"mean": mean, "std": std}
    return out


def published_numbers(exp: ExperimentResult) -> str | None:
    """The dataset whose paper numbers can be shown beside ``exp``'s (CUB, SUN, AWA2 on real features)."""
    from dedn.data.xlsa17 import canonical_dataset

    if exp.config.get("data", {}).get("source") not in ("store", "hdf5"):
        return None
    ds = canonical_dataset(exp.dataset)
    return ds if ds in PUBLISHED_TABLE1 else None


def _fmt(mean: float, std: float = math.nan, digits: int = 1) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if std is None or not math.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _num(x: Any) -> Any:
    """A CSV cell: empty for NaN / None, else the value."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return ""
    return round(x, 6) if isinstance(x, float) else x


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy to Python, NaN / inf to None, paths to text."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, np.generic):
        return _clean(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows([[_num(c) for c in row] for row in rows])
    return path


def _choices_text(run: RunResult) -> str:
    c = run.choices
    if run.protocol == "validated":
        source = c.get("gamma_source", "validated")
        text = f"epochs {c['epochs']}, gamma {c['gamma']:.4g} ({source}), l_rc {c['l_rc']:g}, l_e {c['l_e']:g}"
        if c.get("overrides"):
            text += ", " + ", ".join(c["overrides"])
        return text + f" (val H {c['validation']['H']:.1f})"
    return (f"best H at epoch {c['epoch_best_H'] + 1}, best T at epoch {c['epoch_best_T'] + 1} "
            f"(of {c['epochs_trained']}), gamma {c['calibration']:g} ({c.get('gamma_source', 'config')})")


# ============================================================================================ common parts
def _header(exp: ExperimentResult, title: str) -> list[str]:
    code = code_version()
    code_text = f"dedn {code['dedn']}" + (f", git {code['git_commit'][:12]}" if "git_commit" in code else "") + (
        " (uncommitted changes)" if code.get("git_dirty") else "")
    lines = [f"# {title}", "",
             f"- experiment: `{exp.name}`, dataset: {exp.dataset}, mode: {exp.config.get('mode')}",
             f"- seeds: {', '.join(map(str, exp.seeds))} (mean ± sample std over {len(exp.seeds)} seed(s))",
             "- protocol(s):"]
    lines += [f"  - **{p}**: {PROTOCOL_NOTES[p]}" for p in exp.protocols]
    if "validated" not in exp.protocols:  # a fixed-gamma figure never stands alone
        lines.append(f"- {FIXED_ONLY_NOTE}")
    if exp.tune:
        lines.append(f"- tuned on validation: {', '.join(f'{k} in {v}' for k, v in exp.tune.items())}")
    launch = exp.extra.get("launch") or {}
    if launch.get("launcher", "pool") != "pool":
        params = launch.get("parameters") or {}
        shown = ", ".join(f"{k} {v}" for k, v in params.items() if k != "name")
        lines.append(f"- launcher: {launch['launcher']} (submitit{': ' + shown if shown else ''})")
    if exp.extra.get("devices"):
        lines.append(f"- devices: {', '.join(exp.extra['devices'])}")
    lines += [f"- code: {code_text}", f"- config: `{exp.name}.json` (key `config`, resolved)",
              f"- written: {datetime.now(timezone.utc).isoformat(timespec='seconds')}", ""]
    return lines


def _base_json(exp: ExperimentResult, title: str) -> dict[str, Any]:
    return {"experiment": exp.name, "title": title, "dataset": exp.dataset, "protocols": exp.protocols,
            "protocol_notes": {p: PROTOCOL_NOTES[p] for p in exp.protocols}, "seeds": exp.seeds,
            "code": code_version(), "config": exp.config, "tune": exp.tune,
            "launch": exp.extra.get("launch") or {"launcher": "pool"},
            "rows": [{"key": r.key, "label": r.label, "overrides": list(r.overrides)} for r in exp.rows],
            "std": "sample standard deviation (n - 1); null with one seed", "units": "percent",
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _metric_report(exp: ExperimentResult, title: str, published: Mapping[str, Mapping[str, float]] | None,
                   published_note: str, notes: Sequence[str] = (), extra_md: Sequence[str] = (),
                   extra_json: Mapping[str, Any] | None = None) -> tuple[list[Path], list[dict[str, Any]]]:
    """The md / csv / seeds csv / json of a table of rows x protocols; returns files and summary rows."""
    out = exp.out_dir
    summary = []
    for row in exp.rows:
        for proto in exp.protocols:
            s = summarize(exp.runs_for(row.key, proto))
            summary.append({"row": row.key, "label": row.label, "protocol": proto, **s,
                            "paper": dict(published[row.key]) if published and row.key in published else None})
    paper_cols = [f"paper {m}" for m in "TUSH"] if published else []
    md = _header(exp, title)
    md += [f"## Results (mean ± std over {len(exp.seeds)} seed(s), %)", ""]
    md.append(_md_table(["setting", "protocol", *METRIC_ORDER, "seeds", *paper_cols],
                        [[s["label"], s["protocol"], *(_fmt(s[m]["mean"], s[m]["std"]) for m in METRIC_ORDER),
                          s["n_seeds"], *((_fmt(s["paper"][m]) if s["paper"] else "") for m in "TUSH" if published)]
                         for s in summary]))
    if published:
        md += ["", published_note]
    md += ["", "## Per seed", ""]
    md.append(_md_table(["setting", "protocol", "seed", *METRIC_ORDER, "choices"],
                        [[r.label, r.protocol, r.seed, *(_fmt(r.metrics.get(m, math.nan)) for m in METRIC_ORDER),
                          _choices_text(r)] for r in exp.runs]))
    md += ["", *extra_md, *([""] + [f"- {n}" for n in notes] if notes else [])]
    files = [out / f"{exp.name}.md"]
    files[0].write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    files.append(_write_csv(out / f"{exp.name}.csv",
                            ["row", "label", "protocol", "n_seeds",
                             *(f"{m}_{k}" for m in METRIC_ORDER for k in ("mean", "std")),
                             *(f"paper_{m}" for m in "TUSH")],
                            [[s["row"], s["label"], s["protocol"], s["n_seeds"],
                              *(s[m][k] for m in METRIC_ORDER for k in ("mean", "std")),
                              *((s["paper"] or {}).get(m) for m in "TUSH")] for s in summary]))
    files.append(_write_csv(out / f"{exp.name}_seeds.csv",
                            ["row", "label", "protocol", "seed", *METRIC_ORDER, "choices", "folder"],
                            [[r.row, r.label, r.protocol, r.seed, *(r.metrics.get(m) for m in METRIC_ORDER),
                              _choices_text(r), str(Path(r.folder).relative_to(out.resolve()))
                              if Path(r.folder).is_relative_to(out.resolve()) else r.folder] for r in exp.runs]))
    record = {**_base_json(exp, title), "summary": summary, "runs": [r.to_dict() for r in exp.runs],
              "published": {"note": published_note, "values": published} if published else None,
              "notes": list(notes), **(extra_json or {})}
    files.append(out / f"{exp.name}.json")
    files[-1].write_text(json.dumps(_clean(record), indent=2) + "\n", encoding="utf-8")
    return files, summary


# ============================================================================================ plots
#: Figures are drawn at their printed size in a two-column paper (inches: one column, the page width), so the
#: font sizes below are the printed ones (8 to 9 pt), and the PNG reads at 100 % zoom as it would in print.
COLUMN_WIDTH = 3.3
PAGE_WIDTH = 7.0
FONT = 9.0
VALUE_FONT = 8.0  # the values written on bars
DPI = 150
#: Above this many bars in one panel the values are not written on them (they would collide; the tables hold them).
MAX_LABELLED_BARS = 12
PAPER_LABEL = "paper's figure"
_STYLE = {"font.size": FONT, "axes.titlesize": FONT, "axes.labelsize": FONT, "xtick.labelsize": FONT,
          "ytick.labelsize": FONT, "legend.fontsize": FONT, "figure.titlesize": FONT + 1, "hatch.linewidth": 0.8}


def _figure(n_rows: int, n_cols: int, width: float, height: float) -> tuple[Any, list[Any]]:
    """A figure with its axes (row-major) in the paper style; draw inside :func:`_style`. Constrained layout
    keeps legends placed outside the axes inside the figure."""
    # Figure without pyplot: no global backend switch, safe in headless worker processes.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, [fig.add_subplot(n_rows, n_cols, i + 1) for i in range(n_rows * n_cols)]


def _style() -> Any:
    """The paper style's font sizes for the artists made inside the ``with`` block."""
    import matplotlib

    return matplotlib.rc_context(_STYLE)


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _seeds_text(n: int) -> str:
    return f"mean ± sample std over {n} seeds" if n > 1 else f"{n} seed, no error bars"


def _bars(ax: Any, groups: Sequence[str], series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
          paper: Mapping[str, Sequence[float | None]] | None = None, hatched: Sequence[str] = ()) -> list[float]:
    """Grouped bars: one group per entry of ``groups`` (e.g. the metrics), one bar per ``series`` name (legend
    order) with its (means, stds) over the groups; error bars (sample std) only where there is one (several
    seeds); the paper's values of a series (``paper[name]``, None where it has none) as a black line across
    its bars; the series named in ``hatched`` (baselines) hatched. The values are written on the bars while
    there are at most :data:`MAX_LABELLED_BARS` and no paper lines. Returns every drawn value (means + stds,
    paper) for the y range."""
    n = max(len(series), 1)
    width = 0.84 / n
    x = np.arange(len(groups))
    labelled = len(groups) * n <= MAX_LABELLED_BARS and not paper  # a value would collide with a paper line
    drawn: list[float] = []
    paper_drawn = False
    for i, (name, (means, stds)) in enumerate(series.items()):
        pos = x - 0.42 + width * (i + 0.5)
        vals = np.array([m if m is not None and math.isfinite(m) else np.nan for m in means], dtype=np.float64)
        err = np.array([s if s is not None and math.isfinite(s) else np.nan for s in stds], dtype=np.float64)
        has_err = bool(np.isfinite(err).any())
        bars = ax.bar(pos, np.nan_to_num(vals), width, label=name, color=f"C{i % 10}",
                      hatch="///" if name in hatched else None, edgecolor="white" if name in hatched else None,
                      yerr=np.nan_to_num(err) if has_err else None, capsize=2 if has_err else 0,
                      error_kw={"elinewidth": 0.8, "capthick": 0.8})
        if labelled:
            ax.bar_label(bars, labels=[f"{v:.1f}" if math.isfinite(v) else "n/a" for v in vals],
                         fontsize=VALUE_FONT, padding=1)
        finite = np.isfinite(vals)
        drawn += list(vals[finite] + np.nan_to_num(err[finite]))
        if paper and paper.get(name) is not None:
            pv = np.array([v if v is not None else np.nan for v in paper[name]], dtype=np.float64)
            ax.hlines(pv, pos - width / 2, pos + width / 2, colors="black", linewidth=2.0, zorder=5,
                      label=None if paper_drawn else PAPER_LABEL)
            paper_drawn = paper_drawn or bool(np.isfinite(pv).any())
            drawn += [v for v in pv if math.isfinite(v)]
    ax.set_xticks(x)
    ax.set_xticklabels(groups)  # short group names (metrics): horizontal
    ax.set_ylabel("%")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    return drawn


def _zero_based(drawn: Sequence[float], room: float = 0.12) -> tuple[float, float]:
    """A value range from 0 to a round top above the highest drawn value (room for the values on the bars),
    at most 100 (percent), or a little above 100 when a bar or error bar reaches it."""
    v = [x for x in drawn if math.isfinite(x)]
    top = max([*v, 1.0]) * (1 + room)
    step = 10.0 if top > 20 else (5.0 if top > 5 else 1.0)
    return 0.0, min(math.ceil(top / step) * step, 110.0)


def _legend_columns(labels: Sequence[str], width: float, most: int) -> int:
    """How many legend columns of ``labels`` fit side by side in ``width`` inches at :data:`FONT` (at most
    ``most``): an entry takes its label (about 0.6 em a character) plus the marker and the gaps."""
    chars = width * 72 / (0.6 * FONT)
    return max(1, min(most, len(labels), int(chars // (max(map(len, labels), default=1) + 6))))


def _legend_below(fig: Any, axes: Sequence[Any], most: int = 4) -> Any:
    """One legend for the figure, below the axes (it covers nothing), with the entries of every panel once,
    in as many columns (up to ``most``) as fit the figure's width."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    if PAPER_LABEL in handles:  # after the bars it marks
        handles[PAPER_LABEL] = handles.pop(PAPER_LABEL)
    return fig.legend(list(handles.values()), list(handles), loc="outside lower center", frameon=False,
                      ncol=_legend_columns(list(handles), fig.get_figwidth(), most))


def _near_data(values: Sequence[float], top_room: float = 0.08) -> tuple[float, float]:
    """A value range that starts near the data, for line plots (a curve's shape, not a bar's length, carries
    its value): never below 0 or above 105, starting at 0 when the data come near it."""
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return 0.0, 100.0
    lo, hi = min(v), max(v)
    span = max(hi - lo, 2.0)
    bottom = max(0.0, lo - 0.3 * span)
    bottom = 0.0 if bottom < 0.15 * hi else math.floor(bottom / 5) * 5  # near 0 anyway: start at 0
    return bottom, min(105.0, hi + top_room * (hi - bottom) + 1.0)


def _baselines(exp: ExperimentResult, proto: str) -> dict[str, dict[str, float]]:
    """Baseline rows (ESZSL ...) the experiment carries in ``extra["baselines"]``: label -> metrics, or label ->
    protocol -> metrics (percent)."""
    out = {}
    for label, v in (exp.extra.get("baselines") or {}).items():
        v = v.get(proto, {}) if proto in v else v
        if any(m in v for m in "TUSH"):
            out[label] = v
    return out


#: A panel's title per protocol: the published protocol's figures are selected on the test split.
PROTOCOL_TITLES = {"validated": "validated protocol", "published": "published protocol (selected on test)"}
EXPERIMENT_TITLES = {"table1": "Table 1", "table3": "Table 3: ablations",
                     "figure5": "Figure 5: attribute clusters", "figure3": "Figure 3: sensitivity to l_e and l_rc",
                     "calibration": "Calibrated stacking"}


def _dataset(exp: ExperimentResult) -> str:
    """The experiment's dataset as titles name it (the built-in benchmark by what it is, not its data name)."""
    return f"the {IMAGEBENCH_DISPLAY_NAME}" if exp.dataset == IMAGEBENCH_NAME else str(exp.dataset)


def _table3_title(exp: ExperimentResult) -> str:
    """Table 3's title: rows that train another method (the demo adds the compared methods) are named too."""
    others = any(o.startswith("model.name=") and o != "model.name=dedn" for r in exp.rows for o in r.overrides)
    return "Table 3: ablations and compared methods" if others else "Table 3: ablations"


def _baseline_label(label: str) -> str:
    return f"{label}, baseline"


def _table_plot(exp: ExperimentResult, summary: list[dict[str, Any]], metrics: Sequence[str],
                path: Path) -> Path:
    """One panel per protocol, side by side with one zero-based value axis: a group of bars per metric (in the
    table's order), one bar per row (then any baseline rows, hatched), the paper's figures as a black line
    across the bar where the dataset has them; one legend below the panels."""
    labels = [r.label for r in exp.rows] + [_baseline_label(b) for b in exp.extra.get("baselines") or {}]
    labels += [PAPER_LABEL] if any(s["paper"] for s in summary) else []
    width = PAGE_WIDTH if len(exp.protocols) > 1 or len(labels) > 4 else COLUMN_WIDTH
    legend_rows = math.ceil(len(labels) / _legend_columns(labels, width, 3))
    with _style():
        fig, axes = _figure(1, len(exp.protocols), width, 2.6 + 0.22 * legend_rows)
        drawn = []
        for ax, proto in zip(axes, exp.protocols, strict=True):
            rows = [s for s in summary if s["protocol"] == proto]
            base = _baselines(exp, proto)
            series = {s["label"]: ([s[m]["mean"] for m in metrics], [s[m]["std"] for m in metrics]) for s in rows}
            series |= {_baseline_label(label): ([b.get(m, math.nan) for m in metrics], [math.nan] * len(metrics))
                       for label, b in base.items()}
            paper = {s["label"]: [s["paper"].get(m) for m in metrics] for s in rows if s["paper"]}
            drawn += _bars(ax, list(metrics), series, paper or None, hatched=[_baseline_label(b) for b in base])
            ax.set_title(PROTOCOL_TITLES.get(proto, f"{proto} protocol"))
        for ax in axes:
            ax.set_ylim(*_zero_based(drawn))
        title = _table3_title(exp) if exp.name == "table3" else EXPERIMENT_TITLES.get(exp.name, exp.name)
        fig.suptitle(f"{title} on {_dataset(exp)} "
                     f"({_seeds_text(len(exp.seeds))})")
        _legend_below(fig, axes, 3)
        return _save(fig, path)


# ============================================================================================ reports
def report_table1(exp: ExperimentResult) -> list[Path]:
    """Table 1: each method's T, U, S, H (and AUSUC) per protocol, the paper's figures beside ours when the
    dataset matches, and the gap between the test-selected H (published protocol: the epoch with the best test
    H, as the released code picks it) and the validated H, the number no paper prints."""
    ds = published_numbers(exp)
    published = _published_table1(exp, ds)
    sources = "; ".join(f"{r.label}: {PAPER_SOURCES.get(r.key, 'paper Table 1')}" for r in exp.rows
                        if published and r.key in published)
    gap = table1_gap(exp)
    files, summary = _metric_report(
        exp, f"Table 1: {', '.join(r.label for r in exp.rows)} on {_dataset(exp)}", published,
        f"Paper columns (selected on the test split by each method's released code): {sources}.",
        extra_md=_gap_md(exp, gap, published), extra_json={"gap": gap})
    files.append(_table_plot(exp, summary, METRIC_ORDER[:4], exp.out_dir / "table1.png"))
    return files


#: Where each method's paper figure comes from (the DEDN paper's Table 1 unless said).
PAPER_SOURCES: dict[str, str] = {"dedn": "DEDN paper, Table 1", **PEER_SOURCES}


def _published_table1(exp: ExperimentResult, ds: str | None) -> dict[str, dict[str, float]] | None:
    """Row key -> the paper's T, U, S, H for the methods that have one on dataset ``ds``."""
    if not ds:
        return None
    known = PUBLISHED_TABLE1[ds]
    return {r.key: known[r.key] for r in exp.rows if r.key in known} or None


def table1_gap(exp: ExperimentResult) -> list[dict[str, Any]]:
    """Per method: validated H, test-selected H (published protocol) and their gap, mean ± std over the seeds
    (the gap is taken seed by seed: the same seed trains the same trajectory in both jobs). With one protocol
    only, the other H and the gap are NaN and ``n_seeds`` counts the seeds of the one that ran."""
    out = []
    for row in exp.rows:
        val = {r.seed: r.metrics.get("H", math.nan) for r in exp.runs_for(row.key, "validated")}
        sel = {r.seed: r.metrics.get("H", math.nan) for r in exp.runs_for(row.key, "published")}
        both = sorted(set(val) & set(sel))
        entry: dict[str, Any] = {"row": row.key, "label": row.label, "n_seeds": len(set(val) | set(sel))}
        gammas = {p: mean_std(r.choices.get("gamma", math.nan) for r in exp.runs_for(row.key, p))[0]
                  for p in ("validated", "published")}
        entry["gamma"] = gammas
        for name, values in (("validated_H", list(val.values())), ("test_selected_H", list(sel.values())),
                             ("gap_H", [sel[s] - val[s] for s in both])):
            mean, std = mean_std(values)
            entry[name] = {"mean": mean, "std": std}
        out.append(entry)
    return out


def _gap_md(exp: ExperimentResult, gap: list[dict[str, Any]],
            published: Mapping[str, Mapping[str, float]] | None) -> list[str]:
    """The gap section: with both protocols, the table of validated against test-selected H (the fixed gamma's
    figure with the validated one beside it); with one, what the other would add and how to get it."""
    if "published" not in exp.protocols:
        return ["The test-selected H (what each method's released code reports: the best test-split H over "
                "the epochs, at a fixed gamma) and its gap to the validated H are added by the same command with "
                "--protocol both (finished jobs are reused).", ""]
    if "validated" not in exp.protocols:
        return []  # the header says how to get the validated figures
    lines = ["## Test-selected against validated H", "",
             "The test-selected H is what the released code of each method reports: the best test-split H over "
             "the epochs of one training run (published protocol). The validated H chooses the epoch and gamma "
             "on a validation task and tests once. Their gap is the optimism of test-set selection.", ""]
    lines.append(_md_table(["method", "validated H", "test-selected H", "gap", "paper H", "seeds",
                            "gamma: validated / fixed"],
                           [[g["label"], _fmt(g["validated_H"]["mean"], g["validated_H"]["std"]),
                             _fmt(g["test_selected_H"]["mean"], g["test_selected_H"]["std"]),
                             _fmt(g["gap_H"]["mean"], g["gap_H"]["std"]),
                             _fmt(published[g["row"]]["H"]) if published and g["row"] in published else "",
                             g["n_seeds"], f"{g['gamma']['validated']:.3g} / {g['gamma']['published']:.3g}"]
                            for g in gap]))
    lines += ["", "The test-selected figure is read at the fixed calibration the released code uses (the mode's "
              "default gamma). Where the gamma chosen on validation is far from it, that fixed gamma does not suit "
              "these scores, and the test-selected H can fall below the validated one: the gap then measures the "
              "calibration, not only the selection on test."]
    return [*lines, ""]


def report_table3(exp: ExperimentResult) -> list[Path]:
    """Table 3: the ablation rows, T, U, S, H each; the paper's Table 3 beside ours when the dataset matches."""
    ds = published_numbers(exp)
    published = PUBLISHED_TABLE3[ds] if ds else None
    files, summary = _metric_report(
        exp, f"{_table3_title(exp)} on {_dataset(exp)}", published,
        f"Paper columns: paper Table 3, {ds} (published protocol).")
    files.append(_table_plot(exp, summary, METRIC_ORDER[:4], exp.out_dir / "table3.png"))
    return files


def report_figure5(exp: ExperimentResult) -> list[Path]:
    """Figure 5: manual clusters against K-means (a) and against the half variant (b), H and T, bars."""
    ds = published_numbers(exp)
    notes = [f"clusters per row: {', '.join(f'{k}: Q={v}' for k, v in exp.extra.get('n_clusters', {}).items())}",
             "K-means uses the same number of clusters Q as the manual clusters; half merges neighbouring clusters."]
    if ds:
        drop = PUBLISHED_FIGURE5_HALF_DROP[ds]
        notes.append(f"paper (section 4.3, {ds}): halving the clusters lowers H by {drop['H']} and T by "
                     f"{drop['T']} points; the paper gives Figure 5a only as a plot")
    files, summary = _metric_report(exp, f"Figure 5: attribute clusters on {_dataset(exp)}", None, "", notes)
    by = {(s["row"], s["protocol"]): s for s in summary}
    for proto in exp.protocols:
        with _style():
            fig, axes = _figure(1, 2, PAGE_WIDTH, 3.1)
            drawn = []
            for ax, other, title in ((axes[0], "kmeans", "(a) manual vs K-means"),
                                     (axes[1], "half", "(b) number of clusters")):
                rows = [by[(k, proto)] for k in ("manual", other) if (k, proto) in by]
                drawn += _bars(ax, ["T", "H"], {s["label"]: ([s["T"]["mean"], s["H"]["mean"]],
                                                             [s["T"]["std"], s["H"]["std"]]) for s in rows})
                ax.set_title(title)
                ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
            for ax in axes:
                ax.set_ylim(*_zero_based(drawn))
            fig.suptitle(f"Figure 5: attribute clusters on {_dataset(exp)}\n{PROTOCOL_TITLES.get(proto, proto)}, "
                         f"{_seeds_text(len(exp.seeds))}")
            files.append(_save(fig, exp.out_dir / f"figure5_{proto}.png"))
    return files


def _sweep_summary(exp: ExperimentResult) -> list[dict[str, Any]]:
    out = []
    for proto in exp.protocols:
        runs = exp.runs_for(exp.rows[0].key, proto)
        for axis, values in exp.extra.get("sweep", {}).items():
            for v in values:
                pts = [p for r in runs for p in r.sweep if p["axis"] == axis and p["value"] == float(v)]
                row: dict[str, Any] = {"protocol": proto, "axis": axis, "value": float(v), "n_seeds": len(pts)}
                for m in ("H", "T", "S", "U"):
                    row[m] = dict(zip(("mean", "std"), mean_std(p[m] for p in pts), strict=True))
                out.append(row)
    return out


def report_figure3(exp: ExperimentResult) -> list[Path]:
    """Figure 3: H (and T) against l_e and against l_rc from one trained model per seed; two-panel PNGs."""
    sweep = _sweep_summary(exp)
    md = ["## Sensitivity (mean ± std over seeds, %)", "",
          "Each point is computed from the saved outputs of the model(s) behind the results above; nothing is "
          "retrained. Validated: each point's gamma is chosen on the validation outputs of the selected epoch, "
          "then the test outputs are scored once. Published: best value over training epochs at the fixed "
          "calibration.", ""]
    at = {(r["protocol"], r["axis"], r["value"]): r for r in sweep}
    for axis, values in exp.extra.get("sweep", {}).items():
        rows = []
        for v in values:
            cells = [f"{v:g}"]
            for proto in exp.protocols:
                r = at[(proto, axis, float(v))]
                cells += [_fmt(r["H"]["mean"], r["H"]["std"]), _fmt(r["T"]["mean"], r["T"]["std"])]
            rows.append(cells)
        md += [f"### {axis}", "", _md_table([axis, *(f"{m} ({p})" for p in exp.protocols for m in ("H", "T"))], rows),
               ""]
    files, _ = _metric_report(exp, f"Figure 3: sensitivity to l_e and l_rc on {_dataset(exp)}", None, "",
                              extra_md=md, extra_json={"sweep": sweep})
    files.append(_write_csv(exp.out_dir / "figure3_sweep.csv",
                            ["protocol", "axis", "value", "n_seeds",
                             *(f"{m}_{k}" for m in ("H", "T", "S", "U") for k in ("mean", "std"))],
                            [[r["protocol"], r["axis"], r["value"], r["n_seeds"],
                              *(r[m][k] for m in ("H", "T", "S", "U") for k in ("mean", "std"))] for r in sweep]))
    files.append(_write_csv(exp.out_dir / "figure3_sweep_seeds.csv",
                            ["protocol", "seed", "axis", "value", "l_rc", "l_e", "H", "T", "S", "U", "gamma"],
                            [[r.protocol, r.seed, p["axis"], p["value"], p["l_rc"], p["l_e"], p["H"], p["T"],
                              p["S"], p["U"], p["gamma"]] for r in exp.runs for p in r.sweep]))
    centre = {"model.l_e": exp.config["model"]["l_e"], "model.l_rc": exp.config["model"]["l_rc"]}
    for proto in exp.protocols:
        files.append(_figure3_plot(exp, sweep, proto, centre))
    return files


def _figure3_plot(exp: ExperimentResult, sweep: list[dict[str, Any]], proto: str, centre: Mapping[str, float]) -> Path:
    """One panel per swept setting: H and T against its value (a band of -+ one sample std with several seeds),
    the configured value marked; one y range for the panels, which starts near the data (curves, not bars)."""
    axes_names = list(exp.extra.get("sweep", {}))
    with _style():
        fig, axes = _figure(1, max(len(axes_names), 1), PAGE_WIDTH, 3.1)
        drawn = []
        for i, (ax, axis) in enumerate(zip(axes, axes_names, strict=False)):
            rows = sorted((r for r in sweep if r["protocol"] == proto and r["axis"] == axis), key=lambda r: r["value"])
            x = np.array([r["value"] for r in rows])
            for m, style in (("H", "-o"), ("T", "--s")):
                mean = np.array([r[m]["mean"] for r in rows])
                std = np.nan_to_num(np.array([r[m]["std"] for r in rows]))
                ax.plot(x, mean, style, markersize=3.5, label=m)
                if np.any(std > 0):  # a band only with several seeds
                    ax.fill_between(x, mean - std, mean + std, alpha=0.2, label=f"{m} ± std")
                drawn += list(mean - std) + list(mean + std)
            ax.axvline(centre.get(axis, np.nan), color="grey", linestyle=":", linewidth=1, label="configured")
            name = axis.split(".")[-1]
            ax.set_xlabel(name)
            ax.set_ylabel("%")
            ax.set_title(f"({'ab'[i] if i < 2 else i}) sensitivity to {name}")
            ax.grid(True, alpha=0.3)
        for ax in axes:  # one y range for both panels: their curves compare directly
            ax.set_ylim(*_near_data(drawn))
        fig.suptitle(f"Figure 3: sensitivity on {_dataset(exp)}\n{PROTOCOL_TITLES.get(proto, proto)}, "
                     f"{_seeds_text(len(exp.seeds))}")
        _legend_below(fig, axes, 5)
        return _save(fig, exp.out_dir / f"figure3_{proto}.png")


def report_calibration(exp: ExperimentResult) -> list[Path]:
    """Calibrated stacking: AUSUC and the chosen operating point per seed, the seen-unseen curves (CSV, PNG)."""
    curves: dict[str, list[dict[str, Any]]] = exp.extra["curves"]
    grid_u = np.asarray(exp.extra["u_grid"])
    summary = []
    for proto in exp.protocols:
        c = curves.get(proto, [])
        row: dict[str, Any] = {"protocol": proto, "n_seeds": len(c)}
        row["AUSUC"] = dict(zip(("mean", "std"), mean_std(x["AUSUC"] for x in c), strict=True))
        mean_curve = np.mean([x["S_on_grid"] for x in c], axis=0) if c else np.zeros_like(grid_u)
        row["AUSUC_of_mean_curve"] = ausuc(mean_curve, grid_u) * 100 if c else math.nan
        summary.append(row)
    md = ["## Seen-unseen curves", "",
          _md_table(["protocol", "AUSUC (mean ± std)", "AUSUC of the mean curve", "seeds"],
                    [[s["protocol"], _fmt(s["AUSUC"]["mean"], s["AUSUC"]["std"]), _fmt(s["AUSUC_of_mean_curve"]),
                      s["n_seeds"]] for s in summary]), "",
          _md_table(["protocol", "seed", "AUSUC", "chosen gamma", "S at gamma", "U at gamma"],
                    [[p, x["seed"], _fmt(x["AUSUC"]), f"{x['chosen_gamma']:.4g}", _fmt(x["chosen_S"]),
                      _fmt(x["chosen_U"])] for p, c in curves.items() for x in c]), "",
          "The curve sweeps the calibration gamma over the test scores of each seed's reported model; the marked "
          "point is the gamma the protocol used (validated: chosen on validation; published: the fixed one). "
          "The mean curve averages S over seeds at common U values (for display).", ""]
    files, _ = _metric_report(exp, f"Calibrated stacking on {_dataset(exp)}", None, "", extra_md=md,
                              extra_json={"calibration": summary})
    files.append(_write_csv(exp.out_dir / "calibration_curves.csv", ["protocol", "seed", "gamma", "S", "U"],
                            [[p, x["seed"], g, s * 100, u * 100] for p, c in curves.items() for x in c
                             for g, s, u in zip(x["gamma"], x["S"], x["U"], strict=True)]))
    files.append(_write_csv(exp.out_dir / "calibration_mean_curve.csv", ["protocol", "U", "S_mean", "S_std"],
                            [[p, u * 100, m * 100, sd * 100] for p, c in curves.items() if c
                             for u, m, sd in zip(grid_u, np.mean([x["S_on_grid"] for x in c], axis=0),
                                                 np.std([x["S_on_grid"] for x in c], axis=0,
                                                        ddof=1 if len(c) > 1 else 0), strict=True)]))
    for proto in exp.protocols:
        files.append(_calibration_plot(exp, curves.get(proto, []), grid_u, proto))
    return files


def _calibration_plot(exp: ExperimentResult, c: list[dict[str, Any]], grid_u: np.ndarray, proto: str) -> Path:
    """Each seed's seen-unseen curve, their mean, and each seed's operating point on top; a column wide, the
    legend below the axes."""
    with _style():
        fig, (ax,) = _figure(1, 1, COLUMN_WIDTH, 3.6 + 0.19 * (2 * len(c) + 1))
        lines = []
        for x in c:
            order = np.lexsort((-x["S"], x["U"]))
            lines += ax.plot(x["U"][order] * 100, x["S"][order] * 100, linewidth=0.8, alpha=0.7, zorder=2,
                             label=f"seed {x['seed']} (AUSUC {x['AUSUC']:.1f})")
        if c:
            mean_curve = np.mean([x["S_on_grid"] for x in c], axis=0)
            shown = grid_u <= max(float(x["U"].max()) for x in c) + 1e-12  # not the zeros beyond every curve
            ax.plot(grid_u[shown] * 100, mean_curve[shown] * 100, "k-", linewidth=1.6, zorder=3,
                    label=f"mean over seeds (AUSUC {ausuc(mean_curve, grid_u) * 100:.1f})")
        for x, line in zip(c, lines, strict=True):  # on top of every curve, the mean one included
            ax.plot([x["chosen_U"]], [x["chosen_S"]], "o", markersize=6, color=line.get_color(), zorder=5,
                    markeredgecolor="black", markeredgewidth=1.0,
                    label=f"seed {x['seed']} at γ {x['chosen_gamma']:.3g}: S {x['chosen_S']:.1f}, "
                          f"U {x['chosen_U']:.1f}")
        ax.set_xlabel("U: unseen accuracy (%)")
        ax.set_ylabel("S: seen accuracy (%)")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_aspect("equal")
        ax.grid(True, alpha=0.3)
        chosen = "from validation" if proto == "validated" else "fixed"
        ax.set_title(f"Seen-unseen curves on {_dataset(exp)}\n{proto} protocol; dots: each seed's\n"
                     f"operating point (γ {chosen})", wrap=True)
        _legend_below(fig, [ax], 1)
        return _save(fig, exp.out_dir / f"calibration_{proto}.png")
