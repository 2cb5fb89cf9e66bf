"""LightningDiT: DiT with SwiGLU, RMSNorm, 2D RoPE and optional qk-norm (Yao et al. 2025, "Reconstruction vs.
Generation: Taming Optimization Dilemma in Latent Diffusion Models", Sec. 4 and Table 1).

Differences from :mod:`gen.models.dit`: RMSNorm (learnable weight, fp32 statistics) in blocks and final layer;
SwiGLU FFN with hidden int(2/3 · 4D) and biases; the frozen absolute sincos table *plus* EVA-02-style 2D RoPE
on q, k (rows on the first half of each head, columns on the second, integer grid positions); optional RMS
qk-norm (off by default, the paper's remedy for loss spikes); ``learn_sigma`` off. Init is DiT's (adaLN-Zero).

Forward contract (same as DiT; docs/architecture.md)::

    net(x, t, y, *, return_features=(), extra_token=None)
      -> out | (out, feats) | (out, extra_out) | (out, extra_out, feats)

With an extra token (REG), it is prepended at index 0 with a zero absolute position and an identity RoPE
rotation; features then have 1 + N tokens. The reference feeds t in [0, 1] to the sinusoid unscaled; pass
``time_scale=1`` to reproduce it (our default 1000 matches DiT's range).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.nn import (
    Attention,
    LabelEmbedder,
    PatchEmbed,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    rope_2d_axial,
    rope_prepend_identity,
    sincos_2d,
    swiglu_hidden,
)
from gen.models.dit import DiT
from gen.nn.backbone import (
    batch_labels,
    batch_time,
    check_image,
    embed_extra_token,
    feature_indices,
    pack_outputs,
    unpatchify,
)

NORM_EPS = 1e-6


class LightningDiTBlock(nn.Module):
    """adaLN-Zero block with RMSNorm, RoPE attention and SwiGLU.

    ``x <- x + g1 · Attn(RMS(x)(1 + s1) + b1, rope)``; ``x <- x + g2 · SwiGLU(RMS(x)(1 + s2) + b2)``, with the six
    vectors from Linear(SiLU(c)); the model applies the SiLU once for all blocks.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias=True, qk_norm="rms" if qk_norm else None)
        self.norm2 = RMSNorm(dim, NORM_EPS)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio), bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c_act: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        """x: (B, N, D); c_act: (B, D) = SiLU(c); rope: (cos, sin) each (N, d_h) or None. Returns (B, N, D)."""
        B, _, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation[1](c_act).view(B, 6, 1, D).unbind(1)
        h = torch.addcmul(shift1, self.norm1(x), 1 + scale1)  # (B, N, D)
        x = torch.addcmul(x, gate1, self.attn(h, rope))  # (B, N, D)
        h = torch.addcmul(shift2, self.norm2(x), 1 + scale2)  # (B, N, D)
        return torch.addcmul(x, gate2, self.mlp(h))  # (B, N, D)


class FinalLayer(nn.Module):
    """RMSNorm -> modulate with (shift, scale) = Linear(SiLU(c)) -> Linear(D, p·p·C_out)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = RMSNorm(dim, NORM_EPS)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulated(self, x: Tensor, c_act: Tensor) -> Tensor:
        """x: (B, N, D); c_act: (B, D). Returns (B, N, D)."""
        shift, scale = self.adaLN_modulation[1](c_act).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        return torch.addcmul(shift, self.norm_final(x), 1 + scale)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, p·p·C_out)."""
        return self.linear(self.modulated(x, c_act))


class LightningDiT(nn.Module):
    """Class-conditional LightningDiT.

    Args:
        input_size: spatial size H = W of the input latent (16 for 256 px with an f16 tokenizer).
        patch_size: p (1 or 2 in the paper).
        in_channels: C (32 for VA-VAE f16d32).
        hidden_size: width D.
        depth: number of blocks.
        num_heads: attention heads (head dim must be divisible by 4 for 2D RoPE).
        mlp_ratio: SwiGLU hidden = int(2/3 · mlp_ratio · D).
        num_classes: real classes; label ``num_classes`` is the null class.
        label_dropout: null-label probability in train mode.
        learn_sigma: output 2C channels instead of C (off in LightningDiT).
        qk_norm: RMSNorm on q and k per head before RoPE.
        rope: apply 2D RoPE (the abs. sincos table is always added, as in the paper).
        rope_theta: RoPE frequency base.
        time_scale: t is multiplied by this before the sinusoid.
        max_period: slowest sinusoid period.
        extra_token_dim: D_extra > 0 adds REG's extra-token projection and head.
        compile: ``torch.compile`` each block in place (default off).
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        label_dropout: float = 0.1,
        learn_sigma: bool = False,
        qk_norm: bool = False,
        rope: bool = True,
        rope_theta: float = 10000.0,
        time_scale: float = 1000.0,
        max_period: float = 10000.0,
        extra_token_dim: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "arch": "lightningdit",
            "input_size": input_size,
            "patch_size": patch_size,
            "in_channels": in_channels,
            "hidden_size": hidden_size,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "num_classes": num_classes,
            "label_dropout": label_dropout,
            "learn_sigma": learn_sigma,
            "qk_norm": qk_norm,
            "rope": rope,
            "rope_theta": rope_theta,
            "time_scale": time_scale,
            "max_period": max_period,
            "extra_token_dim": extra_token_dim,
            "compile": compile,
        }
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_classes = num_classes
        self.extra_token_dim = extra_token_dim
        self.grid = input_size // patch_size

        self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, max_period=max_period, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, label_dropout)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden_size), requires_grad=False)
        if rope:
            cos, sin = rope_2d_axial(hidden_size // num_heads, self.grid, self.grid, rope_theta)
            # Not persistent: the tables are a function of the config, so checkpoints need not carry them.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        else:
            self.rope_cos = self.rope_sin = None
        self.blocks = nn.ModuleList(
            [LightningDiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        if extra_token_dim > 0:
            self.extra_embed = nn.Linear(extra_token_dim, hidden_size)
            self.extra_norm = nn.LayerNorm(hidden_size, eps=NORM_EPS)
            self.extra_head = nn.Linear(hidden_size, extra_token_dim)
        self.initialize_weights()
        if compile:
            for block in self.blocks:
                block.compile()

    # The same init as DiT (Xavier Linears, sincos table, N(0, .02) embeddings, adaLN-Zero, zero output);
    # the module layout it touches (pos_embed, embedders, blocks' adaLN, final layer) is identical.
    initialize_weights = DiT.initialize_weights

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor | None = None,
        *,
        return_features: Sequence[int] = (),
        extra_token: Tensor | None = None,
    ) -> Any:
        """Args and returns as :meth:`gen.models.dit.DiT.forward` (see the module docstring)."""
        name = type(self).__name__
        check_image(x, self.in_channels, self.input_size, self.patch_size, name)
        B = x.shape[0]
        want = feature_indices(return_features, self.depth, name)
        t = batch_time(t, B, x.device, name)  # (B,)
        y = batch_labels(y, B, self.num_classes, x.device, name)  # (B,)
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D)
        c_act = F.silu(self.t_embedder(t) + self.y_embedder(y))  # (B, D)
        rope = None if self.rope_cos is None else (self.rope_cos, self.rope_sin)  # (N, d_h) each
        n_extra = 0
        if extra_token is not None:
            h = torch.cat([self._embed_extra(extra_token, B), h], dim=1)  # (B, 1 + N, D)
            rope = None if rope is None else rope_prepend_identity(*rope)  # (1 + N, d_h) each
            n_extra = 1
        feats: list[Tensor | None] = [None] * len(want)
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c_act, rope)  # (B, n_extra + N, D)
            if i in want:
                feats[want[i]] = h
        h = self.final_layer.modulated(h, c_act)  # (B, n_extra + N, D)
        out = self.final_layer.linear(h[:, n_extra:])  # (B, N, p·p·C_out)
        out = unpatchify(out, self.patch_size, self.out_channels, self.grid)  # (B, C_out, H, W)
        extra_out = self.extra_head(h[:, 0]) if n_extra else None  # (B, D_extra)
        return pack_outputs(out, extra_out, feats if want else None)

    _embed_extra = embed_extra_token  # (B, D_extra) -> (B, 1, D), shared by every backbone


# Sizes from hustvl/LightningDiT models/lightningdit.py: (depth, width, heads).
SIZES: dict[str, tuple[int, int, int]] = {
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "1p0B": (24, 1536, 24),
    "1p6B": (28, 1792, 28),
}

PRESETS: dict[str, dict[str, Any]] = {
    f"{size}/{p}": {"depth": d, "hidden_size": w, "num_heads": h, "patch_size": p}
    for size, (d, w, h) in SIZES.items()
    for p in (1, 2)
}
PRESETS["tiny"] = {"depth": 6, "hidden_size": 256, "num_heads": 4, "patch_size": 4}
PRESETS["micro"] = {"depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 4}


def lightningdit(preset: str, **kwargs: Any) -> LightningDiT:
    """Build a LightningDiT preset ("B/1" ... "1p6B/2", "tiny", "micro"); kwargs override constructor args."""
    if preset not in PRESETS:
        raise ValueError(f"unknown LightningDiT preset {preset!r}; choose one of {sorted(PRESETS)}")
    return LightningDiT(**{**PRESETS[preset], **kwargs})
