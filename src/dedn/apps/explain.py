"""Where the experts look: per-attribute region and channel attention of cExp and fExp (paper Figure 4).

:func:`explain_image` writes, for one image (or one feature map) and a few attributes:

- ``STEM-regions.png``: the input image as the backbone saw it (resized and centre-cropped) first, then one
  column per attribute and one row per expert (cExp, then fExp). Each panel shows that expert's (h x w)
  region attention, upsampled bilinearly, as attention / uniform level (1/(h*w)) on one log scale shared by
  every panel (colour bar): the image keeps its own colours where attention is high and is dimmed where it is
  low, with viridis contours at 1, 2, 4, ... x uniform. Titles give the predicted (and, when known, true)
  class, and per panel the attribute, the expert's score, the peak (largest cell / uniform) and the
  attribute's value in the class.
- ``STEM-channels.png`` (models with channel attention): the same grid with each expert's largest channel
  attention weights as bars, titled with the entropy against ln C and the effective number of channels
  exp(entropy). An expert whose mean entropy exceeds ``NEAR_UNIFORM`` ln C gets that statement instead of
  bars; when every expert does, the PNG is not written (``channel_attention.chart`` in the JSON says why).
- ``STEM-explain.json``: the numbers behind both figures (region maps, top channels, entropies against ln C,
  scores, the shared scale).

By default the attributes are those contributing most to the predicted class (as in :mod:`dedn.apps.predict`).
All attribute indices and names here are in dataset order; the model's cluster order is mapped back
through ``model.attribute_order``.

:func:`region_attention` returns the maps as arrays for measurements such as
:func:`dedn.eval.localisation.attention_in_mask_share`.
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from dedn.apps.predict import ClassScore, Prediction, Predictor, load_image, true_classes
from dedn.checks import check_output_folder
from dedn.errors import DataError
from dedn.features.backbones import to_rgb
from dedn.models.registry import entry_for

#: Channel attention whose mean entropy exceeds this fraction of ln C is reported as near uniform, not drawn.
NEAR_UNIFORM = 0.98
#: Every text of the heatmap figures, in points at the figure's size (readable at 100 % zoom).
TEXT_PT = 9.0


# ---------------------------------------------------------------------------------------------- arrays
def _features_tensor(model: nn.Module, features: Any) -> tuple[torch.Tensor, tuple[int, int]]:
    """Features as a (B, C, h, w)-shaped tensor on the model's device, and (h, w)."""
    x = features if torch.is_tensor(features) else torch.as_tensor(np.asarray(features))
    if x.ndim == 3 and x.shape[0] == model.config.n_channels and x.shape[1] * x.shape[2] == model.config.n_regions:
        x = x[None]  # a single (C, h, w) map
    if x.ndim == 4:
        hw = (int(x.shape[2]), int(x.shape[3]))
    elif x.ndim == 3 and math.isqrt(x.shape[2]) ** 2 == x.shape[2]:
        side = math.isqrt(x.shape[2])
        hw = (side, side)  # (B, C, R) with square R: the backbones' square crops
    else:
        raise DataError(f"features must be (B, {model.config.n_channels}, h, w), got {tuple(x.shape)}")
    if x.shape[1] != model.config.n_channels or hw[0] * hw[1] != model.config.n_regions:
        raise DataError(f"features must be (B, {model.config.n_channels}, h, w) with h*w = {model.config.n_regions}, "
                        f"got {tuple(x.shape)}")
    return x.to(model.attribute_order.device), hw


def _to_dataset_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Move axis 1 (attributes, cluster order) to dataset order."""
    out = torch.empty_like(x)
    out[:, order] = x
    return out


def region_attention(model: nn.Module, features: Any) -> dict[str, np.ndarray]:
    """Region attention of each expert (the model's ``<expert>_region`` attention maps): ``{"cexp": (B, D, h, w),
    "fexp": ...}`` for DEDN, in dataset attribute order.

    Each (h, w) map sums to 1. ``features``: (B, C, h, w), or (B, C, R) with square R, tensor or array.
    """
    x, (h, w) = _features_tensor(model, features)
    maps = model.attention_maps(x)
    out = {}
    for key, m in maps.items():
        if key.endswith("_region"):
            a = _to_dataset_order(m, model.attribute_order)
            out[key.removesuffix("_region")] = a.reshape(a.shape[0], a.shape[1], h, w).double().cpu().numpy()
    return out


def channel_attention(model: nn.Module, features: Any) -> dict[str, np.ndarray]:
    """Channel attention of each expert: ``{"cexp": (B, D, C), ...}`` in dataset order ({} without it)."""
    x, _ = _features_tensor(model, features)
    maps = model.attention_maps(x)
    return {key.removesuffix("_channel"): _to_dataset_order(m, model.attribute_order).double().cpu().numpy()
            for key, m in maps.items() if key.endswith("_channel")}


def channel_summary(weights: np.ndarray, top: int = 10) -> dict[str, Any]:
    """Summary of one channel attention distribution (C,): top channels, entropy, effective count.

    ``entropy`` is in nats; ``effective_channels = exp(entropy)`` is C for uniform attention and 1 when a
    single channel takes all of it.
    """
    p = np.asarray(weights, dtype=np.float64)
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    best = np.argsort(-p, kind="stable")[:top]
    return {
        "top_channels": [[int(c), float(p[c])] for c in best],
        "entropy": entropy,
        "max_entropy": float(math.log(p.size)),
        "effective_channels": float(math.exp(entropy)),
        "n_channels": int(p.size),
    }


def _channel_spread(records: list[dict[str, Any]], experts: dict[str, str]) -> dict[str, Any]:
    """Per expert: the mean channel-attention entropy over the shown attributes against the uniform ln C."""
    out: dict[str, Any] = {"near_uniform_threshold": NEAR_UNIFORM, "chart": "drawn"}
    for e in experts:
        infos = [rec["experts"][e]["channel_attention"] for rec in records]
        mean = float(np.mean([i["entropy"] for i in infos]))
        ln_c = infos[0]["max_entropy"]
        ratio = mean / ln_c if ln_c > 0 else 1.0
        out[e] = {"mean_entropy": mean, "ln_C": ln_c, "entropy_over_ln_C": ratio,
                  "min_entropy": float(min(i["entropy"] for i in infos)),
                  "mean_effective_channels": float(np.mean([i["effective_channels"] for i in infos])),
                  "n_channels": infos[0]["n_channels"], "near_uniform": bool(ratio > NEAR_UNIFORM)}
    return out


def _shared_max(records: list[dict[str, Any]], experts: dict[str, str]) -> float:
    """The largest attention / uniform ratio over every shown map: the figure's common colour scale."""
    return max(float(rec["experts"][e]["peak_vs_uniform"]) for rec in records for e in experts)


# ---------------------------------------------------------------------------------------------- helpers
def _display_image(image: Any, size: int) -> np.ndarray:
    """A background image for feature maps given without their image: Resize(shorter = size), CenterCrop(size)."""
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image)
    elif isinstance(image, np.ndarray):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    image = to_rgb(image)
    image = TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    return np.asarray(TF.center_crop(image, [size, size]))


def _upsample(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of an (h, w) map to ``size`` (pixel centres aligned, as the crop was cut)."""
    t = torch.as_tensor(a, dtype=torch.float32)[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


def _wrap(text: str, width: int = 26) -> str:
    """At most two lines of the exact attribute name (users type these names back as --attributes)."""
    lines = textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False) or [text]
    return "\n".join(lines[:2]) + ("..." if len(lines) > 2 else "")


def _expert_labels(model: nn.Module, records: list[dict[str, Any]]) -> dict[str, str]:
    """The explained experts, in order, and how figures name them (the method's registry entry says)."""
    labels = entry_for(model).expert_labels
    return {e: labels.get(e, e) for e in (records[0]["experts"] if records else {})}


def _as_predictor(source: Any, attribute_names: Sequence[str] | None, class_names: Sequence[str] | None,
                  device: str | torch.device) -> Predictor:
    if isinstance(source, Predictor):
        return source
    if isinstance(source, nn.Module):
        return Predictor(source, class_names, attribute_names, device=device)
    if isinstance(source, (str, os.PathLike)):
        return Predictor.from_run(source, device=device)
    raise TypeError(f"explain_image needs a Predictor, a model or a run directory, got {type(source).__name__}")


# ---------------------------------------------------------------------------------------------- explain
@dataclass(frozen=True)
class ExplainOptions:
    """What :func:`explain_image` shows, and how.

    Attributes:
        attributes: attribute names to show (dataset names); default: the ``top`` attributes contributing
            most to the explained class.
        top: how many attributes when ``attributes`` is None.
        class_name: explain this candidate class instead of the predicted one.
        true_class: the image's true class, when known: named in the figure titles, and each attribute's
            value for it is reported (``true_class_value``) beside the explained class's. None for an image
            file: where :func:`~dedn.apps.predict.true_classes` finds one of the run's classes.
        background: an image (path, PIL image or HxWx3 uint8 array) to draw under the heat maps when
            the image is a feature map; without one the maps are drawn alone.
        l_e, gamma: expert mix and calibration for the prediction (defaults: the model's and the run's).
        n_channels: channels shown per channel-attention panel.
        stem: file name stem (default: the image file's stem, or ``features``).
        dpi: resolution of the PNGs.
    """

    attributes: Sequence[str] | None = None
    top: int = 4
    class_name: str | None = None
    true_class: str | None = None
    background: Any = None
    l_e: float | None = None
    gamma: float | None = None
    n_channels: int = 12
    stem: str | None = None
    dpi: int = 110


@dataclass(frozen=True)
class _View:
    """The explained input: one feature map on the model's device, and what the figures show of it."""

    x: torch.Tensor
    hw: tuple[int, int]
    shown: np.ndarray | None  # the image under the heat maps (None: the maps alone)
    label: str  # the image path, or "features"
    stem: str


@dataclass(frozen=True)
class _Choice:
    """The prediction, the class explained (and the true one), and the attributes shown."""

    pred: Prediction  # over every class
    explained: ClassScore
    truth: ClassScore | None
    scores: dict[str, np.ndarray]
    contrib: np.ndarray
    chosen: list[int]


def _view(predictor: Predictor, image: Any, options: ExplainOptions) -> _View:
    """Features of ``image`` (an image file, or one feature map) and the picture drawn under the maps."""
    model = predictor.model
    if isinstance(image, (str, os.PathLike)):
        feats = predictor.image_features([image])
        # The pixels the backbone saw (its resize and crop, e.g. a timm model's crop_pct), so the h x w grid of
        # any backbone, a ViT's 14 x 14 patches as a CNN's 7 x 7 map, lies on the image at the right scale.
        shown = np.asarray(predictor.backbone.transform(predictor.image_size).crop(load_image(image)))
        label = str(image)
        stem = options.stem or Path(image).stem
    else:
        feats, (h, w) = _features_tensor(model, image)
        if feats.shape[0] != 1:
            raise DataError(f"explain_image explains one feature map at a time, got a batch of {feats.shape[0]}")
        label = "features"
        stem = options.stem or "features"
        shown = None
        if options.background is not None:
            # The recorded input size of the run's features; without one, a stride of 32 (ResNet, EfficientNet).
            size = (predictor.feature_provenance or {}).get("image_size") or 32 * max(h, w)
            shown = _display_image(options.background, int(size))
    x, hw = _features_tensor(model, feats)
    return _View(x, hw, shown, label, stem)


def _choose(predictor: Predictor, view: _View, options: ExplainOptions) -> _Choice:
    """Predict, pick the explained class and the attributes to show."""
    # Rank every class: the explained class may be any of them.
    pred = predictor.predict_features(view.x, top_k=predictor.n_classes, l_e=options.l_e, gamma=options.gamma,
                                      n_attributes=0, sources=[view.label])[0]
    k = predictor.class_index(options.class_name) if options.class_name is not None else pred.top[0].index
    explained = next(c for c in pred.top if c.index == k)
    truth = (next(c for c in pred.top if c.index == predictor.class_index(options.true_class))
             if options.true_class else None)
    scores = predictor.attribute_scores(view.x, pred.l_e)
    contrib = predictor.contributions(scores["mixed"], k)[0]
    if options.attributes is None:
        chosen = [int(j) for j in np.argsort(-contrib, kind="stable")[: max(int(options.top), 1)]]
    else:
        if not options.attributes:
            raise DataError("no attributes given")
        chosen = [predictor.attribute_index(a) for a in options.attributes]
    return _Choice(pred, explained, truth, scores, contrib, chosen)


def _records(predictor: Predictor, view: _View, choice: _Choice,
             n_channels: int) -> tuple[list[dict[str, Any]], bool]:
    """One record per shown attribute (values, each expert's maps), and whether the model has channel attention."""
    model = predictor.model
    regions = region_attention(model, view.x)
    channels = channel_attention(model, view.x)
    class_att = predictor.normalized_class_att()
    abar = class_att[choice.explained.index]
    records = []
    for j in choice.chosen:
        rec: dict[str, Any] = {
            "name": predictor.attribute_names[j], "index": j, "predicted": float(choice.scores["mixed"][0, j]),
            "class_value": float(abar[j]), "contribution": float(choice.contrib[j]), "experts": {},
        }
        if choice.truth is not None:
            rec["true_class_value"] = float(class_att[choice.truth.index][j])
        for e in regions:
            m = regions[e][0, j]
            peak = np.unravel_index(int(np.argmax(m)), m.shape)
            rec["experts"][e] = {
                "score": float(choice.scores[e][0, j]),
                "region_attention": m.tolist(),
                "peak_region": [int(peak[0]), int(peak[1])],
                "peak_vs_uniform": float(m.max() * m.size),
                "channel_attention": channel_summary(channels[e][0, j], n_channels) if e in channels else None,
            }
        records.append(rec)
    return records, bool(channels)


def _title(view: _View, choice: _Choice) -> str:
    """The figures' title: the input, the prediction, the true class and the explained one."""
    top, truth, explained = choice.pred.top[0], choice.truth, choice.explained
    return (f"{Path(view.label).name if view.label != 'features' else view.label}: predicted {top.name} "
            f"(p = {top.probability:.2f})" +
            (f"; true {truth.name}" + (" (correct)" if truth.index == top.index else " (wrong)")
             if truth is not None else "") +
            (f"; explaining {explained.name}" if explained.index != top.index else ""))


def _report(predictor: Predictor, view: _View, choice: _Choice, records: list[dict[str, Any]],
            spread: dict[str, Any] | None, channel_png: Path | None) -> dict[str, Any]:
    """The numbers behind the figures (the JSON file)."""
    model, pred, explained, truth = predictor.model, choice.pred, choice.explained, choice.truth
    experts = _expert_labels(model, records)
    h, w = view.hw
    return {
        "source": view.label,
        "run_dir": str(predictor.run_dir) if predictor.run_dir else None,
        "explained_class": {"name": explained.name, "index": explained.index, "kind": explained.kind,
                            "score": explained.score, "probability": explained.probability},
        "true_class": (None if truth is None else
                       {"name": truth.name, "index": truth.index, "kind": truth.kind, "score": truth.score,
                        "probability": truth.probability, "correct": truth.index == pred.top[0].index}),
        "predicted": [dict(c.__dict__) for c in pred.top[:5]],
        "l_e": pred.l_e,
        "gamma": pred.gamma,
        "experts": list(experts),
        "feature_shape": [int(model.config.n_channels), h, w],
        "image_size": None if view.shown is None else int(view.shown.shape[0]),
        "attributes": records,
        "region_scale": {"unit": "attention / uniform level 1/(h*w)", "max": _shared_max(records, experts),
                         "peak_vs_uniform": "largest cell of a map divided by the uniform level 1/(h*w)"},
        "channel_attention": spread,
        "panels": {
            "regions": {"rows": len(experts), "cols": len(records), "count": len(experts) * len(records)},
            "input_panel": view.shown is not None,  # the image itself, before the attention panels
            "channels": ({"rows": len(experts), "cols": len(records), "count": len(experts) * len(records)}
                         if channel_png else None),
        },
        "files": {"regions": f"{view.stem}-regions.png", "channels": channel_png.name if channel_png else None,
                  "json": f"{view.stem}-explain.json"},
    }


def explain_image(
    source: Predictor | nn.Module | str | os.PathLike[str],
    image: str | os.PathLike[str] | np.ndarray | torch.Tensor,
    out_dir: str | os.PathLike[str] = ".",
    options: ExplainOptions | None = None,
    *,
    attribute_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """Draw both experts' attention for chosen attributes of one image (paper Figure 4) and save the numbers.

    Args:
        source: a :class:`Predictor`, a run directory, or a bare model of any registered method (then
            ``attribute_names`` and ``class_names`` name its attributes and classes; generic names otherwise).
        image: an image file (needs a predictor with a backbone), or one feature map (C, h, w) / (1, C, h, w).
        out_dir: folder for the files (created; an existing file there is a ConfigError).
        options: what to show (default: :class:`ExplainOptions` ()).
        device: where a bare model or a run directory's model runs.

    Returns:
        The written paths: region PNG, channel PNG (only with channel attention), JSON.

    Raises:
        DataError: unknown attribute or class name (close matches suggested), unreadable image, features of
            the wrong shape. CheckpointError: a run directory without a trained model.
    """
    check_output_folder("out_dir", out_dir)  # before any work: mkdir fails on a file, after all the drawing
    options = options or ExplainOptions()
    predictor = _as_predictor(source, attribute_names, class_names, device)
    if options.true_class is None and isinstance(image, (str, os.PathLike)):
        found = true_classes([image], predictor.class_names)[0]  # an index.csv, the file name, the folder
        if found in predictor.class_names:
            options = replace(options, true_class=found)
    view = _view(predictor, image, options)
    choice = _choose(predictor, view, options)
    records, has_channels = _records(predictor, view, choice, options.n_channels)
    experts = _expert_labels(predictor.model, records)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = _title(view, choice)
    region_png = out / f"{view.stem}-regions.png"
    _draw_regions(region_png, records, experts, view.shown, view.hw, title, options.dpi)
    paths = [region_png]
    channel_png = None
    spread = _channel_spread(records, experts) if has_channels else None
    if spread and not all(spread[e]["near_uniform"] for e in experts):
        channel_png = out / f"{view.stem}-channels.png"
        _draw_channels(channel_png, records, experts, title, options.dpi, spread)
        paths.append(channel_png)
    elif spread:
        spread["chart"] = ("not drawn: every expert's channel attention is near uniform (mean entropy > "
                           f"{NEAR_UNIFORM:g} ln C), so bars of its weights would show only the uniform level")
    json_path = out / f"{view.stem}-explain.json"
    report = _report(predictor, view, choice, records, spread, channel_png)
    json_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    paths.append(json_path)
    return paths


def _grid(n_rows: int, n_cols: int, dpi: int, axes_in: tuple[float, float], left_in: float,
          title_in: float, bottom_in: float = 0.3, right_in: float = 0.15) -> tuple[Figure, np.ndarray]:
    """A figure of n_rows x n_cols axes of ``axes_in`` inches, with room for titles (fixed margins in inches:
    tight_layout would measure every text, which dominates the drawing time)."""
    gap_in, top_in = 0.45, 0.4
    width = left_in + n_cols * axes_in[0] + (n_cols - 1) * gap_in + right_in
    height = top_in + n_rows * (title_in + axes_in[1]) + bottom_in
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left_in / width, right=1 - right_in / width, top=1 - (top_in + title_in) / height,
                        bottom=bottom_in / height, wspace=gap_in / axes_in[0], hspace=title_in / axes_in[1])
    return fig, np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))


def _draw_regions(path: Path, records: list[dict[str, Any]], experts: dict[str, str], shown: np.ndarray | None,
                  hw: tuple[int, int], title: str, dpi: int) -> None:
    """Input image first, then one panel per (expert, attribute) on one shared scale of attention / uniform.

    With an image, the image is dimmed where attention is low and shown in its own colours where it is high
    (brightness proportional to attention on the shared scale), and contour lines at 1, 2, 4, ... x uniform
    are drawn in the colour map's colours; without one, the maps themselves are drawn in the colour map.
    """
    from matplotlib import cm, colormaps, colors, patheffects, ticker

    n_first = 1 if shown is not None else 0
    fig, axes = _grid(len(experts), len(records) + n_first, dpi, (2.6, 2.6), 0.4, 0.8, 0.55, 1.15)
    size = (shown.shape[0], shown.shape[1]) if shown is not None else (32 * hw[0], 32 * hw[1])
    n_cells = hw[0] * hw[1]
    vmax = max(_shared_max(records, experts), 1.0 + 1e-6)
    norm = colors.LogNorm(0.5, vmax)  # log: 1, 2, 4, ... x uniform equally spaced; below half uniform: darkest
    cmap = colormaps["viridis"]
    levels = [2.0 ** i for i in range(0, 12) if 2.0 ** i < vmax]
    outline = [patheffects.withStroke(linewidth=2.2, foreground="white")]
    if shown is not None:
        ax = axes[0, 0]
        ax.imshow(shown)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title("input\n(as the backbone sees it)", fontsize=TEXT_PT)
        for r in range(1, len(experts)):
            axes[r, 0].axis("off")
        if len(experts) > 1:
            axes[1, 0].text(0.0, 1.0, textwrap.fill(
                "Brightness and contours: attention relative to uniform (1/(h*w), h*w = "
                f"{n_cells} cells), one log scale for all panels. Image dimmed where attention is low; "
                "'peak' = the largest cell / uniform. 'value in class': the attribute's normalised value "
                "in the explained (and the true) class.", 32), fontsize=TEXT_PT, va="top", ha="left",
                transform=axes[1, 0].transAxes)
    for r, e in enumerate(experts):
        for c, rec in enumerate(records):
            ax = axes[r, c + n_first]
            info = rec["experts"][e]
            ratio = _upsample(np.asarray(info["region_attention"]) * n_cells, size)
            if shown is not None:
                light = 0.12 + 0.88 * np.clip(norm(ratio), 0.0, 1.0)
                ax.imshow((shown.astype(np.float64) / 255.0 * light[..., None]).clip(0, 1))
                if levels and ratio.max() > levels[0]:
                    ax.contour(ratio, levels=levels, cmap=cmap, norm=norm, linewidths=1.3).set(path_effects=outline)
            else:
                ax.imshow(ratio, cmap=cmap, norm=norm)
            ax.set_xticks([])
            ax.set_yticks([])
            values = f"value in class {rec['class_value']:.2f}"
            if "true_class_value" in rec and not np.isclose(rec["true_class_value"], rec["class_value"]):
                values += f" (true {rec['true_class_value']:.2f})"
            ax.set_title(f"{_wrap(rec['name'])}\n{experts[e]} score {info['score']:.2f}, "
                         f"peak {info['peak_vs_uniform']:.1f}x\n{values}", fontsize=TEXT_PT)
            if c == 0 and n_first == 0:
                ax.set_ylabel(experts[e], fontsize=TEXT_PT + 1)
            elif c == 0:
                ax.text(-0.06, 0.5, experts[e], rotation=90, fontsize=TEXT_PT + 1, va="center", ha="right",
                        transform=ax.transAxes)
    top = axes[0, -1].get_position()
    bottom = axes[-1, -1].get_position()
    cax = fig.add_axes((top.x1 + 0.18 / fig.get_figwidth(), bottom.y0, 0.12 / fig.get_figwidth(), top.y1 - bottom.y0))
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    bar.set_label("attention / uniform level (log scale)", fontsize=TEXT_PT)
    bar.ax.tick_params(labelsize=TEXT_PT)
    for lv in levels:
        bar.ax.axhline(lv, color="white", linewidth=0.8)
    bar.ax.yaxis.set_minor_locator(ticker.NullLocator())
    ticks = [t for t in (0.5, 1, 2, 4, 8, 16, 32, 64, 128) if t <= vmax]
    bar.set_ticks(ticks, labels=[f"{t:g}x" for t in ticks])
    fig.suptitle(f"{title}\nregion attention of each expert per attribute, one shared log scale of attention / "
                 "uniform level 1/(h*w); peak: the map's largest cell / uniform", fontsize=TEXT_PT)
    fig.savefig(path)


def _draw_channels(path: Path, records: list[dict[str, Any]], experts: dict[str, str], title: str, dpi: int,
                   spread: dict[str, Any]) -> None:
    """Top channel weights as bars; an expert whose attention is near uniform gets a statement, not bars."""
    fig, axes = _grid(len(experts), len(records), dpi, (3.0, 1.8), 0.8, 1.05, 0.6)
    for r, e in enumerate(experts):
        s = spread[e]
        if s["near_uniform"]:
            for ax in axes[r]:
                ax.axis("off")
            axes[r, 0].text(0.0, 0.5, textwrap.fill(
                f"{experts[e]}: channel attention is near uniform for these attributes - mean entropy "
                f"{s['mean_entropy']:.3f} nats of ln C = {s['ln_C']:.3f} ({100 * s['entropy_over_ln_C']:.1f} %), "
                f"about {s['mean_effective_channels']:.0f} of {s['n_channels']} channels used equally; "
                "bars of its weights would show only the uniform level, so none are drawn.",
                max(40, 48 * len(records))), fontsize=TEXT_PT, va="center", ha="left", transform=axes[r, 0].transAxes)
            continue
        for c, rec in enumerate(records):
            ax = axes[r, c]
            info = rec["experts"][e]["channel_attention"]
            chans = info["top_channels"]
            ax.bar(range(len(chans)), [wgt for _, wgt in chans], color="tab:blue" if e == "cexp" else "tab:orange")
            ax.axhline(1.0 / info["n_channels"], color="grey", linestyle="--", linewidth=0.8)
            ax.set_xticks(range(len(chans)))
            names = [str(ch) for ch, _ in chans]
            # Channel numbers of up to 3 digits fit side by side; longer ones stand upright, still at full size.
            ax.set_xticklabels(names, rotation=90 if max(map(len, names), default=0) > 3 else 0, fontsize=TEXT_PT)
            ax.tick_params(axis="y", labelsize=TEXT_PT)
            ax.set_title(f"{_wrap(rec['name'])}\n{experts[e]}: H={info['entropy']:.2f} of ln C="
                         f"{info['max_entropy']:.2f} nats\neff. {info['effective_channels']:.3g} of "
                         f"{info['n_channels']} channels", fontsize=TEXT_PT)
            if c == 0:
                ax.set_ylabel(f"{experts[e]} weight", fontsize=TEXT_PT)
    fig.suptitle(f"{title}\ntop channel attention weights (dashed: uniform 1/C; H: entropy, "
                 "eff.: exp(H) channels)", fontsize=TEXT_PT)
    fig.savefig(path)
