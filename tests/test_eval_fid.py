"""Exactness of the Fréchet distance, Inception Score and precision/recall (eval.fid)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from eval.fid import (
    InceptionScoreStats,
    SingularCovarianceError,
    fid_from_stats,
    frechet_distance,
    inception_score,
    precision_recall,
    trace_sqrt_product,
)
from eval.stats import FeatureStats, GaussianStats


def _random_gaussian(rng: np.random.Generator, d: int, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((d, rank or 2 * d)) * rng.uniform(0.1, 3.0, size=(d, 1))
    return rng.standard_normal(d), a @ a.T / a.shape[1]


def _scipy_fd(mu1, s1, mu2, s2) -> float:
    # Independent float64 reference: the textbook formula with scipy's general matrix square root.
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize("d", [8, 64, 256])
def test_frechet_matches_scipy_sqrtm(d: int) -> None:
    rng = np.random.default_rng(d)
    mu1, s1 = _random_gaussian(rng, d)
    mu2, s2 = _random_gaussian(rng, d)
    ours, ref = frechet_distance(mu1, s1, mu2, s2), _scipy_fd(mu1, s1, mu2, s2)
    assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_trace_sqrt_is_symmetric_in_arguments() -> None:
    rng = np.random.default_rng(1)
    _, s1 = _random_gaussian(rng, 32)
    _, s2 = _random_gaussian(rng, 32)
    assert trace_sqrt_product(s1, s2) == pytest.approx(trace_sqrt_product(s2, s1), rel=1e-10)


def test_fid_of_a_set_with_itself_is_zero() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(500, 64, generator=g) * torch.linspace(0.1, 5, 64) + 3.0
    st = FeatureStats(64)
    for chunk in feats.split(77):
        st.update(chunk)
    gs = st.gaussian()
    assert abs(fid_from_stats(gs, gs)) < 1e-6
    # A singular covariance (rank 9 in 64 dims) still gives 0 with itself, never NaN.
    low = FeatureStats(64)
    low.update(feats[:10])
    lg = low.gaussian()
    assert 0.0 <= frechet_distance(lg.mu, lg.sigma, lg.mu, lg.sigma) < 1e-6


def test_frechet_closed_form_for_shifted_isotropic_gaussians() -> None:
    # N(0, a²I) vs N(m, b²I): d² = |m|² + D (a - b)².
    d, a, b = 16, 1.5, 0.5
    m = np.full(d, 0.25)
    got = frechet_distance(np.zeros(d), a**2 * np.eye(d), m, b**2 * np.eye(d))
    assert got == pytest.approx(float(m @ m) + d * (a - b) ** 2, rel=1e-12)


def test_singular_covariance_refused_with_reason_unless_allowed() -> None:
    st = FeatureStats(32)
    st.update(torch.randn(20, 32, dtype=torch.float64))
    g = st.gaussian()
    with pytest.raises(SingularCovarianceError, match=r"rank at most n - 1 = 19 < 32"):
        fid_from_stats(g, g)
    assert fid_from_stats(g, g, allow_singular=True) < 1e-6


def test_bad_covariances_raise_instead_of_nan() -> None:
    d = 8
    mu = np.zeros(d)
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(mu, np.full((d, d), np.nan), mu, np.eye(d))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        frechet_distance(mu, -np.eye(d), mu, np.eye(d))
    asym = np.eye(d)
    asym[0, 1] = 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(mu, asym, mu, np.eye(d))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(mu, np.eye(d), np.zeros(d + 1), np.eye(d + 1))


def test_fid_refuses_statistics_of_another_extractor() -> None:
    st = FeatureStats(4)
    st.update(torch.randn(50, 4, dtype=torch.float64))
    a = st.gaussian({"extractor": "inception-v3-pool3", "weights_sha256": "x", "resize": "tf1-bilinear", "dim": 4})
    b = GaussianStats(a.mu, a.sigma, a.n, {**a.manifest, "resize": "bilinear-antialias"})
    with pytest.raises(ValueError, match="resize"):
        fid_from_stats(a, b)


def _is_reference(logits: np.ndarray, splits: int) -> list[float]:
    # Direct per-split formula exp(mean_x KL(p(y|x) || p(y))), float64.
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    out = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        out.append(float(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean())))
    return out


def test_inception_score_matches_direct_formula_and_limits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((100, 20)) * 3
    mean, std = inception_score(torch.from_numpy(logits), splits=10)
    ref = _is_reference(logits, 10)
    assert mean == pytest.approx(np.mean(ref), rel=1e-10)
    assert std == pytest.approx(np.std(ref), rel=1e-8)
    # Confident and uniformly spread over C classes -> C; uninformative -> 1.
    onehot = torch.full((40, 4), -1e4).scatter_(1, torch.arange(40).remainder(4)[:, None], 0.0)
    assert inception_score(onehot, splits=2)[0] == pytest.approx(4.0, rel=1e-6)
    assert inception_score(torch.zeros(40, 4), splits=2)[0] == pytest.approx(1.0, rel=1e-12)


def test_inception_score_independent_of_accumulation_order() -> None:
    logits = torch.randn(57, 10, dtype=torch.float64)
    a = InceptionScoreStats(57, splits=5, num_classes=10)
    a.update(logits, torch.arange(57))
    b = InceptionScoreStats(57, splits=5, num_classes=10)
    perm = torch.randperm(57)
    for idx in perm.split(8):
        b.update(logits[idx], idx)
    assert a.score()[0] == pytest.approx(b.score()[0], rel=1e-12)


def test_precision_recall_extremes() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=g)
    p, r = precision_recall(real, real.clone(), k=3, batch=64)
    assert p == 1.0 and r == 1.0
    far = torch.randn(150, 8, generator=g) + 100.0
    assert precision_recall(real, far, k=3) == (0.0, 0.0)
    # Fakes collapsed onto a small part of the real data: precise but low recall.
    plane = torch.randn(1000, 2, generator=g)
    collapsed = plane[plane[:, 0] > 1.0]
    p, r = precision_recall(plane, collapsed, k=3)
    assert p == 1.0 and r < 0.5
