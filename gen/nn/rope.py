"""2D rotary position embeddings (RoPE; Su et al. 2021, "RoFormer") for image tokens.

Both variants produce a table ``(cos, sin)`` of shape (N, d_h) and share :func:`apply_rope`, which
rotates consecutive channel pairs ``(x[2i], x[2i+1])`` by an angle ``phi_i``:
``x * cos + rotate_pairs(x) * sin`` with ``rotate_pairs((a, b)) = (-b, a)``, i.e. the complex product
``(a + ib) * exp(i phi)``. Each angle is therefore written twice in the table (interleaved pairs).

- :func:`rope_2d_axial` (LightningDiT, EVA-02 ``VisionRotaryEmbeddingFast`` layout): the first d_h/2
  channels rotate with the row index, the last d_h/2 with the column index; per half, d_h/4
  frequencies ``theta^(-2k/(d_h/2))``; positions are integer grid indices.
- :func:`rope_2d_mixed` (DDT): d_h/4 frequencies ``theta^(-4k/d_h)`` shared by both axes; complex pair
  2k rotates with the column coordinate, pair 2k+1 with the row coordinate; coordinates are
  ``linspace(0, 16, W)`` and ``linspace(0, 16, H)`` so every resolution spans [0, 16].
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_head_dim(head_dim: int) -> None:
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}; change width/heads")


def rope_2d_axial(head_dim: int, height: int, width: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """LightningDiT's 2D RoPE table (rows on the first half of the head, columns on the second).

    Args:
        head_dim: d_h, divisible by 4.
        height, width: token grid; token n = r * width + c (row-major, as patch embedding flattens).
        theta: frequency base.

    Returns:
        (cos, sin), each (height * width, head_dim), fp32.
    """
    _check_head_dim(head_dim)
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, dtype=torch.float64) / half)  # (d_h/4,)
    rows = torch.arange(height, dtype=torch.float64)[:, None] * freqs  # (H, d_h/4)
    cols = torch.arange(width, dtype=torch.float64)[:, None] * freqs  # (W, d_h/4)
    rows = rows.repeat_interleave(2, -1)[:, None, :].expand(height, width, half)  # (H, W, d_h/2)
    cols = cols.repeat_interleave(2, -1)[None, :, :].expand(height, width, half)  # (H, W, d_h/2)
    ang = torch.cat([rows, cols], -1).reshape(height * width, head_dim)  # (N, d_h)
    return ang.cos().float(), ang.sin().float()


def rope_2d_mixed(
    head_dim: int, height: int, width: int, theta: float = 10000.0, extent: float = 16.0
) -> tuple[Tensor, Tensor]:
    """DDT's 2D RoPE table (shared frequencies, x/y alternating complex pairs, normalised positions).

    Args:
        head_dim: d_h, divisible by 4.
        height, width: token grid, row-major.
        theta: frequency base.
        extent: coordinates run over ``linspace(0, extent, W)`` (columns) and ``(0, extent, H)`` (rows).

    Returns:
        (cos, sin), each (height * width, head_dim), fp32.
    """
    _check_head_dim(head_dim)
    freqs = theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float64) / head_dim)  # (d_h/4,)
    ys, xs = torch.meshgrid(
        torch.linspace(0, extent, height, dtype=torch.float64),
        torch.linspace(0, extent, width, dtype=torch.float64),
        indexing="ij",
    )  # (H, W) each
    ax = xs.reshape(-1, 1) * freqs  # (N, d_h/4)
    ay = ys.reshape(-1, 1) * freqs  # (N, d_h/4)
    ang = torch.stack([ax, ay], -1).reshape(height * width, head_dim // 2)  # complex pairs x0 y0 x1 y1 ...
    ang = ang.repeat_interleave(2, -1)  # (N, d_h): each angle covers its (real, imag) channel pair
    return ang.cos().float(), ang.sin().float()


def rope_prepend_identity(cos: Tensor, sin: Tensor, n: int = 1) -> tuple[Tensor, Tensor]:
    """Prepend ``n`` positions with zero rotation (for extra tokens such as REG's class token)."""
    d = cos.shape[-1]
    return (
        torch.cat([cos.new_ones(n, d), cos], 0),  # (n + N, d_h)
        torch.cat([sin.new_zeros(n, d), sin], 0),  # (n + N, d_h)
    )


def rotate_pairs(x: Tensor) -> Tensor:
    """(..., 2m) -> (..., 2m) mapping each pair (a, b) to (-b, a): multiplication by i."""
    a, b = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([-b, a], -1).flatten(-2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of ``x`` (B, heads, N, d_h) by the table (N, d_h); computed in fp32.

    Implemented as one complex multiply ``(a + ib) · (cos + i sin)`` on a complex view of x (about half
    the time of ``x cos + rotate_pairs(x) sin``, which needs a stack and three full-size passes).
    """
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(s % 2 for s in xf.stride()[:-1]):
        xf = xf.contiguous()  # view_as_complex needs (real, imag) adjacent and even strides
    rot = torch.complex(cos[..., 0::2], sin[..., 0::2])  # (N, d_h/2)
    out = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * rot).flatten(-2)
    return out.to(x.dtype)
