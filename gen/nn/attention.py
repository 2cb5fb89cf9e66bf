"""Multi-head self-attention with a fused qkv projection and ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gen.nn.norm import RMSNorm
from gen.nn.rope import apply_rope


class Attention(nn.Module):
    """Self-attention (Vaswani et al. 2017) with optional qk-norm and 2D RoPE on q, k.

    Parameter names (``qkv``, ``proj``, ``q_norm``, ``k_norm``) match timm/DiT/LightningDiT so their
    checkpoints map one to one.

    Args:
        dim: model width D.
        num_heads: number of heads; D must be divisible by it.
        qkv_bias: bias on the fused qkv Linear (DiT/LightningDiT: True, DDT: False).
        proj_bias: bias on the output projection.
        qk_norm: normalise q and k per head before RoPE ("rms": RMSNorm with a learnable weight of
            size d_h, as LightningDiT's and DDT's option; "layer": LayerNorm with affine; None: off).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        qk_norm: str | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        if qk_norm is None:
            self.q_norm = self.k_norm = None
        elif qk_norm == "rms":
            self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        elif qk_norm == "layer":
            self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        else:
            raise ValueError(f"qk_norm must be None, 'rms' or 'layer', got {qk_norm!r}")

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Args: x (B, N, D); rope: (cos, sin) each (N, d_h), or None. Returns (B, N, D)."""
        B, N, D = x.shape
        # One matmul for q, k, v; the permute is a view, SDPA reads the strided heads directly.
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # (B, h, N, d)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, h, N, d)
        o = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d)
        return self.proj(o.transpose(1, 2).reshape(B, N, D))  # (B, N, D)
