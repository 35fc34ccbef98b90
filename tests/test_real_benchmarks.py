"""The real CUB, SUN and AWA2 semantic side with synthetic feature maps: train and evaluate end to end.

The visual features of the real benchmarks are not available here, so each test pairs the real N, labels,
splits, class attributes, word vectors and built-in clusters with small random feature maps stored in a
float16 feature store, and runs the whole pipeline through the same config path a user takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dedn.config import load_config
from dedn.data.store import FeatureStore, SemanticSide
from dedn.data.xlsa17 import read_semantic_dir
from dedn.factory import build_model, load_data
from dedn.training.trainer import Trainer

from .conftest import shared_dir


def _real_store(tmp_path: Path, ds: str) -> Path:
    sem = read_semantic_dir(shared_dir(ds), dataset=ds)
    n = sem.n_images
    rng = np.random.default_rng(0)
    path = tmp_path / f"{ds}-store"
    store = FeatureStore.create(path, n, (8, 2, 2), dtype="float16", chunk_size=4096,
                                provenance={"backbone": "random", "image_size": 32, "dataset": ds},
                                labels=sem.labels)
    # Class-dependent features so that learning is possible: a class prototype plus noise.
    protos = rng.random((sem.n_classes, 8, 2, 2)).astype(np.float32)
    for c in range(store.n_chunks):
        lo, hi = c * store.chunk_size, min((c + 1) * store.chunk_size, n)
        block = protos[sem.labels[lo:hi]] + 0.3 * rng.random((hi - lo, 8, 2, 2), dtype=np.float32)
        store.write_chunk(c, block)
    store.save_semantics(SemanticSide(
        att=sem.att, w2v=sem.w2v, trainval_loc=sem.trainval_loc, test_seen_loc=sem.test_seen_loc,
        test_unseen_loc=sem.test_unseen_loc, class_names=list(sem.class_names),
        attribute_names=list(sem.attribute_names), val_classes=sem.val_classes, name=ds))
    return path


EXPECTED = {"CUB": (11788, 200, 312, 6), "SUN": (14340, 717, 102, 4), "AWA2": (37322, 50, 85, 4)}


@pytest.mark.parametrize("ds", ["CUB", "SUN", "AWA2"])
@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_real_semantics_train_and_evaluate(tmp_path: Path, ds: str, mode: str) -> None:
    path = _real_store(tmp_path, ds)
    cfg = load_config(None, [
        "data.source=store", f"data.path={path}", f"data.dataset={ds}", f"mode={mode}", "train.epochs=1",
        "train.iters_per_epoch=2", "train.progress=false", "eval.batch_size=2048", "model.low_rank=4",
        "loss.lamb=0.1"])
    data = load_data(cfg)
    n, k, d, q = EXPECTED[ds]
    assert (data.n_images, data.n_classes, data.n_attributes) == (n, k, d)
    model = build_model(cfg, data)
    assert model.config.n_clusters == q
    if ds == "SUN" and mode == "reference":
        assert model.config.cluster_sizes == [64, 27, 9, 2] and model.config.low_rank == 4
    if ds == "AWA2" and mode == "reference":
        assert model.config.method.clip_negative_attributes
    result = Trainer(cfg, data, run_dir=tmp_path / "run").fit()
    m = result.metrics
    assert all(0.0 <= m[key] <= 100.0 for key in ("T", "S", "U", "H"))
    assert m["n_test_seen"] + m["n_test_unseen"] == data.test_seen_loc.size + data.test_unseen_loc.size


def test_real_validation_split_uses_trainval_only(tmp_path: Path) -> None:
    path = _real_store(tmp_path, "CUB")
    cfg = load_config(None, ["data.source=store", f"data.path={path}", "data.dataset=CUB", "data.split=validation"])
    val = load_data(cfg)
    full = load_data(load_config(None, ["data.source=store", f"data.path={path}", "data.dataset=CUB"]))
    used = np.concatenate([val.trainval_loc, val.test_seen_loc, val.test_unseen_loc])
    assert np.isin(used, full.trainval_loc).all()
    assert np.unique(full.labels[val.test_unseen_loc]).size == 50  # CUB's valclasses1
