"""Frozen backbones: shapes, the pretrained EfficientNet-Lite0 weights, transforms, offline errors."""

from __future__ import annotations

import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from dedn.errors import DataError
from dedn.features.backbones import (
    EfficientNetLite0Backbone,
    ResNet101Backbone,
    efficientnet_lite0_weights_path,
    get_backbone,
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


def test_lite0_weights_are_the_real_pretrained_ones(lite0):
    # The shipped file is the one the package names (its name carries the hash prefix).
    assert efficientnet_lite0_weights_path().name == "efficientnet-lite0-57934424.pth"
    assert lite0.weights_sha256 == LITE0_SHA256
    prov = lite0.provenance()
    assert prov["weights_sha256"] == LITE0_SHA256 and prov["image_size"] == 224
    # Trained BatchNorm statistics: far from the untrained value 1, and the stem's running variance
    # matches the variance of its output on [-1, 1] inputs (the normalisation we use).
    running_var = lite0.net._bn0.running_var
    assert not torch.allclose(running_var, torch.ones_like(running_var))
    x = lite0.transform(64)(_smooth_image()).unsqueeze(0)
    ratio = (lite0.net._conv_stem(x).var(dim=(0, 2, 3)) / running_var).median()
    assert 0.2 < float(ratio) < 5.0
    # ImageNet logits on an image are far from uniform (a random head would be near 1/1000 everywhere).
    assert lite0.classify(x).softmax(-1).max() > 20 / 1000


def test_lite0_recognises_a_natural_image(lite0):
    cbook = pytest.importorskip("matplotlib.cbook")
    try:
        image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except (OSError, ValueError):
        pytest.skip("matplotlib sample image not installed")
    x = lite0.transform(224)(image).unsqueeze(0)
    assert lite0(x).shape == (1, 1280, 7, 7)
    # ImageNet "military uniform", as in TensorFlow's label_image demo on this picture.
    assert int(lite0.classify(x).argmax()) == 652


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
    torch.testing.assert_close(other.net._conv_stem(x), lite0.net._conv_stem(x))
    mine, theirs = other.state_dict(), lite0.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(DataError, match=r"wrong\.pth: the weights do not fit the model"):
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
