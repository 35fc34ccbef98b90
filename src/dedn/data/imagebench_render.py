"""Drawing one creature of the built-in benchmark: body parts as polygons, patterns, a habitat background
and part masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from dedn.data.imagebench_spec import PALETTE, PART_NAMES, ImageBenchConfig


def _color(name: str) -> np.ndarray:
    return np.array(PALETTE[name], dtype=np.float32)


def _ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 40) -> np.ndarray:
    """Polygon (n, 2) approximating an ellipse rotated by ``angle`` radians."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    ca, sa = np.cos(angle), np.sin(angle)
    return np.stack([cx + ca * x - sa * y, cy + sa * x + ca * y], axis=1)


def _unit(angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Direction and its left normal for an angle in radians (image coordinates: y points down)."""
    d = np.array([np.cos(angle), np.sin(angle)])
    return d, np.array([-d[1], d[0]])


@dataclass
class _Layer:
    """One filled shape: polygons in creature-local units, its part (or -1), colour and texture."""

    part: int
    polygons: list[np.ndarray]
    color: np.ndarray
    pattern: str = "solid"
    pattern_angle: float = 0.0  # radians, creature-local: stripes run across this direction
    dots: list[tuple[float, float, float]] = field(default_factory=list)  # (x, y, r) dark dots (eyes)


def _wing(shape: str, at: np.ndarray, angle: float, length: float, scale: float) -> np.ndarray:
    """One wing polygon from ``at`` along ``angle``: an ellipse (``rounded``) or a pointed quadrilateral."""
    d, nrm = _unit(angle)
    length = length * scale
    if shape == "rounded":
        c = at + d * length / 2
        return _ellipse(c[0], c[1], length / 2, 0.085 * scale, angle)
    return np.stack([at + nrm * 0.075 * scale, at + d * 0.55 * length + nrm * 0.06 * scale,
                     at + d * 1.2 * length, at - nrm * 0.045 * scale])


def _legs(leg_length: str, a: float, b: float, jit: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Two legs, from inside the body downwards, each with a small foot pointing forwards."""
    leg_len = (0.09 if leg_length == "short" else 0.21) * rng.uniform(0.9, 1.1)
    legs = []
    for x0 in (0.35 * a, -0.3 * a):
        d, nrm = _unit(np.pi / 2 + rng.normal(0, 0.5 * jit))
        top = np.array([x0, 0.6 * b])
        end = top + d * (leg_len + 0.4 * b)
        w = 0.018
        legs.append(np.stack([top + nrm * w, end + nrm * w, end - nrm * w, top - nrm * w]))
        legs.append(np.stack([end + np.array([-0.015, -0.012]), end + np.array([0.06, -0.012]),
                              end + np.array([0.06, 0.012]), end + np.array([-0.015, 0.012])]))
    return legs


def _tail(tail_shape: str, a: float, b: float, jit: float, rng: np.random.Generator) -> np.ndarray:
    """The tail polygon at the back end of the body."""
    d, nrm = _unit(np.pi + np.deg2rad(-15) + rng.normal(0, 0.7 * jit))
    t0 = np.array([-0.9 * a, -0.1 * b])
    if tail_shape == "fan":
        tail = [t0 + nrm * 0.035, t0 - nrm * 0.035, t0 + d * 0.22 - nrm * 0.12, t0 + d * 0.24,
                t0 + d * 0.22 + nrm * 0.12]
    elif tail_shape == "straight":
        tail = [t0 + nrm * 0.028, t0 - nrm * 0.028, t0 + d * 0.33 - nrm * 0.022, t0 + d * 0.33 + nrm * 0.022]
    else:  # forked: a V opening backwards
        tail = [t0 + nrm * 0.035, t0 + d * 0.27 + nrm * 0.13, t0 + d * 0.15, t0 + d * 0.27 - nrm * 0.13,
                t0 - nrm * 0.035]
    return np.stack(tail)


def _head(shape: str, a: float, b: float,
          rng: np.random.Generator) -> tuple[list[np.ndarray], tuple[float, float, float]]:
    """Head polygons at the front end, a little raised, and its eye (x, y, r)."""
    r = 0.105 * rng.uniform(0.92, 1.08)
    hx, hy = 0.9 * a + 0.45 * r, -0.55 * b
    if shape == "round":
        head = [_ellipse(hx, hy, r, r)]
    elif shape == "pointed":  # round back half, drawn out into a point at the front
        t = np.linspace(np.pi / 2, 3 * np.pi / 2, 20)
        back = np.stack([hx + r * np.cos(t), hy + r * np.sin(t)], axis=1)
        head = [np.vstack([back, [[hx + 1.9 * r, hy + 0.15 * r]]])]
    elif shape == "square":
        head = [_ellipse(hx, hy, 1.25 * r, 1.25 * r, np.pi / 4 + rng.normal(0, 0.15), n=4)]
    else:  # crested: round head with three spikes on top
        head = [_ellipse(hx, hy, r, r)]
        for k, off in enumerate((-0.55, 0.0, 0.55)):
            base = np.array([hx + off * r, hy - 0.6 * r])
            tip = np.array([hx + off * r * 1.6 - 0.15 * r, hy - (1.75 if k == 1 else 1.5) * r])
            head.append(np.stack([base + [-0.3 * r, 0.0], tip, base + [0.3 * r, 0.0]]))
    return head, (hx + 0.4 * r, hy - 0.2 * r, 0.2 * r)


def _creature_layers(v: dict[str, str], cfg: ImageBenchConfig, rng: np.random.Generator) -> list[_Layer]:
    """The creature's shapes in local units (body centred at 0, head towards +x, y down), back to front.

    The random draws happen in a fixed order (size, colours, wings, legs, tail, head): a benchmark's images
    depend on it.
    """
    jit = np.deg2rad(cfg.pose_jitter_deg)
    part = {p: i for i, p in enumerate(PART_NAMES)}

    def col(name: str) -> np.ndarray:
        return np.clip(_color(name) + rng.normal(0, cfg.color_jitter, 3), 0, 255)

    a, b = (0.20, 0.15) if v["body_shape"] == "round" else (0.27, 0.105)
    a, b = a * rng.uniform(0.93, 1.07), b * rng.uniform(0.93, 1.07)
    body_col, head_col = col(v["body_color"]), col(v["head_color"])
    wing_col, tail_col, leg_col = col(v["wing_color"]), col(v["tail_color"]), col(v["leg_color"])
    layers: list[_Layer] = []

    # Wings: the far wing sits behind the body (shaded), the near one in front of it.
    wing_len = rng.uniform(0.30, 0.36)
    wing_angle = np.deg2rad(-135) + rng.normal(0, 0.6 * jit)
    anchor = np.array([-0.1 * a, -0.45 * b])
    far = _wing(v["wing_shape"], anchor + np.array([0.07, -0.02]), wing_angle - np.deg2rad(22), wing_len, 0.85)
    layers.append(_Layer(part["wings"], [far], wing_col * 0.72, v["wing_pattern"], wing_angle))
    layers.append(_Layer(part["legs"], _legs(v["leg_length"], a, b, jit, rng), leg_col))
    layers.append(_Layer(part["tail"], [_tail(v["tail_shape"], a, b, jit, rng)], tail_col))
    layers.append(_Layer(part["body"], [_ellipse(0, 0, a, b)], body_col, v["body_pattern"], 0.0))
    # An eye makes the facing direction readable.
    head, eye = _head(v["head_shape"], a, b, rng)
    layers.append(_Layer(part["head"], head, head_col, dots=[eye]))
    near = _wing(v["wing_shape"], anchor, wing_angle, wing_len, 1.0)
    layers.append(_Layer(part["wings"], [near], wing_col, v["wing_pattern"], wing_angle))
    return layers


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (size, size) float32, shared and read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _fill(img: np.ndarray, color: tuple[float, float, float], shade: np.ndarray | float = 0.0) -> None:
    """img[..., c] = color[c] + shade, channel by channel (much faster than an (H, W, 3) broadcast)."""
    for c in range(3):
        img[..., c] = shade
        img[..., c] += color[c]


def _background(habitat: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 habitat background."""
    # Column / row coordinate vectors in 0..1; broadcasting keeps most work one-dimensional. Random
    # numbers are turned into Python floats so that float32 arrays stay float32.
    y = ((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None]
    x = ((np.arange(size, dtype=np.float32) + 0.5) / size)[None, :]
    img = np.empty((size, size, 3), dtype=np.float32)
    two_pi = float(2 * np.pi)
    if habitat == "water":
        freq, p0, p1 = float(rng.uniform(9, 14)), float(rng.uniform(0, 6.3)), float(rng.uniform(0, 6.3))
        waves = np.sin(two_pi * (y * freq + 0.3 * np.sin(two_pi * 2.5 * x + p0)) + p1)
        _fill(img, (35, 95, 165), waves * 22 - y * 30)
    elif habitat == "grass":
        horizon, freq = int(rng.uniform(0.2, 0.4) * size), float(rng.uniform(28, 40))
        blades = np.sin(two_pi * (x * freq + 0.8 * np.sin(two_pi * 6 * y)))
        _fill(img, (75, 145, 55), blades * 22)
        _fill(img[:horizon], (165, 205, 240))
    elif habitat == "sky":  # a vertical gradient with soft white clouds
        for c, (top, bottom) in enumerate(((95, 195), (160, 225), (235, 250))):
            img[..., c] = np.float32(top) + y * np.float32(bottom - top)
        for _ in range(rng.integers(2, 5)):
            cx, cy = (float(t) * size for t in rng.uniform(0, 1, 2))
            rx, ry = float(rng.uniform(0.08, 0.2)) * size, float(rng.uniform(0.04, 0.08)) * size
            # only the cloud's bounding box: its weight is 0 beyond sqrt(1.5) radii
            xs = slice(max(int(cx - 1.23 * rx), 0), max(min(int(cx + 1.23 * rx) + 1, size), 0))
            ys = slice(max(int(cy - 1.23 * ry), 0), max(min(int(cy + 1.23 * ry) + 1, size), 0))
            cloud = np.clip(1.5 - ((x[:, xs] * size - cx) / rx) ** 2 - ((y[ys] * size - cy) / ry) ** 2, 0, 1)
            patch = img[ys, xs]
            patch += cloud[..., None] * (np.float32(250) - patch)
    elif habitat == "sand":
        freq, p0 = float(rng.uniform(3, 5)), float(rng.uniform(0, 6.3))
        dunes = np.sin(two_pi * (y * freq + 0.2 * np.sin(two_pi * 1.5 * x + p0)))
        speckle = rng.standard_normal((size, size), dtype=np.float32) * np.float32(14)  # grainy sand
        _fill(img, (218, 188, 128), dunes * 18 + speckle)
    else:  # forest: dark foliage with tree trunks
        _fill(img, (38, 82, 42), np.sin(two_pi * (x * 7 + y * 5)) * 10)
        for _ in range(rng.integers(2, 5)):
            cx, w = float(rng.uniform(0, 1)), float(rng.uniform(0.04, 0.09))
            img[:, np.abs(x[0] - cx) < w / 2] = np.array([92, 62, 34], np.float32)
    return img


def render_creature(v: dict[str, str], cfg: ImageBenchConfig, rng: np.random.Generator
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image: ``(pixels (H, W, 3) uint8, owner (H, W) int8 part index or -1)``."""
    size = cfg.image_size
    canvas = _background(v["habitat"], size, rng)
    owner = np.full((size, size), -1, dtype=np.int8)

    # Distractor blobs in palette colours, so a colour seen somewhere in the image is not proof of a part.
    palette = list(PALETTE)[:cfg.n_colors]
    for _ in range(rng.poisson(cfg.clutter)):
        cx, cy = rng.uniform(0, size, 2)
        poly = _ellipse(cx, cy, *(rng.uniform(0.025, 0.07, 2) * size), rng.uniform(0, np.pi), n=12)
        poly += rng.normal(0, 0.01 * size, poly.shape)  # irregular outline
        _paint(canvas, None, poly, _color(palette[rng.integers(len(palette))]) * rng.uniform(0.7, 1.0))

    # Pose: local units -> pixels by rotation, optional mirror (facing left), scale and translation.
    layers = _creature_layers(v, cfg, rng)
    scale = {"small": 0.68, "medium": 0.84, "large": 1.0}[v["size"]] * size
    scale *= np.exp(rng.normal(0, cfg.scale_jitter))
    angle = rng.normal(0, np.deg2rad(cfg.pose_jitter_deg))
    flip = -1.0 if rng.random() < 0.5 else 1.0
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([flip, 1.0])
    pts = np.vstack([p for layer in layers for p in layer.polygons]) @ rot.T
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    margin = 0.03 * size
    scale = min(scale, (size - 2 * margin) / float((hi - lo).max()))  # always fits the frame
    lo, hi = lo * scale, hi * scale
    centre = np.empty(2)
    for ax in range(2):
        low, high = margin - lo[ax], size - margin - hi[ax]
        mid = (low + high) / 2
        centre[ax] = mid + cfg.position_jitter * rng.uniform(-1, 1) * (high - low) / 2
    affine = rot * scale  # local -> pixel: p = affine @ q + centre

    for layer in layers:
        polys = [q @ affine.T + centre for q in layer.polygons]
        _paint(canvas, owner, polys, layer.color, layer, affine, centre, layer.part)

    if rng.random() < cfg.occlusion_prob:  # a rock or leaf in front of the creature
        cx, cy = centre + rng.normal(0, 0.5, 2) * (hi - lo) / 2
        r = rng.uniform(0.07, 0.13) * size
        poly = _ellipse(cx, cy, r, r * rng.uniform(0.5, 0.9), rng.uniform(0, np.pi), n=14)
        color = np.array([(60, 110, 45), (110, 110, 105), (95, 70, 45)][rng.integers(3)], np.float32)
        _paint(canvas, owner, poly, color, part=-1)

    canvas *= rng.uniform(1 - cfg.lighting_jitter, 1 + cfg.lighting_jitter)
    if cfg.noise > 0:
        canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * np.float32(cfg.noise)
    return np.clip(canvas, 0, 255).astype(np.uint8), owner


def _paint(canvas: np.ndarray, owner: np.ndarray | None, polys: np.ndarray | list[np.ndarray],
           color: np.ndarray, layer: _Layer | None = None, affine: np.ndarray | None = None,
           centre: np.ndarray | None = None, part: int = -1) -> None:
    """Fill polygons (pixel coordinates) with a colour and the layer's texture; update the owner map.

    Rasterises only the polygons' bounding box with PIL and textures it in creature-local coordinates,
    so stripes and spots follow the creature's pose.
    """
    polys = [polys] if isinstance(polys, np.ndarray) else polys
    size = canvas.shape[0]
    pts = np.vstack(polys)
    x0, y0 = np.maximum(np.floor(pts.min(axis=0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(pts.max(axis=0)).astype(int) + 1, size)
    if x1 <= x0 or y1 <= y0:
        return
    im = Image.new("L", (int(x1 - x0), int(y1 - y0)), 0)
    draw = ImageDraw.Draw(im)
    for p in polys:
        draw.polygon([(float(x - x0), float(y - y0)) for x, y in p], fill=255)
    mask = np.asarray(im) > 0
    if not mask.any():
        return
    tex = np.broadcast_to(color.astype(np.float32), mask.shape + (3,))
    if layer is not None and (layer.pattern != "solid" or layer.dots):
        yy, xx = _grid(size)
        pix = np.stack([xx[y0:y1, x0:x1], yy[y0:y1, x0:x1]], axis=-1) - centre
        local = pix @ np.linalg.inv(affine).T  # pixel -> creature-local units
        u, w = local[..., 0], local[..., 1]
        mark = np.zeros(mask.shape, dtype=bool)
        if layer.pattern == "striped":
            ca, sa = np.cos(layer.pattern_angle), np.sin(layer.pattern_angle)
            mark |= np.sin(2 * np.pi * (u * ca + w * sa) / 0.075) > 0.1
        elif layer.pattern == "spotted":
            p = 0.085
            du, dw = (u / p) % 1.0 - 0.5, ((w / p) + 0.5 * np.floor(u / p)) % 1.0 - 0.5  # staggered lattice
            mark |= du**2 + dw**2 < 0.3**2
        luminance = float(color @ np.array([0.299, 0.587, 0.114], np.float32))
        contrast = color * 0.3 if luminance > 80 else color + (255 - color) * 0.6
        tex = np.where(mark[..., None], contrast.astype(np.float32), tex)
        for dx, dy, dr in layer.dots:
            tex = np.where(((u - dx) ** 2 + (w - dy) ** 2 < dr**2)[..., None], np.float32(15), tex)
    region = canvas[y0:y1, x0:x1]
    region[mask] = tex[mask]
    if owner is not None:
        owner[y0:y1, x0:x1][mask] = part
