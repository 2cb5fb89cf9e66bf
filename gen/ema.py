"""Exponential moving averages of the network weights, with several profiles at once.

Each profile is either a fixed per-step decay (DiT/SiT/LightningDiT: 0.9999) or a half-life in
training images (EDM: ``beta = 0.5 ** (batch / halflife_nimg)``, optionally ramped up as
``halflife = min(halflife, ratio * nimg)``), so the average does not depend on the batch size.

An EMA is a part a training method declares (``Method.ema_specs``), built from a ``_target_`` spec like the
other parts (``configs/ema/*.yaml``: ``{_target_: gen.ema.EMA, decays, halflife_kimg, rampup_ratio}``, built as a
partial and called with the module), so another averaging rule (EDM2's power-function EMA) is one more class with
the same ``update`` / ``averaged`` / ``spec`` interface: :class:`PowerFunctionEMA` (``configs/ema/phema.yaml``), whose
snapshots ``scripts.posthoc_ema`` combines into any other width after training (:func:`posthoc_coefficients`). The loop updates an EMA only after its module's optimizer
stepped, and snapshots record its ``spec`` and profile.

Why not ``torch.optim.swa_utils.AveragedModel`` or timm's ``ModelEmaV3``: both take a decay per
step, not a function of images seen, and hold one profile each; the update below uses the same
fused ``torch._foreach_lerp_`` kernel those use, so speed is equal.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn


class Profile(Protocol):
    """What the EMA update reads of a profile: its name and the weight kept on the old average."""

    @property
    def name(self) -> str: ...

    def beta(self, nimg: int, batch_size: int) -> float: ...


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
        first: the profile put first (the one snapshots, previews and FID use); default: the first listed.

    Example:
        ema = EMA(net, decays=[0.9999])
        ...; opt.step(); ema.update(net, nimg, batch_size)
        ema.averaged("d0.9999")  # an eval-mode copy of the network
    """

    def __init__(
        self,
        net: nn.Module,
        profiles: Sequence[Profile] | None = None,
        *,
        decays: Sequence[float] = (),
        halflife_kimg: Sequence[float] = (),
        rampup_ratio: float | None = None,
        first: str | None = None,
    ) -> None:
        super().__init__()
        if profiles is None:
            profiles = make_profiles(decays, halflife_kimg, rampup_ratio)
        elif decays or halflife_kimg or rampup_ratio is not None:
            raise ValueError("EMA: give either profiles or decays/halflife_kimg/rampup_ratio, not both")
        self.profiles = list(profiles)
        if first is not None:
            # The first profile is the one snapshots, previews and FID use; the config lists decays before half-lives.
            names = [p.name for p in self.profiles]
            if first not in names:
                raise ValueError(f"EMA first={first!r} is not one of its profiles {names}; name one of them")
            self.profiles.sort(key=lambda p: p.name != first)
        self.first = first
        self.copies = nn.ModuleDict()
        for p in self.profiles:
            c = copy.deepcopy(net).eval().requires_grad_(False)
            self.copies[p.name.replace(".", "_")] = c

    @property
    def spec(self) -> dict[str, Any]:
        """The ``_target_`` spec of this averaging rule (recorded in snapshots beside the profile name)."""
        profiles = [p for p in self.profiles if isinstance(p, EMAProfile)]
        return {
            "_target_": f"{type(self).__module__}.{type(self).__qualname__}",
            "decays": [p.decay for p in profiles if p.decay is not None],
            "halflife_kimg": [p.halflife_kimg for p in profiles if p.halflife_kimg is not None],
            "rampup_ratio": next((p.rampup_ratio for p in profiles if p.halflife_kimg is not None), None),
            **({"first": self.first} if self.first is not None else {}),
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


# ----------------------------------------------------------------------------------------------------------
# EDM2's power-function EMA ("Analyzing and Improving the Training Dynamics of Diffusion Models", Karras et al.
# 2024, the post-hoc EMA section; NVlabs/edm2 training/phema.py). Time t counts optimizer steps here.


def gamma_to_sigma_rel(gamma: float) -> float:
    """Standard deviation of the profile ``p_t(tau) ∝ tau^gamma`` on [0, t], relative to t (NVlabs/edm2
    training/phema.py ``exp_to_std``):
    ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``."""
    g = float(gamma)
    if not g > -1.0:
        raise ValueError(f"power-function EMA exponent gamma={g} must be > -1")
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Inverse of :func:`gamma_to_sigma_rel`: the largest real root of
    ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2) = 0`` with ``s = sigma_rel`` (the branch where wider means smaller
    gamma). Valid for ``0 < sigma_rel < SIGMA_REL_MAX``."""
    s = float(sigma_rel)
    if not 0.0 < s < SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel={s} must lie in (0, {SIGMA_REL_MAX:.4f}); EDM2 tracks 0.05 and 0.10")
    k = s**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    g = float(max(r.real for r in roots if abs(r.imag) <= 1e-7 * max(1.0, abs(r))))
    # One Newton step on (g + 1) k - (g + 2)^2 (g + 3) = 0 polishes the eigenvalue solver's root to float64.
    df = k - 2.0 * (g + 2.0) * (g + 3.0) - (g + 2.0) ** 2
    return g - ((g + 1.0) * k - (g + 2.0) ** 2 * (g + 3.0)) / df if df != 0 else g


# sigma_rel(gamma) peaks where d/dg log[(g + 1) / ((g + 2)^2 (g + 3))] = 0, i.e. g^2 + 3 g + 1 = 0: g = (sqrt(5) - 3) / 2.
SIGMA_REL_MAX = gamma_to_sigma_rel((math.sqrt(5.0) - 3.0) / 2.0)


def phema_name(sigma_rel: float) -> str:
    """Profile name of a power-function EMA, e.g. ``phema0.05`` (also its snapshots' suffix)."""
    return f"phema{sigma_rel:g}"


@dataclass(frozen=True)
class PowerProfile:
    """One power-function profile, ``beta_t = (1 - 1/t)^(gamma + 1)`` with t the optimizer steps done after this one.

    With constant batch size, ``t = (nimg + batch_size) / batch_size``. The weight of step s in the average at step t
    is then exactly ``(s^(g+1) - (s-1)^(g+1)) / t^(g+1)``, the continuous profile's mass on [s - 1, s].
    """

    name: str
    sigma_rel: float

    @property
    def gamma(self) -> float:
        return sigma_rel_to_gamma(self.sigma_rel)

    def beta(self, nimg: int, batch_size: int) -> float:
        t = (nimg + batch_size) / batch_size
        return (1.0 - 1.0 / t) ** (self.gamma + 1.0)


class PowerFunctionEMA(EMA):
    """EDM2's power-function EMA, one averaged copy per tracked ``sigma_rel`` (default 0.05 and 0.10).

    The copies are snapshotted by the loop like any EMA (``snapshot-<nimg>-phema0.1.safetensors`` every
    ``trainer.snapshot_kimg``), and ``scripts.posthoc_ema`` reconstructs any other width from them afterwards.
    """

    def __init__(self, net: nn.Module, sigma_rels: Sequence[float] = (0.05, 0.10)) -> None:
        if not sigma_rels:
            raise ValueError("ema.sigma_rels: give at least one width, e.g. [0.05, 0.10]")
        for s in sigma_rels:
            sigma_rel_to_gamma(s)  # refuses a width outside (0, SIGMA_REL_MAX)
        if len({phema_name(float(s)) for s in sigma_rels}) != len(sigma_rels):
            raise ValueError(f"ema.sigma_rels={list(sigma_rels)} lists a width twice")
        super().__init__(net, [PowerProfile(phema_name(float(s)), float(s)) for s in sigma_rels])

    @property
    def spec(self) -> dict[str, Any]:
        return {"_target_": f"{type(self).__module__}.{type(self).__qualname__}",
                "sigma_rels": [p.sigma_rel for p in self.profiles]}  # type: ignore[attr-defined]


def power_inner_product(t_a: np.ndarray, sigma_a: np.ndarray, t_b: np.ndarray, sigma_b: np.ndarray) -> np.ndarray:
    """``<p_a, p_b> = ∫ p_a(tau) p_b(tau) dtau`` of normalised power-function profiles, broadcast, float64.

    With ``p_t(tau) = (g + 1) tau^g / t^(g+1)`` on [0, t] and ``m = min(t_a, t_b)`` (the correlation from which
    NVlabs/edm2 training/phema.py ``solve_posthoc_coefficients`` builds its system):
    ``<p_a, p_b> = (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1))``,
    evaluated in logs so that long runs (t ~ 1e6 steps, g ~ 70) do not overflow.
    """
    ga = np.vectorize(sigma_rel_to_gamma, otypes=[np.float64])(np.asarray(sigma_a, np.float64))
    gb = np.vectorize(sigma_rel_to_gamma, otypes=[np.float64])(np.asarray(sigma_b, np.float64))
    ta, tb = np.asarray(t_a, np.float64), np.asarray(t_b, np.float64)
    log_m = np.log(np.minimum(ta, tb))
    log_val = (ga + gb + 1.0) * log_m - (ga + 1.0) * np.log(ta) - (gb + 1.0) * np.log(tb)
    return (ga + 1.0) * (gb + 1.0) / (ga + gb + 1.0) * np.exp(log_val)


def posthoc_coefficients(
    t_in: Sequence[float], sigma_in: Sequence[float], t_out: Sequence[float], sigma_out: Sequence[float]
) -> np.ndarray:
    """Coefficients (n_in, n_out) that combine stored power-function averages into target profiles.

    As in NVlabs/edm2 training/phema.py ``solve_posthoc_coefficients``: the least-squares fit of each target profile by the stored ones in L2 over tau: solve ``A x = b`` with the Gram
    matrix ``A_ij = <p_i, p_j>`` and ``b_ik = <p_i, p_out_k>`` in float64, then normalise every column to sum 1
    (every profile integrates to 1, so an exact fit already does; this removes the fit's residual scale).

    Args:
        t_in, sigma_in: time (optimizer steps) and width of each stored snapshot, n_in each.
        t_out, sigma_out: time and width of each target, n_out each.
    """
    t_in_a, s_in_a = np.asarray(t_in, np.float64), np.asarray(sigma_in, np.float64)
    t_out_a, s_out_a = np.asarray(t_out, np.float64), np.asarray(sigma_out, np.float64)
    gram = power_inner_product(t_in_a[:, None], s_in_a[:, None], t_in_a[None, :], s_in_a[None, :])
    rhs = power_inner_product(t_in_a[:, None], s_in_a[:, None], t_out_a[None, :], s_out_a[None, :])
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    total = x.sum(axis=0, keepdims=True)
    if not np.all(np.isfinite(x)) or np.any(np.abs(total) < 1e-12):
        raise ValueError("post-hoc EMA: the stored snapshots cannot represent the target profile (singular fit); "
                         "store more snapshots (a smaller trainer.snapshot_kimg)")
    return x / total
