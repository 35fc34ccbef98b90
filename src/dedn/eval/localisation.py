"""Localisation: how much of an attribute's region attention falls inside the mask of the part it describes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dedn.errors import DataError


def area_downsample(masks: np.ndarray, h: int, w: int,
                    box: Sequence[float] | None = None) -> np.ndarray:
    """Area-average boolean/float maps (..., H, W) to (..., h, w): each cell's covered fraction.

    ``box``: (top, left, height, width) in mask pixels, fractional allowed, of the region the h x w grid covers
    (the part of the image a backbone saw after its resize and centre crop); default the whole map. Exact for
    any sizes (cells may straddle pixels), so a part's fractions always sum to its area inside the box.
    """
    masks = np.asarray(masks, dtype=np.float32)
    big_h, big_w = masks.shape[-2:]
    top, left, height, width = (0.0, 0.0, float(big_h), float(big_w)) if box is None else map(float, box)
    if height <= 0 or width <= 0 or top < 0 or left < 0 or top + height > big_h + 1e-6 or left + width > big_w + 1e-6:
        raise DataError(f"crop box {tuple(box or ())} does not lie inside the {big_h} x {big_w} masks")
    rows, cols = _overlap(h, big_h, top, top + height), _overlap(w, big_w, left, left + width)
    return np.einsum("ah,...hw,bw->...ab", rows, masks, cols, optimize=True)


def _overlap(n: int, big: int, start: float, stop: float) -> np.ndarray:
    """(n, big) matrix: share of each of ``big`` pixels in each of ``n`` equal cells of [start, stop), rows
    averaging."""
    edges = np.linspace(start, stop, n + 1)
    lo = np.maximum(edges[:-1, None], np.arange(big)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(big)[None, :] + 1)
    return (np.clip(hi - lo, 0, None) / ((stop - start) / n)).astype(np.float32)


def attention_in_mask_share(attention: Any, masks: Any, attribute_part: Any,
                            part_names: Sequence[str] | None = None,
                            box: Sequence[float] | None = None) -> dict[str, Any]:
    """How much of each part attribute's region attention falls on that part (localisation).

    Args:
        attention: (N, D, h, w) non-negative region attention, summing to 1 over h * w per attribute.
        masks: (N, P, H, W) part masks (bool or fractions), e.g. from :meth:`ImageBenchmark.render`.
        attribute_part: (D,) part index of each attribute, -1 for global attributes (skipped).
        part_names: P names for the per-part results (default ``part0``, ``part1``, ...).
        box: (top, left, height, width) in mask pixels of the image region the attention grid covers: what the
            backbone's transform kept of the image (its centre crop); default the whole image. A transformer's
            patch grid (14 x 14, 16 x 16, ...) and a CNN's map are handled alike.

    Masks are area-averaged to h x w, so the share of attribute d in image n is
    ``sum(attention[n, d] * mask_frac[n, part(d)])``. Images where the part is not visible are left
    out of that attribute's mean. The "chance" share is what uniform attention would get: the mean
    area fraction of the part.

    Returns a dict with ``per_attribute`` and ``chance_per_attribute`` ((D,), NaN for global
    attributes), ``count_per_attribute`` (images used), ``per_part`` and ``chance_per_part``
    (name -> mean over that part's attributes; a part's chance is its mean mask area over the images where
    it is visible), ``parts`` (name -> ``{"share", "chance", "share_over_chance", "n_attributes",
    "n_images_visible"}``: each part's share beside its own chance, since parts differ in size), and
    ``overall`` / ``chance`` (mean over part attributes).
    """
    att = np.asarray(attention, dtype=np.float32)
    m = np.asarray(masks)
    parts = np.asarray(attribute_part, dtype=np.int64)
    if att.ndim != 4 or m.ndim != 4 or att.shape[0] != m.shape[0] or parts.shape != (att.shape[1],):
        raise DataError(f"attention (N, D, h, w) {att.shape}, masks (N, P, H, W) {m.shape} and "
                        f"attribute_part (D,) {parts.shape} do not match")
    if parts.max(initial=-1) >= m.shape[1]:
        raise DataError(f"attribute_part refers to part {int(parts.max())} but masks have {m.shape[1]} parts")
    n_parts = m.shape[1]
    names = list(part_names) if part_names is not None else [f"part{p}" for p in range(n_parts)]
    frac = area_downsample(m, att.shape[2], att.shape[3], box)  # (N, P, h, w)
    area = frac.mean(axis=(2, 3))  # (N, P) area fraction
    visible = area > 0

    d = att.shape[1]
    share = np.full(d, np.nan)
    chance = np.full(d, np.nan)
    count = np.zeros(d, dtype=np.int64)
    for j in np.flatnonzero(parts >= 0):
        p = parts[j]
        vis = visible[:, p]
        count[j] = int(vis.sum())
        if count[j]:
            share[j] = float((att[vis, j] * frac[vis, p]).sum(axis=(1, 2)).mean())
            chance[j] = float(area[vis, p].mean())

    def part_mean(values: np.ndarray, p: int) -> float:
        sel = values[(parts == p) & ~np.isnan(values)]
        return float(sel.mean()) if sel.size else float("nan")

    def overall(values: np.ndarray) -> float:
        sel = values[~np.isnan(values)]
        return float(sel.mean()) if sel.size else float("nan")

    per_part = {names[p]: part_mean(share, p) for p in range(n_parts)}
    chance_per_part = {names[p]: part_mean(chance, p) for p in range(n_parts)}
    parts_record = {}
    for p in range(n_parts):
        sh, ch = per_part[names[p]], chance_per_part[names[p]]
        parts_record[names[p]] = {
            "share": sh, "chance": ch,
            "share_over_chance": sh / ch if np.isfinite(sh) and np.isfinite(ch) and ch > 0 else float("nan"),
            "n_attributes": int((parts == p).sum()), "n_images_visible": int(visible[:, p].sum()),
        }
    return {
        "per_attribute": share,
        "chance_per_attribute": chance,
        "count_per_attribute": count,
        "per_part": per_part,
        "chance_per_part": chance_per_part,
        "parts": parts_record,
        "overall": overall(share),
        "chance": overall(chance),
    }
