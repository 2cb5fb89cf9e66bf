"""TDM and SLAM on every backbone family (DiT, LightningDiT, DDT) and on pixels (1x32x32) or latents (4x8x8): the
teacher is a random micro network written as a flow-matching snapshot; each method starts its networks from it
(the extra-condition slot where it needs one), and every phase's loss is finite and reaches only its own network."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch

from distill.slam import SubpathLinearApproximation
from distill.tdm import TrajectoryDistributionMatching
from gen.ema import EMA
from gen.train.method import Progress
from gen.utils.ckpt import save_snapshot
from gen.utils.seed import SampleRandom
from tests.presets import micro

SHAPES = {"pixels": (1, 32), "latents": (4, 8)}


def _teacher(tmp_path: Path, arch: str, channels: int, size: int) -> tuple[str, dict]:
    torch.manual_seed(0)
    net = micro(arch, input_size=size, in_channels=channels, num_classes=10)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    config = {"model": dict(net.config), "data": {"name": "grid", "channels": channels, "resolution": size,
                                                  "num_classes": 10},
              "prediction": {"path": {"_target_": "gen.paths.LinearPath"}, "prediction": "velocity", "precond": None}}
    path = tmp_path / f"{arch}.safetensors"
    save_snapshot(path, net.state_dict(), config)
    return str(path), {k: v for k, v in net.config.items() if k != "_target_"}


def _grads(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.parameters())


@pytest.mark.parametrize("data", sorted(SHAPES))
@pytest.mark.parametrize("arch", ["dit", "lightningdit", "ddt"])
def test_both_methods_train_on_every_backbone_and_input(tmp_path: Path, arch: str, data: str) -> None:
    channels, size = SHAPES[data]
    source, spec = _teacher(tmp_path, arch, channels, size)
    y, rng = torch.tensor([0, 3, 9]), lambda: SampleRandom([1, 2, 3], namespace=arch)  # noqa: E731
    tdm = TrajectoryDistributionMatching(micro(arch, **{**spec, "augment_dim": 8}), partial(torch.optim.Adam),
                                         source, unify_steps=[1, 2], trajectory_steps=100, tau_min_steps=2,
                                         tau_margin_steps=1, guidance=2.0)
    for phase, other in (("fake_score", "net"), ("net", "fake_score")):
        tdm.zero_grad(set_to_none=True)
        loss = tdm.loss(phase, {"label": y}, rng(), Progress(0, 1, 0))["loss"]
        assert loss.shape == (3,) and bool(torch.isfinite(loss).all())
        loss.mean().backward()
        assert _grads(getattr(tdm, phase)) and not _grads(getattr(tdm, other)), phase
    slam = SubpathLinearApproximation(micro(arch, **{**spec, "augment_dim": 8}), partial(torch.optim.Adam), source,
                                      partial(EMA, decays=[0.95]), gamma_dim=8, guidance=1.0)
    slam.attach_emas({"net": EMA(slam.net, decays=[0.95])})
    x0 = torch.rand(3, channels, size, size) * 2 - 1
    loss = slam.loss("net", {"x0": x0, "label": y}, rng(), Progress(0, 1, 0))["loss"]
    assert loss.shape == (3,) and bool(torch.isfinite(loss).all())
    loss.mean().backward()
    assert _grads(slam.net) and not any(p.grad is not None for p in slam.teacher.parameters())
