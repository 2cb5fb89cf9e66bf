"""The sampler config as an object: a validated spec, classifier-free guidance around a velocity function, and the
solver call (``run_sampler``) that every generator makes; ``check_sampler`` runs it once on a stand-in model.

Sampler config (``configs/sampler/*.yaml``); ``solver`` and ``grid`` are ``_target_`` specs built as partials::

    solver: {_target_: samplers.sample_euler}       # + the solver's options (e.g. S_churn, diffusion, last_step)
    steps: 30
    grid: {_target_: samplers.grids.uniform_grid}   # grid(steps, path=path): uniform, shifted, karras, log_snr, lcm
    guidance: {scale: 1.0, interval: null | [t_lo, t_hi], dit_legacy_channels: null}
    sharing: null | {rate: k} | {schedule: file.json}   # DDT encoder sharing (samplers/sharing.py)

Like every solver, ``run_sampler`` records gradients unless its caller turns them off: ``eval.generator.Generator``
samples under ``torch.no_grad``; a training loss may differentiate through a few-step sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from gen.paths import Path
from gen.utils.build import BuildError, build
from gen.utils.cli import describe_os_error
from gen.utils.config import ConfigError, from_mapping
from gen.utils.finite import finite_number, nan_settings
from gen.utils.seed import PerImageRandom
from samplers import guidance, sharing
from samplers._common import Streams

__all__ = ["SamplerSpec", "guided_model_fn", "run_sampler", "check_sampler", "check_solver_fits", "is_consistency",
           "prediction_path",
           "DEFAULT_SAMPLER", "MAX_STEPS"]


def prediction_path(prediction: Mapping[str, Any]) -> Path:
    """The ``Path`` of an objective's prediction spec (``{"path": spec, ...}``)."""
    path = build(prediction["path"])
    if not isinstance(path, Path):
        raise BuildError(f"prediction spec 'path' builds {type(path).__name__}, not a gen.paths.Path")
    return path


DEFAULT_SAMPLER: dict[str, Any] = {
    "solver": {"_target_": "samplers.sample_euler"}, "steps": 30, "grid": {"_target_": "samplers.grids.uniform_grid"},
}
MAX_STEPS = 100_000  # far above any published sampler; a larger value is a typo (and a time grid of that size)


def _partial(cfg: Any, key: str) -> Callable[..., Any]:
    if not isinstance(cfg, Mapping) or "_target_" not in cfg:
        raise ValueError(f"sampler.{key} needs a '_target_' spec, got {cfg!r}")
    return build({**cfg, "_partial_": True})


def _plain(value: Any) -> Any:
    """Mappings and lists (Hydra's containers included) as plain dicts and lists: what snapshots store."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


@dataclass
class GuidanceSettings:
    """``sampler.guidance``: the CFG scale (one per stream for REG), the path-time interval where it applies
    (``[t_lo, t_hi(, ends)]``, samplers.guidance), and DiT's legacy guided-channel count."""

    scale: float | list[float] = 1.0
    interval: Any = None  # checked by guidance.parse_interval, whose message lists the accepted forms
    dit_legacy_channels: int | None = None

    def __post_init__(self) -> None:
        scales = self.scale if isinstance(self.scale, list) else [self.scale]
        if not scales:
            raise ValueError("sampler.guidance.scale is an empty list; give a number (or one per stream)")
        if not all(finite_number(s) for s in scales):
            raise ValueError(f"sampler.guidance.scale must be a finite number (or one per stream), got {self.scale!r}")
        guidance.parse_interval(self.interval, "sampler.guidance.interval")
        if self.dit_legacy_channels is not None and self.dit_legacy_channels < 1:
            raise ValueError(f"sampler.guidance.dit_legacy_channels must be null or positive, got {self.dit_legacy_channels}")


@dataclass
class SamplerSettings:
    """The keys of a sampler config, typed and range-checked (gen.utils.config.from_mapping, like every section)."""

    solver: dict[str, Any]
    steps: int
    grid: dict[str, Any]
    guidance: dict[str, Any] | None = None
    sharing: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.steps <= MAX_STEPS:
            raise ValueError(f"sampler.steps must be an integer in [1, {MAX_STEPS}], got {self.steps!r}")
        share = self.sharing
        if share is not None and (set(share) - {"rate", "schedule"} or len(share) != 1):
            raise ValueError(f"sampler.sharing must be null, {{rate: k}} or {{schedule: file}}, got {share!r}")
        rate = (share or {}).get("rate", 1)
        if not isinstance(rate, int) or isinstance(rate, bool) or rate < 1:
            raise ValueError(f"sampler.sharing.rate must be a positive integer, got {rate!r}")


@dataclass
class SamplerSpec:
    """A validated sampler config (see the module docstring); ``config`` is what snapshots store."""

    config: dict[str, Any]
    solver: Callable[..., Tensor]
    grid: Callable[..., Tensor]
    steps: int
    guidance: dict[str, Any] = field(default_factory=dict)
    sharing: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SamplerSpec:
        """Check ``cfg`` (unknown keys, types, ranges, NaN: ConfigError naming ``sampler.<key>``) and build it."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"the sampler config must be a mapping (solver, steps, grid, ...), got {cfg!r}")
        cfg = _plain(cfg)
        nan = nan_settings(cfg, "sampler")
        if nan:  # NaN passes every range check below and in the solvers, and turns every image black
            raise ConfigError(f"{nan[0]} is NaN; give a number")
        settings = from_mapping(SamplerSettings, cfg, "sampler")
        from_mapping(GuidanceSettings, settings.guidance or {}, "sampler.guidance")  # checked; the spec keeps the mapping
        spec = cls(cfg, _partial(settings.solver, "solver"), _partial(settings.grid, "grid"), settings.steps,
                   dict(settings.guidance or {}), settings.sharing)
        if settings.sharing is not None:
            try:  # read the schedule file now, not at the first preview of a long training run
                spec.recompute_steps()
            except OSError as e:
                raise ConfigError("sampler.sharing.schedule: " + describe_os_error(e, e.filename, "read")) from e
            except ValueError as e:
                raise ConfigError(f"sampler.sharing: {e}") from e
        return spec

    def time_grid(self, path: Path) -> Tensor:
        """The descending grid from the path's ``t_max`` to 0."""
        return self.grid(self.steps, path=path)

    def recompute_steps(self) -> list[int] | None:
        """The encoder-sharing schedule (None: no sharing)."""
        if self.sharing is None:
            return None
        if "rate" in self.sharing:
            return sharing.uniform_steps(self.steps, int(self.sharing["rate"]))
        return sharing.load_schedule(self.sharing["schedule"], self.steps)["recompute"]


def guided_model_fn(model_fn: Callable, spec: SamplerSpec, null_label: int) -> Callable:
    """Wrap a conditional velocity function with classifier-free guidance on all channels."""
    scale = spec.guidance.get("scale", 1.0)
    interval = spec.guidance.get("interval")
    if all(float(s) == 1.0 for s in (scale if isinstance(scale, (list, tuple)) else [scale])):
        return model_fn
    return guidance.cfg(
        model_fn, scale, null_label, interval=tuple(interval) if interval is not None else None,
        always_both=spec.sharing is not None, dit_legacy_channels=spec.guidance.get("dit_legacy_channels"),
    )


def run_sampler(
    model_fn: Callable, noise: Tensor, y: Tensor | None, path: Path, spec: SamplerSpec, randn_like: Callable,
    ts: Tensor | None = None,
) -> Tensor:
    """Integrate from ``noise`` at ``t_max`` to data with the configured solver and grid."""
    ts = spec.time_grid(path) if ts is None else ts
    return spec.solver(model_fn, noise, ts.to(noise.device), path=path, y=y, randn_like=randn_like)


def is_consistency(prediction: Mapping[str, Any]) -> bool:
    """Whether a prediction spec is a consistency model (``"prediction": "consistency"``, gen.models.prediction)."""
    return prediction.get("prediction") == "consistency"


def check_solver_fits(spec: SamplerSpec, prediction: Mapping[str, Any]) -> None:
    """Refuse a solver that cannot serve the model: a consistency model (``"prediction": "consistency"``) only with
    the consistency sampler, and the consistency sampler only with a consistency model.

    Raises:
        ValueError: naming the solver, the model kind and the sampler preset to use.
    """
    solver = getattr(spec.solver, "func", spec.solver)
    wants_cm = bool(getattr(solver, "consistency_only", False))
    name = (spec.config.get("solver") or {}).get("_target_", getattr(solver, "__name__", "?"))
    if is_consistency(prediction) and not wants_cm:
        raise ValueError(
            f"the snapshot is a consistency model, which {name} cannot sample (its output is f(x, sigma), not an "
            "ODE velocity); use sampler=consistency (1 step) or sampler=consistency_2step"
        )
    if wants_cm and not is_consistency(prediction):
        raise ValueError(
            f"{name} samples consistency models only, and this model's prediction is "
            f"{prediction.get('prediction', 'velocity')!r}; use an ODE sampler (e.g. sampler=euler or sampler=heun)"
        )


def check_sampler(spec: SamplerSpec, prediction: Mapping[str, Any], num_classes: int, extra_token_dim: int = 0) -> None:
    """Run the configured grid, guidance and solver once on a stand-in model, so bad settings fail before any work.

    The stand-in predicts zero velocity for a single 1x2x2 image (plus REG's class-token stream of width
    ``extra_token_dim`` when the model takes one, so per-stream guidance scales are checked against the real number
    of streams): this costs ``steps`` trivial solver steps, not a network call, and reaches every solver and grid
    option (a negative churn, a grid that is not descending, ...).

    Raises:
        ValueError: naming the sampler setting that cannot run.
    """
    check_solver_fits(spec, prediction)
    path = prediction_path(prediction)
    try:
        ts = spec.time_grid(path)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"sampler.grid cannot build a time grid of {spec.steps} steps: {e}") from e
    if not isinstance(ts, Tensor) or ts.ndim != 1 or len(ts) < 2 or not bool(torch.isfinite(ts).all()):
        raise ValueError(f"sampler.grid built {ts!r} for {spec.steps} steps; expected a finite 1-D grid ending at 0")
    if float(ts[-1]) != 0.0 or float(ts[0]) <= 0.0 or bool((ts[1:] > ts[:-1]).any()):
        raise ValueError(
            f"sampler.grid must descend from t_max to 0; it gives {ts[0].item():.4g} ... {ts[-1].item():.4g} with "
            f"{int((ts[1:] > ts[:-1]).sum())} rising step(s). Check the grid options"
        )

    def zero_velocity(x: Any, t: Tensor, y: Tensor | None, **kwargs: Any) -> Any:
        return Streams(torch.zeros_like(a) for a in x) if isinstance(x, Streams) else torch.zeros_like(x)

    rnd = PerImageRandom([0])
    noise: Any = rnd.randn((1, 2, 2))
    if extra_token_dim > 0:
        noise = Streams((noise, rnd.randn((extra_token_dim,))))
    try:
        x = run_sampler(guided_model_fn(zero_velocity, spec, num_classes), noise, torch.zeros(1, dtype=torch.long),
                        path, spec, rnd.randn_like, ts)
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        raise ValueError(f"the sampler cannot run with these settings: {e}") from e
    x = x[0] if isinstance(x, tuple) else x
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the sampler produces non-finite values with these settings; check its options")
