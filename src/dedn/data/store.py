"""The feature store: N region feature maps on disk, read on demand, float16 by default.

A store is a folder::

    store.json          format, N, (C, h, w), dtype, chunk size, header hash, provenance, completed chunks
                        and the checksum of each completed chunk
    features.bin        raw C-order array (N, C, h, w), preallocated at creation, read with pread
    labels.npy          (N,) int64 class of each image (optional until known)
    meta.npz            optional semantic side: att, w2v, splits, names, image files
    complete.rank*.json completion marks written by the ranks of a sharded extraction

Writing is chunk by chunk (``chunk_size`` images). A chunk counts only once it is marked complete,
and it is marked only after its bytes are synced to disk, so an interrupted writer resumes with the
missing chunks and never trusts half-written data. ``store.json`` is only ever replaced atomically
(temp file with a unique name + ``os.replace``); concurrent ranks each write their own ``complete.rank<r>.json``
and rank 0 merges them, so no two processes ever write the same file.

Nothing is trusted silently: ``store.json`` carries a hash of the fields that define the layout (an edited
shape or dtype with the same byte count would otherwise read as garbage), every completion mark carries a
blake2b checksum of the chunk's bytes read back from disk (:meth:`FeatureStore.verify` re-reads and compares
them), and an imported store records the identity of its source file (see :func:`import_hdf5`).

Reads use positioned reads (``os.preadv``) into private buffers rather than a memory map: the pages of a
memory-mapped file that a process touches count towards its resident memory for as long as the map
lives, so random batches over a store larger than RAM would grow the trainer's RSS towards the size of
the file. Read pages stay in the kernel's page cache, which is not the process's and is reclaimed as needed.

This module also reads and writes the DAZLE/DEDN HDF5 layout (``feature_map``, ``labels``,
``trainval_loc``, ``test_seen_loc``, ``test_unseen_loc``, ``att``, ``original_att``, ``w2v_att``):
:func:`import_hdf5` (streamed, resumable), :func:`export_hdf5`, and :func:`open_hdf5_lazily` /
:func:`load_hdf5_zsldata` to use such a file in place without importing it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dedn.atomic import atomic_write_bytes
from dedn.data.dataset import ZSLData
from dedn.data.sources import DeviceFeatures, FeatureSource
from dedn.errors import DataError

if TYPE_CHECKING:
    import torch

FORMAT = "dedn-feature-store"
VERSION = 1
STORE_JSON = "store.json"
FEATURES_BIN = "features.bin"
LABELS_NPY = "labels.npy"
META_NPZ = "meta.npz"
_RANK_PREFIX = "complete.rank"
DTYPES = ("float16", "float32")
_READ_BLOCK_BYTES = 64 << 20  # largest single read (and read buffer) of a gather
_MERGE_GAP_BYTES = 256 << 10  # rows closer than this on disk are read in one go, gap included
# The store.json fields that define how features.bin is laid out; their hash is stored as HEADER_HASH.
_HEADER_FIELDS = ("format", "version", "n", "shape", "dtype", "chunk_size", "n_chunks", "features_bytes")
HEADER_HASH = "header_sha256"
_CHUNK_HASH = "blake2b"  # chunk checksums are "blake2b:<32 hex digits>" (128-bit digest)
# What reading a damaged .npy / .npz can raise (zip CRC and structure errors, truncation, bad headers).
_NPY_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile, zlib.error)

# Keys of the DAZLE/DEDN feature file; original_att is optional on import.
_SPLITS = ("trainval_loc", "test_seen_loc", "test_unseen_loc")


# ---------------------------------------------------------------------------------------------- small helpers
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:mod:`dedn.atomic`); a write error (a full disk) becomes a
    :class:`DataError` naming ``path``, and the old file, if any, is left as it was."""
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        raise DataError(f"could not write {path} ({exc.strerror or exc}); free disk space (or fix permissions) "
                        "and run the command again: work already finished is kept") from exc


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def _fdatasync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _pread_into(fd: int, buf: np.ndarray, offset: int, where: Path) -> None:
    """Fill the C-contiguous array ``buf`` with the bytes of ``fd`` from ``offset`` on."""
    view = memoryview(buf.reshape(-1).view(np.uint8))
    while view.nbytes:  # reads may return less than asked for
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view], offset)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, view.nbytes, offset)
            got = len(data)
            view[:got] = data
        if got == 0:
            raise DataError(f"{where} ends before byte {offset}: the file is truncated; copy it again or "
                            "re-create the store")
        view, offset = view[got:], offset + got


def header_hash(info: Mapping[str, Any]) -> str:
    """sha256 of the layout fields of a ``store.json`` (``_HEADER_FIELDS``), to detect hand edits."""
    ident = {k: info.get(k) for k in _HEADER_FIELDS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def split_hash(labels: np.ndarray, *splits: np.ndarray) -> str:
    """A short fingerprint of labels and split indices, to tell two datasets apart in provenance."""
    h = hashlib.sha256()
    for arr in (labels, *splits):
        a = np.ascontiguousarray(np.asarray(arr, dtype="<i8"))
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _as_index_array(values: Any, where: str) -> np.ndarray:
    """A 1-D int64 array from an integer-valued array (HDF5 files sometimes store indices as floats)."""
    a = np.asarray(values).squeeze()
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise DataError(f"{where}: expected a one-dimensional index array, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise DataError(f"{where}: expected integer indices, got dtype {a.dtype}")
    return a.astype(np.int64)


def _str_list(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1).tolist()]


# ---------------------------------------------------------------------------------------------- the store
@dataclass(frozen=True)
class SemanticSide:
    """Entries of a store's semantic side (``meta.npz``) for :meth:`FeatureStore.save_semantics`; None: not given.

    Attributes:
        att, w2v, original_att: (K, D) class attributes, (D, G) attribute vectors, the unnormalised attributes.
        trainval_loc, test_seen_loc, test_unseen_loc: 0-based image indices of the splits.
        class_names, attribute_names: K and D names.
        val_classes: class indices of the validation split's classes.
        clusters: attribute clusters (name -> attribute indices); replace every stored cluster.
        image_files: one image path per feature map.
        name: the dataset name.
    """

    att: np.ndarray | None = None
    w2v: np.ndarray | None = None
    trainval_loc: np.ndarray | None = None
    test_seen_loc: np.ndarray | None = None
    test_unseen_loc: np.ndarray | None = None
    class_names: list[str] | None = None
    attribute_names: list[str] | None = None
    original_att: np.ndarray | None = None
    val_classes: np.ndarray | None = None
    clusters: Mapping[str, np.ndarray] | None = None
    image_files: list[str] | None = None
    name: str | None = None

    @classmethod
    def of(cls, data: ZSLData) -> SemanticSide:
        """The semantic side of a benchmark: everything but its features and labels."""
        return cls(att=data.att, w2v=data.w2v, trainval_loc=data.trainval_loc, test_seen_loc=data.test_seen_loc,
                   test_unseen_loc=data.test_unseen_loc, class_names=data.class_names,
                   attribute_names=data.attribute_names, val_classes=data.val_classes, clusters=data.clusters,
                   name=data.name)


class _InOrder:
    """Runs calls in the order given: here, or (``threaded``) in one worker thread with at most ``depth`` calls
    waiting, so the caller prepares the next one meanwhile while memory stays bounded by a few. Once a call
    fails, the later ones are skipped (a chunk's completion mark must never follow a failed write of it).
    Leaving the block waits for every call and raises the first error of a call (unless the block raised)."""

    def __init__(self, threaded: bool, depth: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1) if threaded else None
        self._pending: deque[Future[None]] = deque()
        self._depth = depth
        self._failed = False

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
        if self._failed:
            return
        try:
            fn(*args)
        except BaseException:
            self._failed = True
            raise

    def __call__(self, fn: Callable[..., None], *args: Any) -> None:
        if self._pool is None:
            fn(*args)
            return
        self._pending.append(self._pool.submit(self._run, fn, args))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def __enter__(self) -> _InOrder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if self._pool is None:
            return
        try:
            while self._pending and exc_type is None:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)


@dataclass
class VerifyReport:
    """What :meth:`FeatureStore.verify` checked (it raises instead of returning when something is bad)."""

    path: Path
    n_chunks: int
    verified: int
    missing: list[int] = field(default_factory=list)
    semantics: str = ""

    def summary(self) -> str:
        """One line for the command line."""
        parts = [f"{self.verified}/{self.n_chunks} chunks match their checksums"]
        if self.missing:
            parts.append(f"{len(self.missing)} not written yet")
        return f"OK: {self.path}: {', '.join(parts)}; {self.semantics}"


class FeatureStore(FeatureSource):
    """N feature maps (N, C, h, w) in a folder on disk; see the module docstring for the layout.

    Build one with :meth:`create` (then :meth:`write_chunk`) or open one with :meth:`open`.
    Reading (``store[idx]``) returns float32 numpy arrays for an int, a slice or an int array (any order,
    duplicates allowed); as a :class:`~dedn.data.sources.FeatureSource` a store is a
    :class:`dedn.data.dataset.ZSLData`'s ``features``. Reads do not check completeness (a chunk not yet written
    reads as zeros); :func:`load_zsldata`, :meth:`resident_copy` and :func:`export_hdf5` refuse an incomplete
    store.
    """

    def __init__(self, path: str | os.PathLike[str], info: dict[str, Any]) -> None:
        """Use :meth:`create` or :meth:`open`; this only wraps an already validated ``store.json``."""
        self.path = Path(path)
        self._info = info
        self._fd: int | None = None  # write handle
        self._rfd: int | None = None  # read handle
        self._labels: np.ndarray | None = None
        marks, sums = self._rank_marks()
        self._completed = set(int(i) for i in info["complete_chunks"]) | marks
        self._checksums: dict[int, str] = {int(k): v for k, v in info["chunk_checksums"].items()} | sums

    # ------------------------------------------------------------------ creation and opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        n: int,
        shape: Iterable[int],
        dtype: str = "float16",
        chunk_size: int = 256,
        provenance: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        labels: np.ndarray | None = None,
    ) -> FeatureStore:
        """Make an empty store for ``n`` maps of ``shape`` (C, h, w), preallocating ``features.bin``.

        The whole file is allocated up front (``posix_fallocate``) so a full disk fails here, not half-way
        through an extraction. ``overwrite=True`` replaces an existing store (only a folder holding nothing
        but store files is ever cleared); otherwise an existing store is an error.
        """
        path = Path(path)
        shape = tuple(int(s) for s in shape)
        if int(n) < 1:
            raise DataError(f"{path}: a feature store needs at least one image, got n={n}")
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"{path}: feature map shape must be (C, h, w) with positive sizes, got {shape}")
        if dtype not in DTYPES:
            raise DataError(f"{path}: store dtype must be one of {DTYPES}, got {dtype!r}")
        if int(chunk_size) < 1:
            raise DataError(f"{path}: chunk_size must be positive, got {chunk_size}")
        n, chunk_size = int(n), int(chunk_size)
        _prepare_folder(path, overwrite)

        nbytes = n * int(np.prod(shape)) * np.dtype(dtype).itemsize
        _preallocate(path / FEATURES_BIN, nbytes)
        if labels is not None:
            _write_labels(path, labels, n)
        info = {
            "format": FORMAT,
            "version": VERSION,
            "n": n,
            "shape": list(shape),
            "dtype": dtype,
            "chunk_size": chunk_size,
            "n_chunks": -(-n // chunk_size),
            "features_bytes": nbytes,
            "provenance": dict(provenance or {}),
            "complete_chunks": [],
            "chunk_checksums": {},
        }
        info[HEADER_HASH] = header_hash(info)
        # store.json comes last: a folder without it is an interrupted creation, never a store.
        _atomic_write_json(path / STORE_JSON, info)
        return cls(path, info)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> FeatureStore:
        """Open an existing store, checking ``store.json`` and the size of ``features.bin``."""
        path = Path(path)
        meta_file = path / STORE_JSON
        fix = "re-create it (extract or import again with overwrite=True / --overwrite)"
        if not meta_file.is_file():
            if path.is_dir() and (path / FEATURES_BIN).exists():
                raise DataError(f"{meta_file} is missing: the store's creation was interrupted; {fix}")
            raise DataError(f"{path} is not a feature store: {meta_file} does not exist; make a store from images "
                            "with `dedn extract`, or from a DAZLE/DEDN HDF5 file with `dedn store import`")
        try:
            info = json.loads(meta_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{meta_file} is corrupt ({exc}); the store cannot be trusted: {fix}") from exc
        _check_info(info, meta_file, fix)
        bin_file = path / FEATURES_BIN
        if not bin_file.is_file():
            raise DataError(f"{bin_file} is missing; {fix}")
        size = bin_file.stat().st_size
        if size != info["features_bytes"]:
            raise DataError(
                f"{bin_file} has {size} bytes but {info['n']} feature maps of shape {tuple(info['shape'])} "
                f"({info['dtype']}) need {info['features_bytes']}: the file is truncated or from another "
                f"store (an interrupted copy or a full disk); copy it again or {fix}"
            )
        store = cls(path, info)
        if (path / LABELS_NPY).exists():
            store.labels  # noqa: B018 - validate labels.npy now rather than at first use
        return store

    # ------------------------------------------------------------------ facts
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N, C, h, w)."""
        return (self._info["n"], *self._info["shape"])

    @property
    def dtype(self) -> np.dtype:
        """The on-disk dtype (float16 or float32); reads are always float32."""
        return np.dtype(self._info["dtype"])

    @property
    def chunk_size(self) -> int:
        return int(self._info["chunk_size"])

    @property
    def n_chunks(self) -> int:
        return int(self._info["n_chunks"])

    @property
    def nbytes(self) -> int:
        """Size of the feature maps on disk (and on a GPU, see :meth:`resident_copy`)."""
        return int(self._info["features_bytes"])

    @property
    def identity(self) -> str:
        """A short text that changes when the stored features change: header hash, shape and chunk checksums
        (a run records it and refuses to resume on other features)."""
        # "features_mtime_ns" is always None now; it stays in the hashed fields so that identities already
        # recorded by runs keep their value.
        fields = {"header": self._info[HEADER_HASH], "shape": list(self.shape), "dtype": str(self.dtype),
                  "chunks": sorted(self._checksums.items()), "features_mtime_ns": None}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def provenance(self) -> dict[str, Any]:
        """What made these features (backbone, weights, image size, transform, dataset, split hash, ...)."""
        return dict(self._info["provenance"])

    def __len__(self) -> int:
        return int(self._info["n"])

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.path)!r}, shape={self.shape}, dtype={self.dtype}, "
                f"complete={len(self._completed)}/{self.n_chunks} chunks)")

    def chunk_range(self, i: int) -> tuple[int, int]:
        """[start, stop) image indices of chunk ``i``."""
        if not 0 <= i < self.n_chunks:
            raise IndexError(f"chunk {i} out of range 0..{self.n_chunks - 1}")
        start = i * self.chunk_size
        return start, min(start + self.chunk_size, len(self))

    # ------------------------------------------------------------------ labels
    @property
    def labels(self) -> np.ndarray | None:
        """(N,) int64 labels, or ``None`` when the store has none yet."""
        if self._labels is None and (self.path / LABELS_NPY).exists():
            f = self.path / LABELS_NPY
            try:
                labels = np.load(f, allow_pickle=False)
            except _NPY_READ_ERRORS as exc:
                raise DataError(f"{f} is corrupt ({type(exc).__name__}: {exc}); {self._rebuild_hint(f)}") from exc
            if labels.shape != (len(self),) or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{f}: expected ({len(self)},) integer labels, got {labels.shape} "
                                f"{labels.dtype}")
            self._labels = labels.astype(np.int64)
        return self._labels

    def set_labels(self, labels: np.ndarray) -> None:
        """Write ``labels.npy`` ((N,) integer class indices)."""
        self._labels = _write_labels(self.path, labels, len(self))

    # ------------------------------------------------------------------ reading
    @property
    def _row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def _read_fd(self) -> int:
        if self._rfd is None:
            self._rfd = os.open(self.path / FEATURES_BIN, os.O_RDONLY)
        return self._rfd

    def read_raw(self, start: int = 0, stop: int | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Maps ``start .. stop`` in the store dtype (no float32 conversion), read straight from the file.

        ``out``: a C-contiguous (stop - start, C, h, w) array of the store dtype to fill (default: a new one),
        e.g. a slice of a preallocated array when loading a whole store into memory block by block.
        """
        n = len(self)
        stop = n if stop is None else int(stop)
        start = int(start)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows {start}..{stop} outside 0..{n}")
        shape = (stop - start, *self.shape[1:])
        if out is None:
            out = np.empty(shape, dtype=self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.dtype} array of shape {shape}, got "
                             f"{out.dtype} {out.shape}")
        if stop > start:
            _pread_into(self._read_fd(), out, start * self._row_bytes, self.path / FEATURES_BIN)
        return out

    def _gather(self, flat: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
        """Maps of the in-range, non-negative indices ``flat`` (any order, duplicates allowed) as ``dtype``.

        Indices are visited in ascending order; rows that lie close together on disk are read in one go,
        in blocks of at most ``_READ_BLOCK_BYTES``, so memory beyond the result stays bounded.
        """
        out = np.empty((flat.size, *self.shape[1:]), dtype=dtype)
        if not flat.size:
            return out
        row_bytes = self._row_bytes
        order = np.argsort(flat, kind="stable")
        srt = flat[order]
        breaks = np.flatnonzero(np.diff(srt) > max(1, _MERGE_GAP_BYTES // row_bytes)) + 1
        starts, stops = np.r_[0, breaks], np.r_[breaks, srt.size]
        block = max(1, _READ_BLOCK_BYTES // row_bytes)
        span = int(np.max(srt[stops - 1] - srt[starts])) + 1
        buf = np.empty((min(block, span), *self.shape[1:]), dtype=self.dtype)
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            for s in range(int(srt[a]), int(srt[b - 1]) + 1, block):
                e = min(s + block, int(srt[b - 1]) + 1)
                i0, i1 = (a + np.searchsorted(srt[a:b], [s, e])).tolist()
                if i0 == i1:  # a block inside a gap between merged rows
                    continue
                lo, hi = int(srt[i0]), int(srt[i1 - 1]) + 1  # read only from the first to the last row asked for
                self.read_raw(lo, hi, out=buf[: hi - lo])
                out[order[i0:i1]] = buf[srt[i0:i1] - lo]
        return out

    def take(self, index: np.ndarray) -> np.ndarray:
        """The maps at the integer indices ``index`` (any order, duplicates) in the store's own dtype: a
        float16 store's batch without a float32 copy (bf16 training converts it on the device)."""
        flat = np.asarray(index, dtype=np.int64).reshape(-1)
        n = len(self)
        if flat.size and (flat.min() < 0 or flat.max() >= n):
            raise IndexError(f"index out of range for {n} feature maps")
        return self._gather(flat, self.dtype)

    def read(self, index: np.ndarray, stored_dtype: bool = False) -> torch.Tensor:
        """float32 maps of ``index`` as a CPU tensor; with ``stored_dtype`` in the store's dtype (:meth:`take`)."""
        if not stored_dtype:
            return super().read(index)
        import torch

        return torch.from_numpy(self.take(index))

    def __getitem__(self, index: Any) -> np.ndarray:
        """float32 copy of the maps at an int, a slice, or an int / bool array (any order, duplicates).

        A tuple selects maps with its first entry and indexes within them with the rest.
        """
        n = len(self)
        if isinstance(index, tuple):
            if not index:
                return self[:]
            first, rest = index[0], index[1:]
            maps = self[first]
            single = isinstance(first, (int, np.integer))
            return maps[rest] if single else maps[(slice(None), *rest)]
        if isinstance(index, (int, np.integer)):
            if not -n <= int(index) < n:
                raise IndexError(f"index {int(index)} out of range for {n} feature maps")
            return self._gather(np.array([int(index) % n]))[0]
        if isinstance(index, slice):
            return self._gather(np.arange(*index.indices(n), dtype=np.int64))
        idx = np.asarray(index)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise IndexError(f"boolean index of shape {idx.shape} for {len(self)} feature maps")
            idx = np.flatnonzero(idx)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"feature maps are indexed by integers, got dtype {idx.dtype}")
        flat = idx.reshape(-1).astype(np.int64)
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"index out of range for {n} feature maps")
        flat = np.where(flat < 0, flat + n, flat)
        return self._gather(flat).reshape(*idx.shape, *self.shape[1:])

    # ------------------------------------------------------------------ writing
    def write_rows(self, start: int, array: np.ndarray) -> None:
        """Write maps ``start .. start+len(array)`` without marking anything complete (no fsync)."""
        arr = np.asarray(array)
        if arr.ndim != 4 or tuple(arr.shape[1:]) != self.shape[1:]:
            want = ", ".join(map(str, self.shape[1:]))
            raise DataError(f"{self.path}: expected maps of shape (B, {want}), got {arr.shape}")
        if not 0 <= start <= len(self) - arr.shape[0]:
            raise DataError(f"{self.path}: rows {start}..{start + arr.shape[0]} outside 0..{len(self)}")
        with np.errstate(over="ignore"):  # overflow to inf is reported just below, with the image indices
            arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if not np.isfinite(arr).all():
            hint = ""
            if self.dtype == np.float16:
                hint = " (too large for float16? create the store with dtype='float32')"
            bad = start + np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1))
            raise DataError(f"{self.path}: feature maps of images {bad[:5].tolist()} hold NaN or infinite "
                            f"values{hint}")
        if self._fd is None:
            self._fd = os.open(self.path / FEATURES_BIN, os.O_RDWR)
        view = memoryview(arr.reshape(-1).view(np.uint8))
        offset = start * int(np.prod(self.shape[1:])) * self.dtype.itemsize
        try:
            while view.nbytes:  # pwrite may write less than asked for very large buffers
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as exc:  # a sparse features.bin (no fallocate) on a full disk
            raise DataError(f"could not write {self.path / FEATURES_BIN} ({exc.strerror or exc}); free disk "
                            "space and run the command again: chunks already finished are kept") from exc

    def write_chunk(self, i: int, array: np.ndarray, rank: int | None = None) -> None:
        """Write all of chunk ``i`` and mark it complete (see :meth:`mark_complete` for ``rank``)."""
        start, stop = self.chunk_range(i)
        if np.shape(array)[0] != stop - start:
            raise DataError(f"{self.path}: chunk {i} holds {stop - start} maps, got {np.shape(array)[0]}")
        self.write_rows(start, array)
        self.mark_complete(i, rank=rank)

    def fill_missing(self, read: Callable[[int, int], np.ndarray], block_rows: int | None = None,
                     desc: str = "writing features", progress: bool = False, write_behind: bool = False) -> int:
        """Write every missing chunk from ``read(start, stop)`` (the maps of rows start..stop-1), in blocks of
        at most ``block_rows`` rows, marking each chunk complete once its bytes are synced.

        The one loop that fills a store in a single process (HDF5 import, arrays, the built-in benchmark, the
        store benchmark): an interrupted fill resumes with the missing chunks. ``write_behind``: write and mark
        in one worker thread (in order, at most two blocks waiting) while ``read`` makes the next block, for
        sources that compute their rows. Returns the number of rows written.
        """
        from tqdm.auto import tqdm

        todo = self.missing_chunks()
        block = int(block_rows or self.chunk_size)
        total = sum(self.chunk_range(i)[1] - self.chunk_range(i)[0] for i in todo)
        with _InOrder(threaded=write_behind) as run, \
                tqdm(total=total, unit="img", desc=desc, disable=not progress or not total) as bar:
            for i in todo:
                start, stop = self.chunk_range(i)
                for s in range(start, stop, block):
                    e = min(s + block, stop)
                    rows = read(s, e)
                    if np.shape(rows)[0] != e - s:
                        raise DataError(f"{self.path}: rows {s}..{e - 1}: the source gave {np.shape(rows)[0]} maps")
                    run(self.write_rows, s, rows)
                    bar.update(e - s)
                run(self.mark_complete, i)  # after the chunk's writes: the worker keeps the order
        return total

    def sync(self) -> None:
        """Flush written feature bytes to disk."""
        if self._fd is not None:
            _fdatasync(self._fd)

    def chunk_checksum(self, i: int) -> str:
        """``blake2b:<hex>`` of chunk ``i``'s bytes as they are in ``features.bin`` now (read in bounded blocks)."""
        start, stop = self.chunk_range(i)
        h = hashlib.blake2b(digest_size=16)
        block = max(1, _READ_BLOCK_BYTES // self._row_bytes)
        buf = np.empty((min(block, stop - start), *self.shape[1:]), dtype=self.dtype)
        for s in range(start, stop, block):
            e = min(s + block, stop)
            h.update(self.read_raw(s, e, out=buf[: e - s]).view(np.uint8))
        return f"{_CHUNK_HASH}:{h.hexdigest()}"

    def mark_complete(self, i: int, rank: int | None = None) -> None:
        """Record chunk ``i`` as fully written with its checksum, after syncing its bytes to disk.

        The checksum is taken from the bytes read back from the file, so it covers what is really stored
        (whichever calls wrote the chunk's rows). ``rank=None``: rewrite ``store.json`` atomically (one
        writer). With a rank, add to that rank's own ``complete.rank<r>.json`` instead, so concurrent ranks
        never write the same file; rank 0 folds them into ``store.json`` with :meth:`merge_rank_marks`.
        """
        self.chunk_range(i)  # range check
        self.sync()
        i = int(i)
        digest = self.chunk_checksum(i)
        self._completed.add(i)
        self._checksums[i] = digest
        if rank is None:
            self._info["complete_chunks"] = sorted(set(self._info["complete_chunks"]) | {i})
            self._info["chunk_checksums"] = _checksum_json({**self._info["chunk_checksums"], str(i): digest})
            _atomic_write_json(self.path / STORE_JSON, self._info)
        else:
            f = self.path / f"{_RANK_PREFIX}{int(rank)}.json"
            mine, sums = _read_rank_file(f) if f.exists() else ([], {})
            _atomic_write_json(f, {"chunks": sorted(set(mine) | {i}),
                                   "checksums": _checksum_json({**{str(k): v for k, v in sums.items()},
                                                                str(i): digest})})

    def _rank_marks(self) -> tuple[set[int], dict[int, str]]:
        """Chunks (and their checksums) recorded in the ranks' own completion files."""
        marks: set[int] = set()
        sums: dict[int, str] = {}
        for f in sorted(self.path.glob(f"{_RANK_PREFIX}*.json")):
            chunks, digests = _read_rank_file(f)
            marks.update(c for c in chunks if 0 <= c < self.n_chunks)
            sums.update((c, d) for c, d in digests.items() if 0 <= c < self.n_chunks)
        return marks, sums

    def merge_rank_marks(self) -> None:
        """Fold every rank's completion file into ``store.json`` and delete them (rank 0, after a barrier)."""
        files = sorted(self.path.glob(f"{_RANK_PREFIX}*.json"))
        marks, sums = self._rank_marks()
        self._info["complete_chunks"] = sorted(set(self._info["complete_chunks"]) | marks)
        self._info["chunk_checksums"] = _checksum_json(
            {**self._info["chunk_checksums"], **{str(k): v for k, v in sums.items()}})
        _atomic_write_json(self.path / STORE_JSON, self._info)
        for f in files:
            f.unlink(missing_ok=True)
        self._completed = set(self._info["complete_chunks"])
        self._checksums = {int(k): v for k, v in self._info["chunk_checksums"].items()}

    def refresh(self) -> None:
        """Re-read the completion state from disk (other processes may have written chunks)."""
        try:
            info = json.loads((self.path / STORE_JSON).read_text())
            complete, sums, provenance = info["complete_chunks"], info["chunk_checksums"], info["provenance"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{self.path / STORE_JSON} is unreadable ({type(exc).__name__}: {exc})") from exc
        self._info["complete_chunks"] = complete
        self._info["chunk_checksums"] = sums
        self._info["provenance"] = provenance
        marks, sums = self._rank_marks()
        self._completed = set(self._info["complete_chunks"]) | marks
        self._checksums = {int(k): v for k, v in self._info["chunk_checksums"].items()} | sums

    def update_provenance(self, **entries: Any) -> None:
        """Add or change provenance entries (single writer only: rewrites ``store.json``)."""
        self._info["provenance"].update(entries)
        _atomic_write_json(self.path / STORE_JSON, self._info)

    @property
    def completed_chunks(self) -> list[int]:
        """Sorted indices of the chunks marked complete (in ``store.json`` or a rank file)."""
        return sorted(self._completed)

    def missing_chunks(self) -> list[int]:
        """Sorted indices of the chunks not yet marked complete."""
        return [i for i in range(self.n_chunks) if i not in self._completed]

    @property
    def complete(self) -> bool:
        """True once every chunk is marked complete."""
        return len(self._completed) == self.n_chunks

    def require_complete(self) -> None:
        """Raise :class:`DataError` when some chunks were never written."""
        if not self.complete:
            missing = self.missing_chunks()
            raise DataError(f"{self.path}: the feature store is incomplete ({len(missing)} of "
                            f"{self.n_chunks} chunks missing, first {missing[:5]}); resume the extraction "
                            "or import that made it")

    def verify(self, require_complete: bool = True) -> VerifyReport:
        """Re-read every completed chunk and compare it with the checksum recorded when it was written.

        Also reads ``labels.npy`` and ``meta.npz`` whole (a damaged one raises), and requires the semantic
        side of an imported store. Raises :class:`DataError` naming the first bad chunks (image ranges),
        or an incomplete store when ``require_complete``.
        """
        bad: list[str] = []
        verified = 0
        for i in self.completed_chunks:
            want = self._checksums.get(i)
            s, e = self.chunk_range(i)
            if want is None:
                bad.append(f"chunk {i} (images {s} to {e - 1}) is marked complete without a checksum")
            elif self.chunk_checksum(i) != want:
                bad.append(f"chunk {i} (images {s} to {e - 1})")
            else:
                verified += 1
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise DataError(f"{self.path / FEATURES_BIN}: {len(bad)} of {len(self.completed_chunks)} completed chunks "
                            f"do not match the checksums recorded when they were written: {', '.join(bad[:5])}"
                            f"{more}; the file was damaged or changed afterwards: {self._rebuild_hint(None)}")
        labels = self.labels  # raises when labels.npy is damaged
        meta = self.meta()  # raises when meta.npz is damaged
        missing = [k for k in ("att", "w2v", *_SPLITS) if k not in meta]
        if self.provenance.get("source") == "hdf5" and (labels is None or missing):
            what = ", ".join(([LABELS_NPY] if labels is None else []) + missing)
            raise DataError(f"{self.path}: the store's semantic side is missing ({what}); "
                            f"{self._rebuild_hint(self.path / META_NPZ)}")
        if require_complete:
            self.require_complete()
        semantics = "labels and semantic side readable" if labels is not None and not missing else (
            "labels readable, no semantic side" if labels is not None else "no labels")
        return VerifyReport(self.path, self.n_chunks, verified, self.missing_chunks(), semantics)

    def _rebuild_hint(self, damaged: Path | None) -> str:
        """What to run to rebuild a damaged store: re-import from the recorded source, else re-extract."""
        src = self.provenance.get("source_file") if self.provenance.get("source") == "hdf5" else None
        if src and damaged is not None and damaged.name in (META_NPZ, LABELS_NPY):
            return f"re-import the store (`dedn store import {src} {self.path}` writes {damaged.name} again)"
        if src:
            return f"re-import the store (`dedn store import {src} {self.path} --overwrite`)"
        return "re-extract or re-import the store (with --overwrite)"

    # ------------------------------------------------------------------ semantics
    def save_semantics(self, side: SemanticSide, *, replace: bool = False) -> None:
        """Store the semantic side in ``meta.npz``; given entries replace stored ones, others are kept.

        ``replace=True`` starts from nothing instead of the stored entries (and so never reads a damaged
        ``meta.npz``). When labels and all three splits are known, their fingerprint is written to the
        provenance (``split_hash``).
        """
        meta = {} if replace else self.meta()
        floats = {"att": side.att, "w2v": side.w2v, "original_att": side.original_att}
        ints = {"trainval_loc": side.trainval_loc, "test_seen_loc": side.test_seen_loc,
                "test_unseen_loc": side.test_unseen_loc, "val_classes": side.val_classes}
        strs = {"class_names": side.class_names, "attribute_names": side.attribute_names,
                "image_files": side.image_files}
        meta.update({k: np.asarray(v, dtype=np.float32) for k, v in floats.items() if v is not None})
        meta.update({k: _as_index_array(v, f"{self.path} {k}") for k, v in ints.items() if v is not None})
        meta.update({k: np.asarray([str(s) for s in v], dtype=str) for k, v in strs.items() if v is not None})
        if side.image_files is not None and len(side.image_files) != len(self):
            raise DataError(f"{self.path}: {len(side.image_files)} image files for {len(self)} feature maps")
        if side.name is not None:
            meta["name"] = np.asarray(side.name)
        if side.clusters is not None:
            for k in [k for k in meta if k.startswith("cluster_")]:
                del meta[k]
            meta["cluster_names"] = np.asarray(list(side.clusters), dtype=str)
            for j, idx in enumerate(side.clusters.values()):
                meta[f"cluster_{j}"] = np.asarray(idx, dtype=np.int64)
        buf = io.BytesIO()
        np.savez(buf, **meta)
        _atomic_write_bytes(self.path / META_NPZ, buf.getvalue())
        if self.labels is not None and all(k in meta for k in _SPLITS):
            self.update_provenance(split_hash=split_hash(self.labels, *(meta[k] for k in _SPLITS)))

    def meta(self) -> dict[str, np.ndarray]:
        """Everything in ``meta.npz`` (empty when the store has no semantic side)."""
        f = self.path / META_NPZ
        if not f.exists():
            return {}
        try:
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except _NPY_READ_ERRORS as exc:
            raise DataError(f"{f} is corrupt ({type(exc).__name__}: {exc}); {self._rebuild_hint(f)}") from exc

    # ------------------------------------------------------------------ GPU residency
    def resident_copy(self, device: Any = "cuda", reserve_bytes: int | None = None) -> DeviceFeatures | None:
        """The whole store as one tensor (N, C, h, w) in the store dtype on a CUDA device, or ``None``.

        ``None`` when ``device`` is not CUDA or the maps do not fit in the device's free memory minus
        ``reserve_bytes`` (default: the larger of 1 GiB and 10 % of the device's memory, for the model and
        its activations); the caller then reads batches from the file instead. Copies in blocks of
        about 256 MiB, so host memory stays bounded. The copy carries the store's :attr:`identity`.
        """
        import torch

        dev = torch.device(device)
        if dev.type != "cuda" or not torch.cuda.is_available():
            return None
        self.require_complete()
        free, total = torch.cuda.mem_get_info(dev)
        reserve = max(1 << 30, total // 10) if reserve_bytes is None else int(reserve_bytes)
        if self.nbytes > free - reserve:
            return None
        tdtype = torch.float16 if self.dtype == np.float16 else torch.float32
        out = torch.empty(self.shape, dtype=tdtype, device=dev)
        rows = max(1, (256 << 20) // self._row_bytes)
        for s in range(0, len(self), rows):
            out[s:s + rows].copy_(torch.from_numpy(self.read_raw(s, min(s + rows, len(self)))))
        return DeviceFeatures(out, identity=self.identity)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the read and write handles (reading again reopens the file)."""
        for name in ("_fd", "_rfd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy: file descriptors do not cross processes; each copy reopens the file.
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_rfd"] = None
        return state


def _check_info(info: Any, meta_file: Path, fix: str) -> None:
    """Validate a parsed ``store.json``."""
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise DataError(f"{meta_file} is not a dedn feature store description; {fix}")
    if info.get("version") != VERSION:
        raise DataError(f"{meta_file}: store format version {info.get('version')} is not supported (this "
                        f"dedn reads version {VERSION}); {fix}")
    want = info.get(HEADER_HASH)  # absent: refused below, once the rest is known to be sound
    if want is not None and want != header_hash(info):
        raise DataError(f"{meta_file} was edited: its header hash does not match (shape, dtype, size or chunk "
                        "fields changed since the store was written); re-import or re-extract the store")
    try:
        n, shape, dtype = int(info["n"]), [int(s) for s in info["shape"]], info["dtype"]
        chunk, n_chunks = int(info["chunk_size"]), int(info["n_chunks"])
        nbytes = int(info["features_bytes"])
        done = [int(c) for c in info["complete_chunks"]]
        ok = (n >= 1 and len(shape) == 3 and min(shape) >= 1 and dtype in DTYPES and chunk >= 1
              and n_chunks == -(-n // chunk) and nbytes == n * int(np.prod(shape)) * np.dtype(dtype).itemsize
              and all(0 <= c < n_chunks for c in done) and isinstance(info["provenance"], dict))
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{meta_file} is corrupt (missing or malformed entry {exc}); {fix}") from exc
    if not ok:
        raise DataError(f"{meta_file} is corrupt (inconsistent sizes or chunk list); {fix}")
    absent = [k for k in (HEADER_HASH, "chunk_checksums") if k not in info]
    if absent:  # every store is written with both; one without was made before they existed
        raise DataError(f"{meta_file.parent}: this feature store was written by an earlier dedn ({meta_file.name} has "
                        f"no {' and no '.join(absent)}); re-create it with `dedn extract` or `dedn store import` "
                        "(--overwrite replaces it)")
    if not _checksums_ok(info["chunk_checksums"], n_chunks):
        raise DataError(f"{meta_file} is corrupt (malformed chunk checksums); {fix}")
    info["shape"] = shape


def _checksums_ok(sums: Any, n_chunks: int) -> bool:
    """Whether ``sums`` maps chunk indices (as text) of this store to ``blake2b:`` checksums."""
    try:
        return isinstance(sums, dict) and all(0 <= int(c) < n_chunks and isinstance(d, str)
                                              and d.startswith(f"{_CHUNK_HASH}:") for c, d in sums.items())
    except (TypeError, ValueError):
        return False


def _read_rank_file(f: Path) -> tuple[list[int], dict[int, str]]:
    """The chunks a rank marked complete and their checksums."""
    try:
        obj = json.loads(f.read_text())
        chunks = [int(c) for c in obj["chunks"]]
        sums = {int(c): str(d) for c, d in obj["checksums"].items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{f} is corrupt ({exc}); delete it (its chunks will be extracted again)") from exc
    return chunks, sums


def _checksum_json(sums: Mapping[str, str]) -> dict[str, str]:
    """Chunk checksums keyed by chunk index as JSON wants them (string keys), in chunk order."""
    return {k: sums[k] for k in sorted(sums, key=int)}


_STORE_FILES = (STORE_JSON, FEATURES_BIN, LABELS_NPY, META_NPZ)


def _is_store_file(name: str) -> bool:
    return name in _STORE_FILES or name.startswith((_RANK_PREFIX, "."))


def _prepare_folder(path: Path, overwrite: bool) -> None:
    """Make ``path`` an empty folder for a new store, refusing to clobber anything that is not a store."""
    if path.exists() and not path.is_dir():
        raise DataError(f"{path} exists and is not a folder; choose another feature store path")
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        foreign = [n for n in names if not _is_store_file(n)]
        if foreign:
            raise DataError(f"{path} exists and holds files that are not part of a feature store "
                            f"({foreign[:3]}); choose an empty or new folder")
        if STORE_JSON in names and not overwrite:
            raise DataError(f"a feature store already exists at {path}; pass overwrite=True (--overwrite) to "
                            "replace it, or resume it")
        for n in names:  # an old store (overwrite) or the remains of an interrupted creation
            p = path / n
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _preallocate(f: Path, nbytes: int) -> None:
    """Create ``f`` with ``nbytes`` really reserved on disk, so a full disk fails now."""
    fd = os.open(f, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, nbytes)
            else:
                os.ftruncate(fd, nbytes)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                os.close(fd)
                fd = -1
                f.unlink(missing_ok=True)
                free = shutil.disk_usage(f.parent).free
                raise DataError(f"not enough disk space for the feature store {f}: it needs "
                                f"{nbytes / 1e9:.2f} GB, {free / 1e9:.2f} GB are free") from exc
            os.ftruncate(fd, nbytes)  # filesystems without fallocate support: a sparse file
    finally:
        if fd >= 0:
            os.close(fd)


def _write_labels(path: Path, labels: np.ndarray, n: int) -> np.ndarray:
    lab = _as_index_array(labels, f"{path} labels")
    if lab.shape != (n,):
        raise DataError(f"{path}: {lab.shape[0]} labels for {n} feature maps")
    if lab.size and lab.min() < 0:
        raise DataError(f"{path}: labels must be 0-based class indices, found {int(lab.min())}")
    buf = io.BytesIO()
    np.save(buf, lab)
    _atomic_write_bytes(path / LABELS_NPY, buf.getvalue())
    return lab


# ---------------------------------------------------------------------------------------------- helpers
def store_from_array(
    path: str | os.PathLike[str],
    array: Any,
    labels: np.ndarray | None = None,
    dtype: str = "float16",
    chunk_size: int = 256,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> FeatureStore:
    """Write an (N, C, h, w) array (or any FeatureSource) into a new store, chunk by chunk (tests, benches)."""
    shape = tuple(int(s) for s in array.shape)
    if len(shape) != 4:
        raise DataError(f"{path}: expected an (N, C, h, w) array, got shape {shape}")
    store = FeatureStore.create(path, shape[0], shape[1:], dtype=dtype, chunk_size=chunk_size,
                                provenance=provenance, overwrite=overwrite, labels=labels)
    store.fill_missing(lambda s, e: np.asarray(array[np.arange(s, e)]))  # arrays and FeatureSources: index arrays
    return store


def store_zsldata(
    path: str | os.PathLike[str],
    data: ZSLData,
    dtype: str = "float16",
    chunk_size: int = 256,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> FeatureStore:
    """Write a whole :class:`ZSLData` (features, labels and semantic side) into a new store."""
    store = store_from_array(path, data.features, labels=data.labels, dtype=dtype, chunk_size=chunk_size,
                             provenance={**data.provenance, "dataset": data.name, **(provenance or {})},
                             overwrite=overwrite)
    store.save_semantics(SemanticSide.of(data))
    return store


def load_zsldata(path: str | os.PathLike[str], name: str | None = None) -> ZSLData:
    """Open a complete store that holds labels and a semantic side as a :class:`ZSLData` (maps read on demand)."""
    store = FeatureStore.open(path)
    store.require_complete()
    if store.labels is None:
        raise DataError(f"{store.path}: the store has no labels ({LABELS_NPY})")
    meta = store.meta()
    need = ("att", "w2v", *_SPLITS)
    missing = [k for k in need if k not in meta]
    if missing:
        raise DataError(f"{store.path}: the store has no semantic side ({', '.join(missing)} missing from "
                        f"{META_NPZ}); save it with FeatureStore.save_semantics or import a full HDF5 file")
    k, d = meta["att"].shape
    clusters = None
    if "cluster_names" in meta:
        clusters = {str(c): meta[f"cluster_{j}"] for j, c in enumerate(meta["cluster_names"].tolist())}
    data = ZSLData(
        name=name or (str(meta["name"]) if "name" in meta else store.path.name),
        features=store,
        labels=store.labels,
        att=meta["att"],
        w2v=meta["w2v"],
        trainval_loc=meta["trainval_loc"],
        test_seen_loc=meta["test_seen_loc"],
        test_unseen_loc=meta["test_unseen_loc"],
        class_names=(_str_list(meta["class_names"]) if "class_names" in meta
                     else [f"class_{i}" for i in range(k)]),
        attribute_names=(_str_list(meta["attribute_names"]) if "attribute_names" in meta
                         else [f"attribute_{i}" for i in range(d)]),
        val_classes=meta.get("val_classes"),
        clusters=clusters,
        source=str(store.path),
        provenance={**store.provenance, "store": str(store.path)},
    )
    data.validate()
    return data


def check_provenance(store: Any, expect_backbone: str | None = None,
                     expect_image_size: int | None = None) -> None:
    """Refuse features made with another backbone or image size than the config expects.

    ``store``: a :class:`FeatureStore`, a :class:`ZSLData` or a provenance mapping. A store that does not
    record a backbone or an image size (e.g. an HDF5 file imported without them) cannot be checked and
    passes.
    """
    prov = store if isinstance(store, Mapping) else getattr(store, "provenance", {})
    where = getattr(store, "path", None) or getattr(store, "source", None) or "the features"
    got_bb, got_size = prov.get("backbone"), prov.get("image_size")
    if expect_backbone is not None and got_bb is not None and str(got_bb) != str(expect_backbone):
        raise DataError(f"{where}: the features were made with backbone {got_bb!r} but the config expects "
                        f"{expect_backbone!r}; extract them again with {expect_backbone!r} or change "
                        "data.expect_backbone")
    if expect_image_size is not None and got_size is not None and int(got_size) != int(expect_image_size):
        raise DataError(f"{where}: the features were made at image size {got_size} but the config expects "
                        f"{expect_image_size}; extract them again at {expect_image_size} px or change "
                        "data.expect_image_size")
