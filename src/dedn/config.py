"""Run configuration: typed dataclasses, read from YAML files and ``dotted.key=value`` overrides.

Configs are data. They are merged with OmegaConf structured configs, so an unknown or mistyped key
and a value of the wrong type are refused with the key's full name before any work starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf  # noqa: F401  (MISSING re-exported for presets)
from omegaconf.errors import OmegaConfBaseException

from dedn.checks import (
    CALIBRATION,
    COUNT,
    DEVICE,
    FRACTION,
    IMAGE_SIZE,
    NON_NEGATIVE,
    NON_NEGATIVE_COUNT,
    OPEN_FRACTION,
    POSITIVE,
    GammaChoice,
    Rule,
    check,
    choice,
    integer,
    number,
    optional,
    parse_calibration,
)
from dedn.data.imagebench import ImageBenchConfig
from dedn.data.synthetic import SyntheticConfig
from dedn.devices import PRECISIONS
from dedn.errors import ConfigError

#: Where a run's features come from (each has a loader in :data:`dedn.factory.DATA_LOADERS`).
DATA_SOURCES = ("synthetic", "store", "hdf5", "imagebench")
#: The sources that read no data.path (a path given with one of them names a store or HDF5 file instead).
PATHLESS_SOURCES = ("synthetic", "imagebench")
#: The optimisers a run may use (``train.optimizer``).
OPTIMIZERS = ("rmsprop", "adam", "sgd")
MODES = ("paper", "reference")


@dataclass
class DataConfig:
    """Where features and semantics come from."""

    # One of DATA_SOURCES. With data.path given, a source that reads no path (synthetic, imagebench) becomes the
    # path's kind, "hdf5" for a .h5 / .hdf5 file, else "store", unless an override names data.source: so
    # `dedn train data.path=STORE` and `dedn train --config demo data.path=STORE` train on the store.
    source: str = "synthetic"
    path: str | None = None  # feature store folder or DAZLE-layout HDF5 file
    dataset: str | None = None  # CUB | SUN | AWA2: picks the built-in clusters and checks counts
    semantic_dir: str | None = None  # xlsa17 folder with att_splits.mat and the word-vector pickle
    w2v: str | None = None  # explicit word-vector file (pickle or .npy) overriding the store's
    expect_backbone: str | None = None  # refuse a store made by another backbone
    expect_image_size: int | None = None  # refuse a store made at another image size
    split: str = "test"  # test: train on trainval, evaluate on test; validation: the honest val task
    val_seen_fraction: float = 0.2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    imagebench: ImageBenchConfig = field(default_factory=ImageBenchConfig)
    backbone: str = "efficientnet-lite0"  # imagebench: the backbone that turns its images into features
    # imagebench: its weights, "imagenet" for a registered backbone's own, or a local file (timm:<name> needs one)
    backbone_weights: str = "imagenet"
    backbone_layer: int | None = None  # imagebench, timm:<name> only: the block to take (default: final features)
    image_size: int | None = None  # imagebench: backbone input size (default: the rendered image size)
    cache_dir: str = ".cache/dedn"  # imagebench: where rendered features are cached


@dataclass
class ModelConfig:
    """The model: which registered method (:mod:`dedn.models.registry`), and DEDN's options (docs/method.md,
    "The model" and "Attribute clusters").

    The method checks its own options when it is built (``model.experts`` by DEDN), before any training: the
    config may not import the models, which own those facts.
    """

    name: str = "dedn"  # the registered method (dedn.models.registry.model_names())
    clusters: str = "auto"  # auto | paper | reference | half | kmeans | none | PATH to a cluster file
    n_clusters: int | None = None  # Q for kmeans
    l_rc: float = 0.8  # region/channel mix at inference
    l_e: float = 0.9  # cExp/fExp mix at inference
    low_rank: int | None = None  # W1 = H1 H3 of this rank (reference SUN: 256 GZSL, 128 ZSL)
    channel_attention: bool = True  # False: region branch only (Table 3 "w/o channel attention")
    # The method's own options (a method other than DEDN reads its settings here, e.g. model.options.gate=false);
    # the method checks them when it is built, naming model.options.<key>.
    options: dict[str, Any] = field(default_factory=dict)
    experts: str = "both"  # both | cexp | fexp


@dataclass
class LossConfig:
    """Loss weights and switches (docs/method.md, "Losses"; reference-mode terms in docs/modes.md)."""

    beta: float = 0.001  # align
    gamma: float = 0.1  # distill
    margin: float = 1.0  # MAL margin eps
    mal: bool = True  # False: plain cross-entropy over all K classes
    align: bool = True
    distill: bool = True
    lamb: float = 0.0  # reference self-calibration weight
    calibration_margin: float = 1.0  # reference: fixed +margin unseen / -margin seen inside the scores
    # The paper's two readings of the align / distill discrepancy (paper mode; see docs/modes.md).
    divergence: str = "jsd"  # jsd (the text: JS divergence) | symmetric_kl (eqs. 7, 12: 1/2 [KL(P||Q) + KL(Q||P)])
    squared_error: str = "mean"  # mean (over batch and entries) | sum (over the score vector, mean over the batch)


@dataclass
class TrainConfig:
    """Optimisation: the optimiser (RMSprop by default) and batches (docs/method.md, "Training")."""

    epochs: int = 80
    batch_size: int = 50
    optimizer: str = "rmsprop"  # one of OPTIMIZERS (the published methods: RMSprop; TransZero: Adam or SGD)
    lr: float = 1e-4
    momentum: float = 0.9  # RMSprop and SGD
    weight_decay: float = 1e-4
    alpha: float = 0.99  # RMSprop smoothing (torch default)
    eps: float = 1e-8
    balanced: bool = True  # reference balanced batches
    iters_per_epoch: int | None = None  # default n_trainval // batch_size
    eval_every: int = 1  # epochs between evaluations (0: only at the end)
    checkpoint_every: int = 1  # epochs between checkpoints
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # CPU threads for this process (None: torch's default); 1 suits small models
    dtype: str = "float32"
    precision: str = "fp32"  # fp32 | bf16: the feature products in training, evaluation and prediction
    progress: bool = True
    max_iters: int | None = None  # stop after this many iterations (smoke tests, benchmarks)
    tensorboard: bool = False  # also log every epoch to RUN/tensorboard (needs the tensorboard extra)
    # dedn: batches from (seed, epoch), resumable epoch by epoch. released (reference mode): the released code's
    # initial draws, batches and iteration/evaluation schedule, draw for draw (docs/modes.md, "Replaying").
    rng: str = "dedn"


@dataclass
class EvalConfig:
    """Evaluation: calibrated stacking and the model-selection protocol (docs/method.md)."""

    calibration: str = "auto"  # auto: chosen on validation (validated protocol), else the mode default; or a number
    curve_points: int = 200  # gamma values traced for the seen-unseen curve
    batch_size: int = 200
    protocol: str = "validated"  # validated | published | fixed (see dedn.apps.protocols)
    plots: bool = True  # write the seen-unseen curve PNG of each run

    @property
    def gamma(self) -> GammaChoice | float:
        """``calibration`` parsed: :class:`~dedn.checks.GammaChoice` (auto, validated) or a number."""
        return parse_calibration(self.calibration)


@dataclass
class RunConfig:
    """Everything one training run needs."""

    mode: str = "paper"  # paper | reference
    seed: int = 0
    name: str = "dedn"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# What every config value must be: one row per key, checked in order by _check (before any work starts).
# Relations between values (n_unseen < n_classes, clusters covering the attributes) are checked where the
# data they describe is built.
RULES: tuple[tuple[str, Rule], ...] = (
    ("mode", choice(*MODES)),
    ("seed", NON_NEGATIVE_COUNT),
    ("data.source", choice(*DATA_SOURCES)),
    ("data.split", choice("test", "validation")),
    ("data.expect_image_size", optional(integer(32))),
    ("data.val_seen_fraction", OPEN_FRACTION),
    ("data.image_size", optional(IMAGE_SIZE)),
    ("data.synthetic.n_images", COUNT),
    ("data.synthetic.n_channels", COUNT),
    ("data.synthetic.height", COUNT),
    ("data.synthetic.width", COUNT),
    ("data.synthetic.n_classes", integer(2)),
    ("data.synthetic.n_unseen", COUNT),
    ("data.synthetic.n_val", NON_NEGATIVE_COUNT),
    ("data.synthetic.n_attributes", COUNT),
    ("data.synthetic.n_clusters", COUNT),
    ("data.synthetic.semantic_dim", COUNT),
    ("data.synthetic.local_fraction", FRACTION),
    ("data.synthetic.noise", NON_NEGATIVE),
    ("data.synthetic.test_seen_fraction", OPEN_FRACTION),
    ("data.synthetic.seed", NON_NEGATIVE_COUNT),
    # ImageBenchConfig.validate (called by _check) checks the ranges; its `< 0` tests let NaN through.
    *((f"data.imagebench.{k}", NON_NEGATIVE) for k in (
        "pose_jitter_deg", "scale_jitter", "color_jitter", "lighting_jitter", "clutter", "noise")),
    ("model.n_clusters", optional(COUNT)),
    ("model.l_rc", FRACTION),
    ("model.l_e", FRACTION),
    ("model.low_rank", optional(COUNT)),
    ("loss.beta", NON_NEGATIVE),
    ("loss.gamma", NON_NEGATIVE),
    ("loss.margin", NON_NEGATIVE),
    ("loss.lamb", NON_NEGATIVE),
    ("loss.calibration_margin", NON_NEGATIVE),
    ("loss.divergence", choice("jsd", "symmetric_kl")),
    ("loss.squared_error", choice("mean", "sum")),
    ("train.epochs", NON_NEGATIVE_COUNT),
    ("train.batch_size", COUNT),
    ("train.lr", POSITIVE),
    ("train.momentum", number(0.0, 1.0, high_open=True)),
    ("train.optimizer", choice(*OPTIMIZERS)),
    ("train.weight_decay", NON_NEGATIVE),
    ("train.alpha", OPEN_FRACTION),
    ("train.eps", POSITIVE),
    ("train.iters_per_epoch", optional(COUNT)),
    ("train.eval_every", NON_NEGATIVE_COUNT),
    ("train.checkpoint_every", NON_NEGATIVE_COUNT),
    ("train.device", DEVICE),
    ("train.threads", optional(COUNT)),
    ("train.dtype", choice("float32", "float64")),
    ("train.precision", choice(*PRECISIONS)),
    ("train.max_iters", optional(COUNT)),
    ("train.rng", choice("dedn", "released")),
    ("eval.calibration", CALIBRATION),
    ("eval.curve_points", integer(2)),
    ("eval.batch_size", COUNT),
    ("eval.protocol", choice("validated", "published", "fixed")),
)


def _check(cfg: RunConfig, origin: str) -> RunConfig:
    """``cfg`` if every value passes :data:`RULES` (and the image benchmark's own checks), else ConfigError."""
    for key, rule in RULES:
        check(key, get_key(cfg, key), rule, origin)
    _check_replay(cfg, origin)
    try:
        cfg.data.imagebench.validate()
    except ConfigError as exc:
        raise ConfigError(f"{origin}: data.{exc}") from None
    return cfg


def _check_replay(cfg: RunConfig, origin: str) -> None:
    """``train.rng=released`` replays the released code's run, so the settings it fixes must be left alone."""
    if cfg.train.rng != "released":
        return
    if cfg.mode != "reference":
        raise ConfigError(f"{origin}: train.rng=released replays the released code's training, which only "
                          f"reference mode computes; set mode=reference (got mode={cfg.mode})")
    if cfg.train.iters_per_epoch is not None or cfg.train.eval_every != 1:
        key = "train.iters_per_epoch" if cfg.train.iters_per_epoch is not None else "train.eval_every"
        raise ConfigError(f"{origin}: {key} cannot be set with train.rng=released: the released schedule runs "
                          "n_trainval * epochs // batch_size iterations and evaluates every niters // epochs")
    if cfg.train.precision != "fp32":
        raise ConfigError(f"{origin}: train.rng=released replays the released code's float32 run; set "
                          f"train.precision=fp32 (got {cfg.train.precision})")
    if cfg.eval.protocol == "validated" or cfg.data.split != "test":
        raise ConfigError(f"{origin}: train.rng=released replays a released run, which trains on trainval and "
                          "evaluates on the test split: set eval.protocol=published (or fixed) and data.split=test, "
                          "or start from a replay preset (cub-released, sun-released, awa2-released)")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (optional) and apply ``dotted.key=value`` overrides.

    ``path`` is a file, or a packaged config or preset by name (``"demo"``, ``"cub-gzsl"``), resolved by
    :func:`find_config`. A file whose top-level ``extends:`` names another config (a path or a name) holds
    only what it changes: it is merged over that config.

    Raises:
        ConfigError: the file is missing or unreadable, a key is unknown, a value has the wrong type.
    """
    if path is None:
        return _merged(RunConfig, "defaults", None, overrides)
    try:
        values = _read_yaml(path)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_first_line(exc)}") from None
    except Exception as exc:  # YAML syntax errors and the like
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    return _merged(RunConfig, str(path), values, overrides)


def _merged(base: RunConfig | type[RunConfig], origin: str, values: Any, overrides: Sequence[str]) -> RunConfig:
    """The one load sequence: the structured ``base``, ``values`` (a YAML file's or a dict) merged over it, then
    the ``dotted.key=value`` overrides, turned into a :class:`RunConfig` and checked (:func:`_check`).

    Errors name ``origin`` (``+ overrides`` once the overrides are being merged); OmegaConf's own ones give the
    first line of its message.
    """
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} must look like dotted.key=value")
    where = origin
    try:
        merged = OmegaConf.structured(base)
        if values is not None:
            merged = OmegaConf.merge(merged, values)
        if overrides:
            where = f"{origin} + overrides"
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{where}: {_first_line(exc)}") from None
    except Exception as exc:  # values OmegaConf cannot take at all
        raise ConfigError(f"{where}: cannot read config: {exc}") from None
    assert isinstance(cfg, RunConfig)
    if cfg.data.path and cfg.data.source in PATHLESS_SOURCES and not any(
            o.split("=", 1)[0].strip() == "data.source" for o in overrides):
        cfg.data.source = "hdf5" if Path(cfg.data.path).suffix.lower() in (".h5", ".hdf5") else "store"
    return _check(cfg, where)


def _first_line(exc: Exception) -> str:
    # OmegaConf's first line says what is wrong; the rest is its own context (full_key, object_type), of which
    # the key is what a user needs. A value of the wrong type ("Value 'abc' of type 'str' could not be converted
    # to Integer") is said in the user's terms: the key, its value, the type wanted and an example.
    line = str(exc).splitlines()[0]
    key = getattr(exc, "full_key", None)
    wrong = re.match(r"Value '(.*)' (?:of type '\w+' could not be converted to|is not a valid) (\w+)", line)
    if key and wrong:
        wanted = _WANTED.get(wrong.group(2).lower(), f"a {wrong.group(2).lower()}")
        default = _default_value(key)
        example = f", e.g. {key}={default}" if default not in (None, "") else ""
        return f"{key}={wrong.group(1)}: not {wanted}; give {wanted}{example}"
    return f"{key}: {line}" if key and key not in line else line


#: OmegaConf's type names as a user reads them.
_WANTED = {"integer": "an integer", "float": "a number", "bool": "true or false"}


def _default_value(key: str) -> Any:
    """The built-in default of a dotted key, or None."""
    try:
        value = OmegaConf.select(OmegaConf.structured(RunConfig), key)
    except OmegaConfBaseException:
        return None
    if isinstance(value, bool):
        return str(value).lower()
    return value.value if isinstance(value, Enum) else value


def _read_yaml(path: str | Path, chain: tuple[Path, ...] = ()) -> Any:
    """A config file's values, merged over the config its ``extends:`` key names (recursively)."""
    p = find_config(path).resolve()
    if p in chain:
        raise ConfigError(f"{p}: extends itself through {' -> '.join(str(c) for c in chain)}")
    values = OmegaConf.load(p)
    parent = values.pop("extends", None) if isinstance(values, DictConfig) else None
    if parent is None:
        return values
    if not isinstance(parent, str):
        raise ConfigError(f"{p}: extends must name one config file or preset, got {parent!r}")
    return OmegaConf.merge(_read_yaml(parent, (*chain, p)), values)


def apply_overrides(cfg: RunConfig, overrides: list[str] | tuple[str, ...], origin: str = "config") -> RunConfig:
    """``cfg`` with ``dotted.key=value`` overrides applied and checked (``cfg`` itself when there are none)."""
    if not overrides:
        return cfg
    return _merged(cfg, origin, None, overrides)


def find_config(path: str | Path) -> Path:
    """A config file by path, or a packaged config/preset by relative path or name (``cub-gzsl``).

    ``presets/cub-gzsl.yaml`` works from any folder: paths that do not exist on disk are looked up in
    the package's ``configs`` folder.
    """
    p = Path(path)
    if p.is_file():
        return p
    packaged = _PACKAGED_CONFIGS
    candidates = [packaged / p, packaged / "presets" / p.name, packaged / "presets" / f"{p.name}.yaml",
                  packaged / f"{p.name}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"{path}: no such config file, and no packaged config of that name; give a YAML "
                      f"file's path or one of: {', '.join(packaged_configs())}")


_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> list[str]:
    """The names of the packaged configs :func:`find_config` takes: the demo's, then the presets."""
    return [*sorted(f.stem for f in _PACKAGED_CONFIGS.glob("*.yaml")),  # demo
            *sorted(f.stem for f in (_PACKAGED_CONFIGS / "presets").glob("*.yaml"))]


def config_from_dict(data: dict[str, Any], origin: str = "<dict>") -> RunConfig:
    """Build a checked :class:`RunConfig` from a plain dict (for example a checkpoint's config.json)."""
    return _merged(RunConfig, origin, data, ())


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain, JSON-serialisable dict of a config."""
    return json.loads(json.dumps(asdict(cfg)))


#: Settings that do not change a run's result (where and how visibly it runs); a resumed run may change them.
VOLATILE_KEYS = ("train.device", "train.progress", "train.threads", "train.tensorboard")


def without_keys(cfg_dict: Mapping[str, Any], drop: Sequence[str] = VOLATILE_KEYS) -> dict[str, Any]:
    """A deep copy of a config dict without the ``drop`` keys (dotted; absent ones are skipped)."""
    out = json.loads(json.dumps(cfg_dict))
    for dotted in drop:
        parent, _, last = dotted.rpartition(".")
        with contextlib.suppress(KeyError):
            node = get_key(out, parent) if parent else out
            if isinstance(node, dict):
                node.pop(last, None)
    return out


def config_hash(cfg: RunConfig, drop: Sequence[str] = VOLATILE_KEYS, extra: Mapping[str, Any] | None = None,
                length: int = 32) -> str:
    """The first ``length`` hex digits of the sha256 of ``cfg`` as a sorted JSON dict, without the ``drop`` keys.

    What is left out, and why: ``drop`` defaults to :data:`VOLATILE_KEYS`, the settings that do not change a
    run's result (device, threads, progress bar, TensorBoard), so a run resumed on another device keeps its
    identity; callers that identify a job rather than a run also drop where it is written (``name``,
    ``output_dir``) or the seed. Every other key counts, at any value. With ``extra``, what is hashed is
    ``{"config": <cfg without drop>, **extra}`` (a job's protocol and grids beside its config); values JSON
    cannot hold are hashed as their ``str``.
    """
    content: dict[str, Any] = {"config": without_keys(config_to_dict(cfg), drop)}
    if extra is None:
        content = content["config"]
    elif "config" in extra:
        raise ValueError("extra cannot hold a 'config' entry: that is where the config itself goes")
    else:
        content.update(extra)
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    return digest[:length]


# ---------------------------------------------------------------------------------------------- dotted keys
def get_key(source: Any, dotted: str) -> Any:
    """The value at ``dotted`` (``train.lr``) in a config (or any of its parts) or in a nested dict.

    Raises:
        KeyError: ``dotted`` names no value there (the message is the dotted key).
    """
    node: Any = source
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif is_dataclass(node) and not isinstance(node, type) and hasattr(node, part):
            node = getattr(node, part)
        else:
            raise KeyError(dotted)
    return node


def has_key(dotted: str) -> bool:
    """Whether ``dotted`` names a leaf setting of :class:`RunConfig` (``train.lr``, not ``train``), or a key of
    a free mapping in it (``model.options.gate``)."""
    node: Any = RunConfig
    for part in dotted.split("."):
        if typing.get_origin(node) is dict:  # a free mapping (model.options): the method checks its keys
            return True
        if not (isinstance(node, type) and is_dataclass(node)):
            return False
        hints = typing.get_type_hints(node)  # annotations are strings under ``from __future__``
        if part not in hints:
            return False
        node = hints[part]
    return not (isinstance(node, type) and is_dataclass(node))


def set_keys(cfg: RunConfig, changes: Mapping[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with typed values set by dotted key (no parsing, no checks: the caller's own values).

    ``cfg`` itself is left as it is: every dataclass on the path to a changed value is replaced.
    """
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        nodes: list[Any] = [cfg]
        for p in parents:
            nodes.append(getattr(nodes[-1], p))
        new = replace(nodes[-1], **{last: value})
        for node, name in zip(reversed(nodes[:-1]), reversed(parents), strict=True):
            new = replace(node, **{name: new})
        cfg = new
    return cfg


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
