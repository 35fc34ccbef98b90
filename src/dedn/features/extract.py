"""Images -> feature store: batched, checked, resumable, and sharded across GPUs with torchrun.

:func:`extract_features` runs a frozen :class:`dedn.features.backbones.Backbone` over a list of image files and
writes the feature maps chunk by chunk into a :class:`dedn.data.store.FeatureStore`.

- Every image of the work to do is decoded once before anything is written; all unreadable or truncated
  files are reported together, by path, in one :class:`DataError`. None is ever skipped silently.
- Batches never straddle a chunk, so a chunk is always computed from the same batches. Resuming an
  interrupted run (``resume=True``) recomputes only the chunks not marked complete and gives the same
  store as an uninterrupted run. Resuming with another backbone, weights (by their sha256), layer, image size,
  transform or image list is an error, never a silent mix.
- Under ``torchrun`` (env ``RANK`` / ``WORLD_SIZE``), rank r takes the chunks i with i % world_size == r
  and writes them into the same preallocated file (disjoint regions). Ranks record finished chunks in
  their own ``complete.rank<r>.json``; rank 0 creates the store before, and merges those files into
  ``store.json`` after, a barrier. No two processes ever write the same file.
- On CUDA the forward pass runs under autocast (bfloat16 where supported, else float16); on the CPU in
  float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dedn.data.store import STORE_JSON, FeatureStore, SemanticSide
from dedn.devices import join_process_group, resolve_device
from dedn.errors import DataError
from dedn.features.backbones import Backbone, get_backbone, to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Provenance entries that must match for a resumed extraction to continue an existing store.
RESUME_KEYS = ("backbone", "model", "weights", "weights_sha256", "layer", "image_size", "transform", "image_list_hash")
# Errors PIL raises for unreadable, truncated or malformed files.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


# ---------------------------------------------------------------------------------------------- images
@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make PIL raise on truncated files even if some other library switched that off globally."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image (truncation is an error), apply EXIF orientation, convert to RGB."""
    with _strict_decoding(), Image.open(path) as image:
        image.load()
        return to_rgb(image)


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open and fully decode an image as RGB; any failure is a :class:`DataError` naming the path."""
    try:
        return read_image(path)
    except _IMAGE_ERRORS as exc:
        raise DataError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None


class ImageDataset(Dataset):
    """``(transform(image), index)`` for each path; an unreadable image raises :class:`DataError`."""

    def __init__(self, paths: Sequence[str], transform: Any) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.paths[i])), i


class _CheckDataset(Dataset):
    """``(index, problem)`` for each path: problem is ``""`` when the image decodes completely."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, str]:
        try:
            read_image(self.paths[i])
        except _IMAGE_ERRORS as exc:
            return i, f"{type(exc).__name__}: {exc}"
        return i, ""


def _first(batch: list[Any]) -> list[Any]:
    return batch


def find_bad_images(paths: Sequence[str], num_workers: int = 2, progress: bool = True) -> list[str]:
    """Decode every image (in parallel workers); return ``"path: reason"`` for each one that fails."""
    loader = DataLoader(_CheckDataset(paths), batch_size=16, num_workers=num_workers, collate_fn=_first)
    bad: list[str] = []
    with tqdm(total=len(paths), unit="img", desc="check images", disable=not progress) as bar:
        for batch in loader:
            bad.extend(f"{paths[i]}: {problem}" for i, problem in batch if problem)
            bar.update(len(batch))
    return bad


def _image_list_hash(paths: Sequence[str], labels: np.ndarray) -> str:
    h = hashlib.sha256()
    for p in paths:
        # Absolute: the same images named from another folder (relative vs absolute --images) hash the same.
        h.update(os.path.abspath(p).encode("utf-8", "surrogateescape") + b"\0")
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- distributed
def _dist_env(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def _gather_lists(items: list[str]) -> list[str]:
    """All ranks' lists, concatenated in rank order (just ``items`` without a process group)."""
    if not _distributed():
        return items
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, items)
    return [x for part in out for x in part]


# ---------------------------------------------------------------------------------------------- extraction
def _check_resumable(store: FeatureStore, provenance: Mapping[str, Any], n: int, dtype: str,
                     feature_shape: tuple[int, ...] | None = None) -> None:
    """Refuse to continue a store made with other settings (checked before any forward pass)."""
    old = store.provenance
    diff = [k for k in RESUME_KEYS if old.get(k) != provenance.get(k)]
    same_layout = len(store) == n and store.dtype == np.dtype(dtype) and (
        feature_shape is None or tuple(store.shape[1:]) == tuple(feature_shape))
    if diff or not same_layout:
        details = "; ".join(f"{k}: store has {old.get(k)!r}, this run {provenance.get(k)!r}" for k in diff)
        if not diff:
            details = (f"layout: store has {store.shape} {store.dtype}, this run {n} images of "
                       f"{feature_shape} {dtype}")
        raise DataError(f"{store.path}: cannot resume this feature store with different settings "
                        f"({details}); use the original settings, or pass overwrite=True (--overwrite) to "
                        "start over")


def _batches(store: FeatureStore, chunks: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches that never cross a chunk boundary, so every chunk is computed the same way."""
    out = []
    for i in chunks:
        start, stop = store.chunk_range(i)
        out.extend(list(range(b, min(b + batch_size, stop))) for b in range(start, stop, batch_size))
    return out


def _autocast(device: torch.device, amp: bool) -> tuple[contextlib.AbstractContextManager[Any], str]:
    if device.type != "cuda" or not amp:
        return contextlib.nullcontext(), "float32"
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), f"{str(dtype).removeprefix('torch.')} autocast"


@dataclass(frozen=True)
class ExtractOptions:
    """How :func:`extract_features` runs: every setting besides the images, the store and the backbone.

    Attributes:
        image_size: input size in pixels (default: the backbone's ``default_image_size``).
        batch_size, num_workers: DataLoader settings (workers decode and transform images).
        device: ``"auto"`` (CUDA when available; under torchrun ``cuda:LOCAL_RANK``), ``"cpu"``, ...
        resume: continue an existing store with the chunks it misses (same settings required).
        progress: show tqdm progress bars (rank 0 only).
        provenance_extra: extra entries for the store's provenance, e.g. ``{"dataset": "CUB"}``.
        dtype: ``"float16"`` (default, half the disk) or ``"float32"``.
        chunk_size: images per chunk, the unit of resumption and of sharding (a resumed store keeps the
            chunk size it was created with).
        overwrite: replace an existing store instead of resuming it.
        check_images: decode every image first and report all bad files at once (recommended; costs one
            extra decoding pass). With ``False`` a bad image stops the run when it is reached (resumable).
        amp: autocast on CUDA (ignored on the CPU).
        rank, world_size: shard of the work (default: env ``RANK`` / ``WORLD_SIZE``, else 0 / 1).
    """

    image_size: int | None = None
    batch_size: int = 32
    num_workers: int = 2
    device: str | torch.device = "auto"
    resume: bool = True
    progress: bool = True
    provenance_extra: Mapping[str, Any] | None = None
    dtype: str = "float16"
    chunk_size: int = 256
    overwrite: bool = False
    check_images: bool = True
    amp: bool = True
    rank: int | None = None
    world_size: int | None = None


def _check_inputs(paths: list[str], labels: np.ndarray, batch_size: int) -> None:
    """Refuse an empty image list, mismatched labels, missing files and a bad batch size before any work."""
    if len(paths) == 0:
        raise DataError("no images to extract features from")
    if labels.shape != (len(paths),):
        raise DataError(f"{len(paths)} images but labels of shape {labels.shape}")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} image files do not exist: " + ", ".join(missing[:10])
                        + (" ..." if len(missing) > 10 else ""))
    if int(batch_size) < 1:
        raise DataError(f"batch_size must be positive, got {batch_size}")


def _rank_device(device: str | torch.device, rank: int, world_size: int) -> torch.device:
    """The device of this rank (under torchrun ``"auto"`` means the rank's own GPU), made current on CUDA."""
    if isinstance(device, str) and device == "auto" and world_size > 1 and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank % torch.cuda.device_count()))}"
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # NCCL and pinned-memory copies use the current device
    return dev


def _ready_backbone(backbone: Backbone | str, dev: torch.device) -> Backbone:
    """The backbone built (from a registered name) and moved to ``dev``."""
    if isinstance(backbone, str):
        backbone = get_backbone(backbone, device=dev)
    backbone = backbone.to(dev)
    if dev.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)  # faster convolutions on tensor cores
    return backbone


class _Extraction:
    """One rank's extraction, step by step: plan, check images, open the store, extract, merge marks."""

    def __init__(self, paths: list[str], labels: np.ndarray, store_path: str | os.PathLike[str],
                 backbone: Backbone, options: ExtractOptions, shard: tuple[int, int], dev: torch.device) -> None:
        self.paths, self.labels, self.store_path = paths, labels, store_path
        self.backbone, self.options, self.dev = backbone, options, dev
        self.rank, self.world_size = shard
        self.size = int(options.image_size or backbone.default_image_size)
        self.autocast, precision = _autocast(dev, options.amp)
        self.provenance = {**backbone.provenance(self.size), "image_list_hash": _image_list_hash(paths, labels),
                           "precision": precision, **(options.provenance_extra or {})}
        self.n = len(paths)
        self.store_file = Path(store_path) / STORE_JSON
        self.fshape: tuple[int, ...] = ()

    def plan(self) -> tuple[FeatureStore | None, list[int]]:
        """The existing store to resume (None: a new one) and this rank's chunks left to do (read-only)."""
        o = self.options
        existing = None
        if self.store_file.exists() and o.resume and not o.overwrite:
            existing = FeatureStore.open(self.store_path)
            _check_resumable(existing, self.provenance, self.n, o.dtype)
            todo = existing.missing_chunks()
        elif self.store_file.exists() and not o.overwrite:
            raise DataError(f"a feature store already exists at {self.store_path}; pass resume=True to continue "
                            "it or overwrite=True (--overwrite) to replace it")
        else:
            todo = list(range(-(-self.n // o.chunk_size)))
        mine = [i for i in todo if i % self.world_size == self.rank]
        self.fshape = self.backbone.feature_shape(self.size)
        if existing is not None:
            _check_resumable(existing, self.provenance, self.n, o.dtype, self.fshape)
        return existing, mine

    def check_images(self, existing: FeatureStore | None, mine: list[int]) -> None:
        """Decode every image of the work left (all ranks') and report every bad one before writing anything."""
        cs = existing.chunk_size if existing is not None else self.options.chunk_size  # a resumed store keeps its own
        ranges = [(i * cs, min((i + 1) * cs, self.n)) for i in mine]
        bad = _gather_lists(find_bad_images([p for s, e in ranges for p in self.paths[s:e]], self.options.num_workers,
                                            self.options.progress and self.rank == 0))
        if bad:
            raise DataError(f"{len(bad)} images cannot be read (truncated, corrupt or not an image); fix "
                            "or remove them and run again:\n  " + "\n  ".join(bad))

    def open_store(self, existing: FeatureStore | None) -> FeatureStore:
        """Rank 0 creates the store (or merges leftover rank marks); the others wait, then open it."""
        o = self.options
        _barrier()  # every rank has finished looking at the old store before rank 0 may replace it
        if self.rank == 0:
            if existing is None:
                store = FeatureStore.create(self.store_path, self.n, self.fshape, dtype=o.dtype,
                                            chunk_size=o.chunk_size, provenance=self.provenance,
                                            overwrite=o.overwrite, labels=self.labels)
                store.save_semantics(SemanticSide(image_files=self.paths))
            else:
                store = existing
                if self.world_size == 1:
                    store.merge_rank_marks()  # marks left by an earlier sharded run
        _barrier()
        if self.rank != 0:
            if not self.store_file.exists():
                raise DataError(f"{self.store_path}: rank {self.rank} found no feature store; rank 0 creates it "
                                "first")
            store = FeatureStore.open(self.store_path)
            _check_resumable(store, self.provenance, self.n, o.dtype, self.fshape)
        return store

    def extract(self, store: FeatureStore) -> None:
        """Compute and write this rank's missing chunks, marking each one complete once all its rows are in."""
        o, dev = self.options, self.dev
        mine = [i for i in store.missing_chunks() if i % self.world_size == self.rank]
        batches = _batches(store, mine, int(o.batch_size))
        remaining = {i: store.chunk_range(i)[1] - store.chunk_range(i)[0] for i in mine}
        chunk_of = {b[0]: b[0] // store.chunk_size for b in batches}
        loader = DataLoader(ImageDataset(self.paths, self.backbone.transform(self.size)), batch_sampler=batches,
                            num_workers=o.num_workers, pin_memory=dev.type == "cuda")
        out_dtype = torch.float16 if o.dtype == "float16" else torch.float32
        mark_rank = self.rank if self.world_size > 1 else None
        old_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True  # one fixed input size: let cuDNN pick the fastest kernels
        try:
            with tqdm(total=sum(remaining.values()), unit="img", desc=f"extract {self.backbone.name}@{self.size}",
                      disable=not o.progress or self.rank != 0) as bar:
                for images, index in loader:
                    x = images.to(dev, non_blocking=True)
                    if dev.type == "cuda":
                        x = x.contiguous(memory_format=torch.channels_last)
                    with self.autocast:
                        feats = self.backbone(x)
                    start = int(index[0])
                    store.write_rows(start, feats.to(out_dtype).contiguous().cpu().numpy())
                    chunk = chunk_of[start]
                    remaining[chunk] -= len(index)
                    if remaining[chunk] == 0:
                        store.mark_complete(chunk, rank=mark_rank)
                    bar.update(len(index))
        finally:
            torch.backends.cudnn.benchmark = old_benchmark

    def finish(self, store: FeatureStore) -> None:
        """Everyone done: rank 0 folds the per-rank marks into store.json."""
        _barrier()
        if self.rank == 0 and _distributed():
            store.merge_rank_marks()
        _barrier()
        store.refresh()


def extract_features(
    image_paths: Sequence[str | os.PathLike[str]],
    labels: Sequence[int] | np.ndarray,
    store_path: str | os.PathLike[str],
    backbone: Backbone | str,
    options: ExtractOptions | None = None,
) -> FeatureStore:
    """Extract the feature maps of ``image_paths`` into a feature store at ``store_path``.

    Args:
        image_paths, labels: one 0-based class label per image.
        store_path: the store folder (created, or resumed when it exists and ``options.resume`` is true).
        backbone: a :class:`Backbone`, or a registered name (built with its default pretrained weights).
        options: how to run (default: :class:`ExtractOptions` ()).

    Returns:
        The store, complete once every rank has finished.
    """
    options = options or ExtractOptions()
    paths = [os.fspath(p) for p in image_paths]
    labels_arr = np.asarray(labels)
    _check_inputs(paths, labels_arr, options.batch_size)
    rank, world_size = _dist_env(options.rank, options.world_size)
    dev = _rank_device(options.device, rank, world_size)
    started_group = world_size > 1 and join_process_group(dev)
    try:
        run = _Extraction(paths, labels_arr, store_path, _ready_backbone(backbone, dev), options,
                          (rank, world_size), dev)
        existing, mine = run.plan()
        if options.check_images:
            run.check_images(existing, mine)
        store = run.open_store(existing)
        run.extract(store)
        run.finish(store)
        return store
    finally:
        if started_group:
            torch.distributed.destroy_process_group()


def list_image_folder(
    image_root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], np.ndarray, list[str]]:
    """Image files, labels and class names of a folder with one subfolder per class (ImageFolder-like).

    Classes are the sorted subfolder names; images are found recursively inside each, sorted by path.
    """
    root = Path(image_root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    exts = tuple(e.lower() for e in extensions)

    def images_in(folder: Path, recursive: bool) -> list[Path]:
        found = folder.rglob("*") if recursive else folder.iterdir()
        return sorted(p for p in found if p.is_file() and p.suffix.lower() in exts)

    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = images_in(root, recursive=False)
        if loose:
            raise DataError(f"{root} holds {len(loose)} images but no class subfolders; put each class's "
                            f"images in its own subfolder ({root}/<class>/<image>)")
        raise DataError(f"{root} is empty: expected one subfolder per class holding images with extensions "
                        f"{', '.join(exts)}")
    paths, labels, empty = [], [], []
    for k, c in enumerate(classes):
        files = images_in(root / c, recursive=True)
        if not files:
            empty.append(c)
        paths.extend(str(p) for p in files)
        labels.extend([k] * len(files))
    if empty:
        raise DataError(f"{root}: class folders without images ({', '.join(empty[:10])}); accepted "
                        f"extensions: {', '.join(exts)}")
    return paths, np.asarray(labels, dtype=np.int64), classes


def extract_folder(
    image_root: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    backbone: Backbone | str,
    options: ExtractOptions | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> FeatureStore:
    """:func:`extract_features` over a folder of class subfolders; class names go into the store's meta."""
    options = options or ExtractOptions()
    paths, labels, classes = list_image_folder(image_root, extensions)
    store = extract_features(paths, labels, store_path, backbone, options)
    rank, _ = _dist_env(options.rank, options.world_size)
    if rank == 0:
        store.save_semantics(SemanticSide(class_names=classes))
    return store
