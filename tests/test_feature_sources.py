"""Every kind of feature source keeps the FeatureSource protocol and returns the same maps for the same index."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from dedn.config import SyntheticConfig
from dedn.data.dataset import ZSLData, data_fingerprint
from dedn.data.hdf5 import open_hdf5_lazily
from dedn.data.sources import ArrayFeatures, DeviceFeatures, FeatureSource
from dedn.data.store import FeatureStore, store_from_array
from dedn.data.synthetic import SyntheticFeatures, make_synthetic
from dedn.errors import DataError

N, C, H, W = 12, 5, 3, 2
INDEX = np.array([7, 3, 3, 0, 11])  # unsorted, with a duplicate


def _maps() -> np.ndarray:
    """float32 maps that float16 holds exactly, so a float16 store returns them unchanged."""
    x = np.random.default_rng(0).normal(size=(N, C, H, W)) * 3
    return x.astype(np.float16).astype(np.float32)


def _h5(tmp_path: Path) -> Path:
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f["feature_map"] = _maps()
    return path


def _numpy(tmp_path: Path) -> tuple[FeatureSource, np.ndarray, np.dtype]:
    return ArrayFeatures(_maps()), _maps(), np.dtype(np.float32)


def _h5py_dataset(tmp_path: Path) -> tuple[FeatureSource, np.ndarray, np.dtype]:
    return ArrayFeatures(h5py.File(_h5(tmp_path), "r")["feature_map"]), _maps(), np.dtype(np.float32)


def _hdf5_file(tmp_path: Path) -> tuple[FeatureSource, np.ndarray, np.dtype]:
    return open_hdf5_lazily(_h5(tmp_path)), _maps(), np.dtype(np.float32)


def _store(tmp_path: Path) -> tuple[FeatureSource, np.ndarray, np.dtype]:
    return store_from_array(tmp_path / "s", _maps(), chunk_size=5), _maps(), np.dtype(np.float16)


def _resident(tmp_path: Path) -> tuple[FeatureSource, np.ndarray, np.dtype]:
    return DeviceFeatures(torch.from_numpy(_maps()).half()), _maps(), np.dtype(np.float16)


def _synthetic(tmp_path: Path) -> tuple[FeatureSource, np.ndarray, np.dtype]:
    features = make_synthetic(SyntheticConfig()).features
    assert isinstance(features, SyntheticFeatures)
    return features, features.materialize(), np.dtype(np.float32)


SOURCES: dict[str, Callable[[Path], tuple[FeatureSource, np.ndarray, np.dtype]]] = {
    "numpy": _numpy, "h5py": _h5py_dataset, "hdf5": _hdf5_file, "store": _store, "resident": _resident,
    "synthetic": _synthetic,
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_source_reads_the_same_maps_for_the_same_index(kind: str, tmp_path: Path) -> None:
    source, maps, stored = SOURCES[kind](tmp_path)
    assert isinstance(source, FeatureSource)
    assert tuple(source.shape) == maps.shape and len(source) == maps.shape[0]
    batch = source.read(INDEX)
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.float32 and batch.device.type == "cpu"
    np.testing.assert_array_equal(batch.numpy(), maps[INDEX])
    kept = source.read(INDEX, stored_dtype=True)
    assert kept.numpy().dtype == stored
    np.testing.assert_array_equal(kept.float().numpy(), maps[INDEX])
    rows = np.unique(INDEX)  # what an h5py dataset can be indexed with
    np.testing.assert_array_equal(np.asarray(source[rows], dtype=np.float32), maps[rows])
    assert source.resident_copy("cpu") is (source if kind == "resident" else None)
    assert (source.identity is not None) == (kind == "store")


def test_a_resident_copy_reads_like_its_store_and_keeps_its_identity(tmp_path: Path) -> None:
    store = store_from_array(tmp_path / "s", _maps(), chunk_size=5)
    assert isinstance(store, FeatureStore)
    copy = DeviceFeatures(torch.from_numpy(store.read_raw()), identity=store.identity)
    assert copy.dtype == store.dtype == np.float16 and copy.identity == store.identity
    for stored_dtype in (False, True):
        a, b = copy.read(INDEX, stored_dtype), store.read(INDEX, stored_dtype)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _dataset(features: object) -> ZSLData:
    return ZSLData(name="toy", features=features, labels=np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 4, 3]),
                   att=np.eye(5, 4, dtype=np.float32), w2v=np.ones((4, 2), dtype=np.float32),
                   trainval_loc=np.arange(6), test_seen_loc=np.array([6, 7, 8]), test_unseen_loc=np.array([9, 10, 11]),
                   class_names=[f"c{i}" for i in range(5)], attribute_names=[f"a{i}" for i in range(4)],
                   source="toy.h5")


def test_zsldata_wraps_an_array_once_and_it_still_behaves_as_one(tmp_path: Path) -> None:
    x = _maps().astype(np.float64)
    data = _dataset(x)
    assert isinstance(data.features, ArrayFeatures) and data.features.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(data.features), x)
    assert data.features[INDEX].dtype == np.float64 and data.features.shape == x.shape
    assert data.feature_shape == (C, H, W)
    data.validate()
    assert replace(data, labels=data.labels.copy()).features is data.features  # not wrapped twice
    assert data_fingerprint(data) == data_fingerprint(_dataset(x.copy()))
    store = store_from_array(tmp_path / "s", x)
    assert _dataset(store).features is store
    assert data_fingerprint(_dataset(store)) != data_fingerprint(data)  # the store's identity counts
    with pytest.raises(DataError, match=r"toy\.h5: feature maps must be an \(N, C, h, w\) array"):
        _dataset([[0.0]])


def test_the_trainer_reads_and_evaluates_a_resident_copy_like_the_host(tiny_cfg) -> None:
    from dedn.training.trainer import Trainer

    trainer = Trainer(tiny_cfg)
    host = trainer.evaluate().result.to_dict()
    index = np.array([4, 1, 1, 0])
    want = trainer._host_batch(index)
    # What resident_copy gives on a GPU, here on the CPU.
    trainer.features = DeviceFeatures(trainer.data.features.read(np.arange(trainer.data.n_images)))
    got = trainer._host_batch(index)
    assert got.dtype == want.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert trainer.evaluate().result.to_dict() == host
    bad = trainer.features.tensor.clone()
    bad[trainer.data.test_seen_loc[0]] = float("nan")
    trainer.features = DeviceFeatures(bad)  # the evaluation reads the resident copy, not the host's maps
    with pytest.raises(DataError, match=rf"images \[{trainer.data.test_seen_loc[0]}\]"):
        trainer.evaluate()
