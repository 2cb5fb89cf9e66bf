"""EDM2 U-Net (gen/models/edm2.py): size of the img64-s preset, zero output at init, the magnitude-preserving
pieces by hand, forced weight normalisation (training with gradients only), the null class, dropout_res, the
refusals, and one EDM and one ECT training step with weights that stay normalised."""

from __future__ import annotations

import math

import pytest
import torch

from gen.models.edm2 import EDM2UNet, MPConv, mp_cat, mp_normalize, mp_sum
from gen.models.precond import EDMPrecond
from gen.objectives.ect import EasyConsistencyTuning
from gen.objectives.edm import EDMLoss
from gen.train.method import Progress
from gen.utils.build import build
from gen.utils.seed import BatchRandom
from tests.presets import model_preset

# Parameters of the official UNet (NVlabs/edm2 training/networks_edm2.py, Precond(64, 3, 1000, model_channels=192)
# .unet), counted in the equivalence run (bench/README.md, "EDM2 U-Net against the official code").
OFFICIAL_IMG64_S_UNET = 280_209_253


def tiny(**kw: object) -> EDM2UNet:
    return model_preset("tiny_edm2", in_channels=3, input_size=16, num_classes=10, **kw)


def with_gains(net: EDM2UNet, value: float = 0.7) -> EDM2UNet:
    """Nonzero learned gains (zero at init, where F = 0)."""
    for p in net.parameters():
        if p.ndim == 0:
            p.data.fill_(value)
    return net


def test_img64_s_preset_has_the_official_size() -> None:
    with torch.device("meta"):
        net = model_preset("edm2_img64_s", in_channels=3, input_size=64, num_classes=1000)
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_IMG64_S_UNET
    assert [k for k in net.dec if "block" not in k][:2] == ["8x8_in0", "8x8_in1"]
    assert net.enc["16x16_block0"].num_heads == 576 // 64 and net.enc["32x32_block0"].num_heads == 0


def test_output_is_zero_at_init_and_config_round_trips() -> None:
    net = tiny()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(net(x, torch.zeros(2)).out, torch.zeros_like(x))
    again = build(net.config)
    assert isinstance(again, EDM2UNet) and again.config == net.config


def test_magnitude_preserving_pieces_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 10, generator=g)
    w = torch.randn(5, 3, 3, 3, generator=g)
    n = mp_normalize(w)
    rms = n.reshape(5, -1).pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones(5), rtol=2e-4, atol=0)  # unit RMS up to the 1e-4 epsilon
    torch.testing.assert_close(mp_sum(a, a + 1, 0.3), (0.7 * a + 0.3 * (a + 1)) / math.sqrt(0.49 + 0.09))
    cat = mp_cat(a, b, t=0.5)  # each part scaled to carry half the unit output magnitude
    torch.testing.assert_close(cat[:, :6], a * math.sqrt(16 / 0.5) / math.sqrt(6) * 0.5)
    torch.testing.assert_close(cat[:, 6:], b * math.sqrt(16 / 0.5) / math.sqrt(10) * 0.5)


def test_forced_weight_normalisation_only_in_training_with_gradients() -> None:
    conv = MPConv(3, 4, (3, 3))
    conv.weight.data.mul_(3.0)
    before = conv.weight.detach().clone()
    x = torch.randn(2, 3, 5, 5)
    conv.eval()
    conv(x)
    assert torch.equal(conv.weight, before)
    conv.train()
    with torch.no_grad():
        conv(x)
    assert torch.equal(conv.weight, before), "a no-grad training pass must not rewrite weights"
    y = conv(x)
    torch.testing.assert_close(conv.weight.detach(), mp_normalize(before))
    y.sum().backward()  # the in-place normalisation precedes the graph: backward works
    assert conv.weight.grad is not None


def test_null_class_is_the_zero_class_vector_and_labels_are_checked() -> None:
    net = with_gains(tiny()).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([-1.0, 0.0, 1.0])
    null = net(x, t, torch.full((3,), 10)).out
    torch.testing.assert_close(net(x, t, None).out, null, rtol=0, atol=0)
    assert not torch.allclose(net(x, t, torch.tensor([0, 3, 9])).out, null)
    with pytest.raises(ValueError, match="labels must lie in 0..10"):
        net(x, t, torch.tensor([0, 11, 2]))


def test_dropout_only_at_resolutions_up_to_dropout_res() -> None:
    net = tiny(dropout=0.4, dropout_res=8)
    drops = {name: block.dropout for name, block in [*net.enc.items(), *net.dec.items()] if hasattr(block, "dropout")}
    assert {n: d for n, d in drops.items() if n.startswith("16x16")} == {n: 0.0 for n in drops if n.startswith("16x16")}
    assert all(d == 0.4 for n, d in drops.items() if n.startswith("8x8"))


def test_refusals_name_the_problem() -> None:
    net = tiny()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="offers no features"):
        net(x, 0.0, return_features=[1])
    with pytest.raises(ValueError, match="input_size=16"):
        net(torch.randn(1, 3, 8, 8), 0.0)
    with pytest.raises(ValueError, match="divisible by 2"):
        EDM2UNet(input_size=10, model_channels=16, channel_mult=(1, 2, 3), channels_per_head=16)
    with pytest.raises(ValueError, match="channels_per_head"):
        EDM2UNet(input_size=16, model_channels=24, channel_mult=(1, 2), attn_resolutions=(8,), channels_per_head=32)


@pytest.mark.parametrize("objective", ["edm", "ect"])
def test_one_training_step_keeps_weights_normalised(objective: str) -> None:
    torch.manual_seed(0)
    net = with_gains(tiny(dropout=0.2)).train()
    obj = EDMLoss(label_dropout=0.1) if objective == "edm" else EasyConsistencyTuning(teacher="edm", weighting="edm", q=4.0)
    opt = torch.optim.Adam(net.parameters(), lr=0.3)  # large: the step visibly leaves the sphere
    batch = {"x0": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    for step in range(2):
        out = obj(net, batch, BatchRandom(4, torch.Generator().manual_seed(step)), Progress(nimg=4 * step, total_nimg=8, step=step))
        assert torch.isfinite(out["loss"]).all()
        opt.zero_grad()
        out["loss"].mean().backward()
        opt.step()
    # The step moved the weights off the unit sphere; the next training pass puts them back (Eq. 66).
    w = net.dec["16x16_block0"].conv_res0.weight
    assert not torch.allclose(w.reshape(len(w), -1).norm(dim=1) / math.sqrt(w[0].numel()), torch.ones(len(w)), atol=1e-3)
    EDMPrecond(net)(batch["x0"], 1.0)
    torch.testing.assert_close(w.detach().reshape(len(w), -1).norm(dim=1) / math.sqrt(w[0].numel()), torch.ones(len(w)),
                               rtol=2e-4, atol=0)
