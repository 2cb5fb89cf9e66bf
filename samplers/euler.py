"""Euler ODE sampler for ``dx/dt = v(x, t)`` from ``t_max`` down to 0 (Liu et al. 2023, "Flow Straight and Fast").

``x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)``; NFE = number of intervals = ``len(ts) - 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gen.paths import Path
from samplers._common import Callback, ModelFn, RandnLike, State, call, check_inputs, denoised, prior


def sample_euler(
    model_fn: ModelFn,
    noise: State,
    ts: Tensor,
    *,
    path: Path,
    y: Tensor | None = None,
    callback: Callback | None = None,
    randn_like: RandnLike = torch.randn_like,
) -> State:
    """Integrate the probability-flow ODE with Euler steps.

    Args:
        model_fn: ``(x (B, C, H, W), t (B,), y) -> velocity``.
        noise: unit Gaussian noise ``(B, C, H, W)``; the state starts at ``sigma(ts[0]) * noise``. Its dtype is the
            dtype of the whole integration (float32, or float64 in tests).
        ts: descending grid ending at 0 (``samplers.grids``).
        path: the path the model was trained on.
        y: labels ``(B,)`` or None.
        callback: called after each model evaluation with ``{"x", "i", "t", "t_next", "denoised"}``.
        randn_like: unused (deterministic sampler); accepted so every sampler has the same signature.

    Returns:
        Samples ``x`` at ``t = ts[-1]`` (0), shape of ``noise``.
    """
    check_inputs(noise, ts)
    grid = [float(t) for t in ts]
    x = prior(noise, grid[0], path)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = call(model_fn, x, t, y)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "t_next": t_next, "denoised": denoised(path, x, v, t)})
        x = x + (t_next - t) * v
    return x
