"""Noising paths, conversions between predictions, and training-time samplers.

THE time convention of the whole toolkit (every other module follows it):

    data at t = 0, noise at t = t_max,    x_t = alpha(t) * x0 + sigma(t) * eps,   eps ~ N(0, I).

The velocity is the path-time derivative ``v = dx_t/dt = alpha'(t) x0 + sigma'(t) eps``; a sampler integrates
``dx/dt = v`` from ``t_max`` down to ``0``.

* ``LinearPath`` (rectified flow / flow matching): ``alpha = 1 - t``, ``sigma = t``, ``t in [0, 1]``, ``v = eps - x0``.
* ``CosinePath`` (SiT's GVP, flipped): ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``, ``t in [0, 1]``.
* ``EDMPath`` (EDM / VE): ``alpha = 1``, ``sigma = t``, ``t in [0, sigma_max]``: time *is* sigma, ``v = eps``.

Foreign conventions meet this one at a single boundary:
* SiT / LightningDiT / DDT put data at ``t = 1``: ``t_ours = 1 - t_theirs`` and ``v_ours = -v_theirs``
  (converted by the adapters in ``gen/models/adapters.py``, never inside samplers).
* Timestep shift (``shift_time``): ``t' = s t / (1 + (s - 1) t)`` in our convention; ``s > 1`` spends more of
  a uniform grid (or of the training draws) near noise. LightningDiT writes the same map in its flipped time
  with ``s_L = 0.3``; substituting ``t_L = 1 - t`` gives ``t' = (1/s_L) t / (1 + (1/s_L - 1) t)``, i.e. our
  ``s = 1 / s_L = 3.33`` (SD3's shift 3.33). DDT's ``t_D' = t_D / (t_D + (1 - t_D) s_D)`` maps to our ``s = s_D``.
* EDM's sigma relates to a general path through the noise ratio ``r = sigma / alpha``
  (``Path.t_from_noise_ratio``); e.g. on the linear path ``t = r / (1 + r)`` (EDM sigma_max 80 -> t = 80/81).

Numerics: coefficients are computed in the dtype of the tensors given (float32, or float64 in tests), upcasting
half precision to float32; ``t`` of shape ``(B,)`` is reshaped to ``(B, 1, ..., 1)`` to broadcast against ``x``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch
from torch import Tensor

from gen.utils.build import capture_config
from gen.utils.seed import Randomness

PredictionKind = Literal["velocity", "x0", "eps"]

__all__ = [
    "Path",
    "LinearPath",
    "CosinePath",
    "EDMPath",
    "shift_time",
    "TimeSampler",
    "UniformTime",
    "LogitNormalTime",
    "LogNormalSigma",
    "UShapedTime",
]


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _work_dtype(*xs: Tensor | float) -> torch.dtype:
    """float64 if any input is a float64 tensor or a Python number, else float32 (half precision is upcast)."""
    for x in xs:
        if (isinstance(x, Tensor) and x.dtype == torch.float64) or isinstance(x, (int, float)):
            return torch.float64
    return torch.float32


def _as_time(t: Tensor | float, like: Tensor | None = None) -> Tensor:
    """``t`` as a floating tensor; shape ``(B,)`` becomes ``(B, 1, ..., 1)`` to broadcast against ``like``."""
    dtype = _work_dtype(t, like) if like is not None else _work_dtype(t)
    device = like.device if like is not None else (t.device if isinstance(t, Tensor) else None)
    t = torch.as_tensor(t, dtype=dtype, device=device)
    if like is not None and t.ndim == 1 and like.ndim > 1:
        t = t.reshape(-1, *([1] * (like.ndim - 1)))
    return t


def _up(x: Tensor) -> Tensor:
    """Upcast half precision to float32; float32/float64 pass through."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ----------------------------------------------------------------------------------------------------------
# Paths


class Path(ABC):
    """Affine Gaussian path ``x_t = alpha(t) x0 + sigma(t) eps`` (data at t=0, noise at ``t_max``).

    Subclasses give ``alpha``, ``sigma``, their time derivatives and ``t_from_noise_ratio``; every conversion
    between predictions (velocity, x0, eps, score) is derived here once. ``path.config`` is the ``_target_`` spec
    that ``gen.utils.build.build`` turns back into the path. All methods take ``t`` as a float,
    a 0-d tensor or a ``(B,)`` tensor that is broadcast against ``(B, C, H, W)`` inputs.
    """

    t_max: float = 1.0

    # --- schedule ------------------------------------------------------------------------------------------
    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Data coefficient alpha(t)."""

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Noise coefficient sigma(t)."""

    @abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor:
        """d alpha / dt."""

    @abstractmethod
    def d_sigma(self, t: Tensor) -> Tensor:
        """d sigma / dt."""

    @abstractmethod
    def t_from_noise_ratio(self, r: Tensor) -> Tensor:
        """Inverse of ``r(t) = sigma(t) / alpha(t)`` (the VE / EDM sigma of the path at t)."""

    def coefficients(self, t: Tensor | float, like: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha, sigma, d_alpha, d_sigma)`` at t, shaped to broadcast against ``like`` and in its dtype.

        The coefficients are evaluated in the wider of t's and like's precision, then cast to like's dtype
        (half precision upcast to float32), so a float32 state stays float32 under a float64 time grid.
        """
        tt = _as_time(t, like)
        coef = (self.alpha(tt), self.sigma(tt), self.d_alpha(tt), self.d_sigma(tt))
        if like is None:
            return coef
        dtype = _up(like).dtype
        return tuple(c.to(dtype) for c in coef)  # type: ignore[return-value]

    def noise_ratio(self, t: Tensor | float) -> Tensor:
        """``sigma(t) / alpha(t)``: the equivalent EDM sigma (infinite where alpha = 0)."""
        tt = _as_time(t)
        return self.sigma(tt) / self.alpha(tt)

    def log_snr(self, t: Tensor | float) -> Tensor:
        """Half log-SNR ``lambda(t) = log(alpha / sigma)`` (DPM-Solver's lambda; -inf at pure noise)."""
        tt = _as_time(t)
        return torch.log(self.alpha(tt)) - torch.log(self.sigma(tt))

    # --- conversions ---------------------------------------------------------------------------------------
    def sample(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """``x_t = alpha x0 + sigma eps``."""
        x0, eps = _up(x0), _up(eps)
        a, s, _, _ = self.coefficients(t, x0)
        return a * x0 + s * eps

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """Target velocity ``v = alpha' x0 + sigma' eps`` (``eps - x0`` on the linear path)."""
        x0, eps = _up(x0), _up(eps)
        _, _, da, ds = self.coefficients(t, x0)
        return da * x0 + ds * eps

    def x0_eps_from_velocity(self, x_t: Tensor, v: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Invert ``[x_t; v] = [[a, s], [a', s']] [x0; eps]``; the determinant ``a s' - s a'`` is > 0 on all paths."""
        x_t, v = _up(x_t), _up(v)
        a, s, da, ds = self.coefficients(t, x_t)
        det = a * ds - s * da
        x0 = (ds * x_t - s * v) / det
        eps = (a * v - da * x_t) / det
        return x0, eps

    def velocity_from_x0(self, x_t: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
        """Velocity from a data prediction (singular where sigma = 0)."""
        x_t, x0 = _up(x_t), _up(x0)
        a, s, da, ds = self.coefficients(t, x_t)
        eps = (x_t - a * x0) / s
        return da * x0 + ds * eps

    def velocity_from_eps(self, x_t: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """Velocity from a noise prediction (singular where alpha = 0)."""
        x_t, eps = _up(x_t), _up(eps)
        a, s, da, ds = self.coefficients(t, x_t)
        x0 = (x_t - s * eps) / a
        return da * x0 + ds * eps

    def score_from_velocity(self, x_t: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
        """Score ``grad log p_t(x_t) = -E[eps | x_t] / sigma`` from the velocity (singular where sigma = 0)."""
        _, eps = self.x0_eps_from_velocity(x_t, v, t)
        _, s, _, _ = self.coefficients(t, eps)
        return -eps / s

    def to_velocity(self, kind: PredictionKind, x_t: Tensor, out: Tensor, t: Tensor | float) -> Tensor:
        """Convert a network output of the given prediction kind to the velocity in path time."""
        if kind == "velocity":
            return _up(out)
        if kind == "x0":
            return self.velocity_from_x0(x_t, out, t)
        if kind == "eps":
            return self.velocity_from_eps(x_t, out, t)
        raise ValueError(f"unknown prediction kind {kind!r}; expected 'velocity', 'x0' or 'eps'")


@capture_config
class LinearPath(Path):
    """Rectified flow: ``alpha = 1 - t``, ``sigma = t``, ``t in [0, 1]``; velocity ``eps - x0``."""

    t_max = 1.0

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -1.0)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def t_from_noise_ratio(self, r: Tensor) -> Tensor:
        return r / (1.0 + r)


@capture_config
class CosinePath(Path):
    """Trigonometric (variance-preserving) path: ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``."""

    t_max = 1.0

    def alpha(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def t_from_noise_ratio(self, r: Tensor) -> Tensor:
        return torch.atan(r) * (2.0 / math.pi)


@capture_config
class EDMPath(Path):
    """EDM / variance-exploding path: ``alpha = 1``, ``sigma = t``, ``t in [0, sigma_max]`` (Karras et al. 2022)."""

    def __init__(self, sigma_max: float = 80.0) -> None:
        if sigma_max <= 0:
            raise ValueError(f"sigma_max must be > 0, got {sigma_max}")
        self.t_max = float(sigma_max)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def d_sigma(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def t_from_noise_ratio(self, r: Tensor) -> Tensor:
        return r


# ----------------------------------------------------------------------------------------------------------
# Time samplers for training


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Timestep shift ``t' = s t / (1 + (s - 1) t)`` on ``t in [0, 1]`` (SD3 / LightningDiT, our convention).

    ``s > 1`` moves mass towards noise (t = 1); ``s = 1`` is the identity; endpoints are fixed.
    LightningDiT's ``shift = 0.3`` (data at t = 1) equals ``s = 1 / 0.3`` here (see module docstring).
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


class TimeSampler(ABC):
    """Draws training times: ``sampler(rng) -> Tensor[B]`` (float32), one time per sample of ``rng``.

    ``rng`` is a per-sample random source (``gen.utils.seed.SampleRandom`` in training, ``BatchRandom`` for a
    plain generator); ``shift`` applies ``shift_time`` to every draw (only for samplers on ``[0, 1]``).
    ``sampler.config`` is the ``_target_`` spec that rebuilds it.
    """

    def __init__(self, shift: float = 1.0) -> None:
        if not shift > 0 or not math.isfinite(shift):
            raise ValueError(f"shift must be a positive number, got {shift}")
        self.shift = float(shift)

    @abstractmethod
    def _draw(self, rng: Randomness) -> Tensor:
        """B unshifted draws in float64."""

    def __call__(self, rng: Randomness) -> Tensor:
        t = shift_time(self._draw(rng), self.shift)
        return t.float()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self, 'config', {})})"


@capture_config
class UniformTime(TimeSampler):
    """``t ~ U[t_min, t_max]`` (plain flow matching; Lipman et al. 2023, Liu et al. 2023)."""

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0, shift: float = 1.0) -> None:
        super().__init__(shift)
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"need 0 <= t_min < t_max <= 1, got {t_min}, {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def _draw(self, rng: Randomness) -> Tensor:
        return self.t_min + (self.t_max - self.t_min) * rng.rand(dtype=torch.float64)


@capture_config
class LogitNormalTime(TimeSampler):
    """``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)`` (SD3; LightningDiT's "lognorm" time sampling).

    ``mean`` is in our convention (data at 0): a positive mean puts more draws near noise. LightningDiT's
    sampler (data at 1) with mean ``m`` corresponds to ``mean = -m`` here; the default ``m = 0`` is symmetric.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> None:
        super().__init__(shift)
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def _draw(self, rng: Randomness) -> Tensor:
        return torch.sigmoid(self.mean + self.std * rng.randn(dtype=torch.float64))


@capture_config
class LogNormalSigma(TimeSampler):
    """EDM noise levels: ``ln sigma ~ N(p_mean, p_std^2)``; returns sigma, i.e. time on ``EDMPath`` (EDM Sec. 5)."""

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        super().__init__(1.0)  # a shift is only defined on [0, 1]
        if p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {p_std}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)

    def _draw(self, rng: Randomness) -> Tensor:
        return torch.exp(self.p_mean + self.p_std * rng.randn(dtype=torch.float64))


@capture_config
class UShapedTime(TimeSampler):
    """RF++'s U-shaped times: density ``prop. to exp(a t) + exp(a (1 - t))`` on ``[eps, 1 - eps]``.

    Draw ``u`` from the truncated exponential ``a e^{a u} / (e^a - 1)`` on [0, 1] by inverting its CDF,
    mirror each draw with probability 1/2 (the mixture gives the symmetric density), then rescale to
    ``[eps, 1 - eps]`` (Lee et al. 2024, "Improving the Training of Rectified Flows", sangyun884/rfpp).

    sangyun884/rfpp ``t_dist.py`` ``sample_t`` mirrors differently: it concatenates the n draws with their mirrors and
    keeps n of the 2n after a shuffle. Each time has the same density as here, but a batch then holds about n/4 draws
    together with their own mirror (20 of 64 in bench/distill_equivalence.py); we draw every time independently, which
    is the density the paper states (Sec. 4.1) without the within-batch coupling, and keeps a sample's time a
    function of its own random stream.
    """

    def __init__(self, a: float = 4.0, eps: float = 1e-5, shift: float = 1.0) -> None:
        super().__init__(shift)
        if a <= 0:
            raise ValueError(f"a must be > 0, got {a}")
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"eps must be in [0, 0.5), got {eps}")
        self.a, self.eps = float(a), float(eps)

    def _draw(self, rng: Randomness) -> Tensor:
        w = rng.rand(dtype=torch.float64)
        flip = rng.rand(dtype=torch.float64) < 0.5
        u = torch.log1p(w * math.expm1(self.a)) / self.a  # inverse CDF of the truncated exponential
        u = torch.where(flip, 1.0 - u, u)
        return self.eps + (1.0 - 2.0 * self.eps) * u
