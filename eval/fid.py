"""Fréchet distance (FID, sFID, FD-DINOv2), Inception Score and improved precision/recall.

The Fréchet distance between Gaussians N(μ1, Σ1) and N(μ2, Σ2) (methods/evaluation.md §1.3) is

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


class InceptionScoreStats:
    """Sums for the Inception Score over ``splits`` fixed groups of the global image index.

    IS_k = exp(E_x KL(p(y|x) ‖ p_k(y))) over split k, and with per-split sums
    P_k = Σ_x p(y|x), H_k = Σ_x Σ_y p log p, n_k:  E KL = H_k / n_k − Σ_y p̄ log p̄,  p̄ = P_k / n_k.   (2)
    The split of image i is ⌊i · splits / N⌋ (its global index, not its process), so the score does not
    depend on the number of processes; the sums reduce with one all-reduce.
    """

    def __init__(self, num_images: int, splits: int = 10, num_classes: int = 1008) -> None:
        if num_images < splits:
            raise ValueError(f"{num_images} images cannot be cut into {splits} splits")
        self.num_images, self.splits, self.num_classes = num_images, splits, num_classes
        self.p_sum = torch.zeros(splits, num_classes, dtype=torch.float64)
        self.plogp = torch.zeros(splits, dtype=torch.float64)
        self.count = torch.zeros(splits, dtype=torch.float64)

    def update(self, logits: torch.Tensor, indices: torch.Tensor) -> None:
        """Add logits (B, C) of images with global indices (B,) in [0, num_images)."""
        p = torch.softmax(logits.to(torch.float64).cpu(), dim=1)
        split = (indices.long().cpu() * self.splits) // self.num_images
        self.p_sum.index_add_(0, split, p)
        self.plogp.index_add_(0, split, torch.special.xlogy(p, p).sum(1))
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))

    def reduce(self) -> InceptionScoreStats:
        """Sum over processes (one all-reduce)."""
        from gen.utils import dist

        buf = torch.cat([self.p_sum.flatten(), self.plogp, self.count])
        dist.all_reduce_sum(buf)
        out = InceptionScoreStats(self.num_images, self.splits, self.num_classes)
        k, c = self.splits, self.num_classes
        out.p_sum, out.plogp, out.count = buf[: k * c].view(k, c).clone(), buf[k * c : k * c + k].clone(), buf[k * c + k :].clone()
        return out

    def score(self) -> tuple[float, float]:
        """(mean, std) of IS over the splits (ADM reports the mean)."""
        if (self.count == 0).any():
            raise ValueError("some Inception Score splits are empty; were all images added?")
        pbar = self.p_sum / self.count[:, None]
        kl = self.plogp / self.count - torch.special.xlogy(pbar, pbar).sum(1)
        scores = torch.exp(kl)
        return float(scores.mean()), float(scores.std(unbiased=False))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over splits) of logits (N, 1008) held in one process."""
    s = InceptionScoreStats(logits.shape[0], splits, logits.shape[1])
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
