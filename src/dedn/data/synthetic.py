"""The generated feature benchmark: lazy, deterministic region feature maps with the structure DEDN uses.

:func:`make_synthetic` turns a :class:`~dedn.config.SyntheticConfig` into a :class:`~dedn.data.dataset.ZSLData`
whose features are a :class:`SyntheticFeatures`: every image's (C, h, w) map is generated on request
from ``(seed, image index)`` alone, so the real dataset shapes (CUB: 11788 x 2048 x 14 x 14, 18.9 GB)
cost no memory, and an image is the same array whichever batch asks for it.

The generative model (all of it fixed by the seed):

- Classes live in a low-dimensional latent space (L = 8): families of about five classes share a
  centre, siblings lie close to it. Attribute d is present with probability
  ``sigmoid(s * (z . loading_d + bias_d))`` for latent z. ``class_probs[k, d]`` takes the class latent;
  the class attributes ``att`` are these rows L2-normalised, as xlsa17's are. Because all attributes
  read the same few latent factors, adding attributes does not make the classes arbitrarily easy to
  tell apart: the difficulty stays comparable from 48 to 312 attributes.
- Attributes are grouped into clusters (the presets use the benchmarks' paper clusters). Each cluster is
  a *part* with a home location on the h x w grid and a pool of channels. A ``local_fraction`` of each
  cluster's attributes are *local*: their visual prototype lives on a few channels of the part's pool
  and they appear only around the part's location in each image (a Gaussian bump, jittered per
  image). The other attributes are *global*: prototypes spread over many channels, expressed over the
  whole object (a broad profile covering every region).
- Per image: the latent moves away from its class's (so images disagree with their class vector in a
  class-like way, not just by independent flips), each attribute is present with the image's
  probability and a random strength; the object and each part move a little. Two clutter blobs at
  random places show *distractors*, random attribute patterns outside their parts (mean strength
  ``noise``): pooled over the map they look like attribute evidence, attention on the right region
  sees through them. Uniform background noise of standard deviation ``noise`` is added and the map
  passes a ReLU, like post-ReLU backbone features.
- Attribute semantic vectors ``w2v`` (D x G) are a cluster component plus individual noise, so that
  K-means over them recovers the clusters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dedn.data.benchmarks import BENCHMARKS, FEATURE_CHANNELS, WORD_VECTOR_DIM, Benchmark
from dedn.data.dataset import ZSLData
from dedn.data.sources import FeatureSource
from dedn.errors import ConfigError, DataError


@dataclass
class SyntheticConfig:
    """Shapes and structure of the generated feature benchmark (:mod:`dedn.data.synthetic`)."""

    preset: str | None = None  # cub | sun | awa2: real shapes and clusters; None: the numbers below
    n_images: int = 1200
    n_channels: int = 64
    height: int = 4
    width: int = 4
    n_classes: int = 40
    n_unseen: int = 10
    n_val: int = 8
    n_attributes: int = 48
    n_clusters: int = 4
    semantic_dim: int = 32
    local_fraction: float = 0.6
    noise: float = 0.5
    test_seen_fraction: float = 0.2
    seed: int = 0

__all__ = ["PRESETS", "ImageLatents", "SyntheticFeatures", "SyntheticStructure", "make_synthetic"]


#: Preset name -> the benchmark whose real shapes, splits and paper clusters it takes.
PRESETS: dict[str, Benchmark] = {name.lower(): b for name, b in BENCHMARKS.items()}

PRESET_CHANNELS = FEATURE_CHANNELS
PRESET_SEMANTIC_DIM = WORD_VECTOR_DIM

# Generator constants. They shape how hard the benchmark is; the ridge baseline in the tests pins the
# resulting difficulty at the default config.
_LATENT_DIM = 8  # class latent factors that all attributes read
_FAMILY_SIZE = 5  # classes per family
_SIBLING_SPREAD = 0.6  # sd of a class latent around its family centre (centres have sd 1)
_IMAGE_SPREAD = 0.65  # sd of an image latent around its class latent
_SHARPNESS = 3.0  # slope of the attribute probability sigmoid
_BIAS = (-1.5, 0.0)  # attribute biases: base rates of roughly 5 % to 50 %
_STRENGTH_SD = 0.3  # per-image relative strength variation of a present attribute
_OBJECT_SHIFT = 0.08  # object displacement sd, fraction of the map size
_PART_JITTER = 0.05  # extra displacement sd of each part
_PART_WIDTH = 0.12  # part bump sd, fraction of the map size (at least _MIN_PART_WIDTH cells)
_MIN_PART_WIDTH = 0.6
_OBJECT_WIDTH = 0.35  # sd of the broad object profile of global attributes
_OBJECT_FLOOR = 0.3  # global attributes reach every region with at least this weight
_GLOBAL_AMPLITUDE = 0.5  # global prototypes are spread over more channels, each weaker
_CLUTTER_BLOBS = 2  # clutter blobs per image
_DISTRACTOR_RATE = 0.1  # chance an attribute pattern shows in a clutter blob
_W2V_SPREAD = 0.7  # individual part of an attribute's semantic vector, relative to the cluster part

# Seed-sequence tags keep the structure and the per-image streams apart.
_TAG_STRUCTURE = 0
_TAG_IMAGE = 1


# ---------------------------------------------------------------------------------------------- structure
@dataclass(frozen=True, eq=False)
class SyntheticStructure:
    """Everything fixed by the seed that the per-image generation draws on.

    Attributes:
        n_channels, height, width: feature map shape (C, h, w).
        class_latents: (K, L) latent factors of each class.
        loadings: (L, D) and attribute_bias: (D,): attribute d's presence probability for latent z is
            ``sigmoid(sharpness * (z @ loadings[:, d] + attribute_bias[d]))``.
        sharpness: slope of that sigmoid.
        image_spread: sd of an image's latent around its class latent.
        class_probs: (K, D) presence probabilities at the class latents (the unnormalised ``att``).
        prototypes: (D, C) non-negative channel pattern of each attribute.
        cluster_of: (D,) cluster (part) index of each attribute.
        cluster_names: the Q cluster names, in cluster order.
        is_local: (D,) True for local attributes (expressed around their part only).
        part_centres: (Q, 2) home (row, col) of each part, in cells.
        part_width: sd of a part's bump, in cells.
        noise: sd of the uniform background noise and mean strength of the distractors.
    """

    n_channels: int
    height: int
    width: int
    class_latents: np.ndarray
    loadings: np.ndarray
    attribute_bias: np.ndarray
    sharpness: float
    image_spread: float
    class_probs: np.ndarray
    prototypes: np.ndarray
    cluster_of: np.ndarray
    cluster_names: tuple[str, ...]
    is_local: np.ndarray
    part_centres: np.ndarray
    part_width: float
    noise: float

    @property
    def n_clusters(self) -> int:
        return len(self.cluster_names)


@dataclass(frozen=True, eq=False)
class ImageLatents:
    """The hidden variables of one generated image (for tests, explanations and sanity checks).

    Attributes:
        label: the image's class.
        strengths: (D,) attribute strengths; 0 where the attribute is absent from this image.
        part_centres: (Q, 2) where each part sits in this image, in cells (row, col).
        part_maps: (Q, h, w) spatial weight of each part's local attributes (peak 1 at the centre).
        object_map: (h, w) spatial weight of the global attributes.
    """

    label: int
    strengths: np.ndarray
    part_centres: np.ndarray
    part_maps: np.ndarray
    object_map: np.ndarray


class SyntheticFeatures(FeatureSource):
    """Lazy (N, C, h, w) float32 feature maps, generated per image from ``(seed, index)``.

    Indexing follows numpy: an int gives one (C, h, w) map; a slice, an int array or a bool mask gives
    (n, C, h, w); a tuple indexes the generated maps further. An image's map never depends on which
    other images are requested with it (bitwise on one machine; CPUs with other SIMD paths may differ
    in the last bits). A batch of 50 CUB-shaped maps takes about 0.16 s of CPU time.

    Attributes:
        structure: the :class:`SyntheticStructure` the maps are drawn from.
        labels: (N,) class of each image (decides its attribute probabilities).
        seed: the benchmark seed; image i uses the stream ``default_rng([seed, 1, i])``.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, structure: SyntheticStructure, labels: np.ndarray, seed: int) -> None:
        self.structure = structure
        self.labels = np.asarray(labels, dtype=np.int64)
        self.seed = int(seed)
        st = structure
        self.shape: tuple[int, int, int, int] = (int(self.labels.size), st.n_channels, st.height, st.width)
        rows, cols = np.meshgrid(np.arange(st.height), np.arange(st.width), indexing="ij")
        self._grid = np.stack([rows.ravel(), cols.ravel()]).astype(np.float64)  # (2, R)
        # Group attributes by where they are expressed: one group per part (its local attributes) and
        # one for all global attributes. A group's channel vector is strengths @ prototypes over it.
        group = np.where(st.is_local, st.cluster_of, st.n_clusters)
        self._groups = [np.flatnonzero(group == g) for g in range(st.n_clusters + 1)]
        self._group_prototypes = [np.ascontiguousarray(st.prototypes[m]) for m in self._groups]

    # -------------------------------------------------------------- array protocol
    @property
    def ndim(self) -> int:
        return 4

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SyntheticFeatures(shape={self.shape}, seed={self.seed})"

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, tuple):  # maps[first, rest...]: generate the selected maps, index the rest
            if not index:
                return self.materialize()
            first, rest = index[0], index[1:]
            maps = self[first]
            single = np.ndim(first) == 0 and not isinstance(first, slice)
            return maps[rest] if single else maps[(slice(None), *rest)]
        if isinstance(index, slice):
            return self.generate(np.arange(len(self))[index])
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean index of shape {idx.shape} for {len(self)} feature maps")
            idx = np.flatnonzero(idx)
        if not np.issubdtype(idx.dtype, np.integer) and idx.size:
            raise IndexError(f"feature maps are indexed by integers, slices or bool masks, got {idx.dtype}")
        flat = idx.astype(np.int64).ravel()
        n = len(self)
        flat = np.where(flat < 0, flat + n, flat)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            bad = idx.ravel()[(flat < 0) | (flat >= n)]
            raise IndexError(f"image index {int(bad[0])} out of range for {n} synthetic feature maps")
        return self.generate(flat).reshape(*idx.shape, *self.shape[1:])

    def materialize(self, max_bytes: int = 2**32, batch_size: int = 256) -> np.ndarray:
        """All N maps as one float32 array; refuses above ``max_bytes`` (default 4 GiB)."""
        if self.nbytes > max_bytes:
            raise DataError(f"synthetic features need {self.nbytes / 2**30:.1f} GiB to materialise (limit "
                            f"{max_bytes / 2**30:.1f} GiB); index them in batches instead")
        out = np.empty(self.shape, dtype=np.float32)
        for start in range(0, len(self), batch_size):
            stop = min(start + batch_size, len(self))
            out[start:stop] = self.generate(np.arange(start, stop))
        return out

    # -------------------------------------------------------------- generation
    def latents(self, index: int) -> ImageLatents:
        """The hidden variables (attribute strengths, part locations and maps) of image ``index``."""
        i = self._check_int(int(index))
        lat = self._draw(np.array([i]), with_noise=False)
        st = self.structure
        hw = (st.height, st.width)
        return ImageLatents(
            label=int(self.labels[i]),
            strengths=lat["strengths"][0],
            part_centres=lat["part_centres"][0],
            part_maps=lat["profiles"][0, : st.n_clusters].reshape(st.n_clusters, *hw),
            object_map=lat["profiles"][0, st.n_clusters].reshape(hw),
        )

    def generate(self, indices: np.ndarray) -> np.ndarray:
        """Feature maps (n, C, h, w) float32 of the given image indices (non-negative, in range)."""
        st = self.structure
        indices = np.asarray(indices, dtype=np.int64).ravel()
        n, c, r = indices.size, st.n_channels, st.height * st.width
        if n == 0:
            return np.empty((0, c, st.height, st.width), dtype=np.float32)
        lat = self._draw(indices, with_noise=True)
        # Channel vector of each spatial component: part groups and the global group from the attribute
        # strengths, clutter blobs from their distractor strengths, and a constant component (profile all
        # ones) that centres the uniform noise. Only einsum and elementwise ops are used: threaded BLAS
        # picks kernels by matrix size, so a map would change in its last bits with its batch.
        strengths = lat["strengths"].astype(np.float32)  # (n, D)
        clutter = lat["distractors"].astype(np.float32)  # (n, blobs, D)
        scale = np.float32(st.noise * np.sqrt(12.0))  # uniform [0, 1) noise * scale has sd `noise`
        vectors = np.stack(
            [np.einsum("nd,dc->nc", strengths[:, m], u)
             for m, u in zip(self._groups, self._group_prototypes, strict=True)]
            + [np.einsum("nd,dc->nc", clutter[:, b], st.prototypes) for b in range(_CLUTTER_BLOBS)]
            + [np.full((n, c), -0.5 * scale, dtype=np.float32)],
            axis=2,
        )  # (n, C, Q+1+blobs+1), contiguous
        profiles = np.concatenate([lat["profiles"], np.ones((n, 1, r))], axis=1).astype(np.float32)
        # A sum of a dozen rank-one maps per image; einsum's loop over contiguous operands is also much
        # faster than BLAS on these thin products.
        out = np.einsum("ncg,ngr->ncr", vectors, profiles)
        noise = lat["noise"]
        noise *= scale
        out += noise
        np.maximum(out, 0.0, out=out)
        return out.reshape(n, c, st.height, st.width)

    def _check_int(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image index {i} out of range for {n} synthetic feature maps")
        return i

    def _draw(self, indices: np.ndarray, with_noise: bool) -> dict[str, np.ndarray]:
        """Per-image random variables, each image from its own stream ``default_rng([seed, 1, index])``."""
        st = self.structure
        n, d, q = indices.size, st.prototypes.shape[0], st.n_clusters
        c, r = st.n_channels, st.height * st.width
        hw = np.array([st.height, st.width], dtype=np.float64)
        size = float(max(st.height, st.width))
        latent_shift = np.empty((n, st.loadings.shape[0]))
        presence_draw = np.empty((n, d))
        strength_draw = np.empty((n, d))
        part_centres = np.empty((n, q, 2))
        object_centres = np.empty((n, 2))
        blob_centres = np.empty((n, _CLUTTER_BLOBS, 2))
        blob_widths = np.empty((n, _CLUTTER_BLOBS))
        distractors = np.empty((n, _CLUTTER_BLOBS, d))
        noise = np.empty((n, c, r), dtype=np.float32) if with_noise else None
        for j, i in enumerate(indices):
            # The draw order below is part of the benchmark's definition: changing it changes the data.
            rng = np.random.default_rng([self.seed, _TAG_IMAGE, int(i)])
            latent_shift[j] = rng.standard_normal(latent_shift.shape[1])
            presence_draw[j] = rng.random(d)
            strength_draw[j] = rng.standard_normal(d)
            shift = rng.normal(0.0, _OBJECT_SHIFT, 2) * hw
            object_centres[j] = (hw - 1) / 2 + shift
            part_centres[j] = st.part_centres + shift + rng.normal(0.0, _PART_JITTER, (q, 2)) * hw
            blob_centres[j] = rng.random((_CLUTTER_BLOBS, 2)) * (hw - 1)
            blob_widths[j] = rng.uniform(0.15, 0.3, _CLUTTER_BLOBS) * size
            active = rng.random((_CLUTTER_BLOBS, d)) < _DISTRACTOR_RATE
            distractors[j] = active * rng.exponential(st.noise, (_CLUTTER_BLOBS, d))
            if noise is not None:
                rng.random((c, r), dtype=np.float32, out=noise[j])
        # einsum (not BLAS) keeps every image's numbers independent of the batch it is drawn in.
        latents = st.class_latents[self.labels[indices]] + st.image_spread * latent_shift
        logits = st.sharpness * (np.einsum("nl,ld->nd", latents, st.loadings) + st.attribute_bias)
        present = presence_draw < 1.0 / (1.0 + np.exp(-logits))
        strengths = present * np.maximum(1.0 + _STRENGTH_SD * strength_draw, 0.2)
        np.clip(part_centres, 0.0, hw - 1, out=part_centres)
        parts = _bumps(part_centres, st.part_width, self._grid)  # (n, Q, R)
        obj = _OBJECT_FLOOR + (1 - _OBJECT_FLOOR) * _bumps(object_centres[:, None], _OBJECT_WIDTH * size,
                                                          self._grid)
        blobs = _bumps(blob_centres, blob_widths, self._grid)
        return {
            "strengths": strengths,
            "part_centres": part_centres,
            "profiles": np.concatenate([parts, obj, blobs], axis=1),
            "distractors": distractors,
            "noise": noise,  # type: ignore[dict-item]
        }


def _bumps(centres: np.ndarray, width: float | np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian bumps with peak 1: centres (n, m, 2), width scalar or (n, m), grid (2, R) -> (n, m, R)."""
    d2 = ((centres[..., :, None] - grid[None, None]) ** 2).sum(axis=-2)
    w = np.asarray(width, dtype=np.float64)
    if w.ndim:
        w = w[..., None]
    return np.exp(-d2 / (2.0 * w**2))


# ---------------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class _Layout:
    """Resolved sizes of one benchmark (from a preset or the explicit config numbers)."""

    name: str
    n_channels: int
    height: int
    width: int
    n_classes: int
    n_unseen: int
    n_val: int
    n_attributes: int
    semantic_dim: int
    n_trainval: int
    n_test_seen: int
    n_test_unseen: int
    clusters: dict[str, np.ndarray]

    @property
    def n_images(self) -> int:
        return self.n_trainval + self.n_test_seen + self.n_test_unseen


def _layout(cfg: SyntheticConfig) -> _Layout:
    if not 0.0 <= cfg.local_fraction <= 1.0:
        raise ConfigError(f"synthetic.local_fraction must lie in [0, 1], got {cfg.local_fraction}")
    if cfg.noise < 0:
        raise ConfigError(f"synthetic.noise must be >= 0, got {cfg.noise}")
    if cfg.seed < 0:
        raise ConfigError(f"synthetic.seed must be >= 0, got {cfg.seed}")
    if cfg.preset is not None:
        key = cfg.preset.lower()
        if key not in PRESETS:
            raise ConfigError(f"synthetic.preset must be one of {sorted(PRESETS)} or null, "
                              f"got {cfg.preset!r}")
        p = PRESETS[key]
        clusters = {name: np.concatenate([np.arange(a, b) for a, b in ranges])
                    for name, ranges in p.cluster_ranges("paper").items()}
        return _Layout(f"synthetic-{p.name}", PRESET_CHANNELS, p.feature_size, p.feature_size, p.n_classes,
                       p.n_unseen, p.n_val, p.n_attributes, PRESET_SEMANTIC_DIM, p.n_trainval, p.n_test_seen,
                       p.n_test_unseen, {k: np.sort(v) for k, v in clusters.items()})

    k, ku, d, q = cfg.n_classes, cfg.n_unseen, cfg.n_attributes, cfg.n_clusters
    checks = [
        (min(cfg.n_channels, cfg.height, cfg.width) >= 1, "n_channels, height and width must be >= 1"),
        (1 <= ku < k, f"n_unseen must lie in 1..n_classes-1 = {k - 1}, got {ku}"),
        (0 <= cfg.n_val < k - ku, f"n_val must lie in 0..{k - ku - 1} (fewer than the seen classes), "
                                  f"got {cfg.n_val}"),
        (1 <= q <= d, f"n_clusters must lie in 1..n_attributes = {d}, got {q}"),
        (cfg.semantic_dim >= 1, f"semantic_dim must be >= 1, got {cfg.semantic_dim}"),
        (0.0 < cfg.test_seen_fraction < 1.0,
         f"test_seen_fraction must lie in (0, 1), got {cfg.test_seen_fraction}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"synthetic.{message}")
    n_test_unseen = int(round(cfg.n_images * ku / k))
    n_seen_images = cfg.n_images - n_test_unseen
    n_test_seen = int(round(cfg.test_seen_fraction * n_seen_images))
    n_seen_classes = k - ku
    # Every seen class needs a trainval image, every class an image at all.
    if n_test_unseen < ku or n_seen_images - n_test_seen < n_seen_classes or n_test_seen < 1:
        raise ConfigError(f"synthetic.n_images = {cfg.n_images} is too small for {k} classes: give every "
                          f"seen class at least one trainval image and every unseen class one image")
    bounds = np.linspace(0, d, q + 1).round().astype(np.int64)
    clusters = {f"part{j}": np.arange(bounds[j], bounds[j + 1]) for j in range(q)}
    return _Layout("synthetic", cfg.n_channels, cfg.height, cfg.width, k, ku, cfg.n_val, d, cfg.semantic_dim,
                   n_seen_images - n_test_seen, n_test_seen, n_test_unseen, clusters)


def _allocate(total: int, weights: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integers lo <= a <= hi summing to ``total``, about proportional to ``weights`` (largest remainder)."""
    alloc = lo.astype(np.int64).copy()
    if not lo.sum() <= total <= hi.sum():
        raise ConfigError(f"cannot split {total} images over {lo.size} classes within the bounds")
    remaining = total - int(alloc.sum())
    while remaining > 0:
        room = hi - alloc
        w = np.where(room > 0, weights, 0.0)
        share = remaining * w / w.sum()
        add = np.minimum(np.floor(share).astype(np.int64), room)
        if add.sum() == 0:  # hand out single images by largest fractional share
            top = np.argsort(-(share - np.floor(share)) - (room > 0), kind="stable")[:remaining]
            add = np.zeros_like(alloc)
            add[top[room[top] > 0]] = 1
        alloc += add
        remaining -= int(add.sum())
    return alloc


def _class_latents(rng: np.random.Generator, k: int, d: int) -> dict[str, np.ndarray]:
    """Class latents (families of siblings), attribute loadings and biases."""
    n_families = max(2, int(round(k / _FAMILY_SIZE)))
    centres = rng.standard_normal((n_families, _LATENT_DIM))
    family = rng.permutation(np.arange(k) % n_families)
    latents = centres[family] + _SIBLING_SPREAD * rng.standard_normal((k, _LATENT_DIM))
    loadings = rng.standard_normal((_LATENT_DIM, d)) / np.sqrt(_LATENT_DIM)
    bias = rng.uniform(*_BIAS, d)
    return {"class_latents": latents, "loadings": loadings, "attribute_bias": bias}


def _structure(rng_list: list[np.random.Generator], lay: _Layout, cfg: SyntheticConfig) -> SyntheticStructure:
    rng_classes, rng_proto, rng_parts = rng_list
    semantic = _class_latents(rng_classes, lay.n_classes, lay.n_attributes)
    logits = _SHARPNESS * (semantic["class_latents"] @ semantic["loadings"] + semantic["attribute_bias"])
    class_probs = 1.0 / (1.0 + np.exp(-logits))
    d, c = lay.n_attributes, lay.n_channels
    names = tuple(lay.clusters)
    q = len(names)
    cluster_of = np.empty(d, dtype=np.int64)
    is_local = np.zeros(d, dtype=bool)
    for j, name in enumerate(names):
        members = lay.clusters[name]
        cluster_of[members] = j
        n_local = int(round(cfg.local_fraction * members.size))
        is_local[rng_parts.choice(members, n_local, replace=False)] = True
    # Channels: each part owns a pool of a quarter of the channels (pools overlap); a local attribute
    # uses a few channels of its part's pool, a global one twice as many channels anywhere at half
    # amplitude. Sparse supports keep the maps sparse-ish, like post-ReLU features.
    pool_size = min(c, max(2, c // 4))
    local_support = min(pool_size, max(2, c // 64))
    global_support = min(c, max(2, c // 32))
    pools = [rng_proto.choice(c, pool_size, replace=False) for _ in range(q)]
    prototypes = np.zeros((d, c), dtype=np.float32)
    for a in range(d):
        if is_local[a]:
            support = rng_proto.choice(pools[cluster_of[a]], local_support, replace=False)
            amplitude = 1.0
        else:
            support = rng_proto.choice(c, global_support, replace=False)
            amplitude = _GLOBAL_AMPLITUDE
        prototypes[a, support] = amplitude * rng_proto.uniform(0.5, 1.5, support.size)
    # Part homes: spread on a ring around the map centre (a single part sits at the centre).
    hw = np.array([lay.height, lay.width], dtype=np.float64)
    angles = 2 * np.pi * (np.arange(q) / q + rng_parts.uniform(0, 1))
    radius = 0.25 if q > 1 else 0.0
    part_centres = (hw - 1) / 2 + radius * np.stack([np.sin(angles), np.cos(angles)], axis=1) * hw
    part_width = max(_MIN_PART_WIDTH, _PART_WIDTH * float(hw.max()))
    return SyntheticStructure(
        n_channels=c, height=lay.height, width=lay.width, sharpness=_SHARPNESS, image_spread=_IMAGE_SPREAD,
        class_probs=class_probs, prototypes=prototypes, cluster_of=cluster_of, cluster_names=names,
        is_local=is_local, part_centres=part_centres, part_width=part_width, noise=float(cfg.noise),
        **semantic,
    )


def _splits(rng: np.random.Generator, lay: _Layout) -> tuple[np.ndarray, ...]:
    """Unseen and validation classes, image labels (shuffled order) and the three split locations."""
    k = lay.n_classes
    unseen = np.sort(rng.choice(k, lay.n_unseen, replace=False))
    seen = np.setdiff1d(np.arange(k), unseen)
    val = np.sort(rng.choice(seen, lay.n_val, replace=False))
    # Mildly imbalanced classes, as in the real benchmarks.
    n_seen_images = lay.n_trainval + lay.n_test_seen
    seen_counts = _allocate(n_seen_images, rng.uniform(0.75, 1.25, seen.size), np.ones(seen.size, int),
                            np.full(seen.size, n_seen_images))
    unseen_counts = _allocate(lay.n_test_unseen, rng.uniform(0.75, 1.25, unseen.size),
                              np.ones(unseen.size, int), np.full(unseen.size, lay.n_test_unseen))
    # Test-seen images: about the same share of every seen class, each keeping one trainval image.
    test_counts = _allocate(lay.n_test_seen, seen_counts.astype(float), np.zeros(seen.size, int),
                            seen_counts - 1)
    counts = np.zeros(k, dtype=np.int64)
    counts[seen], counts[unseen] = seen_counts, unseen_counts
    labels = np.repeat(np.arange(k), counts)[rng.permutation(lay.n_images)]
    is_test_seen = np.zeros(lay.n_images, dtype=bool)
    for cls, n_test in zip(seen, test_counts, strict=True):
        members = np.flatnonzero(labels == cls)
        is_test_seen[rng.choice(members, n_test, replace=False)] = True
    is_unseen = np.isin(labels, unseen)
    trainval = np.flatnonzero(~is_unseen & ~is_test_seen)
    return unseen, val, labels, trainval, np.flatnonzero(is_test_seen), np.flatnonzero(is_unseen)


def _semantic_vectors(rng: np.random.Generator, cluster_of: np.ndarray, q: int, g: int) -> np.ndarray:
    centres = rng.standard_normal((q, g))
    return (centres[cluster_of] + _W2V_SPREAD * rng.standard_normal((cluster_of.size, g))).astype(np.float32)


def make_synthetic(cfg: SyntheticConfig | None = None) -> ZSLData:
    """Build the generated benchmark of ``cfg`` (default config when None); deterministic in ``cfg.seed``.

    ``cfg.preset`` (cub, sun, awa2) takes the real shapes from the benchmark table
    (:mod:`dedn.data.benchmarks`): image count and split sizes, the paper's feature-map shape
    (C x h x w), K, unseen and validation class counts, D, G and the paper attribute clusters;
    ``local_fraction``, ``noise`` and ``seed`` still apply. Without a preset the explicit numbers of the
    config are used and the clusters are contiguous, nearly equal attribute ranges ``part0 ...``.
    Features are lazy (:class:`SyntheticFeatures`); nothing of size N x C x h x w is allocated.

    Raises:
        ConfigError: unknown preset or inconsistent numbers (for example too few images).
    """
    cfg = cfg if cfg is not None else SyntheticConfig()
    lay = _layout(cfg)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence([cfg.seed, _TAG_STRUCTURE]).spawn(5)]
    rng_classes, rng_proto, rng_parts, rng_splits, rng_w2v = rngs
    structure = _structure([rng_classes, rng_proto, rng_parts], lay, cfg)
    class_probs = structure.class_probs
    unseen, val, labels, trainval, test_seen, test_unseen = _splits(rng_splits, lay)
    w2v = _semantic_vectors(rng_w2v, structure.cluster_of, structure.n_clusters, lay.semantic_dim)
    att = (class_probs / np.linalg.norm(class_probs, axis=1, keepdims=True)).astype(np.float32)
    cluster_names = structure.cluster_names
    kind = np.where(structure.is_local, "local", "global")
    attribute_names = [f"{cluster_names[structure.cluster_of[a]]}_{kind[a]}_{a:03d}"
                       for a in range(lay.n_attributes)]
    features = SyntheticFeatures(structure, labels, cfg.seed)
    source = f"synthetic(preset={cfg.preset}, seed={cfg.seed})"
    data = ZSLData(
        name=lay.name,
        features=features,
        labels=labels,
        att=att,
        w2v=w2v,
        trainval_loc=trainval,
        test_seen_loc=test_seen,
        test_unseen_loc=test_unseen,
        class_names=[f"class{k:03d}" for k in range(lay.n_classes)],
        attribute_names=attribute_names,
        val_classes=val,
        clusters={name: lay.clusters[name].copy() for name in cluster_names},
        source=source,
        provenance={"generator": "dedn.data.synthetic", "config": asdict(cfg), "unseen_classes": unseen.tolist()},
    )
    data.validate()
    return data
