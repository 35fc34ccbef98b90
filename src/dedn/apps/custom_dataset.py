"""A dataset of one's own: a folder of class folders and a class-by-attribute table, turned into the semantic
side of a feature store (classes, attributes, splits, validation classes, semantic vectors), so that
``dedn extract --images DIR --classes TABLE --unseen ...`` makes a store every command can train on.

The splits follow the xlsa17 "proposed split": the unseen classes' images are all test images; each seen class
keeps ``test_fraction`` of its images (at least one, where it has two or more) as test-seen images and trains
on the rest; ``val_fraction`` of the seen classes are the validation classes the validated protocol holds out.
Without a word-vector file each attribute's semantic vector is its one-hot row (the methods learn the vectors
from there).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dedn.apps.class_files import load_class_definitions
from dedn.data.semantics import load_word_vectors, normalize_rows
from dedn.data.store import SemanticSide
from dedn.errors import DataError


@dataclass(frozen=True)
class CustomSplit:
    """How a dataset of one's own is split.

    Attributes:
        unseen: the classes (folder names) that have no training image: the zero-shot classes.
        test_fraction: the share of each seen class's images kept for the test-seen split.
        val_fraction: the share of the seen classes held out as validation classes (at least one).
        seed: the draws of both.
    """

    unseen: Sequence[str]
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    seed: int = 0


def table_attribute_names(path: str | Path) -> list[str]:
    """The attribute names of a class table: a CSV's header after its first cell, or a JSON file's keys (the
    attribute names of its first class, or ``attribute_1..D`` for classes given as plain vectors).

    Raises:
        DataError: naming the file, when it cannot be read or names no attribute.
    """
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                names = [c.strip() for c in next(csv.reader(fh), [])[1:]]
        elif path.suffix.lower() == ".json":
            first = next(iter(json.loads(path.read_text(encoding="utf-8")).values()), None)
            names = list(first) if isinstance(first, dict) else [f"attribute_{i + 1}" for i in range(len(first or []))]
        else:
            raise DataError(f"{path}: a class table must be a .csv or .json file")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise DataError(f"{path}: unreadable class table ({exc})") from None
    if not names or not all(names):
        raise DataError(f"{path}: the class table names no attributes (or has an empty attribute name)")
    return names


def custom_semantic_side(folder_classes: Sequence[str], labels: np.ndarray, table: str | Path, split: CustomSplit,
                         word_vectors: str | Path | None = None, name: str | None = None) -> SemanticSide:
    """The semantic side of images in ``folder_classes`` (their ``labels``) described by the class ``table``.

    Raises:
        DataError: a folder class missing from the table (or a table class without images), an unseen class
            that is no folder class, fewer than two seen or one unseen class, a fraction outside (0, 1), or
            word vectors of another attribute count. Every check runs before any feature is extracted.
    """
    table = Path(table)
    attributes = table_attribute_names(table)
    names, att = load_class_definitions(table, attributes)
    missing = [c for c in folder_classes if c not in names]
    extra = [c for c in names if c not in folder_classes]
    if missing or extra:
        what = f"no row for the image folder(s) {missing[:5]}" if missing else f"rows for {extra[:5]} without images"
        raise DataError(f"{table}: {what}; the table needs one row per class folder")
    att = att[[names.index(c) for c in folder_classes]]
    unseen = _unseen_mask(folder_classes, split)
    trainval, test_seen, test_unseen, val_classes = _splits(np.asarray(labels), unseen, split)
    d = len(attributes)
    w2v = np.eye(d, dtype=np.float32) if word_vectors is None else load_word_vectors(word_vectors)
    if w2v.shape[0] != d:
        raise DataError(f"{word_vectors}: {w2v.shape[0]} word vectors for the {d} attributes of {table}")
    return SemanticSide(att=normalize_rows(att), original_att=att, w2v=w2v,
                        trainval_loc=trainval, test_seen_loc=test_seen, test_unseen_loc=test_unseen,
                        class_names=list(folder_classes), attribute_names=attributes, val_classes=val_classes,
                        name=name)


def _unseen_mask(classes: Sequence[str], split: CustomSplit) -> np.ndarray:
    unknown = [c for c in split.unseen if c not in classes]
    if unknown:
        raise DataError(f"--unseen: {unknown[:5]} are no class folders (classes: {', '.join(list(classes)[:8])}"
                        f"{', ...' if len(classes) > 8 else ''})")
    mask = np.isin(np.asarray(classes), np.asarray(list(split.unseen)))
    if mask.sum() < 1 or (~mask).sum() < 2:
        raise DataError(f"--unseen: {int(mask.sum())} unseen and {int((~mask).sum())} seen classes; zero-shot "
                        "learning needs at least one unseen and two seen classes")
    for what, value in (("--test-fraction", split.test_fraction), ("--val-fraction", split.val_fraction)):
        if not 0.0 < value < 1.0:
            raise DataError(f"{what} must be between 0 and 1, got {value}")
    return mask


def _splits(labels: np.ndarray, unseen: np.ndarray,
            split: CustomSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """trainval, test-seen and test-unseen image indices and the validation classes."""
    rng = np.random.default_rng(split.seed)
    trainval, test_seen = [], []
    for c in np.flatnonzero(~unseen):
        images = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(split.test_fraction * images.size)) if images.size >= 2 else 0
        test_seen.append(images[:n_test])
        trainval.append(images[n_test:])
    seen_classes = np.flatnonzero(~unseen)
    n_val = max(1, round(split.val_fraction * seen_classes.size))
    val_classes = np.sort(rng.choice(seen_classes, size=min(n_val, seen_classes.size - 1), replace=False))
    test_unseen = np.flatnonzero(np.isin(labels, np.flatnonzero(unseen)))
    return (np.sort(np.concatenate(trainval)), np.sort(np.concatenate(test_seen)), test_unseen,
            val_classes.astype(np.int64))
