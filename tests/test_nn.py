"""Closed-form and property tests for gen.nn building blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gen.nn import (
    Attention,
    LabelEmbedder,
    PatchEmbed,
    RMSNorm,
    SwiGLU,
    TimestepEmbedder,
    apply_rope,
    modulate,
    rope_2d_axial,
    rope_2d_mixed,
    rope_prepend_identity,
    rotate_pairs,
    sincos_2d,
    swiglu_hidden,
    timestep_features,
)


def test_sincos_2d_closed_form() -> None:
    dim, g = 16, 5
    table = sincos_2d(dim, g).double()
    assert table.shape == (g * g, dim)
    q = dim // 4  # frequencies per sin/cos block
    for r in range(g):
        for c in range(g):
            n = r * g + c
            for i in range(q):
                w = 10000 ** (-i / q)
                # first half: column index; second half: row index; each [sin..., cos...]
                assert table[n, i].item() == pytest.approx(math.sin(c * w), abs=1e-6)
                assert table[n, q + i].item() == pytest.approx(math.cos(c * w), abs=1e-6)
                assert table[n, 2 * q + i].item() == pytest.approx(math.sin(r * w), abs=1e-6)
                assert table[n, 3 * q + i].item() == pytest.approx(math.cos(r * w), abs=1e-6)


def test_sincos_bad_dim() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(10, 4)


def test_timestep_features_closed_form() -> None:
    t = torch.tensor([0.0, 0.5, 3.0])
    for max_period in (10000.0, 10.0):
        f = timestep_features(t, 8, max_period)
        freqs = [max_period ** (-i / 4) for i in range(4)]
        expected = torch.tensor([[math.cos(s * w) for w in freqs] + [math.sin(s * w) for w in freqs] for s in t.tolist()])
        torch.testing.assert_close(f, expected)
    assert timestep_features(t, 7).shape == (3, 7)


def test_timestep_embedder_time_scale() -> None:
    torch.manual_seed(0)
    a = TimestepEmbedder(16, time_scale=1000.0)
    b = TimestepEmbedder(16, time_scale=1.0)
    b.load_state_dict(a.state_dict())
    t = torch.rand(4)
    torch.testing.assert_close(a(t), b(t * 1000))


def test_rmsnorm_matches_formula() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    # fp32 compute for bf16 inputs: same result as fp32 up to the final cast
    xb = x.bfloat16()
    ref = (xb.float() / torch.sqrt((xb.float() ** 2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm.weight.bfloat16()
    torch.testing.assert_close(norm.bfloat16()(xb), ref)


def test_swiglu_formula_and_hidden() -> None:
    assert swiglu_hidden(1152) == 3072
    assert swiglu_hidden(768) == 2048
    torch.manual_seed(0)
    m = SwiGLU(8, 12, bias=False)
    assert m.w12.bias is None and m.w3.bias is None
    x = torch.randn(2, 8)
    w1, w2 = m.w12.weight[:12], m.w12.weight[12:]
    expected = (F.silu(x @ w1.T) * (x @ w2.T)) @ m.w3.weight.T
    torch.testing.assert_close(m(x), expected)
    assert sum(p.numel() for p in SwiGLU(8, 12).parameters()) == 8 * 24 + 24 + 12 * 8 + 8


def test_modulate_broadcast_and_per_token() -> None:
    x = torch.randn(2, 3, 4)
    s, c = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(modulate(x, s, c), x * (1 + c[:, None]) + s[:, None])
    s3, c3 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(modulate(x, s3, c3), x * (1 + c3) + s3)


def test_label_embedder_is_a_lookup_with_a_null_row() -> None:
    torch.manual_seed(0)
    emb = LabelEmbedder(10, 4)
    assert emb.embedding_table.num_embeddings == 11 and emb.null_class == 10
    y = torch.arange(11)
    torch.testing.assert_close(emb.train()(y), emb.embedding_table.weight)
    torch.testing.assert_close(emb.eval()(y), emb.embedding_table.weight)


def test_drop_labels_draws_one_uniform_per_sample() -> None:
    from gen.objectives.base import drop_labels
    from gen.utils.seed import BatchRandom

    y = torch.arange(10).repeat(100)
    d = drop_labels(y, 0.5, 10, BatchRandom(1000, torch.Generator().manual_seed(0)))
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d, torch.where(u < 0.5, 10, y))
    assert 0.4 < (d == 10).float().mean().item() < 0.6
    assert torch.equal(drop_labels(y, 0.0, 10, BatchRandom(1000)), y)


def test_patch_embed_is_patch_linear() -> None:
    torch.manual_seed(0)
    pe = PatchEmbed(3, 8, 4)
    x = torch.randn(2, 3, 8, 12)
    out = pe(x)
    assert out.shape == (2, 6, 8)
    # token (row 1, col 2) equals the linear map of that patch
    patch = x[:, :, 4:8, 8:12].reshape(2, -1)
    torch.testing.assert_close(out[:, 1 * 3 + 2], patch @ pe.proj.weight.reshape(8, -1).T + pe.proj.bias)


@pytest.mark.parametrize("table", [rope_2d_axial, rope_2d_mixed])
def test_rope_preserves_norm_and_is_relative(table) -> None:
    torch.manual_seed(0)
    d, H, W = 16, 4, 5
    cos, sin = table(d, H, W)
    assert cos.shape == sin.shape == (H * W, d)
    q = torch.randn(1, 1, 1, d).expand(1, 1, H * W, d)
    k = torch.randn(1, 1, 1, d).expand(1, 1, H * W, d)
    qr, kr = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    dots = (qr[0, 0] @ kr[0, 0].T)  # (N, N) for the same q, k at every position
    # q at (r1, c1) · k at (r2, c2) depends only on (r1 - r2, c1 - c2)
    for n1 in range(H * W):
        for n2 in range(H * W):
            r1, c1, r2, c2 = n1 // W, n1 % W, n2 // W, n2 % W
            if r1 + 1 < H and c1 + 1 < W and r2 + 1 < H and c2 + 1 < W:
                shifted = dots[(r1 + 1) * W + c1 + 1, (r2 + 1) * W + c2 + 1]
                torch.testing.assert_close(dots[n1, n2], shifted, atol=1e-5, rtol=1e-5)


def test_rope_axial_layout() -> None:
    d, H, W = 8, 3, 4
    cos, sin = rope_2d_axial(d, H, W)
    ang = torch.atan2(sin, cos)
    n = 2 * W + 3  # row 2, col 3
    # first half: row * freqs (each twice); second half: column * freqs; freqs = 10000^(-2k/(d/2))
    f = [10000 ** (-2 * k / 4) for k in range(2)]
    expected = [2 * f[0]] * 2 + [2 * f[1]] * 2 + [3 * f[0]] * 2 + [3 * f[1]] * 2
    torch.testing.assert_close(ang[n], torch.tensor(expected))


def test_rope_mixed_layout() -> None:
    d, H, W = 8, 3, 5
    cos, sin = rope_2d_mixed(d, H, W)
    n = 1 * W + 2  # row 1, col 2
    xs, ys = 2 * 16 / (W - 1), 1 * 16 / (H - 1)
    f = [10000 ** (-4 * k / d) for k in range(2)]
    expected = torch.tensor([xs * f[0], ys * f[0], xs * f[1], ys * f[1]]).repeat_interleave(2)
    torch.testing.assert_close(cos[n], expected.cos())
    torch.testing.assert_close(sin[n], expected.sin())


def test_rope_equals_complex_product() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 8)
    cos, sin = rope_2d_mixed(8, 2, 3)
    ang = torch.atan2(sin[:, ::2], cos[:, ::2])
    z = torch.view_as_complex(x.reshape(2, 3, 6, 4, 2).contiguous()) * torch.polar(torch.ones_like(ang), ang)
    torch.testing.assert_close(apply_rope(x, cos, sin), torch.view_as_real(z).flatten(-2))
    assert torch.equal(rotate_pairs(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-2.0, 1.0, -4.0, 3.0]))
    c2, s2 = rope_prepend_identity(cos, sin)
    y = apply_rope(x[:, :, :1], c2[:1], s2[:1])
    torch.testing.assert_close(y, x[:, :, :1])


def test_rope_bad_head_dim() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_axial(6, 2, 2)


def test_attention_matches_manual() -> None:
    torch.manual_seed(0)
    attn = Attention(16, 2, qkv_bias=True)
    x = torch.randn(2, 5, 16)
    qkv = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    expected = attn.proj(a.transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), expected)
    with pytest.raises(ValueError):
        Attention(10, 3)
    with pytest.raises(ValueError):
        Attention(16, 2, qk_norm="batch")
    qk = Attention(16, 2, qk_norm="rms")
    cos, sin = rope_2d_axial(8, 1, 5)
    assert qk(x, (cos, sin)).shape == (2, 5, 16)
    assert sum(p.numel() for p in qk.parameters()) == 16 * 48 + 48 + 16 * 16 + 16 + 2 * 8


def test_rmsnorm_without_weight_and_bf16_path() -> None:
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(RMSNorm(8, affine=False)(x), x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6))
    assert RMSNorm(8, affine=False).weight is None


def test_apply_rope_strided_and_bf16_inputs() -> None:
    torch.manual_seed(0)
    cos, sin = rope_2d_axial(8, 2, 3)
    base = torch.randn(2, 6, 3, 2, 8)  # (B, N, 3, heads, d) like a fused qkv output
    k = base.permute(2, 0, 3, 1, 4)[1]  # strided view, as k from a fused qkv projection
    expected = k.contiguous() * cos + rotate_pairs(k.contiguous()) * sin
    torch.testing.assert_close(apply_rope(k, cos, sin), expected)
    odd = torch.randn(2, 1, 6, 9)[..., 1:]  # odd storage offset forces the contiguous fallback
    torch.testing.assert_close(apply_rope(odd, cos, sin), odd * cos + rotate_pairs(odd) * sin)
    out = apply_rope(k.bfloat16(), cos, sin)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


def test_gated_residual() -> None:
    from gen.nn import gated_residual

    x, h, g = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 4)
    torch.testing.assert_close(gated_residual(x, g, h), x + g[:, None] * h)
