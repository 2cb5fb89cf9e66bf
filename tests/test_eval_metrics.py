"""Reconstruction metrics, Inception-based IS/sFID through evaluate(), DINOv2 and extractor construction."""

from __future__ import annotations

import math

import pytest
import torch

from eval.features import DINOv2Features, InceptionFeatures, build_extractor, make_random_inception_weights
from eval.recon import psnr, reconstruction_metrics


class _PixelMeanFeatures:
    """A tiny extractor (per-channel-row means, 32 dims) to test the plumbing fast."""

    name, dim, resize, weights_sha256 = "row-means-test", 32, "none-32", "none"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(1, 3))

    def manifest(self) -> dict:
        return {"extractor": self.name, "weights_sha256": self.weights_sha256, "resize": self.resize, "dim": self.dim}


def test_psnr_closed_form() -> None:
    x = torch.full((2, 1, 4, 4), 100, dtype=torch.uint8)
    y = x.clone()
    y[0] += 10  # MSE 100 -> 10 log10(255^2 / 100)
    got = psnr(x, y)
    assert got[0].item() == pytest.approx(10 * math.log10(255**2 / 100), rel=1e-12)
    assert math.isfinite(got[1].item()) and got[1].item() > 140  # identical: large, finite
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(x, y[:1])


def test_reconstruction_metrics_identity_and_noisy_tokenizer() -> None:
    from tokenizers.pixels import PixelTokenizer

    from eval.recon import tokenizer_roundtrip

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (80, 1, 32, 32), generator=g, dtype=torch.uint8)
    ext = _PixelMeanFeatures()
    ident = reconstruction_metrics(tokenizer_roundtrip(PixelTokenizer(channels=1)), images, ext, batch_size=16)
    assert ident["rfid"] < 1e-6 and ident["psnr"] > 140 and ident["num_images"] == 80

    def noisy(x: torch.Tensor, indices: list[int]) -> torch.Tensor:
        return (x.float() + 20 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255).round().to(torch.uint8)

    worse = reconstruction_metrics(noisy, images, ext, batch_size=16)
    assert worse["rfid"] > 1.0 and 15 < worse["psnr"] < 30


@pytest.fixture(scope="module")
def inception(tmp_path_factory) -> InceptionFeatures:
    path = make_random_inception_weights(tmp_path_factory.mktemp("inc") / "random.pth", seed=1)
    return InceptionFeatures(path)


def test_evaluate_reports_is_and_sfid_with_inception(inception: InceptionFeatures) -> None:
    from eval.fid import inception_score
    from eval.generate import evaluate, image_stats, images_fn

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    got = image_stats(images, inception, batch_size=6, spatial=True)
    ref = got.stats.gaussian(inception.manifest())
    ref.extra = {"mu_s": got.spatial.mu(), "sigma_s": got.spatial.sigma()}
    res = evaluate(images_fn(images), range(12), inception, ref, batch_size=5, allow_singular=True)
    assert res["fid"] < 1e-6 and res["sfid"] < 1e-6  # the same images as the reference
    direct = inception_score(inception.extract(images)["logits"], splits=10)
    assert res["inception_score"] == pytest.approx(direct[0], rel=1e-9)
    with pytest.raises(ValueError, match="singular"):
        evaluate(images_fn(images), range(12), inception, ref, batch_size=5)


def test_dinov2_random_init_shapes_and_missing_weights(tmp_path, monkeypatch) -> None:
    ext = DINOv2Features("vit_small_patch14_dinov2", random_init=True, image_size=56)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    f = ext(x)
    assert f.shape == (2, 384) and torch.isfinite(f).all()
    assert ext.tokens(x).shape[1] == 1 + (56 // 14) ** 2 + ext.net.num_reg_tokens
    assert ext.manifest()["extractor"] == "dinov2-vit_small_patch14_dinov2-cls"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="dinov2_vits14_pretrain.pth") as info:
        DINOv2Features("vit_small_patch14_dinov2", cache_dir=tmp_path, image_size=56)
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth" in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_dinov2_loads_a_local_weights_file(tmp_path) -> None:
    from safetensors.torch import save_file

    src = DINOv2Features("vit_small_patch14_dinov2", random_init=True, seed=3, image_size=56)
    path = tmp_path / "vits.safetensors"
    save_file({k: v.contiguous() for k, v in src.net.state_dict().items()}, str(path))
    loaded = DINOv2Features("vit_small_patch14_dinov2", weights_path=path, image_size=56)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.allclose(loaded(x), src(x)) and len(loaded.weights_sha256) == 64


def test_build_extractor_names() -> None:
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_extractor("vgg16")
    with pytest.raises(ValueError, match="needs a built-in dataset"):
        build_extractor("yardstick")


def test_eval_configs_match_the_functions_they_wire() -> None:
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf

    from eval.generate import yardstick_metrics

    root = Path(__file__).resolve().parents[1] / "configs" / "eval"
    hook_keys = {"enabled", "metric", "interval_kimg"}
    ys = OmegaConf.load(root / "yardstick.yaml")
    params = set(inspect.signature(yardstick_metrics).parameters) - {"generate_fn"}
    assert set(ys.keys()) - hook_keys == params
    for name in ("fid5k", "fid10k", "fid50k"):
        cfg = OmegaConf.load(root / f"{name}.yaml")
        assert cfg.num_images == int(name[3:-1]) * 1000 and cfg.resize in ("tf1-bilinear", "bilinear-antialias")


def test_fd_dinov2_through_evaluate() -> None:
    from eval.generate import evaluate, image_stats, images_fn

    ext = DINOv2Features("vit_small_patch14_dinov2", random_init=True, image_size=28)
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (6, 3, 16, 16), generator=g, dtype=torch.uint8)
    ref = image_stats(real, ext, batch_size=4).stats.gaussian(ext.manifest())
    same = evaluate(images_fn(real), range(6), ext, ref, allow_singular=True)
    other = evaluate(images_fn(255 - real), range(6), ext, ref, allow_singular=True)
    assert set(same) == {"fd_dinov2", "num_images"}
    assert same["fd_dinov2"] < 1e-6 < other["fd_dinov2"]
