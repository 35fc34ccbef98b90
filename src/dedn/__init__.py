"""dedn: the Dual Expert Distillation Network (IJCAI 2024) for generalized zero-shot learning.

The entry points a notebook needs are attributes of the package itself::

    import dedn

    cfg = dedn.load_config("demo", ["data.source=synthetic", "train.epochs=2"])
    result = dedn.train(cfg)            # the validated protocol; result.metrics.H, .gamma, .gamma_source
    model = dedn.load_weights(result.model_dir / "model.safetensors")

Each is defined once, in the module named in :data:`_API`, and imported on first use, so ``import dedn`` (and
the ``dedn`` command's start) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_API: dict[str, str] = {
    "load_config": "dedn.config",  # a config from a preset name or a YAML file, with dotted overrides
    "load_data": "dedn.factory",  # the dataset a config names
    "build_model": "dedn.factory",  # a freshly initialised model of the config's method for that dataset
    "train": "dedn.apps.protocols",  # train and evaluate one model under eval.protocol
    "load_weights": "dedn.training.checkpoint",  # a trained model from its model file (hash checked)
    "evaluate_model": "dedn.eval.evaluate",  # T, U, S, H, AUSUC of a model on a dataset's test split
    "Predictor": "dedn.apps.predict",  # top-k prediction for images or feature maps, new classes included
    "explain_image": "dedn.apps.explain",  # per-attribute attention heatmaps of both experts
    "run_experiment": "dedn.apps.experiments",  # the paper's tables and figures, seeds, protocols
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'dedn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
