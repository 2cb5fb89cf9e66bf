"""Shared types and helpers of the samplers (internal)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gen.paths import Path


class Streams(tuple):
    """Several tensors integrated together, e.g. the image and REG's class token ``(image (B, C, H, W), token (B, D))``.

    Arithmetic is per stream (``x + h * v``, ``a * x - b * d``), so every solver is written once for one tensor and
    serves several. Each stream keeps its own dtype and shape; all share the batch dimension and the time.
    """

    def _zip(self, other: Any) -> Any:
        return zip(self, other) if isinstance(other, tuple) else ((a, other) for a in self)

    def __add__(self, other: Any) -> Streams:  # type: ignore[override]
        return Streams(a + b for a, b in self._zip(other))

    def __radd__(self, other: Any) -> Streams:
        return Streams(b + a for a, b in self._zip(other))

    def __sub__(self, other: Any) -> Streams:
        return Streams(a - b for a, b in self._zip(other))

    def __rsub__(self, other: Any) -> Streams:
        return Streams(b - a for a, b in self._zip(other))

    def __mul__(self, other: Any) -> Streams:  # type: ignore[override]
        return Streams(a * b for a, b in self._zip(other))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> Streams:
        return Streams(a / b for a, b in self._zip(other))

    def __neg__(self) -> Streams:
        return Streams(-a for a in self)

    @property
    def shape(self) -> torch.Size:
        return self[0].shape

    @property
    def dtype(self) -> torch.dtype:
        return self[0].dtype

    @property
    def device(self) -> torch.device:
        return self[0].device


State = Tensor | Streams


def tmap(fn: Callable[..., Tensor], *states: Any) -> Any:
    """Apply ``fn`` stream by stream (a plain tensor is one stream)."""
    if isinstance(states[0], tuple):
        return Streams(fn(*parts) for parts in zip(*states))
    return fn(*states)


# model_fn(x (B, C, H, W) or Streams, t (B,), y (B,) | None) -> velocity dx/dt in path time, shaped like x.
ModelFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
# callback({"x": state before the step, "i": step index, "t": current time, "denoised": x0 estimate, ...})
Callback = Callable[[dict[str, Any]], None]
RandnLike = Callable[[Tensor], Tensor]


def randn_streams(randn_like: RandnLike, x: State) -> State:
    """Fresh unit noise shaped like every stream of x (one ``randn_like`` call per stream, in stream order)."""
    return tmap(randn_like, x)


def check_inputs(noise: State, ts: Tensor) -> None:
    """Validate a sampler's noise (a tensor or streams with one batch size) and grid (1-D, strictly decreasing)."""
    parts = noise if isinstance(noise, tuple) else (noise,)
    if not parts or any(not p.is_floating_point() for p in parts):
        raise TypeError(f"noise must be floating point, got {[p.dtype for p in parts]}")
    if len({p.shape[0] for p in parts}) != 1:
        raise ValueError(f"every noise stream needs the same batch size, got {[tuple(p.shape) for p in parts]}")
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"ts must be a 1-D grid with >= 2 entries, got shape {tuple(ts.shape)}")
    if not bool((ts[1:] < ts[:-1]).all()):
        raise ValueError("ts must be strictly decreasing (from t_max towards 0)")
    if ts[-1].item() < 0:
        raise ValueError("ts must not go below 0")


def prior(noise: State, t0: float, path: Path) -> State:
    """Initial state at ``t0``: unit noise scaled by ``sigma(t0)`` (the data term ``alpha(t0) x0`` is dropped)."""
    s = path.sigma(torch.tensor(t0, dtype=torch.float64)).item()
    return tmap(lambda n: n * s, noise)


def tvec(t: float, x: State) -> Tensor:
    """The time as a ``(B,)`` tensor in x's dtype for the model call."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def call(model_fn: ModelFn, x: State, t: float, y: Tensor | None) -> State:
    """Evaluate the velocity and bring each stream to the state's dtype (casting only at the net call)."""
    v = model_fn(x, tvec(t, x), y)
    if isinstance(x, tuple) != isinstance(v, tuple) or (isinstance(x, tuple) and len(x) != len(v)):
        raise ValueError(f"the model returned {len(v) if isinstance(v, tuple) else 1} stream(s) for "
                         f"{len(x) if isinstance(x, tuple) else 1}")
    return tmap(lambda vi, xi: vi.to(xi.dtype), v, x)


def denoised(path: Path, x: State, v: State, t: float) -> State:
    """x0 estimate from the velocity (for callbacks and data-prediction solvers)."""
    return tmap(lambda xi, vi: path.x0_eps_from_velocity(xi, vi, t)[0].to(xi.dtype), x, v)
