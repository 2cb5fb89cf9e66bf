"""DiT backbone: exact parameter counts, adaLN-Zero init, features, REG extra token, input validation."""

from __future__ import annotations

import json

import pytest
import torch

from gen.models import DiT, ModelOutput
from gen.nn import sincos_2d
from gen.utils.build import BuildError, build
from tests.presets import micro as micro_model
from tests.presets import model_preset

# Trainable parameter counts of the official implementation (facebookresearch/DiT models.py, DiT_models,
# instantiated with input_size=32, in_channels=4, num_classes=1000, learn_sigma=True; frozen pos_embed excluded).
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
    size, patch = preset.split("/")
    with torch.device("meta"):
        m = model_preset(f"dit_{size.lower()}2", patch_size=int(patch), input_size=32, in_channels=4,
                         num_classes=1000, learn_sigma=True)
    assert trainable(m) == OFFICIAL_COUNTS[preset]
    # the frozen table is the only non-trainable parameter
    assert sum(p.numel() for p in m.parameters()) - trainable(m) == m.pos_embed.numel()


def micro(**kw) -> DiT:
    torch.manual_seed(0)
    return micro_model("dit", input_size=16, in_channels=3, num_classes=10, **kw)


def test_zero_output_at_init_and_shapes() -> None:
    m = micro(learn_sigma=True)
    x = torch.randn(2, 3, 16, 16)
    res = m(x, torch.rand(2), torch.tensor([1, 10]))
    assert isinstance(res, ModelOutput) and res.extra is None and res.features == [] and res.encoder_out is None
    assert res.out.shape == (2, 6, 16, 16)
    assert torch.equal(res.out, torch.zeros_like(res.out))
    assert micro()(x, torch.rand(2), None).out.shape == (2, 3, 16, 16)


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
    out = m(x, torch.rand(2), torch.tensor([0, 3])).out
    assert out.abs().sum() > 0
    out.square().mean().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_time_and_label_change_output() -> None:
    m = micro().eval()
    perturb(m)
    x = torch.randn(1, 3, 16, 16)
    a = m(x, torch.tensor([0.1]), torch.tensor([2])).out
    assert not torch.allclose(a, m(x, torch.tensor([0.9]), torch.tensor([2])).out)
    assert not torch.allclose(a, m(x, torch.tensor([0.1]), torch.tensor([3])).out)
    # scalar t broadcasts
    torch.testing.assert_close(a, m(x, 0.1, torch.tensor([2])).out)


def test_backbone_is_pure_in_train_mode() -> None:
    """Label dropout is the objective's job: in train mode the network is the same function as in eval mode."""
    m = micro()
    perturb(m)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    a = m.train()(x, t, y).out
    torch.testing.assert_close(a, m.eval()(x, t, y).out, rtol=0, atol=0)
    assert not torch.allclose(a, m(x, t, torch.tensor([10, 10])).out)  # the null class is another label


def test_return_features() -> None:
    m = micro()
    x = torch.randn(2, 3, 16, 16)
    res = m(x, torch.rand(2), torch.tensor([0, 1]), return_features=[2, 1])
    assert res.out.shape == (2, 3, 16, 16)
    assert [f.shape for f in res.features] == [(2, 16, 64)] * 2
    perturb(m)
    (f1,) = m(x, torch.rand(2), torch.tensor([0, 1]), return_features=[1]).features
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
    res = m(x, torch.rand(2), torch.tensor([0, 1]), extra_token=e)
    assert res.out.shape == (2, 3, 16, 16) and res.extra.shape == (2, 12)
    assert torch.equal(res.extra, torch.zeros_like(res.extra))  # zero-initialised head
    res = m(x, torch.rand(2), torch.tensor([0, 1]), extra_token=e, return_features=[2])
    assert res.features[0].shape == (2, 17, 64)  # the extra token is prepended at index 0
    perturb(m)
    extra = m(x, torch.rand(2), torch.tensor([0, 1]), extra_token=e).extra
    assert extra.abs().sum() > 0
    # the extra token attends with the image tokens: changing it changes the image output
    a = m(x, 0.5, torch.tensor([0, 1]), extra_token=e).out
    b = m(x, 0.5, torch.tensor([0, 1]), extra_token=e + 1).out
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
    with pytest.raises(ValueError, match="unknown norm"):
        micro(norm="batch")
    with pytest.raises(ValueError, match="rope must be"):
        micro(rope="mixed")


def test_config_is_captured_and_round_trips() -> None:
    m = micro(extra_token_dim=5)
    cfg = json.loads(json.dumps(m.config))
    assert cfg["_target_"] == "gen.models.dit.DiT" and cfg["extra_token_dim"] == 5 and cfg["mlp_ratio"] == 4.0
    m2 = build(cfg)
    assert type(m2) is DiT and m2.config == m.config
    m2.load_state_dict(m.state_dict())
    with pytest.raises(BuildError, match="has no attribute 'UNet'"):
        build({"_target_": "gen.models.dit.UNet"})
    with pytest.raises(BuildError, match=r"unknown argument\(s\) 'width'"):
        build({"_target_": "gen.models.dit.DiT", "width": 3})


def test_presets_are_the_papers_sizes() -> None:
    from tests.presets import preset_spec

    assert {k: preset_spec("dit_xl2")[k] for k in ("depth", "hidden_size", "num_heads", "patch_size")} == {
        "depth": 28, "hidden_size": 1152, "num_heads": 16, "patch_size": 2}
    assert preset_spec("quickstart_dit")["hidden_size"] == 128 and preset_spec("quickstart_dit")["depth"] == 6


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
    torch.testing.assert_close(m(x, t, y).out, out, atol=1e-5, rtol=1e-4)


def test_wo_shift_variant_matches_reference_formula() -> None:
    """LightningDiT's ``wo_shift`` adaLN (hustvl/LightningDiT models/lightningdit.py, LightningDiTBlock): four
    modulation vectors ``(scale_msa, gate_msa, scale_mlp, gate_mlp)``, ``modulate(x, None, s) = x (1 + s)``; the
    final layer keeps its shift."""
    import torch.nn.functional as F

    m = micro(wo_shift=True).eval()
    assert all(b.adaLN_modulation[1].out_features == 4 * 64 for b in m.blocks)
    perturb(m)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([4, 10])
    blk = m.blocks[0]
    h = torch.randn(2, 16, 64)
    c = F.silu(torch.randn(2, 64))
    sc1, g1, sc2, g2 = (v[:, None] for v in blk.adaLN_modulation[1](c).chunk(4, -1))
    ref = h + g1 * blk.attn(F.layer_norm(h, (64,), eps=1e-6) * (1 + sc1))
    ref = ref + g2 * blk.mlp(F.layer_norm(ref, (64,), eps=1e-6) * (1 + sc2))
    torch.testing.assert_close(blk(h, c), ref, atol=1e-5, rtol=1e-5)
    assert m(x, t, y).out.shape == (2, 3, 16, 16)
    assert sum(p.numel() for p in m.parameters()) < sum(p.numel() for p in micro().parameters())


def test_compile_switch_keeps_state_dict_layout() -> None:
    eager, compiled = micro(), micro(compile=True)
    assert list(eager.state_dict()) == list(compiled.state_dict())
    assert compiled.config["compile"] is True


@pytest.mark.parametrize("arch", ["dit", "lightningdit", "ddt"])
def test_bf16_autocast_forward_backward(arch: str) -> None:
    """Mixed precision (as the training loop may use on CPU/GPU): finite outputs and fp32 grads."""
    torch.manual_seed(0)
    m = micro_model(arch, input_size=16, in_channels=3, num_classes=10)
    perturb(m)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 10])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, t, y, return_features=[2]).out
    assert torch.isfinite(out).all() and out.shape == (2, 3, 16, 16)
    ref = m(x, t, y).out
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
