"""Classifier-free guidance as a wrapper around ``model_fn`` (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance").

``v = v_u + scale (v_c - v_u)`` with the conditional and unconditional (null-label) branches evaluated in one
batched call. With several streams (REG's image and class token) each stream has its own scale
(``scale=(s_image, s_token)``, as REG's ``--cfg-scale`` and ``--cls-cfg-scale``). Options:

* ``interval = (t_lo, t_hi)``: guide only where ``t_lo <= t <= t_hi`` (our time, data at 0); elsewhere only the
  conditional branch is evaluated (Kynkaanniemi et al. 2024). ``(t_lo, t_hi, ends)`` picks open or closed ends in
  interval notation, ``ends`` one of ``"[]"`` (the default), ``"[)"``, ``"(]"``, ``"()"``. A time within
  ``BOUNDARY_TOL`` of an end counts as on it, so a grid point that is an end in exact arithmetic is in or out as the
  notation says, whatever the rounding of the grid (uniform grids put points on round ends). Conversions:
  LightningDiT's "cfg_interval_start = 0.125" (data at t = 1, guide when t_L >= 0.125) is ``(0, 0.875)``; REPA's
  ``guidance_low <= t <= guidance_high`` (noise at t = 1 as here) is ``(0, 0.7)``; DDT's open ``0.3 < t_D < 1``
  (MCG-NJU/DDT src/diffusion/stateful_flow_matching/sampling.py, data at t = 1) is ``(0, 0.7, "()")``.
* ``always_both = True``: evaluate both branches at every step, also outside the interval (the reference DDT
  sampler does; needed by encoder sharing, whose cache holds the doubled batch).
* ``dit_legacy_channels = k``: guide only the first k output channels and return the conditional output on the
  rest, reproducing DiT/SiT/LightningDiT's ``forward_with_cfg`` (k = 3) for their published numbers. The default
  guides all channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from samplers._common import ModelFn, State, Streams, tmap

__all__ = ["cfg", "in_interval", "parse_interval", "INTERVAL_ENDS"]

INTERVAL_ENDS = ("[]", "[)", "(]", "()")
BOUNDARY_TOL = 1e-9  # far below the spacing of any grid (steps <= 10^5), far above float64 rounding of t <= 1000

Interval = Sequence[Any]  # (t_lo, t_hi) or (t_lo, t_hi, ends)


def parse_interval(interval: Interval | None, name: str = "guidance interval") -> tuple[float, float, bool, bool] | None:
    """``None``, ``(t_lo, t_hi)`` or ``(t_lo, t_hi, ends)`` -> ``(t_lo, t_hi, lo_open, hi_open)``, or None.

    Raises ValueError naming ``name`` unless ``0 <= t_lo <= t_hi`` are finite numbers and ``ends`` is one of
    ``INTERVAL_ENDS``.
    """
    if interval is None:
        return None
    ok = isinstance(interval, Sequence) and not isinstance(interval, str) and len(interval) in (2, 3)
    if ok:
        lo, hi = interval[0], interval[1]
        ends = interval[2] if len(interval) == 3 else "[]"
        ok = (all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (lo, hi))
              and 0 <= lo <= hi and ends in INTERVAL_ENDS)
    if not ok:
        raise ValueError(
            f"{name} must be null, [t_lo, t_hi] or [t_lo, t_hi, ends] with 0 <= t_lo <= t_hi (path time, data at 0) "
            f"and ends one of {list(INTERVAL_ENDS)} (open or closed, as in interval notation), got {interval!r}"
        )
    return float(lo), float(hi), ends[0] == "(", ends[1] == ")"


def in_interval(t: Tensor, interval: Interval | None) -> Tensor:
    """Boolean mask ``(B,)``: where guidance applies (all True without an interval); see the module docstring."""
    parsed = parse_interval(interval)
    if parsed is None:
        return torch.ones_like(t, dtype=torch.bool)
    lo, hi, lo_open, hi_open = parsed
    above = t > lo + BOUNDARY_TOL if lo_open else t >= lo - BOUNDARY_TOL
    below = t < hi - BOUNDARY_TOL if hi_open else t <= hi + BOUNDARY_TOL
    return above & below


def _combine(v_c: Tensor, v_u: Tensor, scale: float, channels: int | None) -> Tensor:
    guided = v_u + scale * (v_c - v_u)
    if channels is None:
        return guided
    return torch.cat([guided[:, :channels], v_c[:, channels:]], dim=1)


def _scales(scale: float | Sequence[float], x: State) -> list[float]:
    n = len(x) if isinstance(x, tuple) else 1
    scales = [float(s) for s in scale] if isinstance(scale, Sequence) else [float(scale)] * n
    if len(scales) != n:
        raise ValueError(f"{len(scales)} guidance scales for {n} stream(s); give one per stream or a single scale")
    return scales


def cfg(
    model_fn: ModelFn,
    scale: float | Sequence[float],
    null_label: int,
    *,
    interval: Interval | None = None,
    always_both: bool = False,
    dit_legacy_channels: int | None = None,
) -> ModelFn:
    """Wrap ``model_fn(x, t, y) -> v`` with classifier-free guidance.

    Args:
        model_fn: conditional velocity model (a tensor state, or ``Streams`` of several).
        scale: guidance scale w (1 = conditional model, 0 = unconditional), or one per stream.
        null_label: the label of the unconditional branch (the backbone's ``num_classes``).
        interval: ``(t_lo, t_hi)`` (closed) or ``(t_lo, t_hi, ends)`` in path time where guidance is applied, or
            None for everywhere (module docstring).
        always_both: run the unconditional branch outside the interval too (its output is not used there).
        dit_legacy_channels: guide only this many leading channels of the image (first) stream (DiT
            compatibility), or None for all.

    Returns:
        A guided ``model_fn`` with the same signature. It needs labels: ``y`` must not be None.
    """
    parse_interval(interval)  # refuse a bad interval now, not at the first step
    if dit_legacy_channels is not None and dit_legacy_channels < 1:
        raise ValueError(f"dit_legacy_channels must be >= 1, got {dit_legacy_channels}")

    def guided_fn(x: State, t: Tensor, y: Tensor | None) -> State:
        if y is None:
            raise ValueError("classifier-free guidance needs labels y")
        scales = _scales(scale, x)
        mask = in_interval(t, interval)
        if not bool(mask.any()) and not always_both:
            return model_fn(x, t, y)  # outside the interval: conditional branch only (half the cost)
        y_null = torch.full_like(y, null_label)
        out = model_fn(tmap(lambda a: torch.cat([a, a]), x), torch.cat([t, t]), torch.cat([y, y_null]))
        parts = out if isinstance(out, tuple) else (out,)
        result = []
        for i, (o, s) in enumerate(zip(parts, scales)):
            v_c, v_u = o.chunk(2)
            v = _combine(v_c, v_u, s, dit_legacy_channels if i == 0 else None)
            if not bool(mask.all()):
                v = torch.where(mask.reshape(-1, *([1] * (v.ndim - 1))), v, v_c)
            result.append(v)
        return Streams(result) if isinstance(out, tuple) else result[0]

    return guided_fn
