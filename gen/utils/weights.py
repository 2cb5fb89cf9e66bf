"""Pretrained weights files: found on this machine, verified by hash, downloaded only when asked.

Shared by the feature extractors (``eval.features``), the tokenizers and LPIPS (``gen.nn.lpips``). A file is
looked up at an explicit path, then in the cache folders, and fetched only with ``download=True``; a missing
file raises :class:`WeightsNotFoundError` naming the file, its expected SHA-256 and where to put it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from gen.utils.ckpt import file_sha256, unreadable_reason  # one file hash and one read-error clause


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained weights file is not on this machine (message says which, its hash and where to put it)."""


def weights_cache_dir() -> Path:
    """``${GEN_CACHE:-~/.cache/gen}/weights``: where pretrained feature-network files are looked up."""
    return Path(os.environ.get("GEN_CACHE", Path.home() / ".cache" / "gen")).expanduser() / "weights"


def resolve_weights(
    filename: str,
    expected_sha256: str | None,
    url: str | None,
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> tuple[Path, str]:
    """Find a pretrained weights file and return (path, its SHA-256).

    Search order: ``weights_path`` (any file is accepted, e.g. a custom conversion; its hash is recorded),
    then ``cache_dir`` (default ``weights_cache_dir()``) and torch.hub's checkpoint folder under
    ``filename``, which must match ``expected_sha256`` when that is known (a full hex digest, or a prefix
    of one: torch.hub file names such as ``vgg16-397923af.pth`` carry the first 8 digits). With ``download=True`` a
    missing file is fetched from ``url`` into ``cache_dir`` and verified.

    Raises:
        WeightsNotFoundError: no file; the message names it, its expected hash and the folders searched.
        ValueError: a cached file with the wrong hash (a truncated or foreign download).
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"weights file {path} does not exist (expected the file {filename}, SHA-256 "
                f"{expected_sha256 or 'not pinned'}{'; download it from ' + url if url else ''})"
            )
        return path, file_sha256(path)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else weights_cache_dir()
    candidates = [cache / filename, Path(torch.hub.get_dir()) / "checkpoints" / filename]
    for path in candidates:
        if path.is_file():
            sha = file_sha256(path)
            if expected_sha256 is not None and not sha.startswith(expected_sha256):
                raise ValueError(
                    f"{path} has SHA-256 {sha}, expected {expected_sha256}; the file is damaged or not "
                    f"the original {filename}. Delete it and fetch it again, or pass it as an explicit path."
                )
            return path, sha
    if download and url is not None:
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / filename
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as e:  # offline, proxy, HTTP error: say what to fetch by hand
            raise WeightsNotFoundError(
                f"could not download {url} ({type(e).__name__}: {e}). Fetch {filename} on a machine with internet "
                f"and put it in {cache}, or pass its path explicitly."
            ) from e
        return resolve_weights(filename, expected_sha256, None, None, cache, False)
    raise WeightsNotFoundError(
        f"pretrained weights {filename} (SHA-256 {expected_sha256 or 'not pinned'}) not found. Looked in: "
        + ", ".join(str(p) for p in candidates)
        + f". Put the file in {cache} (or set GEN_CACHE), pass its path explicitly"
        + (f", or allow downloading it from {url} (download=True) on a machine with internet." if url else ".")
    )


def first_line(e: BaseException) -> str:
    """The first line of an exception message (its type name when empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def state_dict_misfit(module: nn.Module, state: dict[str, torch.Tensor]) -> str:
    """Empty when ``state`` fits ``module`` exactly, else a short account of missing, extra and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
             ((missing, "missing keys"), (extra, "unexpected keys"), (shapes, "keys of another shape")) if keys]
    return ", ".join(parts)


def load_weights_file(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or ``.pt/.pth`` file (``weights_only``: no code runs).

    Raises:
        ValueError: naming the file and ``what`` it should hold, when it is damaged or not a state dict.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch/safetensors signal foreign or truncated files with many exception types
        if isinstance(e, OSError) and e.errno is not None:  # unreadable (permissions, I/O), not damaged
            raise
        # torch's own message suggests weights_only=False, i.e. running the file's code; it is not repeated here.
        reason = f"damaged, or not a state dict of tensors (other objects are never unpickled, for safety): {unreadable_reason(e)}"
        if path.suffix == ".safetensors":
            reason = f"not a valid safetensors file: {first_line(e)}"
        raise ValueError(f"weights file {path} is not a readable weights file ({reason}); expected {what}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors; expected {what}")
    return state
