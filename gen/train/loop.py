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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from gen.ema import EMA, EMAFactory
from gen.train.batches import Batches, check_batch_keys, dataset_keys
from gen.train.method import Method, OptimizerSpec, PhaseModule, Progress, param_groups
from gen.snapshot import init_from_snapshot
from gen.train.state import StateRegistry, Value
from gen.utils import ckpt, dist
from gen.utils.config import ConfigError
from gen.utils.dist import print0
from gen.utils.finite import NonFiniteError, finite_number, shorten
from gen.utils.log import StatsLog, plot_loss_curve, status_line
from gen.utils.seed import SampleRandom, derive_seed

STATE_FORMAT = "gen-train-state-v2"


__all__ = ["NonFiniteError", "TrainConfig", "train", "HookContext", "Hook", "TrainResult"]

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
        sources[name] = {"path": str(path), "sha256": sha}
        print0(f"{name} starts from {path} (sha256 {sha[:12]})")
    return sources


def _check_init_sources(recorded: Mapping[str, Mapping[str, str]], init: Mapping[str, str], path: Path) -> dict:
    """Resuming: the snapshots named by ``trainer.init`` must be the ones the run started from (by SHA-256)."""
    if set(recorded) != set(init):
        raise ConfigError(
            f"{path} started from snapshots for {sorted(recorded) or 'no module'}, but trainer.init names "
            f"{sorted(init) or 'none'}; restore trainer.init to resume, or start a new run with another name=..."
        )
    for name, file in sorted(init.items()):
        if not Path(file).is_file():
            print0(f"trainer.init.{name}: {file} no longer exists; the weights come from {path}")
            continue
        sha = ckpt.file_sha256(file)
        if sha != recorded[name]["sha256"]:
            raise ConfigError(
                f"trainer.init.{name}={file} has sha256 {sha[:12]}..., but {path} started from a file with sha256 "
                f"{recorded[name]['sha256'][:12]}... ({recorded[name]['path']}); it changed since. Restore it, or "
                "start a new run with another name=..."
            )
    return dict(recorded)


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


def _label_range_error(labels: torch.Tensor, num_classes: int, where: str) -> str | None:
    """A message when ``labels`` leave [0, num_classes); label ``num_classes`` is the backbones' null class."""
    if labels.numel() == 0:
        return None
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < num_classes:
        return None
    bad = lo if lo < 0 else hi
    what = "the null class (unconditional)" if bad == num_classes else "outside the label table"
    return (
        f"{where} holds label {bad}, but the data has num_classes={num_classes}: labels must be in "
        f"[0, {num_classes - 1}]; label {bad} is {what}. Fix the dataset's labels or data.num_classes"
    )


def _all_labels(dataset: Any) -> torch.Tensor | None:
    """Every label of the dataset when it is known without decoding (in-memory tensors, a list of targets)."""
    if hasattr(dataset, "tensors"):
        tensors = dataset.tensors()
        labels = tensors["label"] if isinstance(tensors, Mapping) else tensors[1]
        return torch.as_tensor(labels).long()
    targets = getattr(dataset, "targets", None)
    return torch.as_tensor(list(targets)).long() if targets is not None else None


_HASHED_BYTES = 1 << 28  # in-memory data up to 256 MB is hashed whole, larger data by a fixed stride


def _tensor_digest(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)
    if flat.numel() > _HASHED_BYTES:
        flat = flat[:: flat.numel() // _HASHED_BYTES + 1]
    h.update(flat.numpy().tobytes())


def data_identity(dataset: Any) -> dict[str, Any] | None:
    """A fingerprint of the training data's content, so that a moved dataset is recognised on resume.

    In-memory datasets (``tensors()``): SHA-256 of the image and label tensors (by a fixed stride beyond 256 MB).
    File datasets (``files`` + ``targets`` + ``root``, e.g. image folders): SHA-256 of every file's path relative to
    the root, its size and its label (one ``stat`` per file; the bytes are not read). Datasets that know their own
    content (``content_identity()``, e.g. latent shards): theirs. Others: None.
    """
    import hashlib
    import os

    if hasattr(dataset, "content_identity"):
        return dataset.content_identity()
    h = hashlib.sha256()
    if hasattr(dataset, "tensors"):
        tensors = dataset.tensors()
        items = dict(tensors) if isinstance(tensors, Mapping) else {"image": tensors[0], "label": tensors[1]}
        for name in sorted(items):
            _tensor_digest(h, name, torch.as_tensor(items[name]))
        return {"kind": "tensors", "count": len(dataset), "sha256": h.hexdigest()}
    files, targets, root = getattr(dataset, "files", None), getattr(dataset, "targets", None), getattr(dataset, "root", None)
    if files is None or targets is None or root is None:
        return None
    for f, y in zip(files, targets, strict=True):
        rel = os.path.relpath(os.fspath(f), os.fspath(root))
        h.update(f"{rel}|{os.stat(f).st_size}|{int(y)}\n".encode("utf-8", "surrogateescape"))
    return {"kind": "files", "count": len(files), "sha256": h.hexdigest()}


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
    """
    dist.init_distributed()
    device = resolve_device(cfg.device)
    rank, world = dist.rank(), dist.world_size()
    batch_per_gpu = cfg.batch_per_gpu or cfg.batch_size // world
    rounds = cfg.batch_size // (batch_per_gpu * world) if batch_per_gpu * world else 0
    if rounds < 1 or rounds * batch_per_gpu * world != cfg.batch_size:
        raise ConfigError(
            f"trainer.batch_size={cfg.batch_size} is not a multiple of batch_per_gpu={batch_per_gpu} x "
            f"{world} processes; choose batch_per_gpu so that batch_size = batch_per_gpu * processes * rounds"
        )
    autocast = autocast_context(cfg.precision, device)
    print0(precision_note(cfg.precision, device))
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is not None:
        labels = _all_labels(dataset)
        problem = None if labels is None else _label_range_error(labels, int(num_classes), "the training data")
        if problem:
            raise ConfigError(problem)
    try:
        check_batch_keys(dataset_keys(dataset), method.data_keys, method.flip_keys, cfg.hflip, type(method).__name__)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    identity = data_identity(dataset)
    run_dir = Path(run_dir)
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temp_files(run_dir)
    dist.barrier()

    method.to(device)
    for m in method.frozen_modules().values():
        m.to(device)
    if isinstance(tokenizer, nn.Module):
        tokenizer.to(device).eval().requires_grad_(False)
    resumed_from = ckpt.latest_training_state(run_dir)
    init_sources = _init_modules(cfg.init or {}, method.trainable_modules(), fresh=resumed_from is None)
    specs = method.optimizers()
    _check_method(method, specs)
    optims = {s.name: _Optimizer(s, method, device, cfg, world) for s in specs}
    trainable = method.trainable_modules()
    own_params = {n: [p for p in m.parameters() if p.requires_grad] for n, m in trainable.items()}
    phase_modules = {s.name: s.modules for s in specs}
    emas = _build_emas(method, ema, trainable, device)
    frozen = method.frozen_identities()

    # ---- one registry: everything saved and restored ------------------------------------------------
    nimg, step = 0, 0

    def set_counters(state: Mapping[str, int]) -> None:
        nonlocal nimg, step
        nimg, step = int(state["nimg"]), int(state["step"])

    registry = StateRegistry()
    for name, module in trainable.items():
        registry.register(f"module.{name}", module)
    for name, o in optims.items():
        registry.register(f"optim.{name}", o.opt)
        if o.scaler is not None:
            registry.register(f"scaler.{name}", o.scaler)
    for name, e in emas.items():
        registry.register(f"ema.{name}", e)
    registry.register("method", Value(method.extra_state, method.load_extra_state))
    registry.register("counters", Value(lambda: {"nimg": nimg, "step": step}, set_counters))

    if resumed_from is not None:
        state = ckpt.load_training_state(resumed_from)
        _check_resume(state, config, frozen, resume_keys, resumed_from, identity, cfg.resume_ignore)
        init_sources = _check_init_sources(state.get("init", {}), cfg.init or {}, resumed_from)
        registry.load_state_dict(state["registry"], str(resumed_from))
        bad = registry.non_finite()
        if bad:
            earlier = [p for _, p in ckpt.list_training_states(run_dir) if p != resumed_from]
            raise NonFiniteError(
                f"{resumed_from} holds non-finite values ({shorten(bad)}); training cannot resume from it. "
                + (f"Delete it to resume from {earlier[-1]}." if earlier else "Delete the run folder to start again.")
            )
        print0(f"Resuming from {resumed_from} at kimg {nimg / 1000:.1f} (step {step})")
    total_nimg = int(round(cfg.total_kimg * 1000))
    start_nimg = nimg

    stats = StatsLog(run_dir, tensorboard=cfg.tensorboard, resume_nimg=nimg) if dist.is_main() else None
    batches = Batches(dataset, batch_per_gpu, rank, world, cfg.seed, nimg, cfg.num_workers)
    bar = None
    # The bar only on a terminal: in a log file its redraws would bury the status lines.
    if cfg.progress and dist.is_main() and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total_nimg, initial=nimg, unit="img", unit_scale=True, dynamic_ncols=True, desc="train")

    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    last: dict[str, float] = {}
    tick_time, tick_nimg = time.time(), nimg
    last_state = resumed_from
    last_state_nimg = nimg if resumed_from is not None else -1
    metrics: dict[str, float] = {}
    multi = len(specs) > 1
    needs_step_means = type(method).after_step is not Method.after_step

    def check_finite(what: str) -> None:
        bad = registry.non_finite()
        if bad:
            raise NonFiniteError(
                f"weights became non-finite by step {step} (kimg {nimg / 1000:.3f}): {shorten(bad)}. The {what} was "
                f"not written and the run has no result; the last good training state is {last_state or 'none'}. "
                "Lower the learning rate, enable trainer.grad_clip, or use fp32."
            )

    def save_state() -> Path:
        nonlocal last_state_nimg
        check_finite("training state")
        path = run_dir / f"state-{nimg:09d}.pt"
        if dist.is_main():
            ckpt.save_training_state(
                path,
                {
                    "format": STATE_FORMAT,
                    "registry": registry.state_dict(),
                    "frozen": frozen,
                    "data_identity": identity,
                    "init": init_sources,
                    "config": json.dumps(dict(config), sort_keys=True, default=str),
                },
            )
            if cfg.keep_states > 0:
                for _, old in ckpt.list_training_states(run_dir)[: -cfg.keep_states]:
                    old.unlink(missing_ok=True)
        dist.barrier()
        last_state_nimg = nimg
        return path

    def save_snapshots() -> Path:
        check_finite("snapshot")
        dtype = torch.bfloat16 if cfg.snapshot_dtype == "bfloat16" else torch.float32
        first = run_dir / f"snapshot-{nimg:09d}.safetensors"
        ema = emas[method.snapshot_module]
        if dist.is_main():
            for i, p in enumerate(ema.profiles):
                path = first if i == 0 else run_dir / f"snapshot-{nimg:09d}-{p.name}.safetensors"
                sd = ema.averaged(p.name).state_dict()
                weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
                ckpt.save_snapshot(path, weights, {**snapshot_meta, **method.snapshot_config(), "ema": p.name,
                                                   "ema_spec": ema.spec, "nimg": nimg, "step": step})
        dist.barrier()
        return first

    def run_hooks(prev: int, final: bool) -> None:
        for hook in hooks:
            if final or _crossed(prev, nimg, hook.interval_kimg):
                ctx = HookContext(nimg, step, method, emas, run_dir, device, final)
                out = dict(hook(ctx))
                metrics.update(out)
                if stats is not None and out:
                    stats.write({"kimg": nimg / 1000, "nimg": nimg, "step": step, **out})

    def run_phase(name: str, micro: Iterable[tuple[dict[str, torch.Tensor], SampleRandom]], progress: Progress) -> None:
        o = optims[name]
        mine = set(phase_modules[name])
        for m, params in own_params.items():  # only this phase's parameters collect gradients
            for p in params:
                p.requires_grad_(m in mine)
        o.opt.zero_grad(set_to_none=True)
        step_sums: dict[str, float] = {}
        done_rounds = 0
        for r, (batch, rng) in enumerate(micro):
            done_rounds += 1
            sync = o.module.no_sync() if hasattr(o.module, "no_sync") and r < rounds - 1 else contextlib.nullcontext()
            method.shared.at(r)
            with sync:
                with autocast():
                    out = o.module(batch, rng, progress)
                loss = out["loss"].float().mean() / rounds
                (o.scaler.scale(loss) if o.scaler is not None else loss).backward()
            for k, v in out.items():
                key = f"{name}/{k}" if multi else k
                step_sums[key] = step_sums.get(key, 0.0) + float(v.detach().float().sum())
                counts[key] = counts.get(key, 0) + v.shape[0]
        if o.scaler is not None:
            o.scaler.unscale_(o.opt)
        max_norm = o.grad_clip if o.grad_clip is not None else math.inf
        norm = torch.nn.utils.clip_grad_norm_(o.params, max_norm) if o.params else torch.zeros(())
        finite = bool(torch.isfinite(norm))
        if not finite and o.scaler is None:
            # Gradients are synchronised, so every rank sees the same norm and stops together.
            raise NonFiniteError(
                f"non-finite loss/gradient at step {step} (kimg {nimg / 1000:.3f}, phase '{name}'; loss "
                f"{step_sums.get(f'{name}/loss' if multi else 'loss', float('nan')) / max(done_rounds * batch_per_gpu, 1):.4g}). "
                f"Training stopped; nothing was written after the last good training state: {last_state or 'none yet'}. "
                "Lower the learning rate, enable trainer.grad_clip, or use fp32 (trainer.precision=no)."
            )
        if o.scaler is not None:
            o.scaler.step(o.opt)  # skipped when the unscaled gradients hold inf/NaN
            o.scaler.update()
            o.skipped_in_a_row = 0 if finite else o.skipped_in_a_row + 1
            if not finite:
                key = f"{name}/skipped_steps" if multi else "skipped_steps"
                sums[key] = sums.get(key, 0.0) + 1.0
                counts[key] = 1
                if o.skipped_in_a_row >= cfg.max_skipped_steps:
                    raise NonFiniteError(
                        f"fp16: {o.skipped_in_a_row} steps in a row overflowed (phase '{name}', step {step}); the "
                        f"loss is not finite even at gradient scale {o.scaler.get_scale():.3g}. The last good "
                        f"training state is {last_state or 'none yet'}. Lower the learning rate or use bf16/fp32."
                    )
        else:
            o.opt.step()
        if finite:  # an fp16 step skipped for overflow left the weights (and so their EMAs) unchanged
            stepped.update(o.spec.modules)
        for k, v in step_sums.items():
            sums[k] = sums.get(k, 0.0) + v
            last[k] = v
        gkey = f"{name}/grad_norm" if multi else "grad_norm"
        last[gkey] = float(norm)

    # ---- main loop ------------------------------------------------------------------------------------
    method.train()
    if nimg >= total_nimg and resumed_from is None:
        raise ConfigError("trainer.total_kimg is too small for one step")
    while nimg < total_nimg:
        progress = Progress(nimg, total_nimg, step)
        # Modules that draw from the global RNG (dropout) are reseeded too; the method's draws are per sample.
        torch.manual_seed(derive_seed("global", cfg.seed, rank, nimg))
        for o in optims.values():
            o.set_lr(o.spec.lr_schedule(progress) if o.spec.lr_schedule is not None else lr_factor(cfg, progress))
        phases = list(method.phases(progress))
        stepped: set[str] = set()
        unknown = [p for p in phases if p not in optims]
        if unknown:
            raise RuntimeError(f"{type(method).__name__}.phases() named unknown optimizer(s) {unknown}")

        def micro_batches() -> Any:
            for _ in range(rounds):
                raw = batches.next()
                if num_classes is not None:  # data read through a loader: labels are only known now
                    problem = _label_range_error(raw["label"], int(num_classes), "a batch of the training data")
                    if problem:
                        raise ConfigError(problem)
                rng = SampleRandom(raw["position"].tolist(), namespace=f"train/{cfg.seed}", device=device)
                yield method.prepare_batch(raw, tokenizer, rng, cfg.hflip, device), rng

        # One phase streams its micro-batches; several phases keep them so that every phase sees the same data.
        if len(phases) == 1:
            run_phase(phases[0], micro_batches(), progress)
        else:
            micro = list(micro_batches())
            for name in phases:
                run_phase(name, micro, progress)
            del micro
        for params in own_params.values():
            for p in params:
                p.requires_grad_(True)
        method.shared.clear()
        prev_nimg = nimg
        nimg += cfg.batch_size
        step += 1
        for name, e in emas.items():  # only the averages of modules whose optimizer stepped
            if name in stepped:
                e.update(trainable[name], prev_nimg, cfg.batch_size)
        if needs_step_means:
            keys = sorted(k for k in last if not k.endswith("grad_norm"))
            packed = dist.all_reduce_sum(torch.tensor([last[k] for k in keys], dtype=torch.float64))
            method.after_step(progress, {k: float(v) / cfg.batch_size for k, v in zip(keys, packed.tolist())})
        if bar is not None:
            bar.update(cfg.batch_size)

        done = nimg >= total_nimg
        if _crossed(prev_nimg, nimg, cfg.status_kimg) or done:
            keys = sorted(sums)
            packed = torch.tensor([sums[k] for k in keys] + [counts[k] for k in keys], dtype=torch.float64)
            packed = dist.all_reduce_sum(packed)
            n = len(keys)
            means = {k: float(packed[i]) / max(float(packed[n + i]), 1.0) for i, k in enumerate(keys)}
            for k in keys:
                if k.endswith("skipped_steps"):
                    means[k] = float(packed[keys.index(k)]) / world
            now = time.time()
            record: dict[str, Any] = {
                "kimg": nimg / 1000,
                "nimg": nimg,
                "step": step,
                "sec_per_kimg": (now - tick_time) / max((nimg - tick_nimg) / 1000, 1e-9),
                **means,
                **{k: v for k, v in last.items() if k.endswith("grad_norm")},
                "lr": next(iter(optims.values())).opt.param_groups[0]["lr"],
            }
            if device.type == "cuda":
                record["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if stats is not None:
                stats.write(record)
                if bar is not None:
                    bar.set_postfix_str(f"loss {record.get('loss', float('nan')):.4f}")
                else:
                    print0(status_line(record))
            sums, counts = {}, {}
            tick_time, tick_nimg = now, nimg
        if _crossed(prev_nimg, nimg, cfg.snapshot_kimg) and not done:
            save_snapshots()
        if _crossed(prev_nimg, nimg, cfg.checkpoint_kimg) and not done:
            last_state = save_state()
        if not done:
            run_hooks(prev_nimg, final=False)

    if bar is not None:
        bar.close()
    # Final artefacts: the training state (for resuming or fine-tuning) and a snapshot.
    if last_state_nimg != nimg:
        last_state = save_state()
    last_snapshot = save_snapshots()
    if dist.is_main() and nimg > start_nimg:
        plot_loss_curve(run_dir / "stats.jsonl", run_dir / "loss.png")
    run_hooks(nimg, final=True)
    if stats is not None:
        stats.close()
    dist.barrier()
    return TrainResult(nimg, step, run_dir, last_state, last_snapshot, resumed_from, metrics)


def _differences(a: Any, b: Any, key: str) -> list[tuple[str, Any, Any]]:
    """The leaves where two plain config values differ, as (dotted key, old, new)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{key}.{k}")]
    return [] if a == b else [(key, a, b)]


def _check_resume(
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    frozen: Mapping[str, Mapping[str, str]],
    keys: Sequence[str],
    path: Path,
    identity: Mapping[str, Any] | None = None,
    ignore: Sequence[str] = (),
) -> None:
    """Refuse to resume a state written by another setup or with other frozen networks.

    The data is told by its content: when the state's data fingerprint (``data_identity``) equals this run's, text
    settings of the ``data`` section (a moved folder) may differ. Sections in ``ignore`` may differ at all. Every
    accepted difference is printed.
    """
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(
            f"{path} is not a training state of this version of the toolkit (format {state.get('format')!r}, "
            f"expected {STATE_FORMAT!r}); start a new run with another name=..."
        )
    try:
        old = json.loads(state.get("config", "{}"))
    except json.JSONDecodeError:
        old = {}
    old_identity = state.get("data_identity")
    for key in keys:
        a, b = old.get(key), json.loads(json.dumps(config.get(key), default=str))
        if a is None or b is None or a == b:
            continue
        diffs = _differences(a, b, key)
        listed = "; ".join(f"{k}: {x!r} -> {y!r}" for k, x, y in diffs[:6]) + (" ..." if len(diffs) > 6 else "")
        if key in ignore:
            print0(f"Resuming although '{key}' changed (trainer.resume_ignore): {listed}")
            continue
        same_data = key == "data" and old_identity is not None and old_identity == identity
        if same_data and all(isinstance(x, str) and isinstance(y, str) for _, x, y in diffs):
            print0(f"Resuming with the same data ({identity['count']} items, content {identity['sha256'][:12]}) "
                   f"at another location: {listed}")
            continue
        hint = "Use another experiment name (name=...) for a new run, or restore the old setting to resume."
        if key == "data":
            hint += (
                " If the data only moved or was renamed, resuming is allowed when its content is the same (it differs "
                "here, or the dataset has no content fingerprint); to resume anyway, set trainer.resume_ignore=[data]."
            )
        raise ConfigError(f"{path} was written with a different '{key}' config than this run ({listed}). {hint}")
    old_frozen = state.get("frozen", {})
    for name in sorted(set(old_frozen) | set(frozen)):
        a, b = old_frozen.get(name), frozen.get(name)
        if a != b:
            raise ConfigError(
                f"{path} was trained with frozen network '{name}' = {a}, but this run has {b}. A frozen teacher, "
                "encoder or loss network must stay the same to resume; restore its weights file, or start a new run "
                "with another name=..."
            )
