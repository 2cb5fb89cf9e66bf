"""Objectives: flow matching and EDM losses, EDM preconditioning, velocity_model, a short training run."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gen.models import ModelOutput
from gen.models.precond import EDMPrecond, edm_coefficients
from gen.models.prediction import velocity_model
from gen.objectives import EDMLoss, FlowMatching
from gen.objectives.edm import edm_loss_weight
from gen.objectives.flow_matching import cosine_direction_loss
from gen.paths import CosinePath, EDMPath, LinearPath, LogitNormalTime, UniformTime, UShapedTime
from gen.utils.build import BuildError
from gen.utils.seed import BatchRandom

NUM_CLASSES = 3


class TinyNet(nn.Module):
    """Pure network ``net(x, t, y)`` on (B, 2, 2, 2) inputs: an MLP over x, a time embedding and the label."""

    num_classes = NUM_CLASSES

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.label = nn.Embedding(NUM_CLASSES + 1, 16)  # index NUM_CLASSES = null class
        self.mlp = nn.Sequential(nn.Linear(8 + 16 + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, 8))
        self.register_buffer("freqs", torch.arange(1, 9, dtype=torch.float32))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if y is None:
            y = torch.full((x.shape[0],), NUM_CLASSES, dtype=torch.long, device=x.device)
        tf = t.float()[:, None] * self.freqs
        h = torch.cat([x.float().flatten(1), tf.sin(), tf.cos(), self.label(y)], dim=1)
        return ModelOutput(self.mlp(h).reshape(x.shape).to(x.dtype))


def rng(n: int, seed: int) -> BatchRandom:
    return BatchRandom(n, torch.Generator().manual_seed(seed))


def toy_batch(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed class-conditional Gaussian toy set: mean depends on the label."""
    y = torch.randint(NUM_CLASSES, (n,), generator=gen)
    means = torch.tensor([-1.0, 0.0, 1.0])[y].reshape(n, 1, 1, 1)
    x0 = means + 0.3 * torch.randn(n, 2, 2, 2, generator=gen)
    return x0, y


# ----------------------------------------------------------------------------------------------------------


def test_flow_matching_loss_matches_hand_computation() -> None:
    obj = FlowMatching(time_sampler=UniformTime(), cos_velocity_weight=0.5, label_dropout=0.5)
    net = TinyNet()
    x0, y = toy_batch(8, torch.Generator().manual_seed(0))
    out = obj(net, {"x0": x0, "label": y}, rng(8, 1))
    assert set(out) == {"loss", "mse", "cos"} and all(v.shape == (8,) for v in out.values())

    # Re-draw with the same generator: time first, then noise, then the label drops (documented order).
    g = torch.Generator().manual_seed(1)
    t = torch.rand(8, generator=g, dtype=torch.float64).float()
    eps = torch.randn(x0.shape, generator=g)
    dropped = torch.rand(8, generator=g) < 0.5
    assert 0 < int(dropped.sum()) < 8
    y = torch.where(dropped, NUM_CLASSES, y)
    x_t = (1 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * eps
    v = net(x_t, t, y).out
    mse = ((v - (eps - x0)) ** 2).flatten(1).mean(1)
    cos = (1 - nn.functional.cosine_similarity(v, eps - x0, dim=1)).flatten(1).mean(1)
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["cos"], cos)
    torch.testing.assert_close(out["loss"], mse + 0.5 * cos)


def test_objective_randomness_comes_from_rng() -> None:
    net = TinyNet()
    x0, y = toy_batch(8, torch.Generator().manual_seed(0))
    batch = {"x0": x0, "label": y}
    for obj in (FlowMatching(), EDMLoss()):
        a = obj(net, batch, rng(8, 3))["loss"]
        b = obj(net, batch, rng(8, 3))["loss"]
        c = obj(net, batch, rng(8, 4))["loss"]
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_per_sample_randomness_makes_losses_batch_independent() -> None:
    """With per-sample streams a sample's loss is the same alone or inside a larger batch."""
    from gen.utils.seed import SampleRandom

    net = TinyNet()
    x0, y = toy_batch(8, torch.Generator().manual_seed(0))
    for obj in (FlowMatching(), EDMLoss()):
        full = obj(net, {"x0": x0, "label": y}, SampleRandom(range(100, 108), "t"))["loss"]
        half = obj(net, {"x0": x0[4:], "label": y[4:]}, SampleRandom(range(104, 108), "t"))["loss"]
        torch.testing.assert_close(full[4:], half, rtol=1e-6, atol=1e-7)


def test_cosine_direction_loss_values() -> None:
    v = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(cosine_direction_loss(v, 2 * v), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(cosine_direction_loss(v, -v), torch.full((2,), 2.0))


def test_shift_and_time_sampler_options() -> None:
    obj = FlowMatching(path=CosinePath(), time_sampler=LogitNormalTime(0.0, 1.0), shift=2.0)
    assert obj.time_sampler.shift == 2.0
    assert obj.prediction_spec() == {"path": {"_target_": "gen.paths.CosinePath"}, "prediction": "velocity",
                                     "precond": None}
    with pytest.raises(ValueError, match="shift given both"):
        FlowMatching(time_sampler=UniformTime(shift=2.0), shift=3.0)
    with pytest.raises(ValueError, match="label_dropout"):
        FlowMatching(label_dropout=1.5)


def test_edm_precond_coefficients() -> None:
    sd = 0.5
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, sd)
    torch.testing.assert_close(c_skip, sd**2 / (sigma**2 + sd**2))
    torch.testing.assert_close(c_out, sigma * sd / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_in, 1 / (sigma**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    # At sigma = sigma_data: c_skip = 1/2, c_out = sd / sqrt(2), c_in = 1 / (sd sqrt(2)).
    assert math.isclose(c_skip[1].item(), 0.5) and math.isclose(c_out[1].item(), sd / math.sqrt(2))
    assert math.isclose(c_in[1].item(), 1 / (sd * math.sqrt(2)))

    # The wrapper applies them around the inner network.
    seen = {}

    class Probe(nn.Module):
        def forward(self, x, t, y):
            seen["x"], seen["t"] = x, t
            return ModelOutput(torch.ones_like(x))

    x = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    d = EDMPrecond(Probe(), sd)(x, sigma, None).out
    b = (-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], c_in.reshape(b) * x)
    torch.testing.assert_close(seen["t"], c_noise)
    torch.testing.assert_close(d, c_skip.reshape(b) * x + c_out.reshape(b))


def test_edm_loss_weight_closed_form_and_loss() -> None:
    sd = 0.5
    sigma = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    w = edm_loss_weight(sigma, sd)
    torch.testing.assert_close(w, (sigma**2 + sd**2) / (sigma * sd) ** 2)
    # lambda * c_out^2 = 1: the effective target of F has unit weight (EDM Sec. 5).
    _, c_out, _, _ = edm_coefficients(sigma, sd)
    torch.testing.assert_close(w * c_out**2, torch.ones(3, dtype=torch.float64))

    obj = EDMLoss(label_dropout=0.0)
    net = TinyNet()
    x0, y = toy_batch(8, torch.Generator().manual_seed(0))
    out = obj(net, {"x0": x0, "label": y}, rng(8, 2))
    torch.testing.assert_close(out["loss"], edm_loss_weight(out["sigma"]) * out["mse"] * x0[0].numel())
    g = torch.Generator().manual_seed(2)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(8, generator=g, dtype=torch.float64)).float()
    eps = torch.randn(x0.shape, generator=g)
    d = EDMPrecond(net, 0.5)(x0 + sigma.reshape(-1, 1, 1, 1) * eps, sigma, y).out
    torch.testing.assert_close(out["mse"], ((d - x0) ** 2).flatten(1).mean(1))
    assert obj.prediction_spec() == {
        "path": {"_target_": "gen.paths.EDMPath", "sigma_max": 80.0}, "prediction": "x0",
        "precond": {"_target_": "gen.models.precond.EDMPrecond", "sigma_data": 0.5},
    }


def test_edm_loss_sums_over_elements_like_nvlabs_edm() -> None:
    # NVlabs/edm training/loss.py returns weight * (D - y)^2 unreduced and training/training_loop.py backpropagates
    # loss.sum() / batch: a sum over the elements of each sample. Closed form with F = 0, x0 = 0, eps = 1:
    # D = c_skip sigma, so the per-sample loss is lambda c_skip^2 sigma^2 * numel = sd^2 / (sigma^2 + sd^2) * numel.
    sigma = torch.tensor([0.5, 1.0, 2.0])

    class Fixed(EDMLoss):
        def draw(self, x0, y, null_class, rng):
            return torch.ones_like(x0), sigma, y

    class Zero(nn.Module):
        num_classes = 1

        def forward(self, x, t, y):
            return ModelOutput(torch.zeros_like(x))

    x0 = torch.zeros(3, 3, 4, 4)
    out = Fixed(sigma_data=0.5)(Zero(), {"x0": x0}, rng(3, 0))
    want = 0.25 / (sigma**2 + 0.25) * 48  # 48 = 3 * 4 * 4 elements
    torch.testing.assert_close(out["loss"], want)
    assert out["loss"][0].item() == pytest.approx(24.0)
    torch.testing.assert_close(out["mse"], want / 48 / edm_loss_weight(sigma))  # logged: unweighted mean


def test_velocity_model_from_spec() -> None:
    net = TinyNet().double()
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    fm = velocity_model(net, FlowMatching().prediction_spec())
    torch.testing.assert_close(fm(x, t, y), net(x, t, y).out)

    sigma = 10 * t
    edm = velocity_model(net, EDMLoss().prediction_spec())
    d = EDMPrecond(net, 0.5)(x, sigma, y).out
    torch.testing.assert_close(edm(x, sigma, y), (x - d) / sigma.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(edm(x, sigma, y), EDMPath().velocity_from_x0(x, d, sigma))
    with pytest.raises(BuildError, match="unknown prediction kind"):
        velocity_model(net, {"path": {"_target_": "gen.paths.LinearPath"}, "prediction": "score"})
    with pytest.raises(BuildError, match="outside the allowed packages"):
        velocity_model(net, {"path": {"_target_": "os.system", "command": "true"}, "prediction": "velocity"})
    with pytest.raises(BuildError, match="outside the allowed packages"):
        velocity_model(net, {**FlowMatching().prediction_spec(), "precond": {"_target_": "builtins.exec"}})


@pytest.mark.parametrize(
    "make",
    [
        lambda: FlowMatching(time_sampler=LogitNormalTime(), cos_velocity_weight=0.1),
        lambda: FlowMatching(path=LinearPath(), time_sampler=UShapedTime()),
        lambda: EDMLoss(),
    ],
    ids=["rf_logitnormal_cos", "fm_ushaped", "edm"],
)
def test_training_reduces_loss(make) -> None:
    torch.manual_seed(0)
    obj, net = make(), TinyNet()
    x0_all, y_all = toy_batch(512, torch.Generator().manual_seed(0))
    x_eval, y_eval = x0_all[:256], y_all[:256]

    def eval_loss() -> float:
        with torch.no_grad():  # fixed noise/time draws so the two evaluations are comparable
            return obj(net, {"x0": x_eval, "label": y_eval}, rng(256, 123))["loss"].mean().item()

    before = eval_loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        idx = torch.randint(512, (64,), generator=g)
        loss = obj(net, {"x0": x0_all[idx], "label": y_all[idx]}, BatchRandom(64, g))["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.6 * before, (before, after)
