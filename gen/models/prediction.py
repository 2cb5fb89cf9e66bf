"""The inference bridge: a bare network plus the prediction spec its objective stored -> a velocity function.

A snapshot stores the objective's ``prediction_spec()``::

    {"path": {"_target_": "gen.paths.LinearPath"}, "prediction": "velocity" | "x0" | "eps" | "consistency",
     "precond": None | {"_target_": "gen.models.precond.EDMPrecond", "sigma_data": 0.5}}

and :func:`velocity_model` turns (network, spec) into the samplers' ``model_fn(x, t, y) -> velocity`` in path
time. Every spec is built with the project-restricted constructor, so an untrusted snapshot names nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from gen.paths import Path
from gen.utils.build import BuildError, build

ModelFn = Callable[..., Tensor]
PREDICTIONS = ("velocity", "x0", "eps", "consistency")
# A consistency model's f(x, sigma) is a clean-image estimate, so it is exposed as x0; only the consistency sampler
# may use it (``samplers.consistency``; samplers.spec.check_solver_fits refuses ODE/SDE solvers for it).
CONSISTENCY = "consistency"


def is_consistency(spec: Mapping[str, Any]) -> bool:
    """Whether a prediction spec is a consistency model (``"prediction": "consistency"``)."""
    return spec.get("prediction") == CONSISTENCY


def prediction_path(spec: Mapping[str, Any]) -> Path:
    """The ``Path`` of a prediction spec."""
    path = build(spec["path"])
    if not isinstance(path, Path):
        raise BuildError(f"prediction spec 'path' builds {type(path).__name__}, not a gen.paths.Path")
    return path


def velocity_model(net: nn.Module, spec: Mapping[str, Any]) -> ModelFn:
    """Turn a bare network and its objective's ``prediction_spec()`` into ``model_fn(x, t, y, **kw) -> velocity``.

    Args:
        net: the backbone ``net(x, t, y, **kw) -> ModelOutput``.
        spec: see the module docstring.

    Returns:
        A function of ``x (B, C, H, W)``, ``t (B,)``, ``y (B,)`` and backbone keywords, returning the velocity
        ``dx/dt`` (float32, or float64 for float64 input). For REG's two streams ``x = (image, token (B, D))`` the
        token is the backbone's ``extra_token`` and both velocities are returned. With preconditioning the network is wrapped first (EDM:
        ``v = (x - D(x, sigma)) / sigma``, ``t`` being sigma on the EDM path).
    """
    path = prediction_path(spec)
    kind = spec.get("prediction", "velocity")
    if kind not in PREDICTIONS:
        raise BuildError(f"unknown prediction kind {kind!r}; expected one of {PREDICTIONS}")
    kind = "x0" if kind == CONSISTENCY else kind
    precond = spec.get("precond")
    inner = net if precond is None else build(precond, net=net)

    def model_fn(x: Tensor | tuple[Tensor, Tensor], t: Tensor, y: Tensor | None, **kwargs: Any) -> Any:
        if isinstance(x, tuple):  # REG: (image, class token) integrated together, the token as the extra input
            x_img, x_tok = x
            res = inner(x_img, t, y, extra_token=x_tok, **kwargs)
            return path.to_velocity(kind, x_img, res.out, t), path.to_velocity(kind, x_tok, res.extra, t)
        return path.to_velocity(kind, x, inner(x, t, y, **kwargs).out, t)

    return model_fn
