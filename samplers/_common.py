"""Shared types and helpers of the samplers (internal)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gen.paths import Path

# model_fn(x (B, C, H, W), t (B,), y (B,) | None) -> velocity dx/dt in path time, shape of x.
ModelFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
# callback({"x": state before the step, "i": step index, "t": current time, "denoised": x0 estimate, ...})
Callback = Callable[[dict[str, Any]], None]
RandnLike = Callable[[Tensor], Tensor]


def check_inputs(noise: Tensor, ts: Tensor) -> None:
    """Validate a sampler's noise and grid (1-D, strictly decreasing, ending at 0)."""
    if not noise.is_floating_point():
        raise TypeError(f"noise must be floating point, got {noise.dtype}")
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"ts must be a 1-D grid with >= 2 entries, got shape {tuple(ts.shape)}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("ts must be strictly decreasing (from t_max towards 0)")
    if ts[-1].item() < 0:
        raise ValueError("ts must not go below 0")


def prior(noise: Tensor, t0: float, path: Path) -> Tensor:
    """Initial state at ``t0``: unit noise scaled by ``sigma(t0)`` (the data term ``alpha(t0) x0`` is dropped)."""
    return noise * path.sigma(torch.tensor(t0, dtype=torch.float64)).item()


def tvec(t: float, x: Tensor) -> Tensor:
    """The time as a ``(B,)`` tensor in x's dtype for the model call."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def call(model_fn: ModelFn, x: Tensor, t: float, y: Tensor | None) -> Tensor:
    """Evaluate the velocity and bring it to the state's dtype (casting only at the net call)."""
    return model_fn(x, tvec(t, x), y).to(x.dtype)


def denoised(path: Path, x: Tensor, v: Tensor, t: float) -> Tensor:
    """x0 estimate from the velocity (for callbacks and data-prediction solvers)."""
    return path.x0_eps_from_velocity(x, v, t)[0].to(x.dtype)
