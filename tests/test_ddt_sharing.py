"""DDT encoder sharing on the real (micro) DDT.

Sharing disabled equals plain sampling bit for bit, for every sampler and with guidance; with a schedule the
encoder runs exactly at the planned steps (counted on the encoder's input embedder), also when guidance is
limited to an interval (the encoder output is cached for the doubled batch, so a step outside the interval needs
no extra encoder pass); even spacing is upstream's ``i % rate``; and the statistical DP schedule's reuse error, on
template statistics recorded from this network under the production guidance (conditional and unconditional
rows), is no larger than even spacing and equals brute force.
"""

from __future__ import annotations

import pytest
import torch

from gen.models import DDT
from gen.models.prediction import velocity_model
from gen.paths import LinearPath
from samplers import sample_dpmpp_2m, sample_euler, sample_heun, uniform_grid
from samplers.guidance import cfg
from samplers.sharing import (
    EncoderSharing,
    brute_force_schedule,
    dp_schedule,
    encoder_similarity,
    schedule_error,
    uniform_schedule_error,
    uniform_steps,
)
from tests.presets import micro

C, RES, K_CLASSES, N_STEPS = 2, 16, 4, 12
SPEC = {"path": {"_target_": "gen.paths.LinearPath"}, "prediction": "velocity", "precond": None}


class EncoderCounter:
    """Counts encoder passes: the encoder's input embedder runs once per pass, whatever the batch."""

    def __init__(self, net: DDT) -> None:
        self.calls = 0
        net.s_embedder.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


@pytest.fixture(scope="module")
def net() -> DDT:
    torch.manual_seed(0)
    m = micro("ddt", input_size=RES, in_channels=C, num_classes=K_CLASSES)
    with torch.no_grad():  # move away from the zero-output init so the trajectory and encoder outputs evolve
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval().requires_grad_(False)


def template(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, RES, RES, generator=g), torch.randint(K_CLASSES, (n,), generator=g)


def run(net, noise, y, ts, *, recompute=None, scale=1.0, interval=None, sampler=sample_euler, record=False):
    """Sample through the same chain as the pipeline: sharing wrapper -> velocity -> guidance -> solver."""
    shared = EncoderSharing(net, ts, recompute, record=record)
    model_fn = velocity_model(shared, SPEC)
    if scale != 1.0:
        model_fn = cfg(model_fn, scale, K_CLASSES, interval=interval, always_both=True)
    return sampler(model_fn, noise, ts, path=LinearPath(), y=y), shared


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun, sample_dpmpp_2m])
def test_sharing_disabled_equals_plain_sampling(net: DDT, sampler) -> None:
    noise, y = template()
    ts = uniform_grid(N_STEPS)
    plain = sampler(velocity_model(net, SPEC), noise, ts, path=LinearPath(), y=y)
    assert torch.equal(plain, run(net, noise, y, ts, sampler=sampler)[0])
    # With guidance (interval included) too.
    both = cfg(velocity_model(net, SPEC), 2.0, K_CLASSES, interval=(0.0, 0.7), always_both=True)
    guided = sampler(both, noise, ts, path=LinearPath(), y=y)
    assert torch.equal(guided, run(net, noise, y, ts, scale=2.0, interval=(0.0, 0.7), sampler=sampler)[0])
    # Running the unused unconditional branch outside the interval changes only the GEMMs' rounding.
    cond_only = cfg(velocity_model(net, SPEC), 2.0, K_CLASSES, interval=(0.0, 0.7))
    torch.testing.assert_close(sampler(cond_only, noise, ts, path=LinearPath(), y=y), guided, rtol=0, atol=1e-4)


@pytest.mark.parametrize("k", [1, 3, 6, N_STEPS])
def test_encoder_runs_exactly_at_the_planned_steps(net: DDT, k: int) -> None:
    noise, y = template(seed=1)
    ts = uniform_grid(N_STEPS)
    _, rec = run(net, noise, y, ts, record=True)
    sim = encoder_similarity([z for _, z in rec.history])
    steps, _ = dp_schedule(sim, k)
    counter = EncoderCounter(net)
    out, shared = run(net, noise, y, ts, recompute=steps)
    assert counter.calls == shared.encoder_passes == k and shared.recomputed_steps == steps
    assert bool(torch.isfinite(out).all())
    if k < N_STEPS:  # reusing a stale encoder output changes the samples
        assert not torch.equal(out, run(net, noise, y, ts)[0])


def test_guidance_interval_runs_no_unplanned_encoder_pass(net: DDT) -> None:
    """The last scheduled recompute (step 9, t = 0.25) lies outside the guidance interval [0.3, 1]; the encoder
    still runs only at the planned steps, and each pass covers the doubled (guided) batch."""
    noise, y = template(seed=3)
    ts = uniform_grid(N_STEPS)
    plan = [0, 4, 9]
    counter = EncoderCounter(net)
    widths: list[int] = []
    net.s_embedder.register_forward_hook(lambda m, a, o: widths.append(a[0].shape[0]))
    _, shared = run(net, noise, y, ts, recompute=plan, scale=2.0, interval=(0.3, 1.0))
    assert counter.calls == 3 and shared.recomputed_steps == plan
    assert widths[-3:] == [2 * noise.shape[0]] * 3
    # Without both branches at every step the cache would not fit a guided step: refused, never recomputed.
    model_fn = cfg(velocity_model(EncoderSharing(net, ts, [0, 9]), SPEC), 2.0, K_CLASSES, interval=(0.0, 0.7))
    with pytest.raises(RuntimeError, match="always_both=True"):
        sample_euler(model_fn, noise, ts, path=LinearPath(), y=y)


def test_uniform_steps_are_upstream_refresh_rate() -> None:
    assert uniform_steps(12, 1) == list(range(12))
    assert uniform_steps(12, 5) == [0, 5, 10]  # i % rate == 0: ceil(12 / 5) = 3 passes
    assert uniform_steps(20, 2) == list(range(0, 20, 2))
    with pytest.raises(ValueError, match="refresh rate"):
        uniform_steps(12, 0)


def test_dp_schedule_error_no_larger_than_uniform_on_guided_templates(net: DDT) -> None:
    noise, y = template(n=8, seed=2)  # DDT: 8 fixed template samples with random classes
    ts = uniform_grid(N_STEPS)
    _, rec = run(net, noise, y, ts, scale=2.0, interval=(0.0, 0.7), record=True)
    outs = [z for _, z in rec.history]
    # The production guidance's states: conditional and unconditional rows at every step.
    assert len(outs) == N_STEPS and outs[0].shape == (16, (RES // 4) ** 2, net.hidden_size)
    sim = encoder_similarity(outs)
    assert float(sim.min()) < 0.999  # the encoder output really changes along the trajectory
    strictly_better = 0
    for k in range(1, N_STEPS + 1):
        steps, err = dp_schedule(sim, k)
        assert err == pytest.approx(schedule_error(sim, steps), abs=1e-12)
        if k in (3, 4):
            assert err == pytest.approx(brute_force_schedule(sim, k)[1], abs=1e-12)
    for rate in range(1, N_STEPS + 1):
        k = len(uniform_steps(N_STEPS, rate))
        err, uni = dp_schedule(sim, k)[1], uniform_schedule_error(sim, rate)
        assert err <= uni + 1e-12, (rate, err, uni)
        strictly_better += err < uni - 1e-9
    assert strictly_better > 0  # on real statistics the DP finds better schedules than even spacing
    assert dp_schedule(sim, N_STEPS)[1] == pytest.approx(0.0, abs=1e-6)  # float32 features: sim[i, i] ~ 1
