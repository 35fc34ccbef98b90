"""The dataset container every part of dedn works on, its checks, and the honest validation split.

A :class:`ZSLData` holds one benchmark: region feature maps (a :class:`dedn.data.sources.FeatureSource`: a
:class:`dedn.data.store.FeatureStore` read from disk, an HDF5 file, generated maps, or an in-memory array,
wrapped when the dataset is made), labels, the xlsa17 split locations, class attributes and attribute semantic
vectors. Readers of real files (:mod:`dedn.data.xlsa17`, :mod:`dedn.data.store`), the generated benchmarks
(:mod:`dedn.data.synthetic`, :mod:`dedn.data.imagebench`) all produce one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from dedn.data.sources import ArrayFeatures, FeatureSource
from dedn.errors import DataError


def data_fingerprint(data: ZSLData) -> str:
    """A hash of what a run trains and evaluates on: labels, splits, class attributes, semantic vectors,
    feature shape and, where the feature source has one (a feature store), the identity of its contents.

    Recorded with every checkpoint; resuming on data with another fingerprint is refused.
    """
    import hashlib
    import json

    h = hashlib.sha256()
    for arr in (data.labels, data.trainval_loc, data.test_seen_loc, data.test_unseen_loc, data.att, data.w2v):
        a = np.ascontiguousarray(arr)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    h.update(json.dumps([list(data.features.shape), str(data.features.identity),
                         data.provenance.get("generator"), data.provenance.get("config")],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


@dataclass
class ZSLData:
    """One GZSL benchmark: features, labels, splits and the semantic side.

    Attributes:
        name: dataset name (``"CUB"``, ``"SUN"``, ``"AWA2"``, ``"synthetic"``, ...).
        features: (N, C, h, w) feature maps, a :class:`~dedn.data.sources.FeatureSource`; a numpy array or an
            h5py dataset given here is wrapped once in an :class:`~dedn.data.sources.ArrayFeatures`.
        labels: (N,) int64 class index of each image, 0-based.
        att: (K, D) float32 class attributes in dataset attribute order (xlsa17 ``att`` transposed).
        w2v: (D, G) float32 semantic vector of each attribute.
        trainval_loc, test_seen_loc, test_unseen_loc: int64 image indices, 0-based, disjoint.
        class_names, attribute_names: K and D names.
        val_classes: xlsa17 ``valclasses1`` class indices (a subset of the seen classes) used to build
            the validation split, or ``None`` when the dataset has none.
        clusters: the dataset's own attribute clusters (name -> sorted attribute indices), for generated
            benchmarks; ``None`` for real datasets, whose clusters come from :mod:`dedn.data.clusters`.
        source: where the data came from (file path or generator), used in error messages.
        provenance: free-form description (backbone, image size, generator seed, ...).
        class_ids: the dataset class index of each class when this is a task over a subset of the
            dataset's classes (the validation task); ``None`` when the classes are the dataset's own.
    """

    name: str
    features: FeatureSource
    labels: np.ndarray
    att: np.ndarray
    w2v: np.ndarray
    trainval_loc: np.ndarray
    test_seen_loc: np.ndarray
    test_unseen_loc: np.ndarray
    class_names: list[str]
    attribute_names: list[str]
    val_classes: np.ndarray | None = None
    clusters: dict[str, np.ndarray] | None = None
    source: str = "<memory>"
    provenance: dict[str, Any] = field(default_factory=dict)
    class_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.features, FeatureSource):
            self.features = ArrayFeatures(self.features, where=self.source)

    # ------------------------------------------------------------------ derived facts
    @property
    def n_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.att.shape[0])

    @property
    def n_attributes(self) -> int:
        return int(self.att.shape[1])

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of one feature map."""
        return tuple(int(s) for s in self.features.shape[1:])  # type: ignore[return-value]

    @property
    def seen_classes(self) -> np.ndarray:
        """Sorted classes that have trainval images."""
        return np.unique(self.labels[self.trainval_loc])

    @property
    def unseen_classes(self) -> np.ndarray:
        """Sorted classes of the test_unseen images."""
        return np.unique(self.labels[self.test_unseen_loc])

    @property
    def seen_mask(self) -> np.ndarray:
        """(K,) bool, True for seen classes."""
        mask = np.zeros(self.n_classes, dtype=bool)
        mask[self.seen_classes] = True
        return mask

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check every shape and split; raise :class:`DataError` naming ``source`` and the problem."""
        src = self.source
        shape = tuple(self.features.shape)
        if len(shape) != 4:
            raise DataError(f"{src}: feature maps must have shape (N, C, h, w), got {shape}")
        n = self.labels.shape[0]
        if self.labels.ndim != 1:
            raise DataError(f"{src}: labels must be one-dimensional, got shape {self.labels.shape}")
        if shape[0] != n:
            raise DataError(f"{src}: {shape[0]} feature maps but {n} labels")
        if self.att.ndim != 2:
            raise DataError(f"{src}: class attributes must be a (K, D) matrix, got shape {self.att.shape}")
        k, d = self.att.shape
        if self.w2v.ndim != 2 or self.w2v.shape[0] != d:
            raise DataError(
                f"{src}: semantic vectors have shape {self.w2v.shape} but the class attributes have {d} "
                f"attributes: expected ({d}, G)"
            )
        if not np.isfinite(self.att).all():
            raise DataError(f"{src}: class attributes contain NaN or infinite values")
        if not np.isfinite(self.w2v).all():
            raise DataError(f"{src}: semantic vectors contain NaN or infinite values")
        if len(self.class_names) != k:
            raise DataError(f"{src}: {len(self.class_names)} class names for {k} classes")
        if len(self.attribute_names) != d:
            raise DataError(f"{src}: {len(self.attribute_names)} attribute names for {d} attributes")
        # A task over a subset of the classes (class_ids set) marks images outside it with -1.
        low = -1 if self.class_ids is not None else 0
        if n and (self.labels.min() < low or self.labels.max() >= k):
            bad = self.labels[(self.labels < low) | (self.labels >= k)]
            raise DataError(
                f"{src}: labels must lie in 0..{k - 1} (K = {k} classes); found {bad[:5].tolist()}"
            )
        splits = {
            "trainval_loc": self.trainval_loc,
            "test_seen_loc": self.test_seen_loc,
            "test_unseen_loc": self.test_unseen_loc,
        }
        for key, loc in splits.items():
            if loc.ndim != 1 or loc.size == 0:
                raise DataError(f"{src}: split {key} is empty or not one-dimensional")
            if loc.min() < 0 or loc.max() >= n:
                hint = (" (its largest index is N: were the indices written 1-based? This layout is 0-based, "
                        "subtract 1)" if loc.max() == n and loc.min() >= 1 else "")
                raise DataError(f"{src}: split {key} holds indices outside 0..{n - 1}{hint}")
            if np.unique(loc).size != loc.size:
                raise DataError(f"{src}: split {key} lists some images twice")
        if low < 0:
            used = np.concatenate(list(splits.values()))
            if (self.labels[used] < 0).any():
                raise DataError(f"{src}: images of the task's splits carry no task label (-1)")
        names = list(splits)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                common = np.intersect1d(splits[a], splits[b])
                if common.size:
                    raise DataError(
                        f"{src}: splits {a} and {b} share {common.size} images (first {common[:3].tolist()})"
                    )
        seen = set(np.unique(self.labels[self.trainval_loc]).tolist())
        test_seen = set(np.unique(self.labels[self.test_seen_loc]).tolist())
        unseen = set(np.unique(self.labels[self.test_unseen_loc]).tolist())
        if not test_seen <= seen:
            raise DataError(f"{src}: test_seen_loc holds classes without trainval images: "
                            f"{sorted(test_seen - seen)[:5]}")
        if seen & unseen:
            all_locs = np.concatenate(list(splits.values()))
            hint = ("; no split uses image index 0: the *_loc indices look 1-based, and this layout is 0-based "
                    "(subtract 1)" if all_locs.min() >= 1 else "")
            raise DataError(f"{src}: classes {sorted(seen & unseen)[:5]} are both seen (trainval) and unseen "
                            f"(test_unseen){hint}")
        if self.val_classes is not None and not set(np.asarray(self.val_classes).tolist()) <= seen:
            raise DataError(f"{src}: validation classes must be seen classes")

    def check_features_finite(self, index: np.ndarray) -> None:
        """Raise :class:`DataError` when any of the given feature maps holds NaN or inf."""
        chunk = np.asarray(self.features[np.sort(index)])
        if not np.isfinite(chunk).all():
            bad = np.sort(index)[~np.isfinite(chunk.reshape(chunk.shape[0], -1)).all(axis=1)]
            raise DataError(f"{self.source}: feature maps of images {bad[:5].tolist()} hold NaN or infinite "
                            "values")

    # ------------------------------------------------------------------ derived datasets
    def validation_split(self, seen_fraction: float = 0.2, seed: int = 0) -> ZSLData:
        """The honest validation task, built from trainval images and trainval classes only.

        The task's classes are the trainval classes and nothing else: the test-unseen classes are not
        candidates, and their attributes never reach a model trained or selected on this task. Seen: the
        trainval classes outside ``val_classes``; ``seen_fraction`` of each one's images (at least one when
        it has two or more) are held out as validation-seen images, the rest are the training images.
        Unseen: the ``val_classes``, with all their trainval images as validation-unseen images. Test
        images are never touched.

        The returned dataset has K' = (number of trainval classes) classes, renumbered 0..K'-1 in dataset
        order; ``class_ids`` maps them back to dataset class indices. Images outside the task keep the
        label -1. ``provenance["validation_task"]`` lists the task's seen and unseen classes and the
        dataset's test-unseen classes as dataset class indices, so their disjointness can be checked.
        """
        if self.val_classes is None or len(self.val_classes) == 0:
            raise DataError(f"{self.source}: no validation classes (xlsa17 valclasses1) are defined, so the "
                            "validated protocol has no validation task: pass data.semantic_dir=XLSA17_FOLDER (its "
                            "att_splits.mat lists them) or choose eval.protocol=published or fixed")
        if not 0.0 < seen_fraction < 1.0:
            raise DataError(f"validation seen_fraction must be in (0, 1), got {seen_fraction}")
        rng = np.random.default_rng(seed)
        val_classes = np.unique(np.asarray(self.val_classes))
        tv = np.asarray(self.trainval_loc)
        tv_labels = self.labels[tv]
        is_val_unseen = np.isin(tv_labels, val_classes)
        val_unseen = tv[is_val_unseen]
        train, val_seen = [], []
        for c in np.unique(tv_labels[~is_val_unseen]):
            idx = tv[tv_labels == c]
            idx = idx[rng.permutation(idx.size)]
            n_hold = int(round(seen_fraction * idx.size))
            if idx.size >= 2:
                n_hold = min(max(n_hold, 1), idx.size - 1)
            else:
                n_hold = 0
            val_seen.append(idx[:n_hold])
            train.append(idx[n_hold:])
        train_loc = np.sort(np.concatenate(train))
        val_seen_loc = np.sort(np.concatenate(val_seen))
        if val_seen_loc.size == 0 or val_unseen.size == 0:
            raise DataError(f"{self.source}: the validation split is empty (val-seen {val_seen_loc.size}, "
                            f"val-unseen {val_unseen.size} images)")
        test = np.concatenate([self.test_seen_loc, self.test_unseen_loc])
        leak = np.intersect1d(np.concatenate([train_loc, val_seen_loc, val_unseen]), test)
        if leak.size:  # cannot happen when validate() passed, kept as a guard for hand-made splits
            raise DataError(f"{self.source}: the validation split would leak {leak.size} test images")
        # Restrict the class space to the trainval classes, renumbered in dataset order.
        task_classes = np.unique(tv_labels)
        new_label = np.full(self.n_classes, -1, dtype=np.int64)
        new_label[task_classes] = np.arange(task_classes.size)
        labels = np.full_like(np.asarray(self.labels, dtype=np.int64), -1)
        labels[tv] = new_label[tv_labels]
        own_ids = self.class_ids if self.class_ids is not None else np.arange(self.n_classes)
        task = {
            "seen_classes": own_ids[np.setdiff1d(task_classes, val_classes)].tolist(),
            "unseen_classes": own_ids[val_classes].tolist(),
            "test_unseen_classes": own_ids[self.unseen_classes].tolist(),
        }
        return replace(
            self,
            labels=labels,
            att=self.att[task_classes],
            class_names=[self.class_names[c] for c in task_classes],
            trainval_loc=train_loc,
            test_seen_loc=val_seen_loc,
            test_unseen_loc=np.sort(val_unseen),
            val_classes=None,
            class_ids=own_ids[task_classes],
            provenance={**self.provenance, "split": "validation", "validation_seed": seed,
                        "validation_seen_fraction": seen_fraction, "validation_task": task},
        )
