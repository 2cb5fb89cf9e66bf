"""Atomic checkpoint I/O: training states (.pt, tensors only) and inference snapshots (safetensors).

Training states hold everything needed to resume and are loaded with ``weights_only=True`` so a file
from elsewhere cannot run code. Snapshots hold weights plus a JSON config in the safetensors
metadata, enough to rebuild the network without the training config.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_PATTERN = re.compile(r"^state-(\d+)\.pt$")
SNAPSHOT_PATTERN = re.compile(r"^snapshot-(\d+)\.safetensors$")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write a file through ``write(tmp_path)`` into a temp file in the same folder, then rename.

    The rename is atomic on POSIX, so a reader (or a resumed run after SIGKILL) sees either the old
    file or the complete new one, never half of it. Leftover temp files start with ``.tmp-``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    # mkstemp creates 0600; give the file the permissions a plain open() would (0666 minus umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_training_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Save a dict of tensors / state dicts / plain values atomically with torch.save."""
    return atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training state without unpickling arbitrary objects (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or foreign file
        raise RuntimeError(
            f"could not load training state {path}: {e}. Delete the file to restart from the previous state."
        ) from e


def _numbered(folder: str | os.PathLike, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), folder / m.group(0)) for f in folder.iterdir() if (m := pattern.match(f.name))]
    return sorted(found)


def list_training_states(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """All ``state-<nimg>.pt`` in ``folder`` as (nimg, path), ascending."""
    return _numbered(folder, STATE_PATTERN)


def latest_training_state(folder: str | os.PathLike) -> Path | None:
    """The training state with the highest image count in ``folder``, or None."""
    found = _numbered(folder, STATE_PATTERN)
    return found[-1][1] if found else None


def list_snapshots(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """All primary ``snapshot-<nimg>.safetensors`` in ``folder`` as (kimg, path), ascending."""
    return _numbered(folder, SNAPSHOT_PATTERN)


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete ``.tmp-*`` files left by a process killed mid-write; returns what was removed."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for f in folder.glob(".tmp-*"):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def save_snapshot(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write an inference snapshot: tensors as safetensors, ``config`` as JSON metadata."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"config": json.dumps(config, sort_keys=True), "format": "gen-snapshot-v1"}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def load_snapshot(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a snapshot written by :func:`save_snapshot`; returns (tensors, config)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"snapshot {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise RuntimeError(f"{path} is not a readable safetensors snapshot: {e}") from e
    if "config" not in meta:
        raise ValueError(f"{path} has no 'config' metadata; it was not written by this toolkit's save_snapshot")
    return tensors, json.loads(meta["config"])


def load_state_dict_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "") -> None:
    """load_state_dict(strict) with an error that lists missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if missing or unexpected or shapes:

        def head(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" ... (+{len(items) - 8} more)" if len(items) > 8 else "")

        lines = [f"weights{' from ' + source if source else ''} do not fit {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {head(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {head(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {head(shapes)}")
        lines.append("  Is this a checkpoint of another model or preset? Check the model config.")
        raise ValueError("\n".join(lines))
    module.load_state_dict(dict(state), strict=True)
