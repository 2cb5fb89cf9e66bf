"""LightningDiT (the DiT class with RMSNorm, SwiGLU and 2D RoPE): exact parameter counts, init, RoPE wiring,
features, REG extra token, SwiGLU width, validation."""

from __future__ import annotations

import json

import pytest
import torch

from gen.models import DiT
from gen.nn import RMSNorm, SwiGLU, rope_2d_axial, swiglu_hidden
from gen.utils.build import build
from tests.presets import micro as micro_model
from tests.presets import model_preset

# Official (total, trainable) parameter counts of hustvl/LightningDiT models/lightningdit.py with the final
# config (SwiGLU, RMSNorm, RoPE, no qk-norm, learn_sigma=False), input 16x16x32, 1000 classes. The total
# includes the frozen pos_embed stored as a Parameter.
OFFICIAL_COUNTS = {
    "B/1": (130_556_192, 130_359_584),
    "B/2": (130_556_288, 130_507_136),
    "L/2": (458_153_056, 458_087_520),
    "XL/1": (675_256_736, 674_961_824),
    "XL/2": (675_256_832, 675_183_104),
    "1p0B/1": (1_029_401_120, 1_029_007_904),
    "1p6B/1": (1_631_767_120, 1_631_308_368),
}


def counts(m: torch.nn.Module) -> tuple[int, int]:
    ps = list(m.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


@pytest.mark.parametrize("preset", sorted(OFFICIAL_COUNTS))
def test_official_parameter_counts(preset: str) -> None:
    size, patch = preset.split("/")
    with torch.device("meta"):
        m = model_preset(f"lightningdit_{size.lower()}1", patch_size=int(patch), input_size=16, in_channels=32,
                         num_classes=1000)
    assert counts(m) == OFFICIAL_COUNTS[preset]


def test_swiglu_width_rounds_as_upstream() -> None:
    """hustvl/LightningDiT models/lightningdit.py: ``SwiGLUFFN(D, int(2/3 * int(D * mlp_ratio)))``.

    At ratio 2.5 with D = 1152 the official width is 1920, at ratio 8/3 with D = 256 it is 454; the former
    formula ``int(2/3 * ratio * D)`` gave 1919 and 455.
    """
    assert swiglu_hidden(1152, 2.5) == 1920 and swiglu_hidden(256, 8 / 3) == 454
    assert swiglu_hidden(1152, 4.0) == 3072 and swiglu_hidden(64, 4.0) == 170
    with torch.device("meta"):
        m = model_preset("lightningdit_xl1", mlp_ratio=2.5, input_size=16, in_channels=32, num_classes=1000)
    assert m.blocks[0].mlp.hidden == 1920


def micro(**kw) -> DiT:
    torch.manual_seed(0)
    return micro_model("lightningdit", input_size=16, in_channels=3, num_classes=10, **kw)


def perturb(m: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def test_structure() -> None:
    m = micro()
    blk = m.blocks[0]
    assert isinstance(blk.norm1, RMSNorm) and isinstance(blk.mlp, SwiGLU)
    assert blk.mlp.hidden == int(2 / 3 * int(4 * 64)) and blk.mlp.w12.bias is not None
    assert blk.attn.qkv.bias is not None and blk.attn.q_norm is None
    cos, sin = rope_2d_axial(32, 4, 4)
    assert torch.equal(m.rope_cos, cos) and torch.equal(m.rope_sin, sin)
    assert "rope_cos" not in m.state_dict()
    # qk-norm adds an RMSNorm weight of size d_h for q and for k in every block
    assert counts(micro(qk_norm=True))[1] - counts(m)[1] == 2 * 2 * 32


def test_zero_output_at_init() -> None:
    m = micro()
    out = m(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 10])).out
    assert out.shape == (2, 3, 16, 16) and torch.equal(out, torch.zeros_like(out))
    assert micro(learn_sigma=True)(torch.randn(1, 3, 16, 16), 0.5, None).out.shape == (1, 6, 16, 16)


def test_rope_and_qknorm_change_output_and_train() -> None:
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    with_rope, without = micro(), micro(rope=None)
    perturb(with_rope)
    without.load_state_dict(with_rope.state_dict())
    a, b = with_rope(x, t, y).out, without(x, t, y).out
    assert not torch.allclose(a, b)
    q = micro(qk_norm=True)
    perturb(q)
    out = q(x, t, y).out
    out.square().mean().backward()
    assert all(p.grad is not None for p in q.parameters() if p.requires_grad)


def test_return_features_and_extra_token() -> None:
    base, m = micro(), micro(extra_token_dim=8)
    assert counts(m)[1] - counts(base)[1] == (8 * 64 + 64) + 2 * 64 + (64 * 8 + 8)
    x, t, y, e = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1]), torch.randn(2, 8)
    res = base(x, t, y, return_features=[1, 2])
    assert res.out.shape == (2, 3, 16, 16) and [f.shape for f in res.features] == [(2, 16, 64)] * 2
    res = m(x, t, y, extra_token=e, return_features=[2])
    assert res.extra.shape == (2, 8) and torch.equal(res.extra, torch.zeros_like(res.extra))
    assert res.features[0].shape == (2, 17, 64)
    perturb(m)
    res = m(x, t, y, extra_token=e)
    assert res.extra.abs().sum() > 0
    assert not torch.allclose(res.out, m(x, t, y, extra_token=e + 1).out)
    with pytest.raises(ValueError, match="extra_token_dim"):
        base(x, t, y, extra_token=e)
    with pytest.raises(ValueError, match="return_features"):
        base(x, t, y, return_features=[3])


def test_bad_inputs_raise() -> None:
    m = micro()
    t, y = torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"in_channels=3.*32 channels"):
        m(torch.randn(2, 32, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"not divisible by patch_size=4"):
        m(torch.randn(2, 3, 14, 14), t, y)
    with pytest.raises(ValueError, match=r"input_size=16.*8x8"):
        m(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match="divisible by 4"):
        DiT(input_size=8, patch_size=1, in_channels=3, hidden_size=36, depth=1, num_heads=6, rope="axial")


def test_config_roundtrip() -> None:
    m = micro(qk_norm=True, extra_token_dim=4)
    m2 = build(json.loads(json.dumps(m.config)))
    assert type(m2) is DiT and m2.config == m.config and m2.config["norm"] == "rms"
    m2.load_state_dict(m.state_dict())


def test_matches_reference_formulas() -> None:
    """LightningDiT written out from the reference formulas (EVA-02 RoPE with rotate-half on pairs)."""
    import math

    import torch.nn.functional as F

    m = micro(qk_norm=True).eval()
    perturb(m)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([4, 10])
    D, nh, g = 64, 2, 4
    dh = D // nh
    # rope: dim = dh/2 per axis, freqs theta^(-(0, 2, ..)/dim), each repeated twice; rows then columns
    dim = dh // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    f = torch.outer(torch.arange(g).float(), freqs).repeat_interleave(2, -1)  # (g, dim)
    ang = torch.cat([f[:, None, :].expand(g, g, dim), f[None, :, :].expand(g, g, dim)], -1).reshape(g * g, dh)

    def rot_half(v):
        a, b = v.reshape(*v.shape[:-1], -1, 2).unbind(-1)
        return torch.stack([-b, a], -1).flatten(-2)

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    h = m.x_embedder.proj(x).flatten(2).transpose(1, 2) + m.pos_embed
    half = 128
    args = (t * 1000)[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / half)[None]
    c = m.t_embedder.mlp(torch.cat([args.cos(), args.sin()], -1)) + m.y_embedder.embedding_table.weight[y]
    for blk in m.blocks:
        sh1, sc1, g1, sh2, sc2, g2 = (v[:, None] for v in blk.adaLN_modulation(c).chunk(6, -1))
        a = rms(h, blk.norm1.weight) * (1 + sc1) + sh1
        q, k, v = blk.attn.qkv(a).reshape(2, -1, 3, nh, dh).permute(2, 0, 3, 1, 4)
        q, k = rms(q, blk.attn.q_norm.weight), rms(k, blk.attn.k_norm.weight)
        q, k = (z * ang.cos() + rot_half(z) * ang.sin() for z in (q, k))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), -1) @ v
        h = h + g1 * blk.attn.proj(att.transpose(1, 2).reshape(2, -1, D))
        a = rms(h, blk.norm2.weight) * (1 + sc2) + sh2
        u, w = blk.mlp.w12(a).chunk(2, -1)
        h = h + g2 * blk.mlp.w3(F.silu(u) * w)
    sh, sc = (v[:, None] for v in m.final_layer.adaLN_modulation(c).chunk(2, -1))
    out = m.final_layer.linear(rms(h, m.final_layer.norm_final.weight) * (1 + sc) + sh)
    out = out.reshape(2, g, g, 4, 4, 3).permute(0, 5, 1, 3, 2, 4).reshape(2, 3, 16, 16)
    torch.testing.assert_close(m(x, t, y).out, out, atol=1e-5, rtol=1e-4)
