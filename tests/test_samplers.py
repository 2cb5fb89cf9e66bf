"""Samplers against closed forms: Gaussian data has an exact velocity field and an affine ODE flow map."""

from __future__ import annotations

import ast
import math
from pathlib import Path as FsPath

import pytest
import torch

from gen.paths import CosinePath, EDMPath, LinearPath, Path, shift_time
from gen.utils.seed import PerImageRandom
from samplers import (
    cfg,
    karras_grid,
    log_snr_grid,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
    shifted_grid,
    uniform_grid,
)
from samplers.heun import heun_nfe

MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
COV = torch.tensor([[1.0, 0.6], [0.6, 0.5]], dtype=torch.float64)  # correlation 0.85


class GaussianVelocity:
    """Exact velocity ``E[alpha' x0 + sigma' eps | x_t]`` for data ``N(mu, cov)`` on any path (x of shape (B, 2)).

    Gaussian conditioning with ``C_t = alpha^2 cov + sigma^2 I``:
    ``E[x0 | x] = mu + alpha cov C_t^{-1} (x - alpha mu)``, ``E[eps | x] = sigma C_t^{-1} (x - alpha mu)``.
    """

    def __init__(self, path: Path, mu: torch.Tensor = MU, cov: torch.Tensor = COV) -> None:
        self.path, self.mu, self.cov = path, mu, cov
        self.lam, self.U = torch.linalg.eigh(cov)
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        self.calls += 1
        x = x.double()
        t = t.double()
        a, s = self.path.alpha(t)[:, None], self.path.sigma(t)[:, None]
        da, ds = self.path.d_alpha(t)[:, None], self.path.d_sigma(t)[:, None]
        r = x - a * self.mu
        # C_t^{-1} r in the eigenbasis of cov (batch of different t).
        z = r @ self.U
        c = a**2 * self.lam + s**2
        cinv_r = (z / c) @ self.U.T
        ex0 = self.mu + a * (cinv_r @ self.cov)
        eeps = s * cinv_r
        return da * ex0 + ds * eeps

    def flow_map(self, x: torch.Tensor, t_from: float, t_to: float) -> torch.Tensor:
        """Exact ODE map: in the eigenbasis, ``x - alpha mu`` scales by ``sqrt(c(t_to) / c(t_from))``."""
        tf, tt = torch.tensor(t_from, dtype=torch.float64), torch.tensor(t_to, dtype=torch.float64)
        af, sf = self.path.alpha(tf), self.path.sigma(tf)
        at, st = self.path.alpha(tt), self.path.sigma(tt)
        scale = torch.sqrt((at**2 * self.lam + st**2) / (af**2 * self.lam + sf**2))
        z = (x - af * self.mu) @ self.U
        return at * self.mu + (z * scale) @ self.U.T


def gaussian_noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_moments(x: torch.Tensor, mu_tol: float, cov_tol: float) -> None:
    mean = x.mean(0)
    cov = torch.cov(x.T)
    assert (mean - MU).abs().max().item() < mu_tol, mean
    assert (cov - COV).abs().max().item() < cov_tol, cov


def fit_order(errors: list[float], steps: list[int]) -> float:
    ls = torch.tensor([math.log(s) for s in steps], dtype=torch.float64)
    le = torch.tensor([math.log(e) for e in errors], dtype=torch.float64)
    ls_c = ls - ls.mean()
    return -float((ls_c * (le - le.mean())).sum() / (ls_c**2).sum())


# ----------------------------------------------------------------------------------------------------------
# Layering


def test_samplers_import_only_paths_and_utils() -> None:
    root = FsPath(__file__).resolve().parents[1] / "samplers"
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top == "gen":
                    assert name == "gen.paths" or name.startswith("gen.utils"), f"{f.name} imports {name}"
                assert top not in {"eval", "distill", "tokenizers", "hydra", "omegaconf"}, f"{f.name} imports {name}"


# ----------------------------------------------------------------------------------------------------------
# Grids


def test_grid_endpoints_and_monotonicity() -> None:
    for ts in (uniform_grid(10), uniform_grid(10, t_min=0.01), shifted_grid(10, 3.0), karras_grid(10),
               karras_grid(10, path=LinearPath()), uniform_grid(5, 80.0)):
        assert ts.dtype == torch.float64 and ts.ndim == 1
        assert ts[-1].item() == 0.0 and bool((ts[1:] < ts[:-1]).all())
    assert len(uniform_grid(10)) == 11 and uniform_grid(10)[0].item() == 1.0
    torch.testing.assert_close(uniform_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    ts = uniform_grid(5, t_min=0.1)
    assert len(ts) == 6 and ts[-2].item() == pytest.approx(0.1) and ts[0].item() == 1.0
    k = karras_grid(18)
    assert len(k) == 19 and k[0].item() == 80.0 and k[-2].item() == pytest.approx(0.002)
    # Karras: uniform in sigma^(1/rho).
    d = torch.diff(k[:-1] ** (1 / 7))
    torch.testing.assert_close(d, d[0].expand_as(d))
    kl = karras_grid(18, path=LinearPath())
    torch.testing.assert_close(kl[:-1], k[:-1] / (1 + k[:-1]))
    with pytest.raises(ValueError):
        uniform_grid(0)
    with pytest.raises(ValueError):
        shifted_grid(4, 2.0, t_max=80.0)


def test_shifted_grid_is_shift_of_uniform() -> None:
    s = 1 / 0.3
    torch.testing.assert_close(shifted_grid(8, s), torch.cat([shift_time(uniform_grid(8)[:-1], s),
                                                             torch.zeros(1, dtype=torch.float64)]))
    ts = shifted_grid(8, s, t_max=0.9)
    assert ts[0].item() == 0.9 and ts[-1].item() == 0.0
    # A shift > 1 concentrates steps near noise: the first interval is shorter than the uniform one.
    assert (ts[0] - ts[1]).item() < 0.9 / 8


# ----------------------------------------------------------------------------------------------------------
# Deterministic solvers on Gaussian data


@pytest.mark.parametrize(
    "sampler,steps",
    [(sample_euler, 200), (sample_heun, 20), (sample_dpmpp_2m, 20)],
    ids=["euler", "heun", "dpmpp_2m"],
)
def test_ode_samplers_recover_gaussian_moments(sampler, steps) -> None:
    model = GaussianVelocity(LinearPath())
    x = sampler(model, gaussian_noise(20_000, 0), uniform_grid(steps), path=LinearPath())
    # Sampling error of the mean ~ sqrt(1 / 20000) = 0.007; allow ~4 standard errors.
    assert_moments(x, mu_tol=0.03, cov_tol=0.04)


@pytest.mark.parametrize("path", [LinearPath(), CosinePath()], ids=["linear", "cosine"])
@pytest.mark.parametrize("sampler,order", [(sample_euler, 1.0), (sample_heun, 2.0)], ids=["euler", "heun"])
def test_ode_convergence_order(path, sampler, order) -> None:
    model = GaussianVelocity(path)
    noise = gaussian_noise(512, 1)
    exact = model.flow_map(noise, path.t_max, 0.0)
    steps = [8, 16, 32, 64]
    errors = []
    for n in steps:
        x = sampler(model, noise, uniform_grid(n, path.t_max), path=path)
        errors.append((x - exact).norm(dim=1).mean().item())
    slope = fit_order(errors, steps)
    assert order - 0.2 < slope < order + 0.3, (slope, errors)


def test_dpmpp_2m_second_order_in_log_snr_and_path_invariant() -> None:
    # On a grid uniform in lambda = log(alpha / sigma) that stops at t_min > 0, the error against the exact flow
    # map falls at order 2; the solver only sees lambda, so all paths give the same trajectory up to x / alpha.
    noise = gaussian_noise(512, 1)
    finals = {}
    for path in (LinearPath(), CosinePath(), EDMPath()):
        model = GaussianVelocity(path)
        steps, errors = [16, 32, 64, 128], []
        for n in steps:
            lam = torch.linspace(-3.0, 4.0, n + 1, dtype=torch.float64)
            ts = path.t_from_noise_ratio(torch.exp(-lam))
            exact = model.flow_map(noise * path.sigma(ts[0]), ts[0].item(), ts[-1].item())
            x = sample_dpmpp_2m(model, noise, ts, path=path)
            errors.append((x - exact).norm(dim=1).mean().item())
        slope = fit_order(errors, steps)
        assert 1.8 < slope < 2.3, (slope, errors)
        finals[type(path).__name__] = x / path.alpha(ts[-1])
    torch.testing.assert_close(finals["LinearPath"], finals["EDMPath"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(finals["CosinePath"], finals["EDMPath"], rtol=1e-9, atol=1e-9)


def test_dpmpp_2m_beats_euler_at_equal_nfe() -> None:
    model = GaussianVelocity(LinearPath())
    noise = gaussian_noise(512, 1)
    exact = model.flow_map(noise, 1.0, 0.0)
    err = {f.__name__: (f(model, noise, uniform_grid(16), path=LinearPath()) - exact).norm(dim=1).mean().item()
           for f in (sample_euler, sample_dpmpp_2m)}
    assert err["sample_dpmpp_2m"] < 0.2 * err["sample_euler"], err


# Reference values from the official DPM-Solver (LuChengTHU/dpm-solver, dpm_solver_pytorch.py at commit
# 52bc3fbcd5de56d60917b826b15d2b69460fc2fa), run outside this repository in float64 on the Gaussian above and the
# linear path (its noise schedule given alpha = 1 - t, sigma = t, lambda and the inverse of lambda):
# DPM_Solver(noise model = E[eps | x], algorithm_type="dpmsolver++").sample(sigma(t_T) * DPM_NOISE, steps=nfe - 1,
# t_start=80/81, t_end=0.002/1.002, order=2, skip_type="logSNR", method="multistep", lower_order_final=lof,
# denoise_to_zero=True). Its denoise_to_zero step is our interval into t = 0, so NFE matches.
DPM_NOISE = torch.tensor([[0.3, -1.2], [1.5, 0.7], [-0.8, 0.1]], dtype=torch.float64)
DPM_OFFICIAL = {
    (4, True): [[0.818001232956259, -2.28996550973245], [2.04795366754932, -1.33426822131573],
                [0.579931814644328, -2.19778545769893]],
    (6, True): [[0.779541542754151, -2.5050340058246], [2.56539254636252, -1.02627066684659],
                [0.352153815920751, -2.2572332116655]],
    (8, True): [[0.782453636804484, -2.57282484917308], [2.68802248853903, -0.958123662673374],
                [0.293407166840276, -2.26238191785799]],
    (10, True): [[0.783508275611331, -2.58929162361286], [2.71687521256838, -0.94223873126734],
                 [0.279438714302375, -2.26331867468277]],
    # 10 solver steps: the official code no longer lowers the order (its test is `steps < 10`).
    (11, True): [[0.784499567493847, -2.59259519956218], [2.72056489116462, -0.94055249425931],
                 [0.277313145781356, -2.26280184855646]],
    (6, False): [[0.775247078015075, -2.54269819327904], [2.64943967192421, -0.977029729993113],
                 [0.314382525729304, -2.265437871324]],
}
# get_time_steps("logSNR", 80/81, 0.002/1.002, N=5) of the same run: our log_snr_grid(6) without its final 0.
DPM_OFFICIAL_LOGSNR_TS = [0.9876543209876543, 0.9057403688545937, 0.5357819126974506, 0.12175078313500343,
                          0.016378347237546245, 0.0019960079840319364]


@pytest.mark.parametrize("nfe,lof", list(DPM_OFFICIAL), ids=[f"nfe{n}-{'lof' if lof else 'nolof'}"
                                                             for n, lof in DPM_OFFICIAL])
def test_dpmpp_2m_matches_official_solver(nfe: int, lof: bool) -> None:
    path = LinearPath()
    ts = log_snr_grid(nfe, path=path)
    kwargs = {} if lof else {"lower_order_final": False}  # the default is the official one
    x = sample_dpmpp_2m(GaussianVelocity(path), DPM_NOISE, ts, path=path, **kwargs)
    torch.testing.assert_close(x, torch.tensor(DPM_OFFICIAL[nfe, lof], dtype=torch.float64), rtol=0, atol=1e-10)


def test_log_snr_grid_is_uniform_in_lambda_and_second_order_for_dpmpp_2m() -> None:
    path = LinearPath()
    ts = log_snr_grid(6, path=path)
    torch.testing.assert_close(ts[:-1], torch.tensor(DPM_OFFICIAL_LOGSNR_TS, dtype=torch.float64), rtol=1e-13, atol=0)
    assert len(ts) == 7 and ts[-1].item() == 0.0
    lam = path.log_snr(ts[:-1])
    torch.testing.assert_close(torch.diff(lam), torch.full((5,), (math.log(80.0) - math.log(0.002)) / 5,
                                                           dtype=torch.float64))
    torch.testing.assert_close(log_snr_grid(6)[:-1], ts[:-1] / (1 - ts[:-1]))  # EDM sigma = t / (1 - t)
    from pipeline import SamplerSpec

    spec = SamplerSpec.from_config({"solver": {"_target_": "samplers.sample_dpmpp_2m"}, "steps": 6,
                                    "grid": {"_target_": "samplers.grids.log_snr_grid"}})
    torch.testing.assert_close(spec.time_grid(path), ts, rtol=0, atol=0)

    # Order 2 against the exact solution of the same problem: the flow to the last positive time, then E[x0 | x].
    model, noise = GaussianVelocity(path), gaussian_noise(512, 1)
    steps, errors = [16, 32, 64, 128], []
    for n in steps:
        ts = log_snr_grid(n, path=path)
        t_min = ts[-2].item()
        x_min = model.flow_map(noise * ts[0], ts[0].item(), t_min)
        x0_hat, _ = path.x0_eps_from_velocity(x_min, model(x_min, torch.full((512,), t_min), None), t_min)
        errors.append((sample_dpmpp_2m(model, noise, ts, path=path) - x0_hat).norm(dim=1).mean().item())
    slope = fit_order(errors, steps)
    assert 1.8 < slope < 2.3, (slope, errors)


@pytest.mark.parametrize(
    "path,diffusion,last_step",
    [(LinearPath(), "sigma", "euler"), (LinearPath(), "sigma", "mean"), (LinearPath(), "constant", "euler"),
     (CosinePath(), "sigma", "euler")],
    ids=["linear-sigma-euler", "linear-sigma-mean", "linear-constant-euler", "cosine-sigma-euler"],
)
def test_euler_maruyama_recovers_gaussian_moments(path, diffusion, last_step) -> None:
    model = GaussianVelocity(path)
    g = torch.Generator().manual_seed(7)
    x = sample_euler_maruyama(
        model, gaussian_noise(20_000, 0), uniform_grid(200), path=path,
        randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype),
        diffusion=diffusion, last_step=last_step,
    )
    assert_moments(x, mu_tol=0.03, cov_tol=0.04)


# Reference values from SiT's SDE sampler (willisma/SiT transport/transport.py Sampler.sample_sde, integrators.py sde,
# path.py compute_diffusion, at commit 947f95bd3a510e9af441d38c1e9f72e0eee873c5), run outside this repository in
# float64: Transport(velocity, Linear or GVP path, sample_eps=1e-3), sample_sde(sampling_method="Euler",
# diffusion_form=form, diffusion_norm=norm, last_step="Mean", last_step_size=0.04, num_steps=20), model(x, t) =
# -v(x, 1 - t) of the Gaussian above (its data at t = 1), initial state sigma * SDE_NOISE at its t0 (1e-3 for SBDM,
# else 0), after torch.manual_seed(0) (the step noise is th.randn, float64). Their t in [t0, 0.96] plus the last step
# of 0.04 is our uniform_grid(20, 1 - t0, t_min=0.04). SiT's "increasing-decreasing" key is spelled
# "inccreasing-decreasing" there.
SDE_NOISE = DPM_NOISE
SIT_SDE = {
    ("linear", "sigma", 1.0): [[-0.013042598521578, -2.33179696031924], [1.1738188252301, -1.59883338473533],
                               [0.490184605672028, -1.87405319573661]],
    ("linear", "SBDM", 1.0): [[-0.392947968963139, -2.46072085084888], [1.35040942647561, -1.53437600368],
                              [1.12686257159372, -1.46965861128989]],
    ("linear", "linear", 2.0): [[-0.166147521486879, -2.43448401561567], [1.01927935174999, -1.76131625446941],
                                [0.738120235233462, -1.66571199970554]],
    ("linear", "decreasing", 0.5): [[0.230512855086879, -2.40024525921223], [1.35327201131433, -1.4770957143953],
                                    [0.330177882842931, -2.00891493916345]],
    ("linear", "increasing-decreasing", 1.0): [[-0.412055825070093, -2.43353029134007],
                                               [1.93909746385283, -1.1722106210038],
                                               [0.820258326139919, -1.63443567057513]],
    # 20 steps are far too few where the SBDM diffusion (pi / 2) tan(pi t / 2) is large; the values still pin it.
    ("cosine", "SBDM", 0.5): [[2.97081883724157, 0.251926271806383], [-9.01212663502067, -7.87686577871318],
                              [1.66381106582788, -1.61713671666427]],
    ("cosine", "decreasing", 1.0): [[0.609993724374552, -2.46774057844838], [1.32978455538969, -1.52553628211906],
                                    [0.253532890810198, -2.24034511856048]],
}


@pytest.mark.parametrize("case", list(SIT_SDE), ids=["-".join(map(str, c)) for c in SIT_SDE])
def test_euler_maruyama_matches_sit_sde_sampler(case) -> None:
    kind, form, norm = case
    path = LinearPath() if kind == "linear" else CosinePath()
    t0 = 1e-3 if form == "SBDM" else 0.0
    g = torch.Generator().manual_seed(0)
    x = sample_euler_maruyama(
        GaussianVelocity(path), SDE_NOISE, uniform_grid(20, 1.0 - t0, t_min=0.04), path=path,
        randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype),
        diffusion=form, diffusion_norm=norm, last_step="mean",
    )
    torch.testing.assert_close(x, torch.tensor(SIT_SDE[case], dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("form", ["sigma", "constant", "SBDM", "linear", "decreasing", "increasing-decreasing"])
def test_euler_maruyama_mean_last_step_closed_form(form: str) -> None:
    # SiT's "Mean" last step: x + drift * 0.04 with drift = v_SiT + w s (transport.py __get_last_step). In our time,
    # with E[x0 | x], E[eps | x] of the Gaussian and s = -E[eps | x] / t on the linear path, it is
    # x - 0.04 (E[eps] - E[x0] + w E[eps] / t) at t = 0.04, with w from SiT's formulas (path.py compute_diffusion)
    # at SiT time 0.96, norm 0.8.
    t, n = 0.04, 0.8
    t_sit = 1.0 - t
    w = {"sigma": n * (1 - t_sit), "constant": n, "SBDM": n * (1 / t_sit * (1 - t_sit) ** 2 + (1 - t_sit)),
         "linear": n * (1 - t_sit), "decreasing": 0.25 * (n * math.cos(math.pi * t_sit) + 1) ** 2,
         "increasing-decreasing": n * math.sin(math.pi * t_sit) ** 2}[form]
    path = LinearPath()
    x = gaussian_noise(6, 9) * 0.3 + MU
    # Gaussian conditioning: C = alpha^2 cov + sigma^2 I, E[eps | x] = sigma C^-1 (x - alpha mu),
    # E[x0 | x] = mu + alpha cov C^-1 (x - alpha mu).
    a, s = 1 - t, t
    cinv = torch.linalg.inv(a**2 * COV + s**2 * torch.eye(2, dtype=torch.float64))
    r = (x - a * MU) @ cinv.T
    e_eps, e_x0 = s * r, MU + a * r @ COV.T
    want = x - t * (e_eps - e_x0 + w * e_eps / t)
    got = sample_euler_maruyama(GaussianVelocity(path), x / t, torch.tensor([t, 0.0], dtype=torch.float64),
                                path=path, diffusion=form, diffusion_norm=n, last_step="mean")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_diffusion_forms_refuse_bad_settings() -> None:
    from samplers.sde import diffusion_coefficient

    assert diffusion_coefficient(LinearPath(), 1.0, "SBDM") == math.inf
    assert diffusion_coefficient(EDMPath(), 2.0, "SBDM") == pytest.approx(2.0)  # sigma sigma' on the EDM path
    with pytest.raises(ValueError, match="t_max"):
        diffusion_coefficient(EDMPath(), 2.0, "decreasing")
    with pytest.raises(ValueError, match="unknown diffusion form"):
        diffusion_coefficient(LinearPath(), 0.5, "sbdm")
    with pytest.raises(ValueError, match="infinite at t = 1.0"):
        sample_euler_maruyama(GaussianVelocity(LinearPath()), gaussian_noise(2, 0), uniform_grid(4),
                              path=LinearPath(), diffusion="SBDM")


def test_euler_maruyama_is_stochastic_and_zero_diffusion_is_euler() -> None:
    model = GaussianVelocity(LinearPath())
    noise = gaussian_noise(64, 4)
    ts = uniform_grid(10)
    a = sample_euler_maruyama(model, noise, ts, path=LinearPath())
    b = sample_euler_maruyama(model, noise, ts, path=LinearPath())
    assert not torch.allclose(a, b)
    ode = sample_euler_maruyama(model, noise, ts, path=LinearPath(), diffusion="constant", diffusion_norm=0.0)
    torch.testing.assert_close(ode, sample_euler(model, noise, ts, path=LinearPath()))


def test_per_image_noise_makes_sde_samples_batch_independent() -> None:
    model = GaussianVelocity(LinearPath())
    ts = uniform_grid(8)

    def run(seeds: list[int]) -> torch.Tensor:
        rnd = PerImageRandom(seeds)
        noise = rnd.randn((2,), dtype=torch.float64)
        return sample_euler_maruyama(model, noise, ts, path=LinearPath(), randn_like=rnd.randn_like)

    both = run([10, 11])
    torch.testing.assert_close(run([11])[0], both[1], rtol=0, atol=0)


def test_heun_nfe_accounting_and_callback() -> None:
    model = GaussianVelocity(LinearPath())
    seen = []
    sample_heun(model, gaussian_noise(4, 0), uniform_grid(7), path=LinearPath(), callback=seen.append)
    assert model.calls == heun_nfe(7) == 13
    assert [d["i"] for d in seen] == list(range(7)) and seen[0]["t"] == 1.0
    assert set(seen[0]) >= {"x", "i", "t", "denoised"}
    model.calls = 0
    sample_euler(model, gaussian_noise(4, 0), uniform_grid(7), path=LinearPath())
    assert model.calls == 7


def test_edm_path_heun_with_karras_grid() -> None:
    # EDM time is sigma; the prior x = sigma_max * noise ignores the data term (mu is tiny next to 80).
    path = EDMPath(80.0)
    model = GaussianVelocity(path)
    x = sample_heun(model, gaussian_noise(20_000, 2), karras_grid(32), path=path)
    assert_moments(x, mu_tol=0.04, cov_tol=0.05)


# Reference values from EDM's sampler (NVlabs/edm generate.py ``edm_sampler`` at commit
# 008a4e5316c8e3bfe61a62f874bddba254295afb), run outside this repository in float64 on the Gaussian above with
# net(x, sigma) = E[x0 | x] on the EDM path, latents EDM_NOISE, the default Karras grid (sigma 80 -> 0.002, rho 7) and
# randn_like drawing float64 from torch.Generator().manual_seed(0).
EDM_NOISE = DPM_NOISE
EDM_CHURN = {
    # (num_steps, S_churn, S_min, S_max, S_noise): samples
    (16, 40.0, 0.05, 50.0, 1.003): [[0.666119092589325, -2.23336770463164], [0.728754638496205, -1.83372081466194],
                                    [2.32865408856821, -1.19685289690547]],
    (16, 3.0, 0.0, math.inf, 1.0): [[0.815750290391345, -2.33279307698354], [0.301095201475622, -2.07249842983761],
                                    [1.42150191652614, -1.58382725615208]],
}


@pytest.mark.parametrize("setting", list(EDM_CHURN), ids=["gamma-capped-in-range", "gamma-3/16-everywhere"])
def test_heun_churn_matches_edm_sampler(setting) -> None:
    # gamma = min(S_churn / N, sqrt(2) - 1): 40 / 16 is capped at 0.414, 3 / 16 = 0.1875 is not. EDM draws the churn
    # noise at every step, also outside [S_min, S_max], so the random streams (and the samples) agree.
    n, churn, s_min, s_max, s_noise = setting
    g = torch.Generator().manual_seed(0)
    path = EDMPath()
    model = GaussianVelocity(path)
    x = sample_heun(model, EDM_NOISE, karras_grid(n), path=path, s_churn=churn, s_min=s_min, s_max=s_max,
                    s_noise=s_noise, randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    torch.testing.assert_close(x, torch.tensor(EDM_CHURN[setting], dtype=torch.float64), rtol=0, atol=1e-10)
    assert model.calls == heun_nfe(n)  # churn costs no evaluations


def test_heun_churn_on_the_linear_path_is_edm_churn_in_noise_ratio() -> None:
    # On a scaled path the churn raises EDM's sigma = sigma_t / alpha_t (t / (1 - t) here) and acts on x / alpha as on
    # EDM's x (NVlabs/edm generate.py ablation_sampler with scaling s = alpha): the model sees
    # x_hat = (alpha_hat / alpha) x + alpha_hat sqrt(r_hat^2 - r^2) z at t_hat.
    lin, seen = LinearPath(), []
    ts = karras_grid(4, path=lin)
    noise = gaussian_noise(3, 5)
    z = gaussian_noise(3, 6)
    sample_heun(GaussianVelocity(lin), noise, ts, path=lin, s_churn=1.0, randn_like=lambda x: z, callback=seen.append)
    t0, r0 = ts[0].item(), ts[0].item() / (1 - ts[0].item())
    r_hat = r0 * (1 + 0.25)  # gamma = 1 / 4 steps
    t_hat = r_hat / (1 + r_hat)
    assert seen[0]["t"] == pytest.approx(t_hat, rel=1e-14)
    want = (1 - t_hat) / (1 - t0) * (t0 * noise) + (1 - t_hat) * math.sqrt(r_hat**2 - r0**2) * z
    torch.testing.assert_close(seen[0]["x"], want)
    # Without churn (the default), Heun is deterministic and ignores randn_like.
    a = sample_heun(GaussianVelocity(lin), noise, ts, path=lin, randn_like=lambda x: 1 / 0)
    torch.testing.assert_close(a, sample_heun(GaussianVelocity(lin), noise, ts, path=lin, s_churn=0.0))
    with pytest.raises(ValueError, match="s_churn"):
        sample_heun(GaussianVelocity(lin), noise, ts, path=lin, s_churn=-1.0)


def test_sampler_determinism_and_dtype() -> None:
    model = GaussianVelocity(LinearPath())
    noise = gaussian_noise(8, 3).float()
    a = sample_heun(model, noise, uniform_grid(5), path=LinearPath())
    b = sample_heun(model, noise, uniform_grid(5), path=LinearPath())
    assert a.dtype == torch.float32 and torch.equal(a, b)
    with pytest.raises(ValueError):
        sample_euler(model, noise, torch.tensor([0.0, 1.0]), path=LinearPath())


# ----------------------------------------------------------------------------------------------------------
# Guidance


def _label_model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A toy conditional velocity whose output depends on x, t and the label (null label = 4)."""
    return x * (1 + t.reshape(-1, 1, 1, 1)) + y.double().reshape(-1, 1, 1, 1) * torch.arange(
        1.0, x.shape[1] + 1, dtype=x.dtype
    ).reshape(1, -1, 1, 1)


def test_cfg_scale_one_is_conditional_and_formula() -> None:
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    t = torch.full((3,), 0.5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(cfg(_label_model, 1.0, 4)(x, t, y), _label_model(x, t, y))
    v_c, v_u = _label_model(x, t, y), _label_model(x, t, torch.full_like(y, 4))
    torch.testing.assert_close(cfg(_label_model, 3.0, 4)(x, t, y), v_u + 3.0 * (v_c - v_u))
    torch.testing.assert_close(cfg(_label_model, 0.0, 4)(x, t, y), v_u)
    # Legacy DiT mode: only the first 3 channels guided, the rest conditional.
    legacy = cfg(_label_model, 3.0, 4, dit_legacy_channels=3)(x, t, y)
    torch.testing.assert_close(legacy[:, :3], (v_u + 3.0 * (v_c - v_u))[:, :3])
    torch.testing.assert_close(legacy[:, 3:], v_c[:, 3:])


def test_cfg_batches_branches_in_one_call() -> None:
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return _label_model(x, t, y)

    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    cfg(model, 2.0, 4)(x, torch.full((3,), 0.5, dtype=torch.float64), torch.tensor([0, 1, 2]))
    assert calls == [6]


def test_guidance_interval_open_and_closed_ends() -> None:
    from samplers.grids import uniform_grid
    from samplers.guidance import in_interval, parse_interval

    t = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.0], dtype=torch.float64)
    assert in_interval(t, (0.3, 0.7)).tolist() == [False, True, True, True, False]
    assert in_interval(t, (0.3, 0.7, "[]")).tolist() == [False, True, True, True, False]
    assert in_interval(t, (0.3, 0.7, "[)")).tolist() == [False, False, True, True, False]
    assert in_interval(t, (0.3, 0.7, "(]")).tolist() == [False, True, True, False, False]
    assert in_interval(t, (0.3, 0.7, "()")).tolist() == [False, False, True, False, False]
    # Ends that a grid hits in exact arithmetic are decided by the notation, not by the grid's rounding
    # (7 * 0.1 = 0.7000000000000001 and 0.1 + 0.2 = 0.30000000000000004 in float64).
    ts = uniform_grid(10)[:-1]
    assert in_interval(ts, (0.0, 0.7, "()")).tolist() == [False] * 4 + [True] * 6
    assert in_interval(ts, (0.0, 0.7)).tolist() == [False] * 3 + [True] * 7
    rounded = torch.tensor([7 * 0.1, 0.1 + 0.2, 0.7 - 1e-7, 0.3 + 1e-7], dtype=torch.float64)
    assert in_interval(rounded, (0.3, 0.7)).tolist() == [True, True, True, True]
    assert in_interval(rounded, (0.3, 0.7, "()")).tolist() == [False, False, True, True]
    for bad in ([0.7, 0.3], [0.0, 0.7, "open"], [0.0], [0.0, 0.7, "()", 1], [-0.1, 0.5], [0.0, float("nan")], "0,0.7",
                [0.0, True], [0.0, "0.7"]):
        with pytest.raises(ValueError, match=r"sampler.guidance.interval must be null, \[t_lo, t_hi\] or"):
            parse_interval(bad, "sampler.guidance.interval")
    with pytest.raises(ValueError, match="guidance interval must be"):
        cfg(_label_model, 2.0, 4, interval=(0.0, 0.7, "(("))


def test_guidance_interval_switching() -> None:
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return _label_model(x, t, y)

    guided = cfg(model, 4.0, 4, interval=(0.0, 0.7))
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    y = torch.tensor([1, 2])
    for tv, inside in ((0.9, False), (0.7, True), (0.3, True), (0.0, True)):
        calls.clear()
        t = torch.full((2,), tv, dtype=torch.float64)
        out = guided(x, t, y)
        v_c, v_u = _label_model(x, t, y), _label_model(x, t, torch.full_like(y, 4))
        want = v_u + 4.0 * (v_c - v_u) if inside else v_c
        torch.testing.assert_close(out, want)
        assert calls == ([4] if inside else [2])  # outside: only the conditional branch is evaluated
    # Mixed times in one batch are handled per sample.
    t = torch.tensor([0.9, 0.2], dtype=torch.float64)
    out = guided(x, t, y)
    v_c, v_u = _label_model(x, t, y), _label_model(x, t, torch.full_like(y, 4))
    torch.testing.assert_close(out[0], v_c[0])
    torch.testing.assert_close(out[1], (v_u + 4.0 * (v_c - v_u))[1])


# ----------------------------------------------------------------------------------------------------------
# DDT encoder sharing


class FakeTwoStage(torch.nn.Module):
    """A small two-stage net with DDT's interface: the encoder output conditions a decoder; counts encoder runs."""

    def __init__(self, channels: int = 3, dim: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_enc = torch.nn.Parameter(torch.randn(channels, dim, generator=g) / channels**0.5)
        self.w_x = torch.nn.Parameter(torch.randn(channels, dim, generator=g) / channels**0.5)
        self.w_out = torch.nn.Parameter(torch.randn(dim, channels, generator=g) / dim**0.5)
        self.label = torch.nn.Parameter(torch.randn(num_classes + 1, dim, generator=g))
        self.encoder_runs = 0

    def forward(self, x, t, y, *, encoder_out=None):
        from gen.models import ModelOutput

        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        if encoder_out is None:
            self.encoder_runs += 1
            encoder_out = torch.tanh(tokens @ self.w_enc + t.reshape(-1, 1, 1) + self.label[y][:, None, :])
        h = torch.tanh(tokens @ self.w_x) * (1 + encoder_out)  # decoder sees t and y only through the encoder
        return ModelOutput((h @ self.w_out).transpose(1, 2).reshape(x.shape), encoder_out=encoder_out)


def _velocity(net):
    return lambda x, t, y: net(x, t, y).out


def _random_sim(n: int, gen: torch.Generator) -> torch.Tensor:
    z = torch.randn(n, 6, generator=gen, dtype=torch.float64).cumsum(0)  # drifting features: realistic structure
    z = torch.nn.functional.normalize(z, dim=1)
    return z @ z.T


def test_sharing_disabled_equals_plain_euler() -> None:
    from samplers.sharing import EncoderSharing

    net = FakeTwoStage().double()
    noise = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y, ts = torch.tensor([0, 1, 2, 3]), uniform_grid(12)
    with torch.no_grad():
        plain = sample_euler(_velocity(net), noise, ts, path=LinearPath(), y=y)
        shared = sample_euler(_velocity(EncoderSharing(net, ts)), noise, ts, path=LinearPath(), y=y)
        assert torch.equal(plain, shared)
        # Guided (interval included, both branches at every step as sharing needs): equal to plain guidance.
        g_plain = sample_euler(cfg(_velocity(net), 2.5, 4, interval=(0.0, 0.6), always_both=True), noise, ts,
                               path=LinearPath(), y=y)
        g_shared = sample_euler(cfg(_velocity(EncoderSharing(net, ts)), 2.5, 4, interval=(0.0, 0.6), always_both=True),
                                noise, ts, path=LinearPath(), y=y)
        torch.testing.assert_close(g_plain, g_shared, rtol=0, atol=0)


def test_sharing_runs_encoder_only_at_scheduled_steps() -> None:
    from samplers.sharing import EncoderSharing

    net = FakeTwoStage().double()
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y, ts = torch.tensor([1, 2]), uniform_grid(10)
    with torch.no_grad():
        full = sample_euler(_velocity(net), noise, ts, path=LinearPath(), y=y)
        net.encoder_runs = 0
        shared = EncoderSharing(net, ts, recompute=[3, 7])
        part = sample_euler(_velocity(shared), noise, ts, path=LinearPath(), y=y)
    assert net.encoder_runs == 3 and shared.recomputed_steps == [0, 3, 7]  # step 0 is added
    assert not torch.allclose(full, part)
    with pytest.raises(ValueError, match="outside"):
        EncoderSharing(net, ts, recompute=[10])

    # Guidance interval (0, 0.45): steps 0-5 (t >= 0.5) are unguided. With both branches run at every step the
    # cache always holds the doubled batch, so only the planned step 0 runs the encoder (no unplanned pass).
    net.encoder_runs = 0
    with torch.no_grad():
        shared = EncoderSharing(net, ts, recompute=[0])
        sample_euler(cfg(_velocity(shared), 2.0, 4, interval=(0.0, 0.45), always_both=True), noise, ts,
                     path=LinearPath(), y=y)
    assert net.encoder_runs == 1 and shared.recomputed_steps == [0]


def test_encoder_similarity() -> None:
    from samplers.sharing import encoder_similarity

    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 7, generator=g)
    w = torch.randn(2, 5, 7, generator=g)
    sim = encoder_similarity([z, -z, 3 * z, w])
    assert sim.shape == (4, 4) and sim.dtype == torch.float64
    torch.testing.assert_close(sim, sim.T)
    assert sim[0, 0].item() == pytest.approx(1.0) and sim[0, 1].item() == pytest.approx(-1.0)
    assert sim[0, 2].item() == pytest.approx(1.0)
    want = torch.nn.functional.cosine_similarity(z, w, dim=-1).mean().item()
    assert sim[0, 3].item() == pytest.approx(want, abs=1e-6)


def test_dp_schedule_matches_brute_force_and_beats_uniform() -> None:
    from samplers.sharing import (
        brute_force_schedule,
        dp_schedule,
        reuse_error_matrix,
        schedule_error,
        uniform_schedule_error,
    )

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5, 8, 9):
        for _ in range(3):
            sim = _random_sim(n, g)
            for k in range(1, n + 1):
                steps, err = dp_schedule(sim, k)
                assert len(steps) == k and steps[0] == 0 and steps == sorted(set(steps))
                assert err == pytest.approx(schedule_error(sim, steps), abs=1e-12)
                bf_steps, bf_err = brute_force_schedule(sim, k)
                assert err == pytest.approx(bf_err, abs=1e-12), (n, k, steps, bf_steps)
            for rate in range(1, n + 1):  # upstream's even spacing i % rate == 0 uses ceil(n / rate) passes
                assert dp_schedule(sim, -(-n // rate))[1] <= uniform_schedule_error(sim, rate) + 1e-12
    # Larger random matrices: DP never loses to uniform spacing, and K = N costs nothing.
    for n, rate in ((50, 5), (100, 4), (64, 1)):
        sim = _random_sim(n, g)
        err = dp_schedule(sim, -(-n // rate))[1]
        assert err <= uniform_schedule_error(sim, rate) + 1e-12
    assert dp_schedule(_random_sim(20, g), 20)[1] == pytest.approx(0.0, abs=1e-12)
    # E[i, j] = sum_{k=j..i} (1 - sim[k, j]).
    sim = _random_sim(6, g)
    e = reuse_error_matrix(sim)
    assert e[4, 1].item() == pytest.approx(sum(1 - sim[m, 1].item() for m in range(1, 5)))
    assert e[1, 4].item() == math.inf
    with pytest.raises(ValueError):
        dp_schedule(sim, 0)


def test_dp_schedule_prefers_recomputing_at_changes() -> None:
    from samplers.sharing import dp_schedule

    # Three blocks of identical features: two extra recomputations must land on the block starts.
    blocks = torch.tensor([0] * 4 + [1] * 3 + [2] * 5)
    basis = torch.eye(3, dtype=torch.float64)[blocks]
    steps, err = dp_schedule(basis @ basis.T, 3)
    assert steps == [0, 4, 7] and err == pytest.approx(0.0)


def test_schedule_json_round_trip(tmp_path) -> None:
    from samplers.sharing import EncoderSharing, dp_schedule, encoder_similarity, load_schedule, save_schedule

    net = FakeTwoStage().double()
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y, ts = torch.tensor([0, 1, 2]), uniform_grid(16)
    with torch.no_grad():
        recorder = EncoderSharing(net, ts, record=True)
        sample_euler(_velocity(recorder), noise, ts, path=LinearPath(), y=y)
    outs = [z for _, z in recorder.history]
    assert len(outs) == 16 and outs[0].shape == (3, 16, 8) and [i for i, _ in recorder.history] == list(range(16))
    steps, err = dp_schedule(encoder_similarity(outs), 5)
    f = tmp_path / "sched.json"
    save_schedule(f, steps, num_steps=16, estimated_error=err, meta={"grid": "uniform", "steps": 16})
    data = load_schedule(f, num_steps=16)
    assert data["recompute"] == steps and data["estimated_error"] == pytest.approx(err)
    assert data["meta"]["grid"] == "uniform"
    with pytest.raises(ValueError, match="schedule is for 16 steps"):
        load_schedule(f, num_steps=20)
    with torch.no_grad():
        x = sample_euler(_velocity(EncoderSharing(net, ts, data["recompute"])), noise, ts, path=LinearPath(), y=y)
    assert x.shape == noise.shape and bool(torch.isfinite(x).all())


# ----------------------------------------------------------------------------------------------------------
# Several streams integrated together (REG's image and class token)


SOLVERS = [
    (sample_euler, {}),
    (sample_heun, {}),
    (sample_heun, {"s_churn": 10.0}),
    (sample_dpmpp_2m, {}),
    (sample_euler_maruyama, {}),
]


def _seeded(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


@pytest.mark.parametrize("solver, options", SOLVERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_zero_width_extra_stream_equals_the_plain_sampler(solver, options) -> None:
    """A second stream of width 0 (no class token) changes nothing, bit for bit, for every solver."""
    from samplers import Streams

    path, model = LinearPath(), GaussianVelocity(LinearPath())
    noise, ts = gaussian_noise(64, 3), uniform_grid(12)
    plain = solver(model, noise, ts, path=path, randn_like=_seeded(1), **options)
    empty = torch.zeros(64, 0, dtype=torch.float64)
    both = solver(lambda x, t, y: (model(x[0], t, y), x[1] * 0), Streams((noise, empty)), ts, path=path,
                  randn_like=_seeded(1), **options)
    assert isinstance(both, tuple) and both[1].shape == (64, 0)
    assert torch.equal(both[0], plain)


@pytest.mark.parametrize("solver, options", SOLVERS[:2] + SOLVERS[3:4], ids=lambda v: getattr(v, "__name__", str(v)))
def test_two_streams_are_each_integrated_exactly(solver, options) -> None:
    """Two independent Gaussians of different shapes, integrated as streams, each equal their own integration."""
    from samplers import Streams

    path = LinearPath()
    a, b = GaussianVelocity(path), GaussianVelocity(path, MU * -2.0, COV * 0.5)
    na, nb = gaussian_noise(32, 4), gaussian_noise(32, 5)
    ts = uniform_grid(10)
    sa = solver(a, na, ts, path=path, **options)
    sb = solver(b, nb, ts, path=path, **options)
    both = solver(lambda x, t, y: (a(x[0], t, y), b(x[1], t, y)), Streams((na, nb)), ts, path=path, **options)
    torch.testing.assert_close(both[0], sa, rtol=0, atol=0)
    torch.testing.assert_close(both[1], sb, rtol=0, atol=0)


def test_guidance_scales_per_stream() -> None:
    from samplers import Streams

    def model(x, t, y):  # conditional and unconditional branches differ by the label
        return (x[0] * 0 + y[:, None].double(), x[1] * 0 + 2 * y[:, None].double())

    x = Streams((torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64)))
    y, t = torch.tensor([1, 2]), torch.full((2,), 0.5)
    v_img, v_tok = cfg(model, (3.0, 0.5), 4)(x, t, y)
    # v = v_u + s (v_c - v_u) with v_u from the null label 4.
    torch.testing.assert_close(v_img, (4 + 3.0 * (y - 4)).double()[:, None].expand(2, 3))
    torch.testing.assert_close(v_tok, (8 + 0.5 * (2 * y - 8)).double()[:, None])
    with pytest.raises(ValueError, match="one per stream"):
        cfg(model, (1.0, 2.0, 3.0), 4)(x, t, y)


def test_gradients_flow_through_a_two_step_euler_sample() -> None:
    """The caller decides about gradients: through 2 Euler steps of v = a x + b on the linear path (x starts at the
    noise n, sigma(1) = 1, steps of -1/2), x_2 = c^2 n - b (c + 1) / 2 with c = 1 - a/2, so
    d sum(x_2)/da = -c sum(n) + B b / 4 and d sum(x_2)/db = -B (c + 1) / 2 (B elements); under no_grad no graph."""
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.2, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ts = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    model_fn = lambda x, t, y: a * x + b  # noqa: E731
    x2 = sample_euler(model_fn, noise, ts, path=LinearPath())
    c, n = 1 - a.detach() / 2, noise.numel()
    torch.testing.assert_close(x2.detach(), c**2 * noise - b.detach() * (c + 1) / 2)
    ga, gb = torch.autograd.grad(x2.sum(), (a, b))
    torch.testing.assert_close(ga, -c * noise.sum() + n * b.detach() / 4)
    torch.testing.assert_close(gb, -n * (c + 1) / 2)
    with torch.no_grad():
        assert not sample_euler(model_fn, noise, ts, path=LinearPath()).requires_grad
