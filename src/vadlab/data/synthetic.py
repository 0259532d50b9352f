"""The embedded default dataset: textures from real photographs and drawn objects, with exact defect masks.

Why: the machines this project runs on cannot download MVTec AD, yet every method,
test and chapter needs images with pixel-level ground truth. ``generate`` writes a
small dataset in the MVTec AD folder layout, deterministically from a seed:

* texture categories (``brick``, ``grass``, ``gravel``) are random crops of the
  photographs that ship with scikit-image, with small rotation (+-6 degrees), flips
  and brightness/contrast jitter (kept small so a defect-free crop never looks odd);
* object categories (``screw``, ``washer``, ``chip``) are drawn with signed
  distance functions (antialiased), with pose and lighting variation (the screw
  lies roughly along one direction, +-11 degrees; its head slot turns freely);
* each category has five defect kinds. Most defects are clearly visible at 256 px,
  sized like MVTec AD's (blobs 12-50 px across, scratches and cracks 2.5-8 px wide
  and 40-100 px long); a quarter (``SUBTLE_FRACTION``) are drawn deliberately
  subtle (1-2 px lines, small or faint blobs, slight bends), which is what
  separates strong methods from weak ones. A defect's mask is
  exactly the set of pixels whose saved value differs from the defect-free render
  of the same sample (:func:`render_sample` returns both), so masks never miss a
  changed pixel and never include an unchanged one.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

TEXTURE_CATEGORIES: tuple[str, ...] = ("brick", "grass", "gravel")
OBJECT_CATEGORIES: tuple[str, ...] = ("screw", "washer", "chip")
SYNTH_CATEGORIES: tuple[str, ...] = TEXTURE_CATEGORIES + OBJECT_CATEGORIES

_TEXTURE_DEFECTS = ("scratch", "crack", "hole", "contamination", "stain")
DEFECT_KINDS: dict[str, tuple[str, ...]] = {
    "brick": _TEXTURE_DEFECTS,
    "grass": _TEXTURE_DEFECTS,
    "gravel": _TEXTURE_DEFECTS,
    "screw": ("scratch", "bent", "missing_part", "stain", "contamination"),
    "washer": ("scratch", "crack", "missing_part", "stain", "contamination"),
    "chip": ("scratch", "bent", "missing_part", "misplaced_part", "contamination"),
}
FORMAT_VERSION = 1

# Per-category RGB tint of the grayscale photographs (same for train and test).
_TINT = {
    "brick": (1.00, 0.78, 0.66),
    "grass": (0.72, 0.96, 0.52),
    "gravel": (0.96, 0.93, 0.86),
}
# Colours of foreign material pasted by the `contamination` defect.
_DIRT_COLOURS = (
    (0.38, 0.24, 0.12),  # brown dirt
    (0.92, 0.91, 0.86),  # white dust
    (0.12, 0.12, 0.12),  # black grease
    (0.22, 0.36, 0.72),  # blue fibre
    (0.88, 0.56, 0.16),  # orange
)
# Per-channel multipliers of the `stain` defect (discolouration).
_STAIN_COLOURS = (
    (1.10, 0.62, 0.36),  # rust
    (0.62, 0.64, 0.80),  # water mark
    (0.70, 0.85, 1.45),  # bluish
    (1.28, 1.12, 0.50),  # yellowish
)
# Share of defective images drawn deliberately subtle (thin, small or low contrast); the rest are
# clearly visible at 256 px, with sizes like MVTec AD (12-50 px blobs, 2-5 px wide scratches and cracks).
SUBTLE_FRACTION = 0.25
_SENSOR_NOISE = 1.2 / 255.0
_TEXTURE_LINE_WIDEN = 1.4  # visible scratches/cracks on textures: 3.5-8 px instead of 2.5-6 px
_MIN_STEP = 3  # levels: the least change a pixel inside a defect region gets


# ----------------------------------------------------------------------------- small helpers


def _rng(seed: int, category: str, split_key: str, index: int) -> np.random.Generator:
    """A generator seeded by (seed, category, split, index) only, so files are independent of order."""
    words = [int(seed) & 0xFFFFFFFF, zlib.crc32(category.encode()), zlib.crc32(split_key.encode()), int(index)]
    return np.random.default_rng(np.random.SeedSequence(words))


def _quantize(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] (x right, y down), float32 [size, size] each."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(t, t, indexing="ij")
    y.setflags(write=False)
    x.setflags(write=False)
    return x, y


@lru_cache(maxsize=8)
def _photo(name: str) -> Image.Image:
    """A grayscale scikit-image photograph (512x512) as a PIL 'L' image."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.ndim == 3:
        arr = (arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), mode="L")


def _lowfreq(rng: np.random.Generator, size: int, cells: int = 8) -> np.ndarray:
    """Smooth noise in [-1, 1] (bicubic upsampling of a coarse random grid)."""
    coarse = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    up = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    return np.clip(np.asarray(up, dtype=np.float32), -1.0, 1.0)


def _coverage(sd: np.ndarray, px: float) -> np.ndarray:
    """Antialiased coverage of the shape whose signed distance is ``sd`` (``px`` = one pixel in sd units)."""
    return np.clip(0.5 - sd / px, 0.0, 1.0)


def _sd_box(u: np.ndarray, v: np.ndarray, hx: float, hy: float) -> np.ndarray:
    qx, qy = np.abs(u) - hx, np.abs(v) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def _to_frame(x: np.ndarray, y: np.ndarray, cx: float, cy: float, theta: float, scale: float):
    """Image coordinates -> object frame (rotated by ``theta``, scaled by ``scale``, centred at c)."""
    dx, dy = x - cx, y - cy
    c, s = np.cos(theta), np.sin(theta)
    return (c * dx + s * dy) / scale, (-s * dx + c * dy) / scale


def _lighting(rng: np.random.Generator, size: int, strength: float = 0.12) -> np.ndarray:
    """Multiplicative illumination: global brightness times a random linear gradient."""
    x, y = _grid(size)
    bright = rng.uniform(0.93, 1.06)
    gx, gy = rng.uniform(-strength, strength, 2)
    return (bright * (1.0 + gx * (x - 0.5) + gy * (y - 0.5))).astype(np.float32)


# ----------------------------------------------------------------------------- textures


def _texture_clean(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random crop (position, rotation, flips, brightness/contrast) of the category's photograph."""
    photo = _photo(category)
    big = photo.width
    w = rng.uniform(0.40, 0.48) * big
    ang = np.deg2rad(rng.uniform(-6.0, 6.0))
    reach = 0.5 * w * (abs(np.cos(ang)) + abs(np.sin(ang))) + 2
    cx, cy = rng.uniform(reach, big - reach, 2)
    out = int(round(w))
    k = w / out
    a, b, d, e = k * np.cos(ang), -k * np.sin(ang), k * np.sin(ang), k * np.cos(ang)
    c = cx - (a + b) * out / 2
    f = cy - (d + e) * out / 2
    crop = photo.transform((out, out), Image.AFFINE, (a, b, c, d, e, f), resample=Image.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_TOP_BOTTOM)
    crop = crop.resize((size, size), Image.LANCZOS)
    g = np.asarray(crop, dtype=np.float32) / 255.0
    mean = float(g.mean())
    g = (g - mean) * rng.uniform(0.92, 1.08) + mean * rng.uniform(0.95, 1.05)
    g = g * _lighting(rng, size, strength=0.05)
    rgb = g[..., None] * np.asarray(_TINT[category], np.float32)
    return np.clip(rgb, 0.0, 1.0)


# ----------------------------------------------------------------------------- objects


@dataclass
class _Obj:
    """Pose and part parameters of one drawn object; defects edit a copy and re-render."""

    cx: float
    cy: float
    theta: float
    scale: float
    light: float  # light direction (radians) used for highlights
    extra: dict = field(default_factory=dict)


def _render_screw(p: _Obj, size: int, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(size)
    u, v = _to_frame(x, y, p.cx, p.cy, p.theta, p.scale)
    px = 1.0 / (size * p.scale)
    bend = p.extra.get("bend", 0.0)
    vb = v - bend * np.clip((u - 0.05) / 0.27, 0, None) ** 2 if bend else v
    u_end = p.extra.get("u_end", 0.33)
    if u_end < 0.33:  # broken tip: a jagged flat end
        u_end = u_end + 0.004 * np.sin(vb * 260.0 + p.extra.get("jag", 0.0))
    hw = 0.034 * np.clip((0.33 - u) / 0.10, 0, 1)
    sd_shaft = np.maximum(np.abs(vb) - hw, np.maximum(-0.17 - u, u - u_end))
    a_shaft = _coverage(sd_shaft, px)
    lx, ly = np.cos(p.light - p.theta), np.sin(p.light - p.theta)
    t = np.clip(vb / np.maximum(hw, 1e-3), -1, 1)
    shade = 0.45 + 0.5 * np.sqrt(1 - t * t) + 0.35 * np.exp(-(((t - 0.45 * ly) / 0.25) ** 2))
    threads = np.where(u > -0.11, 1.0 - 0.30 * (0.5 + 0.5 * np.sin(2 * np.pi * (u + 0.3 * vb) / 0.021)), 1.0)
    steel = np.asarray((0.62, 0.63, 0.66), np.float32)
    img = bg * (1 - a_shaft[..., None]) + (shade * threads)[..., None] * steel * a_shaft[..., None]
    du, dv = u + 0.215, v
    rh = np.hypot(du, dv)
    a_head = _coverage(rh - 0.082, px)
    dome = 0.5 + 0.45 * np.sqrt(np.clip(1 - (rh / 0.082) ** 2, 0, 1))
    dome = dome + 0.35 * np.exp(-((du - 0.03 * lx) ** 2 + (dv - 0.03 * ly) ** 2) / 0.03**2)
    ha = p.extra["head_angle"]
    su, sv = np.cos(ha) * du + np.sin(ha) * dv, -np.sin(ha) * du + np.cos(ha) * dv
    slot = 1.0 - 0.65 * _coverage(_sd_box(su, sv, 0.062, 0.010), px)
    img = img * (1 - a_head[..., None]) + (dome * slot)[..., None] * steel * a_head[..., None]
    return img, np.maximum(a_shaft, a_head)


def _render_washer(p: _Obj, size: int, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(size)
    u, v = _to_frame(x, y, p.cx, p.cy, 0.0, p.scale)
    px = 1.0 / (size * p.scale)
    big, small = 0.235, 0.095
    d = np.hypot(u, v)
    sd = np.maximum(d - big, small - d)
    notch = p.extra.get("notch")
    if notch is not None:  # a bite taken out of the rim
        ang, rn = notch
        sd = np.maximum(sd, -(np.hypot(u - big * np.cos(ang), v - big * np.sin(ang)) - rn))
    a = _coverage(sd, px)
    t = np.clip((d - small) / (big - small), 0, 1)
    profile = 0.72 + 0.28 * np.sin(np.pi * t)
    aniso = 0.84 + 0.16 * np.cos(2 * (np.arctan2(v, u) - p.light))
    rings = 1 + 0.035 * np.sin(2 * np.pi * d / 0.009)
    brass = np.asarray((0.80, 0.66, 0.38), np.float32)
    img = bg * (1 - a[..., None]) + (profile * aniso * rings)[..., None] * brass * a[..., None]
    return img, a


_CHIP_HX, _CHIP_HY = 0.19, 0.125
_PIN_U = tuple(-0.15 + 0.06 * k for k in range(6))


def _render_chip(p: _Obj, size: int, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _grid(size)
    u, v = _to_frame(x, y, p.cx, p.cy, p.theta, p.scale)
    px = 1.0 / (size * p.scale)
    img = bg.copy()
    cover = np.zeros(u.shape, np.float32)
    missing = p.extra.get("missing", ())
    bent = p.extra.get("bent", {})
    silver = np.asarray((0.80, 0.80, 0.82), np.float32)
    c, s = np.cos(p.theta), np.sin(p.theta)
    reach = int(np.ceil(0.09 * p.scale * size)) + 2
    for side in (-1, 1):
        for k, pu in enumerate(_PIN_U):
            if (side, k) in missing:
                continue
            # evaluate the pin only in a window around its root (speed)
            ru, rv = pu, side * (_CHIP_HY + 0.03)
            rx = (p.cx + p.scale * (c * ru - s * rv)) * size
            ry = (p.cy + p.scale * (s * ru + c * rv)) * size
            win = (
                slice(max(int(ry) - reach, 0), min(int(ry) + reach, size)),
                slice(max(int(rx) - reach, 0), min(int(rx) + reach, size)),
            )
            lu, lv = u[win] - pu, (v[win] - side * _CHIP_HY) * side  # pin frame: lv grows outwards
            beta = bent.get((side, k), 0.0)
            if beta:
                cb, sb = np.cos(beta), np.sin(beta)
                lu, lv = cb * lu + sb * lv, -sb * lu + cb * lv
            sd = _sd_box(lu, lv - 0.0275, 0.012, 0.0375)
            a = _coverage(sd, px)
            shade = 0.65 + 0.35 * (1 - np.clip(lu / 0.012, -1, 1) ** 2) - 0.15 * np.clip(lv / 0.065, 0, 1)
            img[win] = img[win] * (1 - a[..., None]) + shade[..., None] * silver * a[..., None]
            cover[win] = np.maximum(cover[win], a)
    rr = 0.012
    a_body = _coverage(_sd_box(u, v, _CHIP_HX - rr, _CHIP_HY - rr) - rr, px)
    sheen = np.exp(-(((u * np.cos(p.light) + v * np.sin(p.light)) / 0.16) ** 2))
    body = (0.85 + 0.35 * sheen)[..., None] * np.asarray((0.12, 0.12, 0.14), np.float32)
    img = img * (1 - a_body[..., None]) + body * a_body[..., None]
    mu, mv = p.extra.get("marker", (-0.14, -0.07))
    a_mark = _coverage(np.hypot(u - mu, v - mv) - 0.017, px) * a_body
    img = img * (1 - a_mark[..., None]) + np.asarray((0.55, 0.55, 0.57), np.float32) * a_mark[..., None]
    return img, np.maximum(cover, a_body)


_RENDER: dict[str, Callable[[_Obj, int, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "screw": _render_screw,
    "washer": _render_washer,
    "chip": _render_chip,
}
_BACKGROUND = {
    "screw": (0.84, 0.84, 0.82),
    "washer": (0.24, 0.25, 0.27),
    "chip": (0.12, 0.38, 0.22),
}


def _object_pose(category: str, rng: np.random.Generator) -> _Obj:
    if category == "screw":
        return _Obj(
            *rng.uniform(0.46, 0.54, 2), theta=rng.uniform(-0.2, 0.2) - 0.6, scale=rng.uniform(0.96, 1.04),
            light=rng.uniform(-0.5, 0.5) - 2.2, extra={"head_angle": rng.uniform(0, np.pi)},
        )
    if category == "washer":
        return _Obj(*rng.uniform(0.43, 0.57, 2), theta=0.0, scale=rng.uniform(0.95, 1.05), light=rng.uniform(-0.6, 0.6) + 0.8)
    if category == "chip":
        return _Obj(
            *rng.uniform(0.45, 0.55, 2), theta=np.deg2rad(rng.uniform(-6, 6)), scale=1.2 * rng.uniform(0.96, 1.04),
            light=rng.uniform(-0.4, 0.4) + 0.7,
        )
    raise KeyError(category)


@dataclass
class _Scene:
    """Everything needed to re-render an object sample with edited parts."""

    category: str
    obj: _Obj
    bg: np.ndarray
    light: np.ndarray
    size: int

    def render(self, obj: _Obj | None = None) -> tuple[np.ndarray, np.ndarray]:
        img, alpha = _RENDER[self.category](obj or self.obj, self.size, self.bg)
        return np.clip(img * self.light[..., None], 0.0, 1.0), alpha


def _object_scene(category: str, rng: np.random.Generator, size: int) -> _Scene:
    obj = _object_pose(category, rng)
    base = np.asarray(_BACKGROUND[category], np.float32)
    bg = base * (1.0 + 0.05 * _lowfreq(rng, size)[..., None] + 0.03 * _lowfreq(rng, size, 32)[..., None])
    return _Scene(category, obj, bg.astype(np.float32), _lighting(rng, size), size)


# ----------------------------------------------------------------------------- defect shapes


def _pick_point(rng: np.random.Generator, support: np.ndarray | None, margin: float = 0.15) -> tuple[float, float]:
    """A random point (x, y) in [0, 1]: inside ``support`` (> 0.95) when given, else away from borders."""
    if support is not None:
        idx = np.flatnonzero(support.ravel() > 0.95)
        if idx.size:
            size = support.shape[0]
            i = int(idx[rng.integers(idx.size)])
            return ((i % size) + 0.5) / size, ((i // size) + 0.5) / size
    x, y = rng.uniform(margin, 1 - margin, 2)
    return float(x), float(y)


def _polyline_dist_px(size: int, pts: np.ndarray, margin_px: float) -> np.ndarray:
    """Distance in pixels from every pixel centre to a polyline (``pts`` in [0, 1] units)."""
    p = pts * size
    x0, y0 = np.floor(p.min(0) - margin_px).astype(int)
    x1, y1 = np.ceil(p.max(0) + margin_px).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    out = np.full((size, size), 1e9, np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    best = np.full(xx.shape, 1e9, np.float32)
    for a, b in zip(p[:-1], p[1:]):
        ab = b - a
        denom = float(ab @ ab) or 1e-9
        t = np.clip(((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / denom, 0, 1)
        best = np.minimum(best, np.hypot(xx - a[0] - t * ab[0], yy - a[1] - t * ab[1]))
    out[y0:y1, x0:x1] = best
    return out


def _blob_sd(rng: np.random.Generator, size: int, cx: float, cy: float, r0: float, amp: float) -> np.ndarray:
    """Signed distance (image units) of an irregular blob: a circle with random low harmonics."""
    x, y = _grid(size)
    dx, dy = x - cx, y - cy
    ang = np.arctan2(dy, dx)
    r = np.ones_like(ang)
    for k in (2, 3, 4, 5):
        r = r + rng.uniform(0, amp) / k * 2 * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    return np.hypot(dx, dy) - r0 * r


def _width_px(w256: float, size: int) -> float:
    return max(0.8, w256 * size / 256)


def _scratch(rng, img, size, support, subtle: bool, widen: float = 1.0, light_only: bool = False):
    """A slightly curved line, lighter or darker: 2-5 px and clear, or (subtle) 1-2 px and faint."""
    x0, y0 = _pick_point(rng, support)
    length = rng.uniform(0.12, 0.25) if subtle else rng.uniform(0.18, 0.40)
    ang = rng.uniform(0, 2 * np.pi)
    d = np.array([np.cos(ang), np.sin(ang)])
    n = np.array([-d[1], d[0]])
    bow = rng.uniform(-0.15, 0.15) * length
    t = np.linspace(-0.5, 0.5, 12)[:, None]
    pts = np.array([x0, y0]) + t * length * d + (1 - 4 * t**2) * bow * n
    w = _width_px(rng.uniform(1.0, 2.0) if subtle else widen * rng.uniform(2.5, 5.0), size)
    alpha = np.clip(w / 2 + 0.5 - _polyline_dist_px(size, pts, w + 2), 0, 1)
    if support is not None:
        alpha = alpha * support
    target = 1.0 if rng.random() < 0.6 or light_only else 0.0
    strength = rng.uniform(0.25, 0.40) if subtle else rng.uniform(0.55, 0.85)
    out = img + (alpha * strength)[..., None] * (target - img)
    return out, alpha > 0.2


def _crack(rng, img, size, support, subtle: bool, widen: float = 1.0):
    """A dark jagged random-walk line, sometimes with a branch: 3-6 px wide, or (subtle) 1-2 px and shallow."""
    x0, y0 = _pick_point(rng, support)

    def walk(start, heading, n):
        pts = [np.asarray(start, float)]
        for _ in range(n):
            heading += rng.normal(0, 0.45)
            step = rng.uniform(0.010, 0.018)
            pts.append(pts[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
        return np.array(pts), heading

    heading = rng.uniform(0, 2 * np.pi)
    main, _ = walk((x0, y0), heading, int(rng.integers(12, 20) if subtle else rng.integers(16, 30)))
    w = _width_px(rng.uniform(1.2, 2.0) if subtle else widen * rng.uniform(3.0, 6.0), size)
    dist = _polyline_dist_px(size, main, w + 2)
    if rng.random() < 0.5:
        br, _ = walk(main[len(main) // 2], heading + rng.choice([-1, 1]) * rng.uniform(0.6, 1.2), int(rng.integers(5, 11)))
        dist = np.minimum(dist, _polyline_dist_px(size, br, w + 2) + 0.25 * w)  # thinner branch
    alpha = np.clip(w / 2 + 0.5 - dist, 0, 1)
    if support is not None:
        alpha = alpha * support
    depth = rng.uniform(0.35, 0.50) if subtle else rng.uniform(0.80, 0.95)
    return img * (1 - alpha * depth)[..., None], alpha > 0.2


def _hole(rng, img, size, support, subtle: bool):
    """An irregular pit (15-40 px across): dark core and a frayed light rim; subtle ones are small and shallow."""
    x0, y0 = _pick_point(rng, support)
    r0 = rng.uniform(0.018, 0.026) if subtle else rng.uniform(0.03, 0.075)
    sd = _blob_sd(rng, size, x0, y0, r0, 0.15)
    alpha = _coverage(sd, 1.0 / size)
    x, y = _grid(size)
    rad = np.clip(np.hypot(x - x0, y - y0) / r0, 0, 1)
    if subtle:
        inside = img * (0.45 + 0.25 * rad)[..., None]
        return img * (1 - alpha[..., None]) + inside * alpha[..., None], alpha > 0.2
    inside = img * (0.08 + 0.20 * rad)[..., None] + 0.02
    out = img * (1 - alpha[..., None]) + inside * alpha[..., None]
    rim_w = rng.uniform(1.5, 3.0) / size  # torn edge, lighter than the surface around it
    rim = np.clip(1.0 - np.abs(sd) / rim_w, 0, 1) * (0.6 + 0.4 * _lowfreq(rng, size, 48) ** 2)
    out = out + (rim * rng.uniform(0.35, 0.6))[..., None] * (1.0 - out)
    return out, (alpha > 0.2) | (rim > 0.2)


def _contamination(rng, img, size, support, source: str, subtle: bool):
    """Foreign material: an irregular patch (20-50 px) cut from another photograph, recoloured."""
    x0, y0 = _pick_point(rng, support)
    r0 = rng.uniform(0.022, 0.035) if subtle else rng.uniform(0.04, 0.095)
    sd = _blob_sd(rng, size, x0, y0, r0, 0.25)
    alpha = _coverage(sd, 1.0 / size)
    if support is not None:
        alpha = alpha * support
    photo = _photo(source)
    side = int(rng.integers(96, 320))
    ox, oy = rng.integers(0, photo.width - side, 2)
    patch = photo.crop((int(ox), int(oy), int(ox) + side, int(oy) + side)).resize((size, size), Image.BILINEAR)
    g = np.asarray(patch, dtype=np.float32) / 255.0
    colour = np.asarray(_DIRT_COLOURS[int(rng.integers(len(_DIRT_COLOURS)))], np.float32)
    fill = np.clip(colour * (0.55 + 0.9 * g[..., None]), 0, 1)
    opacity = rng.uniform(0.30, 0.45) if subtle else rng.uniform(0.75, 1.0)
    a = alpha * opacity
    return img * (1 - a[..., None]) + fill * a[..., None], alpha > 0.2


def _stain(rng, img, size, support, subtle: bool):
    """A soft-edged discolouration (per-channel gain), 25-50 px; subtle ones are faint."""
    x0, y0 = _pick_point(rng, support)
    r0 = rng.uniform(0.04, 0.06) if subtle else rng.uniform(0.05, 0.10)
    sd = _blob_sd(rng, size, x0, y0, r0, 0.2)
    alpha = np.clip(-sd / (0.35 * r0), 0, 1) ** 0.7
    if support is not None:
        alpha = alpha * support
    gain = np.asarray(_STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))], np.float32)
    strength = rng.uniform(0.30, 0.45) if subtle else rng.uniform(0.9, 1.0)
    out = img * (1 + (alpha * strength)[..., None] * (gain - 1))
    return np.clip(out, 0, 1), alpha > 0.08


def _other_photo(category: str, rng: np.random.Generator) -> str:
    pool = [c for c in TEXTURE_CATEGORIES if c != category]
    return pool[int(rng.integers(len(pool)))]


def _object_defect(kind: str, rng: np.random.Generator, scene: _Scene, clean: np.ndarray, alpha: np.ndarray, subtle: bool):
    """Geometric defects re-render the object with edited parts; surface defects paint on it."""
    size, cat = scene.size, scene.category
    obj = replace(scene.obj, extra=dict(scene.obj.extra))
    support = np.clip((alpha - 0.5) * 2, 0, 1)
    if kind == "scratch":
        return _scratch(rng, clean, size, support, subtle)
    if kind == "crack":
        return _crack(rng, clean, size, support, subtle)
    if kind == "stain":
        return _stain(rng, clean, size, support, subtle)
    if kind == "contamination":
        return _contamination(rng, clean, size, support, _other_photo(cat, rng), subtle)
    if cat == "screw" and kind == "bent":
        obj.extra["bend"] = float(rng.choice([-1, 1]) * (rng.uniform(0.015, 0.025) if subtle else rng.uniform(0.045, 0.08)))
    elif cat == "screw" and kind == "missing_part":
        obj.extra["u_end"] = 0.33 - (rng.uniform(0.03, 0.05) if subtle else rng.uniform(0.06, 0.13))
        obj.extra["jag"] = rng.uniform(0, 2 * np.pi)
    elif cat == "washer" and kind == "missing_part":
        obj.extra["notch"] = (rng.uniform(-np.pi, np.pi), rng.uniform(0.015, 0.022) if subtle else rng.uniform(0.03, 0.06))
    elif cat == "chip" and kind == "missing_part":
        obj.extra["missing"] = ((int(rng.choice([-1, 1])), int(rng.integers(6))),)
    elif cat == "chip" and kind == "bent":
        beta = rng.uniform(0.15, 0.3) if subtle else rng.uniform(0.4, 0.8)
        obj.extra["bent"] = {(int(rng.choice([-1, 1])), int(rng.integers(6))): float(rng.choice([-1, 1]) * beta)}
    elif cat == "chip" and kind == "misplaced_part":  # orientation mark in the wrong corner
        obj.extra["marker"] = [(0.14, 0.07), (0.14, -0.07), (-0.14, 0.07)][int(rng.integers(3))]
    else:
        raise ValueError(f"defect kind {kind!r} is not defined for category {cat!r}")
    defective, _ = scene.render(obj)
    return defective, np.abs(defective - clean).max(-1) > 0.5 / 255


def _apply_texture_defect(kind: str, rng, category: str, clean: np.ndarray, size: int, subtle: bool):
    # Textures are full of thin dark gaps, so their visible lines are drawn wider and a scratch is
    # always lighter (fresh material); a dark line on a texture is the `crack` kind.
    if kind == "scratch":
        return _scratch(rng, clean, size, None, subtle, widen=_TEXTURE_LINE_WIDEN, light_only=True)
    if kind == "crack":
        return _crack(rng, clean, size, None, subtle, widen=_TEXTURE_LINE_WIDEN)
    if kind == "hole":
        return _hole(rng, clean, size, None, subtle)
    if kind == "contamination":
        return _contamination(rng, clean, size, None, _other_photo(category, rng), subtle)
    if kind == "stain":
        return _stain(rng, clean, size, None, subtle)
    raise ValueError(f"defect kind {kind!r} is not defined for category {category!r}")


def _finalise(clean: np.ndarray, defective: np.ndarray, region: np.ndarray, noise: np.ndarray):
    """Quantise both images with the same sensor noise; give every region pixel a visible change.

    Returns (clean_u8, defective_u8, mask) where mask == (defective_u8 != clean_u8).any(-1).
    """
    cq = _quantize(clean + noise)
    dq = _quantize(defective + noise)
    same = region & (cq == dq).all(-1)
    if same.any():
        sign = np.sign((defective - clean).sum(-1))
        sign[sign == 0] = 1
        val = dq.astype(np.int16)
        up = val + (_MIN_STEP * sign)[..., None].astype(np.int16)
        down = val - (_MIN_STEP * sign)[..., None].astype(np.int16)
        bad = ((up < 0) | (up > 255)).any(-1, keepdims=True)
        nudged = np.clip(np.where(bad, down, up), 0, 255).astype(np.uint8)
        dq = np.where(same[..., None], nudged, dq)
    mask = (cq != dq).any(-1)
    return cq, dq, mask


# ----------------------------------------------------------------------------- public API


def render_sample(
    category: str,
    defect: str | None = None,
    *,
    seed: int = 0,
    split: str = "test",
    index: int = 0,
    size: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one sample: (clean uint8 [S,S,3], defective uint8 [S,S,3], mask bool [S,S]).

    ``defect=None`` gives a normal image (defective == clean, empty mask). The mask is
    exactly the set of pixels where ``defective`` differs from ``clean``. The same
    arguments always give the same arrays; ``generate`` writes these arrays.
    """
    if category not in SYNTH_CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}; choose from {', '.join(SYNTH_CATEGORIES)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if defect is not None and defect not in DEFECT_KINDS[category]:
        raise ValueError(
            f"defect {defect!r} is not defined for {category!r}; choose from {', '.join(DEFECT_KINDS[category])}"
        )
    if split == "train" and defect is not None:
        raise ValueError("the train split holds defect-free images only: use defect=None")
    key = "train" if split == "train" else f"test/{defect or 'good'}"
    for attempt in range(20):  # redraw in the rare case a defect left (almost) no trace
        rng = _rng(seed, category, key, index * 1000 + attempt)
        if category in TEXTURE_CATEGORIES:
            clean = _texture_clean(category, rng, size)
            scene = alpha = None
        else:
            scene = _object_scene(category, rng, size)
            clean, alpha = scene.render()
        noise = rng.normal(0, _SENSOR_NOISE, clean.shape).astype(np.float32)
        if defect is None:
            q = _quantize(clean + noise)
            return q, q.copy(), np.zeros(q.shape[:2], bool)
        subtle = bool(rng.random() < SUBTLE_FRACTION)  # drawn after the clean image: normals are unaffected
        if scene is None:
            defective, region = _apply_texture_defect(defect, rng, category, clean, size, subtle)
        else:
            defective, region = _object_defect(defect, rng, scene, clean, alpha, subtle)
        cq, dq, mask = _finalise(clean, defective, region, noise)
        if mask.sum() >= max(4, size * size // 20000):
            return cq, dq, mask
    raise RuntimeError(f"could not draw a visible {defect!r} defect for {category!r} at size {size}")


def _save_png(arr: np.ndarray, path: Path) -> None:
    """Write a PNG with fixed options and no metadata, so equal arrays give equal bytes."""
    Image.fromarray(arr).save(path, format="PNG", compress_level=1, optimize=False)


def _config(seed: int, categories: Sequence[str], n_train: int, n_test: int, size: int) -> dict:
    n_good = n_test // 2
    cats = {}
    for c in categories:
        kinds = DEFECT_KINDS[c]
        counts = {"train/good": n_train, "test/good": n_good}
        for j in range(n_test - n_good):
            key = f"test/{kinds[j % len(kinds)]}"
            counts[key] = counts.get(key, 0) + 1
        cats[c] = {
            "type": "texture" if c in TEXTURE_CATEGORIES else "object",
            "defects": list(kinds),
            "counts": counts,
        }
    return {
        "name": "vadlab-synthetic",
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "image_size": int(size),
        "n_train": int(n_train),
        "n_test": int(n_test),
        "categories": cats,
        "sources": "textures: photographs shipped with scikit-image (skimage.data); objects: drawn procedurally",
        "layout": "MVTec AD: <category>/train/good, <category>/test/<defect>, <category>/ground_truth/<defect>/<stem>_mask.png",
    }


#: file in each category folder that ``generate`` writes; ``overwrite=True`` deletes only folders holding it
SYNTH_MARKER = ".vadlab-synth"


def generate(
    out_dir: str | os.PathLike,
    seed: int = 0,
    categories: Sequence[str] | None = None,
    n_train: int = 200,
    n_test: int = 80,
    size: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic dataset in MVTec AD layout under ``out_dir`` and return its path.

    Half of the ``n_test`` test images are normal; the rest cycle through the
    category's defect kinds. A ``dataset.json`` describing the content is written
    last; calling again with the same arguments finds it and returns at once.
    Existing category folders are only replaced when ``overwrite=True``.
    """
    out = Path(out_dir)
    cats = list(categories) if categories is not None else list(SYNTH_CATEGORIES)
    unknown = [c for c in cats if c not in SYNTH_CATEGORIES]
    if unknown:
        raise ValueError(f"unknown synthetic categories {unknown}; choose from {', '.join(SYNTH_CATEGORIES)}")
    if n_train < 1 or n_test < 0 or size < 16:
        raise ValueError(f"need n_train >= 1, n_test >= 0 and size >= 16; got {n_train}, {n_test}, {size}")
    config = _config(seed, cats, n_train, n_test, size)
    meta = out / "dataset.json"
    existing = None
    if meta.is_file():
        try:
            existing = json.loads(meta.read_text())
        except (OSError, ValueError):
            existing = None
        if existing == config and not overwrite:
            return out
    clash = [c for c in cats if (out / c).exists()]
    if clash and not overwrite:
        raise FileExistsError(
            f"{out} already holds {', '.join(clash)} made with other settings (or unfinished); "
            "pass overwrite=True to replace them, or choose another folder"
        )
    listed = set(existing.get("categories", [])) if meta.is_file() and isinstance(existing, dict) else set()
    foreign = [c for c in clash if not (out / c / SYNTH_MARKER).is_file() and c not in listed]
    if foreign:
        raise FileExistsError(
            f"{', '.join(str(out / c) for c in foreign)} exists but was not written by `vadlab data synth` "
            f"(no {SYNTH_MARKER} file): not deleting it; move it away or choose another --out"
        )
    for c in clash:
        shutil.rmtree(out / c)
    if meta.exists():
        meta.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for c in cats:  # marks the folders this function made: the only ones overwrite=True deletes
        (out / c).mkdir()
        (out / c / SYNTH_MARKER).write_text("written by vadlab data synth; `--overwrite` may delete this folder\n")

    jobs: list[tuple[str, str, str | None, int, str]] = []
    for c in cats:
        width = max(3, len(str(max(n_train, n_test) - 1)))
        jobs += [(c, "train", None, i, f"{i:0{width}d}") for i in range(n_train)]
        n_good = n_test // 2
        jobs += [(c, "test", None, i, f"{i:0{width}d}") for i in range(n_good)]
        per_kind: dict[str, int] = {}
        for j in range(n_test - n_good):
            kind = DEFECT_KINDS[c][j % len(DEFECT_KINDS[c])]
            k = per_kind.get(kind, 0)
            per_kind[kind] = k + 1
            jobs.append((c, "test", kind, k, f"{k:0{width}d}"))
    for c, split, kind, idx, stem in tqdm(jobs, desc="synthetic dataset", leave=False):
        _, img, mask = render_sample(c, kind, seed=seed, split=split, index=idx, size=size)
        folder = out / c / split / (kind or "good")
        folder.mkdir(parents=True, exist_ok=True)
        _save_png(img, folder / f"{stem}.png")
        if kind is not None:
            gt = out / c / "ground_truth" / kind
            gt.mkdir(parents=True, exist_ok=True)
            _save_png(mask.astype(np.uint8) * 255, gt / f"{stem}_mask.png")
    meta.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
