"""The few-step update of 2-rectified flow++ that re-uses the initial noise (Lee et al. 2024, "Improving the Training of
Rectified Flows", Sec. 5; official code sangyun884/rfpp ``generate.py`` ``--sampler new``).

A near-straight reflow coupling maps each noise ``z`` to one image, so instead of integrating the velocity, each step
predicts the image ``x0_hat = x0(x_t, t)`` and jumps to the next time on the straight line between it and the *initial*
noise: ``x_{t'} = alpha(t') x0_hat + sigma(t') z`` (on the linear path ``(1 - t') x0_hat + t' z``). One NFE per step;
with one step it equals Euler. From ``t = 1`` on the linear path the first step's own noise estimate is ``z``
itself, so two steps also equal Euler's; the update differs from the third step on (or from ``t_max < 1``, as the
official code's ``1 - 1e-5``). Not valid for inversion (it needs the noise the trajectory started from).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gen.paths import Path
from samplers._common import Callback, ModelFn, RandnLike, State, call, check_inputs, denoised, prior, tmap


def sample_reuse_noise(
    model_fn: ModelFn,
    noise: State,
    ts: Tensor,
    *,
    path: Path,
    y: Tensor | None = None,
    callback: Callback | None = None,
    randn_like: RandnLike = torch.randn_like,
) -> State:
    """Sample with the noise-reusing update (module docstring).

    Args:
        model_fn: ``(x (B, C, H, W), t (B,), y) -> velocity``.
        noise: unit Gaussian noise ``(B, C, H, W)``: the state starts at ``sigma(ts[0]) * noise`` and every step
            re-uses it.
        ts: descending grid ending at 0; NFE = ``len(ts) - 1``.
        path: the path the model was trained on.
        y: labels ``(B,)`` or None.
        callback: called after each model evaluation with ``{"x", "i", "t", "t_next", "denoised"}``.
        randn_like: unused (deterministic); accepted so every sampler has the same signature.

    Returns:
        Samples at ``t = 0``, shaped like ``noise``.
    """
    check_inputs(noise, ts)
    grid = [float(t) for t in ts]
    x = prior(noise, grid[0], path)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = call(model_fn, x, t, y)
        x0 = denoised(path, x, v, t)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "t_next": t_next, "denoised": x0})
        tn = torch.tensor(t_next, dtype=torch.float64)
        a, s = float(path.alpha(tn)), float(path.sigma(tn))
        x = tmap(lambda d, n, a=a, s=s: a * d + s * n.to(d.dtype), x0, noise)
    return x
