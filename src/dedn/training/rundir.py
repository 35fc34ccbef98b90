"""The records in a run folder that need the run's config or data: its config, class file, feature provenance,
metrics and the calibration it recorded. The folder's file names, its lock and which folder holds a model are
:class:`dedn.runfolder.RunFolder`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dedn.atomic import atomic_write_text
from dedn.config import RunConfig, config_from_dict
from dedn.data.dataset import ZSLData
from dedn.errors import CheckpointError, DataError
from dedn.eval.calibration import Calibration, GammaSource
from dedn.eval.evaluate import calibration_value
from dedn.runfolder import RunFolder


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config of a run directory."""
    path = RunFolder(run_dir).config
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a dedn run directory (no {RunFolder.CONFIG}); give a folder that "
                              "`dedn train` wrote")
    return config_from_dict(read_json(path, "config"), str(path))


CLASS_FORMAT = "dedn-classes-1"


def write_class_file(run_dir: str | Path, data: Any, *, seen_mask: Any = None,
                     calibration: float | None = None) -> Path:
    """Write ``RUN/classes.json`` (format ``dedn-classes-1``) for :meth:`Predictor.from_run`.

    Args:
        run_dir: the run directory.
        data: a :class:`dedn.data.dataset.ZSLData` (names, ``att`` and the trainval labels are taken from it) or a
            mapping with ``class_names`` (K), ``attribute_names`` (D), ``class_att`` (K x D, dataset
            attribute order, as given to the model) and ``seen_mask`` (K bools).
        seen_mask: overrides the seen mask (default: the mapping's, or the classes of the trainval images).
        calibration: the calibrated-stacking ``gamma`` chosen for the run; predictions use it by default.

    Returns the path written.
    """
    if isinstance(data, Mapping):
        names, attrs, att = data["class_names"], data["attribute_names"], data["class_att"]
        seen = data.get("seen_mask") if seen_mask is None else seen_mask
        if calibration is None:
            calibration = data.get("calibration")
    else:
        names, attrs, att = data.class_names, data.attribute_names, data.att
        seen = seen_mask
        if seen is None:
            seen = np.isin(np.arange(data.n_classes), data.labels[data.trainval_loc])
    att = np.asarray(att, dtype=np.float64)
    if seen is None:
        raise DataError("write_class_file: no seen_mask given")
    seen = np.asarray(seen, dtype=bool)
    if att.ndim != 2 or att.shape != (len(names), len(attrs)) or seen.shape != (len(names),):
        raise DataError(f"write_class_file: {len(names)} class names, {len(attrs)} attribute names, "
                        f"class_att {att.shape} and seen_mask {seen.shape} do not match")
    record = {
        "format": CLASS_FORMAT,
        "class_names": [str(n) for n in names],
        "attribute_names": [str(a) for a in attrs],
        "class_att": att.tolist(),
        "seen_mask": seen.tolist(),
        "calibration": None if calibration is None else float(calibration),
    }
    path = RunFolder(run_dir) / RunFolder.CLASSES
    atomic_write_text(path, json.dumps(record) + "\n")
    return path


def write_feature_provenance(run_dir: str | Path, provenance: Mapping[str, Any]) -> Path:
    """Write ``RUN/features.json`` from a feature store's (or :meth:`Backbone.provenance`'s) record.

    Keys: ``backbone`` (a :func:`dedn.features.backbones.get_backbone` name, or None for precomputed features, which
    is recorded as such) and ``image_size``; ``weights``
    (``"imagenet"``, a local file, ``None`` for random init, or the backbone's own ``weights_source``
    text) and ``weights_sha256`` are used when present; other entries are kept for reference.
    """
    record = dict(provenance)
    if record.get("backbone") is None:
        # Precomputed features (an imported HDF5 file): no backbone is known. Recorded as such, so that the
        # run works on feature maps and asks for --backbone only when it is given images.
        record.update(backbone=None, image_size=record.get("image_size"),
                      note="precomputed features: no backbone recorded; pass --backbone to use images")
    path = RunFolder(run_dir) / RunFolder.FEATURES
    atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")
    return path


def read_json(path: Path, what: str) -> Any:
    """A run file's JSON; CheckpointError naming the file when it cannot be read."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({exc})") from None


def read_class_file(run_dir: str | Path) -> dict[str, Any] | None:
    """``RUN/classes.json`` as written by :func:`write_class_file`, checked; None when the run has none.

    Returns ``class_names``, ``attribute_names`` (lists), ``class_att`` (K x D float32), ``seen_mask`` (K bool)
    and ``calibration`` (float or None).
    """
    path = RunFolder(run_dir) / RunFolder.CLASSES
    if not path.is_file():
        return None
    rec = read_json(path, "class file")
    try:
        names, attrs = [str(n) for n in rec["class_names"]], [str(a) for a in rec["attribute_names"]]
        att = np.asarray(rec["class_att"], dtype=np.float32)
        seen = np.asarray(rec["seen_mask"], dtype=bool)
        calibration = None if rec.get("calibration") is None else float(rec["calibration"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed class file ({type(exc).__name__}: {exc}); expected class_names, "
                              "attribute_names, class_att, seen_mask") from None
    if att.shape != (len(names), len(attrs)) or seen.shape != (len(names),):
        raise CheckpointError(f"{path}: {len(names)} class names, {len(attrs)} attribute names, class_att "
                              f"{att.shape} and seen_mask {seen.shape} do not match")
    return {"class_names": names, "attribute_names": attrs, "class_att": att, "seen_mask": seen,
            "calibration": calibration}


def read_run_metrics(run_dir: str | Path) -> dict[str, Any]:
    """``RUN/metrics.json`` ({} when the run has not been evaluated); CheckpointError when unreadable."""
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        return {}
    metrics = read_json(path, "metrics file")
    if not isinstance(metrics, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return metrics


def recorded_calibration(run_dir: str | Path, cfg: RunConfig, data: ZSLData) -> Calibration:
    """The calibration a run used, as its ``metrics.json`` records it (gamma and source); a run without that
    record gets what its config asks for (:func:`dedn.eval.evaluate.calibration_value`)."""
    rec = read_run_metrics(run_dir)
    if isinstance(rec.get("gamma"), (int, float)) and rec.get("gamma_source") in [s.value for s in GammaSource]:
        return Calibration(float(rec["gamma"]), rec["gamma_source"])
    return calibration_value(cfg, data)
