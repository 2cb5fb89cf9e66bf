"""Finite numbers everywhere: nothing is saved, resumed, loaded or turned into images from NaN or infinity.

Training checks its weights before every save, the sampler entry points check a snapshot's weights when
loading it and every generated batch before decoding it, and settings read from configs are scanned for NaN
(which passes every ``<`` / ``>`` range check unnoticed).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch


class NonFiniteError(FloatingPointError):
    """Weights, a loss, a gradient or generated values stopped being finite; nothing was written from them."""


def finite_number(value: Any) -> bool:
    """True for a real, finite int or float (not bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _tensors(value: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _tensors(v, f"{prefix}[{k}]" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}[{i}]")


def non_finite_tensors(value: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors inside ``value`` (nested dicts/lists, e.g. a state dict) with NaN/inf."""
    return [name for name, t in _tensors(value, prefix) if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def nan_settings(value: Any, key: str) -> list[str]:
    """Dotted keys of NaN numbers inside a plain config value (a NaN slips through every range check)."""
    if isinstance(value, float) and math.isnan(value):
        return [key]
    if isinstance(value, Mapping):
        return [k for name, v in value.items() for k in nan_settings(v, f"{key}.{name}")]
    if isinstance(value, (list, tuple)):
        return [k for i, v in enumerate(value) for k in nan_settings(v, f"{key}[{i}]")]
    return []


def shorten(names: list[str], n: int = 4) -> str:
    """The first ``n`` names and how many more, for one-line messages."""
    return ", ".join(names[:n]) + (f" ... (+{len(names) - n} more)" if len(names) > n else "")
