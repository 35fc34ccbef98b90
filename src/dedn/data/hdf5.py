"""The DAZLE / MSDN / DEDN HDF5 feature-file layout: streamed, resumable import into a feature store,
export, and use in place."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dedn.atomic import atomic_write
from dedn.data.dataset import ZSLData
from dedn.data.sources import FeatureSource
from dedn.data.store import (
    _SPLITS,
    LABELS_NPY,
    META_NPZ,
    STORE_JSON,
    FeatureStore,
    SemanticSide,
    _as_index_array,
    _str_list,
    load_zsldata,
    split_hash,
)
from dedn.errors import DataError

_FINGERPRINT_ROWS = 16  # feature maps of an HDF5 source sampled into its fingerprint


HDF5_REQUIRED = (
    "feature_map", "labels", "trainval_loc", "test_seen_loc", "test_unseen_loc", "att", "w2v_att",
)


def _hdf5_header(f: Any, path: Path) -> dict[str, Any]:
    """Read and check everything but the feature maps of a DAZLE/DEDN HDF5 file."""
    keys = set(f.keys())
    for key in HDF5_REQUIRED:
        if key not in keys:
            raise DataError(f"{path}: key '{key}' is missing; a DAZLE/DEDN feature file holds "
                            f"{', '.join(HDF5_REQUIRED)} (and original_att); found {sorted(keys)}")
    fm = f["feature_map"]
    if len(fm.shape) != 4:
        raise DataError(f"{path}: key 'feature_map' must have shape (N, C, h, w), got {fm.shape}")
    n = int(fm.shape[0])
    labels = _as_index_array(f["labels"][()], f"{path} key 'labels'")
    if labels.shape[0] != n:
        raise DataError(f"{path}: key 'feature_map' holds {n} feature maps but key 'labels' holds "
                        f"{labels.shape[0]} labels")
    att = np.asarray(f["att"][()], dtype=np.float32)
    if att.ndim != 2:
        raise DataError(f"{path}: key 'att' must be a (K, D) matrix, got shape {att.shape}")
    k, d = att.shape
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        one_based = labels.min() == 1 and labels.max() == k
        hint = " (the file looks 1-based; labels must be 0-based)" if one_based else ""
        raise DataError(f"{path}: key 'labels' must hold 0-based classes in 0..{k - 1}, found "
                        f"{int(labels.min())}..{int(labels.max())}{hint}")
    w2v = np.asarray(f["w2v_att"][()], dtype=np.float32)
    if w2v.ndim != 2 or w2v.shape[0] != d:
        raise DataError(f"{path}: key 'w2v_att' has shape {w2v.shape} but 'att' has {d} attributes: expected "
                        f"({d}, G)")
    out: dict[str, Any] = {"n": n, "feature_shape": tuple(int(s) for s in fm.shape[1:]), "labels": labels,
                           "att": att, "w2v": w2v}
    if "original_att" in keys:
        orig = np.asarray(f["original_att"][()], dtype=np.float32)
        if orig.shape != att.shape:
            raise DataError(f"{path}: key 'original_att' has shape {orig.shape}, 'att' has {att.shape}")
        out["original_att"] = orig
    for key in _SPLITS:
        loc = _as_index_array(f[key][()], f"{path} key '{key}'")
        if loc.size and (loc.min() < 0 or loc.max() >= n):
            raise DataError(f"{path}: key '{key}' holds image indices outside 0..{n - 1} (must be 0-based)")
        out[key] = loc
    out["class_names"] = _str_list(f["class_names"][()]) if "class_names" in keys else None
    out["attribute_names"] = _str_list(f["attribute_names"][()]) if "attribute_names" in keys else None
    out["val_classes"] = _as_index_array(f["val_classes"][()], f"{path} key 'val_classes'") \
        if "val_classes" in keys else None
    return out


def _open_h5(path: Path):
    import h5py

    if not path.is_file():
        raise DataError(f"HDF5 feature file {path} does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from exc


def _source_identity(path: Path, f: Any, head: Mapping[str, Any]) -> dict[str, Any]:
    """Provenance entries that identify an HDF5 feature file: resolved path, size, mtime and a fingerprint.

    A full-file hash would cost one extra pass over files of up to ~20 GB before an import could even
    resume, so the fingerprint is a blake2b hash of the file size, ``feature_map``'s dtype and shape, every
    array other than the feature maps (labels, the three splits, att, w2v, original_att) and 16 feature maps
    spread evenly over the file, first and last included. ``source_mtime_ns`` (compared too) catches an
    in-place edit of feature maps the sample misses; a copy that does not keep the mtime counts as another
    file (refused, never mixed).
    """
    st = path.stat()
    ds = f["feature_map"]
    h = hashlib.blake2b(digest_size=16)
    h.update(f"dedn-hdf5-fingerprint-v1 {st.st_size} {ds.dtype.str} {tuple(ds.shape)}".encode())
    for key in ("labels", *_SPLITS, "att", "w2v", "original_att"):
        if head.get(key) is not None:
            arr = np.ascontiguousarray(head[key])
            h.update(f"{key} {arr.dtype.str} {arr.shape}".encode())
            h.update(arr.tobytes())
    n = int(ds.shape[0])
    for i in np.unique(np.linspace(0, n - 1, min(n, _FINGERPRINT_ROWS)).round().astype(np.int64)).tolist():
        h.update(np.ascontiguousarray(ds[int(i)]).tobytes())
    return {"source_file": str(path.resolve()), "source_bytes": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns),
            "source_dtype": str(ds.dtype), "source_fingerprint": h.hexdigest()}


def _check_same_import(store: FeatureStore, prov: Mapping[str, Any], h5_path: Path, shape: tuple[int, ...],
                       dtype: str) -> None:
    """Refuse to resume (or to call complete) a store that was imported from another file or with other settings."""
    theirs = store.provenance

    def show(key: str, v: Any) -> str:  # fingerprints shortened: the first digits tell them apart
        return repr(v[:12] + "...") if key == "source_fingerprint" and isinstance(v, str) else repr(v)

    diff = [f"{k}: store has {show(k, theirs.get(k))}, {h5_path.name} has {show(k, prov.get(k))}"
            for k in ("source_fingerprint", "source_bytes", "source_mtime_ns", "backbone", "image_size")
            if theirs.get(k) != prov.get(k)]
    if store.shape != shape or store.dtype != np.dtype(dtype):
        diff.append(f"layout: store holds {store.shape} {store.dtype}, this import {shape} {dtype}")
    if not diff:
        return
    old = theirs.get("source_file") or "another source"
    details = "; ".join(diff)
    if store.complete:
        raise DataError(f"{store.path} is already a complete import of {old}, and {h5_path} is another file or "
                        f"other settings ({details}); nothing was changed; pass --overwrite (overwrite=True) to "
                        f"replace the store with an import of {h5_path}")
    raise DataError(f"{store.path}: this store was started from another file or with other settings ({details}); "
                    f"resuming would mix the feature maps of two files; resume it from {old} with the same "
                    f"settings, or pass --overwrite (overwrite=True) to import {h5_path} from scratch")


def _repair_semantics(store: FeatureStore, head: Mapping[str, Any], name: str | None) -> bool:
    """Write labels and the semantic side from the (verified same) source when missing or damaged.

    A readable ``meta.npz`` keeps its other entries (clusters, image files); a damaged one is replaced.
    Returns whether anything was written.
    """
    try:
        labels_ok = store.labels is not None
    except DataError:
        labels_ok = False
    try:
        meta: dict[str, np.ndarray] | None = store.meta()
    except DataError:
        meta = None
    meta_ok = meta is not None and all(k in meta for k in ("att", "w2v", *_SPLITS))
    if labels_ok and meta_ok:
        return False
    if not labels_ok:
        store.set_labels(head["labels"])
    if not meta_ok:
        _save_head_semantics(store, head, name, replace=meta is None)
    return True


def _save_head_semantics(store: FeatureStore, head: Mapping[str, Any], name: str | None, replace: bool) -> None:
    side = SemanticSide(att=head["att"], w2v=head["w2v"], original_att=head.get("original_att"),
                        **{k: head[k] for k in _SPLITS}, class_names=head["class_names"],
                        attribute_names=head["attribute_names"], val_classes=head["val_classes"], name=name)
    store.save_semantics(side, replace=replace)


@dataclass(frozen=True)
class ImportOptions:
    """How :func:`import_hdf5` writes the store.

    Attributes:
        dtype: the store's dtype, ``"float16"`` (default) or ``"float32"``.
        chunk_size: images per chunk (the unit of resumption).
        block_size: images read from the file at a time (memory stays bounded by one block).
        provenance: what the file holds, e.g. ``{"backbone": "resnet101", "image_size": 448}``; the DAZLE
            layout itself does not record it.
        name: the dataset name (CUB, SUN, AWA2), recorded in the store.
        resume: continue an existing store imported from the same file with the same settings.
        overwrite: replace an existing store (imported from another file or with other settings).
        progress: show a progress bar.
    """

    dtype: str = "float16"
    chunk_size: int = 256
    block_size: int = 64
    provenance: Mapping[str, Any] | None = None
    name: str | None = None
    resume: bool = True
    overwrite: bool = False
    progress: bool = True


def import_hdf5(
    h5_path: str | os.PathLike[str],
    store_path: str | os.PathLike[str],
    options: ImportOptions | None = None,
    *,
    report: Callable[[str], None] | None = None,
) -> FeatureStore:
    """Import a DAZLE/DEDN HDF5 feature file into a store, streamed in blocks of ``options.block_size`` images.

    Memory stays bounded by one block. The store records its source's identity (``source_file``,
    ``source_bytes``, ``source_mtime_ns``, ``source_fingerprint``; see :func:`_source_identity` for what the
    fingerprint covers and why it is not a full-file hash). An existing store (``resume=True``) is continued
    only from the same file with the same settings: an interrupted import resumes with the chunks it had not
    finished, a complete one is left as it is (a no-op); another file is refused, unless ``overwrite=True``
    replaces the store. The semantic side (labels, ``meta.npz``) is written before any chunk, and a resumed
    import writes it again when it is missing or damaged, so a store is never complete without it.
    ``options``: see :class:`ImportOptions` (default: its defaults). ``report`` receives one-line status
    messages.
    """
    o = options or ImportOptions()
    h5_path, store_path = Path(h5_path), Path(store_path)
    say = report or (lambda _msg: None)
    with _open_h5(h5_path) as f:
        head = _hdf5_header(f, h5_path)
        n, shape = head["n"], head["feature_shape"]
        prov = {"backbone": None, "image_size": None, "source": "hdf5", "dataset": o.name,
                "split_hash": split_hash(head["labels"], *(head[k] for k in _SPLITS)), **(o.provenance or {}),
                **_source_identity(h5_path, f, head)}
        store = None
        if o.resume and not o.overwrite and (store_path / STORE_JSON).exists():
            store = FeatureStore.open(store_path)
            _check_same_import(store, prov, h5_path, (n, *shape), o.dtype)
            if _repair_semantics(store, head, o.name):
                say(f"{store_path}: wrote the missing or damaged semantic side ({LABELS_NPY}, {META_NPZ}) "
                    f"from {h5_path}")
        if store is None:
            store = FeatureStore.create(store_path, n, shape, dtype=o.dtype, chunk_size=o.chunk_size,
                                        provenance=prov, overwrite=o.overwrite, labels=head["labels"])
            _save_head_semantics(store, head, o.name, replace=True)  # before any chunk: complete implies semantics
        todo = store.missing_chunks()
        if not todo:
            say(f"{store_path}: already imported from {h5_path}; nothing to do")
            return store
        if len(todo) < store.n_chunks:
            say(f"{store_path}: resuming the import from {h5_path}: {len(todo)} of {store.n_chunks} chunks left")
        ds = f["feature_map"]
        store.fill_missing(lambda s, e: ds[s:e], o.block_size, desc=f"import {h5_path.name}", progress=o.progress)
    return store


def _check_export_target(store: FeatureStore, path: Path, overwrite: bool) -> None:
    """Refuse to export onto the store's own source, into the store, or onto an existing file without overwrite."""
    src = store.provenance.get("source_file")
    target = path.resolve()
    same = src is not None and (target == Path(src).resolve() or (
        path.exists() and Path(src).exists() and os.path.samefile(path, src)))
    if same:
        raise DataError(f"{path} is the file this store was imported from: exporting onto it would replace its "
                        f"original {store.provenance.get('source_dtype', 'float32')} feature maps with the store's "
                        f"{store.dtype} values; choose another output file")
    if target.parent == store.path.resolve() or target == store.path.resolve():
        raise DataError(f"{path} is inside the feature store {store.path}; choose an output file outside it")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the HDF5 file to write")
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
                        "another output file")


def export_hdf5(store: FeatureStore | str | os.PathLike[str], path: str | os.PathLike[str],
                block_size: int = 64, progress: bool = True, overwrite: bool = False) -> Path:
    """Write a complete store with its semantic side as a DAZLE/DEDN HDF5 file (float32 ``feature_map``).

    Streamed in blocks of ``block_size`` images into a temporary file that is renamed at the end, so an
    interrupted export never leaves a partial file under ``path``. An existing ``path`` is replaced only with
    ``overwrite=True``, and never when it is the store's own source file (its float32 originals would become
    the store's float16 values). Class and attribute names (and ``val_classes`` when known) are added as
    extra keys, which DAZLE-style readers ignore.
    """
    import h5py

    if not isinstance(store, FeatureStore):
        store = FeatureStore.open(store)
    path = Path(path)
    _check_export_target(store, path, overwrite)
    data = load_zsldata(store.path)  # checks completeness, labels and semantics
    meta = store.meta()
    path.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("feature_map", shape=store.shape, dtype=np.float32)
            with tqdm(total=len(store), unit="img", desc=f"export {path.name}", disable=not progress) as bar:
                for s in range(0, len(store), block_size):
                    e = min(s + block_size, len(store))
                    ds[s:e] = store[s:e]
                    bar.update(e - s)
            f["labels"] = data.labels
            for key in _SPLITS:
                f[key] = getattr(data, key)
            f["att"] = data.att
            f["original_att"] = meta.get("original_att", data.att)
            f["w2v_att"] = data.w2v
            str_t = h5py.string_dtype("utf-8")
            f.create_dataset("class_names", data=data.class_names, dtype=str_t)
            f.create_dataset("attribute_names", data=data.attribute_names, dtype=str_t)
            if data.val_classes is not None:
                f["val_classes"] = np.asarray(data.val_classes, dtype=np.int64)

    try:
        atomic_write(path, write)
    except OSError as exc:
        raise DataError(f"could not write {path} ({exc}); free disk space (or fix permissions) and export "
                        "again") from exc
    return path


class HDF5Features(FeatureSource):
    """A read-only :class:`~dedn.data.sources.FeatureSource` over ``feature_map`` of an HDF5 file, read on demand
    (no import).

    ``features[idx]`` returns float32 for an int, a slice or an int array (any order, duplicates): the
    indices are sorted and de-duplicated for h5py, then put back in the asked order. Safe to hand to
    DataLoader workers: each process reopens the file itself.
    """

    def __init__(self, path: str | os.PathLike[str], key: str = "feature_map") -> None:
        self.path = Path(path)
        self.key = key
        self._file: Any = None
        ds = self._dataset()
        if len(ds.shape) != 4:
            raise DataError(f"{self.path}: key '{key}' must have shape (N, C, h, w), got {ds.shape}")
        self.shape: tuple[int, ...] = tuple(int(s) for s in ds.shape)
        self.dtype = np.dtype(ds.dtype)

    def _dataset(self) -> Any:
        if self._file is None:
            self._file = _open_h5(self.path)
            if self.key not in self._file:
                found = sorted(self._file.keys())
                raise DataError(f"{self.path}: key '{self.key}' is missing; found {found}")
        return self._file[self.key]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        ds = self._dataset()
        if isinstance(index, (int, np.integer)):
            n = self.shape[0]
            if not -n <= int(index) < n:
                raise IndexError(f"index {int(index)} out of range for {n} feature maps")
            return np.asarray(ds[int(index) % n], dtype=np.float32)
        if isinstance(index, slice):
            start, stop, step = index.indices(self.shape[0])
            if step != 1:
                return self[np.arange(start, stop, step)]
            return np.asarray(ds[start:stop], dtype=np.float32)
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        flat = idx.reshape(-1).astype(np.int64)
        n = self.shape[0]
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"index out of range for {n} feature maps")
        flat = np.where(flat < 0, flat + n, flat)
        uniq, inverse = np.unique(flat, return_inverse=True)  # h5py wants increasing, distinct indices
        if not uniq.size:
            return np.empty((*idx.shape, *self.shape[1:]), dtype=np.float32)
        rows = np.asarray(ds[uniq], dtype=np.float32)
        return rows[inverse.reshape(-1)].reshape(*idx.shape, *self.shape[1:])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # h5py handles must not cross processes
        return state


def open_hdf5_lazily(path: str | os.PathLike[str], key: str = "feature_map") -> HDF5Features:
    """A FeatureSource view of an existing HDF5 file's feature maps, without importing it."""
    return HDF5Features(path, key)


def load_hdf5_zsldata(path: str | os.PathLike[str], name: str | None = None,
                      provenance: Mapping[str, Any] | None = None) -> ZSLData:
    """A :class:`ZSLData` over a DAZLE/DEDN HDF5 file as it is: semantics in memory, features read lazily."""
    path = Path(path)
    with _open_h5(path) as f:
        head = _hdf5_header(f, path)
    k, d = head["att"].shape
    data = ZSLData(
        name=name or path.stem,
        features=open_hdf5_lazily(path),
        labels=head["labels"],
        att=head["att"],
        w2v=head["w2v"],
        trainval_loc=head["trainval_loc"],
        test_seen_loc=head["test_seen_loc"],
        test_unseen_loc=head["test_unseen_loc"],
        class_names=head["class_names"] or [f"class_{i}" for i in range(k)],
        attribute_names=head["attribute_names"] or [f"attribute_{i}" for i in range(d)],
        val_classes=head["val_classes"],
        source=str(path),
        provenance={"source": "hdf5", "source_file": str(path.resolve()), **(provenance or {})},
    )
    data.validate()
    return data
