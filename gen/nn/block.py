"""The adaLN transformer block and final layer of the DiT family (DiT, LightningDiT, DDT), parts injected.

One block serves every backbone: the norm (LayerNorm without affine for DiT, RMSNorm for LightningDiT and
DDT), the feed-forward network (GELU MLP or SwiGLU, with or without biases), the attention options (qkv
bias, qk-norm, 2D RoPE) and the adaLN layout are constructor choices, as dinov2's ``layers`` package injects
its parts. Parameter names match the official checkpoints of each model (``attn.qkv``, ``mlp.fc1`` or
``mlp.w12``, ``norm1.weight``, ``adaLN_modulation.{0,1}``), so every model's state-dict layout is unchanged.

The condition given to :meth:`AdaLNBlock.forward` is already activated: DiT/LightningDiT apply SiLU once to
``t_emb + y_emb`` for all blocks (the ``SiLU`` kept inside ``adaLN_modulation[0]`` only preserves their key
layout), DDT passes its per-token self-condition ``SiLU(t_emb + s)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from gen.nn.attention import Attention
from gen.nn.mlp import Mlp, SwiGLU
from gen.nn.norm import RMSNorm

NormKind = Literal["layer", "rms"]
FfnKind = Literal["gelu", "swiglu"]
NORM_EPS = 1e-6


def make_norm(kind: NormKind, dim: int, eps: float = NORM_EPS) -> nn.Module:
    """``"layer"``: LayerNorm without affine (DiT; no parameters); ``"rms"``: RMSNorm with a learned weight."""
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
    if kind == "rms":
        return RMSNorm(dim, eps)
    raise ValueError(f"unknown norm {kind!r}; use 'layer' or 'rms'")


def _adaln(dim: int, chunks: int, silu_in_layout: bool) -> nn.Sequential:
    lin = nn.Linear(dim, chunks * dim)
    return nn.Sequential(nn.SiLU(), lin) if silu_in_layout else nn.Sequential(lin)


def _split(mod: Tensor, chunks: int, dim: int) -> tuple[Tensor, ...]:
    """(B, k·D) -> k views (B, 1, D) broadcast over tokens; (B, N, k·D) -> k views (B, N, D) per token."""
    if mod.dim() == 2:
        return mod.view(mod.shape[0], chunks, 1, dim).unbind(1)
    return mod.chunk(chunks, dim=-1)


class AdaLNBlock(nn.Module):
    """adaLN(-Zero) block (DiT, Peebles & Xie 2023, Fig. 3):

    ``x <- x + g1 · Attn(norm1(x)(1 + s1) + b1)``; ``x <- x + g2 · FFN(norm2(x)(1 + s2) + b2)``, with the
    modulation ``(b1, s1, g1, b2, s2, g2) = Linear(c)``. Without shift (LightningDiT's ``wo_shift``) the
    Linear gives ``(s1, g1, s2, g2)`` and ``b = 0``.

    Args:
        dim: width D.
        num_heads: attention heads.
        ffn_hidden: hidden width of the FFN (the model computes it with its own rounding rule).
        norm: ``"layer"`` (no affine) or ``"rms"``.
        ffn: ``"gelu"`` (``fc1``/``fc2``) or ``"swiglu"`` (``w12``/``w3``).
        ffn_bias: biases in the FFN.
        qkv_bias: bias of the fused qkv projection.
        qk_norm: normalise q and k per head with the block's norm kind.
        shift: six modulation vectors (True) or four, without shift (LightningDiT ``wo_shift``).
        silu_in_layout: ``adaLN_modulation`` is ``Sequential(SiLU, Linear)`` (DiT/LightningDiT key layout)
            instead of ``Sequential(Linear)`` (DDT). The SiLU is never applied here.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_hidden: int,
        *,
        norm: NormKind = "layer",
        ffn: FfnKind = "gelu",
        ffn_bias: bool = True,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        shift: bool = True,
        silu_in_layout: bool = True,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.chunks = 6 if shift else 4
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=norm if qk_norm else None)
        self.norm2 = make_norm(norm, dim)
        if ffn == "gelu":
            self.mlp: nn.Module = Mlp(dim, ffn_hidden, bias=ffn_bias)
        elif ffn == "swiglu":
            self.mlp = SwiGLU(dim, ffn_hidden, bias=ffn_bias)
        else:
            raise ValueError(f"unknown ffn {ffn!r}; use 'gelu' or 'swiglu'")
        self.adaLN_modulation = _adaln(dim, self.chunks, silu_in_layout)

    def forward(self, x: Tensor, cond: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: (B, N, D); cond: activated condition (B, D) or per token (B, N, D); rope: (cos, sin) (N, d_h)."""
        mod = _split(self.adaLN_modulation[-1](cond), self.chunks, self.dim)
        if self.chunks == 6:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod
            h = torch.addcmul(shift1, self.norm1(x), 1 + scale1)  # (B, N, D)
            x = torch.addcmul(x, gate1, self.attn(h, rope))
            h = torch.addcmul(shift2, self.norm2(x), 1 + scale2)
        else:
            scale1, gate1, scale2, gate2 = mod
            x = torch.addcmul(x, gate1, self.attn(self.norm1(x) * (1 + scale1), rope))
            h = self.norm2(x) * (1 + scale2)
        return torch.addcmul(x, gate2, self.mlp(h))  # (B, N, D)


class FinalLayer(nn.Module):
    """``norm_final`` -> modulate with ``(shift, scale) = Linear(c)`` -> ``Linear(D, out_dim)`` (DiT's final layer).

    Args:
        dim: width D.
        out_dim: output features per token (p·p·C_out).
        norm: ``"layer"`` (no affine: DiT, DDT) or ``"rms"`` (LightningDiT).
        silu_in_layout: as in :class:`AdaLNBlock`.
    """

    def __init__(self, dim: int, out_dim: int, *, norm: NormKind = "layer", silu_in_layout: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.norm_final = make_norm(norm, dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = _adaln(dim, 2, silu_in_layout)

    def modulated(self, x: Tensor, cond: Tensor) -> Tensor:
        """x: (B, N, D); cond: (B, D) or (B, N, D), activated. Returns the modulated normalised tokens (B, N, D)."""
        shift, scale = _split(self.adaLN_modulation[-1](cond), 2, self.dim)
        return torch.addcmul(shift, self.norm_final(x), 1 + scale)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, out_dim)."""
        return self.linear(self.modulated(x, cond))

    def zero_(self) -> None:
        """adaLN-Zero: zero modulation and output projection, so the network starts by predicting 0."""
        for lin in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
