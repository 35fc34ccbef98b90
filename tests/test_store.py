"""The feature store: round trips, indexing, resumable HDF5 import, corruption and provenance checks."""

from __future__ import annotations

import json
import pickle

import h5py
import numpy as np
import pytest

from dedn.data.dataset import ZSLData
from dedn.data.hdf5 import ImportOptions, export_hdf5, import_hdf5, load_hdf5_zsldata, open_hdf5_lazily
from dedn.data.store import FeatureStore, check_provenance, load_zsldata, store_from_array, store_zsldata
from dedn.errors import DataError

N, C, H, W = 10, 6, 3, 2
K, D, G = 5, 4, 7


def _features(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N, C, H, W)).astype(np.float32) * 3


def _write_dazle(path, n=N, drop=None, labels=None, features=None):
    """A small DAZLE/DEDN-layout HDF5 file: classes 0..2 seen, 3..4 unseen."""
    rng = np.random.default_rng(1)
    lab = np.array([0, 1, 2, 0, 1, 2, 0, 3, 4, 3])[:n] if labels is None else labels
    keys = {
        "feature_map": _features()[:n] if features is None else features,
        "labels": lab,
        "trainval_loc": np.array([0, 1, 2, 3, 4]),
        "test_seen_loc": np.array([5, 6]),
        "test_unseen_loc": np.array([7, 8, 9]),
        "att": rng.random((K, D)).astype(np.float32),
        "original_att": rng.random((K, D)).astype(np.float32) * 100,
        "w2v_att": rng.normal(size=(D, G)).astype(np.float32),
    }
    with h5py.File(path, "w") as f:
        for k, v in keys.items():
            if k != drop:
                f[k] = v
    return keys


# ---------------------------------------------------------------------------------------------- basics
def test_round_trip_float16_and_float32(tmp_path):
    x = _features()
    labels = np.arange(N) % 3
    s16 = store_from_array(tmp_path / "a", x, labels=labels, chunk_size=4)
    assert s16.complete and s16.n_chunks == 3 and s16.missing_chunks() == []
    assert s16.shape == (N, C, H, W) and len(s16) == N
    assert (tmp_path / "a" / "features.bin").stat().st_size == N * C * H * W * 2
    got = FeatureStore.open(tmp_path / "a")[:]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, x, rtol=1e-3, atol=1e-3)  # float16 keeps ~3 decimal digits
    np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "a").labels, labels)
    s32 = store_from_array(tmp_path / "b", x, dtype="float32", chunk_size=7)
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "b")[:], x)
    assert s32.labels is None


def test_fancy_indexing_any_order_and_duplicates(tmp_path):
    x = _features().astype(np.float16).astype(np.float32)
    store = store_from_array(tmp_path / "s", x, chunk_size=3)
    idx = np.array([7, 2, 2, 9, 0, -1])
    np.testing.assert_array_equal(store[idx], x[idx])
    np.testing.assert_array_equal(store[[4]], x[[4]])
    np.testing.assert_array_equal(store[3], x[3])
    np.testing.assert_array_equal(store[np.int64(-2)], x[-2])
    np.testing.assert_array_equal(store[2:9:3], x[2:9:3])
    np.testing.assert_array_equal(store[np.arange(N) % 2 == 0], x[::2])
    np.testing.assert_array_equal(store[np.array([[1, 0], [5, 5]])], x[np.array([[1, 0], [5, 5]])])
    assert store[np.array([], dtype=int)].shape == (0, C, H, W)
    with pytest.raises(IndexError):
        store[np.array([0, N])]
    assert store.resident_copy("cpu") is None  # GPU residency only; CPU users read the file
    # A store handed to DataLoader workers is pickled without its memory map.
    clone = pickle.loads(pickle.dumps(store))
    np.testing.assert_array_equal(clone[idx], x[idx])


def test_chunks_marked_only_when_written(tmp_path):
    store = FeatureStore.create(tmp_path / "s", N, (C, H, W), chunk_size=4, provenance={"backbone": "x"})
    assert not store.complete and store.missing_chunks() == [0, 1, 2]
    x = _features()
    store.write_chunk(2, x[8:])
    store.write_chunk(0, x[:4])
    reopened = FeatureStore.open(tmp_path / "s")
    assert reopened.completed_chunks == [0, 2] and reopened.missing_chunks() == [1]
    with pytest.raises(DataError, match="incomplete"):
        reopened.require_complete()
    with pytest.raises(DataError, match="holds 4 maps"):
        store.write_chunk(1, x[:3])
    with pytest.raises(DataError, match="NaN or infinite"):
        store.write_chunk(1, np.full((4, C, H, W), 1e6, np.float32))  # overflows float16
    # Sharded writers: each rank marks its own file; rank 0 merges them into store.json.
    store.write_rows(4, x[4:8])
    store.mark_complete(1, rank=1)
    assert (tmp_path / "s" / "complete.rank1.json").exists()
    assert FeatureStore.open(tmp_path / "s").complete
    store.merge_rank_marks()
    assert not (tmp_path / "s" / "complete.rank1.json").exists()
    assert json.loads((tmp_path / "s" / "store.json").read_text())["complete_chunks"] == [0, 1, 2]


@pytest.mark.parametrize("write_behind", [False, True])
def test_fill_missing_writes_the_missing_chunks_in_order(tmp_path, write_behind):
    x = _features()
    store = FeatureStore.create(tmp_path / "s", N, (C, H, W), chunk_size=4)
    store.write_chunk(1, x[4:8])  # as if an earlier fill stopped after this chunk
    asked = []

    def read(s, e):
        asked.append((s, e))
        return x[s:e]

    assert store.fill_missing(read, block_rows=3, write_behind=write_behind) == 6
    assert asked == [(0, 3), (3, 4), (8, 10)]
    reopened = FeatureStore.open(tmp_path / "s")
    assert reopened.complete and reopened.verify().verified == 3
    np.testing.assert_array_equal(reopened.read_raw(), x.astype(np.float16))
    # A write that fails in the worker thread is raised by the fill, and its chunk stays missing.
    bad = FeatureStore.create(tmp_path / "b", N, (C, H, W), chunk_size=4)
    with pytest.raises(DataError, match="NaN or infinite"):
        bad.fill_missing(lambda s, e: np.full((e - s, C, H, W), np.nan, np.float32), write_behind=write_behind)
    assert FeatureStore.open(tmp_path / "b").missing_chunks() == [0, 1, 2]


def test_create_refuses_to_clobber(tmp_path):
    store_from_array(tmp_path / "s", _features())
    with pytest.raises(DataError, match="already exists"):
        store_from_array(tmp_path / "s", _features())
    store_from_array(tmp_path / "s", _features(1), overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not part of a feature store"):
        FeatureStore.create(tmp_path / "other", N, (C, H, W), overwrite=True)
    assert (tmp_path / "other" / "notes.txt").exists()


def test_full_disk_fails_at_creation(tmp_path, monkeypatch):
    import errno
    import os

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_space, raising=False)
    with pytest.raises(DataError, match=r"not enough disk space for the feature store .*features\.bin"):
        FeatureStore.create(tmp_path / "s", N, (C, H, W))
    assert not (tmp_path / "s" / "features.bin").exists() and not (tmp_path / "s" / "store.json").exists()


# ---------------------------------------------------------------------------------------------- corruption
def test_corrupt_store_json(tmp_path):
    store_from_array(tmp_path / "s", _features())
    meta = tmp_path / "s" / "store.json"
    meta.write_text('{"format": "dedn-feature-store", "n": 1')
    with pytest.raises(DataError, match=r"store\.json is corrupt.*overwrite"):
        FeatureStore.open(tmp_path / "s")
    meta.write_text(json.dumps({"format": "dedn-feature-store", "version": 1, "n": N}))
    with pytest.raises(DataError, match=r"store\.json is corrupt \(missing or malformed entry"):
        FeatureStore.open(tmp_path / "s")
    meta.unlink()
    with pytest.raises(DataError, match="creation was interrupted"):
        FeatureStore.open(tmp_path / "s")
    with pytest.raises(DataError, match="not a feature store"):
        FeatureStore.open(tmp_path / "nowhere")


def test_truncated_features_bin(tmp_path):
    store_from_array(tmp_path / "s", _features())
    f = tmp_path / "s" / "features.bin"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 10)
    with pytest.raises(DataError, match=r"features\.bin has .* bytes .* truncated"):
        FeatureStore.open(tmp_path / "s")


# ---------------------------------------------------------------------------------------------- provenance
def test_provenance_mismatch(tmp_path):
    prov = {"backbone": "efficientnet-lite0", "image_size": 224}
    store = store_from_array(tmp_path / "s", _features(), provenance=prov)
    check_provenance(store, expect_backbone="efficientnet-lite0", expect_image_size=224)
    with pytest.raises(DataError, match="backbone 'efficientnet-lite0' but the config expects 'resnet101'"):
        check_provenance(store, expect_backbone="resnet101")
    with pytest.raises(DataError, match="image size 224 but the config expects 448"):
        check_provenance(FeatureStore.open(tmp_path / "s"), expect_image_size=448)
    check_provenance({"backbone": None}, expect_backbone="resnet101")  # unknown origin cannot be checked


# ---------------------------------------------------------------------------------------------- semantics
def test_zsldata_round_trip(tmp_path):
    keys = _write_dazle(tmp_path / "f.h5")
    data = load_hdf5_zsldata(tmp_path / "f.h5", name="toy")
    data.clusters = {"a": np.array([0, 2]), "b": np.array([1, 3])}
    store_zsldata(tmp_path / "s", data, chunk_size=4)
    back = load_zsldata(tmp_path / "s")
    assert isinstance(back, ZSLData) and back.name == "toy"
    np.testing.assert_array_equal(back.labels, keys["labels"])
    np.testing.assert_array_equal(back.test_unseen_loc, keys["test_unseen_loc"])
    np.testing.assert_allclose(back.att, keys["att"])
    np.testing.assert_allclose(back.w2v, keys["w2v_att"])
    assert list(back.clusters) == ["a", "b"]
    np.testing.assert_array_equal(back.clusters["b"], [1, 3])
    np.testing.assert_array_equal(back.features[np.array([9, 1])],
                                  keys["feature_map"][[9, 1]].astype(np.float16).astype(np.float32))
    assert back.provenance["split_hash"] == FeatureStore.open(tmp_path / "s").provenance["split_hash"]
    with pytest.raises(DataError, match="no semantic side"):
        load_zsldata(store_from_array(tmp_path / "bare", _features(), labels=keys["labels"]).path)


# ---------------------------------------------------------------------------------------------- HDF5
def test_hdf5_import_export_round_trip(tmp_path):
    keys = _write_dazle(tmp_path / "f.h5")
    store = import_hdf5(tmp_path / "f.h5", tmp_path / "s", ImportOptions(
        chunk_size=4, block_size=3, progress=False, provenance={"backbone": "resnet101", "image_size": 448}))
    assert store.complete and store.provenance["backbone"] == "resnet101"
    np.testing.assert_array_equal(store[:], keys["feature_map"].astype(np.float16).astype(np.float32))
    out = export_hdf5(store, tmp_path / "out" / "g.h5", block_size=4, progress=False)
    assert not list((tmp_path / "out").glob(".*tmp*"))
    with h5py.File(out, "r") as f:
        assert f["feature_map"].dtype == np.float32
        np.testing.assert_array_equal(f["feature_map"][()], store[:])
        for k in ("labels", "trainval_loc", "test_seen_loc", "test_unseen_loc"):
            np.testing.assert_array_equal(f[k][()], keys[k])
        np.testing.assert_allclose(f["original_att"][()], keys["original_att"])
        np.testing.assert_allclose(f["w2v_att"][()], keys["w2v_att"])
    again = import_hdf5(out, tmp_path / "s2", ImportOptions(chunk_size=5, progress=False))
    np.testing.assert_array_equal(again[:], store[:])
    assert load_zsldata(again.path).class_names == load_zsldata(store.path).class_names


def test_hdf5_import_resumes_after_interruption(tmp_path, monkeypatch):
    keys = _write_dazle(tmp_path / "f.h5")
    calls = {"n": 0}
    original = FeatureStore.write_rows

    def failing(self, start, array):
        calls["n"] += 1
        if calls["n"] == 3:  # in the middle of the second chunk
            raise KeyboardInterrupt
        original(self, start, array)

    monkeypatch.setattr(FeatureStore, "write_rows", failing)
    with pytest.raises(KeyboardInterrupt):
        import_hdf5(tmp_path / "f.h5", tmp_path / "s", ImportOptions(chunk_size=4, block_size=2, progress=False))
    monkeypatch.setattr(FeatureStore, "write_rows", original)
    partial = FeatureStore.open(tmp_path / "s")
    assert partial.completed_chunks == [0] and not partial.complete
    written = []
    monkeypatch.setattr(FeatureStore, "write_rows",
                        lambda self, s, a: (written.append(s), original(self, s, a)))
    resumed = import_hdf5(tmp_path / "f.h5", tmp_path / "s", ImportOptions(chunk_size=4, block_size=2, progress=False))
    assert written == [4, 6, 8]  # only the chunks that were missing
    assert resumed.complete
    np.testing.assert_array_equal(resumed[:], keys["feature_map"].astype(np.float16).astype(np.float32))
    # A different source file is refused rather than mixed in (or silently ignored once complete).
    _write_dazle(tmp_path / "g.h5", labels=np.array([1, 1, 2, 0, 1, 2, 0, 3, 4, 3]))
    with pytest.raises(DataError, match="already a complete import of .*f\\.h5.*--overwrite"):
        import_hdf5(tmp_path / "g.h5", tmp_path / "s", ImportOptions(chunk_size=4, progress=False))


@pytest.mark.parametrize("drop", ["feature_map", "labels", "test_unseen_loc", "att", "w2v_att"])
def test_hdf5_missing_key(tmp_path, drop):
    _write_dazle(tmp_path / "f.h5", drop=drop)
    with pytest.raises(DataError, match=rf"f\.h5: key '{drop}' is missing"):
        import_hdf5(tmp_path / "f.h5", tmp_path / "s", ImportOptions(progress=False))
    assert not (tmp_path / "s").exists()  # nothing written before the checks pass


def test_hdf5_bad_counts_and_shapes(tmp_path):
    _write_dazle(tmp_path / "a.h5", features=_features()[:8])
    with pytest.raises(DataError, match=r"a\.h5: key 'feature_map' holds 8 feature maps but key 'labels' "
                                        r"holds 10"):
        import_hdf5(tmp_path / "a.h5", tmp_path / "s", ImportOptions(progress=False))
    _write_dazle(tmp_path / "b.h5", features=_features()[:, 0])
    with pytest.raises(DataError, match=r"b\.h5: key 'feature_map' must have shape \(N, C, h, w\)"):
        import_hdf5(tmp_path / "b.h5", tmp_path / "s", ImportOptions(progress=False))
    _write_dazle(tmp_path / "c.h5", labels=np.array([1, 2, 3, 1, 2, 3, 1, 4, 5, 4]))
    with pytest.raises(DataError, match=r"c\.h5: key 'labels' .* 0-based"):
        import_hdf5(tmp_path / "c.h5", tmp_path / "s", ImportOptions(progress=False))
    with h5py.File(tmp_path / "a.h5", "a") as f:
        del f["feature_map"], f["w2v_att"]
        f["feature_map"] = _features()
        f["w2v_att"] = np.zeros((D + 1, G))
    with pytest.raises(DataError, match=r"a\.h5: key 'w2v_att' has shape \(5, 7\) but 'att' has 4 "):
        import_hdf5(tmp_path / "a.h5", tmp_path / "s", ImportOptions(progress=False))


def test_hdf5_lazy_view(tmp_path):
    keys = _write_dazle(tmp_path / "f.h5")
    view = open_hdf5_lazily(tmp_path / "f.h5")
    x = keys["feature_map"]
    assert view.shape == x.shape and len(view) == N
    idx = np.array([8, 1, 1, 5, -1])
    np.testing.assert_array_equal(view[idx], x[idx])
    np.testing.assert_array_equal(view[3], x[3])
    np.testing.assert_array_equal(view[1:9:2], x[1:9:2])
    clone = pickle.loads(pickle.dumps(view))
    np.testing.assert_array_equal(clone[[2, 0]], x[[2, 0]])
    data = load_hdf5_zsldata(tmp_path / "f.h5")
    assert data.feature_shape == (C, H, W)
    data.check_features_finite(data.trainval_loc)


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_resident_copy_keeps_the_store_on_the_gpu(tmp_path):
    import torch

    x = _features()
    store = store_from_array(tmp_path / "s", x, chunk_size=3)
    resident = store.resident_copy("cuda", reserve_bytes=0)
    t = resident.tensor
    assert t.device.type == "cuda" and t.dtype == torch.float16 and t.shape == (N, C, H, W)
    assert resident.identity == store.identity and resident.dtype == store.dtype
    np.testing.assert_array_equal(t.float().cpu().numpy(), store[:])
    assert store.resident_copy("cuda", reserve_bytes=10**15) is None  # does not fit
