"""Pixel conversions and batch augmentation shared by the data pipeline.

Images travel as uint8 tensors (B, C, H, W) until the model boundary, where they become floats in
[-1, 1]. Keeping uint8 until the last moment halves host memory and makes exact round trips possible.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels to model inputs.

    Args:
        images: uint8 (B, C, H, W) (any shape works) in [0, 255].

    Returns:
        float32 tensor of the same shape in [-1, 1]: x = u / 127.5 - 1.
    """
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_input expects uint8 pixels, got {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Map model-space images back to pixels: round(127.5 * (x + 1)) clamped to [0, 255].

    Rounding to nearest (not truncation) makes ``to_uint8(to_model_input(u)) == u`` exact.

    Args:
        x: float tensor (B, C, H, W) nominally in [-1, 1]; values outside are clamped.

    Returns:
        uint8 tensor of the same shape.
    """
    return (127.5 * (x.to(torch.float32) + 1.0)).round().clamp(0, 255).to(torch.uint8)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each sample left-right with probability p, decided per sample from ``generator``.

    The decisions are drawn on the generator's device and moved to x's, so the same generator state
    gives the same flips whatever device the batch lives on.

    Args:
        x: (B, C, H, W) tensor of any dtype.
        generator: source of the B coin flips (B uniform draws are consumed).
        p: flip probability.

    Returns:
        (B, C, H, W) tensor with the flipped samples mirrored along W.
    """
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < p
    flip = flip.to(x.device).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(flip, x.flip(-1), x)


def pad_or_resize(images: torch.Tensor, resolution: int, mode: str = "pad") -> torch.Tensor:
    """Bring square uint8 images (N, C, S, S) to (N, C, resolution, resolution).

    Args:
        images: uint8 (N, C, S, S).
        resolution: target side.
        mode: "pad" centres the image on a zero canvas (needs resolution >= S; an odd surplus puts the
            extra row/column at the bottom/right); "resize" resamples with antialiased bilinear
            interpolation.

    Returns:
        uint8 (N, C, resolution, resolution).
    """
    size = images.shape[-1]
    if mode == "pad":
        if resolution < size:
            raise ValueError(f"cannot pad {size}x{size} images to a smaller resolution {resolution}; use mode='resize'")
        lo = (resolution - size) // 2
        out = images.new_zeros((*images.shape[:-2], resolution, resolution))
        out[..., lo : lo + size, lo : lo + size] = images
        return out
    if mode == "resize":
        if resolution == size:
            return images.clone()
        x = torch.nn.functional.interpolate(
            images.to(torch.float32), size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
        return x.round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"mode must be 'pad' or 'resize', got {mode!r}")


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """ADM-style centre crop: box-downsample by 2 while possible, bicubic-resize, then centre-crop.

    The short side is halved with a box filter while it stays at least ``2 * resolution`` (cheap and
    alias-free), then a bicubic resize brings the short side to exactly ``resolution``, and the centre
    ``resolution x resolution`` square is kept. This matches the preprocessing of ADM/DiT reference
    statistics, so FID against those statistics is comparable.

    Args:
        image: a PIL image of any size and mode.
        resolution: side of the square output.

    Returns:
        PIL image of size (resolution, resolution), same mode as the input.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return Image.fromarray(arr[top : top + resolution, left : left + resolution])
