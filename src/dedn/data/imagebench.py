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
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dedn.data.dataset import ZSLData
from dedn.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------- vocabulary

#: Creature parts, in mask order.
PART_NAMES: tuple[str, ...] = ("head", "body", "wings", "tail", "legs")

#: Named colours available to colour groups; ``ImageBenchConfig.n_colors`` takes the first n.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 40),
    "green": (45, 165, 60),
    "blue": (40, 80, 215),
    "purple": (135, 50, 175),
    "black": (28, 28, 28),
    "white": (240, 240, 240),
    "brown": (125, 75, 35),
    "pink": (250, 150, 190),
}

PATTERNS = ("solid", "striped", "spotted")
HABITATS = ("water", "grass", "sky", "sand", "forest")


def _groups(n_colors: int) -> list[tuple[str, str | None, tuple[str, ...]]]:
    """(group name, part name or None for global, values) for every attribute group, in attribute order."""
    colors = tuple(PALETTE)[:n_colors]
    return [
        ("head_color", "head", colors),
        ("head_shape", "head", ("round", "pointed", "square", "crested")),
        ("body_color", "body", colors),
        ("body_pattern", "body", PATTERNS),
        ("wing_color", "wings", colors),
        ("wing_pattern", "wings", PATTERNS),
        ("wing_shape", "wings", ("rounded", "pointed")),
        ("tail_color", "tail", colors),
        ("tail_shape", "tail", ("fan", "straight", "forked")),
        ("leg_color", "legs", colors),
        ("leg_length", "legs", ("short", "long")),
        ("size", None, ("small", "medium", "large")),
        ("body_shape", None, ("round", "elongated")),
        ("habitat", None, HABITATS),
    ]


# ---------------------------------------------------------------------------------------------- config


@dataclass
class ImageBenchConfig:
    """Size, split and difficulty of the rendered image benchmark.

    The defaults give 40 classes (30 seen, 10 unseen) x 60 images = 2400 images at 224 px. The
    difficulty knobs are grouped below; raising any of them makes the task harder.
    """

    seed: int = 0
    n_classes: int = 40
    n_unseen: int = 10
    n_val: int = 8  # validation classes, a subset of the seen classes (like xlsa17 valclasses1)
    images_per_class: int = 60
    image_size: int = 224
    test_seen_fraction: float = 0.2  # share of each seen class's images held out as test_seen
    n_colors: int = 8  # values of each colour group (at most len(PALETTE))

    # class structure: classes are families of close relatives
    family_size: int = 4  # classes per family (share a base attribute combination)
    family_mutations: int = 2  # changes made to the family's base for each class
    p_color_swap: float = 0.6  # chance that a change swaps two parts' colours (same colours, other parts)
    min_class_distance: int = 2  # dominant values of any two classes differ in at least this many groups
    p_secondary: float = 0.3  # chance that a class's group has a second value
    secondary_weight: tuple[float, float] = (0.15, 0.4)  # probability range of that second value

    # image jitter
    pose_jitter_deg: float = 15.0  # std of the body rotation; wing / tail / leg angles jitter too
    scale_jitter: float = 0.08  # relative std of the creature scale within a size value
    position_jitter: float = 0.8  # 0: centred; 1: anywhere the creature fits in the frame
    color_jitter: float = 18.0  # std of per-part RGB jitter (0..255 units)
    lighting_jitter: float = 0.15  # global brightness factor drawn from 1 +- this
    clutter: float = 2.0  # mean number of distractor blobs (palette colours) in the background
    occlusion_prob: float = 0.15  # chance of a foreground occluder overlapping the creature
    noise: float = 6.0  # std of Gaussian pixel noise (0..255 units)

    def validate(self) -> None:
        """Raise :class:`ConfigError` for inconsistent settings."""
        if self.seed < 0:
            raise ConfigError(f"imagebench.seed must be non-negative, got {self.seed}")
        if self.n_classes < 2:
            raise ConfigError(f"imagebench.n_classes must be at least 2, got {self.n_classes}")
        if not 1 <= self.n_unseen < self.n_classes:
            raise ConfigError(f"imagebench.n_unseen must be in 1..{self.n_classes - 1}, got {self.n_unseen}")
        if not 0 <= self.n_val < self.n_classes - self.n_unseen:
            raise ConfigError(f"imagebench.n_val must be in 0..{self.n_classes - self.n_unseen - 1} (fewer "
                              f"than the seen classes), got {self.n_val}")
        if self.images_per_class < 2:
            raise ConfigError(f"imagebench.images_per_class must be at least 2, got {self.images_per_class}")
        if self.image_size < 32:
            raise ConfigError(f"imagebench.image_size must be at least 32, got {self.image_size}")
        if not 0.0 < self.test_seen_fraction < 1.0:
            raise ConfigError(f"imagebench.test_seen_fraction must be in (0, 1), got "
                              f"{self.test_seen_fraction}")
        if not 2 <= self.n_colors <= len(PALETTE):
            raise ConfigError(f"imagebench.n_colors must be in 2..{len(PALETTE)}, got {self.n_colors}")
        if self.family_size < 1 or self.family_mutations < 0:
            raise ConfigError("imagebench.family_size must be >= 1 and family_mutations >= 0")
        if not 0.0 <= self.p_color_swap <= 1.0:
            raise ConfigError(f"imagebench.p_color_swap must be in [0, 1], got {self.p_color_swap}")
        if not 0.0 <= self.p_secondary <= 1.0:
            raise ConfigError(f"imagebench.p_secondary must be in [0, 1], got {self.p_secondary}")
        lo, hi = self.secondary_weight
        if not 0.0 <= lo <= hi < 1.0:
            raise ConfigError(f"imagebench.secondary_weight must satisfy 0 <= low <= high < 1, got "
                              f"{self.secondary_weight}")
        if not 0.0 <= self.position_jitter <= 1.0:
            raise ConfigError(f"imagebench.position_jitter must be in [0, 1], got {self.position_jitter}")
        if not 0.0 <= self.occlusion_prob <= 1.0:
            raise ConfigError(f"imagebench.occlusion_prob must be in [0, 1], got {self.occlusion_prob}")
        knobs = ("pose_jitter_deg", "scale_jitter", "color_jitter", "lighting_jitter", "clutter", "noise")
        for name in knobs:
            if getattr(self, name) < 0:
                raise ConfigError(f"imagebench.{name} must be non-negative, got {getattr(self, name)}")


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
        pixels, owner = _render_creature(self.image_attributes(i), self.config, rng)
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
    groups = _groups(cfg.n_colors)
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
    class_names = [_class_name(c, dominant[c], groups) for c in range(k)]

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


def _class_name(c: int, dominant: np.ndarray, groups: list) -> str:
    """A CUB-like readable class name from the dominant values, e.g. ``007.Red_headed_Blue_winged``."""
    val = {g: vals[int(v)] for (g, _, vals), v in zip(groups, dominant, strict=True)}
    return (f"{c + 1:03d}.{val['head_color'].capitalize()}_headed_{val['wing_color'].capitalize()}_winged_"
            f"{val['habitat'].capitalize()}")


# ---------------------------------------------------------------------------------------------- drawing


def _color(name: str) -> np.ndarray:
    return np.array(PALETTE[name], dtype=np.float32)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 40) -> np.ndarray:
    """Polygon (n, 2) approximating an ellipse rotated by ``angle`` radians."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)


def _unit(angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Direction and its left normal for an angle in radians (image coordinates: y points down)."""
    d = np.array([np.cos(angle), np.sin(angle)])
    return d, np.array([-d[1], d[0]])


@dataclass
class _Layer:
    """One filled shape: polygons in creature-local units, its part (or -1), colour and texture."""

    part: int
    polygons: list[np.ndarray]
    color: np.ndarray
    pattern: str = "solid"
    pattern_angle: float = 0.0  # radians, creature-local: stripes run across this direction
    dots: list[tuple[float, float, float]] = field(default_factory=list)  # (x, y, r) dark dots (eyes)


def _creature_layers(v: dict[str, str], cfg: ImageBenchConfig, rng: np.random.Generator) -> list[_Layer]:
    """The creature's shapes in local units (body centred at 0, head towards +x, y down), back to front."""
    jit = np.deg2rad(cfg.pose_jitter_deg)
    part = {p: i for i, p in enumerate(PART_NAMES)}

    def col(name: str) -> np.ndarray:
        return np.clip(_color(name) + rng.normal(0, cfg.color_jitter, 3), 0, 255)

    a, b = (0.20, 0.15) if v["body_shape"] == "round" else (0.27, 0.105)
    a, b = a * rng.uniform(0.93, 1.07), b * rng.uniform(0.93, 1.07)
    body_col, head_col = col(v["body_color"]), col(v["head_color"])
    wing_col, tail_col, leg_col = col(v["wing_color"]), col(v["tail_color"]), col(v["leg_color"])
    layers: list[_Layer] = []

    # Wings: the far wing sits behind the body (shaded), the near one in front of it.
    wing_len = rng.uniform(0.30, 0.36)
    wing_angle = np.deg2rad(-135) + rng.normal(0, 0.6 * jit)
    anchor = np.array([-0.1 * a, -0.45 * b])

    def wing(at: np.ndarray, angle: float, scale: float) -> np.ndarray:
        d, nrm = _unit(angle)
        length = wing_len * scale
        if v["wing_shape"] == "rounded":
            c = at + d * length / 2
            return _ellipse(c[0], c[1], length / 2, 0.085 * scale, angle)
        return np.stack([at + nrm * 0.075 * scale, at + d * 0.55 * length + nrm * 0.06 * scale,
                         at + d * 1.2 * length, at - nrm * 0.045 * scale])

    far = wing(anchor + np.array([0.07, -0.02]), wing_angle - np.deg2rad(22), 0.85)
    layers.append(_Layer(part["wings"], [far], wing_col * 0.72, v["wing_pattern"], wing_angle))

    # Legs: two, from inside the body downwards, with a small foot pointing forwards.
    leg_len = (0.09 if v["leg_length"] == "short" else 0.21) * rng.uniform(0.9, 1.1)
    legs = []
    for x0 in (0.35 * a, -0.3 * a):
        d, nrm = _unit(np.pi / 2 + rng.normal(0, 0.5 * jit))
        top = np.array([x0, 0.6 * b])
        end = top + d * (leg_len + 0.4 * b)
        w = 0.018
        legs.append(np.stack([top + nrm * w, end + nrm * w, end - nrm * w, top - nrm * w]))
        legs.append(np.stack([end + np.array([-0.015, -0.012]), end + np.array([0.06, -0.012]),
                              end + np.array([0.06, 0.012]), end + np.array([-0.015, 0.012])]))
    layers.append(_Layer(part["legs"], legs, leg_col))

    # Tail at the back end of the body.
    d, nrm = _unit(np.pi + np.deg2rad(-15) + rng.normal(0, 0.7 * jit))
    t0 = np.array([-0.9 * a, -0.1 * b])
    if v["tail_shape"] == "fan":
        tail = [t0 + nrm * 0.035, t0 - nrm * 0.035, t0 + d * 0.22 - nrm * 0.12, t0 + d * 0.24,
                t0 + d * 0.22 + nrm * 0.12]
    elif v["tail_shape"] == "straight":
        tail = [t0 + nrm * 0.028, t0 - nrm * 0.028, t0 + d * 0.33 - nrm * 0.022, t0 + d * 0.33 + nrm * 0.022]
    else:  # forked: a V opening backwards
        tail = [t0 + nrm * 0.035, t0 + d * 0.27 + nrm * 0.13, t0 + d * 0.15, t0 + d * 0.27 - nrm * 0.13,
                t0 - nrm * 0.035]
    layers.append(_Layer(part["tail"], [np.stack(tail)], tail_col))

    layers.append(_Layer(part["body"], [_ellipse(0, 0, a, b)], body_col, v["body_pattern"], 0.0))

    # Head at the front end, a little raised; an eye makes the facing direction readable.
    r = 0.105 * rng.uniform(0.92, 1.08)
    hx, hy = 0.9 * a + 0.45 * r, -0.55 * b
    shape = v["head_shape"]
    if shape == "round":
        head = [_ellipse(hx, hy, r, r)]
    elif shape == "pointed":  # round back half, drawn out into a point at the front
        t = np.linspace(np.pi / 2, 3 * np.pi / 2, 20)
        back = np.stack([hx + r * np.cos(t), hy + r * np.sin(t)], axis=1)
        head = [np.vstack([back, [[hx + 1.9 * r, hy + 0.15 * r]]])]
    elif shape == "square":
        head = [_ellipse(hx, hy, 1.25 * r, 1.25 * r, np.pi / 4 + rng.normal(0, 0.15), n=4)]
    else:  # crested: round head with three spikes on top
        head = [_ellipse(hx, hy, r, r)]
        for k, off in enumerate((-0.55, 0.0, 0.55)):
            base = np.array([hx + off * r, hy - 0.6 * r])
            tip = np.array([hx + off * r * 1.6 - 0.15 * r, hy - (1.75 if k == 1 else 1.5) * r])
            head.append(np.stack([base + [-0.3 * r, 0.0], tip, base + [0.3 * r, 0.0]]))
    layers.append(_Layer(part["head"], head, head_col, dots=[(hx + 0.4 * r, hy - 0.2 * r, 0.2 * r)]))

    near = wing(anchor, wing_angle, 1.0)
    layers.append(_Layer(part["wings"], [near], wing_col, v["wing_pattern"], wing_angle))
    return layers


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (size, size) float32, shared and read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _fill(img: np.ndarray, color: tuple[float, float, float], shade: np.ndarray | float = 0.0) -> None:
    """img[..., c] = color[c] + shade, channel by channel (much faster than an (H, W, 3) broadcast)."""
    for c in range(3):
        img[..., c] = shade
        img[..., c] += color[c]


def _background(habitat: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 habitat background."""
    # Column / row coordinate vectors in 0..1; broadcasting keeps most work one-dimensional. Random
    # numbers are turned into Python floats so that float32 arrays stay float32.
    y = ((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None]
    x = ((np.arange(size, dtype=np.float32) + 0.5) / size)[None, :]
    img = np.empty((size, size, 3), dtype=np.float32)
    two_pi = float(2 * np.pi)
    if habitat == "water":
        freq, p0, p1 = float(rng.uniform(9, 14)), float(rng.uniform(0, 6.3)), float(rng.uniform(0, 6.3))
        waves = np.sin(two_pi * (y * freq + 0.3 * np.sin(two_pi * 2.5 * x + p0)) + p1)
        _fill(img, (35, 95, 165), waves * 22 - y * 30)
    elif habitat == "grass":
        horizon, freq = int(rng.uniform(0.2, 0.4) * size), float(rng.uniform(28, 40))
        blades = np.sin(two_pi * (x * freq + 0.8 * np.sin(two_pi * 6 * y)))
        _fill(img, (75, 145, 55), blades * 22)
        _fill(img[:horizon], (165, 205, 240))
    elif habitat == "sky":  # a vertical gradient with soft white clouds
        for c, (top, bottom) in enumerate(((95, 195), (160, 225), (235, 250))):
            img[..., c] = np.float32(top) + y * np.float32(bottom - top)
        for _ in range(rng.integers(2, 5)):
            cx, cy = (float(t) * size for t in rng.uniform(0, 1, 2))
            rx, ry = float(rng.uniform(0.08, 0.2)) * size, float(rng.uniform(0.04, 0.08)) * size
            # only the cloud's bounding box: its weight is 0 beyond sqrt(1.5) radii
            xs = slice(max(int(cx - 1.23 * rx), 0), max(min(int(cx + 1.23 * rx) + 1, size), 0))
            ys = slice(max(int(cy - 1.23 * ry), 0), max(min(int(cy + 1.23 * ry) + 1, size), 0))
            cloud = np.clip(1.5 - ((x[:, xs] * size - cx) / rx) ** 2 - ((y[ys] * size - cy) / ry) ** 2, 0, 1)
            patch = img[ys, xs]
            patch += cloud[..., None] * (np.float32(250) - patch)
    elif habitat == "sand":
        freq, p0 = float(rng.uniform(3, 5)), float(rng.uniform(0, 6.3))
        dunes = np.sin(two_pi * (y * freq + 0.2 * np.sin(two_pi * 1.5 * x + p0)))
        speckle = rng.standard_normal((size, size), dtype=np.float32) * np.float32(14)  # grainy sand
        _fill(img, (218, 188, 128), dunes * 18 + speckle)
    else:  # forest: dark foliage with tree trunks
        _fill(img, (38, 82, 42), np.sin(two_pi * (x * 7 + y * 5)) * 10)
        for _ in range(rng.integers(2, 5)):
            cx, w = float(rng.uniform(0, 1)), float(rng.uniform(0.04, 0.09))
            img[:, np.abs(x[0] - cx) < w / 2] = np.array([92, 62, 34], np.float32)
    return img


def _render_creature(v: dict[str, str], cfg: ImageBenchConfig, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image: ``(pixels (H, W, 3) uint8, owner (H, W) int8 part index or -1)``."""
    size = cfg.image_size
    canvas = _background(v["habitat"], size, rng)
    owner = np.full((size, size), -1, dtype=np.int8)

    # Distractor blobs in palette colours, so a colour seen somewhere in the image is not proof of a part.
    palette = list(PALETTE)[:cfg.n_colors]
    for _ in range(rng.poisson(cfg.clutter)):
        cx, cy = rng.uniform(0, size, 2)
        poly = _ellipse(cx, cy, *(rng.uniform(0.025, 0.07, 2) * size), rng.uniform(0, np.pi), n=12)
        poly += rng.normal(0, 0.01 * size, poly.shape)  # irregular outline
        _paint(canvas, None, poly, _color(palette[rng.integers(len(palette))]) * rng.uniform(0.7, 1.0))

    # Pose: local units -> pixels by rotation, optional mirror (facing left), scale and translation.
    layers = _creature_layers(v, cfg, rng)
    scale = {"small": 0.68, "medium": 0.84, "large": 1.0}[v["size"]] * size
    scale *= np.exp(rng.normal(0, cfg.scale_jitter))
    angle = rng.normal(0, np.deg2rad(cfg.pose_jitter_deg))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([flip, 1.0])
    pts = np.vstack([p for layer in layers for p in layer.polygons]) @ rot.T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    margin = 0.03 * size
    scale = min(scale, (size - 2 * margin) / float((hi - lo).max()))  # always fits the frame
    lo, hi = lo * scale, hi * scale
    centre = np.empty(2)
    for ax in range(2):
        low, high = margin - lo[ax], size - margin - hi[ax]
        mid = (low + high) / 2
        centre[ax] = mid + cfg.position_jitter * rng.uniform(-1, 1) * (high - low) / 2
    affine = rot * scale  # local -> pixel: p = affine @ q + centre

    for layer in layers:
        polys = [q @ affine.T + centre for q in layer.polygons]
        _paint(canvas, owner, polys, layer.color, layer, affine, centre, layer.part)

    if rng.random() < cfg.occlusion_prob:  # a rock or leaf in front of the creature
        cx, cy = centre + rng.normal(0, 0.5, 2) * (hi - lo) / 2
        r = rng.uniform(0.07, 0.13) * size
        poly = _ellipse(cx, cy, r, r * rng.uniform(0.5, 0.9), rng.uniform(0, np.pi), n=14)
        color = np.array([(60, 110, 45), (110, 110, 105), (95, 70, 45)][rng.integers(3)], np.float32)
        _paint(canvas, owner, poly, color, part=-1)

    canvas *= rng.uniform(1 - cfg.lighting_jitter, 1 + cfg.lighting_jitter)
    if cfg.noise > 0:
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(cfg.noise)
    return np.clip(canvas, 0, 255).astype(np.uint8), owner


def _paint(canvas: np.ndarray, owner: np.ndarray | None, polys: np.ndarray | list[np.ndarray],
           color: np.ndarray, layer: _Layer | None = None, affine: np.ndarray | None = None,
           centre: np.ndarray | None = None, part: int = -1) -> None:
    """Fill polygons (pixel coordinates) with a colour and the layer's texture; update the owner map.

    Rasterises only the polygons' bounding box with PIL and textures it in creature-local coordinates,
    so stripes and spots follow the creature's pose.
    """
    polys = [polys] if isinstance(polys, np.ndarray) else polys
    size = canvas.shape[0]
    pts = np.vstack(polys)
    x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + 1, size)
    if x1 <= x0 or y1 <= y0:
        return
    im = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
    draw = ImageDraw.Draw(im)
    for p in polys:
        draw.polygon([(float(x - x0), float(y - y0)) for x, y in p], fill=255)
    mask = np.asarray(im) > 0
    if not mask.any():
        return
    tex = np.broadcast_to(color.astype(np.float32), mask.shape + (3,))
    if layer is not None and (layer.pattern != "solid" or layer.dots):
        yy, xx = _grid(size)
        pix = np.stack([xx[y0:y1, x0:x1], yy[y0:y1, x0:x1]], axis=-1) - centre
        local = pix @ np.linalg.inv(affine).T  # pixel -> creature-local units
        u, w = local[..., 0], local[..., 1]
        mark = np.zeros(mask.shape, dtype=bool)
        if layer.pattern == "striped":
            ca, sa = np.cos(layer.pattern_angle), np.sin(layer.pattern_angle)
            mark |= np.sin(2 * np.pi * (u * ca + w * sa) / 0.075) > 0.1
        elif layer.pattern == "spotted":
            p = 0.085
            du, dw = (u / p) % 1.0 - 0.5, ((w / p) + 0.5 * np.floor(u / p)) % 1.0 - 0.5  # staggered lattice
            mark |= du**2 + dw**2 < 0.3**2
        luminance = float(color @ np.array([0.299, 0.587, 0.114], np.float32))
        contrast = color * 0.3 if luminance > 80 else color + (255 - color) * 0.6
        tex = np.where(mark[..., None], contrast.astype(np.float32), tex)
        for dx, dy, dr in layer.dots:
            tex = np.where(((u - dx) ** 2 + (w - dy) ** 2 < dr**2)[..., None], np.float32(15), tex)
    region = canvas[y0:y1, x0:x1]
    region[mask] = tex[mask]
    if owner is not None:
        owner[y0:y1, x0:x1][mask] = part


# ---------------------------------------------------------------------------------------------- export


def to_zsldata(bench: ImageBenchmark, features: Any, source: str = "imagebench",
               semantic_dim: int = 64) -> ZSLData:
    """Wrap features extracted from ``bench.images`` (N, C, h, w) as a :class:`ZSLData`.

    Class attributes are L2-normalised per row (as xlsa17's ``att``), semantic vectors come from
    :meth:`ImageBenchmark.semantic_vectors`, and the benchmark's own clusters and validation classes
    are set.
    """
    shape = tuple(getattr(features, "shape", ()))
    if len(shape) != 4 or shape[0] != len(bench):
        raise DataError(f"{source}: features must have shape ({len(bench)}, C, h, w) for the {len(bench)} "
                        f"benchmark images, got {shape}")
    att = bench.class_att.astype(np.float32)
    att = att / np.maximum(np.linalg.norm(att, axis=1, keepdims=True), 1e-12)
    data = ZSLData(
        name="imagebench",
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


# ---------------------------------------------------------------------------------------------- localisation


