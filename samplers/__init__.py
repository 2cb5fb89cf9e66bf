"""Samplers: pure functions over ``model_fn(x, t, y) -> velocity`` and a descending time grid.

Signature shared by every sampler (docs/architecture.md)::

    sample_xxx(model_fn, noise, ts, *, path, y=None, callback=None, randn_like=torch.randn_like, **options)

The state may be one tensor or ``Streams`` of several integrated together (REG's image and class token); the
solvers are written once for both. DDT's encoder cache is not state: ``sharing.EncoderSharing`` keeps it in the
network call.

Gradients are the caller's choice: a solver records the autograd graph like any torch code, so a training loss
can differentiate through a few-step sample (a distillation student); ``eval.generator.Generator`` samples under
``torch.no_grad``.

This package imports only ``gen.paths`` and ``gen.utils`` (enforced by the layering test).
"""

from __future__ import annotations

from samplers._common import Streams
from samplers.consistency import consistency_grid, sample_consistency
from samplers.dpm_solver import sample_dpmpp_2m
from samplers.euler import sample_euler
from samplers.grids import karras_grid, lcm_grid, log_snr_grid, shifted_grid, uniform_grid
from samplers.guidance import cfg
from samplers.heun import sample_heun
from samplers.reflow import sample_reuse_noise
from samplers.sde import sample_euler_maruyama
from samplers.sharing import EncoderSharing
from samplers.student import sample_ddim, sample_lcm

__all__ = [
    "Streams",
    "sample_euler",
    "sample_heun",
    "sample_euler_maruyama",
    "sample_dpmpp_2m",
    "sample_reuse_noise",
    "sample_consistency", "consistency_grid",
    "sample_ddim", "sample_lcm",
    "EncoderSharing",
    "uniform_grid", "shifted_grid", "karras_grid", "log_snr_grid", "lcm_grid",
    "cfg",
]
