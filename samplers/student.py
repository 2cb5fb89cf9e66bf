"""Few-step student samplers on any path: deterministic DDIM steps (TDM) and multistep consistency sampling (SLAM).

* ``sample_ddim``: ``x_{i+1} = alpha(t_{i+1}) x0_hat + sigma(t_{i+1}) eps_hat`` from the prediction at ``(x_i, t_i)``
  (Song et al. 2021, "Denoising Diffusion Implicit Models", Eq. 12 with eta = 0); the TDM student's own K-step
  generator (Luo et al. 2025, "Learning Few-Step Diffusion Models by Trajectory Distribution Matching"; official code
  Luo-Yihong/TDM ``train_tdm_demo.py``). On ``LinearPath`` it is the Euler step. With ``condition_steps`` the model is
  called with ``num_steps=K`` (K = ``len(ts) - 1``): a step-count-conditioned ("unify") student.
* ``sample_lcm``: ``x0 = f(x, t)``, then re-noise to the next time with fresh per-image noise,
  ``x = alpha(t') x0 + sigma(t') n`` (Luo et al. 2023, "Latent Consistency Models", multistep sampling; the LCM scheduler
  that SLAM samples with, Xu et al. 2024, MCG-NJU/SPLAM README). The model must be a consistency function exposed as
  an x0 prediction (``"prediction": "consistency"``); NFE = ``len(ts) - 1``. LCM samples at its training levels
  (``samplers.grids.lcm_grid``; the ``slam_*`` presets).

Both match the official update rules to rounding under the exact VP <-> linear correspondence (TDM's demo loop
``generate_new``; diffusers' ``LCMScheduler`` with SD-v1.5's schedule): bench/README.md, "Few-step student samplers
against the official code".
"""

from __future__ import annotations

import torch
from torch import Tensor

from gen.paths import Path
from samplers._common import (
    Callback,
    ModelFn,
    RandnLike,
    State,
    check_inputs,
    denoised,
    prior,
    randn_streams,
    tvec,
)


def sample_ddim(
    model_fn: ModelFn,
    noise: State,
    ts: Tensor,
    *,
    path: Path,
    y: Tensor | None = None,
    callback: Callback | None = None,
    randn_like: RandnLike = torch.randn_like,
    condition_steps: bool = False,
) -> State:
    """Deterministic DDIM steps along ``ts`` (module docstring).

    Args:
        model_fn: ``(x (B, C, H, W), t (B,), y, [num_steps]) -> velocity``.
        noise: unit noise; the state starts at ``sigma(ts[0]) noise``.
        ts: descending grid ending at 0; K = ``len(ts) - 1`` network calls.
        path, y, callback, randn_like: as every sampler (``randn_like`` unused: deterministic).
        condition_steps: pass ``num_steps=K`` to the model (a TDM-unify student).

    Returns:
        Samples at ``ts[-1]``, shaped like ``noise``.
    """
    check_inputs(noise, ts)
    grid = [float(t) for t in ts]
    extra = {"num_steps": len(grid) - 1} if condition_steps else {}
    x = prior(noise, grid[0], path)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = model_fn(x, tvec(t, x), y, **extra).to(x.dtype)
        x0, eps = path.x0_eps_from_velocity(x, v, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "t_next": t_next, "denoised": x0.to(x.dtype)})
        x = path.sample(x0, eps, t_next).to(x.dtype) if t_next > 0 else x0.to(x.dtype)
    return x


@torch.no_grad()
def sample_lcm(
    model_fn: ModelFn,
    noise: State,
    ts: Tensor,
    *,
    path: Path,
    y: Tensor | None = None,
    callback: Callback | None = None,
    randn_like: RandnLike = torch.randn_like,
) -> State:
    """Multistep consistency sampling on any path (module docstring).

    Args:
        model_fn: ``(x, t (B,), y) -> velocity`` of a consistency function exposed as an x0 prediction.
        noise: unit noise; the state starts at ``sigma(ts[0]) noise`` (pure noise at ``t_max`` on ``LinearPath``).
        ts: descending grid ending at 0; ``len(ts) - 1`` calls.
        randn_like: per-image noise for the re-noising (the pipeline passes per-seed generators).

    Returns:
        The last consistency output, shaped like ``noise``.
    """
    check_inputs(noise, ts)
    grid = [float(t) for t in ts]
    x = prior(noise, grid[0], path)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = model_fn(x, tvec(t, x), y).to(x.dtype)
        x0 = denoised(path, x, v, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "t_next": t_next, "denoised": x0})
        x = path.sample(x0, randn_streams(randn_like, x0), t_next).to(x.dtype) if t_next > 0 else x0
    return x


sample_lcm.consistency_only = True  # type: ignore[attr-defined]  # read by samplers.spec.check_solver_fits
