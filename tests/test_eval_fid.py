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
    inception_score_splits,
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


def _synthetic_logits(n: int) -> np.ndarray:
    # Confident 1008-way logits with uniformly drawn classes (IS in the 800s at 5k images, as for a
    # strong ImageNet model); RandomState's stream is frozen by numpy, so these values never change.
    rs = np.random.RandomState(7)
    labels = rs.randint(0, 1008, size=n)
    logits = rs.standard_normal((n, 1008))
    logits[np.arange(n), labels] += 14.0
    return logits


# Computed once from the official code on _synthetic_logits(12345)[:n], outside this repository:
# ADM = openai/guided-diffusion, evaluations/evaluator.py @ 22e0df8183507e13a7813f8d38d51b072ca1e67c,
# Evaluator.compute_inception_score (split_size=5000) fed a float64 numpy softmax of the same logits;
# torch-fidelity 0.4.0, torch_fidelity/metric_isc.py, isc_features_to_metric (splits=10, shuffle=True,
# rng_seed=2020) -> (mean, std).
ADM_IS = {3000: 813.5606736767118, 5000: 877.6073038801717, 10000: 876.8002700190161, 12345: 842.3935636797563}
TORCH_FIDELITY_IS = {
    3000: (245.13155691668626, 4.478628924518929),
    5000: (358.9774662166923, 6.052365762693655),
    10000: (550.7263145694426, 7.964095613977442),
    12345: (606.9095895780686, 7.793179320384927),
}


@pytest.fixture(scope="module")
def is_logits() -> torch.Tensor:
    return torch.from_numpy(_synthetic_logits(12345))


@pytest.mark.parametrize("n", [3000, 5000, 10000, 12345])
def test_inception_score_default_is_guided_diffusion(is_logits: torch.Tensor, n: int) -> None:
    # 12,345 images: ADM scores 5000 + 5000 + 2345 and averages the three scores unweighted.
    assert inception_score(is_logits[:n])[0] == pytest.approx(ADM_IS[n], rel=1e-9)


@pytest.mark.parametrize("n", [3000, 5000, 10000, 12345])
def test_inception_score_torch_fidelity_convention(is_logits: torch.Tensor, n: int) -> None:
    mean, std = inception_score(is_logits[:n], convention="torch-fidelity")
    assert mean == pytest.approx(TORCH_FIDELITY_IS[n][0], rel=1e-9)
    assert std == pytest.approx(TORCH_FIDELITY_IS[n][1], rel=1e-6)


def test_inception_score_split_layouts() -> None:
    assert torch.bincount(inception_score_splits(50000)).tolist() == [5000] * 10
    assert torch.bincount(inception_score_splits(12345)).tolist() == [5000, 5000, 2345]
    assert torch.bincount(inception_score_splits(3000)).tolist() == [3000]
    # torch-fidelity cuts at k*N//10 after its permutation: sizes 1234 or 1235, images scattered.
    tf = inception_score_splits(12345, "torch-fidelity")
    assert torch.bincount(tf).tolist() == [(k + 1) * 12345 // 10 - k * 12345 // 10 for k in range(10)]
    assert not torch.equal(tf, tf.sort().values)
    unshuffled = inception_score_splits(10, "torch-fidelity", splits=3, shuffle_seed=None)
    assert unshuffled.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]  # boundaries 0, 3, 6, 10
    with pytest.raises(ValueError, match="cannot be cut into 10 splits"):
        inception_score_splits(9, "torch-fidelity")
    with pytest.raises(ValueError, match="unknown Inception Score convention"):
        inception_score_splits(9, "tf")  # type: ignore[arg-type]


def test_inception_score_limits() -> None:
    # Confident and uniformly spread over C classes -> C; uninformative -> 1.
    onehot = torch.full((40, 4), -1e4).scatter_(1, torch.arange(40).remainder(4)[:, None], 0.0)
    assert inception_score(onehot)[0] == pytest.approx(4.0, rel=1e-6)
    assert inception_score(onehot, "torch-fidelity", splits=2, shuffle_seed=None)[0] == pytest.approx(4.0, rel=1e-6)
    assert inception_score(torch.zeros(40, 4), split_size=7)[0] == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("options", [{"split_size": 10}, {"convention": "torch-fidelity", "splits": 5}])
def test_inception_score_independent_of_accumulation_order(options: dict) -> None:
    logits = torch.randn(57, 10, dtype=torch.float64)
    a = InceptionScoreStats(57, num_classes=10, **options)
    a.update(logits, torch.arange(57))
    b = InceptionScoreStats(57, num_classes=10, **options)
    perm = torch.randperm(57)
    for idx in perm.split(8):
        b.update(logits[idx], idx)
    assert a.score()[0] == pytest.approx(b.score()[0], rel=1e-12)
    with pytest.raises(IndexError, match=r"\[0, 57\)"):
        a.update(logits[:1], torch.tensor([57]))


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
