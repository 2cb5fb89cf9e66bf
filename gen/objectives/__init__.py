"""Training objectives and the bridge from (bare network, prediction spec) to a sampler's velocity function."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from gen.models.precond import EDMPrecond
from gen.objectives.base import Objective
from gen.objectives.edm import EDMLoss
from gen.objectives.flow_matching import FlowMatching, RectifiedFlow
from gen.paths import path_from_spec

ModelFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]

__all__ = ["Objective", "FlowMatching", "RectifiedFlow", "EDMLoss", "velocity_model"]


def velocity_model(net: nn.Module, spec: Mapping[str, Any]) -> ModelFn:
    """Turn a bare network and its ``prediction_spec()`` into ``model_fn(x, t, y) -> velocity`` in path time.

    Args:
        net: the backbone ``net(x, t, y) -> Tensor``.
        spec: ``{"path": {...}, "prediction": "velocity" | "x0" | "eps", "precond": None | {"kind": "edm", ...}}``.

    Returns:
        A function of ``x (B, C, H, W)``, ``t (B,)`` and ``y (B,)`` returning the velocity ``dx/dt`` (float32, or
        float64 for float64 input). With EDM preconditioning the network is wrapped in ``EDMPrecond`` and
        ``v = (x - D(x, sigma)) / sigma`` (``t`` is sigma on the EDM path).
    """
    path = path_from_spec(spec["path"])
    kind = spec.get("prediction", "velocity")
    if kind not in ("velocity", "x0", "eps"):
        raise ValueError(f"unknown prediction kind {kind!r}")
    precond = spec.get("precond")
    if precond is None:
        inner = net
    elif dict(precond).get("kind") == "edm":
        inner = EDMPrecond(net, float(precond.get("sigma_data", 0.5)))
    else:
        raise ValueError(f"unknown preconditioning {precond!r}")

    def model_fn(x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        out = inner(x, t, y)
        return path.to_velocity(kind, x, out, t)

    return model_fn
