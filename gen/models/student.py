"""Few-step student wrappers over a rectified-flow velocity backbone: an extra scalar condition and SLAM's boundary.

Two distilled students need one more input than the teacher's ``(x, t, y)``:

* TDM-unify conditions the student (and its fake score) on the number of sampling steps K (Luo et al. 2025,
  "Learning Few-Step Diffusion Models by Trajectory Distribution Matching", the sampling-steps-aware
  objective; official code Luo-Yihong/TDM).
* SLAM conditions the student on the position gamma in [0, 1] along a sub-path (Xu et al. 2024, "Accelerating Image
  Generation with Sub-path Linear Approximation Model"; official code MCG-NJU/SPLAM,
  ``splam/train_splam_distill_sd_wds.py``, which feeds ``emb(10 - 10 gamma)`` through the UNet's ``time_cond_proj``,
  LCM's guidance-embedding slot).

Here the scalar goes through the backbone's augmentation-condition slot (``augment``, ``augment_dim``; a bias-free,
zero-initialised linear map added to the time embedding, ``gen.models.common.make_augment_embedder``): the same role
as ``time_cond_proj`` and, being zero at initialisation, the student starts as exactly the teacher. The scalar is
embedded as LCM's guidance-scale embedding does (``sincos`` of ``1000 w``; Luo et al. 2023, "Latent Consistency
Models", official code luosiallen/latent-consistency-model, ``guidance_scale_embedding``).

Time convention: ``gen.paths.LinearPath`` (data at t = 0, ``x_t = (1 - t) x0 + t eps``, velocity ``eps - x0``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from gen.models.common import ModelOutput


def condition_embedding(value: Tensor, dim: int) -> Tensor:
    """LCM's scalar embedding ``[sin(1000 w omega_i), cos(1000 w omega_i)]``: (B,) -> (B, dim) float32.

    ``omega_i = 10000^(-i / (dim/2 - 1))``, i = 0 .. dim/2 - 1, so the frequencies run from 1 to exactly 1e-4 (VDM's
    and LCM's ``guidance_scale_embedding``, copied by MCG-NJU/SPLAM ``train_splam_distill_sd_wds.py`` for gamma), not
    the ``10000^(-i / (dim/2))`` of the position tables (``gen.nn.pos_embed.sincos_1d``). Computed in float64: the
    angles reach 1000 * 10 rad, where float32 (the official code's dtype) keeps only about 3 decimals.
    """
    half = int(dim) // 2
    if int(dim) % 2 or half < 2:
        raise ValueError(f"the condition embedding needs an even width >= 4, got {dim}")
    # float64 where the device has it (every step of a student calls this: no round trip to the host); MPS has none
    device = value.device if value.device.type != "mps" else torch.device("cpu")
    omega = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=device) / (half - 1))
    ang = 1000.0 * value.to(device=device, dtype=torch.float64).reshape(-1, 1) * omega  # (B, dim/2)
    return torch.cat([ang.sin(), ang.cos()], -1).float().to(value.device)


def takes_condition(net: nn.Module) -> int:
    """Width of the backbone's extra-condition slot (``augment_dim``); 0 when it has none (or lacks the slot).

    Wrappers that hold the backbone as ``.net`` (``gen.models.rows.MinRows``) are looked through."""
    while not hasattr(net, "augment_dim") and isinstance(getattr(net, "net", None), nn.Module):
        net = net.net
    return int(getattr(net, "augment_dim", 0) or 0)


def lcm_boundary(t: Tensor, sigma_data: float = 0.5, time_scale: float = 10_000.0) -> tuple[Tensor, Tensor]:
    """LCM/SLAM boundary scalings ``c_skip = sd^2 / ((s t)^2 + sd^2)``, ``c_out = s t / sqrt((s t)^2 + sd^2)``.

    The official code scales the integer DDPM step (0..999) by 10; in continuous time that is ``s = 10 * 1000``.
    ``c_skip(0) = 1``, ``c_out(0) = 0``: the boundary condition ``f(x, 0) = x``. (B,) float64 in, (B,) float64 out.
    """
    scaled = time_scale * t.double()
    denom = scaled.square() + sigma_data**2
    return sigma_data**2 / denom, scaled / denom.sqrt()


class StepConditioned(nn.Module):
    """A TDM-unify student (or fake score): the backbone with ``augment = condition_embedding(K)``.

    Args:
        net: velocity backbone with an extra-condition slot of width ``dim`` (``augment_dim``).
        dim: the embedding width.
        steps: the K used when a call gives none (the snapshot's sampler steps).
    """

    def __init__(self, net: nn.Module, dim: int, steps: int = 4) -> None:
        super().__init__()
        if takes_condition(net) != int(dim):
            raise ValueError(f"the backbone's extra-condition slot is {takes_condition(net)} wide, not {dim}; build "
                             f"it with augment_dim={dim}")
        self.net, self.dim, self.steps = net, int(dim), int(steps)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, num_steps: Tensor | int | None = None,
                **net_kwargs: Any) -> ModelOutput:
        """``net(x, t, y, augment=emb(K))``; ``num_steps`` (B,) or an int, default ``steps``."""
        k = self.steps if num_steps is None else num_steps
        k = torch.as_tensor(k, dtype=torch.float64, device=x.device).expand(x.shape[0])
        return self.net(x, t, y, augment=condition_embedding(k, self.dim), **net_kwargs)


class SubpathConsistency(nn.Module):
    """SLAM's consistency function ``f(x, t, y; gamma, sigma~)`` around a velocity backbone (MCG-NJU/SPLAM
    ``train_splam_distill_sd_wds.py``).

    ``f = c_skip(t) x + c_out(t) x0_hat``. The official code reads its epsilon network's output at the interpolated
    noise level: ``x0_hat = (x - sigma~ eps_hat) / alpha_t`` (``predicted_origin_splam``). Our backbones predict the
    velocity ``v = eps - x0``, so the same reading is the pair ``(x0_hat, eps_hat)`` with ``eps_hat - x0_hat = v``
    and ``alpha_t x0_hat + sigma~ eps_hat = x``: ``x0_hat = (x - sigma~ v) / (alpha_t + sigma~)``, the network's output
    taken at noise level ``sigma~`` instead of ``sigma_t``. At ``gamma = 1`` (``sigma~ = sigma_t``, sampling) it is the
    teacher's ``x - t v``. (Deriving ``eps_hat = x + (1 - t) v`` at level ``sigma_t`` and then dividing by
    ``alpha_t`` asks a velocity network for a 4-5x larger output at the top levels for gamma near 0; the yardstick
    student collapsed with it: 1-step FID above 600 within 16k images.) The backbone is conditioned on
    ``emb(10 - 10 gamma)``.

    Args:
        net: velocity backbone on ``LinearPath`` with an extra-condition slot of width ``gamma_dim``.
        gamma_dim: the gamma embedding's width.
        sigma_data, time_scale: the boundary scalings (``lcm_boundary``; 0.5 and 10 x 1000).
    """

    def __init__(self, net: nn.Module, gamma_dim: int, sigma_data: float = 0.5, time_scale: float = 10_000.0) -> None:
        super().__init__()
        if takes_condition(net) != int(gamma_dim):
            raise ValueError(f"the backbone's extra-condition slot is {takes_condition(net)} wide, not {gamma_dim}; "
                             f"build it with augment_dim={gamma_dim}")
        self.net, self.gamma_dim = net, int(gamma_dim)
        self.sigma_data, self.time_scale = float(sigma_data), float(time_scale)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, gamma: Tensor | None = None,
                noise_level: Tensor | None = None, **net_kwargs: Any) -> ModelOutput:
        """``f`` (B, C, H, W) float32 (float64 for float64 x); ``gamma`` and ``noise_level`` (B,), default 1 and t."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = torch.as_tensor(t, device=x.device)
        t = (t if t.is_floating_point() else t.to(dtype)).expand(x.shape[0])
        gamma = torch.ones_like(t, dtype=torch.float64) if gamma is None else gamma.double()
        emb = condition_embedding(10.0 - 10.0 * gamma, self.gamma_dim)
        res: ModelOutput = self.net(x, t.to(x.dtype), y, augment=emb, **net_kwargs)
        bshape = (-1,) + (1,) * (x.ndim - 1)
        td = t.double().reshape(bshape)
        xf, v = x.double(), res.out.double()
        s_tilde = td if noise_level is None else noise_level.double().reshape(bshape)
        x0_hat = (xf - s_tilde * v) / (1.0 - td + s_tilde)  # LinearPath: alpha_t = 1 - t, v = eps - x0
        c_skip, c_out = lcm_boundary(t.double(), self.sigma_data, self.time_scale)
        f = c_skip.reshape(bshape) * xf + c_out.reshape(bshape) * x0_hat
        return dataclasses.replace(res, out=f.to(dtype))
