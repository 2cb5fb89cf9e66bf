"""Paths: coefficients, conversions (float64 round trips), shift, time samplers."""

from __future__ import annotations

import math

import pytest
import torch

from gen.paths import (
    CosinePath,
    EDMPath,
    LinearPath,
    LogitNormalTime,
    LogNormalSigma,
    Path,
    UniformTime,
    UShapedTime,
    shift_time,
)
from gen.utils.build import BuildError, build
from gen.utils.seed import BatchRandom

PATHS = [LinearPath(), CosinePath(), EDMPath(80.0)]


def _interior_times(path: Path, n: int, gen: torch.Generator) -> torch.Tensor:
    # Stay away from the endpoints where x0 or eps conversions are singular.
    return path.t_max * (0.02 + 0.96 * torch.rand(n, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_derivatives_match_finite_differences(path: Path) -> None:
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64) * path.t_max
    h = 1e-6 * path.t_max
    fd_a = (path.alpha(t + h) - path.alpha(t - h)) / (2 * h)
    fd_s = (path.sigma(t + h) - path.sigma(t - h)) / (2 * h)
    torch.testing.assert_close(path.d_alpha(t), fd_a, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(path.d_sigma(t), fd_s, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_conversions_round_trip_float64(path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    t = _interior_times(path, 6, g)
    x_t = path.sample(x0, eps, t)
    v = path.velocity(x0, eps, t)
    assert x_t.dtype == torch.float64 and v.dtype == torch.float64

    x0_r, eps_r = path.x0_eps_from_velocity(x_t, v, t)
    torch.testing.assert_close(x0_r, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_r, eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(path.velocity_from_x0(x_t, x0, t), v, rtol=0, atol=1e-9)
    torch.testing.assert_close(path.velocity_from_eps(x_t, eps, t), v, rtol=0, atol=1e-9)
    for kind, out in (("velocity", v), ("x0", x0), ("eps", eps)):
        torch.testing.assert_close(path.to_velocity(kind, x_t, out, t), v, rtol=0, atol=1e-9)
    # Score of the conditional Gaussian p(x_t | x0) is -eps / sigma; the conversion must reproduce it.
    sigma = path.sigma(t).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(path.score_from_velocity(x_t, v, t), -eps / sigma, rtol=1e-9, atol=1e-9)


def test_linear_path_closed_forms() -> None:
    path = LinearPath()
    x0, eps = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    torch.testing.assert_close(path.velocity(x0, eps, t), eps - x0)
    torch.testing.assert_close(path.sample(x0, eps, t), (1 - t[:, None]) * x0 + t[:, None] * eps)
    assert path.t_max == 1.0 and EDMPath().t_max == 80.0
    # EDM sigma_max = 80 sits at t = 80/81 on the linear path (sangyun884/rfpp network_edm.py, EDMPrecondVel).
    assert math.isclose(path.t_from_noise_ratio(torch.tensor(80.0)).item(), 80 / 81, rel_tol=1e-6)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: type(p).__name__)
def test_noise_ratio_inverse_and_log_snr(path: Path) -> None:
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64) * path.t_max
    torch.testing.assert_close(path.t_from_noise_ratio(path.noise_ratio(t)), t)
    torch.testing.assert_close(path.log_snr(t), -torch.log(path.noise_ratio(t)))
    assert bool((path.log_snr(t)[1:] < path.log_snr(t)[:-1]).all())  # SNR decreases towards noise


def test_float32_state_stays_float32_under_float64_time() -> None:
    path = CosinePath()
    x = torch.randn(3, 2, 4, 4)
    v = path.velocity(x, x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert v.dtype == torch.float32
    assert path.velocity(x.half(), x.half(), torch.full((3,), 0.5)).dtype == torch.float32


def test_path_config_round_trip() -> None:
    for p in PATHS:
        q = build(p.config)
        assert type(q) is type(p) and q.t_max == p.t_max
    assert LinearPath().config == {"_target_": "gen.paths.LinearPath"}
    assert build({"_target_": "gen.paths.EDMPath", "sigma_max": 10.0}).t_max == 10.0
    with pytest.raises(BuildError, match="has no attribute 'VPPath'"):
        build({"_target_": "gen.paths.VPPath"})


def test_shift_formula() -> None:
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    s = 3.0
    torch.testing.assert_close(shift_time(t, s), s * t / (1 + (s - 1) * t))
    assert shift_time(t, 1.0) is t
    # s > 1 pushes times towards noise, endpoints fixed; the inverse shift undoes it.
    assert bool((shift_time(t, s)[1:-1] > t[1:-1]).all())
    torch.testing.assert_close(shift_time(shift_time(t, s), 1 / s), t)
    # LightningDiT's shift 0.3 in its flipped time (data at 1) equals our shift 1/0.3.
    t_l = 1 - t
    lightning = 0.3 * t_l / (1 + (0.3 - 1) * t_l)
    torch.testing.assert_close(1 - lightning, shift_time(t, 1 / 0.3))
    with pytest.raises(ValueError):
        shift_time(t, 0.0)


def test_time_samplers_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    n = 200_000
    u = UniformTime()(BatchRandom(n, g))
    assert u.shape == (n,) and u.dtype == torch.float32 and 0 <= u.min() and u.max() <= 1
    assert abs(u.mean().item() - 0.5) < 0.005

    ln = LogitNormalTime(mean=0.5, std=1.0)(BatchRandom(n, g)).double()
    logit = torch.log(ln / (1 - ln))
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 1.0) < 0.01

    sig = LogNormalSigma(-1.2, 1.2)(BatchRandom(n, g)).double()
    assert abs(sig.log().mean().item() + 1.2) < 0.01 and abs(sig.log().std().item() - 1.2) < 0.01

    a = 4.0
    us = UShapedTime(a=a, eps=0.0)(BatchRandom(n, g)).double()
    # Compare the histogram with the density a (e^{a t} + e^{a (1 - t)}) / (2 (e^a - 1)).
    hist = torch.histc(us, bins=20, min=0, max=1) / n * 20
    centers = (torch.arange(20, dtype=torch.float64) + 0.5) / 20
    dens = a * (torch.exp(a * centers) + torch.exp(a * (1 - centers))) / (2 * math.expm1(a))
    assert (hist - dens).abs().max().item() < 0.1 * dens.max().item()
    assert abs(us.mean().item() - 0.5) < 0.01

    shifted = UniformTime(shift=3.0)(BatchRandom(n, g)).double()
    # P(t' <= 0.5) = P(t <= 0.25) for s = 3: t' = 0.5 <=> t = 0.5 / (3 - 2 * 0.5) = 0.25.
    assert abs((shifted <= 0.5).double().mean().item() - 0.25) < 0.005


def test_time_samplers_are_deterministic_under_generator() -> None:
    for s in (UniformTime(), LogitNormalTime(0.0, 1.0, shift=2.0), LogNormalSigma(-1.2, 1.2), UShapedTime(a=4.0)):
        a = s(BatchRandom(16, torch.Generator().manual_seed(5)))
        b = s(BatchRandom(16, torch.Generator().manual_seed(5)))
        c = s(BatchRandom(16, torch.Generator().manual_seed(6)))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert build(s.config).config == s.config
    assert LogitNormalTime(0.0, 1.0, shift=2.0).config == {
        "_target_": "gen.paths.LogitNormalTime", "mean": 0.0, "std": 1.0, "shift": 2.0}
    with pytest.raises(BuildError, match="LogNormalTime"):
        build({"_target_": "gen.paths.LogNormalTime"})
