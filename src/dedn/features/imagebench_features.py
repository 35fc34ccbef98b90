"""Backbone features of the built-in image benchmark, rendered, extracted and cached in a feature store."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dedn.config import RunConfig
from dedn.data.dataset import ZSLData
from dedn.data.imagebench import ImageBenchmark, make_image_benchmark, to_zsldata


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
    weights: str = "imagenet",
    layer: int | None = None,
    batch_size: int = 32,
    num_workers: int = 1,
    progress: bool = True,
):
    """Features of every benchmark image in a float16 store under ``cache_dir``, extracted once.

    Extraction is chunked and resumable: an interrupted run continues with the chunks it misses.
    Returns the complete :class:`~dedn.data.store.FeatureStore`.
    """
    from dedn.data.store import FeatureStore
    from dedn.features.backbones import get_backbone

    net = get_backbone(backbone, weights=weights, layer=layer)
    size = int(image_size or bench.image_size)
    # crop_box: where the feature grid lies on the rendered images (and their part masks), for localisation.
    crop_box = [float(v) for v in net.transform(size).crop_box(bench.image_size, bench.image_size)]
    provenance = {**net.provenance(size), "dataset": "imagebench", "imagebench": asdict(bench.config),
                  "crop_box": crop_box}
    folder = Path(cache_dir) / f"imagebench-{_cache_key(bench, net.provenance(size))}"
    if (folder / "store.json").exists():
        store = FeatureStore.open(folder)
    else:
        store = FeatureStore.create(folder, len(bench), net.feature_shape(size), dtype="float16", chunk_size=256,
                                    provenance=provenance, labels=bench.labels)
    transform = net.transform(size)

    def render_and_extract(start: int, stop: int) -> np.ndarray:
        loader = DataLoader(_RenderedImages(bench, list(range(start, stop)), transform), batch_size=batch_size,
                            num_workers=num_workers, persistent_workers=False)
        return np.concatenate([net(images).float().numpy() for images in loader])

    store.fill_missing(render_and_extract, desc="extracting features", progress=progress)
    store.require_complete()
    return store


def imagebench_data(cfg: RunConfig, progress: bool | None = None) -> ZSLData:
    """The built-in benchmark as a :class:`ZSLData` over its cached feature store (``data.source=imagebench``).

    ``progress``: show the extraction bar (default: ``train.progress``).
    """
    bench = make_image_benchmark(cfg.data.imagebench)
    store = imagebench_store(bench, cfg.data.cache_dir, cfg.data.backbone, cfg.data.image_size,
                             weights=cfg.data.backbone_weights, layer=cfg.data.backbone_layer,
                             progress=cfg.train.progress if progress is None else progress)
    data = to_zsldata(bench, store, source=str(store.path))
    data.provenance = {**store.provenance, **data.provenance}
    return data
