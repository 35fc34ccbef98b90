"""Config helpers: dotted keys, the config hash, and the one load sequence behind every way of making a config."""

from __future__ import annotations

import hashlib
import json

import pytest

from dedn.config import (
    VOLATILE_KEYS,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_hash,
    config_to_dict,
    get_key,
    has_key,
    load_config,
    set_keys,
    without_keys,
)
from dedn.errors import ConfigError


def test_get_key_reads_configs_and_dicts() -> None:
    cfg = load_config(None, ["train.lr=0.5"])
    assert get_key(cfg, "train.lr") == get_key(config_to_dict(cfg), "train.lr") == 0.5
    assert get_key(cfg, "data.synthetic.n_classes") == cfg.data.synthetic.n_classes
    assert get_key(cfg.train, "lr") == 0.5 and get_key(cfg, "train") is cfg.train
    for source in (cfg, config_to_dict(cfg)):
        for missing in ("train.nope", "train.lr.more", "nope"):
            with pytest.raises(KeyError, match=missing.replace(".", r"\.")):
                get_key(source, missing)


def test_has_key_names_leaf_settings_only() -> None:
    assert has_key("train.lr") and has_key("seed") and has_key("data.synthetic.n_classes")
    assert not has_key("train") and not has_key("data.synthetic")  # sections, not settings
    assert not has_key("train.nope") and not has_key("train.lr.more") and not has_key("")


def test_set_keys_replaces_typed_values_and_leaves_the_original() -> None:
    cfg = RunConfig()
    out = set_keys(cfg, {"seed": 3, "train.lr": 0.5, "data.synthetic.n_classes": 7})
    assert (out.seed, out.train.lr, out.data.synthetic.n_classes) == (3, 0.5, 7)
    assert (cfg.seed, cfg.train.lr, cfg.data.synthetic.n_classes) == (0, 1e-4, RunConfig().data.synthetic.n_classes)
    assert out.model is cfg.model  # untouched parts are shared, changed ones replaced
    with pytest.raises(TypeError):
        set_keys(cfg, {"train.nope": 1})


def test_without_keys_drops_dotted_keys_and_skips_absent_ones() -> None:
    values = config_to_dict(RunConfig())
    out = without_keys(values, ("train.device", "name", "nope.deeper", "train.nope"))
    assert "device" not in out["train"] and "name" not in out and "device" in values["train"]
    assert out["model"] == values["model"]


def test_config_hash_counts_every_key_but_the_dropped_ones() -> None:
    cfg = RunConfig()
    plain = hashlib.sha256(json.dumps(without_keys(config_to_dict(cfg)), sort_keys=True).encode()).hexdigest()
    assert config_hash(cfg) == plain[:32]
    assert config_hash(set_keys(cfg, {"train.device": "cpu", "train.progress": False})) == config_hash(cfg)
    # Every other key counts, at its default value too (train.rng and train.precision were once left out there).
    for key, value in (("train.rng", "released"), ("train.precision", "bf16"), ("seed", 1)):
        assert config_hash(set_keys(cfg, {key: value})) != config_hash(cfg), key
    assert config_hash(set_keys(cfg, {"seed": 1}), (*VOLATILE_KEYS, "seed")) == config_hash(cfg, (*VOLATILE_KEYS,
                                                                                                   "seed"))
    extra = {"protocol": "fixed", "grid": [1.5, 2.0]}
    wanted = {"config": without_keys(config_to_dict(cfg), ("name",)), **extra}
    digest = hashlib.sha256(json.dumps(wanted, sort_keys=True, default=str).encode()).hexdigest()
    assert config_hash(cfg, ("name",), extra, length=16) == digest[:16]
    with pytest.raises(ValueError, match="config"):
        config_hash(cfg, extra={"config": 1})


def test_every_way_in_names_its_origin_and_key() -> None:
    with pytest.raises(ConfigError, match=r"^defaults \+ overrides: train\.nope: Key .nope. not in .TrainConfig."):
        load_config(None, ["train.nope=1"])
    with pytest.raises(ConfigError, match=r"^override 'train\.lr' must look like dotted\.key=value"):
        load_config(None, ["train.lr"])
    with pytest.raises(ConfigError, match=r"^run \+ overrides: train\.lr=fast: not a number; give a number"):
        apply_overrides(RunConfig(), ["train.lr=fast"], "run")
    with pytest.raises(ConfigError, match=r"^run \+ overrides: train\.lr must be"):
        apply_overrides(RunConfig(), ["train.lr=-1"], "run")
    with pytest.raises(ConfigError, match=r"^old/config\.json: train\.nope: Key 'nope' not in 'TrainConfig'"):
        config_from_dict({"train": {"nope": 1}}, "old/config.json")
    assert config_from_dict(config_to_dict(load_config("demo")), "x") == load_config("demo")
    assert apply_overrides(RunConfig(), []) == RunConfig()


def test_every_data_source_has_one_loader() -> None:
    from dedn.config import DATA_SOURCES
    from dedn.factory import DATA_LOADERS

    assert tuple(DATA_LOADERS) == DATA_SOURCES


def test_a_data_path_names_the_source_unless_an_override_does() -> None:
    # `dedn train data.path=STORE` trains on the store, not on the default synthetic data, and so does a config
    # whose source reads no path (the demo's imagebench); a source given beside the path is kept.
    assert load_config(None, ["data.path=stores/mine"]).data.source == "store"
    assert load_config("demo", ["data.path=stores/mine"]).data.source == "store"
    assert load_config(None, ["data.path=features.hdf5"]).data.source == "hdf5"
    assert load_config(None, ["data.path=x", "data.source=synthetic"]).data.source == "synthetic"
    assert load_config("demo", []).data.source == "imagebench" and load_config(None, []).data.source == "synthetic"
    assert load_config("cub-gzsl", ["data.path=features.h5"]).data.source == "store"  # the preset's own source


def test_every_optimizer_has_a_builder_and_trains(tiny_cfg) -> None:
    import torch

    from dedn.config import OPTIMIZERS, apply_overrides
    from dedn.training.trainer import OPTIMIZERS as BUILDERS
    from dedn.training.trainer import Trainer

    assert tuple(BUILDERS) == OPTIMIZERS
    for name, kind in (("adam", torch.optim.Adam), ("sgd", torch.optim.SGD), ("rmsprop", torch.optim.RMSprop)):
        cfg = apply_overrides(tiny_cfg, [f"train.optimizer={name}", "train.epochs=1", "eval.plots=false"])
        trainer = Trainer(cfg)
        assert isinstance(trainer.optimizer, kind)
        before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.fit(final_evaluation=False)
        assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items()), name


def test_a_value_of_the_wrong_type_names_its_key() -> None:
    from dedn.config import load_config
    from dedn.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.epochs=abc: not an integer; give an integer, e\.g\. "
                                          r"train\.epochs=80$"):
        load_config(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"train\.balanced=maybe: not true or false; give true or false, e\.g\. "
                                          r"train\.balanced=true$"):
        load_config(None, ["train.balanced=maybe"])
