"""Streaming feature statistics, reduced across processes, and reference statistics files.

``FeatureStats`` keeps float64 sums S1 = Σ f, S2 = Σ f fᵀ and the count n; ``reduce()`` adds them over all
processes with ONE all-reduce of a single packed float64 buffer, so the statistics (and every metric
computed from them) do not depend on how the images were split between processes. Then

    μ = S1 / n,    Σ = (S2 − n μ μᵀ) / (n − 1)            (unbiased, as np.cov)

Reference statistics are ``.npz`` files holding ``mu``, ``sigma`` (and ``mu_s``, ``sigma_s`` for sFID)
plus a JSON manifest (``manifest`` key): extractor, weights SHA-256, resize mode, feature dim, image count
and dataset. Loading compares the manifest with the extractor in use and refuses a mismatch, since FIDs
from different networks or resize modes are not comparable (clean-fid, Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation").
ADM reference batches (``arr_0`` NHWC uint8 images, ``mu``/``sigma``) are read and written too.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen.utils import dist
from gen.utils.ckpt import atomic_write

FORMAT = "gen-ref-stats-v1"
# Keys of the manifest that must agree between two statistics before they are compared.
IDENTITY_KEYS = ("extractor", "weights_sha256", "resize", "dim")


class FeatureStats:
    """Float64 running sums of features of one image set: Σf (D,), Σffᵀ (D, D) and n.

    Args:
        dim: feature dimension D.
        device: where the sums live (the extractor's device avoids copies).
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.dim = int(dim)
        self.sum = torch.zeros(self.dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device)
        self.n = 0
        self.reduced = False

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features (B, D) (any float dtype; promoted to float64 before summing)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features (B, {self.dim}), got shape {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("features contain NaN or inf; check the images and the feature network")
        f = features.to(device=self.sum.device, dtype=torch.float64)
        self.sum += f.sum(dim=0)
        # In-place S2 += fᵀf: no temporary (D, D) product and no extra pass over it (8x faster at D=2048).
        self.outer.addmm_(f.T, f)
        self.n += f.shape[0]

    def reduce(self) -> FeatureStats:
        """Sums over all processes (one all-reduce of one packed float64 buffer); a no-op copy for one process.

        Every process must call this, in the same order as other collective calls.
        """
        buf = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64, device=self.sum.device),
                         self.sum, self.outer.flatten()])
        dist.all_reduce_sum(buf)
        out = FeatureStats(self.dim, device=self.sum.device)
        out.n = int(round(buf[0].item()))
        out.sum = buf[1 : 1 + self.dim].clone()
        out.outer = buf[1 + self.dim :].view(self.dim, self.dim).clone()
        out.reduced = True
        return out

    def mu(self) -> np.ndarray:
        """Mean μ = S1 / n, float64 (D,)."""
        if self.n < 1:
            raise ValueError("no features were accumulated")
        return (self.sum / self.n).cpu().numpy()

    def sigma(self) -> np.ndarray:
        """Unbiased covariance Σ = (S2 − n μμᵀ) / (n − 1), float64 (D, D), symmetrised."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        cov = 0.5 * (cov + cov.T)  # S2 is symmetric up to rounding of the batched products
        return cov.cpu().numpy()

    def gaussian(self, manifest: dict[str, Any] | None = None) -> GaussianStats:
        """The (μ, Σ, n) summary with a manifest."""
        return GaussianStats(mu=self.mu(), sigma=self.sigma(), n=self.n, manifest=dict(manifest or {}))


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set.

    Attributes:
        mu: float64 (D,).
        sigma: float64 (D, D).
        n: number of images (0 when unknown, e.g. ADM files).
        manifest: extractor name, weights_sha256, resize, dim, dataset, ...
        extra: further named arrays (e.g. ``mu_s``, ``sigma_s`` of sFID), saved alongside.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    manifest: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def check_compatible(ref: dict[str, Any], used: dict[str, Any], what: str = "reference statistics") -> None:
    """Refuse to compare features of different extractors, weights, resize modes or dimensions.

    Raises:
        ValueError: listing every differing key with both values.
    """
    diffs = [
        f"{k}: {ref.get(k)!r} in the {what} vs {used.get(k)!r} in use"
        for k in IDENTITY_KEYS
        if k in ref or k in used
        if ref.get(k) != used.get(k)
    ]
    if diffs:
        raise ValueError(
            f"the {what} were made with a different feature extractor setup, so the metric would be "
            f"meaningless: " + "; ".join(diffs) + ". Recompute them with the same extractor (python -m eval ref ...)."
        )


def save_stats(path: str | os.PathLike, stats: GaussianStats) -> Path:
    """Write ``.npz`` with mu, sigma, any extra arrays and the JSON manifest (atomically)."""
    manifest = {"format": FORMAT, **stats.manifest, "num_images": int(stats.n), "dim": stats.dim}
    arrays = {"mu": stats.mu.astype(np.float64), "sigma": stats.sigma.astype(np.float64)}
    arrays.update({k: np.asarray(v) for k, v in stats.extra.items()})
    arrays["manifest"] = np.array(json.dumps(manifest, sort_keys=True))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object keeps numpy from appending another ".npz"
            np.savez(f, **arrays)

    return atomic_write(path, write)


def load_stats(
    path: str | os.PathLike, expect: dict[str, Any] | None = None, assume_manifest: dict[str, Any] | None = None
) -> GaussianStats:
    """Read a statistics ``.npz`` (ours, or ADM/pytorch-fid style with just mu and sigma).

    Args:
        path: the file.
        expect: the manifest of the extractor in use; a mismatch raises ``ValueError``.
        assume_manifest: for files without a manifest (ADM, pytorch-fid), what they are known to be;
            without it such a file is refused when ``expect`` is given.
    """
    path = Path(path)
    with open_npz(path, "reference statistics", "make them with `python -m eval ref ...`") as data:
        if "mu" not in data.files or "sigma" not in data.files:
            raise ValueError(f"{path} has no mu/sigma arrays (keys: {data.files}); it is not a statistics file")
        mu = _float_array(path, "mu", read_array(data, "mu", path))
        sigma = _float_array(path, "sigma", read_array(data, "sigma", path))
        manifest = None
        if "manifest" in data.files:
            try:
                manifest = json.loads(str(read_array(data, "manifest", path)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: its manifest is not valid JSON ({e}); recompute the file with `python -m eval ref`") from e
            if not isinstance(manifest, dict):
                raise ValueError(f"{path}: its manifest is not a JSON object; recompute the file with `python -m eval ref`")
        extra = {k: _float_array(path, k, read_array(data, k, path)) for k in ("mu_s", "sigma_s") if k in data.files}
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    for name, arr in (("mu", mu), ("sigma", sigma), *extra.items()):
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: {name} contains NaN or inf; recompute the file with `python -m eval ref`")
    if extra:
        if set(extra) != {"mu_s", "sigma_s"} or extra["sigma_s"].shape != (extra["mu_s"].shape[0],) * 2 or extra["mu_s"].ndim != 1:
            shapes = {k: v.shape for k, v in extra.items()}
            raise ValueError(f"{path}: sFID arrays must be mu_s (D,) and sigma_s (D, D) together, got {shapes}")
    if manifest is None:
        if assume_manifest is None and expect is not None:
            raise ValueError(
                f"{path} has no manifest, so it cannot be checked against the extractor in use "
                f"({expect.get('extractor')}, resize {expect.get('resize')}); pass assume_manifest "
                f"(CLI: --assume-ref-extractor) if you know how it was made (e.g. ADM files: Inception, tf1-bilinear)."
            )
        manifest = {**(assume_manifest or {}), "assumed": True}
        manifest.setdefault("dim", int(mu.shape[0]))
    if expect is not None:
        check_compatible(manifest, expect, what=f"reference statistics {path.name}")
    n = manifest.get("num_images", 0)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"{path}: manifest num_images is {n!r}, expected a count; recompute the file with `python -m eval ref`")
    return GaussianStats(mu=mu, sigma=sigma, n=n, manifest=manifest, extra=extra)


# ----------------------------------------------------------------------------------------------
# Image arrays (ADM reference / sample batches).


def check_image_array(arr: np.ndarray, source: str = "images") -> np.ndarray:
    """Validate an ADM-style image array: uint8 (N, H, W, C) with C in {1, 3} and values in [0, 255].

    Raises:
        ValueError/TypeError: with what was found and how to fix it.
    """
    if arr.dtype != np.uint8:
        rng = f" with values in [{arr.min()}, {arr.max()}]" if arr.size and np.issubdtype(arr.dtype, np.number) else ""
        raise TypeError(
            f"{source}: expected uint8 images in [0, 255], got dtype {arr.dtype}{rng}. Convert float images "
            f"in [-1, 1] with (x * 127.5 + 128).clip(0, 255).astype(uint8) (round to nearest, no truncation)."
        )
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        hint = " (it looks like NCHW; transpose to NHWC)" if arr.ndim == 4 and arr.shape[1] in (1, 3) else ""
        raise ValueError(f"{source}: expected images (N, H, W, C) with C in (1, 3), got shape {arr.shape}{hint}")
    if arr.shape[0] == 0:
        raise ValueError(f"{source}: no images")
    if arr.max() <= 1:
        raise ValueError(
            f"{source}: uint8 images whose values are all 0 or 1; they were probably scaled to [0, 1] before the "
            f"cast to uint8. Expected values in [0, 255]."
        )
    return arr


def load_image_npz(path: str | os.PathLike, key: str = "arr_0") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (N, C, H, W) uint8 and labels (``arr_1`` if present, else None) from an ADM-style ``.npz``."""
    path = Path(path)
    with open_npz(path, "image batch", "give an ADM-style .npz with arr_0 uint8 (N, H, W, C)") as data:
        if key not in data.files:
            raise ValueError(f"{path} has no {key!r} array (keys: {data.files}); expected ADM-style arr_0 uint8 (N, H, W, C)")
        arr = check_image_array(read_array(data, key, path), source=str(path))
        labels = None
        if "arr_1" in data.files:
            y = read_array(data, "arr_1", path)
            if y.shape != (arr.shape[0],) or not np.issubdtype(y.dtype, np.integer):
                raise ValueError(
                    f"{path}: arr_1 (labels) must be {arr.shape[0]} integers, one per image of arr_0, got "
                    f"{y.dtype} {y.shape}; fix or drop arr_1"
                )
            labels = torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2))), labels


def save_image_npz(
    path: str | os.PathLike,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    stats: GaussianStats | None = None,
) -> Path:
    """Write an ADM-style batch: ``arr_0`` uint8 (N, H, W, C), optional ``arr_1`` labels and mu/sigma."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    arrays: dict[str, np.ndarray] = {"arr_0": images.permute(0, 2, 3, 1).contiguous().cpu().numpy()}
    if labels is not None:
        arrays["arr_1"] = labels.cpu().numpy().astype(np.int64)
    if stats is not None:
        arrays["mu"], arrays["sigma"] = stats.mu, stats.sigma
        arrays.update(stats.extra)
        arrays["manifest"] = np.array(json.dumps({"format": FORMAT, **stats.manifest, "num_images": stats.n}))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


# ----------------------------------------------------------------------------------------------
# Reading .npz files: every failure names the file and says what it should be.


@contextlib.contextmanager
def open_npz(path: str | os.PathLike, what: str, hint: str) -> Iterator[Any]:
    """``np.load`` of an ``.npz`` archive without pickles; a missing, damaged or foreign file raises one clear error.

    Args:
        path: the file.
        what: what it should hold, e.g. "reference statistics", for the message.
        hint: how to get a good one.

    Raises:
        FileNotFoundError / ValueError: naming the file, what is wrong and ``hint``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} not found; {hint}")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder, not an .npz file; {hint}")
    with open(path, "rb") as f:  # unreadable (permissions, I/O): the OSError says so
        magic = f.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise ValueError(f"{what} {path} is a single .npy array, not an .npz archive of named arrays; {hint}")
    if not magic.startswith(b"PK"):  # np.load would try to unpickle anything that is neither zip nor .npy
        kind = "empty" if not magic else "not an .npz (zip) archive"
        raise ValueError(f"{what} {path} is {kind}; {hint}")
    try:
        data = np.load(path, allow_pickle=False)
    except OSError as e:
        if e.errno is not None:  # unreadable (permissions, I/O): not a format problem
            raise
        raise ValueError(f"{what} {path} is not a readable .npz file ({e}); {hint}") from e
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{what} {path} is not a readable .npz file ({type(e).__name__}: {e}); {hint}") from e
    with data:
        yield data


def read_array(data: Any, key: str, path: str | os.PathLike) -> np.ndarray:
    """One array of an open ``.npz``; a damaged member or a pickled (object) array raises naming the file."""
    try:
        return data[key]
    except ValueError as e:  # numpy refuses object arrays when allow_pickle=False
        raise ValueError(f"{path}: array {key!r} cannot be read without unpickling ({e}); store plain numeric arrays") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{path}: array {key!r} is damaged ({type(e).__name__}: {e}); the file is truncated or corrupt") from e


def _float_array(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{path}: {key} has dtype {arr.dtype}, expected floating-point numbers")
    return arr.astype(np.float64)
