"""Fréchet distance (FID, sFID, FD-DINOv2), Inception Score and improved precision/recall.

The Fréchet distance between Gaussians N(μ1, Σ1) and N(μ2, Σ2) (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule") is

    d² = ‖μ1 − μ2‖² + Tr Σ1 + Tr Σ2 − 2 Tr (Σ1 Σ2)^{1/2}.                                   (1)

Only the trace of the square root is needed. Σ1 Σ2 is similar to the symmetric PSD matrix
M = Σ1^{1/2} Σ2 Σ1^{1/2}, so Tr (Σ1 Σ2)^{1/2} = Σ_i sqrt(λ_i(M)) (§1.4, "symmetric form"). We compute it in
float64 with two symmetric eigendecompositions: R = Σ1^{1/2} from ``eigh(Σ1)``, M = R Σ2 R symmetrised,
then ``eigvalsh(M)``; in both, eigenvalues below the rounding floor D·eps·max|λ| (including the slightly
negative ones a PSD matrix gets from rounding) are set to 0 before the square root. Unlike ``sqrtm`` of the non-symmetric product, this never produces complex numbers, and it
stays accurate for singular Σ. Inputs that are not (numerically) symmetric PSD, or a non-finite result,
raise instead of returning NaN.

A covariance of n images has rank at most n − 1, so with n ≤ D it is singular; the distance is then
dominated by the missing directions and strongly biased. The metric entry points refuse that unless
``allow_singular=True``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch

from eval.stats import GaussianStats, check_compatible


class SingularCovarianceError(ValueError):
    """Too few images for the feature dimension: the covariance is singular (rank ≤ n − 1 < D)."""


def _check_gaussian(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu has shape {mu.shape} and sigma {sigma.shape}; expected (D,) and (D, D)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu or sigma contains NaN or inf")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if np.abs(sigma - sigma.T).max() > 1e-6 * scale:
        raise ValueError(f"{name}: sigma is not symmetric (max asymmetry {np.abs(sigma - sigma.T).max():.3g})")


def _noise_floor(w: np.ndarray) -> float:
    # Eigenvalues of a D x D symmetric matrix are accurate to about D * eps * max|λ|; below that they are
    # rounding noise. They are set to 0 before square roots, because sqrt amplifies noise: a null
    # direction with λ = 1e-15 would add 3e-8 to Tr √M, and a singular Σ has hundreds of them.
    return float(w.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(w).max()), 0.0))


def _psd_sqrt(sigma: np.ndarray, name: str) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    # A large negative eigenvalue means the input is not a covariance; small ones are rounding.
    if w.min() < -1e-6 * max(float(w.max()), 0.0) - 1e-12:
        raise ValueError(f"{name}: sigma is not positive semi-definite (smallest eigenvalue {w.min():.3g})")
    w = np.where(w > _noise_floor(w), w, 0.0)
    return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr (Σ1 Σ2)^{1/2} via the symmetric form Σ1^{1/2} Σ2 Σ1^{1/2} (float64).

    Eigenvalues below the rounding floor D·eps·max|λ| count as 0 (see ``_noise_floor``).
    """
    r = _psd_sqrt(np.asarray(sigma1, dtype=np.float64), "sigma1")
    m = r @ np.asarray(sigma2, dtype=np.float64) @ r
    m = 0.5 * (m + m.T)
    lam = np.linalg.eigvalsh(m)
    lam = np.where(lam > _noise_floor(lam), lam, 0.0)
    return float(np.sqrt(lam).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance (1) between N(μ1, Σ1) and N(μ2, Σ2), in float64.

    Args:
        mu1, mu2: means (D,).
        sigma1, sigma2: covariances (D, D), symmetric PSD.

    Returns:
        d² ≥ 0 as a Python float. A tiny negative value from rounding (|d²| below 1e-10 of the traces) is
        returned as 0; anything else non-finite or negative raises.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    _check_gaussian(mu1, sigma1, "first")
    _check_gaussian(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    diff = mu1 - mu2
    traces = float(np.trace(sigma1) + np.trace(sigma2))
    d2 = float(diff @ diff) + traces - 2.0 * trace_sqrt_product(sigma1, sigma2)
    if not math.isfinite(d2):
        raise FloatingPointError(f"Fréchet distance is not finite ({d2}); inputs: traces {traces}")
    if d2 < 0:
        if d2 < -1e-10 * max(traces, 1e-300):
            raise FloatingPointError(f"Fréchet distance came out negative ({d2:.3g}) beyond rounding")
        d2 = 0.0
    return d2


def check_enough_images(n: int, dim: int, what: str, allow_singular: bool = False) -> None:
    """Refuse n ≤ D images: their covariance has rank ≤ n − 1 < D, i.e. it is singular.

    Raises:
        SingularCovarianceError: unless ``allow_singular``.
    """
    if n <= dim and not allow_singular:
        raise SingularCovarianceError(
            f"{what}: {n} images for {dim}-dimensional features. A covariance of n images has rank at most "
            f"n - 1 = {n - 1} < {dim}, so it is singular and the Fréchet distance is dominated by the "
            f"unobserved directions (strongly biased, not comparable). Use more than {dim} images (FID is "
            f"conventionally reported at 10k-50k), or pass allow_singular=True (CLI: --allow-singular) for "
            f"a smoke test."
        )


def fid_from_stats(a: GaussianStats, b: GaussianStats, allow_singular: bool = False, check_manifest: bool = True) -> float:
    """Fréchet distance between two statistics, after checking that they are comparable.

    Args:
        a, b: the two statistics (e.g. samples and reference).
        allow_singular: accept n ≤ D images (biased; smoke tests only).
        check_manifest: refuse statistics of different extractors, weights or resize modes.
    """
    if check_manifest and a.manifest and b.manifest:
        check_compatible(b.manifest, a.manifest, what="second statistics")
    for s, what in ((a, "first statistics"), (b, "second statistics")):
        if s.n:  # ADM-style files do not record n
            check_enough_images(s.n, s.dim, what, allow_singular)
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ----------------------------------------------------------------------------------------------
# Inception Score (reducible form).

ISConvention = Literal["adm", "torch-fidelity"]
ADM_SPLIT_SIZE = 5000
TORCH_FIDELITY_SPLITS = 10
TORCH_FIDELITY_SEED = 2020


def inception_score_splits(
    num_images: int,
    convention: ISConvention = "adm",
    *,
    split_size: int = ADM_SPLIT_SIZE,
    splits: int = TORCH_FIDELITY_SPLITS,
    shuffle_seed: int | None = TORCH_FIDELITY_SEED,
) -> torch.Tensor:
    """The split of every image of a set, by its global index: long (num_images,) with values in [0, K).

    Conventions (the score is the unweighted mean of the per-split scores in both):

    - ``adm``: consecutive groups of ``split_size`` images in index order, the last one holding the
      remainder, so 50k images give 10 splits, 10k give 2, 12,345 give 5000 + 5000 + 2345, and fewer than
      ``split_size`` give one (openai/guided-diffusion, evaluations/evaluator.py,
      ``Evaluator.compute_inception_score``). This is the number papers report.
    - ``torch-fidelity``: the images are permuted with ``numpy.random.RandomState(shuffle_seed).permutation``
      (no permutation when ``shuffle_seed`` is None), then cut into ``splits`` groups at the boundaries
      ``k·N // splits`` (toshas/torch-fidelity, torch_fidelity/metric_isc.py, ``isc_features_to_metric``,
      defaults ``isc_splits=10``, ``samples_shuffle=True``, ``rng_seed=2020``).
    """
    if num_images < 1:
        raise ValueError(f"the Inception Score needs at least one image, got num_images={num_images}")
    if convention == "adm":
        if split_size < 1:
            raise ValueError(f"split_size must be positive, got {split_size}")
        return torch.arange(num_images) // split_size
    if convention == "torch-fidelity":
        if not 1 <= splits <= num_images:
            raise ValueError(f"{num_images} images cannot be cut into {splits} splits (torch-fidelity convention)")
        if shuffle_seed is None:
            position = torch.arange(num_images)
        else:
            perm = torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(num_images))
            position = torch.empty(num_images, dtype=torch.long)
            position[perm] = torch.arange(num_images)  # image perm[j] sits at position j after shuffling
        # Position j lies in chunk k iff floor(k N / s) <= j < floor((k + 1) N / s), i.e. k = (s (j + 1) - 1) // N.
        return (splits * (position + 1) - 1) // num_images
    raise ValueError(f"unknown Inception Score convention {convention!r}; use 'adm' or 'torch-fidelity'")


class InceptionScoreStats:
    """Sums for the Inception Score over splits of the global image index, reducible across processes.

    IS_k = exp(E_x KL(p(y|x) ‖ p_k(y))) over split k, and with per-split sums
    P_k = Σ_x p(y|x), H_k = Σ_x Σ_y p log p, n_k:  E KL = H_k / n_k − Σ_y p̄ log p̄,  p̄ = P_k / n_k.   (2)
    The split of image i depends only on its global index (``inception_score_splits``), not on its
    process or batch, so the score does not depend on the number of processes; the sums reduce with one
    all-reduce. The reported score is the unweighted mean over splits, as in both reference codes.

    Args:
        num_images: N, the size of the whole (global) image set.
        num_classes: logit width (1008 for the TF Inception graph).
        convention: ``adm`` (default, split_size images per split) or ``torch-fidelity`` (``splits``
            shuffled splits); see ``inception_score_splits``.
    """

    def __init__(
        self,
        num_images: int,
        num_classes: int = 1008,
        convention: ISConvention = "adm",
        *,
        split_size: int = ADM_SPLIT_SIZE,
        splits: int = TORCH_FIDELITY_SPLITS,
        shuffle_seed: int | None = TORCH_FIDELITY_SEED,
    ) -> None:
        self.split_of = inception_score_splits(
            num_images, convention, split_size=split_size, splits=splits, shuffle_seed=shuffle_seed
        )
        self.num_images, self.num_classes, self.convention = num_images, num_classes, convention
        self._options = dict(split_size=split_size, splits=splits, shuffle_seed=shuffle_seed)
        self.splits = int(self.split_of.max()) + 1
        self.p_sum = torch.zeros(self.splits, num_classes, dtype=torch.float64)
        self.plogp = torch.zeros(self.splits, dtype=torch.float64)
        self.count = torch.zeros(self.splits, dtype=torch.float64)

    def update(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """Add logits (B, C) of images with global indices (B,) in [0, num_images)."""
        indices = indices.long().cpu()
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_images):
            raise IndexError(f"image indices must lie in [0, {self.num_images}), got [{int(indices.min())}, {int(indices.max())}]")
        p = torch.softmax(logits.to(torch.float64).cpu(), dim=1)
        split = self.split_of[indices]
        self.p_sum.index_add_(0, split, p)
        self.plogp.index_add_(0, split, torch.special.xlogy(p, p).sum(1))
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))

    def reduce(self) -> InceptionScoreStats:
        """Sum over processes (one all-reduce)."""
        from gen.utils import dist

        buf = torch.cat([self.p_sum.flatten(), self.plogp, self.count])
        dist.all_reduce_sum(buf)
        out = InceptionScoreStats(self.num_images, self.num_classes, self.convention, **self._options)  # type: ignore[arg-type]
        k, c = self.splits, self.num_classes
        out.p_sum, out.plogp, out.count = buf[: k * c].view(k, c).clone(), buf[k * c : k * c + k].clone(), buf[k * c + k :].clone()
        return out

    def score(self) -> tuple[float, float]:
        """(mean, std) of IS over the splits; ADM reports the mean, torch-fidelity also the (population) std."""
        if (self.count == 0).any():
            raise ValueError("some Inception Score splits are empty; were all images added?")
        pbar = self.p_sum / self.count[:, None]
        kl = self.plogp / self.count - torch.special.xlogy(pbar, pbar).sum(1)
        scores = torch.exp(kl)
        return float(scores.mean()), float(scores.std(unbiased=False))


def inception_score(
    logits: torch.Tensor, convention: ISConvention = "adm", **options: Any
) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of logits (N, 1008) held in one process.

    ``options`` are ``split_size`` (adm), ``splits`` and ``shuffle_seed`` (torch-fidelity).
    """
    s = InceptionScoreStats(logits.shape[0], logits.shape[1], convention, **options)
    s.update(logits, torch.arange(logits.shape[0]))
    return s.score()


# ----------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkäänniemi et al. 2019).


def _kth_nn_radius(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    radii = []
    for i in range(0, x.shape[0], batch):
        d = torch.cdist(x[i : i + batch], x)  # (b, N)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int) -> float:
    inside = []
    for i in range(0, queries.shape[0], batch):
        d = torch.cdist(queries[i : i + batch], centres)  # (b, M)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, batch: int = 1024, dtype: torch.dtype = torch.float32
) -> tuple[float, float]:
    """Improved precision and recall with k-NN hyperspheres in feature space.

    Precision = fraction of fake features inside some real feature's k-NN sphere; recall = fraction of
    real features inside some fake feature's sphere. Distances are computed in blocks of ``batch`` rows
    (memory O(batch · N)), in float32 by default (ADM uses fp16).

    Args:
        real: (N, D) features of real images.
        fake: (M, D) features of generated images.
        k: neighbourhood size (3 as ADM and torch-fidelity).
    """
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set")
    real, fake = real.to(dtype), fake.to(dtype)
    precision = _coverage(fake, real, _kth_nn_radius(real, k, batch), batch)
    recall = _coverage(real, fake, _kth_nn_radius(fake, k, batch), batch)
    return precision, recall
