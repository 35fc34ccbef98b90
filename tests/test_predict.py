"""Prediction from a saved run: ranking, probabilities, attribute contributions, classes given at prediction time."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dedn.apps.class_files import load_class_definitions
from dedn.apps.predict import Predictor, format_table, predictions_to_json, true_classes
from dedn.apps.samples import INDEX_COLUMNS
from dedn.config import LossConfig
from dedn.errors import CheckpointError, DataError
from dedn.features import backbones
from dedn.features.backbones import Backbone
from dedn.models.dedn import DEDN, DEDNConfig
from dedn.models.settings import resolve_method
from dedn.training.checkpoint import save_weights
from dedn.training.rundir import write_class_file, write_feature_provenance

C, H, W = 8, 2, 2
ATTRS = ["bill_shape::hooked", "wing_color::blue", "upperparts_color::brown", "breast_pattern::solid",
         "tail_shape::forked", "leg_color::grey"]
CLASSES = ["albatross", "bunting", "cardinal", "dipper", "egret"]
SEEN = [True, True, True, False, False]
# Non-contiguous clusters, so cluster order differs from dataset order and a mapping error would show.
CLUSTERS = [[0, 3], [1, 4, 5], [2]]


class TinyBackbone(Backbone):
    """A deterministic stand-in for ResNet: 32x32 average pooling then a 1x1 conv, stride 32."""

    name = "tiny"
    out_channels = C
    stride = 32
    default_image_size = 64

    def __init__(self, weights=None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        conv = nn.Conv2d(3, C, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(C, 3, 1, 1, generator=gen))
            conv.bias.copy_(torch.rand(C, generator=gen))
        self.body = nn.Sequential(nn.AvgPool2d(32), conv, nn.ReLU())
        self._freeze()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


def class_att() -> np.ndarray:
    """The (K, D) class attributes (dataset order) the test model is built with."""
    return np.random.default_rng(0).random((len(CLASSES), len(ATTRS)))


def make_model(mode: str = "paper", **kw) -> DEDN:
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    config = DEDNConfig(n_attributes=len(ATTRS), semantic_dim=4, n_channels=C, n_regions=H * W,
                        clusters=tuple(CLUSTERS), l_e=0.6, method=resolve_method(mode, None, LossConfig()), **kw)
    model = DEDN.from_config(config, rng.normal(size=(len(ATTRS), 4)), class_att(), np.array(SEEN))
    with torch.no_grad():  # move W2 / W4 off zero so the attention is not uniform
        for p in model.parameters():
            p.add_(0.7 * torch.randn_like(p))
    return model


def make_run(tmp_path: Path, mode: str = "paper", features_json: bool = True, **kw) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    model = make_model(mode, **kw)
    save_weights(model, run / "model.safetensors", record_hash=True)
    write_class_file(run, {"class_names": CLASSES, "attribute_names": ATTRS, "class_att": class_att(),
                           "seen_mask": SEEN})
    if features_json:
        write_feature_provenance(run, {"backbone": "tiny", "image_size": 64, "weights": "none (random init)"})
    return run


def feats(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, C, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def run(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def test_ranking_probabilities_and_names(run: Path) -> None:
    pred = Predictor.from_run(run)
    assert pred.class_names == CLASSES and pred.attribute_names == ATTRS
    assert pred.kinds == ["seen", "seen", "seen", "unseen", "unseen"]
    out = pred.predict_features(feats(), top_k=3)
    assert len(out) == 3 and out[0].source == "features[0]"
    for p in out:
        scores = [c.score for c in p.top]
        assert len(p.top) == 3 and scores == sorted(scores, reverse=True)
        probs = [c.probability for c in p.top]
        assert all(0 < q <= 1 for q in probs) and sum(probs) <= 1 + 1e-9
        assert probs == sorted(probs, reverse=True)
        assert {c.kind for c in p.top} <= {"seen", "unseen"}
    full = pred.predict_features(feats(), top_k=99)  # clipped to K; probabilities then sum to 1
    assert all(len(p.top) == len(CLASSES) for p in full)
    assert all(abs(sum(c.probability for c in p.top) - 1) < 1e-9 for p in full)
    # the ranking is the model's own: argmax of its combined scores
    model_out = pred.model(feats())
    assert [p.top[0].index for p in full] == model_out.combined().argmax(1).tolist()


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_contributions_add_up_to_score_without_bias(tmp_path: Path, mode: str) -> None:
    pred = Predictor.from_run(make_run(tmp_path, mode))
    x = feats(4)
    l_e = 0.3
    out = pred.predict_features(x, top_k=len(CLASSES), l_e=l_e, n_attributes=len(ATTRS))
    with torch.no_grad():
        model_out = pred.model(x)
    bias = pred.model.calibration_bias().numpy()
    if mode == "reference":
        assert np.abs(bias).max() > 0  # the test must see the margin being left out
    combined = model_out.combined(l_e).double().numpy()
    for b, p in enumerate(out):
        k = p.top[0].index
        assert p.l_e == l_e
        assert sum(a.contribution for a in p.attributes) == pytest.approx(combined[b, k] - bias[k], abs=1e-5)
        contribs = [a.contribution for a in p.attributes]
        assert contribs == sorted(contribs, reverse=True)
        assert {a.name for a in p.attributes} == set(ATTRS)
        for a in p.attributes:
            assert a.contribution == pytest.approx(a.predicted * a.class_value)
            assert ATTRS[a.index] == a.name


def test_attribute_scores_are_in_dataset_order(run: Path) -> None:
    pred = Predictor.from_run(run)
    x = feats(2)
    res = pred.attribute_scores(x, l_e=0.25)
    with torch.no_grad():
        out = pred.model(x)
    order = pred.model.attribute_order.tolist()
    for pos, d in enumerate(order):  # cluster position pos holds dataset attribute d
        assert res["cexp"][:, d] == pytest.approx(out.cexp.o[:, pos].double().numpy())
        assert res["fexp"][:, d] == pytest.approx(out.fexp.o[:, pos].double().numpy())
    assert res["mixed"] == pytest.approx(0.25 * res["cexp"] + 0.75 * res["fexp"])
    att = class_att()
    assert pred.normalized_class_att() == pytest.approx(att / np.linalg.norm(att, axis=1, keepdims=True), abs=1e-6)


def test_calibration_moves_predictions_to_unseen(run: Path) -> None:
    pred = Predictor.from_run(run)
    out = pred.predict_features(feats(5), top_k=1, gamma=1e6)
    assert all(p.top[0].kind == "unseen" and p.gamma == 1e6 for p in out)
    out = pred.predict_features(feats(5), top_k=1, gamma=-1e6)
    assert all(p.top[0].kind == "seen" for p in out)


def _matching_vector(pred: Predictor, x: torch.Tensor) -> np.ndarray:
    """An attribute vector parallel to the predicted attributes: its class score is the maximum possible."""
    return pred.attribute_scores(x)["mixed"][0]


@pytest.mark.parametrize("fmt", ["csv", "json-dict", "json-list"])
def test_classes_given_at_prediction_time(run: Path, tmp_path: Path, fmt: str) -> None:
    pred = Predictor.from_run(run)
    x = feats(1, seed=7)
    target = _matching_vector(pred, x)
    other = np.random.default_rng(3).random(len(ATTRS))
    rows = {"zebra finch": target, "yellow warbler": other}
    if fmt == "csv":
        cols = [4, 0, 5, 2, 1, 3]  # columns in another order than the model's: matched by name
        path = tmp_path / "classes.csv"
        lines = ["class," + ",".join(ATTRS[j] for j in cols)]
        lines += [name + "," + ",".join(repr(float(v[j])) for j in cols) for name, v in rows.items()]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "json-dict":
        path = tmp_path / "classes.json"
        path.write_text(json.dumps({n: {ATTRS[j]: float(v[j]) for j in range(len(ATTRS))} for n, v in rows.items()}))
    else:
        path = tmp_path / "classes.json"
        path.write_text(json.dumps({n: v.tolist() for n, v in rows.items()}))
    names, att = load_class_definitions(path, ATTRS)
    assert names == ["zebra finch", "yellow warbler"]
    assert att == pytest.approx(np.stack([target, other]).astype(np.float32))

    both = pred.with_classes(names, att, include_trained=True)
    assert both.class_names == CLASSES + names and both.kinds[-2:] == ["new", "new"]
    top = both.predict_features(x, top_k=3)[0].top[0]
    assert (top.name, top.kind) == ("zebra finch", "new")
    only = pred.with_classes(names, att, include_trained=False)
    p = only.predict_features(x, top_k=5)[0]
    assert [c.name for c in p.top] == ["zebra finch", "yellow warbler"]
    assert sum(c.probability for c in p.top) == pytest.approx(1.0)
    # the original predictor (and its model) still has the trained classes only
    assert pred.model.class_att.shape[0] == len(CLASSES)
    assert pred.predict_features(x, top_k=5)[0].top[0].name in CLASSES


def test_new_classes_get_no_calibration_penalty(run: Path) -> None:
    pred = Predictor.from_run(run)
    x = feats(1, seed=7)
    both = pred.with_classes(["copy of albatross"], pred.class_att[:1])
    p = both.predict_features(x, top_k=len(both.class_names), gamma=0.5)[0]
    score = {c.name: c.score for c in p.top}
    assert score["copy of albatross"] - score["albatross"] == pytest.approx(0.5, abs=1e-5)


def test_class_definition_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("class,bill_shape::hookd,wing_color::blue\nx,1,0\n")
    with pytest.raises(DataError, match=r"bad\.csv.*'bill_shape::hookd'.*did you mean 'bill_shape::hooked'"):
        load_class_definitions(bad, ATTRS)
    partial = tmp_path / "partial.csv"
    partial.write_text("class,wing_color::blue,leg_color::grey\nx,1,0.5\n")
    with pytest.raises(DataError, match=r"partial\.csv.*4 attributes have no value.*--fill 0"):
        load_class_definitions(partial, ATTRS)
    names, att = load_class_definitions(partial, ATTRS, fill=0.0)
    assert names == ["x"] and att.tolist() == [[0, 1, 0, 0, 0, 0.5]]
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"x": [1, 2, 3]}))
    with pytest.raises(DataError, match=r"short\.json.*3 values, expected 6"):
        load_class_definitions(short, ATTRS)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"x": {"leg_colour::grey": 1}}))
    with pytest.raises(DataError, match=r"unknown\.json.*'leg_colour::grey'.*did you mean 'leg_color::grey'"):
        load_class_definitions(unknown, ATTRS, fill=0)
    nan = tmp_path / "nan.csv"
    nan.write_text("class," + ",".join(ATTRS) + "\nx,1,2,3,abc,5,6\n")
    with pytest.raises(DataError, match=r"nan\.csv.*'x'.*'breast_pattern::solid'.*not a number"):
        load_class_definitions(nan, ATTRS)
    with pytest.raises(DataError, match=r"classes\.txt.*use \.csv or \.json"):
        (tmp_path / "classes.txt").write_text("x")
        load_class_definitions(tmp_path / "classes.txt", ATTRS)
    with pytest.raises(DataError, match="missing.json.*not found"):
        load_class_definitions(tmp_path / "missing.json", ATTRS)


def test_with_classes_errors(run: Path) -> None:
    pred = Predictor.from_run(run)
    with pytest.raises(DataError, match=r"shape \(1, 6\)"):
        pred.with_classes(["x"], np.ones((1, 5)))
    with pytest.raises(DataError, match="'albatross'.*include_trained=False"):
        pred.with_classes(["albatross"], np.ones((1, 6)))
    assert pred.with_classes(["albatross"], np.ones((1, 6)), include_trained=False).class_names == ["albatross"]


def test_run_directory_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty-run.*model.safetensors"):
        Predictor.from_run(empty)
    with pytest.raises(CheckpointError, match="nowhere"):
        Predictor.from_run(tmp_path / "nowhere")


def _write_images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (80, 70, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_predict_images_through_recorded_backbone(run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(backbones.BACKBONES, "tiny", TinyBackbone)  # what features.json names
    paths = _write_images(tmp_path / "imgs")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")  # ignored: not an image extension
    pred = Predictor.from_run(run)
    out = pred.predict_images(tmp_path / "imgs", top_k=2)
    assert [p.source for p in out] == [str(p) for p in paths]
    assert pred.backbone.name == "tiny" and pred.image_size == 64
    # the same as predicting the backbone's features directly
    bb = TinyBackbone()
    x = torch.stack([bb.transform(64)(Image.open(p).convert("RGB")) for p in paths])
    direct = pred.predict_features(bb(x), top_k=2)
    assert [[c.name for c in p.top] for p in out] == [[c.name for c in p.top] for p in direct]
    assert [p.top[0].score for p in out] == pytest.approx([p.top[0].score for p in direct], abs=1e-5)
    # single file, and a list mixing files and folders
    assert len(pred.predict_images([paths[0], tmp_path / "imgs"])) == 4

    text = predictions_to_json(out)
    back = json.loads(text)
    assert back[0]["source"] == str(paths[0]) and len(back[0]["top"]) == 2
    assert set(back[0]["top"][0]) == {"name", "index", "score", "probability", "kind"}
    table = format_table(out)
    assert str(paths[0]) in table and out[0].top[0].name in table and "because:" in table
    assert all(p.true_class is None for p in out) and "true class" not in table  # img0.png says no class


def test_true_class_from_index_file_name_or_class_folder(tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "index.csv").write_text(",".join(INDEX_COLUMNS) + "\nx1.png,cardinal,seen,test\n")  # as `dedn samples`
    folder = tmp_path / "egret"
    folder.mkdir()
    paths = [samples / "x1.png", samples / "dipper__00012.png", samples / "heron__00003.png", folder / "a.png",
             tmp_path / "other" / "b.png"]
    # the index first (as given); then a sample's file name or the folder, only where it names a class of the run
    assert true_classes(paths, CLASSES) == ["cardinal", "dipper", None, "egret", None]
    (samples / "index.csv").write_text("path;label\nx1.png;cardinal\n")  # some other tool's index: no hint
    assert true_classes(paths[:1], CLASSES) == [None]


def test_predicted_images_carry_their_true_class(run: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(backbones.BACKBONES, "tiny", TinyBackbone)
    folder = tmp_path / "bunting"
    paths = _write_images(folder, n=2)
    pred = Predictor.from_run(run)
    out = pred.predict_images(folder, top_k=len(CLASSES))
    assert [p.true_class for p in out] == ["bunting", "bunting"]
    assert json.loads(predictions_to_json(out))[0]["true_class"] == "bunting"
    table = format_table(out).splitlines()
    rank = [c.name for c in out[0].top].index("bunting") + 1
    assert table[0] == str(paths[0]) and table[1] == f"  true class: bunting (rank {rank}, marked *)"
    marked = [line for line in table[: 3 + len(CLASSES)] if line.startswith("  *")]
    assert len(marked) == 1 and f"*{rank:>2}  bunting " in marked[0]


def test_image_errors(run: Path, tmp_path: Path) -> None:
    pred = Predictor.from_run(run, backbone=TinyBackbone())
    note = tmp_path / "notes.txt"
    note.write_text("not an image")
    with pytest.raises(DataError, match=r"notes\.txt: cannot read the image"):
        pred.predict_images(note)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = _write_images(tmp_path / "ok", 1)
    with pytest.raises(DataError, match=r"(?s)1 of 2 images.*broken\.png"):
        pred.predict_images([good[0], broken])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no image files"):
        pred.predict_images(tmp_path / "empty")
    with pytest.raises(DataError, match=r"missing\.jpg: no such file"):
        pred.predict_images(tmp_path / "missing.jpg")
    wrong_size = Predictor.from_run(run, backbone=TinyBackbone(), image_size=96)  # 3 x 3 regions, model has 2 x 2
    with pytest.raises(DataError, match=r"image size 96.*\(8, 3, 3\).*4 regions"):
        wrong_size.predict_images(good)
    with pytest.raises(DataError, match=r"features must be \(B, 8, h, w\)"):
        pred.predict_features(torch.rand(1, 5, 2, 2))


def test_run_without_feature_provenance(tmp_path: Path) -> None:
    run = make_run(tmp_path, features_json=False)
    pred = Predictor.from_run(run)
    assert len(pred.predict_features(feats(1))) == 1  # features still work
    imgs = _write_images(tmp_path / "imgs", 1)
    with pytest.raises(DataError, match="trained on precomputed features; pass features directly or give --backbone"):
        pred.predict_images(imgs)
    assert len(Predictor.from_run(run, backbone=TinyBackbone()).predict_images(imgs)) == 1


def test_write_class_file_from_dataset(tmp_path: Path) -> None:
    data = SimpleNamespace(class_names=CLASSES, attribute_names=ATTRS, att=np.ones((5, 6)), n_classes=5,
                           labels=np.array([0, 1, 2, 3, 4, 1]), trainval_loc=np.array([0, 1, 5]))
    rec = json.loads(write_class_file(tmp_path, data, calibration=0.25).read_text())
    assert rec["seen_mask"] == [True, True, False, False, False]
    assert rec["calibration"] == 0.25 and rec["class_names"] == CLASSES and len(rec["class_att"]) == 5
    with pytest.raises(DataError, match="do not match"):
        write_class_file(tmp_path, {"class_names": CLASSES, "attribute_names": ATTRS, "class_att": np.ones((4, 6)),
                                    "seen_mask": SEEN})


def test_recorded_calibration_is_the_default(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    write_class_file(run, {"class_names": CLASSES, "attribute_names": ATTRS, "class_att": class_att(),
                           "seen_mask": SEEN},
                     calibration=1e6)
    pred = Predictor.from_run(run)
    assert pred.calibration == 1e6
    assert all(p.top[0].kind == "unseen" for p in pred.predict_features(feats(4)))
