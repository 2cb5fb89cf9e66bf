"""From a trained network to images: sampler construction, seeded generation, snapshot loading.

This is the glue of the entry points (it lives beside them, above every library package): ``train.py``
(preview grids, final evaluation), ``sample.py`` and the evaluation jobs (``--generator
pipeline:snapshot_generate_fn``): ``network + prediction spec -> velocity model_fn -> guidance -> sampler ->
decode -> uint8``. Noise and labels of image ``k`` come from its own seed, so a sample set is the same at
any batch size and on any number of processes.

Nothing is trusted or silent: a snapshot's metadata is checked against the tensors in the file before anything
is built (``gen.utils.ckpt.build_from_snapshot``), non-finite weights are refused when loading, and a batch whose
values stop being finite is refused before it becomes (black) images.

Sampler config (``configs/sampler/*.yaml``); ``solver`` and ``grid`` are ``_target_`` specs built as partials::

    solver: {_target_: samplers.sample_euler}       # + the solver's options (e.g. S_churn, diffusion, last_step)
    steps: 30
    grid: {_target_: samplers.grids.uniform_grid}   # grid(steps, path=path): uniform, shifted, karras, log_snr
    guidance: {scale: 1.0, interval: null | [t_lo, t_hi], dit_legacy_channels: null}
    sharing: null | {rate: k} | {schedule: file.json}   # DDT encoder sharing (samplers/sharing.py)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from gen.data import to_uint8
from gen.models import ModelOutput
from gen.models.prediction import is_consistency, prediction_path, velocity_model
from gen.paths import Path
from gen.utils.build import build
from gen.utils.ckpt import (
    CheckpointError,
    build_from_snapshot,
    check_config_ints,
    load_snapshot,
    snapshot_int_bound,
)
from gen.utils.cli import describe_os_error
from gen.utils.dist import resolve_device
from gen.utils.finite import NonFiniteError, finite_number, nan_settings, non_finite_tensors, shorten
from gen.utils.seed import PerImageRandom
from samplers import Streams, guidance, sharing

SAMPLER_KEYS = {"solver", "steps", "grid", "guidance", "sharing"}
DEFAULT_SAMPLER: dict[str, Any] = {
    "solver": {"_target_": "samplers.sample_euler"}, "steps": 30, "grid": {"_target_": "samplers.grids.uniform_grid"},
}
GUIDANCE_KEYS = {"scale", "interval", "dit_legacy_channels"}
MAX_STEPS = 100_000  # far above any published sampler; a larger value is a typo (and a time grid of that size)


def _partial(cfg: Any, key: str) -> Callable[..., Any]:
    if not isinstance(cfg, Mapping) or "_target_" not in cfg:
        raise ValueError(f"sampler.{key} needs a '_target_' spec, got {cfg!r}")
    return build({**cfg, "_partial_": True})


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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
        if not isinstance(cfg, Mapping):
            raise ValueError(f"the sampler config must be a mapping of {sorted(SAMPLER_KEYS)}, got {cfg!r}")
        cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()}
        unknown = set(cfg) - SAMPLER_KEYS
        if unknown:
            raise ValueError(f"unknown sampler key(s) {sorted(unknown)}; known: {sorted(SAMPLER_KEYS)}")
        nan = nan_settings(cfg, "sampler")
        if nan:  # NaN passes every range check below and in the solvers, and turns every image black
            raise ValueError(f"{nan[0]} is NaN; give a number")
        steps = cfg.get("steps")
        if not _positive_int(steps) or steps > MAX_STEPS:
            raise ValueError(f"sampler.steps must be an integer in [1, {MAX_STEPS}], got {steps!r}")
        guide = cfg.get("guidance") or {}
        if not isinstance(guide, Mapping):
            raise ValueError(f"sampler.guidance must be a mapping with keys {sorted(GUIDANCE_KEYS)}, got {guide!r}")
        guide = dict(guide)
        unknown_g = set(guide) - GUIDANCE_KEYS
        if unknown_g:
            raise ValueError(f"unknown sampler.guidance key(s) {sorted(unknown_g)}; known: {sorted(GUIDANCE_KEYS)}")
        scale = guide.get("scale", 1.0)
        if isinstance(scale, (list, tuple)) and not scale:
            raise ValueError("sampler.guidance.scale is an empty list; give a number (or one per stream)")
        for s in scale if isinstance(scale, (list, tuple)) else [scale]:
            if not finite_number(s):
                raise ValueError(f"sampler.guidance.scale must be a finite number (or one per stream), got {scale!r}")
        interval = guide.get("interval")
        if interval is not None and not (
            isinstance(interval, (list, tuple)) and len(interval) == 2 and all(finite_number(v) for v in interval)
            and 0 <= interval[0] <= interval[1]
        ):
            raise ValueError(
                f"sampler.guidance.interval must be null or [t_lo, t_hi] with 0 <= t_lo <= t_hi (path time, data at 0), "
                f"got {interval!r}"
            )
        channels = guide.get("dit_legacy_channels")
        if channels is not None and not _positive_int(channels):
            raise ValueError(f"sampler.guidance.dit_legacy_channels must be null or a positive integer, got {channels!r}")
        sharing = cfg.get("sharing")
        if sharing is not None and (
            not isinstance(sharing, Mapping) or set(sharing) - {"rate", "schedule"} or len(sharing) != 1
        ):
            raise ValueError(f"sampler.sharing must be null, {{rate: k}} or {{schedule: file}}, got {sharing!r}")
        if sharing is not None and "rate" in sharing and not _positive_int(sharing["rate"]):
            raise ValueError(f"sampler.sharing.rate must be a positive integer, got {sharing['rate']!r}")
        spec = cls(cfg, _partial(cfg.get("solver"), "solver"), _partial(cfg.get("grid"), "grid"), steps, guide, sharing)
        if sharing is not None:
            try:  # read the schedule file now, not at the first preview of a long training run
                spec.recompute_steps()
            except OSError as e:
                raise ValueError("sampler.sharing.schedule: " + describe_os_error(e, e.filename, "read")) from e
            except ValueError as e:
                raise ValueError(f"sampler.sharing: {e}") from e
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


class MinRows(nn.Module):
    """Calls ``net`` on at least ``min_rows`` rows, padding small batches with copies of row 0.

    CPU GEMM libraries switch to other kernels (another summation order) for matrices of very few
    rows, so without padding a batch of 4 images can differ in the last bit from the same images
    inside a batch of 16, and after rounding to uint8 an occasional pixel differs. Padding keeps
    every call in the large-matrix regime, so an image depends only on its seed.
    """

    def __init__(self, net: nn.Module, min_rows: int = 16) -> None:
        super().__init__()
        self.net, self.min_rows = net, int(min_rows)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None, **kwargs: Any) -> ModelOutput:
        n = x.shape[0]
        if n >= self.min_rows:
            return self.net(x, t, y, **kwargs)
        idx = torch.cat([torch.arange(n), torch.zeros(self.min_rows - n, dtype=torch.long)]).to(x.device)
        pad = {k: v[idx] if isinstance(v, Tensor) and v.shape[:1] == (n,) else v for k, v in kwargs.items()}
        res = self.net(x[idx], t[idx], None if y is None else y[idx], **pad)
        return ModelOutput(
            res.out[:n],
            None if res.extra is None else res.extra[:n],
            [f[:n] for f in res.features],
            None if res.encoder_out is None else res.encoder_out[:n],
        )


@dataclass
class Generator:
    """Everything needed to turn seeds into images.

    Attributes:
        net: the (EMA) network, in eval mode.
        prediction: the objective's prediction spec (path, prediction kind, preconditioning).
        tokenizer: decodes model outputs to images in [-1, 1].
        input_shape: model input shape (C, H, W).
        num_classes: number of real classes; label ``num_classes`` is the null label.
        min_rows: network calls are padded to at least this many rows (see ``MinRows``).
    """

    net: nn.Module
    prediction: Mapping[str, Any]
    tokenizer: Any
    input_shape: tuple[int, int, int]
    num_classes: int
    min_rows: int = 16

    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        sampler: SamplerSpec,
        labels: Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor]:
        """Images for ``seeds`` (one batch): uint8 (N, C, H, W) and labels (N,).

        Each seed draws its label (unless ``labels`` are given) and then its noise from its own
        generator, so the result for a seed does not depend on the other seeds in the batch.
        """
        check_solver_fits(sampler, self.prediction)
        rnd = PerImageRandom(seeds)
        drawn = rnd.randint(self.num_classes)
        y = drawn if labels is None else labels.to(torch.long).cpu()
        noise: Any = rnd.randn(self.input_shape).to(device)
        extra = int(getattr(self.net, "extra_token_dim", 0) or 0)
        if extra > 0:  # REG: the class token is generated with the image, from the same seed, then dropped
            noise = Streams((noise, rnd.randn((extra,)).to(device)))
        path = prediction_path(self.prediction)
        ts = sampler.time_grid(path)
        net: Any = MinRows(self.net) if self.min_rows > 1 else self.net
        recompute = sampler.recompute_steps()
        if recompute is not None:
            net = sharing.EncoderSharing(net, ts, recompute)
        model_fn = guided_model_fn(velocity_model(net, self.prediction), sampler, self.num_classes)
        x = run_sampler(model_fn, noise, y.to(device), path, sampler, rnd.randn_like, ts)
        x = x[0] if isinstance(x, tuple) else x
        decoded = self.tokenizer.decode(x).float()
        bad = ~torch.isfinite(decoded.flatten(1)).all(1)
        if bool(bad.any()):
            # clamp() would turn NaN into black pixels and inf into white ones: refuse instead.
            seeds_bad = [int(s) for s, b in zip(seeds, bad.tolist()) if b]
            raise NonFiniteError(
                f"sampling produced non-finite values for {len(seeds_bad)} of {len(seeds)} images (seeds "
                f"{shorten([str(s) for s in seeds_bad])}); no image was written from them. The weights are finite, "
                "so the sampler diverged: check the sampler settings (guidance scale, steps, solver and grid options)"
            )
        images = to_uint8(decoded.clamp(-1, 1))
        return images.cpu(), y


def generator_from_snapshot(path: str, device: torch.device | str = "cpu") -> tuple[Generator, dict[str, Any]]:
    """Rebuild the network, prediction spec and tokenizer from a snapshot's metadata.

    The metadata is untrusted: the network is built only after its config has been checked against the tensors
    in the file (``build_from_snapshot``), the weights must be finite, and the data section must agree with the
    network (its class count: a mismatch would draw the null label as a class; its resolution: the noise size).

    Raises:
        CheckpointError / ValueError: naming the file and what is wrong. NonFiniteError: non-finite weights.
    """
    tensors, config = load_snapshot(path)
    for key in ("model", "prediction", "data", "tokenizer"):
        if not isinstance(config.get(key), Mapping):
            raise CheckpointError(f"snapshot {path} lacks '{key}' in its config metadata; was it written by train.py?")
    bad = non_finite_tensors(tensors)
    if bad:
        raise NonFiniteError(
            f"snapshot {path} holds non-finite weights ({shorten(bad)}); it cannot make images. Use an earlier "
            "snapshot of the run"
        )
    bound = snapshot_int_bound(tensors)
    for key in ("data", "tokenizer"):
        check_config_ints(config[key], bound, str(path), key)
    net = build_from_snapshot(config["model"], tensors, str(path))
    net = net.to(device).eval().requires_grad_(False)
    tokenizer = build(config["tokenizer"]).to(device)
    data = config["data"]
    try:
        num_classes, resolution = int(data["num_classes"]), int(data["resolution"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"snapshot {path}: its data metadata {data!r} lacks an integer num_classes/resolution") from e
    net_classes = getattr(net, "num_classes", num_classes)
    if num_classes < 1 or num_classes != net_classes:
        raise CheckpointError(
            f"snapshot {path}: its data metadata says num_classes={num_classes} but the network has {net_classes} "
            f"classes (label {net_classes} is its null class); the metadata is damaged or edited"
        )
    shape = tuple(tokenizer.latent_shape(resolution))
    want = (getattr(net, "in_channels", shape[0]), getattr(net, "input_size", shape[1]), getattr(net, "input_size", shape[2]))
    if shape != want:
        raise CheckpointError(
            f"snapshot {path}: data resolution {resolution} gives model inputs of shape {shape} but the network takes "
            f"{want}; the metadata is damaged or edited"
        )
    gen = Generator(net, config["prediction"], tokenizer, shape, num_classes)  # type: ignore[arg-type]
    return gen, config


def snapshot_generate_fn(
    snapshot: str,
    kind: str | None = None,
    steps: int | str | None = None,
    cfg: float | str | None = None,
    batch_device: str = "auto",
) -> Callable[[list[int]], tuple[Tensor, Tensor]]:
    """A ``generate_fn(seeds) -> (uint8 images, labels)`` for a snapshot, for the evaluation CLI.

    The sampler is the one stored in the snapshot (the training run's), with ``kind``, ``steps`` and
    the guidance scale ``cfg`` overridable (strings are accepted, as the CLI passes them)::

        python -m eval fid10k runs/x/snapshot-000100000.safetensors --ref refs/x.npz \\
            --generator pipeline:snapshot_generate_fn --option steps=50 --option cfg=1.5
    """
    device = resolve_device(batch_device, "batch_device")
    gen, config = generator_from_snapshot(snapshot, device)
    sampler_cfg = dict(config.get("sampler") or DEFAULT_SAMPLER)
    if kind is not None:  # a solver by its short name, e.g. "heun" -> samplers.sample_heun
        sampler_cfg["solver"] = {"_target_": f"samplers.sample_{kind}"}
    if steps is not None:
        sampler_cfg["steps"] = int(steps)
    if cfg is not None:
        sampler_cfg["guidance"] = {**dict(sampler_cfg.get("guidance") or {}), "scale": float(cfg)}
    spec = SamplerSpec.from_config(sampler_cfg)

    def generate_fn(seeds: list[int]) -> tuple[Tensor, Tensor]:
        return gen.generate(seeds, spec, device=device)

    return generate_fn
