"""iCT objective and consistency sampler: closed forms, direct recomputations and refusals.

Covers: N(k) is the paper's sequence; c = 0.00054 sqrt(D); f(x, sigma_min) = x bit for bit; the level probabilities
are the erf formula and the per-sample draw follows them; the iCT loss (and its gradient) equals a direct
computation that uses one dropout mask for both passes; the 1- and 2-step sampler equal a direct computation;
ODE samplers are refused for consistency models and the consistency sampler for other models.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gen.models.common import ModelOutput
from gen.models.precond import ConsistencyPrecond
from gen.models.prediction import velocity_model
from gen.objectives import EDMLoss, ImprovedConsistencyTraining
from gen.objectives.consistency import ict_num_levels, karras_levels, lognormal_level_probs, pseudo_huber_c
from gen.paths import EDMPath
from gen.utils.seed import BatchRandom
from pipeline import SamplerSpec, check_sampler, check_solver_fits
from samplers import consistency_grid, sample_consistency


class DropNet(nn.Module):
    """A tiny backbone with dropout: F(x, t) = conv(dropout(x)) + t, so the mask changes the output."""

    num_classes = 3

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.drop = nn.Dropout(p)

    def forward(self, x, t, y=None, **kw):  # noqa: ANN001, ANN201
        return ModelOutput(self.conv(self.drop(x)) + t.reshape(-1, 1, 1, 1).to(x.dtype))


def test_num_levels_is_the_papers_sequence() -> None:
    K = 400_000
    assert [ict_num_levels(s * 50_000, K) for s in range(8)] == [11, 21, 41, 81, 161, 321, 641, 1281]
    assert ict_num_levels(49_999, K) == 11 and ict_num_levels(50_000, K) == 21 and ict_num_levels(K, K) == 1281
    with pytest.raises(ValueError, match="s0 <= s1"):
        ict_num_levels(0, K, 20, 10)


def test_pseudo_huber_constant_and_loss_use_it() -> None:
    assert pseudo_huber_c(3 * 32 * 32) == 0.00054 * math.sqrt(3072)
    assert abs(pseudo_huber_c(3 * 32 * 32) - 0.029929) < 1e-6  # CIFAR-10, as the paper quotes (~0.03)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_is_identity_bit_for_bit(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    f = ConsistencyPrecond(DropNet(0.0), 0.5, 0.002)
    x = torch.randn(4, 2, 5, 5, dtype=dtype) * 3
    f.net.to(dtype)
    for sigma in (0.002, torch.full((4,), 0.002, dtype=dtype), torch.full((4,), 0.002, dtype=torch.float32)):
        assert torch.equal(f(x, sigma).out, x)
    assert not torch.equal(f(x, 0.01).out, x)  # away from the boundary the network matters


def test_level_probabilities_equal_the_erf_formula_and_the_draw_follows_them() -> None:
    sig = karras_levels(21)
    assert sig[0] == 0.002 and sig[-1] == 80.0
    ref = [(0.002 ** (1 / 7) + i / 20 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for i in range(21)]
    assert torch.allclose(sig, torch.tensor(ref, dtype=torch.float64), rtol=1e-12)
    p = lognormal_level_probs(sig, -1.1, 2.0)
    e = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in ref]
    w = [e[i + 1] - e[i] for i in range(20)]
    assert torch.allclose(p, torch.tensor([v / sum(w) for v in w], dtype=torch.float64), rtol=1e-10)
    # Inverting the CDF at evenly spread uniforms reproduces the probabilities to 1/M.
    obj = ImprovedConsistencyTraining()
    M = 100_000
    idx = obj.level_index(sig, (torch.arange(M, dtype=torch.float64) + 0.5) / M)
    freq = torch.bincount(idx, minlength=20).double() / M
    assert float((freq - p).abs().max()) <= 1.0 / M + 1e-12


def _direct_ict(net: nn.Module, x0: torch.Tensor, seed: int, n_levels: int, mask_seed: int) -> torch.Tensor:
    """The iCT loss written out from the paper: the same z, the same dropout mask, a detached teacher."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((x0.shape[0],), generator=g)
    z = torch.randn(x0.shape, generator=g)
    sig = [(0.002 ** (1 / 7) + i / (n_levels - 1) * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for i in range(n_levels)]
    sig[0], sig[-1] = 0.002, 80.0
    e = [math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in sig]
    w = [e[i + 1] - e[i] for i in range(n_levels - 1)]
    cdf = torch.tensor(w, dtype=torch.float64).cumsum(0) / sum(w)
    n = torch.searchsorted(cdf, u.double(), right=True).clamp(max=n_levels - 2)

    def f(x, s):  # noqa: ANN001, ANN202
        s64 = torch.tensor(s, dtype=torch.float64)
        c_skip = 0.25 / ((s64 - 0.002) ** 2 + 0.25)
        c_out = 0.5 * (s64 - 0.002) / (s64**2 + 0.25).sqrt()
        c_in = 1 / (s64**2 + 0.25).sqrt()
        sf = torch.tensor([s], dtype=torch.float32)
        out = net((c_in * x.double()).float(), (torch.log(sf.double()) / 4).float(), None).out
        return (c_skip * x.double() + c_out * out.double()).float()

    c = 0.00054 * math.sqrt(x0[0].numel())
    losses = []
    for i in range(x0.shape[0]):
        lo, hi = sig[int(n[i])], sig[int(n[i]) + 1]
        lo32, hi32 = float(torch.tensor(lo, dtype=torch.float32)), float(torch.tensor(hi, dtype=torch.float32))
        x_hi = (x0[i : i + 1].double() + hi * z[i : i + 1].double()).float()
        x_lo = (x0[i : i + 1].double() + lo * z[i : i + 1].double()).float()
        torch.manual_seed(mask_seed + i)
        a = f(x_hi, hi32)
        torch.manual_seed(mask_seed + i)  # the same mask for the teacher
        with torch.no_grad():
            b = f(x_lo, lo32)
        d = ((a - b) ** 2).sum().add(c * c).sqrt() - c
        losses.append(d / (hi - lo))
    return torch.stack(losses).float()


def test_ict_loss_equals_direct_computation_with_one_dropout_mask() -> None:
    torch.manual_seed(0)
    net = DropNet(0.5).train()
    obj = ImprovedConsistencyTraining()
    x0 = torch.randn(3, 2, 4, 4)
    # One sample per call, so each call's dropout stream is seeded the same way as the direct computation.
    got, grads = [], []
    for i in range(3):
        torch.manual_seed(100 + i)
        rng = BatchRandom(1, torch.Generator().manual_seed(7 + i))
        net.zero_grad()
        out = obj(net, {"x0": x0[i : i + 1]}, rng)
        out["loss"].sum().backward()
        got.append(out["loss"].detach())
        grads.append(net.conv.weight.grad.clone())
    for i in range(3):
        net.zero_grad()
        want = _direct_ict(net, x0[i : i + 1], 7 + i, 11, 100 + i)
        want.sum().backward()
        assert torch.allclose(got[i], want, rtol=1e-5, atol=1e-6), (got[i], want)
        assert torch.allclose(grads[i], net.conv.weight.grad, rtol=1e-4, atol=1e-6)
    # A teacher with its own dropout mask gives another loss: the test can tell.
    net.zero_grad()
    torch.manual_seed(100)
    a = obj(net, {"x0": x0[:1]}, BatchRandom(1, torch.Generator().manual_seed(7)))["loss"]
    other = _direct_ict_other_mask(net, x0[:1])
    assert not torch.allclose(a.detach(), other, rtol=1e-3)


def _direct_ict_other_mask(net: nn.Module, x0: torch.Tensor) -> torch.Tensor:
    """Like ``_direct_ict`` for sample 0 but with a different mask in the teacher pass."""
    orig = torch.manual_seed
    calls = []

    def seeded(s):  # noqa: ANN001, ANN202
        calls.append(s)
        return orig(s + 1000 * (len(calls) - 1))

    torch.manual_seed = seeded  # type: ignore[assignment]
    try:
        return _direct_ict(net, x0, 7, 11, 100).detach()
    finally:
        torch.manual_seed = orig  # type: ignore[assignment]


class LabelNet(DropNet):
    """DropNet plus a class offset, recording every label batch it sees: the labels must reach both passes."""

    def __init__(self) -> None:
        super().__init__(0.0)
        self.emb = nn.Embedding(self.num_classes + 1, 1)  # + the null class of classifier-free guidance
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, y=None, **kw):  # noqa: ANN001, ANN201
        self.seen.append(y.clone())
        return ModelOutput(super().forward(x, t).out + self.emb(y).reshape(-1, 1, 1, 1))


def test_ict_conditions_both_passes_on_the_labels_and_the_loss_depends_on_them() -> None:
    x0 = torch.randn(4, 2, 4, 4)
    y = torch.tensor([0, 1, 2, 1])
    net = LabelNet()
    with torch.no_grad():
        net.emb.weight.copy_(torch.tensor([[0.0], [1.0], [-2.0], [5.0]]))

    def loss(labels: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        obj = ImprovedConsistencyTraining(label_dropout=dropout)
        return obj(net, {"x0": x0, "label": labels}, BatchRandom(4, torch.Generator().manual_seed(3)))["loss"]

    a = loss(y)
    assert len(net.seen) == 2 and all(torch.equal(s, y) for s in net.seen)  # student and target passes
    assert not torch.allclose(a, loss(torch.tensor([2, 0, 1, 0]))), "the labels must change the loss"
    net.seen.clear()
    loss(y, dropout=1.0)
    assert all(torch.equal(s, torch.full((4,), 3)) for s in net.seen)  # every label dropped to the null class


def test_ict_follows_progress_and_records_a_consistency_spec() -> None:
    from gen.train.method import Progress

    obj = ImprovedConsistencyTraining()
    assert obj.num_levels(Progress(0, 400_000, 0)) == 11 and obj.num_levels(Progress(349_999, 400_000, 0)) == 641
    out = obj(DropNet(0.0), {"x0": torch.randn(4, 2, 4, 4)}, BatchRandom(4, torch.Generator().manual_seed(0)),
              Progress(350_000, 400_000, 0))
    assert torch.equal(out["levels"], torch.full((4,), 1281.0)) and out["loss"].shape == (4,)
    spec = obj.prediction_spec()
    assert spec["prediction"] == "consistency" and spec["precond"]["sigma_min"] == 0.002
    assert spec["precond"]["_target_"] == "gen.models.precond.ConsistencyPrecond"


@pytest.mark.parametrize("mids", [[], [0.821]])
def test_consistency_sampler_equals_direct_computation(mids: list[float]) -> None:
    torch.manual_seed(0)
    net = DropNet(0.0).double().eval()
    spec = ImprovedConsistencyTraining().prediction_spec()
    model_fn = velocity_model(net, spec)
    noise = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    ts = consistency_grid(len(mids) + 1, mids, path=EDMPath(80.0))
    assert ts.tolist() == [80.0, *mids, 0.0]
    g = torch.Generator().manual_seed(5)
    got = sample_consistency(model_fn, noise, ts, path=EDMPath(80.0),
                             randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    f = ConsistencyPrecond(net, 0.5, 0.002)
    g2 = torch.Generator().manual_seed(5)
    with torch.no_grad():
        want = f(80.0 * noise, 80.0).out
        for tau in mids:
            want = f(want + math.sqrt(tau**2 - 0.002**2) * torch.randn(want.shape, generator=g2, dtype=want.dtype), tau).out
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def _preset(name: str) -> SamplerSpec:
    import yaml

    from tests.test_consistency import ROOT

    return SamplerSpec.from_config(yaml.safe_load((ROOT / "configs" / "sampler" / f"{name}.yaml").read_text()))


from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_presets_and_refusals() -> None:
    cm = ImprovedConsistencyTraining().prediction_spec()
    edm = EDMLoss().prediction_spec()
    for name in ("consistency", "consistency_2step"):
        check_sampler(_preset(name), cm, 3)  # runs on the stand-in model
        with pytest.raises(ValueError, match="samples consistency models only.*use an ODE sampler"):
            check_sampler(_preset(name), edm, 3)
    assert _preset("consistency_2step").time_grid(EDMPath(80.0)).tolist() == [80.0, 0.821, 0.0]
    for name in ("euler", "heun", "euler_maruyama"):
        with pytest.raises(ValueError, match="is a consistency model.*sampler=consistency"):
            check_solver_fits(_preset(name), cm)
    with pytest.raises(ValueError, match="steps=2 needs 1 intermediate"):
        consistency_grid(2, [])
    with pytest.raises(ValueError, match="descend strictly"):
        consistency_grid(2, [90.0])
