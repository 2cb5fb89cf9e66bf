"""Input embedders: patches, timesteps (DiT, Peebles & Xie 2023, Sec. 3.2) and class labels."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches -> tokens with a strided Conv2d (as timm's ``PatchEmbed``).

    Args:
        in_channels: C.
        dim: token width D.
        patch_size: p.
        bias: conv bias.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, (H/p)(W/p), D), tokens in row-major order, contiguous.

        The conv output is channel-first; without the explicit copy the transposed strides propagate
        through every residual add, and each LayerNorm and Linear then makes its own contiguous copy.
        """
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()

    def init_xavier(self) -> None:
        """Xavier-uniform on the kernel viewed as a Linear (D, C·p·p), zero bias (DiT's init)."""
        w = self.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)


def timestep_features(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features ``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period^(-i / (dim/2))``.

    Args:
        t: (B,) float times (may be fractional).
        dim: feature size (even; an odd size is zero-padded).
        max_period: the slowest period (DiT 10000, DDT 10).

    Returns:
        (B, dim) fp32, cosines first then sines.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)  # (B, 2·half)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], -1)
    return emb


class TimestepEmbedder(nn.Module):
    """``MLP(features(time_scale · t))`` with MLP = Linear(F, D) -> SiLU -> Linear(D, D).

    Args:
        dim: output width D.
        freq_dim: sinusoid feature size F (256 in DiT/LightningDiT/DDT).
        max_period: slowest sinusoid period (DiT 10000, DDT 10).
        time_scale: t is multiplied by this first; 1000 maps t in [0, 1] onto DiT's integer-step range.
    """

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        """t: (B,) -> (B, D)."""
        f = timestep_features(t * self.time_scale, self.freq_dim, self.max_period)  # (B, F)
        return self.mlp(f.to(self.mlp[0].weight.dtype))  # (B, D)

    def init_normal(self, std: float = 0.02) -> None:
        """N(0, std) on both MLP weights (DiT's init)."""
        nn.init.normal_(self.mlp[0].weight, std=std)
        nn.init.normal_(self.mlp[2].weight, std=std)


class LabelEmbedder(nn.Module):
    """Class embedding table with ``num_classes + 1`` rows; the last row (index num_classes) is the null class.

    The table is a pure lookup. Classifier-free guidance training (Ho & Salimans 2022) replaces labels by the
    null class before the network sees them; that is the objective's job (``label_dropout`` of the training
    objectives), so the drop is drawn from the per-sample training randomness and a backbone stays a pure function.

    Args:
        num_classes: number of real classes.
        dim: output width D.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, y: Tensor) -> Tensor:
        """y: (B,) long in [0, num_classes] -> (B, D)."""
        return self.embedding_table(y)
