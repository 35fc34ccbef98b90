"""Reading the xlsa17 benchmark files (CUB, SUN, AWA2 "proposed split") and finding their images.

An xlsa17 dataset folder holds ``att_splits.mat`` (class names, class-attribute matrix, 1-based split
locations), optionally ``res101.mat`` (image files and 1-based labels, in the row order every feature
file uses), the class lists ``trainvalclasses.txt``, ``testclasses.txt``, ``trainclasses1.txt``,
``valclasses1.txt``, an attribute-name file (CUB ``attributes.txt``, AWA2 ``predicates.txt``, SUN
``attributes.mat``) and the attribute word-vector pickle (``CUB_attribute.pkl`` and friends).
A consolidated ``semantic_{DS}.npz`` (0-based, with image files and labels) is read as well.

:func:`read_semantic_dir` reads and cross-checks all of it into :class:`XLSA17Semantics`, everything
0-based and classes in rows; :func:`to_zsldata` joins that with feature maps into a
:class:`dedn.data.dataset.ZSLData`; :func:`resolve_image_paths` finds the images on the user's machine.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io

from dedn.data.benchmarks import BENCHMARKS, find_benchmark
from dedn.data.dataset import ZSLData
from dedn.data.semantics import load_word_vectors
from dedn.errors import DataError

__all__ = [
    "DATASET_PAGES",
    "EXPECTED_COUNTS",
    "IMAGE_ANCHORS",
    "XLSA17Semantics",
    "canonical_dataset",
    "load_attribute_names",
    "load_class_list",
    "load_res101",
    "read_semantic_dir",
    "resolve_image_paths",
    "to_zsldata",
]

XLSA17_PAGE = ("https://www.mpi-inf.mpg.de/departments/computer-vision-and-machine-learning/research/"
               "zero-shot-learning/zero-shot-learning-the-good-the-bad-and-the-ugly")

#: The xlsa17 proposed split of each benchmark (from the benchmark table, :mod:`dedn.data.benchmarks`).
EXPECTED_COUNTS: dict[str, dict[str, int]] = {name: b.expected_counts() for name, b in BENCHMARKS.items()}

#: Where the relative part of an image path starts in the real res101.mat files (path components).
IMAGE_ANCHORS: dict[str, tuple[str, ...]] = {
    "CUB": ("CUB_200_2011", "images"),
    "SUN": ("images",),
    "AWA2": ("Animals_with_Attributes2", "JPEGImages"),  # res101.mat writes "...2//JPEGImages"
}

#: Official pages to download the images from.
DATASET_PAGES: dict[str, str] = {
    "CUB": "https://www.vision.caltech.edu/datasets/cub_200_2011/ (Caltech-UCSD Birds-200-2011)",
    "SUN": "https://cs.brown.edu/~gmpatter/sunattributes.html (SUN Attribute Database, images archive)",
    "AWA2": "https://cvml.ist.ac.at/AwA2/ (Animals with Attributes 2, AwA2-data.zip)",
}

_EXPECTED_LAYOUT = {
    "CUB": "CUB_200_2011/images/<class>/<image>.jpg",
    "SUN": "images/<letter>/<scene>/<image>.jpg",
    "AWA2": "Animals_with_Attributes2/JPEGImages/<class>/<image>.jpg",
}

_NAME_FILES = ("attributes.txt", "predicates.txt", "attributes.mat", "attribute_names.txt")
_LOC_KEYS = ("trainval_loc", "test_seen_loc", "test_unseen_loc")


def canonical_dataset(name: str | None) -> str | None:
    """``"CUB"``, ``"SUN"`` or ``"AWA2"`` for any usual spelling of those names (the benchmark table's
    aliases, :func:`dedn.data.benchmarks.find_benchmark`), else ``None``."""
    bench = find_benchmark(name)
    return None if bench is None else bench.name


@dataclass
class XLSA17Semantics:
    """The semantic side and the splits of one xlsa17 benchmark, 0-based, classes in rows.

    Attributes:
        name: dataset name (``"CUB"``, ``"SUN"``, ``"AWA2"`` or the folder name for other datasets).
        class_names, attribute_names: K and D names in xlsa17 order.
        att: (K, D) float32, xlsa17 ``att`` transposed (class vectors L2-normalised).
        original_att: (K, D) float32, xlsa17 ``original_att`` transposed (AWA2 has -1 for unknown).
        w2v: (D, G) attribute word vectors, or ``None`` when the folder has none.
        trainval_loc, test_seen_loc, test_unseen_loc: int64 image indices, 0-based, disjoint.
        image_files: N image paths as stored (foreign absolute prefixes included), or ``None``.
        labels: (N,) int64 class of each image, 0-based, or ``None`` without res101.mat / npz.
        seen_classes, unseen_classes: sorted int64 class indices, ``None`` when nothing tells them.
        val_classes: sorted int64 indices of xlsa17 ``valclasses1``, or ``None``.
        source: the folder or file read; files: which file gave which part.
    """

    name: str
    class_names: list[str]
    attribute_names: list[str]
    att: np.ndarray
    original_att: np.ndarray
    w2v: np.ndarray | None
    trainval_loc: np.ndarray
    test_seen_loc: np.ndarray
    test_unseen_loc: np.ndarray
    image_files: list[str] | None = None
    labels: np.ndarray | None = None
    seen_classes: np.ndarray | None = None
    unseen_classes: np.ndarray | None = None
    val_classes: np.ndarray | None = None
    source: str = ""
    files: dict[str, str] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return int(self.att.shape[0])

    @property
    def n_attributes(self) -> int:
        return int(self.att.shape[1])

    @property
    def n_images(self) -> int | None:
        return None if self.labels is None else int(self.labels.shape[0])


# ---------------------------------------------------------------------------------------------- small readers
def _mat_strings(arr: Any) -> list[str]:
    """Strings of a MATLAB cell array / char matrix as loadmat returns it."""
    out = []
    for item in np.asarray(arr, dtype=object).ravel():
        while isinstance(item, np.ndarray):
            if item.size == 0:
                item = ""
                break
            item = item.ravel()[0] if item.dtype == object or item.size == 1 else "".join(item.ravel())
        out.append(str(item).strip())
    return out


def _loadmat(path: Path, variable_names: Sequence[str] | None = None) -> dict[str, Any]:
    try:
        return scipy.io.loadmat(str(path), variable_names=variable_names)
    except NotImplementedError:  # scipy says this for MATLAB v7.3 (HDF5) files
        raise DataError(f"{path}: saved as MATLAB v7.3 (HDF5), which is not read here; re-save it in "
                        "MATLAB with save(file, ..., '-v7') or use the original xlsa17 file") from None
    except Exception as exc:
        raise DataError(f"{path}: not a readable MATLAB file: {exc}") from None


def load_class_list(path: str | Path) -> list[str]:
    """Class names of an xlsa17 class list (``trainvalclasses.txt`` ...), one per line."""
    p = Path(path)
    try:
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise DataError(f"{p}: cannot read class list: {exc}") from None


def load_attribute_names(path: str | Path) -> list[str]:
    """Attribute names from CUB ``attributes.txt`` ("1 has_bill_shape::dagger"), AWA2 ``predicates.txt``
    ("1<TAB>black"), SUN ``attributes.mat`` (cell array ``attributes``) or a plain list, one per line."""
    p = Path(path)
    if p.suffix.lower() == ".mat":
        mat = _loadmat(p)
        keys = [k for k in mat if not k.startswith("__")]
        key = "attributes" if "attributes" in keys else (keys[0] if len(keys) == 1 else None)
        if key is None:
            raise DataError(f"{p}: expected a cell array named 'attributes', found {keys}")
        return _mat_strings(mat[key])
    try:
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{p}: cannot read attribute names: {exc}") from None
    # Drop a leading running number ("12 has_..." / "12\tblack") when every line has one.
    if lines and all(re.match(r"^\d+\s+\S", line) for line in lines):
        lines = [re.split(r"\s+", line, maxsplit=1)[1] for line in lines]
    return lines


def load_res101(path: str | Path, features: bool = False) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """Image files, 0-based labels and (when ``features``) the (N, 2048) pooled features of ``res101.mat``.

    Only the requested variables are read, so the large ``features`` matrix is skipped by default.
    """
    p = Path(path)
    names = ["image_files", "labels"] + (["features"] if features else [])
    mat = _loadmat(p, names)
    missing = [k for k in names if k not in mat]
    if missing:
        raise DataError(f"{p}: missing {missing}; an xlsa17 res101.mat holds image_files, labels, features")
    files = _mat_strings(mat["image_files"])
    raw = np.asarray(mat["labels"]).ravel()
    if raw.size != len(files):
        raise DataError(f"{p}: {len(files)} image files but {raw.size} labels")
    if raw.size and (raw.min() < 1 or not np.allclose(raw, np.round(raw))):
        raise DataError(f"{p}: labels must be 1-based integers (xlsa17), found {raw.min()}")
    labels = np.round(raw).astype(np.int64) - 1
    feats = None
    if features:
        f = np.asarray(mat["features"])
        if f.ndim != 2 or len(files) not in f.shape:
            raise DataError(f"{p}: features of shape {f.shape} do not match {len(files)} images")
        feats = np.ascontiguousarray(f.T if f.shape[1] == len(files) else f, dtype=np.float32)
    return files, labels, feats


# ------------------------------------------------------------------------------------------ parts of a read
@dataclass
class _Raw:
    """What one source gave, before the cross-checks."""

    name: str
    folder: Path
    source: str
    class_names: list[str]
    att: np.ndarray  # (K, D)
    original_att: np.ndarray
    locs: dict[str, np.ndarray]  # 0-based
    image_files: list[str] | None = None
    labels: np.ndarray | None = None
    attribute_names: list[str] | None = None
    w2v: np.ndarray | None = None
    files: dict[str, str] = field(default_factory=dict)


def _loc(raw: Any, key: str, source: str, one_based: bool) -> np.ndarray:
    arr = np.asarray(raw).ravel()
    if arr.size and (arr.dtype.kind not in "iuf" or not np.allclose(arr, np.round(arr))):
        raise DataError(f"{source}: {key} must hold integer image indices")
    # Convert before subtracting: the .mat files store uint16, where 0 - 1 wraps around.
    loc = np.round(arr).astype(np.int64)
    if one_based:
        if loc.size and loc.min() < 1:
            raise DataError(f"{source}: {key} holds index {loc.min()}, but xlsa17 indices are 1-based; "
                            "is this file already 0-based?")
        loc = loc - 1
    return loc


def _read_att_splits(path: Path, name: str) -> _Raw:
    mat = _loadmat(path)
    need = ["allclasses_names", "att", *_LOC_KEYS]
    missing = [k for k in need if k not in mat]
    if missing:
        raise DataError(f"{path}: missing {missing}; use the xlsa17 att_splits.mat of the dataset "
                        f"({XLSA17_PAGE})")
    class_names = _mat_strings(mat["allclasses_names"])
    att = np.asarray(mat["att"], dtype=np.float64)
    if att.ndim != 2 or att.shape[1] != len(class_names):
        raise DataError(f"{path}: att has shape {att.shape} but there are {len(class_names)} class names; "
                        "xlsa17 stores att as (attributes x classes)")
    original = np.asarray(mat.get("original_att", mat["att"]), dtype=np.float64)
    if original.shape != att.shape:
        raise DataError(f"{path}: original_att has shape {original.shape}, att has {att.shape}")
    locs = {k: _loc(mat[k], k, str(path), one_based=True) for k in _LOC_KEYS}
    return _Raw(name=name, folder=path.parent, source=str(path), class_names=class_names, att=att.T,
                original_att=original.T, locs=locs, files={"att": str(path)})


def _read_npz(path: Path, name: str) -> _Raw:
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz file: {exc}") from None
    with z:
        need = ["class_names", "att", *_LOC_KEYS]
        missing = [k for k in need if k not in z.files]
        if missing:
            raise DataError(f"{path}: missing {missing}; a semantic_{{DS}}.npz holds class_names, att, "
                            "trainval_loc, test_seen_loc, test_unseen_loc (0-based) and optionally "
                            "attribute_names, original_att, w2v_att, image_files, labels")
        class_names = [str(s) for s in z["class_names"]]
        att = np.asarray(z["att"], dtype=np.float64)
        if att.ndim != 2 or att.shape[0] != len(class_names):
            raise DataError(f"{path}: att has shape {att.shape} but there are {len(class_names)} class "
                            "names; the .npz stores att as (classes x attributes)")
        original = np.asarray(z["original_att"], dtype=np.float64) if "original_att" in z.files else att
        raw = _Raw(
            name=name, folder=path.parent, source=str(path), class_names=class_names, att=att,
            original_att=original, locs={k: _loc(z[k], k, str(path), one_based=False) for k in _LOC_KEYS},
            files={"att": str(path)},
        )
        if "attribute_names" in z.files:
            raw.attribute_names = [str(s) for s in z["attribute_names"]]
            raw.files["attribute_names"] = str(path)
        if "w2v_att" in z.files:
            raw.w2v = np.asarray(z["w2v_att"])
            raw.files["w2v"] = str(path)
        raw.image_files, raw.labels = _npz_images(z, path)
        if raw.labels is not None:
            raw.files["images"] = str(path)
    return raw


def _npz_images(z: Any, path: Path) -> tuple[list[str] | None, np.ndarray | None]:
    if "labels" not in z.files:
        return None, None
    labels = np.asarray(z["labels"]).ravel()
    if labels.dtype.kind not in "iu":
        raise DataError(f"{path}: labels must be integers (0-based), got dtype {labels.dtype}")
    files = [str(s) for s in z["image_files"]] if "image_files" in z.files else None
    if files is not None and len(files) != labels.size:
        raise DataError(f"{path}: {len(files)} image files but {labels.size} labels")
    return files, labels.astype(np.int64)


def _find_npz(folder: Path, name: str) -> Path | None:
    exact = folder / f"semantic_{name}.npz"
    if exact.is_file():
        return exact
    found = sorted(folder.glob("semantic_*.npz"))
    if len(found) > 1:
        raise DataError(f"{folder}: several semantic_*.npz files ({[f.name for f in found]}); keep one "
                        "per dataset folder or pass the file itself")
    return found[0] if found else None


def _find_w2v(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}_attribute.pkl", folder / "w2v_att.npy"):
        if candidate.is_file():
            return candidate
    found = sorted(folder.glob("*_attribute.pkl"))
    if len(found) > 1:
        raise DataError(f"{folder}: several word-vector pickles ({[f.name for f in found]}); keep the "
                        f"one of {name}, named {name}_attribute.pkl")
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------- public reader
def read_semantic_dir(path: str | Path, dataset: str | None = None) -> XLSA17Semantics:
    """Read and cross-check an xlsa17 dataset folder (or its ``att_splits.mat`` / ``semantic_{DS}.npz``).

    Reads ``att_splits.mat`` (else the ``semantic_*.npz``), image files and labels from ``res101.mat``
    (else the ``.npz`` when present), the class lists, the attribute names and the word-vector pickle.
    ``dataset`` (CUB, SUN, AWA2, any case) defaults to the folder or file name; for those three the
    counts are checked against :data:`EXPECTED_COUNTS`.

    Raises:
        DataError: a file is missing or malformed, indices are out of range or overlap, class lists or
            attribute names disagree with ``att_splits.mat``, counts differ from the benchmark's.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: semantic folder not found; download xlsa17 ({XLSA17_PAGE}) and pass the "
                        "dataset folder that holds att_splits.mat")
    folder = p if p.is_dir() else p.parent
    guess = dataset or (re.sub(r"^semantic_", "", p.stem) if p.is_file() else p.name)
    name = canonical_dataset(guess) or str(guess)

    if p.is_file() and p.suffix.lower() == ".npz":
        raw = _read_npz(p, name)
    elif p.is_file() and p.suffix.lower() == ".mat":
        raw = _read_att_splits(p, name)
    elif p.is_file():
        raise DataError(f"{p}: expected an xlsa17 folder, att_splits.mat or semantic_{{DS}}.npz")
    elif (folder / "att_splits.mat").is_file():
        raw = _read_att_splits(folder / "att_splits.mat", name)
    else:
        npz = _find_npz(folder, name)
        if npz is None:
            raise DataError(f"{folder}: no att_splits.mat (nor semantic_{{DS}}.npz) here; download xlsa17 "
                            f"({XLSA17_PAGE}) and pass the dataset folder, e.g. xlsa17/data/CUB")
        raw = _read_npz(npz, name)

    _add_images(raw)
    _add_attribute_names(raw)
    _add_w2v(raw)
    return _finish(raw)


def _add_images(raw: _Raw) -> None:
    res = raw.folder / "res101.mat"
    if res.is_file():
        raw.image_files, raw.labels, _ = load_res101(res)
        raw.files["images"] = str(res)
    elif raw.labels is None and Path(raw.source).suffix == ".mat":
        npz = _find_npz(raw.folder, raw.name)
        if npz is not None:
            with np.load(npz, allow_pickle=False) as z:
                raw.image_files, raw.labels = _npz_images(z, npz)
                if "class_names" in z.files and [str(s) for s in z["class_names"]] != raw.class_names:
                    raise DataError(f"{npz}: its class names differ from {raw.source}; both files must "
                                    "describe the same dataset in the same class order")
            if raw.labels is not None:
                raw.files["images"] = str(npz)
    if raw.labels is None:
        return
    src = raw.files["images"]
    k = len(raw.class_names)
    if raw.labels.size and (raw.labels.min() < 0 or raw.labels.max() >= k):
        raise DataError(f"{src}: labels must name one of the {k} classes of {raw.source}; found "
                        f"{raw.labels.min()}..{raw.labels.max()} (0-based)")


def _add_attribute_names(raw: _Raw) -> None:
    d = raw.att.shape[1]
    for fname in _NAME_FILES:
        f = raw.folder / fname
        if f.is_file():
            names = load_attribute_names(f)
            if len(names) != d:
                raise DataError(f"{f}: {len(names)} attribute names, but {raw.source} has {d} attributes; "
                                "use the attribute file of the same dataset (CUB attributes.txt, AWA2 "
                                "predicates.txt, SUN attributes.mat) or remove it")
            raw.attribute_names = names
            raw.files["attribute_names"] = str(f)
            return
    if raw.attribute_names is None:
        warnings.warn(f"{raw.folder}: no attribute-name file ({', '.join(_NAME_FILES)}); attributes are "
                      "named attribute_0 ...", stacklevel=3)
        raw.attribute_names = [f"attribute_{i}" for i in range(d)]
    elif len(raw.attribute_names) != d:
        raise DataError(f"{raw.files.get('attribute_names', raw.source)}: {len(raw.attribute_names)} "
                        f"attribute names for {d} attributes")


def _add_w2v(raw: _Raw) -> None:
    f = _find_w2v(raw.folder, raw.name)
    if f is not None:
        raw.w2v = load_word_vectors(f)
        raw.files["w2v"] = str(f)
    if raw.w2v is None:
        return
    d = raw.att.shape[1]
    if raw.w2v.ndim != 2 or raw.w2v.shape[0] != d:
        raise DataError(f"{raw.files['w2v']}: word vectors of shape {raw.w2v.shape} but {raw.source} has {d} "
                        "attributes; use the word-vector file of the same dataset")


def _class_indices(names: list[str], index: dict[str, int], f: Path, source: str) -> np.ndarray:
    unknown = [n for n in names if n not in index]
    if unknown:
        raise DataError(f"{f}: {len(unknown)} classes are not in {source} (first {unknown[:3]}); the class "
                        "lists and att_splits.mat must come from the same xlsa17 dataset folder")
    return np.unique(np.asarray([index[n] for n in names], dtype=np.int64))


def _finish(raw: _Raw) -> XLSA17Semantics:
    src = raw.source
    k = len(raw.class_names)
    if len(set(raw.class_names)) != k:
        raise DataError(f"{src}: class names are not unique")
    locs = raw.locs
    n = None if raw.labels is None else int(raw.labels.size)
    for key, loc in locs.items():
        if loc.size == 0:
            raise DataError(f"{src}: split {key} is empty")
        if loc.min() < 0 or (n is not None and loc.max() >= n):
            raise DataError(f"{src}: split {key} holds image indices outside 0..{(n or 0) - 1} (0-based); "
                            f"{raw.files.get('images', 'the image list')} lists {n} images. Use files from "
                            "the same xlsa17 dataset folder")
        if np.unique(loc).size != loc.size:
            raise DataError(f"{src}: split {key} lists {loc.size - np.unique(loc).size} images twice")
    for i, a in enumerate(_LOC_KEYS):
        for b in _LOC_KEYS[i + 1:]:
            common = np.intersect1d(locs[a], locs[b])
            if common.size:
                raise DataError(f"{src}: splits {a} and {b} share {common.size} images (0-based "
                                f"{common[:3].tolist()}); the splits must be disjoint")

    index = {c: i for i, c in enumerate(raw.class_names)}
    seen = unseen = None
    if raw.labels is not None:
        seen = np.unique(raw.labels[locs["trainval_loc"]])
        unseen = np.unique(raw.labels[locs["test_unseen_loc"]])
        test_seen = np.unique(raw.labels[locs["test_seen_loc"]])
        if np.intersect1d(seen, unseen).size:
            raise DataError(f"{src}: classes {np.intersect1d(seen, unseen)[:5].tolist()} have both trainval "
                            "and test_unseen images")
        if np.setdiff1d(test_seen, seen).size:
            raise DataError(f"{src}: test_seen_loc holds classes without trainval images: "
                            f"{np.setdiff1d(test_seen, seen)[:5].tolist()}")
    for fname, role in (("trainvalclasses.txt", "seen"), ("testclasses.txt", "unseen")):
        f = raw.folder / fname
        if not f.is_file():
            continue
        listed = _class_indices(load_class_list(f), index, f, src)
        have = seen if role == "seen" else unseen
        if have is None:
            if role == "seen":
                seen = listed
            else:
                unseen = listed
        elif not np.array_equal(listed, have):
            diff = [raw.class_names[i] for i in np.setxor1d(listed, have)[:3]]
            raise DataError(f"{f}: lists {listed.size} {role} classes but the splits of {src} give "
                            f"{have.size}; they differ in e.g. {diff}. Use the class lists of the same "
                            "xlsa17 dataset folder")
    val = None
    fval = raw.folder / "valclasses1.txt"
    if fval.is_file():
        val = _class_indices(load_class_list(fval), index, fval, src)
        if seen is not None and np.setdiff1d(val, seen).size:
            raise DataError(f"{fval}: validation classes must be seen classes; "
                            f"{[raw.class_names[i] for i in np.setdiff1d(val, seen)[:3]]} are not")
        ftrain = raw.folder / "trainclasses1.txt"
        if ftrain.is_file() and seen is not None:
            train = _class_indices(load_class_list(ftrain), index, ftrain, src)
            if np.intersect1d(train, val).size or not np.array_equal(np.union1d(train, val), seen):
                raise DataError(f"{ftrain}: trainclasses1 and valclasses1 must split the seen classes into "
                                "two disjoint parts; use the files of the same xlsa17 dataset folder")
    if seen is not None and unseen is not None and np.intersect1d(seen, unseen).size:
        both = [raw.class_names[i] for i in np.intersect1d(seen, unseen)[:5]]
        raise DataError(f"{src}: classes {both} are listed both as seen and as unseen")

    sem = XLSA17Semantics(
        name=raw.name, class_names=list(raw.class_names), attribute_names=list(raw.attribute_names or []),
        att=np.ascontiguousarray(raw.att, dtype=np.float32),
        original_att=np.ascontiguousarray(raw.original_att, dtype=np.float32),
        w2v=raw.w2v, trainval_loc=locs["trainval_loc"], test_seen_loc=locs["test_seen_loc"],
        test_unseen_loc=locs["test_unseen_loc"], image_files=raw.image_files, labels=raw.labels,
        seen_classes=seen, unseen_classes=unseen, val_classes=val, source=src, files=dict(raw.files),
    )
    _check_counts(sem)
    return sem


def _check_counts(sem: XLSA17Semantics) -> None:
    expected = EXPECTED_COUNTS.get(sem.name)
    if expected is None:
        return
    have: dict[str, int | None] = {
        "classes": sem.n_classes, "attributes": sem.n_attributes, "images": sem.n_images,
        "trainval": sem.trainval_loc.size, "test_seen": sem.test_seen_loc.size,
        "test_unseen": sem.test_unseen_loc.size,
        "seen": None if sem.seen_classes is None else sem.seen_classes.size,
        "unseen": None if sem.unseen_classes is None else sem.unseen_classes.size,
    }
    wrong = [f"{key} {have[key]} (expected {value})" for key, value in expected.items()
             if have[key] is not None and have[key] != value]
    if wrong:
        raise DataError(f"{sem.source}: does not match the xlsa17 proposed split of {sem.name}: "
                        f"{', '.join(wrong)}. Use the original xlsa17 files ({XLSA17_PAGE}), or read the "
                        "folder with another dataset name to skip this check for a custom dataset")


# ---------------------------------------------------------------------------------------------- images
def _path_parts(path: str) -> list[str]:
    parts = [s for s in re.split(r"[\\/]+", str(path).strip()) if s not in ("", ".")]
    if parts and re.fullmatch(r"[A-Za-z]:", parts[0]):  # Windows drive
        parts = parts[1:]
    return parts


def _suffixes(parts: list[str], anchors: Sequence[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Relative paths to try, best first: from each known anchor on, then ever shorter tails."""
    out: list[tuple[str, ...]] = []
    for anchor in anchors:
        m = len(anchor)
        starts = [i for i in range(len(parts) - m) if tuple(parts[i:i + m]) == anchor]
        if starts:
            i = starts[-1]
            out.extend(tuple(parts[j:]) for j in range(i, i + m + 1))
    out.extend(tuple(parts[j:]) for j in range(len(parts)))
    return list(dict.fromkeys(out))


def resolve_image_paths(
    image_files: Sequence[str], image_root: str | Path, dataset: str | None
) -> list[Path]:
    """Find each image of ``image_files`` under ``image_root``, whatever prefix the stored paths carry.

    The stored paths (res101.mat) start with the dataset authors' folders. For each one this tries the
    part from the dataset's known anchor on (``CUB_200_2011/images/``, SUN ``images/``,
    ``Animals_with_Attributes2/JPEGImages/``), then ever shorter tails, under ``image_root``. The tail
    length that worked last is tried first, so a whole dataset costs about one lookup per image.

    Raises:
        DataError: once, listing how many images are missing or unreadable, the first few, and where
            to download the dataset and how to lay it out.
    """
    root = Path(image_root).expanduser()
    ds = canonical_dataset(dataset)
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found. {_image_fix(ds, root)}")
    root = root.resolve()
    anchors = [IMAGE_ANCHORS[ds]] if ds else list(IMAGE_ANCHORS.values())
    resolved: list[Path] = []
    missing: list[str] = []
    unreadable: list[str] = []
    keep = None  # number of trailing path components that worked last time
    first_missing = -1
    for n, f in enumerate(image_files):
        parts = _path_parts(f)
        hit = None
        if keep is not None and len(parts) >= keep:
            cand = root.joinpath(*parts[-keep:])
            if cand.is_file():
                hit = cand
        if hit is None:
            for tail in _suffixes(parts, anchors):
                cand = root.joinpath(*tail)
                if cand.is_file():
                    hit, keep = cand, len(tail)
                    break
        if hit is None:
            first_missing = n if not missing else first_missing
            missing.append(str(f))
            resolved.append(root.joinpath(*(_suffixes(parts, anchors) or [("",)])[0]))
            continue
        try:
            ok = os.access(hit, os.R_OK) and hit.stat().st_size > 0
        except OSError:
            ok = False
        if not ok:
            unreadable.append(str(hit))
        resolved.append(hit)
    if missing or unreadable:
        total = len(image_files)
        msg = []
        if missing:
            msg.append(f"{len(missing)} of {total} images not found under {root} (first: "
                       f"{', '.join(missing[:3])}; looked for e.g. {resolved[first_missing]})")
        if unreadable:
            msg.append(f"{len(unreadable)} of {total} images are empty or not readable (first: "
                       f"{', '.join(unreadable[:3])})")
        raise DataError("; ".join(msg) + ". " + _image_fix(ds, root))
    return resolved


def _image_fix(ds: str | None, root: Path) -> str:
    if ds is None:
        return ("Put the images under this folder so that the end of each stored path (class folder and "
                "file name) exists below it.")
    return (f"Download the {ds} images from {DATASET_PAGES[ds]} and extract them so that "
            f"{root}/{_EXPECTED_LAYOUT[ds]} exists, then pass {root} as the image root.")


# ---------------------------------------------------------------------------------------------- container
def to_zsldata(semantics: XLSA17Semantics, features: Any, source: str | Path) -> ZSLData:
    """Join the semantics with N feature maps (a :class:`~dedn.data.sources.FeatureSource`,
    an array or an h5py dataset, in res101.mat image order).

    Raises:
        DataError: no labels or word vectors in the semantics, a count mismatch, or any check of
            :meth:`ZSLData.validate` failing (the message names ``source``).
    """
    src = str(source)
    if semantics.labels is None:
        raise DataError(f"{semantics.source}: no image labels; the folder needs res101.mat (or "
                        "semantic_{DS}.npz) to pair feature maps with classes")
    if semantics.w2v is None:
        raise DataError(f"{semantics.source}: no attribute word vectors; put the dataset's "
                        f"{semantics.name}_attribute.pkl in the folder or give a word-vector file")
    data = ZSLData(
        name=semantics.name,
        features=features,
        labels=semantics.labels.astype(np.int64),
        att=np.asarray(semantics.att, dtype=np.float32),
        w2v=np.asarray(semantics.w2v, dtype=np.float32),
        trainval_loc=semantics.trainval_loc.astype(np.int64),
        test_seen_loc=semantics.test_seen_loc.astype(np.int64),
        test_unseen_loc=semantics.test_unseen_loc.astype(np.int64),
        class_names=list(semantics.class_names),
        attribute_names=list(semantics.attribute_names),
        val_classes=None if semantics.val_classes is None else semantics.val_classes.astype(np.int64),
        source=src,
        provenance={"semantics": semantics.source, **{f"file_{k}": v for k, v in semantics.files.items()}},
    )
    shape = tuple(data.features.shape)
    if len(shape) != 4 or shape[0] != semantics.labels.size:
        raise DataError(f"{src}: feature maps of shape {shape} do not fit {semantics.labels.size} images "
                        f"of {semantics.source}; expected ({semantics.labels.size}, C, h, w)")
    data.validate()
    return data
