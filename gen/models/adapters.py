"""Adapters: the one boundary where foreign time and prediction conventions meet ours.

Our convention (``gen/paths.py``): data at ``t = 0``, noise at ``t = 1`` (or ``sigma_max``),
``x_t = alpha(t) x0 + sigma(t) eps``, and samplers integrate the velocity ``dx/dt`` from noise to data. A network
trained elsewhere is wrapped here, once, and then runs with every sampler, guidance wrapper and the DDT
encoder-sharing sampler unchanged. Each adapter is an ``nn.Module`` with the backbone call signature
``(x, t, y, **kwargs)`` in *our* time, and ``prediction_spec()`` gives the spec for
``gen.models.prediction.velocity_model`` / ``pipeline.Generator``.

``FlippedTimeVelocity`` (SiT, LightningDiT, DDT; willisma/SiT transport/path.py, hustvl/LightningDiT transport/): they put data at ``s = 1`` with
``x_s = s x0 + (1 - s) eps`` and predict ``v_s = dx_s/ds = x0 - eps``. With ``s = 1 - t`` the state is the same
tensor as our linear-path ``x_t``, and ``v_ours = dx/dt = -v_s``. So the adapter feeds ``1 - t`` and returns
``-v``. Time enters their embedders unscaled: build the backbone with

* SiT / LightningDiT weights: ``time_scale=1`` (t in [0, 1] goes straight into DiT's sinusoid, ``max_period=1e4``);
* DDT weights: ``time_scale=1, max_period=10`` (our DDT defaults).

``DDPMEpsilon`` (DiT's 1000-step VP models; facebookresearch/DiT diffusion/gaussian_diffusion.py): ``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps``
with linear betas 1e-4..0.02 and the integer step ``k`` fed to the embedder. A state of any of our paths at time
``t`` has the noise ratio ``r = sigma / alpha``; the DDPM step with the same ratio has ``abar = 1 / (1 + r^2)``
and the state ``x_t / sqrt(alpha^2 + sigma^2)``. The adapter finds the (fractional) step ``k`` by interpolating
``log r_k`` of the discrete schedule linearly, rescales the input, calls the net with ``k`` and returns its epsilon
(``eps`` is the same on every path), or the velocity on the chosen path. Build the DiT backbone with
``time_scale=1`` (the official embedder receives k in [0, 999]) and ``learn_sigma=True``; the adapter keeps the
first C output channels (epsilon) and drops DiT's variance channels.

Which path to sample an epsilon model on: the DDPM covers noise ratios ``[r_0, r_999] = [0.01, 157.4]`` only, and
``velocity_from_eps`` divides by alpha. Use ``EDMPath(sigma_max=adapter.sigma_max)`` (time = noise ratio; EDM's
Karras grid fits) or the linear path with ``t_max = adapter.t_max(LinearPath())``; never start at ``t = 1`` of the
linear path (alpha = 0 there).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gen.models.common import ModelOutput
from gen.paths import Path

__all__ = ["FlippedTimeVelocity", "DDPMEpsilon", "ddpm_alphas_cumprod"]


def _first_channels(result: ModelOutput, channels: int | None) -> ModelOutput:
    """Keep the first ``channels`` output channels of the image output (DiT's learn_sigma: epsilon only)."""
    return result if channels is None else dataclasses.replace(result, out=result.out[:, :channels])


class FlippedTimeVelocity(nn.Module):
    """A velocity model with data at ``t = 1`` (SiT, LightningDiT, DDT) seen in our convention.

    ``forward(x, t, y) = -net(x, 1 - t, y)``. Keyword arguments go to the net unchanged, so DDT's ``encoder_out``
    (encoder sharing), ``return_features`` and ``extra_token`` work on the adapted net; the encoder output and
    features are returned as they are (they are not velocities).

    Args:
        net: backbone ``net(x, s, y, **kwargs)`` with the foreign time ``s`` (data at s = 1) and velocity
            ``x0 - eps``; built with the foreign ``time_scale`` (see the module docstring).
        out_channels: keep only this many leading output channels (SiT keeps DiT's 8-channel learn_sigma
            output's first 4); None keeps all.
    """

    def __init__(self, net: nn.Module, out_channels: int | None = None) -> None:
        super().__init__()
        if out_channels is not None and out_channels < 1:
            raise ValueError(f"out_channels must be >= 1 or None, got {out_channels}")
        self.net = net
        self.out_channels = out_channels

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, **net_kwargs: Any) -> Any:
        """Velocity ``dx/dt`` in our time.

        Args:
            x: (B, C, H, W) state, the same tensor in both conventions.
            t: (B,) or scalar, our time (data at 0).
            y: (B,) labels or None.
            **net_kwargs: passed to the net (``return_features``, ``extra_token``, ``encoder_out``).

        Returns:
            The net's ``ModelOutput`` with the velocities negated (``out``, and REG's ``extra``, a velocity in the
            same convention); features and DDT's ``encoder_out`` pass through.
        """
        s = 1.0 - torch.as_tensor(t, device=x.device)  # their time: data at s = 1
        res = _first_channels(self.net(x, s, y, **net_kwargs), self.out_channels)
        return dataclasses.replace(res, out=-res.out, extra=None if res.extra is None else -res.extra)

    def prediction_spec(self) -> dict[str, Any]:
        """Spec for ``gen.models.prediction.velocity_model``: a velocity on our linear path."""
        return {"path": {"_target_": "gen.paths.LinearPath"}, "prediction": "velocity", "precond": None}


def ddpm_alphas_cumprod(
    num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """``abar_k = prod_{i <= k} (1 - beta_i)`` of DDPM's linear schedule, k = 0..T-1, float64 ``(T,)``.

    As in DiT (``get_named_beta_schedule("linear")``), the betas are scaled by ``1000 / T`` so that other step
    counts cover the same noise range (Ho et al. 2020, Sec. 4).
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if not 0 < beta_start < beta_end < 1:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    scale = 1000.0 / num_steps
    betas = torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)
    if not bool((betas < 1).all()):
        raise ValueError(f"betas reach 1 with num_steps={num_steps}; use more steps")
    return torch.cumprod(1.0 - betas, dim=0)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of increasing knots ``(xp, fp)`` at ``x``, clamped to the end values."""
    x = x.clamp(xp[0], xp[-1])
    i = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


class DDPMEpsilon(nn.Module):
    """A DiT-style discrete-time epsilon model (VP, T steps, linear betas) on one of our paths.

    At our time t on ``path``: ``r = sigma(t) / alpha(t)``; step ``k`` = the (fractional) DDPM step whose
    ``r_k = sqrt((1 - abar_k) / abar_k)`` equals r, interpolated linearly in ``log r`` between integer steps and
    clamped to ``[0, T - 1]``; the net sees ``x / sqrt(alpha^2 + sigma^2)`` (the VP state with the same noise
    ratio) and ``k``.

    Args:
        net: backbone ``net(x_vp, k, y, **kwargs)`` taking the DDPM step index (build DiT with ``time_scale=1``).
        path: the path of our samplers (``EDMPath(sigma_max=self.sigma_max)`` recommended; see module docstring).
        num_steps, beta_start, beta_end: the DDPM schedule (DiT: 1000, 1e-4, 0.02).
        out_channels: keep this many leading channels (DiT's learn_sigma: C of 2C); None keeps all.
        output: ``"eps"`` (the net's epsilon, prediction kind "eps") or ``"velocity"`` (converted on ``path``).
    """

    def __init__(
        self,
        net: nn.Module,
        path: Path,
        *,
        num_steps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        out_channels: int | None = None,
        output: Literal["eps", "velocity"] = "eps",
    ) -> None:
        super().__init__()
        if output not in ("eps", "velocity"):
            raise ValueError(f"output must be 'eps' or 'velocity', got {output!r}")
        if out_channels is not None and out_channels < 1:
            raise ValueError(f"out_channels must be >= 1 or None, got {out_channels}")
        self.net = net
        self.path = path
        self.out_channels = out_channels
        self.output = output
        self.schedule = {"num_steps": int(num_steps), "beta_start": float(beta_start), "beta_end": float(beta_end)}
        abar = ddpm_alphas_cumprod(num_steps, beta_start, beta_end)
        # Knots of k(log r); not persistent: a function of the schedule, not weights.
        self.register_buffer("log_ratio", 0.5 * torch.log((1.0 - abar) / abar), persistent=False)
        self.register_buffer("steps", torch.arange(num_steps, dtype=torch.float64), persistent=False)

    @property
    def sigma_min(self) -> float:
        """Noise ratio ``r_0`` of the first DDPM step (0.01 for DiT)."""
        return math.exp(float(self.log_ratio[0]))

    @property
    def sigma_max(self) -> float:
        """Noise ratio ``r_{T-1}`` of the last DDPM step (157.4 for DiT): the EDM-path ``sigma_max`` to sample from."""
        return math.exp(float(self.log_ratio[-1]))

    def t_max(self, path: Path | None = None) -> float:
        """The time on ``path`` (default: the adapter's) whose noise ratio is ``sigma_max``: where sampling starts."""
        p = self.path if path is None else path
        return float(p.t_from_noise_ratio(torch.tensor(self.sigma_max, dtype=torch.float64)))

    def timestep(self, t: Tensor) -> Tensor:
        """Our times ``(B,)`` -> fractional DDPM steps ``(B,)`` in ``[0, T - 1]`` (float64)."""
        t = t.to(torch.float64)
        log_r = torch.log(self.path.sigma(t)) - torch.log(self.path.alpha(t))
        return _interp(log_r, self.log_ratio.to(t.device), self.steps.to(t.device))

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, **net_kwargs: Any) -> Any:
        """Epsilon (or velocity) at our time ``t``.

        Args:
            x: (B, C, H, W) state of ``path`` at ``t``.
            t: (B,) or scalar, our time on ``path``.
            y: (B,) labels or None.
            **net_kwargs: passed to the net (``return_features``, ``extra_token``); only the image output is
                converted.

        Returns:
            The net's ``ModelOutput`` with ``out`` = eps (or velocity) (B, C_out, H, W) in float32 (float64 for
            float64 x).
        """
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        tt = torch.as_tensor(t, device=x.device, dtype=torch.float64)
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        k = self.timestep(tt)  # (B,)
        a, s = self.path.alpha(tt), self.path.sigma(tt)
        scale = torch.rsqrt(a**2 + s**2).reshape(-1, *([1] * (x.ndim - 1)))  # VP state = x / sqrt(a^2 + s^2)
        x_vp = (x.to(torch.float64) * scale).to(x.dtype)
        res = _first_channels(self.net(x_vp, k.to(x.dtype), y, **net_kwargs), self.out_channels)
        out = res.out.to(dtype)
        if self.output == "velocity":
            out = self.path.to_velocity("eps", x.to(dtype), out, tt.to(dtype))
        return dataclasses.replace(res, out=out)

    def prediction_spec(self) -> dict[str, Any]:
        """Spec for ``gen.models.prediction.velocity_model`` on the adapter's path."""
        return {"path": dict(self.path.config), "prediction": self.output, "precond": None}
