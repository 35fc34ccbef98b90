"""What a trained run is (``dedn describe``): its classes, attribute groups, calibration and results.

Also writes a template for ``dedn predict --new-classes``: a CSV that
:func:`dedn.apps.class_files.load_class_definitions` reads back, with every attribute of the run as a column.
"""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path
from typing import Any

from dedn.data.imagebench_spec import group_definitions
from dedn.errors import CheckpointError, ConfigError
from dedn.eval.calibration import fixed_gamma_note
from dedn.eval.metrics import METRIC_ORDER
from dedn.runfolder import RunFolder
from dedn.training.rundir import load_run_config, read_class_file, read_run_metrics

UNGROUPED = "(no group)"
EXAMPLE_CLASS = "example_new_class"


def attribute_groups(attribute_names: list[str], imagebench_n_colors: int | None = None) -> dict[str, list[str]]:
    """Group name -> attribute names, in attribute order.

    With ``imagebench_n_colors`` (a run on the built-in benchmark) the groups are the benchmark's own; otherwise
    the prefix before ``::`` (``wing_color::blue`` -> ``wing_color``), and names without one go to ``(no group)``.
    """
    groups: dict[str, list[str]] = {}
    if imagebench_n_colors is not None:
        known = {f"{g}::{v}": g for g, _, values in group_definitions(imagebench_n_colors) for v in values}
    else:
        known = {}
    for a in attribute_names:
        group = known.get(a) or (a.split("::", 1)[0] if "::" in a else UNGROUPED)
        groups.setdefault(group, []).append(a)
    return groups


def describe_run(run: str | Path) -> dict[str, Any]:
    """A JSON-ready description of the run in ``run`` (a run folder of any protocol)."""
    folder = RunFolder(run).model_folder().path
    rec = read_class_file(folder)
    if rec is None:
        raise CheckpointError(f"{folder}: no {RunFolder.CLASSES}; this run has no class record (finish training first)")
    names, attrs, seen = rec["class_names"], rec["attribute_names"], rec["seen_mask"].tolist()
    class_att = rec["class_att"].tolist()
    try:
        cfg = load_run_config(folder)
    except (CheckpointError, ConfigError):
        cfg = None
    source = cfg.data.source if cfg is not None else None
    n_colors = cfg.data.imagebench.n_colors if cfg is not None and source == "imagebench" else None
    metrics = read_run_metrics(folder)
    return {
        "run": str(run),
        "model_dir": str(folder),
        "mode": cfg.mode if cfg is not None else metrics.get("mode"),
        "protocol": cfg.eval.protocol if cfg is not None else None,
        "data_source": source,
        "dataset": metrics.get("dataset"),
        "classes": [{"name": n, "kind": "seen" if s else "unseen"} for n, s in zip(names, seen, strict=True)],
        "attribute_names": attrs,
        "attribute_groups": attribute_groups(attrs, n_colors),
        "gamma": metrics.get("gamma"),
        "gamma_source": metrics.get("gamma_source"),
        "metrics": {k: metrics.get(k) for k in METRIC_ORDER},
        "_class_att": class_att,
    }


def _wrap(items: list[str], indent: str, first: str | None = None) -> str:
    return textwrap.fill(", ".join(items), width=110, initial_indent=first or indent, subsequent_indent=indent)


def format_description(desc: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe_run`."""
    seen = [c["name"] for c in desc["classes"] if c["kind"] == "seen"]
    unseen = [c["name"] for c in desc["classes"] if c["kind"] == "unseen"]
    data = desc["data_source"] or "unknown data"
    if desc.get("dataset") and desc["dataset"] != data:
        data = f"{data} ({desc['dataset']})"
    head = f"run {desc['run']}"
    if desc["model_dir"] != desc["run"]:
        head += f" (model: {desc['model_dir']})"
    lines = [f"{head}: {desc['mode'] or '?'} mode, {desc['protocol'] or '?'} protocol, data: {data}",
             f"classes: {len(desc['classes'])} ({len(seen)} seen, {len(unseen)} unseen)",
             "  seen:", _wrap(seen, "    ") if seen else "    (none)",
             "  unseen:", _wrap(unseen, "    ") if unseen else "    (none)",
             f"attributes: {len(desc['attribute_names'])} in {len(desc['attribute_groups'])} "
             f"group{'s' if len(desc['attribute_groups']) != 1 else ''}"]
    for group, members in desc["attribute_groups"].items():
        short = [m.split("::", 1)[1] if m.startswith(f"{group}::") else m for m in members]
        lines.append(_wrap(short, "    ", f"  {group} ({len(members)}): "))
    if desc["gamma"] is not None:
        lines.append(f"calibration: gamma = {desc['gamma']:.4g} ({desc['gamma_source'] or 'source unknown'})")
        note = fixed_gamma_note(desc["gamma_source"])
        if note:
            lines.append(f"  {note}")
    else:
        lines.append("calibration: no metrics.json (the run has not been evaluated)")
    keys = [k for k in METRIC_ORDER if desc["metrics"].get(k) is not None]
    if keys:
        lines.append("results (%): " + "  ".join(f"{k} {desc['metrics'][k]:.2f}" for k in keys))
    return "\n".join(lines)


def public(desc: dict[str, Any]) -> dict[str, Any]:
    """The description without internal entries (what ``--json`` prints)."""
    return {k: v for k, v in desc.items() if not k.startswith("_")}


def write_classes_template(desc: dict[str, Any], path: str | Path) -> Path:
    """Write an example ``--new-classes`` CSV: header ``class`` + every attribute, one example class row.

    The example row copies the attribute vector of the run's first unseen class (else its first class), so it
    is a plausible class; edit the name and values to define your own classes.
    """
    path = Path(path)
    if path.suffix.lower() != ".csv":
        raise ConfigError(f"--new-classes-template {path}: the template is a CSV file; name it *.csv")
    kinds = [c["kind"] for c in desc["classes"]]
    row_index = kinds.index("unseen") if "unseen" in kinds else 0
    values = desc["_class_att"][row_index]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["class", *desc["attribute_names"]])
        writer.writerow([EXAMPLE_CLASS, *(f"{float(v):.4g}" for v in values)])
    return path
