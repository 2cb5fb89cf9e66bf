"""Fixed 2D sin-cos position embedding (MAE, He et al. 2022; used by DiT and LightningDiT)."""

from __future__ import annotations

import torch
from torch import Tensor


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """``[sin(pos ω_i), cos(pos ω_i)]`` with ``ω_i = 10000^(-i / (dim/2))``: (M,) -> (M, dim), float64."""
    if dim % 2:
        raise ValueError(f"sincos embedding needs an even size, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    ang = pos.double().reshape(-1)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([ang.sin(), ang.cos()], -1)


def sincos_2d(dim: int, height: int, width: int | None = None) -> Tensor:
    """2D table for a row-major token grid: (height·width, dim), fp32.

    Channels [0, dim/2) encode the column index and [dim/2, dim) the row index (MAE's meshgrid puts
    the w coordinate first), each with dim/4 frequencies as in :func:`sincos_1d`.
    """
    width = height if width is None else width
    if dim % 4:
        raise ValueError(f"2D sincos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")  # (H, W) each
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], -1).float()  # (H·W, dim)
