"""Perceptual distances of distillation (distill/perceptual.py): the yardstick stand-in against a direct computation on
random weights of the foundation encoder, gradients reaching the student's image only; the 224 px resize; LPIPS'
clear error when its VGG16 file is missing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.perceptual import Resized, TokenDistance
from eval.encoders import AlignmentEncoder
from gen.utils.build import BuildError, build


def test_token_distance_equals_direct_computation() -> None:
    enc = AlignmentEncoder("foundation2-mnist5k", resolution=32, random_init=True)
    dist = TokenDistance(enc)
    a = (torch.rand(3, 1, 32, 32) * 2 - 1).requires_grad_(True)
    b = torch.rand(3, 1, 32, 32) * 2 - 1
    d = dist(a, b)
    net = enc.backbone.net
    with torch.no_grad():
        ta, tb = net.tokens(a), net.tokens(b)
        want = ((ta / ta.norm(dim=-1, keepdim=True) - tb / tb.norm(dim=-1, keepdim=True)) ** 2).sum(-1).mean(-1)
    assert torch.allclose(d, want, atol=1e-6) and bool((d > 0).all())
    assert torch.allclose(dist(b, b), torch.zeros(3), atol=1e-6)
    d.sum().backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    assert all(p.grad is None for p in net.parameters())


def test_resized_upsamples_small_images_before_the_distance() -> None:
    seen = []

    class Mse(torch.nn.Module):
        def forward(self, a, b):  # noqa: ANN001, ANN202
            seen.append(a.shape[-1])
            return (a - b).pow(2).flatten(1).mean(1)

    a, b = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    got = Resized(Mse(), 224)(a, b)
    up = lambda x: F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)  # noqa: E731
    assert seen == [224] and torch.allclose(got, (up(a) - up(b)).pow(2).flatten(1).mean(1))
    Resized(Mse(), 16)(a, b)
    assert seen[-1] == 32  # larger images are left alone


def test_lpips_without_its_weights_is_one_clear_error(tmp_path: Path) -> None:
    spec = {"_target_": "distill.perceptual.Resized", "size": 224,
            "distance": {"_target_": "gen.nn.lpips.LPIPS", "vgg_weights": str(tmp_path / "vgg16-397923af.pth")}}
    with pytest.raises(BuildError) as err:
        build(spec)
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and "\n" not in msg
