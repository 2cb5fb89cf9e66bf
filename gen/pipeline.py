"""From a trained network to images: sampler construction, seeded generation, snapshot loading.

This is the glue shared by ``train.py`` (preview grids, final evaluation), ``sample.py`` and the
evaluation jobs: ``network + prediction spec -> velocity model_fn -> guidance -> sampler -> decode
-> uint8``. Noise and labels of image ``k`` come from its own seed, so a sample set is the same at
any batch size and on any number of processes.

Sampler config (``configs/sampler/*.yaml``)::

    kind: euler | heun | euler_maruyama | dpmpp_2m
    steps: 30
    grid: {kind: uniform | shifted | karras | log_snr, shift: 1.0, t_min: null, rho: 7.0, sigma_min: 0.002,
           sigma_max: 80}      # karras: uniform in sigma^(1/rho); log_snr: uniform in log(alpha / sigma)
    guidance: {scale: 1.0, interval: null | [t_lo, t_hi], dit_legacy_channels: null}
    options: {}            # extra keyword arguments of the sampler function
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import samplers
from gen.data import to_uint8
from gen.models import build_model
from gen.objectives import velocity_model
from gen.paths import EDMPath, Path, path_from_spec
from gen.utils.ckpt import load_snapshot, load_state_dict_checked
from gen.utils.seed import PerImageRandom
from samplers import grids, guidance

SamplerFn = Callable[..., Tensor]

SAMPLER_KINDS: dict[str, str] = {
    "euler": "sample_euler",
    "heun": "sample_heun",
    "euler_maruyama": "sample_euler_maruyama",
    "dpmpp_2m": "sample_dpmpp_2m",
}
SAMPLER_KEYS = {"kind", "steps", "grid", "guidance", "options"}


def _grid(cfg: Mapping[str, Any], steps: int, path: Path) -> Tensor:
    cfg = dict(cfg or {})
    kind = cfg.pop("kind", "uniform")
    t_min = cfg.pop("t_min", None)
    if kind == "uniform":
        shift = float(cfg.pop("shift", 1.0))
        ts = grids.shifted_grid(steps, shift, path.t_max, t_min=t_min) if shift != 1.0 else grids.uniform_grid(
            steps, path.t_max, t_min=t_min
        )
    elif kind == "shifted":
        ts = grids.shifted_grid(steps, float(cfg.pop("shift")), path.t_max, t_min=t_min)
    elif kind in ("karras", "log_snr"):
        # sigma_* are VE noise levels sigma/alpha; on non-EDM paths they are mapped to path time.
        default_max = float(path.t_max) if isinstance(path, EDMPath) else 80.0
        sigmas = {"sigma_min": float(cfg.pop("sigma_min", 0.002)),
                  "sigma_max": float(cfg.pop("sigma_max", default_max))}
        on = None if isinstance(path, EDMPath) else path
        if kind == "karras":
            ts = grids.karras_grid(steps, **sigmas, rho=float(cfg.pop("rho", 7.0)), path=on)
        else:
            ts = grids.log_snr_grid(steps, **sigmas, path=on)
    else:
        raise ValueError(f"unknown sampler.grid.kind {kind!r}; use uniform, shifted, karras or log_snr")
    if cfg:
        raise ValueError(f"unknown sampler.grid key(s) {sorted(cfg)} for grid kind {kind!r}")
    return ts


@dataclass
class SamplerSpec:
    """A validated sampler config (see the module docstring)."""

    kind: str = "euler"
    steps: int = 30
    grid: dict[str, Any] = field(default_factory=dict)
    guidance: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SamplerSpec:
        unknown = set(cfg) - SAMPLER_KEYS
        if unknown:
            raise ValueError(f"unknown sampler key(s) {sorted(unknown)}; known: {sorted(SAMPLER_KEYS)}")
        spec = cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in cfg.items()})
        if spec.kind not in SAMPLER_KINDS:
            raise ValueError(f"unknown sampler.kind {spec.kind!r}; choose one of {sorted(SAMPLER_KINDS)}")
        if not isinstance(spec.steps, int) or spec.steps < 1:
            raise ValueError(f"sampler.steps must be a positive integer, got {spec.steps!r}")
        unknown_g = set(spec.guidance) - {"scale", "interval", "dit_legacy_channels"}
        if unknown_g:
            raise ValueError(
                f"unknown sampler.guidance key(s) {sorted(unknown_g)}; known: scale, interval, dit_legacy_channels"
            )
        return spec


def guided_model_fn(model_fn: Callable, spec: SamplerSpec, null_label: int) -> Callable:
    """Wrap a conditional velocity function with classifier-free guidance on all channels."""
    scale = float(spec.guidance.get("scale", 1.0))
    interval = spec.guidance.get("interval")
    if scale == 1.0:
        return model_fn
    return guidance.cfg(
        model_fn, scale, null_label, interval=tuple(interval) if interval is not None else None,
        dit_legacy_channels=spec.guidance.get("dit_legacy_channels"),
    )


def run_sampler(
    model_fn: Callable, noise: Tensor, y: Tensor | None, path: Path, spec: SamplerSpec, randn_like: Callable | None = None
) -> Tensor:
    """Integrate from ``noise`` at ``t_max`` to data with the configured sampler and grid."""
    fn = getattr(samplers, SAMPLER_KINDS[spec.kind])
    ts = _grid(spec.grid, spec.steps, path).to(noise.device)
    kwargs: dict[str, Any] = dict(spec.options)
    if randn_like is not None:  # every sampler takes it; the stochastic ones (SDE, Heun churn) draw from it
        kwargs["randn_like"] = randn_like
    return fn(model_fn, noise, ts, path=path, y=y, **kwargs)


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

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None, **kwargs: Any) -> Tensor:
        n = x.shape[0]
        if n >= self.min_rows:
            return self.net(x, t, y, **kwargs)
        idx = torch.cat([torch.arange(n), torch.zeros(self.min_rows - n, dtype=torch.long)]).to(x.device)
        out = self.net(x[idx], t[idx], None if y is None else y[idx], **kwargs)
        return out[:n]


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
        rnd = PerImageRandom(seeds)
        drawn = rnd.randint(self.num_classes)
        y = drawn if labels is None else labels.to(torch.long).cpu()
        noise = rnd.randn(self.input_shape).to(device)
        path = path_from_spec(self.prediction["path"])
        net = MinRows(self.net) if self.min_rows > 1 else self.net
        model_fn = guided_model_fn(velocity_model(net, self.prediction), sampler, self.num_classes)
        x = run_sampler(model_fn, noise, y.to(device), path, sampler, randn_like=rnd.randn_like)
        images = to_uint8(self.tokenizer.decode(x).float().clamp(-1, 1))
        return images.cpu(), y


def build_tokenizer(config: Mapping[str, Any]) -> Any:
    """Rebuild a tokenizer from its ``config`` (``_target_`` must name a class in ``tokenizers``)."""
    import importlib

    kwargs = dict(config)
    target = str(kwargs.pop("_target_", ""))
    module_name, _, cls_name = target.rpartition(".")
    if not module_name.startswith("tokenizers."):
        raise ValueError(f"tokenizer config needs a _target_ inside the tokenizers package, got {target!r}")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**kwargs)


def generator_from_snapshot(path: str, device: torch.device | str = "cpu") -> tuple[Generator, dict[str, Any]]:
    """Rebuild the network, prediction spec and tokenizer from a snapshot's metadata."""
    tensors, config = load_snapshot(path)
    for key in ("model", "prediction", "data"):
        if key not in config:
            raise ValueError(f"snapshot {path} lacks '{key}' in its config metadata; was it written by train.py?")
    net = build_model(config["model"])
    load_state_dict_checked(net, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, path)
    net = net.to(device).eval().requires_grad_(False)
    if "tokenizer" not in config:
        raise ValueError(f"snapshot {path} lacks 'tokenizer' in its config metadata; was it written by train.py?")
    tokenizer = build_tokenizer(config["tokenizer"]).to(device)
    data = config["data"]
    shape = tokenizer.latent_shape(int(data["resolution"]))
    gen = Generator(net, config["prediction"], tokenizer, shape, int(data["num_classes"]))
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
            --generator gen.pipeline:snapshot_generate_fn --option steps=50 --option cfg=1.5
    """
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if batch_device == "auto" else batch_device)
    if device.type == "cuda":
        from gen.utils.dist import default_device

        device = default_device()
    gen, config = generator_from_snapshot(snapshot, device)
    sampler_cfg = dict(config.get("sampler") or {"kind": "euler", "steps": 30})
    if kind is not None:
        sampler_cfg["kind"] = kind
    if steps is not None:
        sampler_cfg["steps"] = int(steps)
    if cfg is not None:
        sampler_cfg["guidance"] = {**dict(sampler_cfg.get("guidance") or {}), "scale": float(cfg)}
    spec = SamplerSpec.from_config(sampler_cfg)

    def generate_fn(seeds: list[int]) -> tuple[Tensor, Tensor]:
        return gen.generate(seeds, spec, device=device)

    return generate_fn
