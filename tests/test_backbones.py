"""Frozen backbones: shapes, the pretrained EfficientNet-Lite0 weights, transforms, offline errors."""

from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dedn.errors import DataError
from dedn.features.backbones import (
    EfficientNetLite0Backbone,
    ResNet101Backbone,
    TimmBackbone,
    _load_state_dict_file,
    efficientnet_lite0_weights_path,
    get_backbone,
    map_efficientnet_lite0_state,
)

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine, OpenMP threads spinning on each other make
    ResNet-101 forward passes ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0Backbone:
    return EfficientNetLite0Backbone()


@pytest.fixture(scope="module")
def lite0_classifier() -> torch.nn.Module:
    """The whole timm EfficientNet-Lite0 with its ImageNet classifier, from the shipped weights file."""
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = _load_state_dict_file(efficientnet_lite0_weights_path(), "EfficientNet-Lite0")
    net.load_state_dict(map_efficientnet_lite0_state(state, net.state_dict()))
    return net


def _smooth_image(size: int = 120) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def test_lite0_pretrained_forward(lite0):
    x = lite0.transform(64)(_smooth_image()).unsqueeze(0)
    assert x.shape == (1, 3, 64, 64)
    out = lite0(torch.cat([x, x.flip(-1)]))
    assert out.shape == (2, 1280, 2, 2)
    assert torch.isfinite(out).all() and not out.requires_grad
    assert (out >= 0).all() and (out <= 6).all()  # ReLU6 head
    assert lite0.stride == 32 and lite0.out_channels == 1280


def test_lite0_weights_are_the_real_pretrained_ones(lite0, lite0_classifier):
    # The shipped file is the one the package names (its name carries the hash prefix).
    assert efficientnet_lite0_weights_path().name == "efficientnet-lite0-57934424.pth"
    assert lite0.weights_sha256 == LITE0_SHA256
    prov = lite0.provenance()
    assert prov["weights_sha256"] == LITE0_SHA256 and prov["image_size"] == 224
    # Trained BatchNorm statistics: far from the untrained value 1, and the stem's running variance
    # matches the variance of its output on [-1, 1] inputs (the normalisation we use).
    running_var = lite0.net.bn1.running_var
    assert not torch.allclose(running_var, torch.ones_like(running_var))
    x = lite0.transform(64)(_smooth_image()).unsqueeze(0)
    ratio = (lite0.net.conv_stem(x).var(dim=(0, 2, 3)) / running_var).median()
    assert 0.2 < float(ratio) < 5.0
    # ImageNet logits on an image are far from uniform (a random head would be near 1/1000 everywhere).
    with torch.no_grad():
        assert lite0_classifier(x).softmax(-1).max() > 20 / 1000


def test_lite0_recognises_a_natural_image(lite0, lite0_classifier):
    cbook = pytest.importorskip("matplotlib.cbook")
    try:
        image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except (OSError, ValueError):
        pytest.skip("matplotlib sample image not installed")
    x = lite0.transform(224)(image).unsqueeze(0)
    assert lite0(x).shape == (1, 1280, 7, 7)
    # ImageNet "military uniform", as in TensorFlow's label_image demo on this picture.
    with torch.no_grad():
        assert int(lite0_classifier(x).argmax()) == 652


def test_lite0_transform_scales_to_minus_one_one(lite0):
    t = lite0.transform(32)
    white = t(Image.new("RGB", (40, 50), (255, 255, 255)))
    black = t(Image.new("RGB", (40, 50), (0, 0, 0)))
    assert white.shape == (3, 32, 32)
    assert torch.allclose(white, torch.ones_like(white), atol=1e-6)
    assert torch.allclose(black, torch.full_like(black, -127 / 128), atol=1e-6)


def test_lite0_local_weights_file(tmp_path, lite0):
    path = tmp_path / "lite0.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in lite0.net.state_dict().items()}}, path)
    other = get_backbone("efficientnet_lite0", weights=str(path))
    assert other.provenance()["weights"] == str(path.resolve())
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(other.net.conv_stem(x), lite0.net.conv_stem(x))
    mine, theirs = other.state_dict(), lite0.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(DataError, match=r"wrong\.pth: the weights do not fit the model: missing \['conv_stem"):
        EfficientNetLite0Backbone(weights=tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")  # refused before anything is built
    with pytest.raises(DataError, match=r"junk\.pth: cannot read EfficientNet-Lite0 weights"):
        EfficientNetLite0Backbone(weights=tmp_path / "junk.pth")


def test_resnet101_random_init_shapes_and_frozen():
    torch.manual_seed(0)
    net = get_backbone("resnet101", weights=None)
    assert isinstance(net, ResNet101Backbone)
    out = net(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 2048, 2, 2) and torch.isfinite(out).all()
    assert (out >= 0).all()  # post-ReLU layer4
    assert not any(p.requires_grad for p in net.parameters())
    net.train()
    assert not net.training and not any(m.training for m in net.modules())
    prov = net.provenance(64)
    assert prov["backbone"] == "resnet101" and prov["image_size"] == 64
    assert prov["weights"].startswith("none") and prov["weights_sha256"] is None
    assert "Normalize(mean=[0.4850, 0.4560, 0.4060]" in prov["transform"]
    with pytest.raises(DataError, match=r"expected images of shape \(B, 3, H, W\)"):
        net(torch.zeros(3, 64, 64))


def test_resnet101_offline_download_error(monkeypatch):
    import torchvision.models._api as tv_api

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(DataError) as info:
        ResNet101Backbone(weights="imagenet")
    msg = str(info.value)
    assert "cannot download the ResNet-101 ImageNet weights" in msg
    assert "resnet101-63fe2227.pth" in msg and "--weights PATH" in msg


def test_resnet101_bad_local_weights(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ResNet101Backbone(weights=tmp_path / "missing.pth")
    torch.save({"layer9.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(DataError, match=r"bad\.pth: the weights do not fit the model: missing \['conv1"):
        ResNet101Backbone(weights=tmp_path / "bad.pth")


def test_registry_and_transform_modes(tmp_path, lite0):
    with pytest.raises(DataError, match="unknown backbone 'vgg16'"):
        get_backbone("vgg16")
    t = lite0.transform(48)
    for image in (Image.new("L", (60, 90), 128), Image.new("CMYK", (70, 50)), Image.new("P", (50, 50)),
                  Image.new("RGBA", (64, 64)), Image.new("I;16", (64, 64), 40000)):
        x = t(image)
        assert x.shape == (3, 48, 48) and torch.isfinite(x).all()
    # 16-bit grey is rescaled, not clipped to white.
    assert t(Image.new("I;16", (64, 64), 32768)).max() < 0.2


# ------------------------------------------------------------------------------------------- EfficientNet-Lite0 on timm
REFERENCE = Path(__file__).parent / "data" / "lite0_reference.npz"


def test_lite0_on_timm_gives_the_features_of_efficientnet_lite_pytorch(lite0):
    """The demo's images through timm's EfficientNet-Lite0 give the features the retired package gave.

    ``tests/data/lite0_reference.npz`` holds them as ``efficientnet_lite_pytorch`` 0.1.0 computed them (float32,
    one thread), with the shipped weights, for images 0, 900 and 1799 of the demo's benchmark
    (``load_config("demo").data.imagebench``): ``blocks_192``, the last MBConv block's output at 192 px (the demo's
    ``efficientnet-lite0-blocks`` features) and ``head_64``, the 1x1 head's output at 64 px. They were written with
    ``EfficientNet.from_name("efficientnet-lite0", image_size=None)`` and its ``extract_features``.
    """
    from dedn.config import load_config
    from dedn.data.imagebench import make_image_benchmark

    ref = np.load(REFERENCE)
    bench = make_image_benchmark(load_config("demo").data.imagebench)
    images = [bench.image(int(i)) for i in ref["index"]]
    blocks = get_backbone("efficientnet-lite0-blocks")
    x192 = torch.stack([blocks.transform(192)(im) for im in images])
    x64 = torch.stack([lite0.transform(64)(im) for im in images])
    # Float32 rounding: convolutions may sum in another order (memory layout, kernels), so allow 1e-5 of the
    # largest feature (the 192-px blocks came out bit-identical when this test was written; the head differed by
    # 2e-5 on features up to 6).
    for got, want in ((blocks(x192), ref["blocks_192"]), (lite0(x64), ref["head_64"])):
        want = torch.from_numpy(want)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert blocks.provenance(192)["layer"] == 4 and blocks.out_channels == 320 and blocks.stride == 32


def test_lite0_weight_mapping_uses_every_key(lite0):
    import timm

    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    state = _load_state_dict_file(efficientnet_lite0_weights_path(), "EfficientNet-Lite0")
    mapped = map_efficientnet_lite0_state(state, target)
    assert mapped.keys() == target.keys() and len(mapped) == len(state)
    assert torch.equal(mapped["blocks.6.0.conv_pwl.weight"], state["_blocks.15._project_conv.weight"])
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], state["_blocks.0._project_conv.weight"])
    headless = map_efficientnet_lite0_state(state, lite0.net.state_dict())  # the classifier is dropped
    assert not any(k.startswith("classifier.") for k in headless) and len(headless) == len(state) - 2
    with pytest.raises(DataError, match=r"unknown keys \['_blocks.0._extra.weight'\]"):
        map_efficientnet_lite0_state({**state, "_blocks.0._extra.weight": torch.zeros(1)}, target)
    with pytest.raises(DataError, match=r"left empty \['conv_head.weight'\]"):
        map_efficientnet_lite0_state({k: v for k, v in state.items() if k != "_conv_head.weight"}, target)
    bad = {**state, "_bn1.bias": torch.zeros(7)}
    with pytest.raises(DataError, match=r"shape mismatches \['_bn1.bias \(7,\) -> bn2.bias \(1280,\)'\]"):
        map_efficientnet_lite0_state(bad, target)


# ---------------------------------------------------------------------------------------------- timm backbones
TINY_VIT = {"img_size": 64, "depth": 2, "embed_dim": 32, "num_heads": 2}
TINY_DINO = {"img_size": 56, "depth": 2, "embed_dim": 32, "num_heads": 2}  # 4 register tokens + CLS


def _tiny(name: str, kwargs: dict, **kw) -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone(name, model_kwargs=kwargs, **kw)


def test_timm_vit_patch_tokens_without_class_and_register_tokens():
    for name, kwargs, prefix, patch in (("vit_tiny_patch16_224", TINY_VIT, 1, 16),
                                        ("vit_small_patch14_reg4_dinov2", TINY_DINO, 5, 14)):
        net = _tiny(name, kwargs)
        assert net.net.num_prefix_tokens == prefix and net.stride == patch and net.out_channels == 32
        x = torch.randn(2, 3, 4 * patch, 6 * patch)
        out = net(x)
        assert out.shape == (2, 32, 4, 6) and not out.requires_grad
        with torch.no_grad():
            tokens = net.net.forward_features(x)
        assert tokens.shape[1] == prefix + 24
        # region (i, j) is patch token prefix + i * 6 + j: the prefix tokens are gone, the grid is row by row
        torch.testing.assert_close(out[:, :, 1, 2], tokens[:, prefix + 8])
        torch.testing.assert_close(out.flatten(2).transpose(1, 2), tokens[:, prefix:])
        assert net.feature_shape(112 if patch == 14 else 64) == ((32, 8, 8) if patch == 14 else (32, 4, 4))
        with pytest.raises(DataError, match=f"not a multiple of the patch size .*multiple of {patch}"):
            net(torch.randn(1, 3, patch * 4 + 1, patch * 4))


def test_timm_layers_and_convnext():
    vit = _tiny("vit_tiny_patch16_224", TINY_VIT, layer=0)
    assert vit.layer == 0 and vit(torch.randn(1, 3, 64, 64)).shape == (1, 32, 4, 4)
    assert _tiny("vit_tiny_patch16_224", TINY_VIT, layer=-1).layer == 1
    with pytest.raises(DataError, match=r"--layer 2: timm:vit_tiny_patch16_224 has 2 feature points: 0..1"):
        _tiny("vit_tiny_patch16_224", TINY_VIT, layer=2)
    conv = _tiny("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)})
    out = conv(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 32, 2, 2) and conv.stride == 32 and conv.out_channels == 32
    stage2 = _tiny("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}, layer=2)
    assert stage2(torch.randn(1, 3, 64, 64)).shape == (1, 24, 4, 4) and stage2.stride == 16
    prov = stage2.provenance(64)
    assert prov["backbone"] == prov["model"] == "timm:convnext_atto" and prov["layer"] == 2
    assert prov["model_kwargs"]["dims"] == (8, 16, 24, 32) and prov["weights_sha256"] is None
    assert "Normalize(mean=tensor([0.4850, 0.4560, 0.4060])" in prov["transform"]
    with pytest.raises(DataError, match="has no model 'convnext_nope'"):
        TimmBackbone("convnext_nope")


def test_timm_transform_follows_the_data_config():
    net = _tiny("vit_tiny_patch16_224", TINY_VIT)
    assert net.default_image_size == 64
    t = net.transform(32)
    x = t(Image.new("RGB", (50, 40), (255, 255, 255)))
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, torch.ones_like(x))  # mean = std = 0.5: white is 1
    assert "Resize(size=35, interpolation=bicubic" in t.describe() and "CenterCrop(size=(32, 32))" in t.describe()
    assert t(Image.new("L", (40, 40), 0)).shape == (3, 32, 32)  # any mode goes to RGB first
    assert pickle.loads(pickle.dumps(t))(Image.new("RGB", (40, 40))).shape == (3, 32, 32)


def test_timm_weights_files(tmp_path):
    net = _tiny("vit_tiny_patch16_224", TINY_VIT)
    state = {k: v.contiguous() for k, v in net.net.state_dict().items()}  # channels-last convs: repack
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(state, tmp_path / "tiny.safetensors")
    head = {"head.weight": torch.zeros(5, 32), "head.bias": torch.zeros(5)}  # a classifier is skipped
    torch.save({**state, **head}, tmp_path / "tiny.pth")
    x = torch.randn(1, 3, 64, 64)
    for file in ("tiny.safetensors", "tiny.pth"):
        torch.manual_seed(1)  # another random init: the file must overwrite every weight
        other = TimmBackbone("vit_tiny_patch16_224", weights=tmp_path / file, model_kwargs=TINY_VIT)
        torch.testing.assert_close(other(x), net(x))
        prov = other.provenance()
        assert prov["weights"] == str((tmp_path / file).resolve()) and len(prov["weights_sha256"]) == 64
    with pytest.raises(DataError, match=r"missing.pth does not exist; expected a local weights file for "
                       r"vit_tiny_patch16_224 .*timm/vit_tiny_patch16_224\.augreg_in21k_ft_in1k"):
        TimmBackbone("vit_tiny_patch16_224", weights=tmp_path / "missing.pth")
    with pytest.raises(DataError, match=r"timm:vit_base_patch16_224: no --weights; expected .* never downloads"):
        get_backbone("timm:vit_base_patch16_224")
    torch.save({k: v for k, v in state.items() if k != "pos_embed"}, tmp_path / "short.pth")
    with pytest.raises(DataError, match=r"short\.pth: the weights do not fit the model: missing \['pos_embed'\]"):
        TimmBackbone("vit_tiny_patch16_224", weights=tmp_path / "short.pth", model_kwargs=TINY_VIT)
    torch.save({**state, "cls_token": torch.zeros(1, 1, 8)}, tmp_path / "narrow.pth")
    with pytest.raises(DataError, match=r"narrow\.pth: the weights do not fit the model: shapes differ for "
                       r"\['cls_token \(1, 1, 8\) \(model \(1, 1, 32\)\)'\]"):
        TimmBackbone("vit_tiny_patch16_224", weights=tmp_path / "narrow.pth", model_kwargs=TINY_VIT)
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    with pytest.raises(DataError, match=r"junk\.safetensors: cannot read timm:vit_tiny_patch16_224 weights"):
        TimmBackbone("vit_tiny_patch16_224", weights=tmp_path / "junk.safetensors", model_kwargs=TINY_VIT)
    with pytest.raises(DataError, match="only timm:<model name> backbones take a layer"):
        get_backbone("resnet101", weights=None, layer=3)


def test_transforms_know_the_crop_their_grid_covers():
    """crop_box is where the backbone's input (and so its feature grid) lies on the original image."""
    from dedn.eval.localisation import area_downsample
    from dedn.features.backbones import IMAGENET_MEAN, IMAGENET_STD, ImageTransform

    vit = _tiny("vit_tiny_patch16_224", TINY_VIT)  # crop_pct 0.9, bicubic
    square = np.zeros((90, 120), dtype=np.uint8)
    square[20:60, 50:100] = 255  # a white rectangle
    image = Image.fromarray(square).convert("RGB")
    for t in (vit.transform(64), ImageTransform(64, IMAGENET_MEAN, IMAGENET_STD)):
        seen = np.asarray(t.crop(image), dtype=np.float64)[..., 0] / 255
        assert seen.shape == (64, 64)
        expected = area_downsample(square[None] / 255, 64, 64, box=t.crop_box(90, 120))[0]
        assert np.abs(seen - expected).mean() < 0.02  # the same pixels, up to the interpolation
    # 90 x 120 -> 64 x 85 (torchvision truncates), crop 64 from column round(10.5) = 10: 10 * 120 / 85 in the image
    box = ImageTransform(64, IMAGENET_MEAN, IMAGENET_STD).crop_box(90, 120)
    assert box == pytest.approx((0.0, 10 * 120 / 85, 90.0, 64 * 120 / 85))
    top, left, height, width = vit.transform(64).crop_box(90, 120)  # resize to 71, crop 64: 90% of the middle
    assert height == pytest.approx(90 * 64 / 71) and left == pytest.approx(60 - width / 2, abs=1)
