"""Every backbone x objective: forward, backward and sampling on a micro size (issue 4, "What it must show" 5).

Objectives: rectified flow with uniform t (DiT/SiT recipe), rectified flow with logit-normal t and the cosine
velocity-direction loss (LightningDiT recipe), EDM (preconditioned, lognormal sigma). The networks are perturbed
away from their zero-output init so that every parameter gets a gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gen.models.precond import EDMPrecond
from gen.models.prediction import prediction_path, velocity_model
from gen.objectives import EDMLoss, FlowMatching
from gen.paths import LogitNormalTime, UniformTime
from gen.utils.seed import BatchRandom
from pipeline import Generator, SamplerSpec, run_sampler
from tests.presets import MICRO
from tests.presets import micro as micro_model
from tokenizers.pixels import PixelTokenizer

C, RES, K, B = 1, 16, 5, 4
ARCHS = ("dit", "lightningdit", "ddt")
OBJECTIVES = {
    "rf_uniform": lambda: FlowMatching(time_sampler=UniformTime()),
    "rf_logitnormal_cos": lambda: FlowMatching(time_sampler=LogitNormalTime(0.0, 1.0), cos_velocity_weight=1.0),
    "edm": lambda: EDMLoss(),
}
SAMPLERS = {  # a few steps of each deterministic sampler, on the grid that suits the objective
    "rf_uniform": {"solver": {"_target_": "samplers.sample_euler"}, "steps": 3,
                   "grid": {"_target_": "samplers.grids.uniform_grid"}},
    "rf_logitnormal_cos": {"solver": {"_target_": "samplers.sample_heun"}, "steps": 3,
                           "grid": {"_target_": "samplers.grids.shifted_grid", "shift": 2.0}},
    "edm": {"solver": {"_target_": "samplers.sample_heun"}, "steps": 3,
            "grid": {"_target_": "samplers.grids.karras_grid"}, "guidance": {"scale": 1.5}},
}


def micro(arch: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    net = micro_model(arch, input_size=RES, in_channels=C, num_classes=K, **kw)
    with torch.no_grad():  # leave the zero (adaLN-Zero / zero output) init so gradients reach every layer
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, RES, RES, generator=g) * 2 - 1, torch.randint(K, (B,), generator=g)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward_sample(arch: str, objective: str) -> None:
    net, obj = micro(arch), OBJECTIVES[objective]()
    x0, y = batch()
    out = obj(net, {"x0": x0, "label": y}, BatchRandom(B, torch.Generator().manual_seed(1)))
    loss = out["loss"]
    assert loss.shape == (B,) and bool(torch.isfinite(loss).all())
    assert all(v.shape == (B,) for v in out.values())
    if objective == "rf_logitnormal_cos":
        assert "cos" in out and bool((out["cos"] > 0).all())
    loss.mean().backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == ({"pos_embed"} if arch != "ddt" else set())  # DiT's fixed sincos table is the only exception

    # Sampling through the pipeline: finite states, the right image shape, and labels drawn per seed.
    net.eval()
    spec = SamplerSpec.from_config(SAMPLERS[objective])
    pred = obj.prediction_spec()
    gen = Generator(net, pred, PixelTokenizer(channels=C), (C, RES, RES), K, min_rows=1)
    images, labels = gen.generate([0, 1, 2], spec)
    assert images.dtype == torch.uint8 and images.shape == (3, C, RES, RES) and labels.shape == (3,)
    assert len({img.float().std().item() for img in images}) > 1  # not a constant image per seed
    path = prediction_path(pred)
    with torch.no_grad():
        x = run_sampler(velocity_model(net, pred), torch.randn(3, C, RES, RES), labels, path, spec, torch.randn_like)
    assert x.shape == (3, C, RES, RES) and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("arch", ARCHS)
def test_features_and_extra_token_under_objective_calls(arch: str) -> None:
    """REPA's features and REG's extra token through the objectives' call conventions (flow: ``net(x_t, t, y)``;
    EDM: ``EDMPrecond(net)(x, sigma, y)`` feeding ``c_noise``), with gradients into the extra-token modules."""
    d_extra = 6
    net = micro(arch, extra_token_dim=d_extra)
    depth, dim = net.depth, net.hidden_size
    tokens = (RES // MICRO["ddt" if arch == "ddt" else "dit"]["patch_size"]) ** 2
    x0, y = batch(2)
    e = torch.randn(B, d_extra)
    rf = FlowMatching()
    eps, t, _ = rf.draw(x0, y, K, BatchRandom(B, torch.Generator().manual_seed(3)))
    x_t = rf.path.sample(x0, eps, t)

    res = net(x_t, t, y, return_features=[1, depth], extra_token=e)
    out, extra, feats = res.out, res.extra, res.features
    assert out.shape == x0.shape and extra.shape == (B, d_extra)
    assert [f.shape for f in feats] == [(B, 1 + tokens, dim)] * 2
    # Features alone, and the image output does not depend on asking for them.
    res_f = net(x_t, t, y, return_features=[depth])
    torch.testing.assert_close(res_f.out, net(x_t, t, y).out)
    assert res_f.features[0].shape == (B, tokens, dim)

    # EDM: the preconditioner passes the kwargs through and preconditions only the image output.
    edm = EDMLoss()
    sigma = edm.time_sampler(BatchRandom(B, torch.Generator().manual_seed(4)))
    x_s = edm.path.sample(x0, eps, sigma)
    pre = EDMPrecond(net, edm.sigma_data)
    r = pre(x_s, sigma, y, return_features=[1], extra_token=e)
    d, d_extra_out, d_feats = r.out, r.extra, r.features
    torch.testing.assert_close(d, pre(x_s, sigma, y, extra_token=e).out)
    assert d.shape == x0.shape and d_extra_out.shape == (B, d_extra) and d_feats[0].shape == (B, 1 + tokens, dim)
    r_plain = pre(x_s, sigma, y, return_features=[1])
    assert r_plain.out.shape == x0.shape and r_plain.features[0].shape == (B, tokens, dim)

    # A REG-style loss on the extra output plus a REPA-style loss on block-1 features trains the extra modules.
    (extra.square().mean() + feats[0].square().mean() + d_extra_out.square().mean()).backward()
    for name in ("extra_embed.weight", "extra_head.weight"):
        grad = dict(net.named_parameters())[name].grad
        assert grad is not None and bool(grad.abs().sum() > 0), name
