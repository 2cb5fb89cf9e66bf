"""Euler-Maruyama for the reverse-time SDE of a velocity model (SiT, Ma et al. 2024, Sec. 2.3; willisma/SiT transport/).

For any ``w(t) >= 0`` the forward SDE ``dx = [v + w s] dt + sqrt(2 w) dW`` (``s`` the score) has the path's
marginals (its Fokker-Planck equation reduces to the continuity equation of ``v``). Run backwards from ``t_max`` to
0 with step ``h = t_{i+1} - t_i < 0``:

    x_{i+1} = x_i + h (v - w s) + sqrt(2 w |h|) z,     z ~ N(0, I),

with ``s = path.score_from_velocity(x, v, t)``. The interval that ends at ``t = 0`` is deterministic (the score is
singular there): ``last_step="euler"`` takes the ODE step (on linear/EDM paths this lands on the x0 estimate,
Tweedie's formula), ``"mean"`` takes the SDE drift without noise. NFE = number of intervals.

SiT's sampler (willisma/SiT transport/transport.py ``Sampler.sample_sde``, integrators.py ``sde``) with its defaults
(Euler, ``last_step="Mean"``, ``last_step_size=0.04``, 250 steps) is this function on ``uniform_grid(250,
t_min=0.04)`` with ``last_step="mean"``: 249 Euler-Maruyama steps on ``linspace(0, 0.96, 250)`` of its time (data
at 1), then the drift step of size 0.04. Its diffusion forms (transport/path.py ``compute_diffusion``), written in
our time ``t = 1 - t_SiT`` with ``n = norm``:

* ``"constant"``: ``n``;
* ``"SBDM"``: ``n (sigma sigma' - (alpha' / alpha) sigma^2)``, SiT's ``compute_drift`` variance, the diffusion of
  the score-based (VP) SDE; ``t / (1 - t)`` on the linear path, infinite at pure noise;
* ``"sigma"``: ``n sigma_t`` (SiT's default and best);
* ``"linear"``: ``n t``;
* ``"decreasing"``: ``(1 - n cos(pi t))^2 / 4``;
* ``"increasing-decreasing"``: ``n sin^2(pi t)`` (spelled "inccreasing-decreasing" in SiT's code, so its CLI
  choice of that name fails there).

The last three are functions of time on ``[0, 1]`` and are refused on paths with another ``t_max``.

Euler-Maruyama needs small steps: for a well-trained model the drift contracts ``x - alpha x0`` by about
``1 - |h| (sigma' + w / sigma) / sigma`` per step, which overshoots once ``|h|`` is comparable to sigma (e.g. a coarse
Karras grid on the EDM path with ``w = sigma``). SiT uses 250 steps; the Gaussian tests use 200.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

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
    tmap,
)

DiffusionForm = Literal["sigma", "constant", "SBDM", "linear", "decreasing", "increasing-decreasing"]
DIFFUSION_FORMS = ("sigma", "constant", "SBDM", "linear", "decreasing", "increasing-decreasing")
_UNIT_TIME_FORMS = ("linear", "decreasing", "increasing-decreasing")


def diffusion_coefficient(
    path: Path, t: float, form: DiffusionForm | Callable[[float], float] = "sigma", norm: float = 1.0
) -> float:
    """``w(t)`` of a named SiT diffusion form (module docstring) scaled by ``norm``, or a callable of t."""
    if callable(form):
        return float(form(t))
    if form not in DIFFUSION_FORMS:
        raise ValueError(f"unknown diffusion form {form!r}; expected one of {list(DIFFUSION_FORMS)} or a callable")
    if form in _UNIT_TIME_FORMS and path.t_max != 1.0:
        raise ValueError(f"diffusion form {form!r} is defined for t in [0, 1], but this path has t_max = "
                         f"{path.t_max}; use 'sigma', 'SBDM', 'constant' or a callable")
    if form == "constant":
        return float(norm)
    if form == "linear":
        return norm * t
    if form == "decreasing":
        return 0.25 * (1.0 - norm * math.cos(math.pi * t)) ** 2
    if form == "increasing-decreasing":
        return norm * math.sin(math.pi * t) ** 2
    a, s, da, ds = (float(c) for c in path.coefficients(torch.tensor(t, dtype=torch.float64)))
    if form == "sigma":
        return norm * s
    # SBDM: the diffusion g_t of the score SDE whose drift is (alpha' / alpha) x (SiT compute_drift), in our time.
    return norm * (s * ds - da / a * s * s) if a > 0 else math.inf


def sample_euler_maruyama(
    model_fn: ModelFn,
    noise: State,
    ts: Tensor,
    *,
    path: Path,
    y: Tensor | None = None,
    callback: Callback | None = None,
    randn_like: RandnLike = torch.randn_like,
    diffusion: DiffusionForm | Callable[[float], float] = "sigma",
    diffusion_norm: float = 1.0,
    last_step: Literal["euler", "mean"] = "euler",
) -> State:
    """Sample with Euler-Maruyama steps of the reverse SDE and a final deterministic step.

    Args:
        model_fn: ``(x, t (B,), y) -> velocity``.
        noise: unit Gaussian noise; the state starts at ``sigma(ts[0]) * noise``.
        ts: descending grid ending at 0.
        path: the path the model was trained on.
        y: labels ``(B,)`` or None.
        callback: called per step with ``{"x", "i", "t", "t_next", "denoised"}``.
        randn_like: source of the step noise ``z`` (per-image generators keep a sample set batch-independent).
        diffusion: ``w(t)`` form (``DIFFUSION_FORMS``, see the module docstring), or a callable ``t -> w``.
        diffusion_norm: scale of the named forms.
        last_step: deterministic step on the interval that ends at 0: ``"euler"`` (ODE) or ``"mean"`` (drift).

    Returns:
        Samples at ``t = 0``.
    """
    check_inputs(noise, ts)
    if last_step not in ("euler", "mean"):
        raise ValueError(f"unknown last_step {last_step!r}; expected 'euler' or 'mean'")
    grid = [float(t) for t in ts]
    x = prior(noise, grid[0], path)
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        h = t_next - t
        v = call(model_fn, x, t, y)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "t_next": t_next, "denoised": denoised(path, x, v, t)})
        if t_next == 0.0 and last_step == "euler":
            x = x + h * v
            continue
        w = diffusion_coefficient(path, t, diffusion, diffusion_norm)
        if not math.isfinite(w):
            raise ValueError(f"diffusion {diffusion!r} is infinite at t = {t} (alpha = 0 there); start the grid "
                             f"below the path's t_max, e.g. samplers.grids.karras_grid or log_snr_grid")
        score = tmap(lambda xi, vi, t=t: path.score_from_velocity(xi, vi, t).to(xi.dtype), x, v)
        x = x + h * (v - w * score)
        if t_next > 0.0:
            x = x + math.sqrt(2.0 * w * -h) * randn_streams(randn_like, x)
    return x
