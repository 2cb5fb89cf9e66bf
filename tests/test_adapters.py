"""Foreign-convention adapters against exact fields: Gaussian data has a closed-form velocity and epsilon in
every convention, so an adapted foreign field must give our native field's samples to rounding error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gen.models import ModelOutput
from gen.models.adapters import DDPMEpsilon, FlippedTimeVelocity, ddpm_alphas_cumprod
from gen.models.prediction import velocity_model
from gen.paths import EDMPath, LinearPath
from pipeline import Generator, SamplerSpec
from samplers import sample_euler, sample_heun, shifted_grid, uniform_grid
from samplers.sharing import EncoderSharing
from tests.presets import micro
from tokenizers.pixels import PixelTokenizer

SHAPE = (2, 2, 2)  # (C, H, W)
MU = torch.tensor([0.7, -1.3], dtype=torch.float64).reshape(1, 2, 1, 1)  # per-channel data mean
VAR = torch.tensor([0.25, 1.8], dtype=torch.float64).reshape(1, 2, 1, 1)  # per-channel data variance


def posterior_means(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``E[x0 | x]`` and ``E[eps | x]`` for ``x = a x0 + s eps``, x0 ~ N(MU, VAR) elementwise (a, s: (B,))."""
    a, s = a.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
    r = x - a * MU
    c = a**2 * VAR + s**2
    return MU + a * VAR * r / c, s * r / c


def native_velocity(path):
    """Our exact field: ``E[alpha' x0 + sigma' eps | x_t]`` on ``path`` (data at t = 0)."""

    def fn(x, t, y):
        t = t.double()
        ex0, eeps = posterior_means(x.double(), path.alpha(t), path.sigma(t))
        return path.d_alpha(t).reshape(-1, 1, 1, 1) * ex0 + path.d_sigma(t).reshape(-1, 1, 1, 1) * eeps

    return fn


class SiTField(nn.Module):
    """Exact field in SiT/LightningDiT/DDT's convention: ``x_s = s x0 + (1 - s) eps``, ``v = E[x0 - eps | x_s]``.

    With ``learn_sigma`` it appends C junk channels, like DiT's variance output."""

    def __init__(self, learn_sigma: bool = False) -> None:
        super().__init__()
        self.learn_sigma = learn_sigma
        self.seen: list[torch.Tensor] = []

    def forward(self, x, s, y):
        s = torch.as_tensor(s, dtype=torch.float64).expand(x.shape[0])
        self.seen.append(s)
        ex0, eeps = posterior_means(x.double(), s, 1.0 - s)
        v = ex0 - eeps
        return ModelOutput(torch.cat([v, torch.full_like(v, 1e6)], 1) if self.learn_sigma else v)


ABAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))  # DiT's schedule, built independently


class DDPMField(nn.Module):
    """Exact DDPM epsilon ``E[eps | x_k]``, ``x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps``, at integer steps k."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, k, y):
        k = k.double()
        self.seen.append(k)
        ki = k.round()
        assert (k - ki).abs().max() < 1e-6, k  # the test grid sits on integer DDPM steps
        abar = torch.as_tensor(ABAR, dtype=torch.float64)[ki.long()]
        eps = posterior_means(x.double(), abar.sqrt(), (1 - abar).sqrt())[1]
        return ModelOutput(torch.cat([eps, torch.full_like(eps, -1e6)], 1))  # learn_sigma: variance channels after eps


def noise(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# Data at t = 1, velocity x0 - eps (SiT, LightningDiT, DDT)


def test_flipped_time_velocity_is_our_field() -> None:
    inner = SiTField()
    adapted = FlippedTimeVelocity(inner)
    x = noise(8, 1)
    t = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    torch.testing.assert_close(adapted(x, t, None).out, native_velocity(LinearPath())(x, t, None), rtol=0, atol=1e-12)
    torch.testing.assert_close(inner.seen[-1], 1.0 - t)  # fed their time, unscaled
    assert adapted.prediction_spec()["prediction"] == "velocity"


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun])
@pytest.mark.parametrize("grid", ["uniform", "shifted"])
def test_flipped_time_samples_equal_native_samples(sampler, grid) -> None:
    ts = uniform_grid(12) if grid == "uniform" else shifted_grid(12, 1 / 0.3)
    adapted = FlippedTimeVelocity(SiTField(learn_sigma=True), out_channels=SHAPE[0])
    model_fn = velocity_model(adapted, adapted.prediction_spec())
    ours = sampler(native_velocity(LinearPath()), noise(), ts, path=LinearPath())
    theirs = sampler(model_fn, noise(), ts, path=LinearPath())
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-10)
    # Sanity: the samples are data-like, and the flip matters (an unflipped field integrates the wrong way).
    assert (ours.mean((0, 2, 3)) - MU.flatten()).abs().max() < 0.5
    wrong = sampler(lambda x, t, y: SiTField()(x, t, y).out, noise(), ts, path=LinearPath())
    assert not torch.allclose(wrong, ours, atol=1e-3)


def test_flipped_time_passes_ddt_encoder_sharing_through() -> None:
    torch.manual_seed(0)
    net = micro("ddt", input_size=8, in_channels=2, num_classes=3).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapted = FlippedTimeVelocity(net)
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64), torch.tensor([0, 1, 2])
    with torch.no_grad():
        res = adapted(x, t, y)
        ref = net(x, 1.0 - t, y)
        assert torch.equal(res.out, -ref.out) and torch.equal(res.encoder_out, ref.encoder_out)
        # the cached encoder output reaches the net
        assert torch.equal(adapted(x, t, y, encoder_out=res.encoder_out).out, res.out)
        res_f = adapted(x, t, y, return_features=[1])
        assert torch.equal(res_f.out, res.out) and res_f.features[0].shape == (3, 4, 64)
        ts, eps = uniform_grid(6), torch.randn(3, 2, 8, 8, dtype=torch.float64)
        spec = adapted.prediction_spec()
        plain = sample_euler(velocity_model(adapted, spec), eps, ts, path=LinearPath(), y=y)
        shared_net = EncoderSharing(adapted, ts)
        shared = sample_euler(velocity_model(shared_net, spec), eps, ts, path=LinearPath(), y=y)
        half_net = EncoderSharing(adapted, ts, recompute=[0, 2, 4])
        half = sample_euler(velocity_model(half_net, spec), eps, ts, path=LinearPath(), y=y)
    assert torch.equal(plain, shared) and shared_net.encoder_passes == 6
    assert half_net.recomputed_steps == [0, 2, 4] and not torch.equal(half, plain)


def test_flipped_time_negates_reg_extra_output() -> None:
    torch.manual_seed(0)
    net = micro("dit", input_size=8, in_channels=2, num_classes=3, extra_token_dim=5).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, e = torch.randn(2, 2, 8, 8, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    t, y = torch.tensor([0.3, 0.6], dtype=torch.float64), torch.tensor([0, 2])
    with torch.no_grad():
        res = FlippedTimeVelocity(net)(x, t, y, extra_token=e, return_features=[2])
        ref = net(x, 1 - t, y, extra_token=e, return_features=[2])
    assert torch.equal(res.out, -ref.out) and torch.equal(res.extra, -ref.extra)
    assert torch.equal(res.features[0], ref.features[0])


# ----------------------------------------------------------------------------------------------------------
# DiT: 1000-step DDPM epsilon models


def test_ddpm_schedule_and_timestep_map() -> None:
    abar = ddpm_alphas_cumprod()
    np.testing.assert_allclose(abar.numpy(), ABAR, rtol=1e-12)
    ad = DDPMEpsilon(nn.Identity(), EDMPath())
    assert ad.sigma_min == pytest.approx(0.01, rel=1e-3) and ad.sigma_max == pytest.approx(157.4, rel=1e-3)
    r = torch.tensor(np.sqrt((1 - ABAR) / ABAR))
    ks = torch.tensor([0, 1, 17, 500, 998, 999])
    torch.testing.assert_close(ad.timestep(r[ks]), ks.double(), rtol=0, atol=1e-8)
    # Between steps k is strictly between; outside the DDPM range it is clamped.
    mid = ad.timestep(torch.sqrt(r[500] * r[501]).reshape(1))
    assert 500 < mid.item() < 501
    torch.testing.assert_close(ad.timestep(torch.tensor([1e-4, 1e4], dtype=torch.float64)),
                               torch.tensor([0.0, 999.0], dtype=torch.float64))
    # On the linear path the same steps sit at t = r / (1 + r).
    lin = DDPMEpsilon(nn.Identity(), LinearPath())
    torch.testing.assert_close(lin.timestep(r[ks] / (1 + r[ks])), ks.double(), rtol=0, atol=1e-6)
    assert lin.t_max() == pytest.approx(ad.sigma_max / (1 + ad.sigma_max))


@pytest.mark.parametrize("path_kind", ["edm", "linear"])
@pytest.mark.parametrize("output", ["eps", "velocity"])
def test_ddpm_epsilon_samples_equal_native_samples(path_kind, output) -> None:
    # A grid on integer DDPM steps 999 -> 0 (ratio r_k), then 0, so the exact field needs no interpolation.
    ks = torch.tensor([999, 900, 700, 500, 350, 220, 120, 60, 25, 8, 0])
    r = torch.tensor(np.sqrt((1 - ABAR) / ABAR))[ks]
    path = EDMPath(sigma_max=float(r[0])) if path_kind == "edm" else LinearPath()
    ts = torch.cat([path.t_from_noise_ratio(r), torch.zeros(1, dtype=torch.float64)])
    inner = DDPMField()
    adapted = DDPMEpsilon(inner, path, out_channels=SHAPE[0], output=output)
    spec = adapted.prediction_spec()
    assert spec["prediction"] == output and spec["path"] == path.config
    ours = sample_euler(native_velocity(path), noise(), ts, path=path)
    theirs = sample_euler(velocity_model(adapted, spec), noise(), ts, path=path)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-9)
    fed = torch.cat(inner.seen)
    assert set(fed.round().long().tolist()) == set(ks.tolist())  # every grid time but the final 0


def test_ddpm_epsilon_on_real_dit_through_the_generator() -> None:
    torch.manual_seed(0)
    net = micro("dit", input_size=8, in_channels=1, num_classes=3, learn_sigma=True, time_scale=1.0).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    seen = []
    net.register_forward_pre_hook(lambda m, args: seen.append(args[1].detach().clone()))
    adapted = DDPMEpsilon(net, EDMPath(sigma_max=157.4), out_channels=1)
    gen = Generator(adapted, adapted.prediction_spec(), PixelTokenizer(channels=1), (1, 8, 8), 3, min_rows=1)
    spec = SamplerSpec.from_config({"solver": {"_target_": "samplers.sample_heun"}, "steps": 4,
                                    "grid": {"_target_": "samplers.grids.karras_grid", "sigma_max": adapted.sigma_max},
                                    "guidance": {"scale": 2.0}})
    images, labels = gen.generate([0, 1, 2], spec)
    assert images.dtype == torch.uint8 and images.shape == (3, 1, 8, 8) and labels.shape == (3,)
    k = torch.cat(seen)
    assert k.min() >= 0 and k.max() <= 999 and k.max() > 990  # DDPM step indices, not our times
    with pytest.raises(ValueError, match="output"):
        DDPMEpsilon(net, EDMPath(), output="x0")  # type: ignore[arg-type]
