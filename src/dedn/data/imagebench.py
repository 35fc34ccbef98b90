"""The built-in rendered image benchmark: "creatures" made of parts, with part masks.

Everything is generated from one seed; no files are needed. Each image shows one creature — a body, a
head, wings, a tail and legs — on a habitat background, with pose, scale, position and colour jitter,
background clutter, occluders and pixel noise. Attributes are named binary attributes grouped like
CUB's (``"head_color::red"``, ``"wing_pattern::striped"``, ``"habitat::water"``): exactly one value per
group per image. Most groups belong to one part (and so to one region of the image); ``size``,
``body_shape`` and ``habitat`` are global.

A class is a distribution over values per group: mostly one dominant value, sometimes a second value
with some probability. The class attribute vector is the expected value of the one-hot attributes, so it
is continuous in [0, 1] like CUB's class-level percentages, and each image samples its own values from
its class. Classes come in families (a base combination with a few groups changed), so some classes are
close relatives, which is what makes zero-shot transfer non-trivial.

Rendering is lazy and deterministic: image ``i`` is drawn from ``np.random.default_rng([seed, i])``
and its sampled attribute values, so it is identical whether rendered alone or in a sequence.

Typical use::

    bench = make_image_benchmark(ImageBenchConfig(seed=0))
    pixels, masks = bench.render(0)           # (H, W, 3) uint8, (P, H, W) bool
    data = to_zsldata(bench, features)        # features extracted from bench.images
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dedn.data.dataset import ZSLData
from dedn.data.imagebench_render import render_creature
from dedn.data.imagebench_spec import PALETTE, PART_NAMES, ImageBenchConfig, group_definitions
from dedn.data.semantics import normalize_rows
from dedn.errors import ConfigError, DataError

# Re-exported: the benchmark's specification is part of its public face.
__all__ = ["PALETTE", "PART_NAMES", "ImageBenchConfig", "ImageBenchmark", "LazyImages", "make_image_benchmark",
           "save_images", "to_zsldata"]

# ---------------------------------------------------------------------------------------------- benchmark


@dataclass
class ImageBenchmark:
    """A generated image benchmark: metadata in memory, pixels rendered on demand.

    Attributes:
        config: the generating config.
        labels: (N,) int64 class of each image (images are stored class by class).
        class_names, attribute_names, part_names: K, D and P names.
        groups: (group name, part name or None, values) per attribute group, in attribute order.
        attribute_groups: group name -> attribute indices (mutually exclusive values).
        clusters: cluster name -> sorted attribute indices: one cluster per part plus ``"global"``.
        attribute_part: (D,) int64 part index of each attribute, -1 for global attributes.
        class_att: (K, D) float32 expected attribute values of each class (per group a distribution).
        image_values: (N, n_groups) int64 sampled value index of each group for each image.
        image_att: (N, D) float32 one-hot-per-group attribute vector of each image.
        trainval_loc, test_seen_loc, test_unseen_loc: int64 image indices (xlsa17 layout).
        val_classes: sorted seen classes used as validation-unseen classes.
    """

    config: ImageBenchConfig
    labels: np.ndarray
    class_names: list[str]
    attribute_names: list[str]
    part_names: list[str]
    groups: list[tuple[str, str | None, tuple[str, ...]]]
    attribute_groups: dict[str, np.ndarray]
    clusters: dict[str, np.ndarray]
    attribute_part: np.ndarray
    class_att: np.ndarray
    image_values: np.ndarray
    image_att: np.ndarray
    trainval_loc: np.ndarray
    test_seen_loc: np.ndarray
    test_unseen_loc: np.ndarray
    val_classes: np.ndarray

    # ------------------------------------------------------------------ facts
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_images(self) -> int:
        return len(self)

    @property
    def n_classes(self) -> int:
        return int(self.class_att.shape[0])

    @property
    def n_attributes(self) -> int:
        return int(self.class_att.shape[1])

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def seen_classes(self) -> np.ndarray:
        """Sorted classes with trainval images."""
        return np.unique(self.labels[self.trainval_loc])

    @property
    def unseen_classes(self) -> np.ndarray:
        """Sorted classes never in trainval."""
        return np.unique(self.labels[self.test_unseen_loc])

    @property
    def images(self) -> LazyImages:
        """Sequence view of the images as RGB ``PIL.Image`` objects, rendered on access."""
        return LazyImages(self)

    def image_attributes(self, i: int) -> dict[str, str]:
        """Group name -> value name of image ``i``."""
        pairs = zip(self.groups, self.image_values[i], strict=True)
        return {g: values[int(v)] for (g, _, values), v in pairs}

    # ------------------------------------------------------------------ rendering
    def render(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Render image ``i``: ``(pixels (H, W, 3) uint8, masks (P, H, W) bool)``.

        Masks hold the *visible* pixels of each part (occluded pixels belong to whatever is in front),
        so the masks of different parts never overlap.
        """
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"image index {i} out of range 0..{len(self) - 1}")
        rng = np.random.default_rng([self.config.seed, i])  # one stream per image: order-independent
        pixels, owner = render_creature(self.image_attributes(i), self.config, rng)
        masks = owner[None, :, :] == np.arange(len(self.part_names))[:, None, None]
        return pixels, masks

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB ``PIL.Image``."""
        return Image.fromarray(self.render(i)[0], mode="RGB")

    # ------------------------------------------------------------------ semantics
    def semantic_vectors(self, dim: int = 64) -> np.ndarray:
        """(D, dim) float32 unit semantic vector per attribute, standing in for word vectors.

        Built from the name structure ``group::value``: a part component (shared by the attributes of
        one part, or by all global ones), a group component, a value component shared across groups
        (``"red"`` in every colour group, ``"striped"`` in both pattern groups) and a little noise. All
        components are deterministic in the seed and the names.
        """
        if dim < 2:
            raise ConfigError(f"semantic vector dimension must be at least 2, got {dim}")
        seed = self.config.seed

        def unit(kind: int, name: str) -> np.ndarray:
            ss = np.random.SeedSequence([seed, zlib.crc32(name.encode())], spawn_key=(kind,))
            v = np.random.default_rng(ss).standard_normal(dim)
            return v / np.linalg.norm(v)

        rows = []
        for (group, part, values) in self.groups:
            for value in values:
                v = (0.5 * unit(1, part or "global") + 0.7 * unit(2, group) + 1.0 * unit(3, value)
                     + 0.15 * unit(4, f"{group}::{value}"))
                rows.append(v / np.linalg.norm(v))
        return np.stack(rows).astype(np.float32)


class LazyImages(Sequence):
    """A read-only sequence of the benchmark's images as ``PIL.Image``; each access renders the image."""

    def __init__(self, bench: ImageBenchmark):
        self._bench = bench

    def __len__(self) -> int:
        return len(self._bench)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self._bench.image(i) for i in range(*index.indices(len(self)))]
        return self._bench.image(int(index))

    def __iter__(self) -> Iterator[Image.Image]:
        for i in range(len(self)):
            yield self._bench.image(i)


# ---------------------------------------------------------------------------------------------- generation


def make_image_benchmark(cfg: ImageBenchConfig | None = None) -> ImageBenchmark:
    """Generate the benchmark's classes, per-image attributes and splits (pixels are rendered lazily)."""
    cfg = cfg or ImageBenchConfig()
    cfg.validate()
    groups = group_definitions(cfg.n_colors)
    sizes = np.array([len(vals) for _, _, vals in groups])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    n_groups, d = len(groups), int(sizes.sum())

    # Metadata streams carry a spawn key so they never coincide with the per-image streams [seed, i].
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1,)))
    color_groups = np.array([j for j, (g, _, _) in enumerate(groups) if g.endswith("_color")])
    dominant, unseen = _make_classes(cfg, sizes, color_groups, rng)
    k = cfg.n_classes

    # Per-class, per-group value distributions; the class attribute vector is their concatenation.
    class_att = np.zeros((k, d), dtype=np.float64)
    for c in range(k):
        for g in range(n_groups):
            class_att[c, offsets[g] + dominant[c, g]] = 1.0
            if sizes[g] > 1 and rng.random() < cfg.p_secondary:
                other = (dominant[c, g] + rng.integers(1, sizes[g])) % sizes[g]
                w = rng.uniform(*cfg.secondary_weight)
                class_att[c, offsets[g] + dominant[c, g]] = 1.0 - w
                class_att[c, offsets[g] + other] = w

    n = k * cfg.images_per_class
    labels = np.repeat(np.arange(k, dtype=np.int64), cfg.images_per_class)
    image_values = np.zeros((n, n_groups), dtype=np.int64)
    for g in range(n_groups):
        probs = class_att[labels][:, offsets[g]:offsets[g] + sizes[g]]
        # inverse-CDF sampling, one uniform per image and group
        u = rng.random(n)[:, None]
        image_values[:, g] = np.minimum((np.cumsum(probs, axis=1) < u).sum(axis=1), sizes[g] - 1)
    image_att = np.zeros((n, d), dtype=np.float32)
    image_att[np.arange(n)[:, None], offsets[None, :] + image_values] = 1.0

    # xlsa17-style splits: unseen classes only in test_unseen; seen classes split trainval / test_seen.
    seen = np.setdiff1d(np.arange(k), unseen)
    trainval, test_seen = [], []
    for c in seen:
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        n_test = min(max(int(round(cfg.test_seen_fraction * idx.size)), 1), idx.size - 1)
        test_seen.append(idx[:n_test])
        trainval.append(idx[n_test:])
    test_unseen_loc = np.flatnonzero(np.isin(labels, unseen))
    val_classes = np.sort(rng.choice(seen, size=cfg.n_val, replace=False)).astype(np.int64)

    attribute_names = [f"{g}::{v}" for g, _, vals in groups for v in vals]
    part_index = {p: i for i, p in enumerate(PART_NAMES)}
    attribute_part = np.array([part_index[p] if p else -1 for _, p, vals in groups for _ in vals],
                              dtype=np.int64)
    attribute_groups = {g: np.arange(offsets[j], offsets[j] + sizes[j]) for j, (g, _, _) in enumerate(groups)}
    clusters = {p: np.flatnonzero(attribute_part == i) for i, p in enumerate(PART_NAMES)}
    clusters["global"] = np.flatnonzero(attribute_part == -1)
    class_names = _class_names(dominant, groups)

    return ImageBenchmark(
        config=cfg,
        labels=labels,
        class_names=class_names,
        attribute_names=attribute_names,
        part_names=list(PART_NAMES),
        groups=groups,
        attribute_groups=attribute_groups,
        clusters=clusters,
        attribute_part=attribute_part,
        class_att=class_att.astype(np.float32),
        image_values=image_values,
        image_att=image_att,
        trainval_loc=np.sort(np.concatenate(trainval)).astype(np.int64),
        test_seen_loc=np.sort(np.concatenate(test_seen)).astype(np.int64),
        test_unseen_loc=test_unseen_loc.astype(np.int64),
        val_classes=val_classes,
    )


def _make_classes(cfg: ImageBenchConfig, sizes: np.ndarray, color_groups: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dominant value per class and group (K, n_groups), and the sorted unseen classes.

    Classes are built in families: a random base, changed ``family_mutations`` times per class, each
    change either re-drawing one group or (with ``p_color_swap``) swapping the colours of two parts.
    Swaps make relatives that hold the same colours in other places, which pooled features cannot tell
    apart but part-wise attention can. Every value of every group is made dominant in at least one seen
    class, so any unseen class is a new combination of values that were all seen, and any two classes
    differ in at least ``min_class_distance`` groups.
    """
    k, n_groups = cfg.n_classes, sizes.size
    dominant = np.zeros((k, n_groups), dtype=np.int64)
    base = rng.integers(0, sizes)
    for c in range(k):
        if c % cfg.family_size == 0:
            base = rng.integers(0, sizes)
        row = base.copy()
        for _ in range(cfg.family_mutations):
            if color_groups.size >= 2 and rng.random() < cfg.p_color_swap:
                g1, g2 = rng.choice(color_groups, size=2, replace=False)
                row[g1], row[g2] = row[g2], row[g1]
            else:
                g = rng.integers(n_groups)
                row[g] = rng.integers(sizes[g])
        dominant[c] = row
    unseen = np.sort(rng.choice(k, size=cfg.n_unseen, replace=False))
    seen = np.setdiff1d(np.arange(k), unseen)

    # Cover every value with a seen class: give a missing value to a seen class whose current value in
    # that group is held by another seen class too (so coverage already reached is never undone).
    for g in range(n_groups):
        for v in range(sizes[g]):
            if (dominant[seen, g] == v).any():
                continue
            counts = np.bincount(dominant[seen, g], minlength=sizes[g])
            donors = seen[counts[dominant[seen, g]] > 1]
            if donors.size == 0:  # fewer seen classes than values: coverage impossible, keep going
                continue
            dominant[rng.choice(donors), g] = v

    # Separate classes that ended up too close by re-drawing groups of the later class. Group choices
    # avoid breaking coverage (only groups whose current value is held by another seen class).
    for _ in range(100 * k):
        dist = (dominant[:, None, :] != dominant[None, :, :]).sum(axis=2)
        np.fill_diagonal(dist, n_groups)
        close = np.argwhere(dist < min(cfg.min_class_distance, n_groups))
        if close.size == 0:
            break
        c = int(close[0].max())
        g = int(rng.integers(n_groups))
        holders = seen[dominant[seen, g] == dominant[c, g]]
        if c in seen and holders.size < 2:
            continue
        dominant[c, g] = (dominant[c, g] + rng.integers(1, sizes[g])) % sizes[g]
    else:
        raise ConfigError(f"imagebench: could not make {k} classes that differ in {cfg.min_class_distance} "
                          "groups; lower min_class_distance or n_classes")
    return dominant, unseen


_NAME_GROUPS = ("head_color", "wing_color", "habitat")  # the groups every class name spells out


def _class_name(c: int, dominant: np.ndarray, groups: list) -> str:
    """A CUB-like readable class name from the dominant values, e.g. ``007.Red_headed_Blue_winged_Sand``."""
    val = {g: vals[int(v)] for (g, _, vals), v in zip(groups, dominant, strict=True)}
    return (f"{c + 1:03d}.{val['head_color'].capitalize()}_headed_{val['wing_color'].capitalize()}_winged_"
            f"{val['habitat'].capitalize()}")


def _class_names(dominant: np.ndarray, groups: list) -> list[str]:
    """Readable class names whose descriptive parts (after ``NNN.``) are unique, deterministically.

    Classes whose names would read the same get, group by group in attribute order, the dominant value of
    the first further group that tells them apart (``_Striped_body``, ``_Forked_tail``); a numeric suffix
    is the last resort. Names are metadata only: they change no feature, split or cache key.
    """
    names = [_class_name(c, dominant[c], groups) for c in range(dominant.shape[0])]
    stems = [n.split(".", 1)[1] for n in names]
    suffix = [""] * len(names)

    def clashes() -> list[list[int]]:
        by_name: dict[str, list[int]] = {}
        for c, stem in enumerate(stems):
            by_name.setdefault(stem + suffix[c], []).append(c)
        return [members for members in by_name.values() if len(members) > 1]

    for j, (group, _, values) in enumerate(groups):
        if group in _NAME_GROUPS:
            continue
        for members in clashes():
            if len({int(dominant[c, j]) for c in members}) > 1:
                for c in members:
                    suffix[c] += f"_{values[int(dominant[c, j])].capitalize()}_{group.split('_')[0]}"
    for members in clashes():
        for i, c in enumerate(members[1:], start=2):
            suffix[c] += f"_{i}"
    return [n + s for n, s in zip(names, suffix, strict=True)]


# ---------------------------------------------------------------------------------------------- export


#: The dataset name a built-in benchmark's data carries, and how tables and figures name it.
NAME = "imagebench"
DISPLAY_NAME = "built-in benchmark"


def to_zsldata(bench: ImageBenchmark, features: Any, source: str = "imagebench",
               semantic_dim: int = 64) -> ZSLData:
    """Wrap features extracted from ``bench.images`` (N, C, h, w) as a :class:`ZSLData`.

    Class attributes are L2-normalised per row (as xlsa17's ``att``), semantic vectors come from
    :meth:`ImageBenchmark.semantic_vectors`, and the benchmark's own clusters and validation classes
    are set.
    """
    att = bench.class_att.astype(np.float32)
    att = normalize_rows(att)
    data = ZSLData(
        name=NAME,
        features=features,
        labels=bench.labels.copy(),
        att=att,
        w2v=bench.semantic_vectors(semantic_dim),
        trainval_loc=bench.trainval_loc.copy(),
        test_seen_loc=bench.test_seen_loc.copy(),
        test_unseen_loc=bench.test_unseen_loc.copy(),
        class_names=list(bench.class_names),
        attribute_names=list(bench.attribute_names),
        val_classes=bench.val_classes.copy(),
        clusters={k: v.copy() for k, v in bench.clusters.items()},
        source=source,
        provenance={"generator": "dedn.data.imagebench", "imagebench": asdict(bench.config)},
    )
    shape = tuple(data.features.shape)
    if len(shape) != 4 or shape[0] != len(bench):
        raise DataError(f"{source}: features must have shape ({len(bench)}, C, h, w) for the {len(bench)} "
                        f"benchmark images, got {shape}")
    data.validate()
    return data


def save_images(bench: ImageBenchmark, folder: str | Path) -> list[Path]:
    """Write every image as PNG under ``folder/<class name>/<index>.png``; return the paths in index order.

    Also writes ``images.txt`` (relative path and label per line, in index order), ``masks.npz``
    (``part_map`` (N, H, W) int8: part index of each pixel or -1, ``part_names``, ``labels``,
    ``paths``; the boolean masks are ``part_map[:, None] == arange(P)[:, None, None]``) and
    ``benchmark.json`` (config, names, splits) so the folder describes itself.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = bench.image_size
    part_map = np.empty((len(bench), size, size), dtype=np.int8)
    paths, rel = [], []
    for i in range(len(bench)):
        pixels, masks = bench.render(i)
        name = Path(bench.class_names[bench.labels[i]]) / f"{i:05d}.png"
        (folder / name.parent).mkdir(exist_ok=True)
        Image.fromarray(pixels, mode="RGB").save(folder / name)
        part_map[i] = np.where(masks.any(axis=0), masks.argmax(axis=0), -1)
        paths.append(folder / name)
        rel.append(name.as_posix())
    lines = [f"{p} {int(c)}\n" for p, c in zip(rel, bench.labels, strict=True)]
    (folder / "images.txt").write_text("".join(lines))
    np.savez_compressed(folder / "masks.npz", part_map=part_map, part_names=np.array(bench.part_names),
                        labels=bench.labels, paths=np.array(rel))
    meta = {
        "config": asdict(bench.config),
        "class_names": bench.class_names,
        "attribute_names": bench.attribute_names,
        "part_names": bench.part_names,
        "attribute_part": bench.attribute_part.tolist(),
        "trainval_loc": bench.trainval_loc.tolist(),
        "test_seen_loc": bench.test_seen_loc.tolist(),
        "test_unseen_loc": bench.test_unseen_loc.tolist(),
        "val_classes": bench.val_classes.tolist(),
    }
    (folder / "benchmark.json").write_text(json.dumps(meta, indent=1))
    return paths
