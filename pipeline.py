"""From a trained network to images, for the entry points: a thin re-export of the checked layers that do the work.

* ``samplers.spec``: the sampler config (``SamplerSpec``), guidance around a velocity function, the solver call
  (``run_sampler``) and ``check_sampler``.
* ``eval.generator``: seeded generation (``Generator``, ``MinRows``) and a snapshot's generator
  (``generator_from_snapshot``, ``snapshot_generate_fn`` for ``python -m eval ... --generator
  pipeline:snapshot_generate_fn``).
* ``gen.snapshot``: the one snapshot loader below all of them (also used by ``trainer.init`` and teachers).
"""

from __future__ import annotations

from eval.generator import Generator, MinRows, generator_from_snapshot, snapshot_generate_fn
from samplers.spec import (
    DEFAULT_SAMPLER,
    MAX_STEPS,
    SamplerSpec,
    check_sampler,
    check_solver_fits,
    guided_model_fn,
    prediction_path,
    run_sampler,
)

__all__ = [
    "DEFAULT_SAMPLER", "MAX_STEPS", "SamplerSpec", "check_sampler", "check_solver_fits", "guided_model_fn",
    "prediction_path", "run_sampler",
    "Generator", "MinRows", "generator_from_snapshot", "snapshot_generate_fn",
]
