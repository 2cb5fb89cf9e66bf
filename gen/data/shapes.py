"""Procedural RGB images of coloured shapes on textured backgrounds; the class is the shape.

Image i is a pure function of (seed, i): its parameters come from a generator seeded by
``derive_seed("shapes", seed, i)``, then a batch is rendered at once with tensor ops. Shapes are
drawn at 2x and box-filtered for anti-aliased edges. Backgrounds are a two-colour gradient, stripes
or smooth noise, with the shape on the opposite side of the brightness range so it always stands out.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from gen.data.base import TensorImageDataset
from gen.utils.seed import derive_seed

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "bar")
DEFAULT_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")

_NOISE_GRID = 4  # side of the coarse noise grid upsampled into "noise" backgrounds
_NPARAM = 20


def _shape_mask(name: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-test in shape-local coordinates (unit half-size). u, v: (B, S, S) -> bool (B, S, S)."""
    au, av = u.abs(), v.abs()
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return torch.maximum(au, av) <= 0.8
    if name == "triangle":  # apex up (v = -1), base at v = 0.75
        return (v <= 0.75) & (1.8 * au <= v + 1.0)
    if name == "cross":
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "diamond":
        return au + av <= 1.0
    if name == "star":  # five points: radius limit oscillates with the polar angle
        ang = torch.atan2(v, u)
        return torch.sqrt(u * u + v * v) <= 0.45 + 0.55 * torch.cos(2.5 * (ang + math.pi / 2)).abs() ** 3
    if name == "bar":  # a long horizontal bar
        return (au <= 1.0) & (av <= 0.3)
    raise ValueError(f"unknown shape {name!r}; choose from {SHAPES}")


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B,) hue/saturation/value in [0, 1] -> (B, 3) RGB in [0, 1]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    f = (torch.minimum(k, 4 - k)).clamp(0, 1)
    return v[:, None] * (1 - s[:, None] * f)


def _draw_params(seed: int, indices: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # One small generator per image keeps image i independent of count, chunking and its neighbours.
    params = np.empty((len(indices), _NPARAM), dtype=np.float64)
    grids = np.empty((len(indices), _NOISE_GRID * _NOISE_GRID), dtype=np.float64)
    pixel = np.empty((len(indices), 3, resolution, resolution), dtype=np.float32)
    for k, i in enumerate(indices):
        rng = np.random.Generator(np.random.PCG64(derive_seed("shapes", seed, int(i))))
        params[k] = rng.random(_NPARAM)
        grids[k] = rng.random(_NOISE_GRID * _NOISE_GRID)
        pixel[k] = rng.standard_normal((3, resolution, resolution), dtype=np.float32)
    return params, grids, pixel


def _render(
    labels: torch.Tensor, params: torch.Tensor, grids: torch.Tensor, pixel: torch.Tensor, classes: Sequence[str], res: int
) -> torch.Tensor:
    """Render a batch. labels (B,), params (B, P), grids (B, G*G), pixel noise (B, 3, res, res) -> uint8 (B, 3, res, res)."""
    b = labels.shape[0]
    p = params.to(torch.float32).T  # (P, B): one row per parameter
    polarity = p[0] < 0.5  # True: light shape on a dark background

    # Background: two low-saturation colours blended by a texture field t in [0, 1].
    bg_val = torch.where(polarity, 0.05 + 0.35 * p[1], 0.6 + 0.35 * p[1])
    c1 = _hsv_to_rgb(p[2], 0.5 * p[3], bg_val)
    c2 = _hsv_to_rgb(p[4], 0.5 * p[5], (bg_val + torch.where(polarity, 0.15, -0.15) * p[6]).clamp(0, 1))
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / res * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # (res, res)
    phi = p[7] * 2 * math.pi
    proj = xx * torch.cos(phi)[:, None, None] + yy * torch.sin(phi)[:, None, None]  # (B, res, res)
    gradient = (proj + 1.5) / 3.0
    freq = 1.5 + 3.0 * p[8]
    stripes = 0.5 + 0.5 * torch.sin(math.pi * freq[:, None, None] * proj + 2 * math.pi * p[9][:, None, None])
    noise = torch.nn.functional.interpolate(
        grids.to(torch.float32).view(b, 1, _NOISE_GRID, _NOISE_GRID), size=(res, res), mode="bicubic", align_corners=False
    )[:, 0].clamp(0, 1)
    kind = (p[10] * 3).long().clamp(max=2)[:, None, None]
    t = torch.where(kind == 0, gradient, torch.where(kind == 1, stripes, noise))[:, None]  # (B, 1, res, res)
    image = c1[:, :, None, None] * (1 - t) + c2[:, :, None, None] * t

    # Shape: saturated colour, placed, scaled and slightly rotated (never enough to turn a square
    # into a diamond), rendered at 2x and box-filtered to a coverage map.
    sv = torch.where(polarity, 0.8 + 0.2 * p[11], 0.15 + 0.2 * p[11])
    colour = _hsv_to_rgb(p[12], 0.6 + 0.4 * p[13], sv)
    cx, cy = (p[14] - 0.5) * 0.5, (p[15] - 0.5) * 0.5
    size = 0.45 + 0.25 * p[16]
    theta = (p[17] - 0.5) * 0.5
    fine = (torch.arange(2 * res, dtype=torch.float32) + 0.5) / (2 * res) * 2 - 1
    fy, fx = torch.meshgrid(fine, fine, indexing="ij")
    dx, dy = fx - cx[:, None, None], fy - cy[:, None, None]
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    u = (dx * cos + dy * sin) / size[:, None, None]
    v = (-dx * sin + dy * cos) / size[:, None, None]
    inside = torch.zeros(b, 2 * res, 2 * res, dtype=torch.bool)
    for k, name in enumerate(classes):
        sel = labels == k
        if bool(sel.any()):
            inside[sel] = _shape_mask(name, u[sel], v[sel])
    alpha = torch.nn.functional.avg_pool2d(inside[:, None].to(torch.float32), 2)  # (B, 1, res, res)
    image = image * (1 - alpha) + colour[:, :, None, None] * alpha
    image = image + 0.02 * pixel
    return (image * 255).round().clamp(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=4)
def _generate(seed: int, start: int, count: int, classes: tuple[str, ...], resolution: int) -> tuple[np.ndarray, np.ndarray]:
    indices = np.arange(start, start + count, dtype=np.int64)
    labels = indices % len(classes)
    images = np.empty((count, 3, resolution, resolution), dtype=np.uint8)
    chunk = 512  # bounds the 2x-resolution intermediates
    for lo in range(0, count, chunk):
        sl = slice(lo, min(lo + chunk, count))
        params, grids, pixel = _draw_params(seed, indices[sl], resolution)
        images[sl] = _render(
            torch.from_numpy(labels[sl]), torch.from_numpy(params), torch.from_numpy(grids),
            torch.from_numpy(pixel), classes, resolution,
        ).numpy()
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


class Shapes(TensorImageDataset):
    """Coloured shapes on textured backgrounds, 3 channels; class = shape (label = index mod #classes).

    Image i is a pure function of (seed, start + i, classes, resolution), so a held-out set is just
    another index range of the same seed, e.g. ``Shapes(count=500, start=5000)``.

    Args:
        count: number of images.
        seed: generation seed.
        start: index of the first image in the seed's stream.
        classes: shape names, in label order, from ``SHAPES``.
        resolution: image side.
    """

    def __init__(
        self,
        count: int = 5000,
        seed: int = 0,
        start: int = 0,
        classes: Sequence[str] = DEFAULT_CLASSES,
        resolution: int = 32,
    ) -> None:
        classes = tuple(str(c) for c in classes)
        unknown = [c for c in classes if c not in SHAPES]
        if unknown or not classes or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be distinct names from {SHAPES}, got {classes}")
        if count <= 0 or start < 0 or resolution < 4:
            raise ValueError(f"need count > 0, start >= 0, resolution >= 4; got {count}, {start}, {resolution}")
        images, labels = _generate(int(seed), int(start), int(count), classes, int(resolution))
        super().__init__(
            torch.from_numpy(images.copy()), torch.from_numpy(labels.copy()),
            num_classes=len(classes), name="shapes", classes=classes,
        )
        self.seed = int(seed)
        self.start = int(start)
