"""A dataset of one's own: images, a class-by-attribute table and a class split file, checked and turned into
the semantic side of a feature store, so that ``dedn extract --images ... --attributes ATT.csv --splits
SPLITS.csv`` makes a store that ``dedn train data.path=STORE`` trains on (validated protocol included).

The three inputs:

- images: a folder with one sub-folder per class, or a CSV with the header ``path,class`` and an optional
  ``split`` column (paths relative to the CSV's folder; other columns are ignored). ``split`` is ``trainval``
  or ``test`` for a seen class's image; an unseen class's images are all test images (``test`` or empty).
- ``ATT.csv``: the header names the attributes after its first cell; then one row per class, its name and one
  number per attribute.
- ``SPLITS.csv``: the header ``class,split``, then one row per class with split ``train``, ``val`` or ``test``,
  as xlsa17 names them: train and val classes are the seen classes, val the validation classes the validated
  protocol holds out, test the unseen (zero-shot) classes.

Without a split column each seen class keeps ``test_fraction`` of its images (seeded; at least one where it has
two or more) as test-seen images. Attribute groups (the fine-grained expert's clusters) come from an optional
cluster file (:func:`dedn.data.clusters.load_cluster_file`, e.g. a CSV ``attribute,group``). Without a
word-vector file each attribute's semantic vector is its one-hot row. Unreadable images are refused, all
listed at once. Every check runs before a backbone is built or a feature extracted.
"""

from __future__ import annotations

import csv
import difflib
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dedn.checks import ATTRIBUTE_VALUE, OPEN_FRACTION, check
from dedn.data.clusters import load_cluster_file
from dedn.data.semantics import load_word_vectors, normalize_rows
from dedn.data.store import SemanticSide
from dedn.data.xlsa17 import canonical_dataset
from dedn.errors import DataError
from dedn.features.extract import find_bad_images, list_image_folder

#: The class splits of SPLITS.csv, as xlsa17 names them.
CLASS_SPLITS = ("train", "val", "test")
#: The image splits an image CSV may give.
IMAGE_SPLITS = ("trainval", "test")


@dataclass(frozen=True)
class CustomInputs:
    """The files of a dataset of one's own and how its seen images are split.

    Attributes:
        images: a folder of class folders, or a CSV ``path,class[,split]``.
        attributes: the class-by-attribute CSV.
        splits: the ``class,split`` CSV.
        groups: optional attribute groups (a cluster file: CSV ``attribute,group``, YAML or JSON).
        word_vectors: optional semantic vectors, one row per attribute (default: one-hot).
        test_fraction: each seen class's share of test-seen images, where the image CSV gives no split.
        seed: the draw of that split.
    """

    images: Path
    attributes: Path
    splits: Path
    groups: Path | None = None
    word_vectors: Path | None = None
    test_fraction: float = 0.2
    seed: int = 0


@dataclass(frozen=True)
class CustomDataset:
    """A checked dataset of one's own: the image files, their labels and the store's semantic side."""

    paths: list[str]
    labels: np.ndarray
    side: SemanticSide


def read_custom_dataset(inputs: CustomInputs, name: str | None = None, num_workers: int = 2,
                        progress: bool = True) -> CustomDataset:
    """Read and check every input of a dataset of one's own, decoding every image once (no backbone). ``name``
    is the dataset's name in the store (a built-in benchmark's name gets " (own data)" added).

    Raises:
        DataError: naming the file and the problem: a class in one file and not another, a class without
            images, a non-numeric or constant attribute column, duplicate classes, attributes or image paths,
            no unseen or no validation class, an unknown split, unreadable images.
    """
    check("--test-fraction", inputs.test_fraction, OPEN_FRACTION, error=DataError)
    classes, attributes, values = read_attribute_table(inputs.attributes)
    class_split = read_class_splits(inputs.splits, classes, inputs.attributes)
    paths, labels, image_split = _read_images(inputs.images, classes, inputs.attributes)
    unseen = np.asarray([class_split[c] == "test" for c in classes])
    trainval, test_seen, test_unseen = _image_splits(labels, unseen, image_split, inputs, classes)
    d = len(attributes)
    w2v = np.eye(d, dtype=np.float32) if inputs.word_vectors is None else load_word_vectors(inputs.word_vectors)
    if w2v.shape[0] != d:
        raise DataError(f"{inputs.word_vectors}: {w2v.shape[0]} word vectors for the {d} attributes of "
                        f"{inputs.attributes}; give one row per attribute, in its column order")
    clusters = None if inputs.groups is None else load_cluster_file(inputs.groups, attributes)
    bad = find_bad_images(paths, num_workers, progress)
    if bad:
        raise DataError(f"{inputs.images}: {len(bad)} of {len(paths)} images cannot be read (truncated, corrupt or "
                        "not an image); fix them or remove them from the images, then run again:\n  "
                        + "\n  ".join(bad))
    if canonical_dataset(name):  # a name like "cub" would select CUB's built-in clusters and reference quirks
        name = f"{name} (own data)"
    val = np.asarray([k for k, c in enumerate(classes) if class_split[c] == "val"], dtype=np.int64)
    side = SemanticSide(att=normalize_rows(values), original_att=values, w2v=w2v, trainval_loc=trainval,
                        test_seen_loc=test_seen, test_unseen_loc=test_unseen, class_names=classes,
                        attribute_names=attributes, val_classes=val, clusters=clusters, image_files=paths, name=name)
    return CustomDataset(paths, labels, side)


def _rows(path: Path, what: str) -> list[list[str]]:
    """The non-empty rows of a CSV, cells stripped (a spreadsheet's byte-order mark dropped)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = [[c.strip() for c in row] for row in csv.reader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the {what} ({exc})") from None
    rows = [r for r in rows if any(r)]
    if len(rows) < 2:
        raise DataError(f"{path}: the {what} needs a header row and at least one row under it")
    return rows


def _duplicates(names: Sequence[str]) -> list[str]:
    return [n for n, k in Counter(names).items() if k > 1]


def _listed(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(map(repr, names[:n])) + (f" and {len(names) - n} more" if len(names) > n else "")


def read_attribute_table(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Class names, attribute names and the (K, D) float32 values of a class-by-attribute CSV.

    Raises:
        DataError: a missing or duplicate class or attribute name, a row of another length, a value that is no
            finite number, or a column with one value for every class (it tells no class apart).
    """
    path = Path(path)
    header, *body = _rows(path, "attribute table")
    attributes = header[1:]
    if not attributes or not all(attributes):
        raise DataError(f"{path}: the header needs a first cell (e.g. 'class') and then one name per attribute "
                        "column, none empty")
    for what, names in (("attribute", attributes), ("class", [r[0] for r in body])):
        if _duplicates(names):
            raise DataError(f"{path}: duplicate {what} names {_listed(_duplicates(names))}; each must be unique")
    values = np.zeros((len(body), len(attributes)), dtype=np.float64)
    bad: dict[str, str] = {}
    for i, row in enumerate(body):
        if not row[0] or len(row) != len(header):
            raise DataError(f"{path}: row {i + 2} ({row[0] or 'no class name'!r}) has {len(row) - 1} values for "
                            f"{len(attributes)} attributes; give a class name and one number per attribute")
        for j, cell in enumerate(row[1:]):
            try:
                values[i, j] = float(cell)
                ok = ATTRIBUTE_VALUE.test(values[i, j])
            except ValueError:
                ok = False
            if not ok and attributes[j] not in bad:
                bad[attributes[j]] = f"{row[0]!r}: {cell!r}"
    if bad:
        shown = "; ".join(f"{a!r} (class {where})" for a, where in list(bad.items())[:5])
        raise DataError(f"{path}: attribute columns that are not all numbers: {shown}; every value must be a finite "
                        "number (|value| <= 1e6)")
    constant = [a for j, a in enumerate(attributes) if np.ptp(values[:, j]) == 0]
    if constant:
        raise DataError(f"{path}: attribute columns with the same value for every class: {_listed(constant)}; they "
                        "tell no class apart: remove them")
    return [r[0] for r in body], attributes, values.astype(np.float32)


def _header_index(path: Path, header: list[str], required: Sequence[str], optional: Sequence[str] = ()
                  ) -> dict[str, int]:
    """Column positions of the named columns (case-insensitive); a missing required one is an error."""
    low = [h.lower() for h in header]
    missing = [c for c in required if c not in low]
    if missing:
        raise DataError(f"{path}: the header needs the columns {', '.join(required)} (found {', '.join(header)})")
    return {c: low.index(c) for c in (*required, *optional) if c in low}


def _cell(row: list[str], cols: dict[str, int], column: str) -> str:
    """The row's cell of a named column; empty where the column or the cell is missing."""
    return row[cols[column]] if column in cols and cols[column] < len(row) else ""


def _mismatch(names: Sequence[str], known: Sequence[str]) -> str:
    """The names not in ``known``, each with a close known name where there is one."""
    shown = []
    for n in names[:5]:
        close = difflib.get_close_matches(n, list(known), n=1, cutoff=0.6)
        shown.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(shown) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def read_class_splits(path: str | Path, classes: Sequence[str], attributes: str | Path) -> dict[str, str]:
    """``class -> train | val | test`` of a ``class,split`` CSV that names exactly the classes of the attribute
    table ``attributes``.

    Raises:
        DataError: an unknown split, a class listed twice, a class in one file and not the other, no unseen
            (test) class, no validation (val) class or no other seen (train) class.
    """
    path = Path(path)
    header, *body = _rows(path, "class split file")
    cols = _header_index(path, header, ("class", "split"))
    split: dict[str, str] = {}
    for n, row in enumerate(body, start=2):
        name, value = _cell(row, cols, "class"), _cell(row, cols, "split")
        if value.lower() not in CLASS_SPLITS:
            raise DataError(f"{path}: row {n} ({name!r}) has split {value!r}; use train, val or test (train and "
                            "val: seen classes, val also the validation classes; test: unseen classes)")
        if name in split:
            raise DataError(f"{path}: class {name!r} is listed twice; give each class one row")
        split[name] = value.lower()
    extra = [c for c in split if c not in classes]
    if extra:
        raise DataError(f"{path}: classes {_mismatch(extra, classes)} are not in {attributes}; both files must "
                        "name the same classes")
    missing = [c for c in classes if c not in split]
    if missing:
        raise DataError(f"{path}: no row for the classes {_listed(missing)} of {attributes}; both files must "
                        "name the same classes")
    counts = Counter(split.values())
    for wanted, why in (("test", "no unseen class: mark at least one class test (its images are never trained on)"),
                        ("val", "no validation class: mark at least one seen class val (the validated protocol "
                                "holds those out to choose the epochs and gamma)"),
                        ("train", "no train class: the seen classes other than the val ones are marked train")):
        if not counts[wanted]:
            raise DataError(f"{path}: {why}")
    return split


def _read_images(images: Path, classes: Sequence[str], attributes: Path) -> tuple[list[str], np.ndarray,
                                                                                   list[str] | None]:
    """Image paths, their class indices into ``classes`` and their splits (None: the CSV gives none)."""
    if Path(images).is_dir():
        paths, folder_labels, folders = list_image_folder(images)
        names = [folders[k] for k in folder_labels]
        image_split = None
    else:
        paths, names, image_split = _read_image_csv(Path(images))
    unknown = sorted({n for n in names if n not in classes})
    if unknown:
        raise DataError(f"{images}: classes {_mismatch(unknown, classes)} have no row in {attributes}; both must "
                        "name the same classes")
    index = {c: k for k, c in enumerate(classes)}
    labels = np.asarray([index[n] for n in names], dtype=np.int64)
    empty = [c for k, c in enumerate(classes) if not (labels == k).any()]
    if empty:
        raise DataError(f"{images}: no images of the classes {_listed(empty)} of {attributes}; give every class "
                        "images, or remove its rows")
    return paths, labels, image_split


def _read_image_csv(path: Path) -> tuple[list[str], list[str], list[str] | None]:
    """Paths (relative ones resolved against the CSV's folder), class names and splits of an image CSV."""
    if not path.is_file():
        raise DataError(f"{path}: no such folder or CSV; --images takes a folder of class folders or a CSV with "
                        "the columns path,class[,split]")
    header, *body = _rows(path, "image list")
    cols = _header_index(path, header, ("path", "class"), ("split",))
    paths, names, splits = [], [], []
    for n, row in enumerate(body, start=2):
        file, name, split = (_cell(row, cols, c) for c in ("path", "class", "split"))
        if not file or not name:
            raise DataError(f"{path}: row {n} needs a path and a class, got {row}")
        if split.lower() not in ("", *IMAGE_SPLITS):
            raise DataError(f"{path}: row {n} ({file}) has split {split!r}; use trainval or test (or leave it empty "
                            "for an unseen class's image)")
        paths.append(os.path.normpath(path.parent / file))
        names.append(name)
        splits.append(split.lower())
    duplicates = _duplicates(paths)
    if duplicates:
        raise DataError(f"{path}: images listed more than once: {_listed(duplicates)}; list each image once")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{path}: {len(missing)} image files do not exist (paths are relative to the CSV's folder): "
                        f"{_listed(missing)}")
    return paths, names, (splits if "split" in cols else None)


def _image_splits(labels: np.ndarray, unseen: np.ndarray, image_split: list[str] | None, inputs: CustomInputs,
                  classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """trainval, test-seen and test-unseen image indices: from the image CSV's split column, else drawn."""
    is_unseen = unseen[labels]
    if image_split is None:
        rng = np.random.default_rng(inputs.seed)
        test = np.zeros(labels.size, dtype=bool)
        for c in np.flatnonzero(~unseen):
            images = rng.permutation(np.flatnonzero(labels == c))
            n_test = max(1, round(inputs.test_fraction * images.size)) if images.size >= 2 else 0
            test[images[:n_test]] = True
    else:
        given = np.asarray(image_split, dtype=object)
        trained_unseen = np.flatnonzero(is_unseen & (given == "trainval"))
        if trained_unseen.size:
            raise DataError(f"{inputs.images}: row {trained_unseen[0] + 2} puts an image of an unseen (test) class "
                            "in trainval; an unseen class's images are all test images")
        no_split = np.flatnonzero(~is_unseen & (given == ""))
        if no_split.size:
            raise DataError(f"{inputs.images}: row {no_split[0] + 2} gives no split for a seen class's image; with a "
                            "split column, give each seen class's image trainval or test")
        test = given == "test"
    untrained = [classes[c] for c in np.flatnonzero(~unseen) if not (~test & (labels == c)).any()]
    if untrained:
        raise DataError(f"{inputs.images}: the seen classes {_listed(untrained)} have no trainval image; give each "
                        "seen class at least one training image")
    if not (test & ~is_unseen).any():
        raise DataError(f"{inputs.images}: no test image of a seen class; give seen classes two or more images each "
                        "(or mark some test)")
    return (np.flatnonzero(~test & ~is_unseen), np.flatnonzero(test & ~is_unseen), np.flatnonzero(is_unseen))
