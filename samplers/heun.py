"""Heun (explicit trapezoidal) sampler with EDM's optional stochastic churn (Karras et al. 2022, Algorithms 1-2).

Each interval takes an Euler predictor and, unless the next time is 0, a trapezoidal corrector
``x_{i+1} = x_i + h (v(x_i, t_i) + v(x', t_{i+1})) / 2``. The last step to ``t = 0`` is Euler only, because the
velocity at t = 0 is ill-defined for data-prediction models (sigma = 0). NFE accounting: with N intervals and
``ts[-1] = 0``, NFE = 2N - 1 (EDM: N = 18 -> 35); with a grid that does not reach 0 (not produced by
``samplers.grids``) it would be 2N.

Churn (EDM Algorithm 2; NVlabs/edm generate.py ``edm_sampler``, and ``ablation_sampler`` for scaled paths): before
the step from ``t_i``, where the noise ratio ``r = sigma / alpha`` (EDM's sigma) lies in ``[s_min, s_max]``, the noise
level is raised to ``r_hat = r + gamma r`` with ``gamma = min(s_churn / N, sqrt(2) - 1)`` by adding fresh noise,
``x_hat = (alpha(t_hat) / alpha(t_i)) x + alpha(t_hat) sqrt(r_hat^2 - r^2) s_noise z``, and the step starts from
``(x_hat, t_hat)``. On ``EDMPath`` this is EDM's ``x + sqrt(t_hat^2 - t^2) S_noise z``. ``z`` comes from ``randn_like``
once per interval, also where gamma = 0, as in EDM, so with EDM's per-image generator the samples are EDM's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gen.paths import Path
from samplers._common import (
    Callback,
    ModelFn,
    RandnLike,
    State,
    call,
    check_inputs,
    denoised,
    prior,
    randn_streams,
)


def heun_nfe(steps: int) -> int:
    """Number of model evaluations of ``sample_heun`` on a grid with ``steps`` intervals ending at 0."""
    return 2 * steps - 1


def _churn(
    path: Path, x: State, t: float, gamma: float, s_min: float, s_max: float, s_noise: float, z: State
) -> tuple[State, float]:
    """One churn: raise the noise ratio at ``t`` by ``gamma`` if it lies in ``[s_min, s_max]``; ``(x_hat, t_hat)``."""
    tt = torch.tensor(t, dtype=torch.float64)
    a, r = float(path.alpha(tt)), float(path.noise_ratio(tt))
    if gamma == 0 or not (s_min <= r <= s_max) or not math.isfinite(r):
        return x, t  # pure noise (alpha = 0) cannot be noised further
    r_hat = r + gamma * r
    t_hat = float(path.t_from_noise_ratio(torch.tensor(r_hat, dtype=torch.float64)))
    a_hat = float(path.alpha(torch.tensor(t_hat, dtype=torch.float64)))
    x_hat = (a_hat / a) * x + a_hat * math.sqrt(r_hat**2 - r**2) * s_noise * z
    return x_hat, t_hat


def sample_heun(
    model_fn: ModelFn,
    noise: State,
    ts: Tensor,
    *,
    path: Path,
    y: Tensor | None = None,
    callback: Callback | None = None,
    randn_like: RandnLike = torch.randn_like,
    s_churn: float = 0.0,
    s_min: float = 0.0,
    s_max: float = math.inf,
    s_noise: float = 1.0,
) -> State:
    """Integrate the probability-flow ODE with Heun's second-order method (Euler on the last step), with churn.

    Args:
        model_fn: ``(x (B, C, H, W), t (B,), y) -> velocity``.
        noise: unit Gaussian noise; the state starts at ``sigma(ts[0]) * noise`` and keeps its dtype.
        ts: descending grid ending at 0.
        path: the path the model was trained on.
        y: labels ``(B,)`` or None.
        callback: called once per interval with ``{"x", "i", "t", "t_next", "denoised"}`` (the predictor's x0;
            with churn ``x`` and ``t`` are the raised ``x_hat`` and ``t_hat`` the model saw).
        randn_like: source of the churn noise (per-image generators keep a sample set batch-independent); unused
            when ``s_churn == 0``, which is deterministic.
        s_churn: EDM's S_churn, the total churn; 0 disables it (EDM Algorithm 1).
        s_min: EDM's S_min: churn only where the noise ratio ``sigma / alpha`` is at least this.
        s_max: EDM's S_max: churn only where the noise ratio is at most this.
        s_noise: EDM's S_noise, the standard deviation of the added noise relative to the exact one.

    Returns:
        Samples at ``t = 0``.
    """
    check_inputs(noise, ts)
    if s_churn < 0 or s_noise < 0:
        raise ValueError(f"s_churn and s_noise must be >= 0, got s_churn={s_churn}, s_noise={s_noise}")
    grid = [float(t) for t in ts]
    gamma = min(s_churn / (len(grid) - 1), math.sqrt(2.0) - 1.0)
    x = prior(noise, grid[0], path)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        if s_churn > 0:
            x, t = _churn(path, x, t, gamma, s_min, s_max, s_noise, randn_streams(randn_like, x))
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
