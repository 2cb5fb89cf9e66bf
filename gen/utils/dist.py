"""Process-group helpers that also work in a plain single process.

Rank and world size come from the initialised process group when there is one, else from the
launcher's environment variables (torchrun / accelerate set RANK, WORLD_SIZE, LOCAL_RANK).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def default_device() -> torch.device:
    """CUDA device of this local rank when available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def resolve_device(kind: str, key: str = "device") -> torch.device:
    """This process's device for a setting ``auto | cpu | cuda | cuda:N``, named ``key`` in messages.

    ``cuda`` without CUDA is an error, never a silent fallback to the CPU; ``cuda`` means this process's local GPU.
    """
    from gen.utils.config import ConfigError

    try:
        dev = torch.device("cuda" if kind == "auto" and torch.cuda.is_available() else "cpu" if kind == "auto" else kind)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{key}={kind!r} is not a device; use auto, cpu or cuda") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"{key}={kind!r}: only auto, cpu and cuda[:N] are supported")
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}={kind} but CUDA is not available here; use {key}=auto or cpu")
    if dev.index is None:
        return default_device()
    if dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{key}={kind}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def init_distributed(timeout_s: float = 1800.0) -> None:
    """Initialise the default process group from the environment when launched with several processes.

    Uses NCCL on GPUs and gloo on CPU. A no-op for a single process or when already initialised.
    """
    if is_initialized() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes in place (identity for one process) and return it.

    gloo does not reduce float64 on every build, and NCCL needs CUDA tensors, so the tensor is moved
    to the backend's device for the reduction and copied back.
    """
    if not is_initialized() or world_size() == 1:
        return tensor
    backend = dist.get_backend()
    device = default_device() if backend == "nccl" else torch.device("cpu")
    buf = tensor.to(device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    tensor.copy_(buf)
    return tensor


def print0(*args: object, **kwargs: object) -> None:
    """print() on rank 0 only; flushes so logs interleave sensibly under launchers."""
    if is_main():
        print(*args, **kwargs, flush=True)  # type: ignore[call-overload]
        sys.stdout.flush()
