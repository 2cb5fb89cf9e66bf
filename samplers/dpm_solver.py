"""DPM-Solver++(2M): second-order multistep solver in data-prediction form (Lu et al. 2022, Alg. 2).

With ``lambda(t) = log(alpha / sigma)`` (``Path.log_snr``), ``h_i = lambda_{i+1} - lambda_i`` and ``D_i`` the x0 estimate
from the velocity at ``(x_i, t_i)``, one step is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h_i}) D'_i,
    D'_i = (1 + 1 / (2 r_i)) D_i - 1 / (2 r_i) D_{i-1},   r_i = h_{i-1} / h_i,

and ``D'_0 = D_0`` (first order). ``alpha_{i+1} (1 - e^{-h_i})`` is evaluated as ``alpha_{i+1} - alpha_i sigma_{i+1} /
sigma_i``, which stays finite at pure noise (``alpha = 0``, ``lambda = -inf``); a step after such a start has
``r = inf`` and is first order too. NFE = number of intervals.

Correspondence with the official solver (LuChengTHU/dpm-solver, dpm_solver_pytorch.py, ``DPM_Solver.sample`` with
``algorithm_type="dpmsolver++"``, ``method="multistep"``, ``order=2``): its time steps are our grid without a final 0,
and the interval into ``t = 0`` is its ``denoise_to_zero`` step (``x = alpha(0) D``, first order by construction).
"Lower order final": the last of those solver steps (the one into the smallest positive time) is taken at first
order when there are fewer than 10 of them, which is what the official code does by default (its docstring says
15; the code tests ``steps < 10``). It keeps the second-order extrapolation away from the large final ``h`` of grids
that end at a small ``t_min`` (Karras, log-SNR). The method is second order on grids uniform in lambda
(``samplers.grids.log_snr_grid``, the official ``skip_type="logSNR"``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gen.paths import Path
from samplers._common import Callback, ModelFn, RandnLike, State, call, check_inputs, denoised, prior

# The official solver lowers the order of its final step below this many steps.
LOWER_ORDER_FINAL_BELOW = 10


def _coef(path: Path, t: float) -> tuple[float, float, float]:
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = float(path.alpha(tt)), float(path.sigma(tt))
    lam = math.log(a) - math.log(s) if a > 0 and s > 0 else (-math.inf if a == 0 else math.inf)
    return a, s, lam


def sample_dpmpp_2m(
    model_fn: ModelFn,
    noise: State,
    ts: Tensor,
    *,
    path: Path,
    y: Tensor | None = None,
    callback: Callback | None = None,
    randn_like: RandnLike = torch.randn_like,
    lower_order_final: bool | None = None,
) -> State:
    """Sample with DPM-Solver++(2M) over the path's log-SNR.

    Args:
        model_fn: ``(x, t (B,), y) -> velocity``; converted to an x0 estimate with ``path.x0_eps_from_velocity``.
        noise: unit Gaussian noise; the state starts at ``sigma(ts[0]) * noise``.
        ts: descending grid, usually ending at 0 (then the last interval is the official ``denoise_to_zero``).
        path: the path the model was trained on.
        y: labels ``(B,)`` or None.
        callback: called per step with ``{"x", "i", "t", "t_next", "denoised"}``.
        randn_like: unused (deterministic sampler).
        lower_order_final: take the last solver step (the one into the smallest positive time) at first order.
            None (default) follows the official solver: on when the grid has fewer than 10 solver steps, i.e.
            ``len(ts) - 2 < 10`` for a grid ending at 0.

    Returns:
        Samples at ``ts[-1]``.
    """
    check_inputs(noise, ts)
    grid = [float(t) for t in ts]
    solver_steps = len(grid) - 1 - (grid[-1] == 0.0)
    if lower_order_final is None:
        lower_order_final = solver_steps < LOWER_ORDER_FINAL_BELOW
    x = prior(noise, grid[0], path)
    d_prev: State | None = None
    h_prev = math.inf
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = call(model_fn, x, t, y)
        d = denoised(path, x, v, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "t_next": t_next, "denoised": d})
        a, s, lam = _coef(path, t)
        a_n, s_n, lam_n = _coef(path, t_next)
        if s_n == 0.0:
            x = a_n * d
            break
        h = lam_n - lam
        first_order = (
            d_prev is None
            or not math.isfinite(h_prev)
            or not math.isfinite(h)
            or (lower_order_final and i == solver_steps - 1)
        )
        if first_order:
            d_hat = d
        else:
            r = h_prev / h
            d_hat = (1.0 + 0.5 / r) * d - (0.5 / r) * d_prev
        x = (s_n / s) * x + (a_n - a * s_n / s) * d_hat
        d_prev, h_prev = d, h
    return x
