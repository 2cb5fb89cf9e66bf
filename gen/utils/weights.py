"""Pretrained weights files: found on this machine, verified by hash, downloaded only when asked.

Shared by the feature extractors (``eval.features``), the tokenizers and LPIPS (``gen.nn.lpips``). A file is
looked up at an explicit path, then in the cache folders, and fetched only with ``download=True``; a missing
file raises :class:`WeightsNotFoundError` naming the file, its expected SHA-256 and where to put it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


class WeightsNotFoundError(FileNotFoundError):
    """A pretrained weights file is not on this machine (message says which, its hash and where to put it)."""


def weights_cache_dir() -> Path:
    """``${GEN_CACHE:-~/.cache/gen}/weights``: where pretrained feature-network files are looked up."""
    return Path(os.environ.get("GEN_CACHE", Path.home() / ".cache" / "gen")).expanduser() / "weights"


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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
        torch.hub.download_url_to_file(url, str(path), progress=False)
        return resolve_weights(filename, expected_sha256, None, None, cache, False)
    raise WeightsNotFoundError(
        f"pretrained weights {filename} (SHA-256 {expected_sha256 or 'not pinned'}) not found. Looked in: "
        + ", ".join(str(p) for p in candidates)
        + f". Put the file in {cache} (or set GEN_CACHE), pass its path explicitly"
        + (f", or allow downloading it from {url} (download=True) on a machine with internet." if url else ".")
    )


