"""DiT: Diffusion Transformer with adaLN-Zero blocks (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers").

Layout and initialisation follow the paper (Sec. 3.2, Fig. 3) so that parameter names and counts are those of
the reference implementation. Forward contract (docs/architecture.md)::

    net(x, t, y, *, return_features=(), extra_token=None)
      -> out                                  (B, C_out, H, W)
      -> (out, feats)                         if return_features
      -> (out, extra_out)                     if extra_token is given
      -> (out, extra_out, feats)              if both

``C_out = 2 C`` when ``learn_sigma`` (ε and the variance interpolation, DiT's Sec. 3.1), else ``C``.
``feats[i]`` is the token output (B, N, D) of block ``return_features[i]`` (1-indexed); with an extra token the
features hold it too, at index 0: (B, 1 + N, D). ``extra_token`` is REG's noisy class token (Wu et al. 2025,
"Representation Entanglement for Generation"), (B, D_extra); ``extra_out`` is its denoised prediction
(B, D_extra). The extra-token modules exist only when ``extra_token_dim > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.nn.backbone import (
    batch_labels,
    batch_time,
    check_image,
    embed_extra_token,
    feature_indices,
    pack_outputs,
    unpatchify,
)
from gen.nn import Attention, LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, sincos_2d

LN_EPS = 1e-6


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (DiT Fig. 3, right).

    ``x <- x + g1 · Attn(LN(x)(1 + s1) + b1)``; ``x <- x + g2 · MLP(LN(x)(1 + s2) + b2)``, with
    (b1, s1, g1, b2, s2, g2) = Linear(SiLU(c)). The SiLU lives in ``adaLN_modulation[0]`` for checkpoint
    compatibility, but the model applies it once for all blocks and calls :meth:`forward` with SiLU(c).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.dim = dim
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        """x: (B, N, D) tokens; c_act: (B, D) = SiLU(condition). Returns (B, N, D)."""
        B, _, D = x.shape
        mod = self.adaLN_modulation[1](c_act).view(B, 6, 1, D)  # (B, 6, 1, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(1)  # (B, 1, D) each, views
        h = torch.addcmul(shift1, F.layer_norm(x, (D,), eps=LN_EPS), 1 + scale1)  # (B, N, D)
        x = torch.addcmul(x, gate1, self.attn(h))  # (B, N, D)
        h = torch.addcmul(shift2, F.layer_norm(x, (D,), eps=LN_EPS), 1 + scale2)  # (B, N, D)
        return torch.addcmul(x, gate2, self.mlp(h))  # (B, N, D)


class FinalLayer(nn.Module):
    """LN (no affine) -> modulate with (shift, scale) = Linear(SiLU(c)) -> Linear(D, p·p·C_out)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def modulated(self, x: Tensor, c_act: Tensor) -> Tensor:
        """x: (B, N, D); c_act: (B, D) = SiLU(c). Returns the modulated normalised tokens (B, N, D)."""
        shift, scale = self.adaLN_modulation[1](c_act).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=LN_EPS), 1 + scale)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, p·p·C_out)."""
        return self.linear(self.modulated(x, c_act))


class DiT(nn.Module):
    """Class-conditional DiT.

    Args:
        input_size: spatial size H = W of the input (latent) image.
        patch_size: p; H must be divisible by it.
        in_channels: C.
        hidden_size: width D.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden = int(D · mlp_ratio).
        num_classes: real classes; label ``num_classes`` is the null class (0 = unconditional).
        label_dropout: probability of replacing a label by the null class in train mode (CFG).
        learn_sigma: output 2C channels (ε and DiT's learned-variance values) instead of C.
        time_scale: t is multiplied by this before the sinusoid (1000: t in [0, 1] spans DiT's range).
        max_period: slowest sinusoid period of the timestep features.
        extra_token_dim: D_extra > 0 adds REG's extra-token input projection and output head.
        compile: ``torch.compile`` each block in place (default off; eager is the reference).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        label_dropout: float = 0.1,
        learn_sigma: bool = False,
        time_scale: float = 1000.0,
        max_period: float = 10000.0,
        extra_token_dim: int = 0,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "arch": "dit",
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
        # Frozen table stored as a non-trainable Parameter so state dicts match the reference layout.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid**2, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        if extra_token_dim > 0:
            self.extra_embed = nn.Linear(extra_token_dim, hidden_size)
            self.extra_norm = nn.LayerNorm(hidden_size, eps=LN_EPS)
            self.extra_head = nn.Linear(hidden_size, extra_token_dim)
        self.initialize_weights()
        if compile:
            for block in self.blocks:
                block.compile()

    def initialize_weights(self) -> None:
        """DiT's init: Xavier Linears, sincos pos-embed, N(0, .02) embeddings, zeroed adaLN and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.pos_embed.data.copy_(sincos_2d(self.hidden_size, self.grid).unsqueeze(0))
        self.x_embedder.init_xavier()
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        self.t_embedder.init_normal(0.02)
        # adaLN-Zero: every block starts as the identity and the network outputs 0.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for lin in (self.final_layer.adaLN_modulation[1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.extra_token_dim > 0:
            nn.init.zeros_(self.extra_head.weight)
            nn.init.zeros_(self.extra_head.bias)

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor | None = None,
        *,
        return_features: Sequence[int] = (),
        extra_token: Tensor | None = None,
    ) -> Any:
        """Predict the network output for noisy x at noise level t and class y.

        Args:
            x: (B, C, H, W) noisy input.
            t: (B,) or scalar noise-conditioning value (multiplied by ``time_scale``).
            y: (B,) long class labels, ``num_classes`` = null; None = all null.
            return_features: 1-indexed block numbers whose token outputs are returned.
            extra_token: (B, D_extra) REG extra token (needs ``extra_token_dim > 0``).

        Returns:
            See the module docstring: out (B, C_out, H, W), optionally with extra_out and feats.
        """
        name = type(self).__name__
        check_image(x, self.in_channels, self.input_size, self.patch_size, name)
        B = x.shape[0]
        want = feature_indices(return_features, self.depth, name)
        t = batch_time(t, B, x.device, name)  # (B,)
        y = batch_labels(y, B, self.num_classes, x.device, name)  # (B,)
        h = self.x_embedder(x) + self.pos_embed  # (B, N, D), N = (H/p)^2
        c_act = F.silu(self.t_embedder(t) + self.y_embedder(y))  # (B, D), shared SiLU of every adaLN input
        n_extra = 0
        if extra_token is not None:
            e = self._embed_extra(extra_token, B)  # (B, 1, D); its position embedding is zero
            h = torch.cat([e, h], dim=1)  # (B, 1 + N, D)
            n_extra = 1
        feats: list[Tensor | None] = [None] * len(want)
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c_act)  # (B, n_extra + N, D)
            if i in want:
                feats[want[i]] = h
        h = self.final_layer.modulated(h, c_act)  # (B, n_extra + N, D)
        out = self.final_layer.linear(h[:, n_extra:])  # (B, N, p·p·C_out)
        out = unpatchify(out, self.patch_size, self.out_channels, self.grid)  # (B, C_out, H, W)
        extra_out = self.extra_head(h[:, 0]) if n_extra else None  # (B, D_extra)
        return pack_outputs(out, extra_out, feats if want else None)

    _embed_extra = embed_extra_token  # (B, D_extra) -> (B, 1, D), shared by every backbone


# Sizes from the DiT paper, Table 1: (depth, width, heads).
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

PRESETS: dict[str, dict[str, Any]] = {
    f"{size}/{p}": {"depth": d, "hidden_size": w, "num_heads": h, "patch_size": p}
    for size, (d, w, h) in SIZES.items()
    for p in (2, 4, 8)
}
# CPU-sized presets: "tiny" is the yardstick backbone (docs: width 256, depth 6, patch 4); "micro" is for tests.
PRESETS["tiny"] = {"depth": 6, "hidden_size": 256, "num_heads": 4, "patch_size": 4}
PRESETS["micro"] = {"depth": 2, "hidden_size": 64, "num_heads": 2, "patch_size": 4}


def dit(preset: str, **kwargs: Any) -> DiT:
    """Build a DiT preset ("S/2" ... "XL/8", "tiny", "micro"); kwargs override or add constructor args."""
    if preset not in PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose one of {sorted(PRESETS)}")
    return DiT(**{**PRESETS[preset], **kwargs})
