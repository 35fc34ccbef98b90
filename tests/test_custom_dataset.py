"""A dataset of one's own from the CLI: class folders and a class-by-attribute table to a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dedn.apps.custom_dataset import CustomSplit, custom_semantic_side
from dedn.errors import DataError
from dedn.runfolder import RunFolder
from tests.conftest import run_cli

CLASSES = ["ant", "bee", "cat", "dog", "eel"]
ATTRIBUTES = ["legs", "wings", "fur", "water"]
VALUES = {"ant": [6, 0, 0, 0], "bee": [6, 1, 0, 0], "cat": [4, 0, 1, 0], "dog": [4, 0, 1, 0.2], "eel": [0, 0, 0, 1]}


def _table(path: Path) -> Path:
    path.write_text("class," + ",".join(ATTRIBUTES) + "\n"
                    + "".join(f"{c}," + ",".join(map(str, v)) + "\n" for c, v in VALUES.items()))
    return path


def test_the_semantic_side_holds_the_xlsa17_kind_of_split(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(5), 10)
    side = custom_semantic_side(CLASSES, labels, _table(tmp_path / "t.csv"), CustomSplit(["eel"], 0.2, 0.25))
    assert side.class_names == CLASSES and side.attribute_names == ATTRIBUTES
    assert np.allclose(np.linalg.norm(side.att, axis=1), 1.0) and side.original_att[0, 0] == 6
    assert np.array_equal(side.w2v, np.eye(4))  # one-hot semantic vectors without a word-vector file
    tv, ts, tu = side.trainval_loc, side.test_seen_loc, side.test_unseen_loc
    assert np.array_equal(np.sort(np.concatenate([tv, ts, tu])), np.arange(50))  # every image once
    assert set(labels[tu]) == {4} and set(labels[ts]) == set(labels[tv]) == {0, 1, 2, 3}
    assert ts.size == 4 * 2  # 20 % of each seen class
    assert side.val_classes.size == 1 and side.val_classes[0] in (0, 1, 2, 3)


@pytest.mark.parametrize(("table_rows", "unseen", "match"), [
    ({c: v for c, v in VALUES.items() if c != "dog"}, ["eel"], r"no row for the image folder\(s\) \['dog'\]"),
    ({**VALUES, "fox": [4, 0, 1, 0]}, ["eel"], r"rows for \['fox'\] without images"),
    (VALUES, ["emu"], r"--unseen: \['emu'\] are no class folders"),
    (VALUES, [], "needs at least one unseen and two seen classes"),
])
def test_bad_tables_and_classes_are_named(tmp_path: Path, table_rows, unseen, match) -> None:
    table = tmp_path / "t.json"
    table.write_text(json.dumps({c: dict(zip(ATTRIBUTES, v, strict=True)) for c, v in table_rows.items()}))
    with pytest.raises(DataError, match=match):
        custom_semantic_side(CLASSES, np.repeat(np.arange(5), 4), table, CustomSplit(unseen))


def test_from_class_folders_to_a_trained_run_with_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "pets"
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 60, (64, 64, 3)) + 40 * k  # a class-specific brightness
            Image.fromarray(pixels.astype(np.uint8)).save(root / c / f"{i}.png")
    store = tmp_path / "store"
    code, out, err = run_cli(["extract", "--images", root, "--classes", _table(tmp_path / "table.csv"),
                              "--unseen", "eel", "--backbone", "efficientnet-lite0", "--image-size", "64",
                              "--workers", "0", "--device", "cpu", "--out", store], monkeypatch, capsys)
    assert code == 0, err
    code, out, err = run_cli(["train", "data.source=store", f"data.path={store}", "model.clusters=kmeans",
                              "model.n_clusters=2", "train.epochs=2", "train.progress=false", "eval.plots=false",
                              "--run-dir", tmp_path / "run"], monkeypatch, capsys)
    assert code == 0, err
    assert "validated protocol" in out and (RunFolder(tmp_path / "run").model_folder().model).is_file()
    code, out, err = run_cli(["predict", "--run", tmp_path / "run", root / "eel" / "0.png", "--top-k", "2",
                              "--json"], monkeypatch, capsys)
    assert code == 0, err
    (prediction,) = json.loads(out)
    assert len(prediction["top"]) == 2
    assert {c["name"] for c in prediction["top"]} <= set(CLASSES)  # the dataset's own classes, by name
