"""The six shipped presets load with the config loader and match the paper's hyperparameter table (docs/method.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from dedn.config import RunConfig, load_config

PRESETS = Path(str(resources.files("dedn.configs"))) / "presets"

# preset: (dataset, epochs, l_rc, l_e, balanced, lamb, seed, low_rank)
TABLE = {
    "cub-gzsl": ("CUB", 80, 0.8, 0.9, True, 0.0, 214, None),
    "sun-gzsl": ("SUN", 80, 0.95, 0.3, False, 0.0, 2339, 256),
    "awa2-gzsl": ("AWA2", 20, 0.8, 0.5, True, 0.11, 87778, None),
    "cub-zsl": ("CUB", 80, 0.6, 0.9, True, 0.18, 214, None),
    "sun-zsl": ("SUN", 80, 0.95, 0.3, False, 0.0, 2339, 128),
    "awa2-zsl": ("AWA2", 20, 0.8, 0.5, False, 0.11, 87778, None),
}


def test_exactly_the_six_presets():
    assert sorted(p.stem for p in PRESETS.glob("*.yaml")) == sorted(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_preset_matches_table(name):
    cfg = load_config(PRESETS / f"{name}.yaml")
    ds, epochs, l_rc, l_e, balanced, lamb, seed, low_rank = TABLE[name]
    assert cfg.name == name and cfg.mode == "paper"
    assert (cfg.data.source, cfg.data.dataset) == ("store", ds)
    assert (cfg.train.epochs, cfg.model.l_rc, cfg.model.l_e) == (epochs, l_rc, l_e)
    assert (cfg.train.balanced, cfg.loss.lamb) == (balanced, lamb)
    assert (cfg.seed, cfg.model.low_rank) == (seed, low_rank)
    # batch 50 and RMSprop settings are the defaults, not repeated in the presets
    default = RunConfig()
    assert cfg.train.batch_size == 50 and cfg.train.lr == default.train.lr == 1e-4
    assert (cfg.train.momentum, cfg.train.weight_decay) == (0.9, 1e-4)
    assert (cfg.loss.beta, cfg.loss.gamma) == (0.001, 0.1)


def test_preset_with_overrides():
    cfg = load_config(PRESETS / "sun-gzsl.yaml", ["mode=reference", "data.path=/stores/sun"])
    assert cfg.mode == "reference" and cfg.data.path == "/stores/sun" and cfg.model.low_rank == 256
