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
    from eval.recon import tokenizer_roundtrip
    from tokenizers.pixels import PixelTokenizer

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
    direct = inception_score(inception.extract(images)["logits"])  # ADM splits: one group of 12
    # evaluate() extracts in batches of 5 and the direct call all 12 at once: float32 GEMMs of other shapes round
    # differently (2e-8 relative on some CPUs), so the two agree to float32 rounding, not bit for bit.
    assert res["inception_score"] == pytest.approx(direct[0], rel=1e-6)
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


# Reference class tokens of the official DINOv2 hub model on make_random_dinov2_weights(seed=0), computed
# once outside this repository (torch 2.14.1, CPU, 1 thread): facebookresearch/dinov2 @ b8931f7bf915,
# dinov2/hub/backbones.py dinov2_vits14 / dinov2_vits14_reg (pretrained=False, load_state_dict strict),
# preprocessed by NVlabs/edm2 @ 4bf8162f601b, calculate_metrics.py DINOv2Detector.__call__ (resize_mode
# "torch" / "pil"); layer6ai-labs/dgm-eval @ 74c79f7527fb, dgm_eval/models/dinov2.py
# DINOv2Encoder.transform gave exactly the "pil" values. Images: torch.randint(0, 256, (2, 3, s, s),
# generator=manual_seed(s)), fed at 224 px. Per image: the first 6 features, and the projections of the
# whole vector on cos(0.7 d) and sin(1.3 d), d = 0..D-1.
DINOV2_REFERENCE = [
    ("vit_small_patch14_dinov2", "torch", 224,
     [[-0.6143414, 1.410368, -0.2026104, 0.1957615, 0.1707797, -1.662398],
      [-0.4795981, 1.38041, -0.1229792, 0.2409533, 0.2550497, -1.71872]],
     [[-12.51475, -11.14907], [-11.22912, -9.111261]]),
    ("vit_small_patch14_dinov2", "torch", 64,
     [[-0.5295753, 1.47977, -0.2001909, 0.1478872, -0.005750871, -1.768587],
      [-0.6962181, 1.417507, -0.1427269, 0.1583796, 0.07684128, -1.66338]],
     [[-10.54866, -12.72768], [-11.06826, -11.93876]]),
    ("vit_small_patch14_dinov2", "pil", 256,
     [[-0.65447, 1.377928, -0.0402956, 0.2097331, 0.102474, -1.881982],
      [-0.6061343, 1.466354, -0.03031626, 0.1005721, 0.1146128, -1.789216]],
     [[-12.69182, -12.17046], [-10.38135, -10.69089]]),
    ("vit_small_patch14_reg4_dinov2", "torch", 256,
     [[-0.6278905, 1.348428, 0.0632275, 0.09979082, 0.02119679, -1.785522],
      [-0.603915, 1.490615, -0.0739826, -0.02021056, -0.02568563, -1.779564]],
     [[-11.58857, -13.31057], [-9.882937, -11.50916]]),
]
# Patch tokens (x_norm_patchtokens) of the same models at 224 px: per image, sum over tokens n of
# (token_n . cos(0.7 d)) * cos(0.3 n).
DINOV2_PATCH_REFERENCE = {"vit_small_patch14_dinov2": [110.6521, 19.07736], "vit_small_patch14_reg4_dinov2": [154.8838, 102.6917]}


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory) -> dict[str, str]:
    from eval.features import make_random_dinov2_weights

    root = tmp_path_factory.mktemp("dinov2")
    return {a: str(make_random_dinov2_weights(root / f"{a}.pth", a, seed=0)) for a in DINOV2_PATCH_REFERENCE}


def _dinov2_images(size: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(size), dtype=torch.uint8)


@pytest.mark.parametrize(("arch", "resize", "size", "first", "proj"), DINOV2_REFERENCE)
def test_dinov2_features_match_the_official_model(dinov2_weights, arch, resize, size, first, proj) -> None:
    ext = DINOv2Features(arch, weights_path=dinov2_weights[arch], resize=resize)
    f = ext(_dinov2_images(size)).double()
    d = torch.arange(f.shape[1], dtype=torch.float64)
    got_proj = torch.stack([f @ torch.cos(0.7 * d), f @ torch.sin(1.3 * d)], dim=1)
    assert torch.allclose(f[:, :6], torch.tensor(first, dtype=torch.float64), rtol=0, atol=2e-5)
    assert torch.allclose(got_proj, torch.tensor(proj, dtype=torch.float64), rtol=0, atol=2e-4)


@pytest.mark.parametrize("arch", sorted(DINOV2_PATCH_REFERENCE))
def test_dinov2_patch_tokens_match_the_official_model(dinov2_weights, arch) -> None:
    ext = DINOv2Features(arch, weights_path=dinov2_weights[arch])
    tokens = ext.tokens(_dinov2_images(224)).double()
    assert tokens.shape == (2, ext.num_prefix_tokens + 256, 384)
    patches = tokens[:, ext.num_prefix_tokens :]
    d, n = torch.arange(384, dtype=torch.float64), torch.arange(256, dtype=torch.float64)
    got = ((patches @ torch.cos(0.7 * d)) * torch.cos(0.3 * n)).sum(1)
    assert torch.allclose(got, torch.tensor(DINOV2_PATCH_REFERENCE[arch], dtype=torch.float64), rtol=0, atol=5e-3)


def test_dinov2_resize_modes() -> None:
    from eval.features import dinov2_resize

    x = _dinov2_images(64)
    up = dinov2_resize(x, 224, "torch")
    # EDM2's torch mode keeps bicubic overshoot (no clamp) and does not round; PIL's rounds and clips.
    assert up.min() < 0 and up.max() > 255 and not torch.equal(up, up.round())
    pil = dinov2_resize(x, 224, "pil")
    assert pil.min() >= 0 and pil.max() <= 255 and torch.equal(pil, pil.round())
    assert torch.equal(dinov2_resize(_dinov2_images(224), 224, "pil"), _dinov2_images(224).float())
    with pytest.raises(ValueError, match="unknown DINOv2 resize mode 'nearest'"):
        dinov2_resize(x, 224, "nearest")  # type: ignore[arg-type]


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
    # Statistics of the earlier, non-reference DINOv2 features are refused by name, before any work.
    with pytest.raises(ValueError, match="must be recomputed"):
        build_extractor("dinov2-vit_small_patch14_dinov2-cls", resize="bicubic-antialias-224")


def test_eval_configs_match_the_functions_they_wire() -> None:
    import inspect
    from pathlib import Path

    from omegaconf import OmegaConf

    from eval.generate import yardstick_metrics

    root = Path(__file__).resolve().parents[1] / "configs" / "eval"
    hook_keys = {"enabled", "metric", "interval_kimg"}
    ys = OmegaConf.load(root / "yardstick.yaml")
    # memorisation (and the images it compares with) is a bench option (bench/yardstick_scoreaug.py), not a
    # training-time eval setting
    params = set(inspect.signature(yardstick_metrics).parameters) - {"generate_fn", "memorisation", "trained_on"}
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
