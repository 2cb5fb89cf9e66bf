"""Writing images: PNG grids and per-image PNGs from uint8 batches, atomically."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen.utils.ckpt import atomic_write


def to_hwc_numpy(images: torch.Tensor) -> np.ndarray:
    """uint8 (N, C, H, W) -> uint8 (N, H, W, C) with C in {1, 3}."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _pil(image_hwc: np.ndarray) -> Image.Image:
    return Image.fromarray(image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc)


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile uint8 (N, C, H, W) images into one uint8 (H', W', C) array, ``nrow`` images per row."""
    n, c, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    arr = to_hwc_numpy(images)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = arr[i]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> Path:
    """Save a PNG grid of uint8 (N, C, H, W) images, upscaled by an integer ``scale`` (nearest)."""
    img = _pil(make_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Save one uint8 (C, H, W) image as PNG, atomically."""
    img = _pil(to_hwc_numpy(image[None])[0])
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def load_png(path: str | os.PathLike) -> torch.Tensor:
    """Read a PNG written by :func:`save_png` back to uint8 (C, H, W)."""
    arr = np.asarray(Image.open(path))
    if arr.ndim == 2:
        arr = arr[..., None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)
