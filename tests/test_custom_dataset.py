"""A dataset of one's own from the CLI: images (class folders or a CSV), a class-by-attribute table and a class
split file, every error named before a backbone is built, then a trained run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dedn.apps.custom_dataset import CustomInputs, read_custom_dataset
from dedn.errors import DataError
from dedn.runfolder import RunFolder
from tests.conftest import run_cli

CLASSES = ["ant", "bee", "cat", "dog", "eel"]
ATTRIBUTES = ["legs", "wings", "fur", "water"]
VALUES = {"ant": [6, 0, 0, 0], "bee": [6, 1, 0, 0], "cat": [4, 0, 1, 0], "dog": [4, 0, 1, 0.2], "eel": [0, 0, 0, 1]}
SPLITS = {"ant": "train", "bee": "train", "cat": "val", "dog": "train", "eel": "test"}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _table(path: Path, values: dict | None = None, attributes: list | None = None) -> Path:
    values, attributes = values or VALUES, attributes or ATTRIBUTES
    return _write(path, "class," + ",".join(attributes) + "\n"
                  + "".join(f"{c}," + ",".join(map(str, v)) + "\n" for c, v in values.items()))


def _splits(path: Path, splits: dict | None = None) -> Path:
    return _write(path, "class,split\n" + "".join(f"{c},{s}\n" for c, s in (splits or SPLITS).items()))


def _folders(root: Path, per_class: int = 5, classes: list | None = None, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for k, c in enumerate(classes or CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size, 3)) + 40 * k  # a class-specific brightness
            Image.fromarray(pixels.astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def _inputs(tmp_path: Path, **changes) -> CustomInputs:
    images = changes.pop("images", None) or _folders(tmp_path / "images")
    return CustomInputs(images, changes.pop("attributes", None) or _table(tmp_path / "att.csv"),
                        changes.pop("splits", None) or _splits(tmp_path / "splits.csv"), **changes)


def _read(inputs: CustomInputs):
    return read_custom_dataset(inputs, num_workers=0, progress=False)


def test_class_folders_give_the_xlsa17_kind_of_split(tmp_path: Path) -> None:
    dataset = _read(_inputs(tmp_path, test_fraction=0.2, seed=3))
    side, labels = dataset.side, dataset.labels
    assert side.class_names == CLASSES and side.attribute_names == ATTRIBUTES
    assert np.allclose(np.linalg.norm(side.att, axis=1), 1.0) and side.original_att[0, 0] == 6
    assert np.array_equal(side.w2v, np.eye(4))  # one-hot semantic vectors without a word-vector file
    tv, ts, tu = side.trainval_loc, side.test_seen_loc, side.test_unseen_loc
    assert np.array_equal(np.sort(np.concatenate([tv, ts, tu])), np.arange(25))  # every image once
    assert set(labels[tu]) == {4} and set(labels[ts]) == set(labels[tv]) == {0, 1, 2, 3}
    assert ts.size == 4 * 1  # 20 % of each seen class's five images
    assert side.val_classes.tolist() == [2] and side.clusters is None
    assert side.image_files == dataset.paths and len(dataset.paths) == 25
    again = read_custom_dataset(_inputs(tmp_path / "again", test_fraction=0.2, seed=3), name="cub", num_workers=0,
                                progress=False).side
    assert np.array_equal(again.test_seen_loc, ts)  # seeded
    assert again.name == "cub (own data)"  # not CUB: its built-in clusters and quirks do not apply


def test_an_image_csv_with_splits_and_a_groups_file(tmp_path: Path) -> None:
    folders = _folders(tmp_path / "img", per_class=2)
    rows = ["path,class,split,note"]
    for c in CLASSES:
        rows += [f"img/{c}/0.png,{c},{'test' if c == 'eel' else 'trainval'},x", f"img/{c}/1.png,{c},test,y"]
    images = _write(tmp_path / "images.csv", "\n".join(rows) + "\n")
    groups = _write(tmp_path / "groups.csv", "attribute,group\nlegs,body\nwings,body\nfur,skin\nwater,habitat\n")
    side = _read(_inputs(tmp_path, images=images, groups=groups)).side
    assert side.image_files[0] == str(folders / "ant" / "0.png")  # relative to the CSV's folder
    assert side.trainval_loc.tolist() == [0, 2, 4, 6] and side.test_seen_loc.tolist() == [1, 3, 5, 7]
    assert side.test_unseen_loc.tolist() == [8, 9]
    assert {k: v.tolist() for k, v in side.clusters.items()} == {"body": [0, 1], "skin": [2], "habitat": [3]}


def _csv_images(tmp_path: Path, rows: list[str]) -> Path:
    _folders(tmp_path / "img", per_class=2)
    return _write(tmp_path / "images.csv", "\n".join(["path,class,split", *rows]) + "\n")


ALL_ROWS = [f"img/{c}/{i}.png,{c},{'test' if c == 'eel' or i else 'trainval'}" for c in CLASSES for i in (0, 1)]


# Every error case of a dataset of one's own, with the message a user reads.
@pytest.mark.parametrize(("case", "match"), [
    ("a class of the table without a split row", r"splits.csv: no row for the classes 'eel' of .*att.csv"),
    ("a split row without a table row", r"splits.csv: classes 'fox' are not in .*att.csv"),
    ("a class folder without a table row", r"classes 'fox' have no row in .*att.csv"),
    ("a class without images", r"no images of the classes 'eel' of .*att.csv"),
    ("a non-numeric column", r"att.csv: attribute columns that are not all numbers: 'wings' \(class 'bee': 'two'\)"),
    ("an infinite value", r"attribute columns that are not all numbers: 'fur' \(class 'cat': 'inf'\)"),
    ("a constant column", r"att.csv: attribute columns with the same value for every class: 'wings'; they tell no"),
    ("a duplicate class", r"att.csv: duplicate class names 'bee'"),
    ("a duplicate attribute", r"att.csv: duplicate attribute names 'legs'"),
    ("a class split twice", r"splits.csv: class 'bee' is listed twice"),
    ("a duplicate image path", r"images.csv: images listed more than once: '.*ant.0.png'"),
    ("no unseen class", r"splits.csv: no unseen class: mark at least one class test"),
    ("no validation class", r"splits.csv: no validation class: mark at least one seen class val"),
    ("an unknown class split", r"splits.csv: row 2 \('ant'\) has split 'seen'; use train, val or test"),
    ("an unknown image split", r"images.csv: row 2 .* has split 'val'; use trainval or test"),
    ("an unseen image in trainval", r"images.csv: row 10 puts an image of an unseen \(test\) class in trainval"),
    ("a seen class without a trainval image", r"the seen classes 'ant' have no trainval image"),
    ("a missing image file", r"images.csv: 1 image files do not exist"),
    ("an unreadable image", r"2 of 25 images cannot be read .*remove them.*\n  .*bee.0.png: .*\n  .*eel.4.png"),
    ("groups naming an unknown attribute", r"groups.csv: cluster 'g' names unknown attributes \['leggs'\]"),
    ("groups leaving an attribute out", r"groups.csv: 1 attributes are in no cluster: 3 \(water\)"),
    ("word vectors of another count", r"wv.npy: 3 word vectors for the 4 attributes of .*att.csv"),
    ("a test fraction of 1", r"--test-fraction must be a finite number in \(0, 1\), got 1.0"),
])
def test_each_error_names_the_file_and_the_problem(tmp_path: Path, case: str, match: str) -> None:
    changes: dict = {}
    table, splits = dict(VALUES), dict(SPLITS)
    if case == "a class of the table without a split row":
        splits.pop("eel")
    elif case == "a split row without a table row":
        splits["fox"] = "test"
    elif case == "a class folder without a table row":
        changes["images"] = _folders(tmp_path / "images", classes=[*CLASSES, "fox"])
    elif case == "a class without images":
        changes["images"] = _folders(tmp_path / "images", classes=CLASSES[:4])
    elif case == "a non-numeric column":
        table["bee"] = [6, "two", 0, 0]
    elif case == "an infinite value":
        table["cat"] = [4, 0, "inf", 0]
    elif case == "a constant column":
        table = {c: [v[0], 0, v[2], v[3]] for c, v in VALUES.items()}
    elif case == "a duplicate class":
        changes["attributes"] = _write(tmp_path / "att.csv", "class,legs\nant,1\nbee,2\nbee,3\n")
    elif case == "a duplicate attribute":
        changes["attributes"] = _table(tmp_path / "att.csv", attributes=["legs", "wings", "legs", "water"])
    elif case == "a class split twice":
        changes["splits"] = _write(tmp_path / "splits.csv", "class,split\nbee,train\nbee,val\n")
    elif case == "no unseen class":
        splits["eel"] = "train"
    elif case == "no validation class":
        splits["cat"] = "train"
    elif case == "an unknown class split":
        splits["ant"] = "seen"
    elif case.startswith(("a duplicate image", "an unknown image", "an unseen image", "a seen class", "a missing")):
        rows = list(ALL_ROWS)
        if case == "a duplicate image path":
            rows.append(rows[0])
        elif case == "an unknown image split":
            rows[0] = "img/ant/0.png,ant,val"
        elif case == "an unseen image in trainval":
            rows[8] = "img/eel/0.png,eel,trainval"
        elif case == "a seen class without a trainval image":
            rows[0] = "img/ant/0.png,ant,test"
        else:
            rows.append("img/ant/9.png,ant,trainval")
        changes["images"] = _csv_images(tmp_path, rows)
    elif case == "an unreadable image":
        root = _folders(tmp_path / "images")
        (root / "bee" / "0.png").write_bytes(b"not a png")
        (root / "eel" / "4.png").write_bytes((root / "eel" / "3.png").read_bytes()[:60])  # truncated
        changes["images"] = root
    elif case.startswith("groups"):
        wrong = "leggs" if "unknown" in case else "legs"
        changes["groups"] = _write(tmp_path / "groups.csv", f"attribute,group\n{wrong},g\nwings,g\nfur,h\n")
    elif case == "word vectors of another count":
        np.save(tmp_path / "wv.npy", np.eye(3))
        changes["word_vectors"] = tmp_path / "wv.npy"
    elif case == "a test fraction of 1":
        changes["test_fraction"] = 1.0
    if "attributes" not in changes:
        changes["attributes"] = _table(tmp_path / "att.csv", table)
    if "splits" not in changes:
        changes["splits"] = _splits(tmp_path / "splits.csv", splits)
    with pytest.raises(DataError, match=match):
        _read(_inputs(tmp_path, **changes))


def test_every_check_runs_before_the_backbone_is_built(tmp_path: Path, monkeypatch, capsys) -> None:
    import dedn.features.backbones as backbones

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone was built before the inputs were checked")

    monkeypatch.setattr(backbones, "get_backbone", no_backbone)
    root = _folders(tmp_path / "images")
    (root / "bee" / "0.png").write_bytes(b"not a png")
    code, _, err = run_cli(["extract", "--images", root, "--attributes", _table(tmp_path / "att.csv"),
                            "--splits", _splits(tmp_path / "splits.csv"), "--out", tmp_path / "store"],
                           monkeypatch, capsys)
    assert code == 2 and "1 of 25 images cannot be read" in err and not (tmp_path / "store").exists()
    code, _, err = run_cli(["extract", "--images", root, "--attributes", tmp_path / "att.csv", "--out",
                            tmp_path / "store"], monkeypatch, capsys)
    assert code == 2 and "needs both --attributes ATT.csv and --splits SPLITS.csv" in err
    code, _, err = run_cli(["extract", "--images", root, "--groups", tmp_path / "g.csv", "--out", tmp_path / "s"],
                           monkeypatch, capsys)
    assert code == 2 and "--groups and --word-vectors describe your own dataset" in err


def test_from_class_folders_to_a_trained_run_with_the_cli(tmp_path: Path, monkeypatch, capsys) -> None:
    root = _folders(tmp_path / "pets", per_class=8, size=64)
    store = tmp_path / "store"
    code, out, err = run_cli(["extract", "--images", root, "--attributes", _table(tmp_path / "att.csv"),
                              "--splits", _splits(tmp_path / "splits.csv"), "--backbone", "efficientnet-lite0",
                              "--image-size", "64", "--workers", "0", "--device", "cpu", "--out", store],
                             monkeypatch, capsys)
    assert code == 0, err
    assert "no attribute groups (--groups): train with model.clusters=kmeans" in out
    code, out, err = run_cli(["train", f"data.path={store}", "model.clusters=kmeans", "model.n_clusters=2",
                              "train.epochs=2", "train.progress=false", "eval.plots=false",
                              "--run-dir", tmp_path / "run"], monkeypatch, capsys)
    assert code == 0, err
    assert "validated protocol" in out and (RunFolder(tmp_path / "run").model_folder().model).is_file()
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["validation_task"]["unseen_classes"] == [2]  # cat, the val class of splits.csv, held out
    code, out, err = run_cli(["predict", "--run", tmp_path / "run", root / "eel" / "0.png", "--top-k", "2",
                              "--json"], monkeypatch, capsys)
    assert code == 0, err
    (prediction,) = json.loads(out)
    assert len(prediction["top"]) == 2
    assert {c["name"] for c in prediction["top"]} <= set(CLASSES)  # the dataset's own classes, by name
