"""Perceptual distances of distillation (distill/perceptual.py): the yardstick stand-in against a direct computation on
random weights of the foundation encoder, gradients reaching the student's image only; the 224 px resize; LPIPS'
clear error when its VGG16 file is missing; piq's LPIPS (``gen.nn.lpips.LPIPS(variant="piq")``, 2-rectified flow++'s)
against a direct computation on random VGG16 and head weights, both heads layouts, its refusals, and the 2-RF++
and CD presets building it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distill.perceptual import Resized, TokenDistance
from eval.encoders import AlignmentEncoder
from gen.nn.lpips import HEAD_CHANNELS, LPIPS, make_random_vgg16_weights
from gen.utils.build import BuildError, build
from gen.utils.frozen import frozen_identity
from gen.utils.weights import WeightsNotFoundError

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def vgg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_vgg16_weights(tmp_path_factory.mktemp("vgg") / "vgg16-random.pth", seed=0)


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(1, c, 1, 1, generator=g) for c in HEAD_CHANNELS]  # LPIPS' heads are non-negative


def _piq_direct(vgg: Path, heads: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """piq.LPIPS(replace_pooling=True, reduction="none")(a / 2 + 1 / 2, b / 2 + 1 / 2), written out on torchvision's
    VGG16 (photosynthesis-team/piq, piq/perceptual.py, ContentLoss): (B,)."""
    from torchvision.models import vgg16

    features = vgg16(weights=None).features
    features.load_state_dict({k[len("features."):]: v for k, v in torch.load(vgg, weights_only=True).items()})
    for name, m in features.named_children():
        if isinstance(m, torch.nn.MaxPool2d):
            setattr(features, name, torch.nn.AvgPool2d(2, 2))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def feats(x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x * 0.5 + 0.5 - mean) / std
        for name, m in features.named_children():
            h = m(h)
            if name in ("3", "8", "15", "22", "29"):  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    with torch.no_grad():
        return sum(((fa - fb) ** 2 * w).mean(dim=(2, 3)).sum(1) for fa, fb, w in zip(feats(a), feats(b), heads))


def test_piq_lpips_equals_a_direct_computation(vgg: Path, heads: list[torch.Tensor], tmp_path: Path) -> None:
    torch.save(heads, tmp_path / "lpips_weights.pt")  # piq's layout: a list of five tensors
    lp = LPIPS(vgg, variant="piq", heads=tmp_path / "lpips_weights.pt")
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(3, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    b = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    d = lp(a, b)
    want = _piq_direct(vgg, heads, a.detach(), b)
    assert d.shape == (3,) and torch.allclose(d, want, rtol=1e-5, atol=0), (d, want)
    assert torch.equal(lp(b, b), torch.zeros(3))
    d.sum().backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0 and not any(p.requires_grad for p in lp.parameters())
    # Grey images run as three equal channels, as piq broadcasts them against its three-channel mean.
    assert torch.allclose(lp(a[:, :1].detach(), b[:, :1]), _piq_direct(vgg, heads, a[:, :1].detach().expand(-1, 3, -1, -1),
                                                                    b[:, :1].expand(-1, 3, -1, -1)), rtol=1e-5)
    # The same heads in richzhang's / torchmetrics' layout give the same distance; the reference variant (max pooling,
    # LPIPS' scaling and normalisation) another one, and another frozen identity (resuming across variants is refused).
    torch.save({f"lin{i}.model.1.weight": w for i, w in enumerate(heads)}, tmp_path / "vgg.pth")
    assert torch.equal(LPIPS(vgg, variant="piq", heads=tmp_path / "vgg.pth")(a, b), d)
    ref = LPIPS(vgg, heads=tmp_path / "vgg.pth")
    assert not torch.allclose(ref(a, b), d, rtol=1e-2)
    assert frozen_identity(ref)["sha256"] != frozen_identity(lp)["sha256"]
    assert lp.identity()["name"] != ref.identity()["name"]


def test_lpips_refuses_bad_variants_and_heads(vgg: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"variant must be one of \['lpips', 'piq'\].*got 'avg'"):
        LPIPS(vgg, variant="avg")  # type: ignore[arg-type]
    with pytest.raises(WeightsNotFoundError, match=r"lpips_weights.pt does not exist .*photosynthesis.metrics"):
        LPIPS(vgg, variant="piq", heads=tmp_path / "lpips_weights.pt")
    torch.save([torch.rand(1, 64, 1, 1)] * 4, tmp_path / "four.pt")
    with pytest.raises(ValueError, match="neither richzhang's"):
        LPIPS(vgg, variant="piq", heads=tmp_path / "four.pt")
    (tmp_path / "text.pt").write_text("not a tensor file")
    with pytest.raises(ValueError, match="not readable"):
        LPIPS(vgg, variant="piq", heads=tmp_path / "text.pt")
    spec = {"_target_": "gen.nn.lpips.LPIPS", "vgg_weights": str(vgg), "variant": "maxpool"}
    with pytest.raises(BuildError) as err:
        build(spec)
    assert "variant must be one of" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("experiment", ["rfpp_cifar10", "rfpp_in64", "cd_in64"])
def test_distillation_presets_use_piq_lpips(experiment: str, vgg: Path) -> None:
    # sangyun884/rfpp train.py and openai/consistency_models cm/karras_diffusion.py both use piq's LPIPS.
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", f"method.teacher={vgg}"])
    spec = OmegaConf.to_container(cfg.method.perceptual, resolve=True)
    assert spec["distance"]["variant"] == "piq" and spec["size"] == 224
    assert spec["distance"]["vgg_weights"].endswith("vgg16-397923af.pth")
    spec["distance"]["vgg_weights"] = str(vgg)  # random weights of the same architecture (no VGG16 file here)
    dist = build(spec)
    assert isinstance(dist, Resized) and isinstance(dist.distance, LPIPS) and dist.distance.variant == "piq"
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert dist(a, b).shape == (2,)
