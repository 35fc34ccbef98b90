"""The first hour of a new user: `dedn samples`, `dedn describe`, preset names from Python, help texts, store info."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from dedn.apps.class_files import load_class_definitions
from dedn.apps.describe import attribute_groups
from dedn.config import find_config, load_config
from dedn.data.imagebench import ImageBenchConfig, make_image_benchmark
from dedn.errors import ConfigError
from dedn.features.imagebench_features import _cache_key
from tests.conftest import TINY, run_cli


def _ok(args: list, monkeypatch, capsys) -> str:
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory) -> Path:
    """A tiny run under the fixed protocol (seconds), trained as `dedn train` does."""
    from dedn.apps.protocols import train

    run = tmp_path_factory.mktemp("describe") / "run"
    train(load_config(None, [*TINY, "eval.protocol=fixed"]), run_dir=run)
    return run


# ---------------------------------------------------------------------------------------------- samples
def test_samples_writes_named_images_and_an_index(tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "samples"
    text = _ok(["samples", "--out", out, "--per-class", "2", "--classes", "unseen", "--classes", "1"],
               monkeypatch, capsys)
    bench = make_image_benchmark(load_config("demo").data.imagebench)
    with (out / "index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    unseen = [bench.class_names[c] for c in bench.unseen_classes]
    first = bench.class_names[0]
    assert {r["class"] for r in rows} == {*unseen, first}
    assert len(rows) == 2 * (len(unseen) + (first not in unseen))
    kinds = {r["class"]: r["kind"] for r in rows}
    assert all(kinds[c] == "unseen" for c in unseen)
    assert kinds[first] in ("seen", "validation") or first in unseen
    test = set(np.concatenate([bench.test_seen_loc, bench.test_unseen_loc]).tolist())
    for r in rows:
        assert r["path"].startswith(r["class"] + "__") and (out / r["path"]).is_file()
        index = int(r["path"].rsplit("__", 1)[1].removesuffix(".png"))
        assert r["split"] == ("test" if index in test else "trainval")
    assert all(r["split"] == "test" for r in rows)  # --split test, the default
    assert f"wrote {len(rows)} images" in text


@pytest.mark.parametrize("split", ["train", "validation", "all"])
def test_samples_of_a_split_and_the_files_of_a_dataset(split, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "samples"
    _ok(["samples", "--out", out, "--per-class", "2", "--split", split], monkeypatch, capsys)
    bench = make_image_benchmark(load_config("demo").data.imagebench)
    with (out / "index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    test = set(np.concatenate([bench.test_seen_loc, bench.test_unseen_loc]).tolist())
    for r in rows:
        index = int(r["path"].rsplit("__", 1)[1].removesuffix(".png"))
        assert r["split"] == ("test" if index in test else "trainval")
    classes = {r["class"] for r in rows}
    if split == "train":  # the trainval images: every seen class's, validation classes included
        assert {r["split"] for r in rows} == {"trainval"} and len(classes) == len(bench.seen_classes)
    elif split == "validation":  # the validation classes' trainval images
        assert {(r["kind"], r["split"]) for r in rows} == {("validation", "trainval")}
        assert len(classes) == len(bench.val_classes)
    else:  # both splits in turn: one trainval and one test image of each seen class
        assert len(rows) == 2 * bench.n_classes
        seen = [r["split"] for r in rows if r["kind"] != "unseen"]
        assert seen.count("trainval") == seen.count("test") == len(bench.seen_classes)
    # The class attributes, class splits and attribute groups of the classes shown, as `dedn extract` reads them.
    with (out / "attributes.csv").open() as fh:
        header, *att = list(csv.reader(fh))
    assert header == ["class", *bench.attribute_names] and [a[0] for a in att] == sorted(classes)
    with (out / "splits.csv").open() as fh:
        splits = {r["class"]: r["split"] for r in csv.DictReader(fh)}
    kinds = {r["class"]: r["kind"] for r in rows}
    assert splits == {c: {"seen": "train", "validation": "val", "unseen": "test"}[kinds[c]] for c in classes}
    with (out / "groups.csv").open() as fh:
        groups = list(csv.DictReader(fh))
    assert [g["attribute"] for g in groups] == bench.attribute_names
    assert {g["group"] for g in groups} == set(bench.clusters)


def test_samples_refuse_an_unknown_split(tmp_path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(["samples", "--out", tmp_path / "x", "--split", "val"], monkeypatch, capsys)
    assert code == 2 and "--split must be one of {train, test, validation, all}, got 'val'" in err


def test_samples_validation_classes_and_an_unknown_class(tmp_path, monkeypatch, capsys) -> None:
    _ok(["samples", "--out", tmp_path / "v", "--per-class", "1", "--classes", "validation"], monkeypatch, capsys)
    bench = make_image_benchmark(load_config("demo").data.imagebench)
    with (tmp_path / "v" / "index.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class"] for r in rows] == [bench.class_names[c] for c in bench.val_classes]
    assert {r["kind"] for r in rows} == {"validation"}
    code, _, err = run_cli(["samples", "--out", tmp_path / "x", "--classes", "Blue_headed_Orange"], monkeypatch, capsys)
    assert code == 2 and "no class of the built-in benchmark" in err
    code, _, err = run_cli(["samples", "--out", tmp_path / "x", "--per-class", "0"], monkeypatch, capsys)
    assert code == 2 and "--per-class" in err


# ---------------------------------------------------------------------------------------------- describe
def test_describe_a_fixed_run(fixed_run, monkeypatch, capsys) -> None:
    classes = json.loads((fixed_run / "classes.json").read_text())
    metrics = json.loads((fixed_run / "metrics.json").read_text())
    desc = json.loads(_ok(["describe", "--run", fixed_run, "--json"], monkeypatch, capsys))
    assert [c["name"] for c in desc["classes"]] == classes["class_names"]
    assert [c["kind"] == "seen" for c in desc["classes"]] == classes["seen_mask"]
    assert desc["attribute_names"] == classes["attribute_names"]
    assert desc["gamma"] == metrics["gamma"] and desc["gamma_source"] == metrics["gamma_source"]
    assert desc["metrics"] == {k: metrics[k] for k in ("T", "U", "S", "H", "AUSUC")}
    assert desc["protocol"] == "fixed" and desc["data_source"] == "synthetic"

    text = _ok(["describe", "--run", fixed_run], monkeypatch, capsys)
    n, n_seen = len(classes["class_names"]), sum(classes["seen_mask"])
    assert f"classes: {n} ({n_seen} seen, {n - n_seen} unseen)" in text
    assert f"gamma = {metrics['gamma']:.4g} ({metrics['gamma_source']})" in text
    assert f"H {metrics['H']:.2f}" in text and "AUSUC" in text
    assert "this gamma is fixed (mode default)" in text and "eval.protocol=validated" in text  # how to get one


def test_classes_template_loads_back(fixed_run, tmp_path, monkeypatch, capsys) -> None:
    path = tmp_path / "new.csv"
    _ok(["describe", "--run", fixed_run, "--new-classes-template", path], monkeypatch, capsys)
    attrs = json.loads((fixed_run / "classes.json").read_text())["attribute_names"]
    with path.open() as fh:
        header = next(csv.reader(fh))
    assert header == ["class", *attrs]
    names, att = load_class_definitions(path, attrs)
    assert names == ["example_new_class"] and att.shape == (1, len(attrs)) and np.isfinite(att).all()
    code, _, err = run_cli(["describe", "--run", fixed_run, "--new-classes-template", tmp_path / "t.txt"],
                           monkeypatch, capsys)
    assert code == 2 and "CSV" in err


def test_describe_a_validated_run(tmp_path, monkeypatch, capsys) -> None:
    run = tmp_path / "val"
    _ok(["train", *TINY, "train.epochs=2", "--run-dir", run], monkeypatch, capsys)
    desc = json.loads(_ok(["describe", "--run", run, "--json"], monkeypatch, capsys))
    assert desc["model_dir"] == str(run / "final") and desc["protocol"] == "validated"
    assert desc["gamma_source"] == "validated"
    code, _, err = run_cli(["describe", "--run", tmp_path], monkeypatch, capsys)
    assert code == 2 and "not a dedn run folder" in err


def test_attribute_groups() -> None:
    names = ["wing_color::blue", "wing_color::red", "size::small", "plain"]
    assert attribute_groups(names) == {"wing_color": names[:2], "size": ["size::small"], "(no group)": ["plain"]}
    bench = make_image_benchmark(ImageBenchConfig(n_classes=12, n_unseen=3, n_val=2, images_per_class=2))
    groups = attribute_groups(bench.attribute_names, bench.config.n_colors)
    assert list(groups) == [g for g, _, _ in bench.groups]
    assert [len(v) for v in groups.values()] == [len(vals) for _, _, vals in bench.groups]


# ---------------------------------------------------------------------------------------------- class names
@pytest.mark.parametrize("cfg", [ImageBenchConfig(), ImageBenchConfig(seed=1), ImageBenchConfig(seed=2, n_classes=60)],
                         ids=["default", "seed1", "seed2-60"])
def test_benchmark_class_names_are_unique_and_deterministic(cfg) -> None:
    names = make_image_benchmark(cfg).class_names
    stems = [n.split(".", 1)[1] for n in names]
    assert len(set(stems)) == len(stems)  # unique even without the NNN. number
    assert [n.split(".", 1)[0] for n in names] == [f"{c + 1:03d}" for c in range(cfg.n_classes)]
    assert make_image_benchmark(cfg).class_names == names


def test_demo_class_names_and_cache_key() -> None:
    bench = make_image_benchmark(load_config("demo").data.imagebench)
    stems = [n.split(".", 1)[1] for n in bench.class_names]
    assert len(set(stems)) == len(stems)
    assert "Blue_headed_Orange_winged_Sand" not in stems or stems.count("Blue_headed_Orange_winged_Sand") == 1
    key = _cache_key(bench, {"backbone": "x"})
    bench.class_names = [f"renamed{i}" for i in range(bench.n_classes)]
    assert _cache_key(bench, {"backbone": "x"}) == key  # names are metadata: the cached features stay valid


# ---------------------------------------------------------------------------------------------- configs and help
def test_load_config_takes_preset_names() -> None:
    assert load_config("cub-gzsl").data.dataset == "CUB"
    assert load_config("demo", ["train.epochs=1"]).data.source == "imagebench"
    with pytest.raises(ConfigError, match="no such config file.*give a YAML file's path or one of: demo, .*cub-gzsl"):
        find_config("no-such-preset")
    with pytest.raises(ConfigError, match="no-such-preset: no such config file"):
        load_config("no-such-preset")


@pytest.mark.parametrize("command", [[], ["predict"], ["bench"], ["extract"], ["store", "import"], ["samples"],
                                     ["describe"], ["store", "info"], ["eval"]])
def test_help_has_no_bool_metavar(command, monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    out = _ok([*command, "--help"], monkeypatch, capsys)
    assert "<bool>" not in out and "Show this message" in out
    if command == ["eval"]:
        assert "auto or a number" in out
    if command == ["bench"]:
        assert "--no-naive" in out


def test_predict_help_documents_the_classes_format(monkeypatch, capsys) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    out = " ".join(_ok(["predict", "--help"], monkeypatch, capsys).split())
    assert "header row" in out and "--new-classes-template" in out


def test_store_info_is_readable_with_json_for_machines(tmp_path, monkeypatch, capsys) -> None:
    from tests.test_store_safety import _import, _write_h5

    h5 = tmp_path / "f.h5"
    _write_h5(h5)
    _import(h5, tmp_path / "s")
    text = _ok(["store", "info", tmp_path / "s"], monkeypatch, capsys)
    assert text.startswith("feature store ") and "header hash: checked" in text and "{" not in text.splitlines()[0]
    info = json.loads(_ok(["store", "info", tmp_path / "s", "--json"], monkeypatch, capsys))
    assert info["complete"] and info["header_hash"] == "checked" and info["source"]["dtype"] == "float32"
