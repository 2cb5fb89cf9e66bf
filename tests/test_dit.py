"""DiT backbone: exact parameter counts, adaLN-Zero init, features, REG extra token, input validation."""

from __future__ import annotations

import json

import pytest
import torch

from gen.models import build_model
from gen.models.dit import DiT, PRESETS, dit
from gen.nn import sincos_2d

# Trainable parameter counts of the official implementation (facebookresearch/DiT models.py, instantiated
# with input_size=32, in_channels=4, num_classes=1000, learn_sigma=True; frozen pos_embed excluded),
# as recorded in shared/methods/backbones.md §1.4.
OFFICIAL_COUNTS = {
    "S/2": 32_865_056, "S/4": 32_920_448, "S/8": 33_142_016,
    "B/2": 130_315_808, "B/4": 130_426_496, "B/8": 130_869_248,
    "L/2": 457_840_672, "L/4": 457_988_224, "L/8": 458_578_432,
    "XL/2": 674_834_720, "XL/4": 675_000_704, "XL/8": 675_664_640,
}  # fmt: skip


def trainable(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("preset", sorted(OFFICIAL_COUNTS))
def test_official_parameter_counts(preset: str) -> None:
    with torch.device("meta"):
        m = dit(preset, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert trainable(m) == OFFICIAL_COUNTS[preset]
    # the frozen table is the only non-trainable parameter
    assert sum(p.numel() for p in m.parameters()) - trainable(m) == m.pos_embed.numel()


def micro(**kw) -> DiT:
    torch.manual_seed(0)
    return dit("micro", input_size=16, in_channels=3, num_classes=10, **kw)


def test_zero_output_at_init_and_shapes() -> None:
    m = micro(learn_sigma=True)
    x = torch.randn(2, 3, 16, 16)
    out = m(x, torch.rand(2), torch.tensor([1, 10]))
    assert out.shape == (2, 6, 16, 16)
    assert torch.equal(out, torch.zeros_like(out))
    assert micro()(x, torch.rand(2), None).shape == (2, 3, 16, 16)


def test_pos_embed_is_frozen_sincos() -> None:
    m = micro()
    assert not m.pos_embed.requires_grad
    torch.testing.assert_close(m.pos_embed[0], sincos_2d(64, 4))


def perturb(m: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))


def test_forward_backward_nonzero_after_perturbation() -> None:
    m = micro()
    perturb(m)
    x = torch.randn(2, 3, 16, 16)
    out = m(x, torch.rand(2), torch.tensor([0, 3]))
    assert out.abs().sum() > 0
    out.square().mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_time_and_label_change_output() -> None:
    m = micro().eval()
    perturb(m)
    x = torch.randn(1, 3, 16, 16)
    a = m(x, torch.tensor([0.1]), torch.tensor([2]))
    assert not torch.allclose(a, m(x, torch.tensor([0.9]), torch.tensor([2])))
    assert not torch.allclose(a, m(x, torch.tensor([0.1]), torch.tensor([3])))
    # scalar t broadcasts
    torch.testing.assert_close(a, m(x, 0.1, torch.tensor([2])))


def test_label_dropout_only_in_train() -> None:
    m = micro(label_dropout=1.0)
    perturb(m)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    m.train()
    dropped = m(x, t, torch.tensor([1, 2]))
    m.eval()
    null = m(x, t, torch.tensor([10, 10]))
    torch.testing.assert_close(dropped, null)
    assert not torch.allclose(m(x, t, torch.tensor([1, 2])), null)


def test_return_features() -> None:
    m = micro()
    x = torch.randn(2, 3, 16, 16)
    out, feats = m(x, torch.rand(2), torch.tensor([0, 1]), return_features=[2, 1])
    assert out.shape == (2, 3, 16, 16)
    assert [f.shape for f in feats] == [(2, 16, 64)] * 2
    perturb(m)
    out, (f1,) = m(x, torch.rand(2), torch.tensor([0, 1]), return_features=[1])
    assert f1.requires_grad
    for bad in ([0], [3], [1, 1]):
        with pytest.raises(ValueError, match="return_features"):
            m(x, torch.rand(2), torch.tensor([0, 1]), return_features=bad)


def test_extra_token() -> None:
    base = micro()
    m = micro(extra_token_dim=12)
    # the extra modules exist only when asked for: Linear(12, D) + LayerNorm(D) + Linear(D, 12)
    assert trainable(m) - trainable(base) == (12 * 64 + 64) + 2 * 64 + (64 * 12 + 12)
    x, e = torch.randn(2, 3, 16, 16), torch.randn(2, 12)
    out, extra = m(x, torch.rand(2), torch.tensor([0, 1]), extra_token=e)
    assert out.shape == (2, 3, 16, 16) and extra.shape == (2, 12)
    assert torch.equal(extra, torch.zeros_like(extra))  # zero-initialised head
    out, extra, feats = m(x, torch.rand(2), torch.tensor([0, 1]), extra_token=e, return_features=[2])
    assert feats[0].shape == (2, 17, 64)  # the extra token is prepended at index 0
    perturb(m)
    _, extra = m(x, torch.rand(2), torch.tensor([0, 1]), extra_token=e)
    assert extra.abs().sum() > 0
    # the extra token attends with the image tokens: changing it changes the image output
    a = m(x, 0.5, torch.tensor([0, 1]), extra_token=e)[0]
    b = m(x, 0.5, torch.tensor([0, 1]), extra_token=e + 1)[0]
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="extra_token_dim"):
        base(x, torch.rand(2), torch.tensor([0, 1]), extra_token=e)
    with pytest.raises(ValueError, match="extra_token must be"):
        m(x, torch.rand(2), torch.tensor([0, 1]), extra_token=torch.randn(2, 5))


def test_bad_inputs_raise() -> None:
    m = micro()
    t, y = torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"in_channels=3.*4 channels"):
        m(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"not divisible by patch_size=4"):
        m(torch.randn(2, 3, 18, 18), t, y)
    with pytest.raises(ValueError, match=r"input_size=16.*32x32"):
        m(torch.randn(2, 3, 32, 32), t, y)
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(2, 3, 16), t, y)
    with pytest.raises(ValueError, match="t of shape"):
        m(torch.randn(2, 3, 16, 16), torch.rand(3), y)
    with pytest.raises(ValueError, match="y of shape"):
        m(torch.randn(2, 3, 16, 16), t, torch.tensor([1]))
    with pytest.raises(ValueError, match="not divisible"):
        DiT(input_size=30, patch_size=4)
    with pytest.raises(ValueError, match="unknown DiT preset"):
        dit("M/2")


def test_config_roundtrip_and_build_model() -> None:
    m = micro(extra_token_dim=5)
    cfg = json.loads(json.dumps(m.config))
    m2 = build_model(cfg)
    assert type(m2) is DiT and m2.config == m.config
    m2.load_state_dict(m.state_dict())
    import gen.models

    assert gen.models.DiT is DiT  # lazy re-export
    with pytest.raises(AttributeError):
        gen.models.UNet  # noqa: B018
    with pytest.raises(ValueError, match="unknown model arch"):
        build_model({"arch": "unet"})
    with pytest.raises(ValueError, match="'arch'"):
        build_model({"depth": 2})
    with pytest.raises(ValueError, match=r"unknown keys \['width'\]"):
        build_model({"arch": "dit", "width": 3})


def test_presets_table() -> None:
    assert len([k for k in PRESETS if "/" in k]) == 12
    assert PRESETS["XL/2"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2}


def test_matches_reference_formulas() -> None:
    """DiT written out from the paper's equations (timm-style attention, explicit unpatchify)."""
    import math

    import torch.nn.functional as F

    m = micro(learn_sigma=True).eval()
    perturb(m)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([4, 10])
    D, p, nh = 64, 4, 2
    h = m.x_embedder.proj(x).flatten(2).transpose(1, 2) + m.pos_embed
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = (t * 1000)[:, None] * freqs[None]
    c = m.t_embedder.mlp(torch.cat([args.cos(), args.sin()], -1)) + m.y_embedder.embedding_table.weight[y]
    for blk in m.blocks:
        sh1, sc1, g1, sh2, sc2, g2 = blk.adaLN_modulation(c).chunk(6, -1)
        a = F.layer_norm(h, (D,), eps=1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = blk.attn.qkv(a).reshape(2, -1, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // nh), -1) @ v
        h = h + g1[:, None] * blk.attn.proj(att.transpose(1, 2).reshape(2, -1, D))
        a = F.layer_norm(h, (D,), eps=1e-6) * (1 + sc2[:, None]) + sh2[:, None]
        h = h + g2[:, None] * blk.mlp.fc2(F.gelu(blk.mlp.fc1(a), approximate="tanh"))
    sh, sc = m.final_layer.adaLN_modulation(c).chunk(2, -1)
    out = m.final_layer.linear(F.layer_norm(h, (D,), eps=1e-6) * (1 + sc[:, None]) + sh[:, None])
    out = out.reshape(2, 4, 4, p, p, 6).permute(0, 5, 1, 3, 2, 4).reshape(2, 6, 16, 16)  # (n h w p q c) -> (n c h p w q)
    torch.testing.assert_close(m(x, t, y), out, atol=1e-5, rtol=1e-4)


def test_compile_switch_keeps_state_dict_layout() -> None:
    eager, compiled = micro(), micro(compile=True)
    assert list(eager.state_dict()) == list(compiled.state_dict())
    assert compiled.config["compile"] is True


@pytest.mark.parametrize("arch", ["dit", "lightningdit", "ddt"])
def test_bf16_autocast_forward_backward(arch: str) -> None:
    """Mixed precision (as the training loop may use on CPU/GPU): finite outputs and fp32 grads."""
    cfg = {"arch": arch, "input_size": 16, "patch_size": 4, "in_channels": 3, "hidden_size": 64, "depth": 2,
           "num_heads": 2, "num_classes": 10}  # fmt: skip
    if arch == "ddt":
        cfg["num_encoder_blocks"] = 1
    torch.manual_seed(0)
    m = build_model(cfg)
    perturb(m)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 10])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, feats = m(x, t, y, return_features=[2])
    assert torch.isfinite(out).all() and out.shape == (2, 3, 16, 16)
    ref = m(x, t, y)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
