"""The training loop: one loop for every method, image-counted, resumable, on plain ``torch.distributed``.

Everything is counted in training images (``nimg``); learning rates, EMAs and every interval are functions of
it. A step: for each phase the method names (``Method.phases``), zero that optimizer's gradients, run the
method's loss on every micro-batch of the step (gradient accumulation fills the global batch), synchronise
the gradients of that optimizer's modules across processes (one DDP wrapper per phase, so each phase
synchronises exactly the parameters it updates), clip, and step; then update the EMAs. Every phase of a step
sees the same micro-batches.

Randomness is per sample (``gen.train.batches``), so a run gives the same updates at any number of processes
or accumulation rounds, and re-running the same command resumes from the newest training state and reproduces
the uninterrupted run. Training states derive from one registry (``gen.train.state``); frozen networks are
never in them, only their identities, which are checked on resume.

Precision: ``"no"`` (fp32), ``"bf16"`` (autocast), ``"fp16"`` (autocast with a gradient scaler per optimizer: a
step whose gradients overflow is skipped and the scale lowered, as ``torch.amp.GradScaler`` does; the run stops
after ``max_skipped_steps`` skips in a row). In fp32/bf16 a non-finite loss or gradient stops the run with the
last good state kept; no state, snapshot or result is ever written from non-finite weights.

Launch: ``python train.py`` (1 process), ``torchrun --nproc_per_node=N train.py`` (gloo on CPU, NCCL on GPUs;
``accelerate launch`` sets the same environment); multi-node with ``torchrun --nnodes=M --node_rank=i
--master_addr=H --master_port=P ...``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from gen.ema import EMA, EMAFactory
from gen.snapshot import init_from_snapshot
from gen.train.batches import Batches, check_training_data, data_identity, label_range_error
from gen.train.method import Method, OptimizerSpec, PhaseModule, Progress, param_groups
from gen.train.state import STATE_FORMAT, StateRegistry, Value, check_init_sources, check_resume
from gen.utils import ckpt, dist
from gen.utils.cli import describe_os_error
from gen.utils.config import ConfigError
from gen.utils.dist import print0
from gen.utils.finite import NonFiniteError, finite_number, shorten
from gen.utils.log import StatsLog, plot_loss_curve, status_line
from gen.utils.preempt import signal_number
from gen.utils.runlock import RunFolderBusy, RunFolderLock
from gen.utils.seed import SampleRandom, derive_seed

__all__ = ["NonFiniteError", "TrainConfig", "train", "HookContext", "Hook", "TrainResult", "TrainingPreempted",
           "data_identity"]

# Kept for callers that catch the old name.
NonFiniteLossError = NonFiniteError


@dataclass
class TrainConfig:
    """Loop settings; every duration is in thousands of training images (kimg).

    Attributes:
        total_kimg: training length.
        batch_size: global batch (all processes, all accumulation rounds).
        batch_per_gpu: micro-batch per process; None means ``batch_size / world``. Gradient
            accumulation fills the global batch: ``rounds = batch_size / (batch_per_gpu * world)``.
        lr_warmup_kimg: linear learning-rate warm-up length.
        lr_decay: "constant", or "inv_sqrt" (EDM2: ``lr / sqrt(max(nimg / lr_ref_kimg, 1))``).
        lr_ref_kimg: reference length of "inv_sqrt".
        grad_clip: max global gradient norm per optimizer, or None for no clipping (the norm is logged anyway).
        precision: "no" (fp32), "bf16" or "fp16" (autocast; fp16 with gradient scaling).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        status_kimg / checkpoint_kimg / snapshot_kimg: intervals of the status line, training states (.pt, for
            resuming) and inference snapshots (safetensors of the EMAs); ``inf`` means at the end only.
        keep_states: how many of the newest training states to keep (0 keeps all).
        snapshot_dtype: "float32" or "bfloat16" for the snapshot tensors.
        hflip: random horizontal flips of the training images (or the stored flipped latents).
        seed: the run's seed (data order, per-sample randomness, initial weights).
        compile: wrap each phase's module in ``torch.compile``.
        num_workers: DataLoader workers for datasets that are not held in memory.
        find_unused_parameters: DDP's option, for methods whose phases leave some parameters without gradients.
        max_skipped_steps: fp16 only: stop after this many consecutive steps skipped for overflow.
        tensorboard / progress: TensorBoard events; a tqdm bar on rank 0 (on a terminal; status lines otherwise).
        resume_ignore: config sections (of ``resume_keys``) allowed to differ from the resumed training state, e.g.
            ``[data]`` after moving a dataset whose content the loop cannot fingerprint; the differences are printed.
        init: null, or trainable module name -> snapshot file whose weights it starts from (fine-tuning, a distillation
            student); the files' SHA-256 are recorded in training states and checked on resume.
        max_weight_rms: divergence by magnitude: a trainable module or EMA whose weights' root mean square exceeds it
            stops the run at the next status line, state or snapshot, like non-finite weights (nothing is written
            from it). Initialised networks sit near 0.02-1 and trained ones stay there; a too-large learning rate
            carries them far past any bound (1e30 with ``optim.lr=1e30``). null turns the check off.
        preempt_signals: signals that stop the run at the next step boundary with a training state written there
            (gen.utils.preempt; installed by train.py, not by the loop): SIGTERM (SLURM's preemption and scancel)
            and SLURM's warning signals (``--signal``: SIGUSR2 under submitit). An empty list keeps the default
            actions.
    """

    total_kimg: float = 50.0
    batch_size: int = 64
    batch_per_gpu: int | None = None
    lr_warmup_kimg: float = 0.0
    lr_decay: Literal["constant", "inv_sqrt"] = "constant"
    lr_ref_kimg: float = 0.0
    grad_clip: float | None = None
    precision: Literal["no", "bf16", "fp16"] = "no"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    status_kimg: float = 1.0
    checkpoint_kimg: float = 10.0
    snapshot_kimg: float = 10.0
    keep_states: int = 2
    snapshot_dtype: Literal["float32", "bfloat16"] = "float32"
    hflip: bool = False
    seed: int = 0
    compile: bool = False
    num_workers: int = 0
    find_unused_parameters: bool = False
    max_skipped_steps: int = 50
    tensorboard: bool = True
    progress: bool = True
    resume_ignore: list[str] = field(default_factory=list)
    init: dict[str, str] | None = None
    max_weight_rms: float | None = 1e3
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGUSR2"])

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"trainer.{key}={getattr(self, key)!r}: {what}")

        need(finite_number(self.total_kimg) and self.total_kimg > 0, "total_kimg", "must be a finite number > 0")
        need(self.batch_size > 0, "batch_size", "must be > 0")
        need(self.batch_per_gpu is None or self.batch_per_gpu > 0, "batch_per_gpu", "must be > 0 (or null)")
        need(finite_number(self.lr_warmup_kimg) and self.lr_warmup_kimg >= 0, "lr_warmup_kimg", "must be >= 0")
        if self.lr_decay == "inv_sqrt":
            need(finite_number(self.lr_ref_kimg) and self.lr_ref_kimg > 0, "lr_ref_kimg", "must be > 0 with inv_sqrt")
        need(
            self.grad_clip is None or (finite_number(self.grad_clip) and self.grad_clip > 0), "grad_clip",
            "must be a positive number, or null for no clipping (<= 0 would freeze or reverse training)",
        )
        for key in ("status_kimg", "checkpoint_kimg", "snapshot_kimg"):
            v = getattr(self, key)
            need(isinstance(v, (int, float)) and not math.isnan(v) and v > 0, key, "must be > 0 (inf: at the end only)")
        need(self.keep_states >= 0, "keep_states", "must be >= 0 (0 keeps every state)")
        need(self.num_workers >= 0, "num_workers", "must be >= 0")
        need(self.max_skipped_steps > 0, "max_skipped_steps", "must be > 0")
        need(all(isinstance(k, str) for k in self.resume_ignore), "resume_ignore", "must be a list of section names")
        need(self.max_weight_rms is None or (finite_number(self.max_weight_rms) and self.max_weight_rms > 0),
             "max_weight_rms", "must be a positive number, or null for no bound")
        try:
            [signal_number(n) for n in self.preempt_signals]
        except (ValueError, TypeError) as e:
            raise ValueError(f"trainer.preempt_signals={self.preempt_signals!r}: {e}") from None
        need(all(isinstance(v, str) and v for v in (self.init or {}).values()), "init",
             "must map module names to snapshot files, e.g. {net: runs/teacher/snapshot-000100000.safetensors}")


@dataclass
class HookContext:
    """What a hook sees: counters, the method, its averaged modules, the run folder."""

    nimg: int
    step: int
    method: Method
    emas: Mapping[str, EMA]
    run_dir: Path
    device: torch.device
    is_final: bool

    def averaged(self, module: str = "net", profile: str | None = None) -> nn.Module:
        """The EMA copy of a trainable module (the first profile by default)."""
        return self.emas[module].averaged(profile)

    @property
    def ema_net(self) -> nn.Module:
        return self.averaged(self.method.snapshot_module)


class Hook(Protocol):
    """Periodic work during training (sample grids, FID). Called on every rank (it may be collective).

    ``interval_kimg`` decides when it runs (and it always runs at the end); it returns metrics that are written
    to ``stats.jsonl`` beside the loss.
    """

    interval_kimg: float

    def __call__(self, ctx: HookContext) -> Mapping[str, float]: ...


class TrainingPreempted(Exception):
    """The run stopped at a step boundary because a stop was requested (a preemption signal on some process); the
    training state of that step is written (``state_path``) and re-running the same command resumes from it."""

    def __init__(self, nimg: int, step: int, state_path: Path) -> None:
        super().__init__(f"stopped at step {step} (kimg {nimg / 1000:g}); training state {state_path}")
        self.nimg, self.step, self.state_path = nimg, step, state_path


@dataclass
class TrainResult:
    nimg: int
    step: int
    run_dir: Path
    state_path: Path
    snapshot_path: Path
    resumed_from: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def lr_factor(cfg: TrainConfig, progress: Progress) -> float:
    """The trainer's learning-rate schedule: linear warm-up, then constant or EDM2's inverse square root."""
    f = 1.0
    if cfg.lr_warmup_kimg > 0:
        f *= min(progress.nimg / (cfg.lr_warmup_kimg * 1000.0), 1.0)
    if cfg.lr_decay == "inv_sqrt":
        f /= math.sqrt(max(progress.nimg / (cfg.lr_ref_kimg * 1000.0), 1.0))
    return f


def _crossed(prev_nimg: int, nimg: int, interval_kimg: float | None) -> bool:
    """True when [prev, nimg) passed a multiple of the interval (never for None or inf)."""
    if interval_kimg is None or not math.isfinite(interval_kimg):
        return False
    interval = max(int(round(interval_kimg * 1000)), 1)
    return prev_nimg // interval != nimg // interval


def resolve_device(kind: str) -> torch.device:
    """The device of this process; ``cuda`` without CUDA is an error, never a silent fallback to the CPU."""
    return dist.resolve_device(kind, "trainer.device")


def autocast_context(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward's autocast context for a precision setting (refusing unsupported combinations)."""
    if precision == "no":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if not torch.amp.autocast_mode.is_autocast_available(device.type):
        raise ConfigError(f"trainer.precision={precision} is not supported on {device.type}; use trainer.precision=no")
    return lambda: torch.autocast(device.type, dtype=dtype)


def precision_note(precision: str, device: torch.device) -> str:
    """One line saying how the forward really runs, so that a precision setting is never silently dropped."""
    if precision == "no":
        return f"precision: fp32 on {device.type}"
    dtype = "bfloat16" if precision == "bf16" else "float16"
    scaler = " with a gradient scaler per optimizer" if precision == "fp16" else ""
    return f"precision: {precision} (autocast to {dtype} on {device.type}{scaler}; weights and optimizer in fp32)"


class _Optimizer:
    """One optimizer of the method with everything the loop keeps for it."""

    def __init__(self, spec: OptimizerSpec, method: Method, device: torch.device, cfg: TrainConfig, world: int) -> None:
        self.spec = spec
        modules = {n: getattr(method, n) for n in spec.modules}
        wd = spec.weight_decay
        if wd is None:
            wd = float(getattr(spec.factory, "keywords", {}).get("weight_decay", 0.0))
        self.params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        self.opt = spec.factory(param_groups(modules.values(), wd))
        for g in self.opt.param_groups:
            if not finite_number(g["lr"]) or g["lr"] < 0:
                raise ConfigError(f"optimizer '{spec.name}': learning rate {g['lr']!r} must be a finite number >= 0")
            # Every other number too (betas, eps, weight decay, momentum): one NaN or inf poisons every weight.
            for key, value in g.items():
                values = value if isinstance(value, (list, tuple)) else [value]
                if key != "params" and any(isinstance(v, float) and not math.isfinite(v) for v in values):
                    raise ConfigError(f"optimizer '{spec.name}': {key}={value!r} must be finite (optim.{key})")
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.grad_clip = spec.grad_clip if spec.grad_clip is not None else cfg.grad_clip
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        phase = PhaseModule(method, spec.name, modules)
        self.module: nn.Module = phase
        if world > 1 and self.params:
            ids = [device.index] if device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(
                phase, device_ids=ids, find_unused_parameters=cfg.find_unused_parameters
            )
        if cfg.compile:
            self.module = torch.compile(self.module)
        self.skipped_in_a_row = 0

    def set_lr(self, factor: float) -> None:
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * factor


def _check_method(method: Method, specs: Sequence[OptimizerSpec]) -> None:
    modules = method.trainable_modules()
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"{type(method).__name__}: optimizer names must be unique and non-empty, got {names}")
    owner: dict[str, str] = {}
    for s in specs:
        for m in s.modules:
            if m not in modules:
                raise ConfigError(f"optimizer '{s.name}' updates {m!r}, which is not a trainable module {sorted(modules)}")
            if m in owner:
                raise ConfigError(f"module {m!r} is updated by two optimizers ('{owner[m]}' and '{s.name}')")
            owner[m] = s.name
    unowned = [m for m, mod in modules.items() if m not in owner and any(p.requires_grad for p in mod.parameters())]
    if unowned:
        raise ConfigError(f"trainable module(s) {unowned} have parameters but no optimizer updates them")


def _init_modules(init: Mapping[str, str], trainable: Mapping[str, nn.Module], fresh: bool) -> dict[str, dict[str, str]]:
    """``trainer.init``: on a fresh start, load each named module from its snapshot; the sources (path, SHA-256)."""
    unknown = sorted(set(init) - set(trainable))
    if unknown:
        raise ConfigError(f"trainer.init names {unknown}, which is not a trainable module {sorted(trainable)}")
    if not fresh:
        return {}  # the weights come from the training state; _check_init_sources compares the files
    sources = {}
    for name, path in sorted(init.items()):
        try:
            sha = init_from_snapshot(trainable[name], path, f"trainer.init.{name}")
        except FileNotFoundError as e:
            raise ConfigError(f"trainer.init.{name}: {e}; give an existing snapshot file") from e
        except ckpt.CheckpointError as e:  # a damaged file, a folder, another kind of snapshot: say which key named it
            raise ConfigError(f"trainer.init.{name}: {e}") from e
        sources[name] = {"path": str(path), "sha256": sha}
        print0(f"{name} starts from {path} (sha256 {sha[:12]})")
    return sources


def _build_emas(method: Method, default: EMAFactory, trainable: Mapping[str, nn.Module],
                device: torch.device) -> dict[str, EMA]:
    """The method's EMAs (``Method.ema_specs``), checked before the first step and attached to the method."""
    specs = method.ema_specs(default)
    who = type(method).__name__
    unknown = [n for n in specs if n not in trainable]
    if unknown:
        raise ConfigError(f"{who} declares an EMA of {unknown}, which is not a trainable module {sorted(trainable)}; "
                          "fix the method's ema_modules / ema_specs")
    if method.snapshot_module not in specs:
        raise ConfigError(f"{who}.snapshot_module={method.snapshot_module!r} has no EMA (EMAs: {sorted(specs)}); "
                          "snapshots hold an EMA: add it to ema_modules / ema_specs")
    emas: dict[str, EMA] = {}
    for name, factory in specs.items():
        try:
            emas[name] = factory(trainable[name]).to(device)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"the EMA of {name!r} cannot be built: {e}") from e
    method.attach_emas(emas)
    return emas


def train(
    *,
    method: Method,
    dataset: Any,
    tokenizer: Any,
    ema: EMAFactory,
    cfg: TrainConfig,
    run_dir: str | Path,
    config: Mapping[str, Any],
    snapshot_meta: Mapping[str, Any],
    hooks: Sequence[Hook] = (),
    resume_keys: Sequence[str] = ("model", "method", "objective", "data", "tokenizer"),
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``method`` on ``dataset``; resumes from ``run_dir`` when it holds a training state.

    Args:
        method: the training method (its modules may be on the CPU; they are moved here).
        dataset: yields dicts (``"image"`` uint8 (C, H, W), ``"label"``, ...) or ``(image, label)`` pairs;
            ``.tensors()`` when held in memory.
        tokenizer: ``encode(uint8 (B, C, H, W)) -> model input`` and ``normalize(latents)``.
        ema: the trainer's EMA factory (the ``ema`` config spec), given to ``method.ema_specs``; the first profile
            of the snapshot module's EMA is used for snapshots and hooks.
        cfg: loop settings.
        run_dir: the run folder (deterministic per experiment name).
        config: the resolved run config, stored in training states; its ``resume_keys`` sections must match
            on resume.
        snapshot_meta: metadata for inference snapshots (with the method's ``snapshot_config()`` merged in).
        hooks: periodic callbacks (sample grids, FID).
        resume_keys: config sections that must be equal to resume.
        should_stop: asked on every process after every optimizer step (except the last); when it is true on any
            process, all stop at that step, write its training state and raise :class:`TrainingPreempted`.

    Raises:
        TrainingPreempted: ``should_stop`` asked for a stop; the run folder's lock is released.
    """
    loop = _Loop(method, dataset, tokenizer, cfg, Path(run_dir), hooks)
    loop.should_stop = should_stop
    try:
        loop.build(ema)
        loop.resume(config, resume_keys)
        return loop.run(config, snapshot_meta)
    finally:
        loop.release()


class _Loop:
    """The state of one training run and its steps: EDM2's flat loop, split into named steps.

    ``build`` creates the optimizers, EMAs and the registry; ``resume`` restores the newest training state;
    ``run`` repeats ``_step`` (phases, counters, EMAs) and ``_after_step`` (status line, snapshots, states, hooks).
    """

    def __init__(self, method: Method, dataset: Any, tokenizer: Any, cfg: TrainConfig, run_dir: Path,
                 hooks: Sequence[Hook]) -> None:
        dist.init_distributed()
        self.method, self.dataset, self.tokenizer, self.cfg, self.run_dir, self.hooks = (
            method, dataset, tokenizer, cfg, run_dir, hooks)
        self.device = resolve_device(cfg.device)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.batch_per_gpu, self.rounds = _rounds(cfg, self.world)
        self.autocast = autocast_context(cfg.precision, self.device)
        print0(precision_note(cfg.precision, self.device))
        try:
            check_training_data(dataset, method.data_keys, method.flip_keys, cfg.hflip, type(method).__name__)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.num_classes = getattr(dataset, "num_classes", None)
        self.identity = data_identity(dataset)
        self.lock: RunFolderLock | None = None
        busy: RunFolderBusy | None = None
        if dist.is_main():
            run_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.lock = RunFolderLock(run_dir)
            except RunFolderBusy as e:
                busy = e
            else:
                if self.lock.note:
                    print0(f"note: {self.lock.note}")
                ckpt.remove_stale_temp_files(run_dir)  # only the folder's one writer may remove them
        # Every process stops when rank 0 cannot have the folder (none waits at a barrier for it).
        if float(dist.all_reduce_sum(torch.tensor([float(busy is not None)], dtype=torch.float64))[0]):
            raise busy or RunFolderBusy(f"{run_dir} is being written by another run; wait for it or use another name=")
        self.nimg, self.step = 0, 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.metrics: dict[str, float] = {}
        self.stepped: set[str] = set()
        self.should_stop: Callable[[], bool] | None = None

    def release(self) -> None:
        """Give the run folder back (the lock taken in ``__init__``); the kernel does it if the process dies."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- building and resuming --------------------------------------------------------------------------
    def build(self, ema: EMAFactory) -> None:
        """Move everything to the device, start from ``trainer.init``, build optimizers, EMAs and the registry."""
        method, cfg, device = self.method, self.cfg, self.device
        method.to(device)
        for m in method.frozen_modules().values():
            m.to(device)
        if isinstance(self.tokenizer, nn.Module):
            self.tokenizer.to(device).eval().requires_grad_(False)
        self.resumed_from, self.resume_state = newest_loadable_state(self.run_dir)
        self.init_sources = _init_modules(cfg.init or {}, method.trainable_modules(), fresh=self.resumed_from is None)
        self.specs = method.optimizers()
        _check_method(method, self.specs)
        self.optims = {s.name: _Optimizer(s, method, device, cfg, self.world) for s in self.specs}
        self.trainable = method.trainable_modules()
        self.own_params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in self.trainable.items()}
        self.emas = _build_emas(method, ema, self.trainable, device)
        self.frozen = method.frozen_identities()
        self.multi = len(self.specs) > 1
        self.registry = StateRegistry()
        for name, module in self.trainable.items():
            self.registry.register(f"module.{name}", module)
        for name, o in self.optims.items():
            self.registry.register(f"optim.{name}", o.opt)
            if o.scaler is not None:
                self.registry.register(f"scaler.{name}", o.scaler)
        for name, e in self.emas.items():
            self.registry.register(f"ema.{name}", e)
        self.registry.register("method", Value(method.extra_state, method.load_extra_state))
        self.registry.register("counters", Value(lambda: {"nimg": self.nimg, "step": self.step}, self._set_counters))

    def _set_counters(self, state: Mapping[str, int]) -> None:
        self.nimg, self.step = int(state["nimg"]), int(state["step"])

    def resume(self, config: Mapping[str, Any], resume_keys: Sequence[str]) -> None:
        """Restore the newest training state of the run folder, if any, after checking that it fits this run."""
        path, state = self.resumed_from, self.resume_state
        self.resume_state = None  # loaded in build (the newest state that loads); not kept after restoring it
        if path is not None and state is not None:
            check_resume(state, config, self.frozen, resume_keys, path, self.identity, self.cfg.resume_ignore)
            self.init_sources = check_init_sources(state.get("init", {}), self.cfg.init or {}, path)
            self.registry.load_state_dict(state["registry"], str(path))
            non_finite = self.registry.non_finite()
            bad = non_finite or self._oversized()
            if bad:
                earlier = [p for _, p in ckpt.list_training_states(self.run_dir) if p != path]
                what = "non-finite values" if non_finite else "diverged weights"
                raise NonFiniteError(
                    f"{path} holds {what} ({shorten(bad)}); training cannot resume from it. "
                    + (f"Delete it to resume from {earlier[-1]}." if earlier else "Delete the run folder to start again.")
                )
            print0(f"Resuming from {path} at kimg {self.nimg / 1000:.1f} (step {self.step})")
        self.last_state = path
        self.last_state_nimg = self.nimg if path is not None else -1

    # ---- the run ----------------------------------------------------------------------------------------
    def run(self, config: Mapping[str, Any], snapshot_meta: Mapping[str, Any]) -> TrainResult:
        """Train to ``total_kimg``, then write the final state, snapshot, loss curve and hook results."""
        cfg = self.cfg
        self.config, self.snapshot_meta = config, snapshot_meta
        total_nimg = self.total_nimg = int(round(cfg.total_kimg * 1000))
        start_nimg = self.nimg
        self.stats = StatsLog(self.run_dir, tensorboard=cfg.tensorboard, resume_nimg=self.nimg) if dist.is_main() else None
        self.batches = Batches(self.dataset, self.batch_per_gpu, self.rank, self.world, cfg.seed, self.nimg,
                               cfg.num_workers)
        self.bar = _progress_bar(cfg, self.nimg, total_nimg)
        self.tick = (time.time(), self.nimg)
        self.method.train()
        if self.nimg >= total_nimg and self.resumed_from is None:
            raise ConfigError("trainer.total_kimg is too small for one step")
        while self.nimg < total_nimg:
            prev_nimg = self.nimg
            self._step(Progress(self.nimg, total_nimg, self.step))
            done = self.nimg >= total_nimg
            if not done and self._stop_agreed():
                self._suspend(prev_nimg)
            self._after_step(prev_nimg, done=done)
        if self.bar is not None:
            self.bar.close()
        # Final artefacts: the training state (for resuming or fine-tuning) and a snapshot.
        if self.last_state_nimg != self.nimg:
            self.last_state = self._save_state()
        last_snapshot = self._save_snapshots()
        if dist.is_main() and self.nimg > start_nimg:
            plot_loss_curve(self.run_dir / "stats.jsonl", self.run_dir / "loss.png")
        self._run_hooks(self.nimg, final=True)
        if self.stats is not None:
            self.stats.close()
        dist.barrier()
        return TrainResult(self.nimg, self.step, self.run_dir, self.last_state, last_snapshot, self.resumed_from,
                           self.metrics)

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop: one all-reduce of the flags at every step boundary, so every
        process stops after the same step (a signal may reach one process of a job, or the processes at different
        moments)."""
        if self.should_stop is None:
            return False
        flag = torch.tensor([float(bool(self.should_stop()))], dtype=torch.float64)
        return float(dist.all_reduce_sum(flag)[0]) > 0

    def _suspend(self, prev_nimg: int) -> None:
        """Stop at this step boundary: the status line and snapshot if due here, the training state always (unless
        this step's is written already); hooks due here (a grid, an evaluation) are skipped, as their time may exceed
        the grace time before the job is killed. Raises :class:`TrainingPreempted`."""
        cfg = self.cfg
        if _crossed(prev_nimg, self.nimg, cfg.status_kimg):
            self._status()
        if self.last_state_nimg != self.nimg:
            self.last_state = self._save_state()
        if _crossed(prev_nimg, self.nimg, cfg.snapshot_kimg):
            self._save_snapshots()
        if self.bar is not None:
            self.bar.close()
        if self.stats is not None:
            self.stats.close()
        raise TrainingPreempted(self.nimg, self.step, self.last_state)

    def _step(self, progress: Progress) -> None:
        """One optimizer step of every phase the method names, then the counters and the EMAs of stepped modules."""
        cfg, method = self.cfg, self.method
        # Modules that draw from the global RNG (dropout) are reseeded too; the method's draws are per sample.
        torch.manual_seed(derive_seed("global", cfg.seed, self.rank, self.nimg))
        for o in self.optims.values():
            o.set_lr(o.spec.lr_schedule(progress) if o.spec.lr_schedule is not None else lr_factor(cfg, progress))
        phases = list(method.phases(progress))
        unknown = [p for p in phases if p not in self.optims]
        if unknown:
            raise RuntimeError(f"{type(method).__name__}.phases() named unknown optimizer(s) {unknown}")
        self.stepped = set()
        # One phase streams its micro-batches; several phases keep them so that every phase sees the same data.
        if len(phases) == 1:
            self._phase(phases[0], self._micro_batches(), progress)
        else:
            micro = list(self._micro_batches())
            for name in phases:
                self._phase(name, micro, progress)
            del micro
        for params in self.own_params.values():
            for p in params:
                p.requires_grad_(True)
        method.shared.clear()
        prev_nimg = self.nimg
        self.nimg += cfg.batch_size
        self.step += 1
        for name, e in self.emas.items():  # only the averages of modules whose optimizer stepped
            if name in self.stepped:
                e.update(self.trainable[name], prev_nimg, cfg.batch_size)
        if type(method).after_step is not Method.after_step:
            keys = sorted(k for k in self.last if not k.endswith("grad_norm"))
            packed = dist.all_reduce_sum(torch.tensor([self.last[k] for k in keys], dtype=torch.float64))
            method.after_step(progress, {k: float(v) / cfg.batch_size for k, v in zip(keys, packed.tolist())})
        if self.bar is not None:
            self.bar.update(cfg.batch_size)

    def _micro_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], SampleRandom]]:
        """This process's micro-batches of the step, each with its per-sample randomness, prepared by the method."""
        for _ in range(self.rounds):
            raw = self.batches.next()
            if self.num_classes is not None:  # data read through a loader: labels are only known now
                problem = label_range_error(raw["label"], int(self.num_classes), "a batch of the training data")
                if problem:
                    raise ConfigError(problem)
            rng = SampleRandom(raw["position"].tolist(), namespace=f"train/{self.cfg.seed}", device=self.device)
            yield self.method.prepare_batch(raw, self.tokenizer, rng, self.cfg.hflip, self.device), rng

    def _key(self, phase: str, key: str) -> str:
        return f"{phase}/{key}" if self.multi else key

    def _phase(self, name: str, micro: Iterable[tuple[dict[str, torch.Tensor], SampleRandom]], progress: Progress) -> None:
        """Accumulate one phase's gradients over the micro-batches (synchronised on the last), clip and step."""
        o = self.optims[name]
        mine = set(o.spec.modules)
        for m, params in self.own_params.items():  # only this phase's parameters collect gradients
            for p in params:
                p.requires_grad_(m in mine)
        o.opt.zero_grad(set_to_none=True)
        step_sums: dict[str, float] = {}
        done_rounds = 0
        for r, (batch, rng) in enumerate(micro):
            done_rounds += 1
            last_round = r == self.rounds - 1
            sync = o.module.no_sync() if hasattr(o.module, "no_sync") and not last_round else contextlib.nullcontext()
            self.method.shared.at(r)
            with sync:
                with self.autocast():
                    out = o.module(batch, rng, progress)
                loss = out["loss"].float().mean() / self.rounds
                (o.scaler.scale(loss) if o.scaler is not None else loss).backward()
            for k, v in out.items():
                key = self._key(name, k)
                step_sums[key] = step_sums.get(key, 0.0) + float(v.detach().float().sum())
                self.counts[key] = self.counts.get(key, 0) + v.shape[0]
        loss_mean = step_sums.get(self._key(name, "loss"), math.nan) / max(done_rounds * self.batch_per_gpu, 1)
        norm = self._optimizer_step(o, name, loss_mean)
        for k, v in step_sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.last[k] = v
        self.last[self._key(name, "grad_norm")] = norm

    def _optimizer_step(self, o: _Optimizer, name: str, loss_mean: float) -> float:
        """Unscale (fp16), clip, step (or skip an overflowing fp16 step); returns the gradient norm."""
        if o.scaler is not None:
            o.scaler.unscale_(o.opt)
        max_norm = o.grad_clip if o.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(o.params, max_norm) if o.params else torch.zeros(())
        finite = bool(torch.isfinite(norm))
        if not finite and o.scaler is None:
            # Gradients are synchronised, so every rank sees the same norm and stops together.
            raise NonFiniteError(
                f"non-finite loss/gradient at step {self.step} (kimg {self.nimg / 1000:.3f}, phase '{name}'; loss "
                f"{loss_mean:.4g}). Training stopped; nothing was written after the last good training state: "
                f"{self.last_state or 'none yet'}. Lower the learning rate, enable trainer.grad_clip, or use fp32 "
                "(trainer.precision=no)."
            )
        if o.scaler is None:
            o.opt.step()
        else:
            o.scaler.step(o.opt)  # skipped when the unscaled gradients hold inf/NaN
            o.scaler.update()
            o.skipped_in_a_row = 0 if finite else o.skipped_in_a_row + 1
            if not finite:
                key = self._key(name, "skipped_steps")
                self.sums[key] = self.sums.get(key, 0.0) + 1.0
                self.counts[key] = 1
                if o.skipped_in_a_row >= self.cfg.max_skipped_steps:
                    raise NonFiniteError(
                        f"fp16: {o.skipped_in_a_row} steps in a row overflowed (phase '{name}', step {self.step}); "
                        f"the loss is not finite even at gradient scale {o.scaler.get_scale():.3g}. The last good "
                        f"training state is {self.last_state or 'none yet'}. Lower the learning rate or use bf16/fp32."
                    )
        if finite:  # an fp16 step skipped for overflow left the weights (and so their EMAs) unchanged
            self.stepped.update(o.spec.modules)
        return float(norm)

    # ---- after a step: status line, snapshots, states, hooks -------------------------------------------------
    def _after_step(self, prev_nimg: int, done: bool) -> None:
        cfg = self.cfg
        if _crossed(prev_nimg, self.nimg, cfg.status_kimg) or done:
            self._status()
            self._check_finite("next training state")  # stop a diverged run now, not at its next file
        if done:
            return
        if _crossed(prev_nimg, self.nimg, cfg.snapshot_kimg):
            self._save_snapshots()
        if _crossed(prev_nimg, self.nimg, cfg.checkpoint_kimg):
            self.last_state = self._save_state()
        self._run_hooks(prev_nimg, final=False)

    def _status(self) -> None:
        """Reduce the logged sums over processes and write one record (status line, ``stats.jsonl``)."""
        keys = sorted(self.sums)
        packed = torch.tensor([self.sums[k] for k in keys] + [self.counts[k] for k in keys], dtype=torch.float64)
        packed = dist.all_reduce_sum(packed)
        n = len(keys)
        means = {k: float(packed[i]) / max(float(packed[n + i]), 1.0) for i, k in enumerate(keys)}
        for i, k in enumerate(keys):
            if k.endswith("skipped_steps"):
                means[k] = float(packed[i]) / self.world
        now = time.time()
        tick_time, tick_nimg = self.tick
        record: dict[str, Any] = {
            "kimg": self.nimg / 1000,
            "nimg": self.nimg,
            "step": self.step,
            "sec_per_kimg": (now - tick_time) / max((self.nimg - tick_nimg) / 1000, 1e-9),
            **means,
            **{k: v for k, v in self.last.items() if k.endswith("grad_norm")},
            **self.method.status(Progress(self.nimg, self.total_nimg, self.step)),
            "lr": next(iter(self.optims.values())).opt.param_groups[0]["lr"],
        }
        if self.device.type == "cuda":
            record["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.stats is not None:
            self.stats.write(record)
            if self.bar is not None:
                self.bar.set_postfix_str(f"loss {record.get('loss', float('nan')):.4f}")
            else:
                print0(status_line(record))
        self.sums, self.counts = {}, {}
        self.tick = (now, self.nimg)

    def _oversized(self) -> list[str]:
        """Modules whose weights' RMS exceeds ``trainer.max_weight_rms`` (named with their RMS)."""
        bound = self.cfg.max_weight_rms
        if bound is None:
            return []
        return [f"{k} (RMS {v:.3g})" for k, v in self.registry.weight_rms().items() if not v <= bound]

    def _check_finite(self, what: str) -> None:
        """Stop before writing ``what`` from a diverged run: non-finite weights, or weights past the magnitude bound."""
        bad = self.registry.non_finite()
        how = "became non-finite"
        if not bad:
            bad, how = self._oversized(), f"diverged past trainer.max_weight_rms={self.cfg.max_weight_rms}"
        if bad:
            raise NonFiniteError(
                f"weights {how} by step {self.step} (kimg {self.nimg / 1000:.3f}): {shorten(bad)}. The "
                f"{what} was not written and the run has no result; the last good training state is "
                f"{self.last_state or 'none'}. Lower the learning rate, enable trainer.grad_clip, or use fp32."
            )

    def _save_state(self) -> Path:
        self._check_finite("training state")
        path = self.run_dir / f"state-{self.nimg:09d}.pt"
        if dist.is_main():
            ckpt.save_training_state(path, {
                "format": STATE_FORMAT,
                "registry": self.registry.state_dict(),
                "frozen": self.frozen,
                "data_identity": self.identity,
                "init": self.init_sources,
                "config": json.dumps(dict(self.config), sort_keys=True, default=str),
            })
            if self.cfg.keep_states > 0:
                for _, old in ckpt.list_training_states(self.run_dir)[: -self.cfg.keep_states]:
                    old.unlink(missing_ok=True)
        dist.barrier()
        self.last_state_nimg = self.nimg
        return path

    def _save_snapshots(self) -> Path:
        """One snapshot per EMA profile of the snapshot module (the first profile's is the run's snapshot)."""
        self._check_finite("snapshot")
        dtype = torch.bfloat16 if self.cfg.snapshot_dtype == "bfloat16" else torch.float32
        first = self.run_dir / f"snapshot-{self.nimg:09d}.safetensors"
        ema = self.emas[self.method.snapshot_module]
        if dist.is_main():
            meta = {**self.snapshot_meta, **self.method.snapshot_config(), "ema_spec": ema.spec, "nimg": self.nimg,
                    "step": self.step}
            for i, p in enumerate(ema.profiles):
                path = first if i == 0 else self.run_dir / f"snapshot-{self.nimg:09d}-{p.name}.safetensors"
                sd = ema.averaged(p.name).state_dict()
                weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
                ckpt.save_snapshot(path, weights, {**meta, "ema": p.name})
        dist.barrier()
        return first

    def _run_hooks(self, prev: int, final: bool) -> None:
        for hook in self.hooks:
            if final or _crossed(prev, self.nimg, hook.interval_kimg):
                ctx = HookContext(self.nimg, self.step, self.method, self.emas, self.run_dir, self.device, final)
                out = dict(hook(ctx))
                self.metrics.update(out)
                if self.stats is not None and out:
                    self.stats.write({"kimg": self.nimg / 1000, "nimg": self.nimg, "step": self.step, **out})


def newest_loadable_state(run_dir: Path) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest training state of ``run_dir`` that can be read, and its content; (None, None) for a new run.

    A damaged newer state (cut by a crash of the disk, a partial copy) is named and skipped, so the run resumes from
    the newest good one and overwrites the damaged file when it gets there again.

    Raises:
        CheckpointError: states exist but none can be read (the message names them).
    """
    damaged = []
    for _, path in reversed(ckpt.list_training_states(run_dir)):
        try:
            state = ckpt.load_training_state(path)
        except ckpt.CheckpointError as e:
            damaged.append((path, e))
            continue
        except OSError as e:  # unreadable (permissions, an I/O error): named as a read, and skipped like damage
            damaged.append((path, ckpt.CheckpointError(describe_os_error(e, path, "read"))))
            continue
        for _, e in damaged:
            print0(f"warning: {e} Resuming from {path}, the newest state that can be read.")
        return path, state
    if damaged:
        first = damaged[0][1]
        if len(damaged) == 1:
            raise first
        raise ckpt.CheckpointError(
            f"none of the {len(damaged)} training states in {run_dir} can be read ({first}). Delete them, or the run "
            "folder, to start again."
        )
    return None, None


def _rounds(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation rounds) for the global batch, refusing sizes that do not divide."""
    batch_per_gpu = cfg.batch_per_gpu or cfg.batch_size // world
    rounds = cfg.batch_size // (batch_per_gpu * world) if batch_per_gpu * world else 0
    if rounds < 1 or rounds * batch_per_gpu * world != cfg.batch_size:
        raise ConfigError(
            f"trainer.batch_size={cfg.batch_size} is not a multiple of batch_per_gpu={batch_per_gpu} x "
            f"{world} processes; choose batch_per_gpu so that batch_size = batch_per_gpu * processes * rounds"
        )
    return batch_per_gpu, rounds


def _progress_bar(cfg: TrainConfig, nimg: int, total_nimg: int) -> Any:
    """A tqdm bar on rank 0, only on a terminal: in a log file its redraws would bury the status lines."""
    if not (cfg.progress and dist.is_main() and sys.stderr.isatty()):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_nimg, initial=nimg, unit="img", unit_scale=True, dynamic_ncols=True, desc="train")
