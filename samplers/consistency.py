"""Consistency-model sampling (Song et al. 2023, "Consistency Models", Algorithm 1; openai/consistency_models
cm/karras_diffusion.py ``stochastic_iterative_sampler``).

``x <- f(sigma_max n, sigma_max)``; then for each intermediate level tau (descending):
``x <- f(x + sqrt(tau^2 - sigma_min^2) n', tau)`` with fresh per-image noise n'. NFE = number of f calls
= ``len(ts) - 1``. The grid is ``[sigma_max, tau_1, ..., 0]`` (``consistency_grid``); the final 0 only marks the end.

``model_fn`` is the usual velocity function; for a consistency snapshot (``"prediction": "consistency"``) the
pipeline exposes ``f`` as an x0 prediction on the EDM path, so ``f = x - sigma v`` (``samplers._common.denoised``).
Only such models may be sampled this way: an ODE model's x0 estimate is not a consistency function (the pipeline
refuses the pairing, ``samplers.spec.check_solver_fits``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from gen.paths import EDMPath, Path
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


@torch.no_grad()
def sample_consistency(
    model_fn: ModelFn,
    noise: State,
    ts: Tensor,
    *,
    path: Path,
    y: Tensor | None = None,
    callback: Callback | None = None,
    randn_like: RandnLike = torch.randn_like,
    sigma_min: float = 0.002,
) -> State:
    """One-step or multistep consistency sampling.

    Args:
        model_fn: ``(x, t (B,), y) -> velocity`` of a consistency model on the EDM path (t = sigma).
        noise: unit Gaussian noise ``(B, C, H, W)``; the state starts at ``ts[0] * noise``.
        ts: ``[sigma_max, tau_1 > ... > tau_m, 0]``; m + 1 network calls.
        path: must be ``EDMPath`` (consistency models are trained in sigma).
        y: labels ``(B,)`` or None.
        callback: called after each call with ``{"x", "i", "t", "t_next", "denoised"}``.
        randn_like: per-image noise for the re-noising steps (the pipeline passes per-seed generators).
        sigma_min: the model's boundary level; re-noising to tau adds ``sqrt(tau^2 - sigma_min^2)`` of noise.

    Returns:
        Samples shaped like ``noise``.
    """
    check_inputs(noise, ts)
    if not isinstance(path, EDMPath):
        raise ValueError(f"the consistency sampler needs a model on the EDM path (sigma time), got {type(path).__name__}")
    grid = [float(t) for t in ts]
    if not grid[-2] > sigma_min:
        raise ValueError(f"consistency sampler: intermediate levels must exceed sigma_min={sigma_min}, got {grid[:-1]}")
    x = prior(noise, grid[0], path)
    for i, t in enumerate(grid[:-1]):
        if i > 0:
            x = x + math.sqrt(t * t - sigma_min * sigma_min) * randn_streams(randn_like, x)
        v = call(model_fn, x, t, y)
        x0 = denoised(path, x, v, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "t_next": grid[i + 1], "denoised": x0})
        x = x0
    return x


sample_consistency.consistency_only = True  # type: ignore[attr-defined]  # read by samplers.spec.check_solver_fits


def consistency_grid(
    steps: int, sigmas: Sequence[float] = (), sigma_max: float | None = None, *, path: Path | None = None
) -> Tensor:
    """``[sigma_max, *sigmas, 0]`` float64 for the consistency sampler; ``steps`` must be ``len(sigmas) + 1``.

    ``sigma_max`` defaults to the EDM path's ``t_max`` (else 80). Two-step CIFAR-10 uses ``sigmas=[0.821]``
    (locuslab/ect ct_train.py ``--mid_t``).
    """
    if sigma_max is None:
        sigma_max = float(path.t_max) if isinstance(path, EDMPath) else 80.0
    mids = [float(s) for s in sigmas]
    if steps != len(mids) + 1:
        raise ValueError(f"consistency_grid: steps={steps} needs {steps - 1} intermediate sigmas, got {mids}; give "
                         f"sampler.grid.sigmas with {steps - 1} descending values (e.g. sampler=consistency_2step for "
                         "2 steps), or the steps the sigmas fit")
    g = torch.tensor([float(sigma_max), *mids, 0.0], dtype=torch.float64)
    if not bool(torch.isfinite(g).all()) or bool((g[1:] >= g[:-1]).any()):
        raise ValueError(f"consistency_grid: sigmas must descend strictly from sigma_max={sigma_max} to 0, got {mids}")
    return g
