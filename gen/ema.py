"""Exponential moving averages of the network weights, with several profiles at once.

Each profile is either a fixed per-step decay (DiT/SiT/LightningDiT: 0.9999) or a half-life in
training images (EDM: ``beta = 0.5 ** (batch / halflife_nimg)``, optionally ramped up as
``halflife = min(halflife, ratio * nimg)``), so the average does not depend on the batch size.

Why not ``torch.optim.swa_utils.AveragedModel`` or timm's ``ModelEmaV3``: both take a decay per
step, not a function of images seen, and hold one profile each; the update below uses the same
fused ``torch._foreach_lerp_`` kernel those use, so speed is equal.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EMAProfile:
    """One average: ``decay`` per step, or ``halflife_kimg`` (with optional ``rampup_ratio``)."""

    name: str
    decay: float | None = None
    halflife_kimg: float | None = None
    rampup_ratio: float | None = None

    def beta(self, nimg: int, batch_size: int) -> float:
        """Weight kept on the old average for a step that brings ``nimg`` to ``nimg + batch_size``."""
        if self.decay is not None:
            return float(self.decay)
        assert self.halflife_kimg is not None
        halflife_nimg = self.halflife_kimg * 1000.0
        if self.rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, nimg * self.rampup_ratio)
        if halflife_nimg <= 0:
            return 0.0
        return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


def make_profiles(
    decays: Sequence[float] = (), halflife_kimg: Sequence[float] = (), rampup_ratio: float | None = None
) -> list[EMAProfile]:
    """Profiles from config lists; names look like ``d0.9999`` or ``hl500k``."""
    profiles = [EMAProfile(name=f"d{d:g}", decay=float(d)) for d in decays]
    profiles += [EMAProfile(name=f"hl{h:g}k", halflife_kimg=float(h), rampup_ratio=rampup_ratio) for h in halflife_kimg]
    if not profiles:
        raise ValueError("ema needs at least one profile: set ema.decays or ema.halflife_kimg")
    for p in profiles:
        if p.decay is not None and not 0.0 <= p.decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {p.decay}")
        if p.halflife_kimg is not None and p.halflife_kimg <= 0:
            raise ValueError(f"ema halflife_kimg must be > 0, got {p.halflife_kimg}")
    return profiles


class EMA(nn.Module):
    """Averaged copies of ``net`` (one per profile), updated after every optimizer step.

    Example:
        ema = EMA(net, make_profiles(decays=[0.9999]))
        ...; opt.step(); ema.update(net, nimg, batch_size)
        ema.averaged("d0.9999")  # an eval-mode copy of the network
    """

    def __init__(self, net: nn.Module, profiles: Sequence[EMAProfile]) -> None:
        super().__init__()
        self.profiles = list(profiles)
        self.copies = nn.ModuleDict()
        for p in self.profiles:
            c = copy.deepcopy(net).eval().requires_grad_(False)
            self.copies[p.name.replace(".", "_")] = c

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.profiles]

    def averaged(self, name: str | None = None) -> nn.Module:
        """The averaged network of a profile (the first one by default)."""
        name = name or self.profiles[0].name
        return self.copies[name.replace(".", "_")]

    @torch.no_grad()
    def update(self, net: nn.Module, nimg: int, batch_size: int) -> None:
        """Move every average toward ``net``'s current weights; buffers are copied."""
        src_params = [p.detach() for p in net.parameters()]
        src_buffers = list(net.buffers())
        for p in self.profiles:
            copy_ = self.averaged(p.name)
            dst = list(copy_.parameters())
            beta = p.beta(nimg, batch_size)
            # lerp_(dst, src, w): dst += w * (src - dst), i.e. dst = beta*dst + (1-beta)*src.
            torch._foreach_lerp_(dst, [s.to(d.dtype) for s, d in zip(src_params, dst)], 1.0 - beta)
            for b_dst, b_src in zip(copy_.buffers(), src_buffers):
                b_dst.copy_(b_src)
