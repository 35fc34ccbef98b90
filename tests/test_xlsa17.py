"""Reading xlsa17 folders (real CUB/SUN/AWA2 semantic files and small hand-made ones), image paths."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from dedn.data.sources import FeatureSource
from dedn.data.xlsa17 import (
    EXPECTED_COUNTS,
    canonical_dataset,
    load_attribute_names,
    load_res101,
    read_semantic_dir,
    resolve_image_paths,
    to_zsldata,
)
from dedn.errors import DataError

from .conftest import shared_dir


class LazyFeatures(FeatureSource):
    """Feature maps of the right shape that never hold the real (gigabyte) data."""

    dtype = np.dtype(np.float32)

    def __init__(self, n: int, shape=(8, 2, 2)):
        self.shape = (n, *shape)

    def __getitem__(self, index):
        return np.zeros((len(np.atleast_1d(index)), *self.shape[1:]), dtype=np.float32)


def cell(strings) -> np.ndarray:
    out = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        out[i, 0] = s
    return out


# ---------------------------------------------------------------------------------------------- fake folder
K, D, PER_CLASS = 6, 5, 5  # classes c0..c5; c0-c3 seen (c3 validation), c4-c5 unseen


def make_folder(tmp_path: Path, name: str = "toy", prefix: str = "/BS/authors/toyset/images") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(K)]
    labels = np.repeat(np.arange(K), PER_CLASS)  # 0-based, 30 images
    idx = np.arange(labels.size)
    seen = labels < 4
    trainval = idx[seen & (idx % PER_CLASS != 0)]
    test_seen = idx[seen & (idx % PER_CLASS == 0)]
    test_unseen = idx[~seen]
    att = rng.random((D, K))
    scipy.io.savemat(folder / "att_splits.mat", {
        "allclasses_names": cell(classes),
        "att": att / np.linalg.norm(att, axis=0),
        "original_att": att * 100,
        "trainval_loc": (trainval + 1)[:, None].astype(np.uint16),
        "test_seen_loc": (test_seen + 1)[:, None].astype(np.uint16),
        "test_unseen_loc": (test_unseen + 1)[:, None].astype(np.uint16),
    })
    files = [f"{prefix}/{classes[c]}/img_{i}.jpg" for i, c in enumerate(labels)]
    scipy.io.savemat(folder / "res101.mat", {
        "image_files": cell(files), "labels": (labels + 1)[:, None].astype(np.float64),
        "features": rng.random((16, labels.size)),
    })
    (folder / "trainvalclasses.txt").write_text("c2\nc0\nc1\nc3\n")
    (folder / "testclasses.txt").write_text("c5\nc4\n")
    (folder / "trainclasses1.txt").write_text("c0\nc1\nc2\n")
    (folder / "valclasses1.txt").write_text("c3\n")
    (folder / "attributes.txt").write_text("".join(f"{i + 1} has_part::value_{i}\n" for i in range(D)))
    with open(folder / f"{name}_attribute.pkl", "wb") as fh:
        pickle.dump(rng.normal(size=(D, 7)), fh, protocol=3)
    return folder


def rewrite_mat(path: Path, **changes) -> None:
    mat = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    mat.update(changes)
    scipy.io.savemat(path, mat)


# ---------------------------------------------------------------------------------------------- real files
@pytest.mark.parametrize("ds", ["CUB", "SUN", "AWA2"])
def test_read_real_folder(ds):
    sem = read_semantic_dir(shared_dir(ds))
    exp = EXPECTED_COUNTS[ds]
    assert sem.name == ds
    assert sem.att.shape == (exp["classes"], exp["attributes"]) and sem.att.dtype == np.float32
    assert sem.original_att.shape == sem.att.shape
    assert sem.w2v is not None and sem.w2v.shape == (exp["attributes"], 300)
    assert len(sem.attribute_names) == exp["attributes"] and len(sem.class_names) == exp["classes"]
    assert (sem.trainval_loc.size, sem.test_seen_loc.size, sem.test_unseen_loc.size) == (
        exp["trainval"], exp["test_seen"], exp["test_unseen"])
    assert sem.n_images == exp["images"] and len(sem.image_files) == exp["images"]
    assert sem.seen_classes.size == exp["seen"] and sem.unseen_classes.size == exp["unseen"]
    assert sem.val_classes is not None and np.isin(sem.val_classes, sem.seen_classes).all()
    # the three splits cover every image once (SOURCES.md)
    every = np.sort(np.concatenate([sem.trainval_loc, sem.test_seen_loc, sem.test_unseen_loc]))
    np.testing.assert_array_equal(every, np.arange(exp["images"]))
    # att is xlsa17 att transposed, loc 0-based
    mat = scipy.io.loadmat(shared_dir(ds) / "att_splits.mat")
    np.testing.assert_allclose(sem.att, mat["att"].T.astype(np.float32))
    np.testing.assert_array_equal(sem.trainval_loc, mat["trainval_loc"].ravel().astype(np.int64) - 1)
    # the class folder in every image path is the class of its label (SUN: "bakery_shop" is bakery/shop/)
    for i in range(0, sem.n_images, 997):
        folder = os.path.dirname(sem.image_files[i]).replace("/", "_")
        assert folder.endswith("_" + sem.class_names[sem.labels[i]])


def test_real_attribute_names():
    cub = load_attribute_names(shared_dir("CUB") / "attributes.txt")
    assert cub[0] == "has_bill_shape::curved_(up_or_down)" and len(cub) == 312
    awa = load_attribute_names(shared_dir("AWA2") / "predicates.txt")
    assert awa[:2] == ["black", "white"] and awa[-1] == "domestic"
    sun = load_attribute_names(shared_dir("SUN") / "attributes.mat")
    assert sun[0] == "sailing/ boating" and sun[88] == "man-made" and len(sun) == 102


def test_read_real_npz_directly():
    sem = read_semantic_dir(shared_dir("AWA2") / "semantic_AWA2.npz")
    assert sem.name == "AWA2" and sem.labels.size == 37322 and sem.w2v.shape == (85, 300)
    assert sem.val_classes.size == 13  # valclasses1.txt next to the file


def test_real_to_zsldata_and_validation_split():
    sem = read_semantic_dir(shared_dir("CUB"))
    data = to_zsldata(sem, LazyFeatures(sem.n_images), "lazy-cub")
    assert data.n_classes == 200 and data.n_attributes == 312 and data.w2v.dtype == np.float32
    val = data.validation_split()
    assert np.intersect1d(val.class_ids[val.unseen_classes], sem.val_classes).size == sem.val_classes.size
    assert np.isin(val.trainval_loc, sem.trainval_loc).all()


def test_real_counts_are_checked_under_the_dataset_name():
    with pytest.raises(DataError, match=r"classes 717 \(expected 200\)"):
        read_semantic_dir(shared_dir("SUN"), dataset="CUB")


# ---------------------------------------------------------------------------------------------- toy folder
def test_read_toy_folder(tmp_path):
    folder = make_folder(tmp_path)
    sem = read_semantic_dir(folder)
    assert sem.name == "toy" and sem.att.shape == (K, D)
    assert sem.attribute_names[1] == "has_part::value_1"
    np.testing.assert_array_equal(sem.seen_classes, [0, 1, 2, 3])
    np.testing.assert_array_equal(sem.unseen_classes, [4, 5])
    np.testing.assert_array_equal(sem.val_classes, [3])
    assert sem.trainval_loc.min() == 1 and sem.labels.max() == K - 1  # 0-based
    assert sem.w2v.shape == (D, 7)
    files, labels, feats = load_res101(folder / "res101.mat", features=True)
    assert feats.shape == (K * PER_CLASS, 16) and labels[0] == 0 and files[0].endswith("c0/img_0.jpg")
    data = to_zsldata(sem, np.zeros((K * PER_CLASS, 3, 2, 2), np.float32), "toy-features")
    assert data.source == "toy-features" and data.val_classes.tolist() == [3]


def test_without_images_uses_class_lists(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "res101.mat").unlink()
    sem = read_semantic_dir(folder)
    assert sem.labels is None and sem.image_files is None
    np.testing.assert_array_equal(sem.seen_classes, [0, 1, 2, 3])
    with pytest.raises(DataError, match="no image labels"):
        to_zsldata(sem, np.zeros((30, 1, 1, 1)), "x")


def test_bad_locations(tmp_path):
    folder = make_folder(tmp_path)
    mat = folder / "att_splits.mat"
    rewrite_mat(mat, test_unseen_loc=np.array([[26], [27], [99]], np.uint16))
    with pytest.raises(DataError, match="test_unseen_loc holds image indices outside"):
        read_semantic_dir(folder)
    rewrite_mat(mat, test_unseen_loc=np.array([[2], [26]], np.uint16))  # image 2 is also trainval
    with pytest.raises(DataError, match="share 1 images"):
        read_semantic_dir(folder)
    rewrite_mat(mat, test_unseen_loc=np.array([[0], [26]], np.uint16))
    with pytest.raises(DataError, match="1-based"):
        read_semantic_dir(folder)


def test_split_files_must_agree(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "testclasses.txt").write_text("c5\n")
    with pytest.raises(DataError, match="testclasses.txt: lists 1 unseen classes"):
        read_semantic_dir(folder)
    (folder / "testclasses.txt").write_text("c5\nc4\n")
    (folder / "valclasses1.txt").write_text("nope\n")
    with pytest.raises(DataError, match=r"valclasses1.txt: 1 classes are not in .*att_splits.mat"):
        read_semantic_dir(folder)
    (folder / "valclasses1.txt").write_text("c4\n")
    with pytest.raises(DataError, match="validation classes must be seen"):
        read_semantic_dir(folder)
    (folder / "valclasses1.txt").write_text("c2\n")
    with pytest.raises(DataError, match="trainclasses1.txt"):
        read_semantic_dir(folder)


def test_attribute_file_of_wrong_width(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "attributes.txt").write_text("1 a\n2 b\n")
    with pytest.raises(DataError, match=r"attributes.txt: 2 attribute names, but .* has 5 attributes"):
        read_semantic_dir(folder)


def test_word_vectors_of_wrong_width(tmp_path):
    folder = make_folder(tmp_path)
    with open(folder / "toy_attribute.pkl", "wb") as fh:
        pickle.dump(np.ones((D + 1, 7)), fh)
    with pytest.raises(DataError, match="toy_attribute.pkl: word vectors of shape"):
        read_semantic_dir(folder)


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="semantic folder not found"):
        read_semantic_dir(tmp_path / "nothing")
    with pytest.raises(DataError, match="no att_splits.mat"):
        read_semantic_dir(tmp_path)


def test_canonical_dataset():
    assert canonical_dataset("awa2") == "AWA2" and canonical_dataset("AwA2") == "AWA2"
    assert canonical_dataset("cub_200_2011") == "CUB" and canonical_dataset("sun") == "SUN"
    assert canonical_dataset("AWA1") is None and canonical_dataset(None) is None


# ---------------------------------------------------------------------------------------------- image paths
def touch(path: Path, data: bytes = b"jpeg") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("ds,rel,stored_prefix", [
    ("CUB", "CUB_200_2011/images/001.Black_footed_Albatross/a_{i}.jpg", "/BS/data/CUB_200_2011/"),
    ("SUN", "images/a/abbey/sun_{i}.jpg", "/BS/xian/work/data/SUN/"),
    ("AWA2", "Animals_with_Attributes2/JPEGImages/antelope/antelope_{i}.jpg", "/BS/xian/work/data/"),
])
def test_resolve_image_paths_any_root(tmp_path, ds, rel, stored_prefix):
    rels = [rel.format(i=i) for i in range(20)]
    stored = [stored_prefix + r for r in rels]
    if ds == "AWA2":  # the real res101.mat writes a double slash here
        stored = [s.replace("Attributes2/JPEGImages", "Attributes2//JPEGImages") for s in stored]
    for r in rels:
        touch(tmp_path / "data" / r)
    top = tmp_path / "data"
    first = rel.split("/")[0]
    for root in (top, top / first, top.joinpath(*rel.split("/")[:-2])):
        got = resolve_image_paths(stored, root, ds)
        assert got == [(top / r).resolve() for r in rels]


def test_resolve_image_paths_windows_and_relative(tmp_path):
    touch(tmp_path / "001.A" / "x.jpg")
    got = resolve_image_paths([r"C:\\data\\CUB_200_2011\\images\\001.A\\x.jpg"], tmp_path, "CUB")
    assert got == [(tmp_path / "001.A" / "x.jpg").resolve()]
    touch(tmp_path / "mine" / "cls" / "y.jpg")
    assert resolve_image_paths(["/far/away/cls/y.jpg"], tmp_path / "mine", None)[0].name == "y.jpg"


def test_resolve_image_paths_reports_all_missing(tmp_path):
    stored = [f"/BS/x/CUB_200_2011/images/001.A/img_{i}.jpg" for i in range(50)]
    for i in range(0, 50, 5):
        touch(tmp_path / "CUB_200_2011/images/001.A" / f"img_{i}.jpg")
    touch(tmp_path / "CUB_200_2011/images/001.A/img_1.jpg", b"")  # empty: unreadable
    with pytest.raises(DataError) as err:
        resolve_image_paths(stored, tmp_path, "CUB")
    msg = str(err.value)
    assert "39 of 50 images not found" in msg and "1 of 50 images are empty or not readable" in msg
    assert "img_2.jpg" in msg and "vision.caltech.edu" in msg and "CUB_200_2011/images/<class>" in msg
    with pytest.raises(DataError, match="cvml.ist.ac.at/AwA2"):
        resolve_image_paths(["/a/Animals_with_Attributes2//JPEGImages/x/y.jpg"], tmp_path, "AWA2")
    with pytest.raises(DataError, match="image folder not found.*sunattributes"):
        resolve_image_paths(["images/a/b/c.jpg"], tmp_path / "none", "SUN")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_resolve_image_paths_unreadable(tmp_path):
    f = tmp_path / "images/a/abbey/x.jpg"
    touch(f)
    f.chmod(0)
    try:
        with pytest.raises(DataError, match="not readable"):
            resolve_image_paths(["/z/images/a/abbey/x.jpg"], tmp_path, "SUN")
    finally:
        f.chmod(0o644)


def test_resolve_real_cub_layout(tmp_path):
    """The real relative paths, with the authors' absolute prefix put back, resolve under a fake tree."""
    sem = read_semantic_dir(shared_dir("CUB"))
    sample = sem.image_files[:: 500]
    for rel in sample:
        touch(tmp_path / rel)
    stored = ["/BS/Deep_Fragments/work/MSc/CUB_200_2011/" + rel for rel in sample]
    assert resolve_image_paths(stored, tmp_path, "CUB") == [(tmp_path / r).resolve() for r in sample]
