"""DDT encoder sharing on the real (micro) DDT (issue 4, "What it must show" 2).

Sharing disabled equals plain Euler sampling bit for bit; with K recomputations out of N steps the encoder runs
exactly K times (counted on the encoder's input embedder); and the statistical DP schedule's estimated reuse error,
on template statistics recorded from this network, is no larger than that of K evenly spaced recomputations.
"""

from __future__ import annotations

import pytest
import torch

from gen.models.ddt import DDT, ddt
from gen.paths import LinearPath
from samplers import sample_euler, uniform_grid
from samplers.guidance import cfg
from samplers.sharing import (
    brute_force_schedule,
    cfg_shared,
    collect_encoder_outputs,
    dp_schedule,
    encoder_similarity,
    sample_euler_shared,
    schedule_error,
    shared_model_fn,
    uniform_schedule_error,
    uniform_steps,
)

C, RES, K_CLASSES, N_STEPS = 2, 16, 4, 12


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
    m = ddt("micro", input_size=RES, in_channels=C, num_classes=K_CLASSES)
    with torch.no_grad():  # move away from the zero-output init so the trajectory and encoder outputs evolve
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval().requires_grad_(False)


def template(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, RES, RES, generator=g), torch.randint(K_CLASSES, (n,), generator=g)


def test_sharing_disabled_equals_plain_euler(net: DDT) -> None:
    noise, y = template()
    ts = uniform_grid(N_STEPS)
    plain = sample_euler(lambda x, t, y: net(x, t, y), noise, ts, path=LinearPath(), y=y)
    shared = sample_euler_shared(shared_model_fn(net), noise, ts, path=LinearPath(), y=y)
    assert torch.equal(plain, shared)
    every = sample_euler_shared(shared_model_fn(net), noise, ts, path=LinearPath(), y=y, recompute=range(N_STEPS))
    assert torch.equal(plain, every)
    # With guidance (interval included) too.
    guided = sample_euler(cfg(lambda x, t, y: net(x, t, y), 2.0, K_CLASSES, interval=(0.0, 0.7)), noise, ts,
                          path=LinearPath(), y=y)
    guided_shared = sample_euler_shared(cfg_shared(shared_model_fn(net), 2.0, K_CLASSES, interval=(0.0, 0.7)),
                                        noise, ts, path=LinearPath(), y=y)
    assert torch.equal(guided, guided_shared)


@pytest.mark.parametrize("k", [1, 3, 6, N_STEPS])
def test_encoder_runs_exactly_k_times(net: DDT, k: int) -> None:
    noise, y = template(seed=1)
    ts = uniform_grid(N_STEPS)
    sim = encoder_similarity(collect_encoder_outputs(shared_model_fn(net), noise, ts, path=LinearPath(), y=y))
    steps, _ = dp_schedule(sim, k)
    counter = EncoderCounter(net)
    flags: list[bool] = []
    out = sample_euler_shared(shared_model_fn(net), noise, ts, path=LinearPath(), y=y, recompute=steps,
                              callback=lambda d: flags.append(d["recomputed"]))
    assert counter.calls == k == sum(flags)
    assert [i for i, f in enumerate(flags) if f] == steps
    assert bool(torch.isfinite(out).all())
    # Guided everywhere: one batched (cond + uncond) encoder pass per recompute step.
    counter.calls = 0
    sample_euler_shared(cfg_shared(shared_model_fn(net), 2.0, K_CLASSES), noise, ts, path=LinearPath(), y=y,
                        recompute=uniform_steps(N_STEPS, k))
    assert counter.calls == k
    if k < N_STEPS:  # reusing a stale encoder output changes the samples
        plain = sample_euler_shared(shared_model_fn(net), noise, ts, path=LinearPath(), y=y)
        assert not torch.equal(out, plain)


def test_dp_schedule_error_no_larger_than_uniform_on_ddt_templates(net: DDT) -> None:
    noise, y = template(n=8, seed=2)  # DDT: 8 fixed template samples with random classes
    ts = uniform_grid(N_STEPS)
    outs = collect_encoder_outputs(shared_model_fn(net), noise, ts, path=LinearPath(), y=y)
    assert len(outs) == N_STEPS and outs[0].shape == (8, (RES // 4) ** 2, net.hidden_size)
    sim = encoder_similarity(outs)
    assert float(sim.min()) < 0.999  # the encoder output really changes along the trajectory
    strictly_better = 0
    for k in range(1, N_STEPS + 1):
        steps, err = dp_schedule(sim, k)
        uni = uniform_schedule_error(sim, k)
        assert err <= uni + 1e-12, (k, steps, err, uni)
        assert err == pytest.approx(schedule_error(sim, steps), abs=1e-12)
        if k in (3, 4):
            assert err == pytest.approx(brute_force_schedule(sim, k)[1], abs=1e-12)
        strictly_better += err < uni - 1e-9
    assert strictly_better > 0  # on real statistics the DP finds better schedules than even spacing
    assert dp_schedule(sim, N_STEPS)[1] == pytest.approx(0.0, abs=1e-6)  # float32 features: sim[i, i] ~ 1
