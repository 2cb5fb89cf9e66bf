"""Time grids for the samplers: descending 1-D float64 tensors from ``t_max`` to exactly ``0``.

A grid with ``steps`` intervals has ``steps + 1`` entries. Every builder is called the same way by the sampling
pipeline, ``builder(steps, path=path, **options)`` (its ``_target_`` spec holds the options); ``t_max`` defaults to
the path's. ``t_min`` (optional) is the smallest non-zero time:
the grid runs from ``t_max`` to ``t_min`` in ``steps - 1`` intervals and then jumps to 0 (EDM's sigma_min).
DDT's grid (250 points on [0, 0.96] in its flipped time, then a last step to the data) is
``uniform_grid(250, t_min=0.04)``; so is SiT's SDE grid (``linspace(0, 0.96, 250)`` plus its 0.04 "last step").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gen.paths import EDMPath, Path, shift_time

__all__ = ["uniform_grid", "shifted_grid", "karras_grid", "log_snr_grid", "lcm_grid", "check_grid"]


def _finish(ts: Tensor) -> Tensor:
    ts = torch.cat([ts, ts.new_zeros(1)])
    check_grid(ts)
    return ts


def _validate(steps: int, t_max: float, t_min: float | None) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not t_max > 0:
        raise ValueError(f"t_max must be > 0, got {t_max}")
    if t_min is not None:
        if not 0 < t_min < t_max:
            raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
        if steps < 2:
            raise ValueError("a grid with t_min needs steps >= 2 (t_max -> t_min -> 0)")


def check_grid(ts: Tensor) -> None:
    """Raise unless ``ts`` is 1-D, strictly decreasing, positive except for a final exact 0."""
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"a time grid must be 1-D with >= 2 entries, got shape {tuple(ts.shape)}")
    if ts[-1].item() != 0.0:
        raise ValueError(f"a time grid must end at exactly 0, got {ts[-1].item()}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("a time grid must be strictly decreasing")


def _t_max(t_max: float | None, path: Path | None) -> float:
    return float(t_max) if t_max is not None else (float(path.t_max) if path is not None else 1.0)


def uniform_grid(
    steps: int, t_max: float | None = None, *, t_min: float | None = None, path: Path | None = None
) -> Tensor:
    """Equally spaced times from ``t_max`` to 0 (or to ``t_min``, then 0). Shape ``(steps + 1,)``, float64."""
    t_max = _t_max(t_max, path)
    _validate(steps, t_max, t_min)
    if t_min is None:
        return _finish(torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)[:-1])
    return _finish(torch.linspace(t_max, t_min, steps, dtype=torch.float64))


def lcm_grid(
    steps: int, t_max: float | None = None, *, num_levels: int = 50, path: Path | None = None
) -> Tensor:
    """LCM's multistep times on a consistency student's own levels ``t_j = j t_max / N``, then 0. ``(steps + 1,)``.

    The student was trained at the N levels only (SLAM, ``distill/slam.py``: N = 50, the top ``t_max`` = 0.936). The
    LCM scheduler that SLAM samples with (Luo et al. 2023, "Latent Consistency Models"; diffusers ``LCMScheduler.
    set_timesteps``, ``original_inference_steps`` = N) lists the training steps from the top and takes those at
    positions ``floor(i N / K)``, i = 0 .. K - 1: levels ``j_i = N - floor(i N / K)``. For K = 4 of 50 that is levels
    50, 38, 25, 13 (SD's DDPM steps 999, 759, 499, 259), where a uniform grid would ask for the untrained levels 37.5
    and 12.5. Equals ``uniform_grid(K, t_max)`` whenever K divides N.
    """
    t_max = _t_max(t_max, path)
    _validate(steps, t_max, None)
    n = int(num_levels)
    if not 1 <= steps <= n:
        raise ValueError(f"lcm_grid: need 1 <= steps <= num_levels, got steps={steps}, num_levels={num_levels}")
    levels = torch.linspace(0.0, t_max, n + 1, dtype=torch.float64)  # the student's levels, as distill/slam.py
    return _finish(levels[[n - (i * n) // steps for i in range(steps)]])


def shifted_grid(
    steps: int, shift: float, t_max: float | None = None, *, t_min: float | None = None, path: Path | None = None
) -> Tensor:
    """Uniform grid on ``[0, 1]`` mapped through ``t' = s t / (1 + (s - 1) t)`` (``gen.paths.shift_time``).

    ``shift > 1`` spends more steps near noise; LightningDiT's ``0.3`` (its flipped time) is ``shift = 1/0.3``.
    ``t_max`` and ``t_min`` are in shifted time (the grid's actual first and last non-zero values).
    """
    t_max = _t_max(t_max, path)
    _validate(steps, t_max, t_min)
    if t_max > 1.0:
        raise ValueError("the timestep shift is defined on t in [0, 1]")
    # Invert the shift at the endpoints so the shifted grid starts exactly at t_max (and ends at t_min).
    inv = 1.0 / shift
    u_max = inv * t_max / (1.0 + (inv - 1.0) * t_max)
    if t_min is None:
        u = torch.linspace(u_max, 0.0, steps + 1, dtype=torch.float64)[:-1]
    else:
        u_min = inv * t_min / (1.0 + (inv - 1.0) * t_min)
        u = torch.linspace(u_max, u_min, steps, dtype=torch.float64)
    ts = shift_time(u, shift)
    ts[0] = t_max
    if t_min is not None:
        ts[-1] = t_min
    return _finish(ts)


def _noise_ratio_endpoints(steps: int, sigma_min: float, sigma_max: float) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")


def karras_grid(
    steps: int,
    sigma_min: float = 0.002,
    sigma_max: float | None = None,
    rho: float = 7.0,
    *,
    path: Path | None = None,
) -> Tensor:
    """EDM's grid, uniform in ``sigma^(1/rho)`` (Karras et al. 2022, Eq. 5), then 0. Shape ``(steps + 1,)``.

    ``sigma_*`` are VE noise levels ``sigma / alpha``; with ``path`` given they are mapped to that path's time
    (e.g. ``t = s / (1 + s)`` on the linear path; the identity on ``EDMPath``), otherwise the grid is in sigma.
    ``sigma_max`` defaults to the EDM path's ``t_max``, else EDM's 80.
    """
    if sigma_max is None:
        sigma_max = float(path.t_max) if isinstance(path, EDMPath) else 80.0
    _noise_ratio_endpoints(steps, sigma_min, sigma_max)
    if steps == 1:
        sig = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
        lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
        sig = (hi + ramp * (lo - hi)) ** rho
        sig[0], sig[-1] = sigma_max, sigma_min
    ts = sig if path is None else path.t_from_noise_ratio(sig)
    return _finish(ts)


def log_snr_grid(
    steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    *,
    path: Path | None = None,
) -> Tensor:
    """Grid uniform in the log-SNR ``lambda = log(alpha / sigma)``, then 0. Shape ``(steps + 1,)``.

    ``steps - 1`` intervals of equal ``lambda`` from ``sigma_max`` to ``sigma_min`` (VE noise levels ``sigma /
    alpha``, mapped to ``path`` time when given), then the jump to 0. This is DPM-Solver's ``skip_type="logSNR"``
    (LuChengTHU/dpm-solver, dpm_solver_pytorch.py ``get_time_steps``) and k-diffusion's ``get_sigmas_exponential``;
    DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models") measures second order on it, where a uniform grid in t ending at 0 gives about 1.5.
    """
    _noise_ratio_endpoints(steps, sigma_min, sigma_max)
    if steps == 1:
        sig = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        sig = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp()
        sig[0], sig[-1] = sigma_max, sigma_min
    ts = sig if path is None else path.t_from_noise_ratio(sig)
    return _finish(ts)
