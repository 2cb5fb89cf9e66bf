"""Heun (explicit trapezoidal) ODE sampler, EDM's Algorithm 1 without churn (objectives.md Sec. 1.4).

Each interval takes an Euler predictor and, unless the next time is 0, a trapezoidal corrector
``x_{i+1} = x_i + h (v(x_i, t_i) + v(x', t_{i+1})) / 2``. The last step to ``t = 0`` is Euler only, because the
velocity at t = 0 is ill-defined for data-prediction models (sigma = 0). NFE accounting: with N intervals and
``ts[-1] = 0``, NFE = 2N - 1 (EDM: N = 18 -> 35); with a grid that does not reach 0 (not produced by
``samplers.grids``) it would be 2N.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gen.paths import Path
from samplers._common import Callback, ModelFn, RandnLike, call, check_inputs, denoised, prior


def heun_nfe(steps: int) -> int:
    """Number of model evaluations of ``sample_heun`` on a grid with ``steps`` intervals ending at 0."""
    return 2 * steps - 1


@torch.no_grad()
def sample_heun(
    model_fn: ModelFn,
    noise: Tensor,
    ts: Tensor,
    *,
    path: Path,
    y: Tensor | None = None,
    callback: Callback | None = None,
    randn_like: RandnLike = torch.randn_like,
) -> Tensor:
    """Integrate the probability-flow ODE with Heun's second-order method (Euler on the last step).

    Args:
        model_fn: ``(x (B, C, H, W), t (B,), y) -> velocity``.
        noise: unit Gaussian noise; the state starts at ``sigma(ts[0]) * noise`` and keeps its dtype.
        ts: descending grid ending at 0.
        path: the path the model was trained on.
        y: labels ``(B,)`` or None.
        callback: called once per interval with ``{"x", "i", "t", "t_next", "denoised"}`` (the predictor's x0).
        randn_like: unused (deterministic sampler).

    Returns:
        Samples at ``t = 0``.
    """
    check_inputs(noise, ts)
    grid = [float(t) for t in ts]
    x = prior(noise, grid[0], path)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        h = t_next - t
        v = call(model_fn, x, t, y)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "t_next": t_next, "denoised": denoised(path, x, v, t)})
        x_pred = x + h * v
        if t_next == 0.0:
            x = x_pred
        else:
            v_next = call(model_fn, x_pred, t_next, y)
            x = x + 0.5 * h * (v + v_next)
    return x
