"""Exponential moving averages of the network weights, with several profiles at once.

Each profile is either a fixed per-step decay (DiT/SiT/LightningDiT: 0.9999) or a half-life in
training images (EDM: ``beta = 0.5 ** (batch / halflife_nimg)``, optionally ramped up as
``halflife = min(halflife, ratio * nimg)``), so the average does not depend on the batch size.

An EMA is a part a training method declares (``Method.ema_specs``), built from a ``_target_`` spec like the
other parts (``configs/ema/*.yaml``: ``{_target_: gen.ema.EMA, decays, halflife_kimg, rampup_ratio}``, built as a
partial and called with the module), so another averaging rule (EDM2's power-function EMA) is one more class with
the same ``update`` / ``averaged`` / ``spec`` interface. The loop updates an EMA only after its module's optimizer
stepped, and snapshots record its ``spec`` and profile.

Why not ``torch.optim.swa_utils.AveragedModel`` or timm's ``ModelEmaV3``: both take a decay per
step, not a function of images seen, and hold one profile each; the update below uses the same
fused ``torch._foreach_lerp_`` kernel those use, so speed is equal.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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
    """Averaged copies of ``net`` (one per profile), updated after every step of ``net``'s optimizer.

    Args:
        net: the module to average (copied at construction).
        profiles: the profiles; or give ``decays`` / ``halflife_kimg`` / ``rampup_ratio`` (``make_profiles``),
            which is how the ``ema`` config spec builds it.

    Example:
        ema = EMA(net, decays=[0.9999])
        ...; opt.step(); ema.update(net, nimg, batch_size)
        ema.averaged("d0.9999")  # an eval-mode copy of the network
    """

    def __init__(
        self,
        net: nn.Module,
        profiles: Sequence[EMAProfile] | None = None,
        *,
        decays: Sequence[float] = (),
        halflife_kimg: Sequence[float] = (),
        rampup_ratio: float | None = None,
    ) -> None:
        super().__init__()
        if profiles is None:
            profiles = make_profiles(decays, halflife_kimg, rampup_ratio)
        elif decays or halflife_kimg or rampup_ratio is not None:
            raise ValueError("EMA: give either profiles or decays/halflife_kimg/rampup_ratio, not both")
        self.profiles = list(profiles)
        self.copies = nn.ModuleDict()
        for p in self.profiles:
            c = copy.deepcopy(net).eval().requires_grad_(False)
            self.copies[p.name.replace(".", "_")] = c

    @property
    def spec(self) -> dict[str, Any]:
        """The ``_target_`` spec of this averaging rule (recorded in snapshots beside the profile name)."""
        return {
            "_target_": f"{type(self).__module__}.{type(self).__qualname__}",
            "decays": [p.decay for p in self.profiles if p.decay is not None],
            "halflife_kimg": [p.halflife_kimg for p in self.profiles if p.halflife_kimg is not None],
            "rampup_ratio": next((p.rampup_ratio for p in self.profiles if p.halflife_kimg is not None), None),
        }

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.profiles]

    def averaged(self, name: str | None = None) -> nn.Module:
        """The averaged network of a profile (the first one by default)."""
        name = name or self.profiles[0].name
        key = name.replace(".", "_")
        if key not in self.copies:
            raise KeyError(f"no EMA profile {name!r}; this EMA keeps {self.names}")
        return self.copies[key]

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


EMAFactory = Callable[[nn.Module], EMA]
"""Builds the EMA of one module (a ``functools.partial`` of an EMA class, from the ``ema`` config spec)."""
