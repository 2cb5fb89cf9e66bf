"""Atomic checkpoint I/O: training states (.pt, tensors only) and inference snapshots (safetensors).

Training states hold everything needed to resume and are loaded with ``weights_only=True`` so a file
from elsewhere cannot run code. Snapshots hold weights plus a JSON config in the safetensors
metadata, enough to rebuild the network without the training config; :func:`build_from_snapshot`
rebuilds it without trusting that config (see there). A write that fails (a full disk) raises an
``OSError`` that names the file and leaves nothing behind.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

STATE_PATTERN = re.compile(r"^state-(\d+)\.pt$")
_OS_ERROR = re.compile(r"os error (\d+)")


class CheckpointError(RuntimeError, ValueError):
    """A training state or snapshot cannot be read or does not describe a model we can build; names the file."""

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
    try:
        write(tmp)
        # Some writers (safetensors) recreate the file with 0600, so the mode is set after writing.
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            # A failed write on an open file (a full disk) names no file; name the one being written.
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise
    return path


@contextmanager
def path_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) tied to ``path`` (the file ``.<name>.lock`` beside it).

    For processes that build, write or train the same thing: a cached network first used by two bench workers or
    two test workers at once (the one that waited re-checks ``path`` and loads the file instead of building it
    again), a records file several processes add to (read, merge, atomic replace), a run folder two benches share.
    The lock is released when its holder exits, killed or not; the empty lock file stays (hidden). Never take it
    around collective work of several ranks of one job (rank 0 alone, the others at a barrier).
    """
    import fcntl  # POSIX; the platforms this toolkit runs on

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (the identity of a snapshot or a pretrained weights file)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_training_state(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Save a dict of tensors / state dicts / plain values atomically with torch.save."""

    def write(tmp: str) -> None:
        # Through a Python file object: a full disk then raises OSError(ENOSPC) instead of torch's
        # "unexpected pos" RuntimeError, which says nothing about the cause.
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)

    return atomic_write(path, write)


def unreadable_reason(e: BaseException) -> str:
    """Why ``torch.load`` or safetensors could not read a file, as one short clause.

    torch's own text for a file of other bytes begins with advice to retry with ``weights_only=False``, i.e. to run
    the file's code; that advice is never passed on. Its zip reader's text runs on with a paragraph of guesses.
    """
    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError) and "weights_only" in text:
        m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        detail = m.group(1).strip() if m else "not a file of tensors"
        if "Unsupported global" in detail:
            return f"it holds pickled Python objects besides tensors ({detail}), which are never unpickled"
        return f"not a PyTorch file of tensors: {detail}"
    if isinstance(e, EOFError):
        return "the file ends early: it is empty or cut"
    if isinstance(e, (KeyError, IndexError)):  # the legacy unpickler meeting bytes that are no pickle at all
        return "not a PyTorch file (its bytes are no pickle)"
    first = text.splitlines()[0] if text else type(e).__name__
    return first.split(" This is an internal miniz error")[0][:200]


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training state without unpickling arbitrary objects (``weights_only=True``).

    Raises:
        CheckpointError: the file is damaged, foreign, or holds objects other than tensors and plain values.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # corrupt or foreign file
        reason = unreadable_reason(e)
        raise CheckpointError(
            f"training state {path} cannot be read ({reason}); it is damaged or not a training state of this "
            "toolkit. Delete it to resume from the previous state."
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"training state {path} holds a {type(state).__name__}, not a training state; delete it")
    return state


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

    def write(tmp: str) -> None:
        try:
            save_file(flat, tmp, metadata=meta)
        except Exception as e:  # safetensors reports I/O failures (a full disk) as its own error type
            m = _OS_ERROR.search(str(e))
            if m is None:
                raise
            code = int(m.group(1))
            raise OSError(code, os.strerror(code), str(path)) from e

    return atomic_write(path, write)


def load_snapshot(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a snapshot written by :func:`save_snapshot`; returns (tensors, config)."""
    return _read_snapshot(path, tensors=True)


def load_snapshot_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config of a snapshot without reading its tensors (cheap: for listing a run's snapshots)."""
    return _read_snapshot(path, tensors=False)[1]


def _read_snapshot(path: str | os.PathLike, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if path.is_dir():  # "does not exist" would mislead: the folder is there, it is just not a file
        newest = list_snapshots(path)
        hint = f", e.g. its newest, {newest[-1][1]}" if newest else " (a run folder holds snapshot-<nimg>.safetensors)"
        raise CheckpointError(f"snapshot {path} is a folder, not a snapshot file; give a snapshot file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"snapshot {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable safetensors snapshot ({reason}); it is damaged or not a snapshot") from e
    if "config" not in meta:
        raise CheckpointError(f"{path} has no 'config' metadata; it was not written by this toolkit's save_snapshot")
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its 'config' metadata is not valid JSON ({e}); the file is damaged") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: its 'config' metadata is not a JSON object; the file is damaged")
    return tensors, config


def check_generator_snapshot(config: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse a snapshot that is not a generator's (no ``model`` section), saying what it is and what to do.

    A tokenizer snapshot (``kind: tokenizer``: an autoencoder from ``method=kl_autoencoder`` or a converted VA-VAE)
    is the most likely mix-up: both come out of ``train.py`` as ``snapshot-<nimg>.safetensors``.

    Raises:
        CheckpointError: naming the file, its kind and the fix.
    """
    if isinstance(config.get("model"), Mapping):
        return
    if config.get("kind") == "tokenizer":
        raise CheckpointError(
            f"snapshot {path} is a tokenizer snapshot (an autoencoder), not a generator; give a generator's snapshot "
            "(a diffusion or distillation run's), or use this file as a tokenizer's weights (sample.py "
            "tokenizer_weights=..., tokenizer.weights=...)")
    raise CheckpointError(f"snapshot {path} lacks 'model' in its config metadata; it is not a generator snapshot "
                          "written by train.py")


def load_state_dict_checked(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str = "", assign: bool = False
) -> None:
    """load_state_dict(strict) with an error that lists missing, unexpected and mis-shaped keys.

    ``assign=True`` only compares (and assigns, as ``nn.Module.load_state_dict`` does), for meta-device skeletons.
    """
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
    module.load_state_dict(dict(state), strict=True, assign=assign)


# Tensors a module holds that a snapshot does not store (non-persistent buffers such as RoPE tables) may
# take at most this many values: they are derived from config numbers, not bounded by the file.
MAX_UNSTORED_NUMEL = 1 << 24


def _config_ints(value: Any, key: str) -> list[tuple[str, int]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [(key, value)]
    if isinstance(value, Mapping):
        return [kv for k, v in value.items() for kv in _config_ints(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, (list, tuple)):
        return [kv for i, v in enumerate(value) for kv in _config_ints(v, f"{key}[{i}]")]
    return []


def snapshot_int_bound(tensors: Mapping[str, torch.Tensor]) -> int:
    """The largest integer an untrusted snapshot config may hold, given the tensors actually in the file.

    Sizes of a real model appear among its tensors' dimensions (width, channels, classes + 1, tokens) and
    counts (depth, heads) are at most its number of tensors, so no honest setting exceeds the larger of the
    two (with a floor of 1024 for tiny models).
    """
    dims = [int(d) for t in tensors.values() for d in t.shape]
    return max([len(tensors), 1024, *dims])


def check_config_ints(config: Mapping[str, Any], bound: int, source: str, section: str) -> None:
    """Refuse a config holding an integer above ``bound`` before anything is built from it."""
    big = [(k, v) for k, v in _config_ints(config, section) if abs(v) > bound]
    if big:
        k, v = big[0]
        raise CheckpointError(
            f"{source}: its config sets {k}={v}, more than any size or count the file's tensors allow "
            f"(at most {bound}); the metadata does not describe these weights. Refusing to build it."
        )


def build_from_snapshot(spec: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], source: str) -> torch.nn.Module:
    """Build the module an untrusted snapshot config describes and load the file's tensors, bounded by the file.

    Nothing is allocated from the config alone: every integer in ``spec`` must be at most
    :func:`snapshot_int_bound` of the tensors; the module is then built on the meta device (no memory) and its
    state-dict names and shapes must equal the file's, and the tensors it holds beyond them (non-persistent
    buffers) must stay below ``MAX_UNSTORED_NUMEL`` values. Only then is it built for real and loaded.
    ``_target_`` is restricted to the project's packages by :func:`gen.utils.build.build`.

    Raises:
        CheckpointError / ValueError: naming ``source`` and what does not fit.
    """
    from gen.utils.build import build

    check_config_ints(spec, snapshot_int_bound(tensors), source, "model")
    with torch.device("meta"):
        skeleton = build(spec)
    if not isinstance(skeleton, torch.nn.Module):
        raise CheckpointError(f"{source}: its model config builds a {type(skeleton).__name__}, not a network")
    load_state_dict_checked(skeleton, {k: v.to("meta") for k, v in tensors.items()}, source, assign=True)
    stored = skeleton.state_dict()
    unstored = sum(b.numel() for name, b in skeleton.named_buffers() if name not in stored)
    if unstored > MAX_UNSTORED_NUMEL:
        raise CheckpointError(
            f"{source}: its model config asks for {unstored:,} values that the file does not hold (buffers derived "
            f"from the config, more than {MAX_UNSTORED_NUMEL:,}); refusing to build it"
        )
    del skeleton
    net = build(spec)
    load_state_dict_checked(net, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, source)
    return net


# ----------------------------------------------------------------------------------------------------------
# The tokenizer half of a snapshot: its settings are untrusted too (issue 17).

MAX_TOKENIZER_NUMEL = 500_000_000  # values a snapshot's tokenizer may hold (SD-VAE: 84M, VA-VAE f16d32: 70M)

_TOKENIZER_WEIGHTS: ContextVar[str | None] = ContextVar("snapshot_tokenizer_weights", default=None)


@contextmanager
def tokenizer_weights(path: str | os.PathLike | None) -> Iterator[None]:
    """Within the block, snapshots' tokenizers read their weights from ``path``, a file or folder the *user* named
    (``sample.py tokenizer_weights=...``); None leaves them without. A path in a snapshot's metadata is never read."""
    token = _TOKENIZER_WEIGHTS.set(None if path is None else os.fspath(path))
    try:
        yield
    finally:
        _TOKENIZER_WEIGHTS.reset(token)


def _bad_statistic(value: Any, positive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return not math.isfinite(value) or (positive and value <= 0)


def check_tokenizer_settings(spec: Mapping[str, Any], source: str) -> None:
    """Refuse a snapshot's tokenizer settings whose normalisation cannot be right: ``scaling_factor`` not finite
    and > 0, ``mean`` / ``std`` not lists of finite numbers (std > 0) of one length (``latent_channels`` when set).

    Raises:
        CheckpointError: naming ``source`` and the setting.
    """
    hint = "the metadata is damaged or edited; use the snapshot the run wrote"
    if "scaling_factor" in spec and _bad_statistic(spec["scaling_factor"], True):
        raise CheckpointError(f"{source}: tokenizer.scaling_factor={spec['scaling_factor']!r} must be a finite number "
                              f"> 0; {hint}")
    lengths = {}
    for key in ("mean", "std"):
        values = spec.get(key)
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or not values:
            raise CheckpointError(f"{source}: tokenizer.{key} must be a list with one number per latent channel, got "
                                  f"{values!r:.80}; {hint}")
        for i, v in enumerate(values):
            if _bad_statistic(v, key == "std"):
                need = "a finite number > 0" if key == "std" else "a finite number"
                raise CheckpointError(f"{source}: tokenizer.{key}[{i}]={v!r} must be {need}; {hint}")
        lengths[key] = len(values)
    channels = spec.get("latent_channels")
    if isinstance(channels, int) and not isinstance(channels, bool):
        lengths["latent_channels"] = channels
    if len(set(lengths.values())) > 1:
        raise CheckpointError(f"{source}: tokenizer statistics do not fit its channels "
                              f"({', '.join(f'{k}: {v}' for k, v in lengths.items())}); {hint}")


def build_snapshot_tokenizer(
    spec: Mapping[str, Any], source: str, snapshot: str | os.PathLike | None = None
) -> torch.nn.Module:
    """Build the tokenizer an untrusted snapshot's metadata describes, as :func:`build_from_snapshot` builds its
    network: nothing read or allocated on the metadata's word.

    * ``_target_`` must be a class of the ``tokenizers`` package.
    * ``weights``: a path in the metadata is never followed. The tokenizer reads the snapshot file itself (a
      tokenizer-training snapshot, ``snapshot`` given), the file or folder the user named through
      :func:`tokenizer_weights`, or, with ``weights: null``, what its class reads then (the user's cache; a
      seeded random initialisation for ``AutoencoderKLTokenizer``).
    * Statistics and scaling: :func:`check_tokenizer_settings`.
    * Size: classes whose architecture is their settings (``snapshot_meta_build``) are estimated
      (``snapshot_numel_estimate``), then built on the meta device (``snapshot_skeleton``) and refused above
      ``MAX_TOKENIZER_NUMEL`` values; the others take a fixed architecture or the one of
      their (trusted) weights.

    Raises:
        CheckpointError: naming ``source`` and what is refused.
    """
    from gen.utils.build import build, resolve

    if not isinstance(spec, Mapping) or not str(spec.get("_target_", "")).startswith("tokenizers."):
        target = spec.get("_target_") if isinstance(spec, Mapping) else spec
        raise CheckpointError(f"{source}: its tokenizer metadata names {target!r}, not a class of the tokenizers "
                              "package; refusing to build it")
    spec = dict(spec)
    granted = _TOKENIZER_WEIGHTS.get()
    named = spec.get("weights")
    own = snapshot is not None and named is not None and _same_file(named, snapshot)
    if granted is not None:
        spec["weights"] = granted
    elif named is not None and not own:
        raise CheckpointError(
            f"{source}: its tokenizer metadata names weights at {named!r}; paths in a snapshot's metadata are not "
            f"followed. If you trust that file or folder, name it yourself: sample.py tokenizer_weights=<path> "
            f"(python -m eval recon: --set weights=<path>)"
        )
    if "download" in spec:
        spec["download"] = False  # never fetch on the word of a file; the user's own caches still work
    check_tokenizer_settings(spec, source)
    cls = resolve(str(spec["_target_"]))
    if granted is not None and "weights" not in inspect.signature(cls).parameters:
        # Else the class refuses an unknown argument 'weights', which does not say which setting to drop.
        raise CheckpointError(f"{source}: its tokenizer {spec['_target_']} has no weights (e.g. pixel space), so "
                              f"tokenizer_weights={granted} has nothing to load; drop tokenizer_weights")
    if getattr(cls, "snapshot_meta_build", False):
        estimate = cls.snapshot_numel_estimate(spec)  # cheap, so that not even the meta build is a time bomb
        if estimate > MAX_TOKENIZER_NUMEL:
            raise CheckpointError(
                f"{source}: its tokenizer settings describe at least {estimate:,} values (more than "
                f"{MAX_TOKENIZER_NUMEL:,}, far beyond any published tokenizer); the metadata is damaged or edited. "
                "Refusing to build it."
            )
        try:
            skeleton = cls.snapshot_skeleton(spec)  # on the meta device
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: its tokenizer settings do not describe a network ({e})") from e
        numel = sum(t.numel() for t in skeleton.state_dict().values())
        if numel > MAX_TOKENIZER_NUMEL:
            raise CheckpointError(
                f"{source}: its tokenizer settings describe {numel:,} values (more than {MAX_TOKENIZER_NUMEL:,}, "
                f"far beyond any published tokenizer); the metadata is damaged or edited. Refusing to build it."
            )
        del skeleton
    return build(spec)


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError, ValueError):
        return False
