"""Attention explanations: region / channel maps in dataset order, the Figure-4 grid, the JSON numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dedn.apps.explain import (
    ExplainOptions,
    channel_attention,
    channel_summary,
    explain_image,
    region_attention,
)
from dedn.apps.predict import Predictor
from dedn.errors import CheckpointError, DataError
from dedn.eval.localisation import attention_in_mask_share
from dedn.features.backbones import Backbone
from dedn.models.dedn import DEDN, DEDNConfig
from dedn.training.checkpoint import save_weights
from dedn.training.rundir import write_class_file

C, H, W = 8, 2, 2
ATTRS = ["bill_shape::hooked", "wing_color::blue", "upperparts_color::brown", "breast_pattern::solid",
         "tail_shape::forked", "leg_color::grey"]
CLASSES = ["albatross", "bunting", "cardinal", "dipper", "egret"]
SEEN = [True, True, True, False, False]
CLUSTERS = [[0, 3], [1, 4, 5], [2]]  # cluster order differs from dataset order


class TinyBackbone(Backbone):
    """32x32 average pooling then a 1x1 conv: a deterministic stride-32 stand-in for ResNet."""

    name = "tiny"
    out_channels = C
    default_image_size = 64

    def __init__(self) -> None:
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


def make_model(**kw) -> DEDN:
    rng = np.random.default_rng(1)
    torch.manual_seed(0)
    att = np.random.default_rng(0).random((len(CLASSES), len(ATTRS)))
    config = DEDNConfig(n_attributes=len(ATTRS), semantic_dim=4, n_channels=C, n_regions=H * W,
                        clusters=tuple(CLUSTERS), **kw)
    model = DEDN.from_config(config, rng.normal(size=(len(ATTRS), 4)), att, np.array(SEEN))
    with torch.no_grad():  # move W2 / W4 off zero so the attention is not uniform
        for p in model.parameters():
            p.add_(0.7 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    model = make_model()
    save_weights(model, run / "model.safetensors", record_hash=True)
    att = np.random.default_rng(0).random((len(CLASSES), len(ATTRS)))
    write_class_file(run, {"class_names": CLASSES, "attribute_names": ATTRS, "class_att": att, "seen_mask": SEEN})
    return run


def feats(n: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, C, H, W, generator=torch.Generator().manual_seed(seed))


def test_region_and_channel_attention_in_dataset_order() -> None:
    model = make_model()
    x = feats(3)
    regions = region_attention(model, x)
    channels = channel_attention(model, x)
    maps = model.attention_maps(x)
    assert set(regions) == set(channels) == {"cexp", "fexp"}
    for e in ("cexp", "fexp"):
        assert regions[e].shape == (3, len(ATTRS), H, W) and channels[e].shape == (3, len(ATTRS), C)
        assert regions[e].sum(axis=(2, 3)) == pytest.approx(np.ones((3, len(ATTRS))), abs=1e-5)
        for pos, d in enumerate(model.attribute_order.tolist()):
            assert regions[e][:, d].reshape(3, -1) == pytest.approx(maps[f"{e}_region"][:, pos].double().numpy())
            assert channels[e][:, d] == pytest.approx(maps[f"{e}_channel"][:, pos].double().numpy())
    # (B, C, R) with square R gives the same maps
    flat = region_attention(model, x.flatten(2))
    assert flat["fexp"] == pytest.approx(regions["fexp"])
    # the maps feed the localisation measurement directly
    masks = np.zeros((3, 2, 64, 64), dtype=bool)
    masks[:, 0, :32, :32] = True
    masks[:, 1, 32:, :] = True
    parts = np.array([0, 1, -1, 0, 1, -1])
    share = attention_in_mask_share(regions["cexp"], masks, parts)
    expected = regions["cexp"][:, 0, 0, 0].mean()  # part 0 covers exactly the top-left region
    assert share["per_attribute"][0] == pytest.approx(expected, abs=1e-6)


def test_channel_summary() -> None:
    uniform = channel_summary(np.full(16, 1 / 16), top=3)
    assert uniform["effective_channels"] == pytest.approx(16) and uniform["entropy"] == pytest.approx(np.log(16))
    one = channel_summary(np.eye(16)[5], top=2)
    assert one["effective_channels"] == pytest.approx(1) and one["top_channels"][0] == [5, 1.0]


def _check_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_explain_features_default_attributes(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "explain"
    x = feats(1, seed=3)
    paths = explain_image(run, x, out_dir=out, options=ExplainOptions(top=3))
    assert [p.name for p in paths] == ["features-regions.png", "features-channels.png", "features-explain.json"]
    width, height = _check_png(paths[0])
    assert width > height  # three columns, two rows
    _check_png(paths[1])
    report = json.loads(paths[2].read_text())
    assert report["panels"]["regions"] == {"rows": 2, "cols": 3, "count": 6}
    assert report["panels"]["channels"] == {"rows": 2, "cols": 3, "count": 6}
    assert report["experts"] == ["cexp", "fexp"] and report["feature_shape"] == [C, H, W]

    pred = Predictor.from_run(run)
    p = pred.predict_features(x, n_attributes=3)[0]
    assert report["explained_class"]["name"] == p.top[0].name == report["predicted"][0]["name"]
    # the default attributes are the top contributions to the predicted class, in that order
    assert [a["name"] for a in report["attributes"]] == [a.name for a in p.attributes]
    assert [a["contribution"] for a in report["attributes"]] == pytest.approx([a.contribution for a in p.attributes])
    regions = region_attention(pred.model, x)
    scores = pred.attribute_scores(x)
    for a in report["attributes"]:
        assert ATTRS[a["index"]] == a["name"]
        for e in ("cexp", "fexp"):
            info = a["experts"][e]
            assert np.array(info["region_attention"]) == pytest.approx(regions[e][0, a["index"]])
            assert info["score"] == pytest.approx(scores[e][0, a["index"]])
            ch = info["channel_attention"]
            assert len(ch["top_channels"]) == C and 1 <= ch["effective_channels"] <= C
    # one colour scale for every panel: the largest attention / uniform ratio shown
    assert report["region_scale"]["max"] == pytest.approx(
        max(a["experts"][e]["peak_vs_uniform"] for a in report["attributes"] for e in ("cexp", "fexp")))
    # each expert's channel entropy against the uniform ln C; this model's attention is not near uniform
    spread = report["channel_attention"]
    assert spread["chart"] == "drawn" and report["files"]["channels"] == "features-channels.png"
    for e in ("cexp", "fexp"):
        mean = np.mean([a["experts"][e]["channel_attention"]["entropy"] for a in report["attributes"]])
        assert spread[e]["mean_entropy"] == pytest.approx(mean) and spread[e]["ln_C"] == pytest.approx(np.log(C))
        assert spread[e]["entropy_over_ln_C"] == pytest.approx(mean / np.log(C))
        assert spread[e]["near_uniform"] is (spread[e]["entropy_over_ln_C"] > 0.98)


def test_explain_image_named_attributes(run: Path, tmp_path: Path) -> None:
    img = tmp_path / "bird.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 255, (90, 70, 3), dtype=np.uint8)).save(img)
    pred = Predictor.from_run(run, backbone=TinyBackbone())
    chosen = ["leg_color::grey", "bill_shape::hooked"]
    paths = explain_image(pred, img, out_dir=tmp_path / "out", options=ExplainOptions(
        attributes=chosen, class_name="egret", n_channels=4, true_class="bunting"))
    assert [p.name for p in paths] == ["bird-regions.png", "bird-channels.png", "bird-explain.json"]
    for p in paths[:2]:
        _check_png(p)
    report = json.loads(paths[2].read_text())
    assert [a["name"] for a in report["attributes"]] == chosen
    assert [a["index"] for a in report["attributes"]] == [5, 0]
    assert report["explained_class"]["name"] == "egret" and report["image_size"] == 64
    assert report["true_class"]["name"] == "bunting" and report["panels"]["input_panel"]
    class_att = pred.normalized_class_att()
    assert [a["true_class_value"] for a in report["attributes"]] == pytest.approx([class_att[1][5], class_att[1][0]])
    assert [a["class_value"] for a in report["attributes"]] == pytest.approx([class_att[4][5], class_att[4][0]])
    assert report["panels"]["regions"]["count"] == 4
    assert all(len(a["experts"]["fexp"]["channel_attention"]["top_channels"]) == 4 for a in report["attributes"])


def test_explain_finds_the_true_class_of_an_image_when_not_given(run: Path, tmp_path: Path) -> None:
    img = tmp_path / "cardinal__00007.png"  # a sample's file name: <class>__<n>.png
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(img)
    pred = Predictor.from_run(run, backbone=TinyBackbone())
    paths = explain_image(pred, img, out_dir=tmp_path / "out", options=ExplainOptions(top=2))
    assert json.loads(paths[-1].read_text())["true_class"]["name"] == "cardinal"
    given = explain_image(pred, img, out_dir=tmp_path / "given", options=ExplainOptions(top=2, true_class="dipper"))
    assert json.loads(given[-1].read_text())["true_class"]["name"] == "dipper"  # what the user says wins


def test_explain_bare_model_single_expert_without_channels(tmp_path: Path) -> None:
    model = make_model(experts="fexp", channel_attention=False)
    bg = np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    paths = explain_image(model, feats(1)[0], out_dir=tmp_path,
                          options=ExplainOptions(top=2, background=bg, stem="single"), attribute_names=ATTRS)
    assert [p.name for p in paths] == ["single-regions.png", "single-explain.json"]
    _check_png(paths[0])
    report = json.loads(paths[1].read_text())
    assert report["experts"] == ["fexp"] and report["panels"]["channels"] is None
    assert report["panels"]["regions"] == {"rows": 1, "cols": 2, "count": 2}
    assert report["attributes"][0]["experts"]["fexp"]["channel_attention"] is None
    assert report["explained_class"]["name"] == "class_" + str(report["explained_class"]["index"])


def test_near_uniform_channel_attention_is_stated_not_drawn(tmp_path: Path) -> None:
    config = DEDNConfig(n_attributes=len(ATTRS), semantic_dim=4, n_channels=C, n_regions=H * W,
                        clusters=tuple(CLUSTERS))
    rng = np.random.default_rng(1)
    model = DEDN.from_config(config, rng.normal(size=(len(ATTRS), 4)), rng.random((len(CLASSES), len(ATTRS))),
                             np.array(SEEN)).eval()  # as initialised: every attention uniform
    x = feats(1)
    assert all(np.allclose(v, 1 / C) for v in channel_attention(model, x).values())
    paths = explain_image(model, x, out_dir=tmp_path, options=ExplainOptions(top=2), attribute_names=ATTRS)
    assert [p.name for p in paths] == ["features-regions.png", "features-explain.json"]  # no misleading bars
    report = json.loads(paths[1].read_text())
    spread = report["channel_attention"]
    assert spread["chart"].startswith("not drawn") and report["files"]["channels"] is None
    assert report["panels"]["channels"] is None
    for e in ("cexp", "fexp"):
        assert spread[e]["near_uniform"] and spread[e]["entropy_over_ln_C"] == pytest.approx(1.0)


def test_explain_errors(run: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'wing_colour::blue'.*did you mean 'wing_color::blue'"):
        explain_image(run, feats(1), out_dir=tmp_path, options=ExplainOptions(attributes=["wing_colour::blue"]))
    with pytest.raises(DataError, match="unknown class 'egrett'.*'egret'"):
        explain_image(run, feats(1), out_dir=tmp_path, options=ExplainOptions(class_name="egrett"))
    with pytest.raises(DataError, match="one feature map at a time"):
        explain_image(run, feats(2), out_dir=tmp_path)
    no_ckpt = tmp_path / "unfinished"
    no_ckpt.mkdir()
    with pytest.raises(CheckpointError, match="unfinished"):
        explain_image(no_ckpt, feats(1), out_dir=tmp_path)
    img = tmp_path / "bird.png"
    Image.new("RGB", (64, 64)).save(img)
    with pytest.raises(DataError, match="precomputed features"):  # the run has no features.json
        explain_image(run, img, out_dir=tmp_path)
    with pytest.raises(DataError, match=r"(?s)missing\.png: cannot read the image"):
        explain_image(Predictor.from_run(run, backbone=TinyBackbone()), tmp_path / "missing.png", out_dir=tmp_path)


def test_heatmap_text_is_at_least_9_pt(run: Path, tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    figures: list = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: figures.append(self))
    img = tmp_path / "bird.png"
    Image.fromarray(np.random.default_rng(6).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(img)
    explain_image(Predictor.from_run(run, backbone=TinyBackbone()), img, out_dir=tmp_path / "out",
                  options=ExplainOptions(top=2, true_class="bunting"))
    assert len(figures) == 2  # region maps and channel weights
    for fig in figures:
        fig.draw_without_rendering()
        texts = [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]
        assert texts and min(t.get_fontsize() for t in texts) >= 9, [
            (t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 9]
