"""The training loop: explicit, image-counted, resumable, on top of ``accelerate``.

Everything is counted in training images (``nimg``); the learning rate, EMA and every interval are
functions of it. Each step reseeds its random generator from ``(seed, rank, nimg)``, and the data
order is a pure function of ``(seed, nimg)``, so re-running the same command after an interruption
resumes from the latest training state and reproduces the uninterrupted run.

Launch: ``python train.py`` (1 process), ``torchrun --nproc_per_node=N train.py`` or
``accelerate launch --num_processes N train.py`` (gloo on CPU, NCCL on GPUs); multi-node with
``torchrun --nnodes=M --node_rank=i --master_addr=H --master_port=P ...``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from gen.data import InfiniteSampler, random_hflip
from gen.ema import EMA, EMAProfile
from gen.utils import ckpt
from gen.utils.config import ConfigError
from gen.utils.dist import print0
from gen.utils.log import StatsLog, plot_loss_curve, status_line
from gen.utils.seed import derive_seed, step_generator


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss or gradient norm stops being finite; nothing is saved after it."""


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
        grad_clip: max global gradient norm, or None for no clipping (the norm is logged anyway).
        precision: accelerate mixed precision: "no", "bf16" or "fp16".
        status_kimg / checkpoint_kimg / snapshot_kimg: intervals of the status line, training
            states (.pt, for resuming) and inference snapshots (safetensors of the EMA).
        keep_states: how many of the newest training states to keep (older ones are deleted).
        snapshot_dtype: "float32" or "bfloat16" for the snapshot tensors.
        hflip: random horizontal flips of the training images.
        seed: the run's seed (data order, noise, flips).
        compile: wrap the network in ``torch.compile``.
        num_workers: DataLoader workers for datasets that are not held in memory.
        tensorboard / progress: TensorBoard events; a tqdm bar on rank 0 (on a terminal; status
            lines otherwise).
    """

    total_kimg: float = 50.0
    batch_size: int = 64
    batch_per_gpu: int | None = None
    lr_warmup_kimg: float = 0.0
    lr_decay: Literal["constant", "inv_sqrt"] = "constant"
    lr_ref_kimg: float = 0.0
    grad_clip: float | None = None
    precision: Literal["no", "bf16", "fp16"] = "no"
    status_kimg: float = 1.0
    checkpoint_kimg: float = 10.0
    snapshot_kimg: float = 10.0
    keep_states: int = 2
    snapshot_dtype: Literal["float32", "bfloat16"] = "float32"
    hflip: bool = False
    seed: int = 0
    compile: bool = False
    num_workers: int = 0
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.total_kimg <= 0:
            raise ValueError(f"trainer.batch_size and trainer.total_kimg must be > 0 (got {self.batch_size}, {self.total_kimg})")
        for name in ("status_kimg", "checkpoint_kimg", "snapshot_kimg"):
            if getattr(self, name) <= 0:
                raise ValueError(f"trainer.{name} must be > 0, got {getattr(self, name)}")
        if self.lr_decay == "inv_sqrt" and self.lr_ref_kimg <= 0:
            raise ValueError("trainer.lr_decay=inv_sqrt needs trainer.lr_ref_kimg > 0")


@dataclass
class HookContext:
    """What a hook sees: counters, the averaged network to evaluate, the run folder."""

    nimg: int
    step: int
    net: nn.Module
    ema_net: nn.Module
    run_dir: Path
    device: torch.device
    is_final: bool


class Hook(Protocol):
    """Periodic work during training (sample grids, FID). Called on every rank (it may be collective).

    ``interval_kimg`` decides when it runs (and it always runs at the end); it returns metrics that
    are written to ``stats.jsonl`` beside the loss.
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


class _TrainModule(nn.Module):
    """Network + objective in one module, so DDP syncs the objective's own parameters too."""

    def __init__(self, net: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.objective = objective

    def forward(self, x0: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return self.objective(self.net, x0, y, generator=generator)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay only on parameters with two or more dimensions (matrices, conv kernels)."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_factor(cfg: TrainConfig, nimg: int) -> float:
    f = 1.0
    if cfg.lr_warmup_kimg > 0:
        f *= min(nimg / (cfg.lr_warmup_kimg * 1000.0), 1.0)
    if cfg.lr_decay == "inv_sqrt":
        f /= math.sqrt(max(nimg / (cfg.lr_ref_kimg * 1000.0), 1.0))
    return f


def _crossed(prev_nimg: int, nimg: int, interval_kimg: float | None) -> bool:
    """True when [prev, nimg) passed a multiple of the interval (never for None or inf)."""
    if interval_kimg is None or not math.isfinite(interval_kimg):
        return False
    interval = max(int(round(interval_kimg * 1000)), 1)
    return prev_nimg // interval != nimg // interval


class _Batches:
    """Endless training batches for one process, positioned by the global image count.

    In-memory datasets (``.tensors()``) are indexed directly; others go through a DataLoader.
    """

    def __init__(self, dataset: Any, batch: int, rank: int, world: int, seed: int, start_nimg: int, num_workers: int):
        self.sampler = InfiniteSampler(len(dataset), rank=rank, world=world, seed=seed, start=start_nimg)
        self.tensors = dataset.tensors() if hasattr(dataset, "tensors") else None
        self.batch = batch
        if self.tensors is None:
            self.loader: Iterator[Any] = iter(
                torch.utils.data.DataLoader(
                    dataset, batch_size=batch, sampler=self.sampler, num_workers=num_workers,
                    pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=num_workers > 0,
                )
            )
        else:
            self.indices = iter(self.sampler)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tensors is None:
            images, labels = next(self.loader)
            return images, torch.as_tensor(labels)
        idx = torch.tensor([next(self.indices) for _ in range(self.batch)])
        images, labels = self.tensors
        return images[idx], labels[idx]


def train(
    *,
    net: nn.Module,
    objective: nn.Module,
    dataset: Any,
    tokenizer: Any,
    optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer],
    ema_profiles: Sequence[EMAProfile],
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    config: Mapping[str, Any],
    snapshot_config: Mapping[str, Any],
    hooks: Sequence[Hook] = (),
    weight_decay: float = 0.0,
) -> TrainResult:
    """Train ``net`` with ``objective`` on ``dataset``; resumes from ``run_dir`` when it holds a state.

    Args:
        net: the backbone (plain module; wrapped for DDP here).
        objective: ``forward(net, x0, y, *, generator) -> {"loss": (B,), ...}``.
        dataset: yields (uint8 image (C,H,W), label); ``.tensors()`` when held in memory.
        tokenizer: ``encode(uint8 (B,C,H,W)) -> model input``.
        optimizer: a factory taking parameter groups (Hydra ``_partial_``).
        ema_profiles: the EMA profiles to keep; the first is used for snapshots and hooks.
        cfg: loop settings.
        run_dir: the run folder (deterministic per experiment name).
        config: the resolved run config, stored in training states and checked on resume.
        snapshot_config: metadata for inference snapshots (model config, prediction spec, data spec).
        hooks: periodic callbacks (sample grids, FID).
        weight_decay: applied to parameters with >= 2 dims only.
    """
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    accelerator = Accelerator(mixed_precision=cfg.precision, cpu=not torch.cuda.is_available())
    device = accelerator.device
    rank, world = accelerator.process_index, accelerator.num_processes
    batch_per_gpu = cfg.batch_per_gpu or cfg.batch_size // world
    rounds = cfg.batch_size // (batch_per_gpu * world) if batch_per_gpu * world else 0
    if rounds < 1 or rounds * batch_per_gpu * world != cfg.batch_size:
        raise ValueError(
            f"trainer.batch_size={cfg.batch_size} is not a multiple of batch_per_gpu={batch_per_gpu} x "
            f"{world} processes; choose batch_per_gpu so that batch_size = batch_per_gpu * processes * rounds"
        )

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale_temp_files(run_dir)
    accelerator.wait_for_everyone()

    module = _TrainModule(net, objective).to(device)
    if isinstance(tokenizer, nn.Module):
        tokenizer.to(device).eval().requires_grad_(False)
    ema = EMA(net, ema_profiles).to(device)
    opt = optimizer(param_groups(module, weight_decay))
    base_lrs = [g["lr"] for g in opt.param_groups]

    # ---- resume -------------------------------------------------------------------------------
    nimg, step = 0, 0
    resumed_from = ckpt.latest_training_state(run_dir)
    if resumed_from is not None:
        state = ckpt.load_training_state(resumed_from)
        _check_resume_config(state, config, resumed_from)
        ckpt.load_state_dict_checked(net, state["net"], str(resumed_from))
        objective.load_state_dict(state["objective"])
        ckpt.load_state_dict_checked(ema, state["ema"], str(resumed_from))
        opt.load_state_dict(state["optimizer"])
        nimg, step = int(state["nimg"]), int(state["step"])
        print0(f"Resuming from {resumed_from} at kimg {nimg / 1000:.1f} (step {step})")
    total_nimg = int(round(cfg.total_kimg * 1000))

    train_module = torch.compile(module) if cfg.compile else module
    train_module, opt = accelerator.prepare(train_module, opt)
    stats = StatsLog(run_dir, tensorboard=cfg.tensorboard, resume_nimg=nimg) if accelerator.is_main_process else None
    batches = _Batches(dataset, batch_per_gpu, rank, world, cfg.seed, nimg, cfg.num_workers)

    bar = None
    # The bar only on a terminal: in a log file its redraws would bury the status lines.
    if cfg.progress and accelerator.is_main_process and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total_nimg, initial=nimg, unit="img", unit_scale=True, dynamic_ncols=True, desc="train")

    sums: dict[str, float] = {}
    count = 0
    grad_norm = torch.zeros((), device=device)
    tick_time, tick_nimg = time.time(), nimg
    last_state = resumed_from
    last_state_nimg = nimg if resumed_from is not None else -1
    last_snapshot: Path | None = None
    metrics: dict[str, float] = {}

    def save_state() -> Path:
        nonlocal last_state_nimg
        path = run_dir / f"state-{nimg:09d}.pt"
        if accelerator.is_main_process:
            ckpt.save_training_state(
                path,
                {
                    "net": net.state_dict(),
                    "objective": objective.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "nimg": nimg,
                    "step": step,
                    "config": json.dumps(dict(config), sort_keys=True, default=str),
                },
            )
            states = [p for _, p in ckpt.list_training_states(run_dir)]
            for old in states[: -cfg.keep_states] if cfg.keep_states > 0 else []:
                old.unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        last_state_nimg = nimg
        return path

    def save_snapshots() -> Path:
        dtype = torch.bfloat16 if cfg.snapshot_dtype == "bfloat16" else torch.float32
        first = run_dir / f"snapshot-{nimg:09d}.safetensors"
        if accelerator.is_main_process:
            for i, p in enumerate(ema.profiles):
                path = first if i == 0 else run_dir / f"snapshot-{nimg:09d}-{p.name}.safetensors"
                weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in ema.averaged(p.name).state_dict().items()}
                meta = dict(snapshot_config, ema=p.name, nimg=nimg, step=step)
                ckpt.save_snapshot(path, weights, meta)
        accelerator.wait_for_everyone()
        return first

    def run_hooks(prev: int, final: bool) -> None:
        for hook in hooks:
            if final or _crossed(prev, nimg, hook.interval_kimg):
                ctx = HookContext(nimg, step, net, ema.averaged(), run_dir, device, final)
                out = dict(hook(ctx))
                metrics.update(out)
                if stats is not None and out:
                    stats.write({"kimg": nimg / 1000, "nimg": nimg, "step": step, **out})

    # ---- main loop ----------------------------------------------------------------------------
    module.train()
    while nimg < total_nimg:
        gen = step_generator(cfg.seed, rank, nimg, device=device)
        # Modules that draw from the global RNG (label dropout, dropout) are reseeded too.
        torch.manual_seed(derive_seed("global", cfg.seed, rank, nimg))
        for g in opt.param_groups:
            g["lr"] = base_lrs[opt.param_groups.index(g)] * _lr_factor(cfg, nimg)
        opt.zero_grad(set_to_none=True)
        for r in range(rounds):
            images, labels = batches.next()
            if cfg.hflip:
                images = random_hflip(images, gen)
            x0 = tokenizer.encode(images.to(device))
            y = labels.to(device=device, dtype=torch.long)
            sync = accelerator.no_sync(train_module) if r < rounds - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                out = train_module(x0, y, gen)
                loss = out["loss"].float().mean() / rounds
                accelerator.backward(loss)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach().float().sum())
            count += y.shape[0]
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")
        grad_norm = accelerator.clip_grad_norm_(module.parameters(), max_norm)
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            # Gradients are synchronised, so every rank sees the same norm and stops together.
            raise NonFiniteLossError(
                f"non-finite loss/gradient at step {step} (kimg {nimg / 1000:.3f}; last micro-batch loss "
                f"{float(loss) * rounds:.4g}). Training stopped; nothing was written after the last good "
                f"training state: {last_state or 'none yet'}. Lower the learning rate, enable "
                "trainer.grad_clip, or use fp32 (trainer.precision=no)."
            )
        opt.step()
        prev_nimg = nimg
        nimg += cfg.batch_size
        step += 1
        ema.update(net, prev_nimg, cfg.batch_size)
        if bar is not None:
            bar.update(cfg.batch_size)

        done = nimg >= total_nimg
        if _crossed(prev_nimg, nimg, cfg.status_kimg) or done:
            packed = torch.tensor([count] + [sums[k] for k in sorted(sums)], dtype=torch.float64, device=device)
            packed = accelerator.reduce(packed, reduction="sum")
            means = {k: float(v) / max(float(packed[0]), 1.0) for k, v in zip(sorted(sums), packed[1:].tolist())}
            now = time.time()
            record: dict[str, Any] = {
                "kimg": nimg / 1000,
                "nimg": nimg,
                "step": step,
                "sec_per_kimg": (now - tick_time) / max((nimg - tick_nimg) / 1000, 1e-9),
                **means,
                "grad_norm": float(grad_norm),
                "lr": opt.param_groups[0]["lr"],
            }
            if torch.cuda.is_available():
                record["mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if stats is not None:
                stats.write(record)
                if bar is not None:
                    bar.set_postfix_str(f"loss {record.get('loss', float('nan')):.4f}")
                if bar is None:
                    print0(status_line(record))
            sums, count = {}, 0
            tick_time, tick_nimg = now, nimg
        if _crossed(prev_nimg, nimg, cfg.snapshot_kimg) and not done:
            last_snapshot = save_snapshots()
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
    if accelerator.is_main_process:
        plot_loss_curve(run_dir / "stats.jsonl", run_dir / "loss.png")
    run_hooks(nimg, final=True)
    if stats is not None:
        stats.close()
    accelerator.wait_for_everyone()
    return TrainResult(nimg, step, run_dir, last_state, last_snapshot, resumed_from, metrics)


def _check_resume_config(state: Mapping[str, Any], config: Mapping[str, Any], path: Path) -> None:
    """Refuse to resume a state written by a different model / objective / data setup."""
    try:
        old = json.loads(state.get("config", "{}"))
    except json.JSONDecodeError:
        old = {}
    for key in ("model", "objective", "data", "tokenizer"):
        a, b = old.get(key), json.loads(json.dumps(config.get(key), default=str))
        if a is not None and b is not None and a != b:
            raise ConfigError(
                f"{path} was written with a different '{key}' config than this run:\n  state: {a}\n  now:   {b}\n"
                "Use another experiment name (name=...) for a new run, or delete the run folder to start over."
            )
