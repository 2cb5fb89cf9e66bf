"""DDT backbone: exact parameter counts, encoder cache, reference-formula equivalence, features, extra token."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from gen.models import DDT
from gen.utils.build import build
from tests.presets import micro as micro_model
from tests.presets import model_preset

# Official parameter counts of MCG-NJU/DDT src/models/denoiser/decoupled_improved_dit.py (patch 2, input
# 32x32x4, 1000 classes): XL = 28 blocks 1152 wide 16 heads (22 enc), L = 24/1024/16 (20 enc), B = 12/768/12 (8 enc).
OFFICIAL_COUNTS = {"XL": 674_646_352, "L": 457_648_144, "B": 130_262_800}


@pytest.mark.parametrize("preset", sorted(OFFICIAL_COUNTS))
def test_official_parameter_counts(preset: str) -> None:
    with torch.device("meta"):
        m = model_preset(f"ddt_{preset.lower()}", input_size=32, in_channels=4, num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == OFFICIAL_COUNTS[preset]
    assert all(p.requires_grad for p in m.parameters())  # no absolute position table


def micro(**kw) -> DDT:
    torch.manual_seed(0)
    return micro_model("ddt", input_size=16, in_channels=3, num_classes=10, **kw)


def perturb(m: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))


def inputs(B: int = 2):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 3, 16, 16, generator=g), torch.rand(B, generator=g), torch.tensor([1, 10][:B])


def test_zero_output_at_init() -> None:
    x, t, y = inputs()
    out = micro()(x, t, y).out
    assert out.shape == (2, 3, 16, 16) and torch.equal(out, torch.zeros_like(out))


def test_cached_encoder_output_equals_full_forward() -> None:
    m = micro().eval()
    perturb(m)
    x, t, y = inputs()
    res = m(x, t, y)
    full, z = res.out, res.encoder_out
    assert z.shape == (2, 16, 64)
    cached = m(x, t, y, encoder_out=z)
    assert torch.equal(cached.out, full) and cached.encoder_out is z
    # with a cache the decoder sees t and y only through z
    assert torch.equal(m(x, t * 0 + 0.3, torch.tensor([4, 5]), encoder_out=z).out, full)
    # a different x with the same z still changes the output (the decoder reads x)
    assert not torch.allclose(m(x + 1, t, y, encoder_out=z).out, full)
    with pytest.raises(ValueError, match="encoder_out must have shape"):
        m(x, t, y, encoder_out=z[:, :5])
    with pytest.raises(ValueError, match="encoder blocks"):
        m(x, t, y, encoder_out=z, return_features=[1])


def reference_forward(m: DDT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DDT written out from the paper/reference formulas: unfold patches, complex RoPE, per-token adaLN."""
    B, C, H, W = x.shape
    p, D, nh = m.patch_size, m.hidden_size, m.blocks[0].attn.num_heads
    dh = D // nh
    gh, gw = H // p, W // p
    patches = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, C p p)
    # DDT RoPE: shared freqs theta^(-4k/dh), complex pairs alternate x and y coordinates in [0, 16]
    freqs = 1.0 / (10000 ** (torch.arange(0, dh, 4)[: dh // 4].float() / dh))
    yy, xx = torch.meshgrid(torch.linspace(0, 16, gh), torch.linspace(0, 16, gw), indexing="ij")
    cis = torch.stack(
        [torch.polar(torch.ones(gh * gw, dh // 4), torch.outer(xx.reshape(-1), freqs)),
         torch.polar(torch.ones(gh * gw, dh // 4), torch.outer(yy.reshape(-1), freqs))], -1
    ).reshape(gh * gw, dh // 2)  # fmt: skip

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def block(blk, v, cond):
        mods = blk.adaLN_modulation(cond)
        if mods.dim() == 2:
            mods = mods[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = mods.chunk(6, -1)
        h = rms(v, blk.norm1.weight) * (1 + sc1) + sh1
        q, k, vv = blk.attn.qkv(h).reshape(B, -1, 3, nh, dh).unbind(2)  # (B, N, nh, dh)
        q, k = rms(q, blk.attn.q_norm.weight), rms(k, blk.attn.k_norm.weight)
        q = torch.view_as_real(torch.view_as_complex(q.reshape(B, -1, nh, dh // 2, 2)) * cis[None, :, None]).flatten(3)
        k = torch.view_as_real(torch.view_as_complex(k.reshape(B, -1, nh, dh // 2, 2)) * cis[None, :, None]).flatten(3)
        q, k, vv = (a.transpose(1, 2) for a in (q, k, vv))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ vv
        v = v + g1 * blk.attn.proj(att.transpose(1, 2).reshape(B, -1, D))
        h = rms(v, blk.norm2.weight) * (1 + sc2) + sh2
        a, b = blk.mlp.w12(h).chunk(2, -1)
        return v + g2 * blk.mlp.w3(F.silu(a) * b)

    t_freq = t[:, None] * torch.exp(-math.log(10.0) * torch.arange(128) / 128)[None]
    t_emb = m.t_embedder.mlp(torch.cat([t_freq.cos(), t_freq.sin()], -1))
    c = F.silu(t_emb + m.y_embedder.embedding_table.weight[y])
    s = m.s_embedder(patches)
    for blk in m.blocks[: m.num_encoder_blocks]:
        s = block(blk, s, c)
    z = F.silu(t_emb[:, None] + s)
    h = m.x_embedder(patches)
    for blk in m.blocks[m.num_encoder_blocks :]:
        h = block(blk, h, z)
    shift, scale = m.final_layer.adaLN_modulation(z).chunk(2, -1)
    h = F.layer_norm(h, (D,), eps=1e-6) * (1 + scale) + shift
    out = m.final_layer.linear(h)
    return F.fold(out.transpose(1, 2), (H, W), kernel_size=p, stride=p)


def test_matches_reference_formulas() -> None:
    m = micro().eval()
    perturb(m)
    x, t, y = inputs()
    torch.testing.assert_close(m(x, t, y).out, reference_forward(m, x, t, y), atol=1e-5, rtol=1e-4)


def test_features_and_extra_token() -> None:
    base, m = micro(), micro(extra_token_dim=8)
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in base.parameters()) == (
        (8 * 64 + 64) + 2 * 64 + (64 * 8 + 8)
    )
    x, t, y = inputs()
    e = torch.randn(2, 8)
    res = base(x, t, y, return_features=[3, 1])
    assert res.out.shape == (2, 3, 16, 16) and [f.shape for f in res.features] == [(2, 16, 64)] * 2
    res = m(x, t, y, extra_token=e, return_features=[2])
    assert res.extra.shape == (2, 8) and torch.equal(res.extra, torch.zeros_like(res.extra))
    assert res.features[0].shape == (2, 17, 64) and res.encoder_out.shape == (2, 17, 64)
    perturb(m)
    res = m(x, t, y, extra_token=e)
    assert res.extra.abs().sum() > 0
    res2 = m(x, t, y, extra_token=e, encoder_out=res.encoder_out)
    assert torch.equal(res2.out, res.out) and torch.equal(res2.extra, res.extra)
    assert not torch.allclose(res.out, m(x, t, y, extra_token=e + 1).out)
    with pytest.raises(ValueError, match="extra_token_dim"):
        base(x, t, y, extra_token=e)


def test_backward_reaches_all_parameters() -> None:
    m = micro()
    perturb(m)
    x, t, y = inputs()
    m(x, t, y).out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters() if p is not m.y_embedder.embedding_table.weight)


def test_bad_inputs_raise() -> None:
    m = micro()
    _, t, y = inputs()
    with pytest.raises(ValueError, match=r"in_channels=3.*4 channels"):
        m(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"not divisible by patch_size=4"):
        m(torch.randn(2, 3, 10, 10), t, y)
    with pytest.raises(ValueError, match=r"input_size=16.*32x32"):
        m(torch.randn(2, 3, 32, 32), t, y)
    with pytest.raises(ValueError, match="num_encoder_blocks"):
        DDT(depth=4, num_encoder_blocks=4)


def test_config_roundtrip() -> None:
    m = micro(extra_token_dim=4)
    m2 = build(json.loads(json.dumps(m.config)))
    assert type(m2) is DDT and m2.config == m.config
    m2.load_state_dict(m.state_dict())
