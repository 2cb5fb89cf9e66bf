"""EDM preconditioning as a wrapper module over any backbone (Karras et al. 2022, Table 1 / Eq. 7).

``D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), y)`` with
``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``,
``c_noise = ln(sigma) / 4``. The wrapped backbone stays a pure network ``F(x, t, y)``; it receives ``c_noise`` as
its time input (its embedder's ``time_scale`` applies on top).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from gen.models.common import ModelOutput


def edm_coefficients(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma`` of any shape (EDM Table 1)."""
    sd2 = sigma_data**2
    denom = sigma**2 + sd2
    c_skip = sd2 / denom
    c_out = sigma * sigma_data / denom.sqrt()
    c_in = 1.0 / denom.sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """Wraps a backbone ``F(x, t, y)`` into the EDM denoiser ``D(x, sigma, y)``.

    Args:
        net: backbone with ``forward(x, t, y, **kwargs) -> Tensor[B, C, H, W]``.
        sigma_data: expected standard deviation of the data (0.5 for images in [-1, 1]).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not sigma_data > 0 or not math.isfinite(sigma_data):
            raise ValueError(f"sigma_data must be a positive number, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, sigma: Tensor | float, y: Tensor | None = None, **net_kwargs: Any) -> ModelOutput:
        """Denoise.

        Args:
            x: noisy input ``(B, C, H, W)``.
            sigma: noise level, a float or ``(B,)``.
            y: labels ``(B,)`` (the null class handled by the backbone), or None.
            **net_kwargs: passed through to the backbone (e.g. ``return_features``; then only the image output
                is preconditioned and the features are returned alongside it).

        Returns:
            ``D(x, sigma)`` with the shape of ``x``, in float32 (float64 if ``x`` is float64).
        """
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        bshape = (-1,) + (1,) * (x.ndim - 1)
        xf = x.to(dtype)
        res: ModelOutput = self.net((c_in.reshape(bshape) * xf).to(x.dtype), c_noise.to(x.dtype), y, **net_kwargs)
        d = c_skip.reshape(bshape) * xf + c_out.reshape(bshape) * res.out.to(dtype)
        return dataclasses.replace(res, out=d)


def consistency_coefficients(
    sigma: Tensor, sigma_data: float = 0.5, sigma_min: float = 0.002
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` of a consistency model with the boundary at ``sigma_min`` (float64 in,
    float64 out).

    Song et al. 2023, "Consistency Models", Appendix C / openai/consistency_models cm/karras_diffusion.py
    ``get_scalings_for_boundary_condition``: ``c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2)``,
    ``c_out = sd (sigma - sigma_min) / sqrt(sigma^2 + sd^2)``, ``c_in = 1 / sqrt(sigma^2 + sd^2)``; ``c_noise`` is
    EDM's ``ln(sigma) / 4`` (our backbones scale their time input themselves). At ``sigma = sigma_min`` these give
    exactly ``c_skip = 1`` and ``c_out = 0``, hence ``f(x, sigma_min) = x``.
    """
    sd2 = sigma_data**2
    shifted = sigma - sigma_min
    c_skip = sd2 / (shifted**2 + sd2)
    c_out = sigma_data * shifted / (sigma**2 + sd2).sqrt()
    c_in = 1.0 / (sigma**2 + sd2).sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


class ConsistencyPrecond(nn.Module):
    """Wraps a backbone ``F(x, t, y)`` into the consistency function ``f(x, sigma, y)`` (``consistency_coefficients``).

    ``f(x, sigma_min) = x`` bit for bit: the coefficients are computed in float64 from ``sigma`` and from ``sigma_min``
    rounded to ``sigma``'s own dtype first, so a float32 ``sigma`` equal to float32(sigma_min) gives ``c_out = 0`` and
    ``c_skip = 1`` exactly.

    Args:
        net: backbone with ``forward(x, t, y, **kwargs) -> ModelOutput``.
        sigma_data: expected standard deviation of the data.
        sigma_min: the boundary noise level (0.002 in CM/iCT).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002) -> None:
        super().__init__()
        if not sigma_data > 0 or not math.isfinite(sigma_data):
            raise ValueError(f"sigma_data must be a positive number, got {sigma_data}")
        if not sigma_min > 0 or not math.isfinite(sigma_min):
            raise ValueError(f"sigma_min must be a positive number, got {sigma_min}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)

    def forward(self, x: Tensor, sigma: Tensor | float, y: Tensor | None = None, **net_kwargs: Any) -> ModelOutput:
        """``f(x, sigma)`` with the shape of ``x``, float32 (float64 for float64 ``x``); ``sigma`` a float or ``(B,)``."""
        dtype, sigma = _output_dtype_and_sigma(x, sigma)
        # sigma_min in sigma's precision, then both in float64: the shift is exactly 0 at the boundary.
        s_min = float(torch.tensor(self.sigma_min, dtype=sigma.dtype))
        c_skip, c_out, c_in, c_noise = consistency_coefficients(sigma.double(), self.sigma_data, s_min)
        bshape = (-1,) + (1,) * (x.ndim - 1)
        xf = x.to(torch.float64)
        res: ModelOutput = self.net((c_in.reshape(bshape) * xf).to(x.dtype), c_noise.to(x.dtype), y, **net_kwargs)
        f = c_skip.reshape(bshape) * xf + c_out.reshape(bshape) * res.out.to(torch.float64)
        return dataclasses.replace(res, out=f.to(dtype))


def _output_dtype_and_sigma(x: Tensor, sigma: Tensor | float) -> tuple[torch.dtype, Tensor]:
    """The output dtype (float64 for float64 ``x``, else float32) and ``sigma`` as a floating (B,) tensor on ``x``'s
    device, keeping a given tensor's precision (the boundary shift is computed in it)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigma = sigma.to(x.device) if isinstance(sigma, Tensor) else torch.tensor(float(sigma), dtype=dtype, device=x.device)
    if not sigma.is_floating_point():
        sigma = sigma.to(dtype)
    return dtype, sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


class FlowConsistencyPrecond(nn.Module):
    """A consistency function ``f(x, sigma, y)`` in EDM sigma coordinates around a rectified-flow velocity backbone.

    The flow path (data at t=0) is ``x_t = (1 - t) x0 + t eps`` and the EDM path ``x = x0 + sigma eps``; they carry
    the same image after rescaling: ``x_t = x / (1 + sigma)`` at ``t = sigma / (1 + sigma)``. The flow teacher's
    clean-image estimate there is ``D(x, sigma) = x_t - t v(x_t, t) = x / (1 + sigma) - sigma / (1 + sigma) v``.
    The consistency function shifts the outer coefficients to the boundary, with ``delta = sigma - sigma_min``::

        f(x, sigma) = x / (1 + delta) - delta / (1 + delta) * v(x / (1 + sigma), sigma / (1 + sigma))

    so ``f(x, sigma_min) = x`` exactly and ``f = D`` up to O(sigma_min) elsewhere (the same shift as ECT's
    ``ECMPrecond``, "Consistency Models Made Easy", locuslab/ect training/networks.py, applied to the flow's own
    coefficients). A flow snapshot therefore starts ECT as its own denoiser, with no retraining of the time input.

    Args:
        net: velocity backbone ``forward(x_t, t, y) -> ModelOutput`` trained on ``gen.paths.LinearPath``.
        sigma_min: the boundary noise level (0.002).
    """

    def __init__(self, net: nn.Module, sigma_min: float = 0.002) -> None:
        super().__init__()
        if not sigma_min > 0 or not math.isfinite(sigma_min):
            raise ValueError(f"sigma_min must be a positive number, got {sigma_min}")
        self.net = net
        self.sigma_min = float(sigma_min)

    def forward(self, x: Tensor, sigma: Tensor | float, y: Tensor | None = None, **net_kwargs: Any) -> ModelOutput:
        """``f(x, sigma)`` with the shape of ``x``, float32 (float64 for float64 ``x``); ``sigma`` a float or ``(B,)``."""
        dtype, sigma = _output_dtype_and_sigma(x, sigma)
        s_min = float(torch.tensor(self.sigma_min, dtype=sigma.dtype))
        s = sigma.double()
        delta = s - s_min
        bshape = (-1,) + (1,) * (x.ndim - 1)
        xf = x.to(torch.float64)
        x_t = xf / (1.0 + s).reshape(bshape)
        res: ModelOutput = self.net(x_t.to(x.dtype), (s / (1.0 + s)).to(x.dtype), y, **net_kwargs)
        d = delta.reshape(bshape)
        f = xf / (1.0 + d) - d / (1.0 + d) * res.out.to(torch.float64)
        return dataclasses.replace(res, out=f.to(dtype))


class EDMFlowPrecond(nn.Module):
    """A rectified-flow velocity ``v(x_t, t, y)`` on ``gen.paths.LinearPath`` around an EDM-preconditioned backbone.

    2-rectified flow++ starts its student from an EDM model read as a 1-rectified flow ("Improving the Training of
    Rectified Flows", Lee, Lin & Fanti 2024, Sec. 5; sangyun884/rfpp). The two paths carry the same image after
    rescaling: ``x_t = (1 - t) x0 + t eps`` is ``x = x_t / (1 - t)`` on the EDM path at ``sigma = t / (1 - t)``, and the
    velocity from EDM's clean-image estimate ``D`` is ``v = (x_t - D(x, sigma)) / t``. Written in ``t`` with
    ``r = sqrt(t^2 + sd^2 (1 - t)^2)`` the EDM coefficients stay finite up to ``t = 1`` (pure noise, where a 1-step
    sample starts)::

        c_in x = x_t / r,   c_skip x = sd^2 (1 - t) x_t / r^2,   c_out = t sd / r,   c_noise = ln(sigma) / 4

    and only the network's noise input needs a bound: ``sigma`` is clamped to ``sigma_max`` there (EDM's largest
    trained level; ``t = 1`` reads as ``sigma_max``). Below ``t = sigma_max / (1 + sigma_max)`` the velocity is exactly
    the EDM model's; the weights are the EDM snapshot's, unchanged.

    Args:
        net: the EDM backbone ``F(x, c_noise, y)`` (an ``objective=edm`` snapshot's network).
        sigma_data: EDM's sigma_data (0.5).
        sigma_max: the clamp of the noise input (80).
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5, sigma_max: float = 80.0) -> None:
        super().__init__()
        for name, value in (("sigma_data", sigma_data), ("sigma_max", sigma_max)):
            if not value > 0 or not math.isfinite(value):
                raise ValueError(f"{name} must be a positive number, got {value}")
        self.net = net
        self.sigma_data, self.sigma_max = float(sigma_data), float(sigma_max)

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, **net_kwargs: Any) -> ModelOutput:
        """``v(x_t, t)`` with the shape of ``x``, float32 (float64 for float64 ``x``); ``t`` in (0, 1], a float or (B,)."""
        dtype, t = _output_dtype_and_sigma(x, t)
        t = t.double()
        sd = self.sigma_data
        r = (t.square() + sd**2 * (1.0 - t).square()).sqrt()
        sigma = (t / (1.0 - t)).clamp(max=self.sigma_max)  # t = 1 gives inf, clamped to sigma_max
        bshape = (-1,) + (1,) * (x.ndim - 1)
        xf = x.to(torch.float64)
        c_noise = sigma.log() / 4.0
        res: ModelOutput = self.net((xf / r.reshape(bshape)).to(x.dtype), c_noise.to(x.dtype), y, **net_kwargs)
        d = (sd**2 * (1.0 - t) / r.square()).reshape(bshape) * xf + (t * sd / r).reshape(bshape) * res.out.to(torch.float64)
        v = (xf - d) / t.reshape(bshape)
        return dataclasses.replace(res, out=v.to(dtype))
