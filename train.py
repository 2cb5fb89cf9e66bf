"""Train a class-conditional generator from a Hydra config.

Examples:
    python train.py                                   # quick start: tiny DiT on mnist5k (CPU, minutes)
    python train.py trainer.total_kimg=100 name=longer
    python train.py --cfg job                         # dry run: print the composed config
    torchrun --nproc_per_node=2 train.py              # several processes (gloo on CPU, NCCL on GPU)
    torchrun --nnodes=2 --node_rank=0 --master_addr=H --master_port=P --nproc_per_node=8 \
        train.py experiment=<preset>                  # several nodes

The run folder is ``${paths.runs}/${name}``; re-running the same command resumes from the latest
training state there. The folder receives the resolved ``config.yaml``, ``stats.jsonl``,
TensorBoard events, sample grids by kimg (``samples/``), training states, safetensors snapshots,
``loss.png`` and ``results.json``.

Everything that can be checked is checked before the first step: every setting (trainer, preview, eval,
sampler, name), the run folder's writability, the evaluation's weights and reference files, the sampler
(run once on a stand-in model) and the data's labels. An expected failure ends with one ``train.py: error:``
line naming the key or file and the fix (exit status 2; 3 when values stopped being finite, in which case
no ``results.json`` is written); ``GEN_DEBUG=1`` adds the traceback.

Preemption: SIGTERM, SIGUSR1 or SIGUSR2 (``trainer.preempt_signals``; SLURM's preemption and its ``--signal``
warning, which Hydra's submitit launcher asks for ``signal_delay_s`` before the time limit) stops training after
the current optimizer step on every process, writes the training state of that step, releases the run folder and
exits with status 75 (sysexits' EX_TEMPFAIL: run me again), with one line on stderr and no ``results.json``. Under
submitit the signal then goes on to submitit's handler, which requeues the job; re-running the same command resumes.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from eval.generator import Generator
from gen.snapshot import read_snapshot
from gen.train.loop import (
    HookContext,
    TrainConfig,
    TrainingPreempted,
    autocast_context,
    resolve_device,
    train,
)
from gen.utils import dist
from gen.utils.build import TRAINING_PACKAGES, BuildError, build, resolve
from gen.utils.ckpt import CheckpointError, atomic_write
from gen.utils.cli import (
    EXIT_PREEMPTED,
    CommandError,
    check_dir_can_be_made,
    check_writable_dir,
    describe_os_error,
    run_hydra_entry,
    run_main,
)
from gen.utils.config import ConfigError, from_mapping
from gen.utils.finite import NonFiniteError, finite_number, nan_settings
from gen.utils.images import save_grid
from gen.utils.preempt import DEFAULT_SIGNALS, PreemptionSignals, signal_number
from gen.utils.progress import Progress
from gen.utils.runlock import LOCK_NAME
from gen.utils.seed import derive_seed
from samplers.spec import SamplerSpec, check_sampler

PROG = "train.py"


@dataclass
class TopLevelConfig:
    """The top level of a training config: every group is a mapping checked by its own section (``trainer``,
    ``preview``, ``eval``, ``sampler`` through gen.utils.config.from_mapping; the built groups by their
    constructors); ``name`` and ``run_dir`` by ``_run_dir`` (Hydra may type a name as a number)."""

    name: Any
    seed: int
    run_dir: Any
    data: dict[str, Any]
    tokenizer: dict[str, Any]
    model: dict[str, Any]
    method: dict[str, Any]
    objective: dict[str, Any]
    sampler: dict[str, Any]
    ema: dict[str, Any]
    optim: dict[str, Any]
    trainer: dict[str, Any]
    preview: dict[str, Any]
    eval: dict[str, Any]
    paths: dict[str, Any] | None = None
    experiment: Any = None  # the preset group: merged into the others by Hydra
    packages: list[str] | None = None  # extra packages whose _target_s the config may name (the user's own code)

    def __post_init__(self) -> None:
        if not all(isinstance(x, str) and x for x in self.packages or []):
            raise ValueError(f"packages={self.packages!r} must be a list of package names")


def _build(spec: Any, group: str, packages: tuple[str, ...], **kwargs: Any) -> Any:
    """Build one config group with the project-restricted constructor; errors name the group."""
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ConfigError(f"config group '{group}' needs a '_target_'; got {spec!r}")
    try:
        return build(spec, allow=packages, **kwargs)
    except BuildError as e:
        raise ConfigError(f"cannot build '{group}': {e}") from e


def _container(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"config does not resolve: {' '.join(str(e).split())}") from e


def _interval(value: float | None) -> bool:
    """An interval in kimg: null (at the end only), a positive number, or inf."""
    return value is None or (isinstance(value, (int, float)) and not math.isnan(value) and value > 0)


# ---- settings of the hooks, checked like trainer.* (unknown keys, types, ranges) ----------------------------


@dataclass
class PreviewConfig:
    """``preview``: a grid of ``images`` samples (``nrow`` per row) every ``interval_kimg`` (0 images: none)."""

    images: int = 100
    nrow: int = 10
    interval_kimg: float = 16.0

    def __post_init__(self) -> None:
        if self.images < 0:
            raise ValueError(f"preview.images={self.images} must be >= 0 (0: no preview grids)")
        if self.nrow < 1:
            raise ValueError(f"preview.nrow={self.nrow} must be >= 1")
        if not _interval(self.interval_kimg) or self.interval_kimg is None:
            raise ValueError(f"preview.interval_kimg={self.interval_kimg} must be > 0 (inf: at the end only)")


@dataclass
class YardstickEvalConfig:
    """``eval`` with ``metric: yardstick``: FID and class accuracy with the built-in data's small networks."""

    enabled: bool = True
    metric: Literal["yardstick"] = "yardstick"
    num_images: int = 5000
    dataset_name: str = "mnist5k"
    cache_dir: str | None = None
    batch_size: int = 250
    seed_offset: int = 0
    interval_kimg: float | None = None

    def __post_init__(self) -> None:
        _check_eval_numbers(self)
        if self.dataset_name not in ("mnist5k", "shapes"):
            raise ValueError(
                f"eval.dataset_name={self.dataset_name!r}: the yardstick networks exist for the built-in data only "
                "(mnist5k, shapes); for other data use eval=fid5k (Inception) or eval=none"
            )


@dataclass
class InceptionEvalConfig:
    """``eval`` with ``metric: inception``: FID (IS, sFID, precision/recall when the references allow)."""

    enabled: bool = True
    metric: Literal["inception"] = "inception"
    num_images: int = 10000
    ref_stats: str = ""
    ref_batch: str | None = None
    weights: str | None = None
    resize: Literal["tf1-bilinear", "bilinear-antialias"] = "tf1-bilinear"
    batch_size: int = 64
    seed_offset: int = 0
    interval_kimg: float | None = None
    at_end_only: bool = True

    def __post_init__(self) -> None:
        _check_eval_numbers(self)
        if not self.ref_stats:
            raise ValueError("eval.ref_stats is empty; give the reference statistics file (python -m eval ref ...)")


def _check_eval_numbers(c: Any) -> None:
    if c.num_images < 2:
        raise ValueError(f"eval.num_images={c.num_images} must be >= 2")
    if c.batch_size < 1:
        raise ValueError(f"eval.batch_size={c.batch_size} must be >= 1")
    if c.seed_offset < 0:
        raise ValueError(f"eval.seed_offset={c.seed_offset} must be >= 0")
    if not _interval(c.interval_kimg):
        raise ValueError(f"eval.interval_kimg={c.interval_kimg} must be null (at the end only) or > 0")


class PreviewHook:
    """A grid of samples every ``interval_kimg`` (fixed seeds, one row per class) into ``samples/``."""

    def __init__(self, make_generator: Any, sampler: SamplerSpec, settings: PreviewConfig):
        self.make_generator, self.sampler = make_generator, sampler
        self.num_images, self.interval_kimg, self.nrow = settings.images, settings.interval_kimg, settings.nrow

    def __call__(self, ctx: HookContext) -> Mapping[str, float]:
        if dist.is_main():
            gen: Generator = self.make_generator(ctx.ema_net)
            labels = torch.arange(self.num_images) // max(self.num_images // gen.num_classes, 1) % gen.num_classes
            try:
                images, _ = gen.generate(list(range(self.num_images)), self.sampler, labels=labels, device=ctx.device)
            except NonFiniteError as e:
                # A preview is not worth stopping the run for, but a grid of black images is never written.
                dist.print0(f"preview at kimg {ctx.nimg / 1000:g} not written: {e}")
            else:
                save_grid(images, ctx.run_dir / "samples" / f"grid-{ctx.nimg:09d}.png", nrow=self.nrow, scale=2)
        dist.barrier()
        return {}


class EvalHook:
    """The ``eval`` group during training: yardstick or Inception metrics of generated samples.

    Runs at the end (and every ``interval_kimg`` if set) on every process: seeds are split across
    processes and the statistics reduced with sums, so the numbers do not depend on the world size.
    Metric ``yardstick``: FID with the built-in data's yardstick network against its training images,
    plus the class accuracy of the samples. Metric ``inception``: FID (and IS, sFID when the reference
    has them; precision/recall with ``ref_batch``) with the Inception network against ``ref_stats``.

    Everything it needs is loaded when it is built, before training: the feature network (the yardstick is
    trained on first use), the reference statistics, and the check that ``num_images`` exceeds the feature
    dimension (fewer images give a singular covariance and a meaningless FID). It reports progress like training.
    """

    def __init__(self, make_generator: Any, sampler: SamplerSpec, cfg: Mapping[str, Any], device: torch.device):
        metric = cfg.get("metric")
        kinds = {"yardstick": YardstickEvalConfig, "inception": InceptionEvalConfig}
        if metric not in kinds:
            raise ConfigError(f"eval.metric={metric!r} cannot run during training; use one of {sorted(kinds)}")
        self.cfg: Any = from_mapping(kinds[metric], cfg, "eval")
        self.make_generator, self.sampler = make_generator, sampler
        c = self.cfg
        at_end = getattr(c, "at_end_only", False) or c.interval_kimg is None
        self.interval_kimg = math.inf if at_end else float(c.interval_kimg)
        self.real: torch.Tensor | None = None
        # The feature dimension is known before loading anything, so a singular setting fails at once.
        self._check_count(self._feature_dim(metric), metric)
        try:
            if metric == "yardstick":
                self._load_yardstick()
            else:
                self._load_inception(device)
        except (OSError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            hint = "set eval.weights / eval.ref_stats, or eval=none" if metric == "inception" else "or use eval=none"
            raise ConfigError(f"eval ({metric}): {e} ({hint})") from e
        self._check_count(self.ext.dim, self.ext.name)

    @staticmethod
    def _feature_dim(metric: str) -> int:
        if metric == "inception":
            return 2048  # Inception-v3 pool3
        from eval.classifier import RECIPES

        return RECIPES["lenet"].feature_dim

    def _check_count(self, dim: int, extractor: str) -> None:
        n = self.cfg.num_images
        if n <= dim:
            raise ConfigError(
                f"eval.num_images={n} must exceed the {dim} feature dimensions of the {extractor} features: fewer "
                f"images give a singular covariance and a meaningless FID. Use eval.num_images>={dim + 1} or eval=none"
            )

    def _load_yardstick(self) -> None:
        from eval.generate import yardstick_reference

        c = self.cfg
        if c.cache_dir is not None and dist.is_main():
            check_writable_dir(c.cache_dir, "eval.cache_dir")
        dist.print0(f"evaluation: loading the yardstick of {c.dataset_name} (trained on first use, about 25 s on 2 cores)")
        self.ext, self.ref = yardstick_reference(c.dataset_name, "train", c.cache_dir)

    def _load_inception(self, device: torch.device) -> None:
        from eval.features import InceptionFeatures
        from eval.stats import load_image_npz, load_stats

        c = self.cfg
        self.ext = InceptionFeatures(c.weights, resize=c.resize, device=device)
        self.ref = load_stats(c.ref_stats, expect=self.ext.manifest())
        if c.ref_batch is not None:
            self.real = load_image_npz(c.ref_batch)[0]

    def __call__(self, ctx: HookContext) -> Mapping[str, float]:
        from eval import generate as evgen

        gen: Generator = self.make_generator(ctx.ema_net)
        c = self.cfg
        what = f"evaluation ({c.metric}, {c.num_images} samples)"
        with Progress(evgen.share(c.num_images, c.batch_size), what) as bar:

            def generate_fn(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
                out = gen.generate(seeds, self.sampler, device=ctx.device)
                bar.advance(len(seeds))
                return out

            if c.metric == "yardstick":
                out = evgen.yardstick_metrics(generate_fn, c.num_images, c.dataset_name, c.cache_dir, c.batch_size,
                                              c.seed_offset)
                return {f"yardstick_{k}" if k == "fid" else k: float(v) for k, v in out.items()}
            seeds = range(c.seed_offset, c.seed_offset + c.num_images)
            got = evgen.evaluate(generate_fn, seeds, self.ext, self.ref, batch_size=c.batch_size, real_images=self.real)
        return {f"{k}{c.num_images // 1000}k" if k in ("fid", "sfid") else k: float(v) for k, v in got.items()}


class ReconstructionPreviewHook:
    """Tokenizer training: a grid of fixed training images (odd rows) above their reconstructions by the EMA
    autoencoder (even rows) every ``interval_kimg``, into ``samples/``."""

    def __init__(self, method: Any, dataset: Any, num_images: int, interval_kimg: float, nrow: int):
        self.method, self.interval_kimg, self.nrow = method, interval_kimg, nrow
        step = max(len(dataset) // max(num_images, 1), 1)  # spread over the data (class-sorted sets show every class)
        self.images = torch.stack([_image_of(dataset[i]) for i in range(0, len(dataset), step)][:num_images])

    def __call__(self, ctx: HookContext) -> Mapping[str, float]:
        if dist.is_main():
            from gen.data.transforms import to_uint8
            from gen.utils.seed import per_image_generators

            n = self.images.shape[0]
            gens = per_image_generators(range(n), "preview", 0)
            recon = to_uint8(self.method.reconstruct(ctx.ema_net, self.images, gens)).cpu()
            rows = [t for k in range(0, n, self.nrow) for t in (self.images[k:k + self.nrow], recon[k:k + self.nrow])]
            save_grid(torch.cat(rows), ctx.run_dir / "samples" / f"grid-{ctx.nimg:09d}.png", nrow=self.nrow, scale=2)
        dist.barrier()
        return {}


class ReconstructionEvalHook:
    """Tokenizer training, ``eval.metric=recon_yardstick``: rFID (yardstick features) and PSNR of the EMA autoencoder's
    reconstructions of the built-in dataset's training images (``eval.recon.reconstruction_metrics``; posterior samples
    seeded per image index, images split across processes)."""

    KEYS = {"enabled", "metric", "num_images", "dataset_name", "cache_dir", "batch_size", "interval_kimg"}

    def __init__(self, method: Any, dataset: Any, cfg: Mapping[str, Any]):
        unknown = set(cfg) - self.KEYS
        if unknown:
            raise ConfigError(f"unknown eval key(s) {sorted(unknown)} for metric 'recon_yardstick'")
        self.method, self.dataset, self.cfg = method, dataset, dict(cfg)
        self.interval_kimg = cfg.get("interval_kimg") or math.inf

    def __call__(self, ctx: HookContext) -> Mapping[str, float]:
        from eval.features import YardstickFeatures
        from eval.recon import reconstruction_metrics
        from gen.data.transforms import to_uint8
        from gen.utils.seed import per_image_generators

        c = self.cfg
        ext = YardstickFeatures(c["dataset_name"], c["cache_dir"])
        n = min(int(c["num_images"]), len(self.dataset))
        images = torch.utils.data.Subset(self.dataset, range(n))

        def roundtrip(x: torch.Tensor, indices: Any) -> torch.Tensor:
            gens = per_image_generators(indices, "recon", 0)
            return to_uint8(self.method.reconstruct(ctx.ema_net, x, gens)).cpu()

        out = reconstruction_metrics(roundtrip, images, ext, batch_size=c["batch_size"], with_ssim=True)
        return {"rfid": float(out["rfid"]), "psnr": float(out["psnr"]), "ssim": float(out["ssim"])}


# What each training-time metric measures; a method declares what it makes (``Method.produces``).
METRIC_MEASURES = {"yardstick": "samples", "inception": "samples", "recon_yardstick": "reconstructions"}


def _hooks(ev: Mapping[str, Any], method: Any, dataset: Any, make_generator: Callable, sampler: SamplerSpec,
           preview: PreviewConfig, device: torch.device) -> list[Any]:
    """The preview and evaluation hooks for what the method makes: samples (a generator) or reconstructions (a
    tokenizer), told by ``method.produces``; an eval metric that measures the other kind is refused."""
    produces = getattr(method, "produces", "samples")
    hooks: list[Any] = []
    if preview.images > 0:
        hooks.append(ReconstructionPreviewHook(method, dataset, preview.images, preview.interval_kimg, preview.nrow)
                     if produces == "reconstructions" else PreviewHook(make_generator, sampler, preview))
    if not isinstance(ev.get("enabled", False), bool):
        raise ConfigError(f"eval.enabled={ev['enabled']!r} must be true or false")
    if not ev.get("enabled", False):
        if set(ev) - {"enabled"}:
            dist.print0(f"eval.enabled=false: the eval settings {sorted(set(ev) - {'enabled'})} are not used")
        return hooks
    measures = METRIC_MEASURES.get(ev.get("metric"))
    if measures is not None and measures != produces:
        fits = sorted(m for m, k in METRIC_MEASURES.items() if k == produces)
        raise ConfigError(
            f"eval.metric={ev.get('metric')!r} measures {measures}, but method {type(method).__name__} makes {produces}: "
            f"it does not fit; use eval.metric in {fits} (or eval=none)"
        )
    hooks.append(ReconstructionEvalHook(method, dataset, ev) if produces == "reconstructions"
                 else EvalHook(make_generator, sampler, ev, device))
    return hooks


def _image_of(item: Any) -> torch.Tensor:
    return item["image"] if isinstance(item, dict) else item[0]


def _interface(target: str, packages: tuple[str, ...], available: Mapping[str, Any]) -> dict[str, Any]:
    """The objects built here (network, objective, optimizer) that the method's constructor takes by name."""
    import inspect

    params = inspect.signature(resolve(target, packages)).parameters
    return {k: v() for k, v in available.items() if k in params}


def _run_dir(c: Mapping[str, Any]) -> Path:
    """The run folder, refusing names that would train into the runs root or outside it."""
    name = c.get("name")
    if isinstance(name, (int, float)) and not isinstance(name, bool):
        name = str(name)  # `name=nan` or `name=7`: Hydra typed the name; ${name} in run_dir is its text
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"name={name!r}: give the experiment a name (the run folder is ${{paths.runs}}/${{name}})")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        raise ConfigError(f"name={name!r} must be a relative folder name without '.' or '..' parts, e.g. name=mnist_dit")
    run_dir = c.get("run_dir")
    if not isinstance(run_dir, str) or not run_dir.strip():
        raise ConfigError(f"run_dir={run_dir!r}: give a folder (default ${{paths.runs}}/${{name}})")
    runs = (c.get("paths") or {}).get("runs")
    if isinstance(runs, str) and Path(run_dir).resolve() == Path(runs).resolve():
        raise ConfigError(f"run_dir={run_dir} is the runs root paths.runs itself; give each run its own folder")
    return Path(run_dir)


def _checked(cfg: DictConfig) -> tuple[dict[str, Any], Path, tuple[str, ...]]:
    """The resolved config as plain containers, its run folder and the packages whose targets it may name;
    the top-level keys and NaN anywhere are refused first."""
    c = _container(cfg)
    from_mapping(TopLevelConfig, c, "")
    run_dir = _run_dir(c)
    # `name=nan` or `name=1e3` are names that Hydra reads as numbers, so the name is not scanned.
    nan = [k for key, value in c.items() if key != "name" for k in nan_settings(value, key)]
    if nan:  # NaN passes every range check (all comparisons are false) and poisons whatever reads it
        raise ConfigError(f"{nan[0]} is NaN; give a number")
    # Training configs are written by the user: they may name optimizers and, through `packages`, their own code.
    return c, run_dir, TRAINING_PACKAGES + tuple(c.get("packages") or [])


def _data(c: Mapping[str, Any], packages: tuple[str, ...]) -> tuple[Any, Any, dict[str, int]]:
    """The dataset (checked against ``data.*``), the tokenizer (bound to pre-extracted latents) and the model's
    shape arguments (``in_channels``, ``input_size``, ``num_classes``), which the model config may not set."""
    dataset = _build(c["data"]["dataset"], "data.dataset", packages)
    for key in ("channels", "resolution", "num_classes"):
        if getattr(dataset, key) != c["data"][key]:
            raise ConfigError(
                f"data.{key}={c['data'][key]} but the dataset has {key}={getattr(dataset, key)}; fix data.{key}"
            )
    tokenizer = _build(c["tokenizer"], "tokenizer", packages)
    if hasattr(dataset, "latent_mean"):  # pre-extracted latents: only the tokenizer that made them may read them
        _bind_latents(tokenizer, dataset)
    channels, size, _ = tokenizer.latent_shape(dataset.resolution)
    # The model's input shape comes from the tokenizer and its classes from the data ("interface" arguments).
    shape_args = {"in_channels": channels, "input_size": size, "num_classes": dataset.num_classes}
    clash = sorted(k for k in shape_args if k in c["model"])
    if clash:
        raise ConfigError(
            f"model.{clash[0]} is set by the data and tokenizer ({clash[0]}={shape_args[clash[0]]} here); remove it "
            "from the model config"
        )
    return dataset, tokenizer, shape_args



def _check_start(method: Any, trainer: TrainConfig, c: Mapping[str, Any]) -> None:
    """An objective that tunes a diffusion snapshot (ECT: ``check_start``) needs ``trainer.init.net``, a finite
    snapshot of the same dataset and of the teacher kind it expects; otherwise one line (exit 2, 3 non-finite)."""
    check = getattr(getattr(method, "objective", None), "check_start", None)
    if check is None:
        return
    source = (trainer.init or {}).get("net")
    if not source:
        raise ConfigError("this objective tunes a diffusion snapshot: give trainer.init={net: <snapshot.safetensors>} "
                          "(a flow-matching or EDM snapshot of the same data, e.g. the quick start's)")
    try:
        snap = read_snapshot(source, need=("data", "prediction"))
    except (OSError, CheckpointError) as e:
        raise ConfigError(f"trainer.init.net: {e}") from e
    try:
        check(snap.config, c["data"]["name"])
    except ValueError as e:
        raise ConfigError(str(e)) from e

def _check_method(method: Any, trainer: TrainConfig, c: Mapping[str, Any]) -> None:
    """Before any work: the start snapshots (``trainer.init``), and the sampler for a method that serves only some
    (a distilled student: its own solvers)."""
    _check_start(method, trainer, c)
    serves = getattr(method, "check_sampler", None)
    if serves is not None:
        try:
            serves(c["sampler"])
        except ValueError as e:
            raise ConfigError(str(e)) from e


def run(cfg: DictConfig, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Build and check everything from ``cfg`` (failing on bad config before any work), train, evaluate.

    ``should_stop`` (asked at every step boundary) stops training with its state written there: the loop raises
    ``TrainingPreempted`` and nothing after training (final evaluation, ``results.json``) happens.
    """
    c, run_dir, packages = _checked(cfg)
    check_dir_can_be_made(run_dir, "run_dir")  # before the data, the networks and the evaluator are loaded
    trainer = from_mapping(TrainConfig, c["trainer"], "trainer")
    dist.init_distributed()
    device = resolve_device(trainer.device)
    autocast_context(trainer.precision, device)  # refuses a precision the device cannot run, before any work
    ema = _ema_factory(c["ema"], packages)
    sampler = SamplerSpec.from_config(c["sampler"])
    preview = from_mapping(PreviewConfig, c["preview"], "preview")
    dataset, tokenizer, shape_args = _data(c, packages)
    # Same initial weights on every process and every re-run (DDP also broadcasts rank 0's).
    torch.manual_seed(derive_seed("init", c["seed"]))
    interface = {
        "net": lambda: _build(c["model"], "model", packages, **shape_args),
        "objective": lambda: _build(c["objective"], "objective", packages),
        "optimizer": lambda: _build({**c["optim"], "_partial_": True}, "optim", packages),
        "image_resolution": lambda: dataset.resolution,
        "image_channels": lambda: dataset.channels,
        "data_name": lambda: c["data"]["name"],
        "ema": lambda: ema,
    }
    method_spec = c["method"]
    method = _build(method_spec, "method", packages, **_interface(str(method_spec.get("_target_")), packages, interface))

    _check_method(method, trainer, c)
    snapshot_meta = {
        # With the dataset's spec, so evaluation can rebuild the images the run trained on (a subset's memorisation).
        "data": {k: c["data"][k] for k in ("name", "channels", "resolution", "num_classes", "dataset")},
        "tokenizer": tokenizer.config,
        "sampler": c["sampler"],
    }
    input_shape = tokenizer.latent_shape(dataset.resolution)
    prediction = method.snapshot_config().get("prediction")
    if prediction is not None:  # a generator: its sampler runs at the first preview and at the end, so check it now
        check_sampler(sampler, prediction, dataset.num_classes, int(c["model"].get("extra_token_dim") or 0))

    def make_generator(ema_net: torch.nn.Module) -> Generator:
        return Generator(ema_net, prediction, tokenizer, input_shape, dataset.num_classes)

    hooks = _hooks(c["eval"], method, dataset, make_generator, sampler, preview, device)
    # Not after an hour of training; on every process, so all stop together. After the checks above, so that a
    # refused setting (a bad teacher, a model that does not fit the data) leaves no empty run folder behind.
    fresh = not run_dir.exists()
    check_writable_dir(run_dir, "run_dir")

    if dist.is_main():
        text = OmegaConf.to_yaml(OmegaConf.create(c))
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    try:
        try:
            result = train(
                method=method, dataset=dataset, tokenizer=tokenizer, ema=ema, cfg=trainer,
                run_dir=run_dir, config=c, snapshot_meta=snapshot_meta, hooks=hooks, should_stop=should_stop,
            )
        except BaseException:
            # The loop refuses some settings itself before the first step (trainer.init, optimizer settings): a
            # folder this command made that holds only what it wrote before then goes again.
            if fresh and dist.is_main():
                _remove_untouched_run_dir(run_dir)
            raise
    except OSError as e:
        # Every file the loop writes is in the run folder; writers that do not name their file (a plot, TensorBoard)
        # write there too. A named file elsewhere was being read (an image of the data, a snapshot of trainer.init).
        if not isinstance(e.filename, (str, bytes, os.PathLike)) or not e.filename:
            where, action = run_dir, "write into"
        else:
            inside = Path(os.fsdecode(e.filename)).resolve().is_relative_to(run_dir.resolve())
            where, action = e.filename, "write" if inside else "read"
        raise CommandError(
            describe_os_error(e, where, action) + " Re-running the same command resumes from the last complete "
            "training state."
        ) from e
    summary = {
        "run_dir": str(run_dir), "kimg": result.nimg / 1000, "steps": result.step,
        "training_state": str(result.state_path), "snapshot": str(result.snapshot_path), **result.metrics,
    }
    bad = [k for k, v in result.metrics.items() if not (isinstance(v, (int, float)) and finite_number(v))]
    if bad:
        raise NonFiniteError(f"the evaluation gave non-finite {', '.join(bad)}; results.json was not written")
    if dist.is_main():
        atomic_write(run_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        dist.print0("\n" + "\n".join(f"{k:>28}: {v}" for k, v in summary.items()))
    return summary


def _remove_untouched_run_dir(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but this command's ``config.yaml`` and the folder lock."""
    try:
        names = set(os.listdir(run_dir))
        if names <= {"config.yaml", LOCK_NAME}:
            for name in names:
                (run_dir / name).unlink()
            run_dir.rmdir()
    except OSError:
        pass  # best effort: the refusal itself is what the user needs to see


def _bind_latents(tokenizer: Any, dataset: Any) -> None:
    """Check the tokenizer against the latents' extraction; a tokenizer that normalises per channel (scaling
    factor 1, no statistics of its own: VA-VAE, LightningDiT) takes the dataset's statistics, which then ride in
    every snapshot. A scaled tokenizer (SD-VAE x 0.18215, as DiT) keeps its scale."""
    from gen.data.latents import apply_statistics, check_tokenizer

    try:
        if tokenizer.scaling_factor == 1.0 and not tokenizer.has_statistics():
            apply_statistics(tokenizer, dataset)
        else:
            check_tokenizer(tokenizer, dataset)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _ema_factory(c: Mapping[str, Any], packages: tuple[str, ...]) -> Callable[[torch.nn.Module], Any]:
    """The ``ema`` spec as a factory ``module -> EMA``, tried once on a stand-in so bad settings fail now."""
    factory = _build({**c, "_partial_": True}, "ema", packages)
    try:
        factory(torch.nn.Linear(1, 1))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"ema: {e}") from e
    return factory


def _preempt_signals(cfg: DictConfig) -> list[str]:
    """``trainer.preempt_signals``, read before the config is checked (TrainConfig checks it again)."""
    names = OmegaConf.select(cfg, "trainer.preempt_signals", default=list(DEFAULT_SIGNALS))
    if names is None or isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"trainer.preempt_signals={names!r} must be a list of signal names, e.g. [SIGTERM, SIGUSR2]")
    for n in names:
        try:
            signal_number(n)
        except ValueError as e:
            raise ConfigError(f"trainer.preempt_signals: {e}") from None
    return [str(n) for n in names]


def _submitit_environment() -> None:
    """Under submitit (Hydra's submitit launcher) with several tasks: export torch.distributed's variables (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from the job's environment, as torchrun would set them
    (submitit.helpers.TorchDistributedEnvironment); nothing when they are set already or when not under submitit."""
    if "SUBMITIT_EXECUTOR" not in os.environ or "RANK" in os.environ:
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def main_checked(cfg: DictConfig, runner: Callable[..., Any] = run, exits_after: bool = False) -> int:
    """Run training with expected errors as one line: exit 0 done, 2 bad setting or file, 3 non-finite values,
    75 preempted (``EXIT_PREEMPTED``: the state of the step at the signal is written; run again to resume).

    The preemption signals (``trainer.preempt_signals``) are caught only while training runs, here in the process
    that trains, and their previous handlers come back afterwards. A stop passes the signal on to the handler that
    was there before: under submitit that is submitit's, which requeues the job (Hydra's submitit launcher is
    checkpointable: the requeued job is the same command, which resumes). ``exits_after``: the process exits with
    the returned code right away (the entry point), so after a stop a repeated signal stays recorded instead of
    killing it before it can say 75.
    """
    preempt: list[PreemptionSignals] = []

    def go() -> int:
        _submitit_environment()
        with PreemptionSignals(_preempt_signals(cfg), hold_after_stop=exits_after) as signals:
            preempt.append(signals)
            try:
                runner(cfg, should_stop=signals.requested if signals.numbers else None)  # []: no agreement step
            except TrainingPreempted as e:
                who = f"rank {dist.rank()} of {dist.world_size()}: " if dist.world_size() > 1 else ""
                # One write per line: the processes of a job share one stderr, and print() writes the end apart.
                sys.stderr.write(f"{PROG}: {who}preempted by {signals.name or 'a signal to another process'}: {e}; no results.json. Re-running the "
                                 "same command (or the requeued job) resumes from that state.\n")
                sys.stderr.flush()
                return EXIT_PREEMPTED
        return 0

    code = run_main(go, PROG)
    if code == EXIT_PREEMPTED:
        preempt[0].pass_on()  # submitit's handler requeues the job (and exits); otherwise nothing
    return code


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "configs"), config_name="train")
def main(cfg: DictConfig) -> None:
    code = main_checked(cfg, exits_after=True)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    # Run through the importable module: Hydra's submitit launcher pickles the task with cloudpickle, which copies
    # functions of __main__ by value and loses their module's names (dataclass annotations then fail to resolve).
    import train

    run_hydra_entry(train.main)
