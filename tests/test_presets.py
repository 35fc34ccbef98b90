"""The six shipped presets load with the config loader and match the paper's hyperparameter table (docs/method.md)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

from dedn.config import RunConfig, load_config
from dedn.errors import ConfigError

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


REPLAYS = {"cub-released": "cub-gzsl", "sun-released": "sun-gzsl", "awa2-released": "awa2-gzsl"}
# presets for stores of other backbones: (the preset they extend, the backbone, the image size)
BACKBONE_PRESETS = {"cub-vit-b16-gzsl": ("cub-gzsl", "timm:vit_base_patch16_224", 224),
                    "cub-dinov2-b14-gzsl": ("cub-gzsl", "timm:vit_base_patch14_dinov2", 224)}


def test_exactly_the_six_presets_and_their_replays():
    dedn_presets = [p.stem for p in PRESETS.glob("*.yaml") if load_config(p).model.name == "dedn"]
    # other methods' presets are tested with them
    assert sorted(dedn_presets) == sorted([*TABLE, *REPLAYS, *BACKBONE_PRESETS])


@pytest.mark.parametrize("name", sorted(BACKBONE_PRESETS))
def test_backbone_presets_are_their_base_preset_guarding_the_store(name):
    base_name, backbone, size = BACKBONE_PRESETS[name]
    cfg, base = load_config(name), load_config(base_name)
    assert (cfg.name, cfg.data.expect_backbone, cfg.data.expect_image_size) == (name, backbone, size)
    assert (cfg.seed, cfg.model, cfg.loss, cfg.train, cfg.eval) == (base.seed, base.model, base.loss, base.train,
                                                                    base.eval)


@pytest.mark.parametrize("name", sorted(REPLAYS))
def test_replay_presets_are_their_gzsl_preset_in_reference_mode_with_the_released_draws(name):
    cfg, base = load_config(name), load_config(REPLAYS[name])
    assert (cfg.mode, cfg.train.rng, cfg.eval.protocol, cfg.name) == ("reference", "released", "published", name)
    assert (cfg.seed, cfg.model, cfg.loss, cfg.data) == (base.seed, base.model, base.loss, base.data)
    assert (cfg.train.epochs, cfg.train.balanced, cfg.train.batch_size) == (
        base.train.epochs, base.train.balanced, base.train.batch_size)


def test_extends_cycles_and_bad_values_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\nseed: 1\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    (tmp_path / "c.yaml").write_text("extends: [cub-gzsl, sun-gzsl]\n")
    (tmp_path / "d.yaml").write_text("extends: cub-gzsl\nseed: 3\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="extends must name one config"):
        load_config(tmp_path / "c.yaml")
    cfg = load_config(tmp_path / "d.yaml")
    assert (cfg.seed, cfg.data.dataset, cfg.train.epochs) == (3, "CUB", 80)


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
