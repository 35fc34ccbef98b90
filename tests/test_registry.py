"""The method registry: what the layers above build, train and load a method through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dedn.config import RunConfig, apply_overrides
from dedn.errors import ConfigError
from dedn.factory import build_model, load_data
from dedn.models import registry
from dedn.models.dedn import DEDN, DEDNConfig
from dedn.models.losses import LossTerms
from dedn.models.registry import ModelEntry, create_model, entry_for, model_entry, model_names, register_model


class _Toy(nn.Module):
    """A stand-in method: one linear map from pooled features to class scores."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config["c"], config["k"])


def _toy_entry() -> ModelEntry:
    return ModelEntry(
        name="toy", label="Toy", model_type=_Toy, config_type=dict,
        build=lambda run, data, dataset, seed: _Toy({"c": data.feature_shape[0], "k": data.n_classes,
                                                     "dataset": dataset, "seed": seed}),
        from_config=_Toy,
        loss=lambda model, out, labels, seen, loss: LossTerms(total=out.sum()),
    )


def test_dedn_is_registered() -> None:
    assert "dedn" in model_names()
    entry = model_entry("dedn")
    assert entry.model_type is DEDN and entry.config_type is DEDNConfig
    assert None not in (entry.from_reference, entry.reference_scores, entry.reference_loss)
    with pytest.raises(ConfigError, match=r"model\.name must be one of \{.*dedn.*\}, got 'Dedn'"):
        model_entry("Dedn")
    with pytest.raises(ValueError, match="'dedn' is registered already"):
        register_model(entry)


def test_the_factory_builds_whatever_method_the_config_names(tiny_cfg: RunConfig, monkeypatch) -> None:
    data = load_data(tiny_cfg)
    dedn = build_model(tiny_cfg, data)
    assert entry_for(dedn) is model_entry("dedn") and dedn.config.l_e == tiny_cfg.model.l_e

    monkeypatch.setitem(registry._REGISTRY, "toy", _toy_entry())
    cfg = apply_overrides(tiny_cfg, ["model.name=toy", "seed=4"])
    toy = build_model(cfg, data)
    assert isinstance(toy, _Toy) and entry_for(toy).name == "toy"
    assert toy.config == {"c": data.feature_shape[0], "k": data.n_classes, "dataset": "synthetic", "seed": 4}
    assert create_model("toy", cfg, data, seed=9).config["seed"] == 9
    with pytest.raises(TypeError, match="Linear is not a model of a registered method"):
        entry_for(nn.Linear(1, 1))
    assert float(entry_for(toy).loss(toy, torch.ones(2), torch.zeros(2), torch.ones(2), cfg.loss).total) == 2.0
