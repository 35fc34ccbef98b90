"""Turn a :class:`~dedn.config.RunConfig` into the objects a run needs: the dataset and the model.

The model is the method ``model.name`` names, built through the registry (:mod:`dedn.models.registry`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from torch import nn

from dedn.config import RunConfig
from dedn.data.dataset import ZSLData
from dedn.errors import ConfigError, DataError
from dedn.models.dedn_method import method_settings, model_clusters
from dedn.models.registry import create_model, model_entry


def _synthetic(cfg: RunConfig) -> ZSLData:
    from dedn.data.synthetic import make_synthetic

    return make_synthetic(cfg.data.synthetic)


def _feature_file(cfg: RunConfig, what: str) -> Path:
    """``data.path``, which must name an existing ``what``; refused before anything is read."""
    if not cfg.data.path:
        raise ConfigError(f"data.source={cfg.data.source} needs data.path (the {what}): give data.path=PATH"
                          + ("; make a store with `dedn extract` or `dedn store import`" if "store" in what else ""))
    if not Path(cfg.data.path).exists():
        raise DataError(f"{cfg.data.path}: no such {what}; make a feature store from images with `dedn extract`, "
                        "or from a DAZLE/DEDN HDF5 file with `dedn store import`")
    return Path(cfg.data.path)


def _store(cfg: RunConfig) -> ZSLData:
    from dedn.data.store import check_provenance, load_zsldata

    data = load_zsldata(_feature_file(cfg, "feature store folder"), name=cfg.data.dataset)
    check_provenance(data, cfg.data.expect_backbone, cfg.data.expect_image_size)
    return data


def _hdf5(cfg: RunConfig) -> ZSLData:
    from dedn.data.hdf5 import load_hdf5_zsldata
    from dedn.data.store import check_provenance

    data = load_hdf5_zsldata(_feature_file(cfg, "HDF5 file"), name=cfg.data.dataset)
    check_provenance(data, cfg.data.expect_backbone, cfg.data.expect_image_size)
    return data


def _imagebench(cfg: RunConfig) -> ZSLData:
    from dedn.features.imagebench_features import imagebench_data

    return imagebench_data(cfg)


#: ``data.source`` -> the loader of that source's features and semantic side (names: :data:`dedn.config.DATA_SOURCES`).
DATA_LOADERS: dict[str, Callable[[RunConfig], ZSLData]] = {
    "synthetic": _synthetic, "store": _store, "hdf5": _hdf5, "imagebench": _imagebench,
}


def load_data(cfg: RunConfig) -> ZSLData:
    """Load (or generate) the dataset a config names, checked, and cut to the validation task if asked.

    Raises:
        ConfigError: the source needs a path that is not given.
        DataError: the files are missing or inconsistent.
    """
    # An unknown model.name, or a precision the method has no path for, is refused before any data is read.
    model_entry(cfg.model.name).check_precision(cfg.train.precision)
    from dedn.data.xlsa17 import canonical_dataset

    data = DATA_LOADERS[cfg.data.source](cfg)
    name = cfg.data.dataset or data.name  # resolved once: it selects built-in clusters and reference quirks
    data = _apply_semantics(cfg, replace(data, name=canonical_dataset(name) or name))
    data.validate()
    if cfg.data.split == "validation":
        data = data.validation_split(cfg.data.val_seen_fraction, seed=cfg.seed)
    return data


def _apply_semantics(cfg: RunConfig, data: ZSLData) -> ZSLData:
    """Fill in or override the semantic side from xlsa17 files or an explicit word-vector file."""
    dc = cfg.data
    if dc.semantic_dir:
        from dedn.data.xlsa17 import read_semantic_dir

        sem = read_semantic_dir(dc.semantic_dir, dataset=dc.dataset)
        if sem.n_classes != data.n_classes or sem.n_attributes != data.n_attributes:
            raise DataError(
                f"{dc.semantic_dir}: {sem.n_classes} classes x {sem.n_attributes} attributes, but the features "
                f"at {data.source} come with {data.n_classes} x {data.n_attributes}"
            )
        data = replace(
            data,
            class_names=list(sem.class_names),
            attribute_names=list(sem.attribute_names),
            w2v=sem.w2v.astype(np.float32) if sem.w2v is not None else data.w2v,
            val_classes=sem.val_classes if data.val_classes is None else data.val_classes,
        )
    if dc.w2v:
        from dedn.data.semantics import load_word_vectors

        w2v = load_word_vectors(dc.w2v)
        if w2v.shape[0] != data.n_attributes:
            raise DataError(f"{dc.w2v}: {w2v.shape[0]} word vectors for {data.n_attributes} attributes")
        data = replace(data, w2v=w2v.astype(np.float32))
    return data


def resolve_model_clusters(cfg: RunConfig, data: ZSLData) -> dict[str, np.ndarray]:
    """The attribute clusters of DEDN's fExp that ``cfg.model.clusters`` asks for, checked against ``data``."""
    dataset = data.name
    return model_clusters(cfg, data, dataset, method_settings(cfg, dataset))


def build_model(cfg: RunConfig, data: ZSLData, seed: int | None = None) -> nn.Module:
    """A freshly initialised model of the method ``cfg.model.name`` for ``data`` (initialisation seeded by
    ``seed``, default ``cfg.seed``).

    Raises:
        ConfigError: ``model.name`` names no registered method, or the method refuses one of its options.
    """
    return create_model(cfg.model.name, cfg, data, data.name, seed)
