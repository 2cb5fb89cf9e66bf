"""Frozen alignment encoders (eval.encoders): one interface for DINOv2 and the yardstick's foundation network.

Pretrained weights cannot be downloaded here: DINOv2 runs on random weights of the identical architecture
(``make_random_dinov2_weights`` writes them in Meta's file layout, which the official hub model loads).
"""

from __future__ import annotations

import pytest
import torch

from eval.encoders import AlignmentEncoder, encoder_names
from eval.features import WeightsNotFoundError, make_random_dinov2_weights
from gen.utils.build import BuildError, build
from gen.utils.frozen import frozen_modules, hold_frozen

# REPA's own encoder path on make_random_dinov2_weights(seed=0), computed once outside this repository
# (torch 2.14.1, timm 1.0.31, CPU, 1 thread): sihyun-yu/REPA @ 67f714503e38, utils.py load_encoders (dinov2
# branch; torch.hub.load returning facebookresearch/dinov2 @ b8931f7bf915 dinov2/hub/backbones.py
# dinov2_vits14[_reg](pretrained=False) with the file loaded strictly) and train.py preprocess_raw_image,
# then forward_features -> x_norm_clstoken / x_norm_patchtokens. Images: torch.randint(0, 256, (2, 3, 256,
# 256), generator=manual_seed(256)). Per image: the first 6 class-token features, the class token projected on
# cos(0.7 d) and sin(1.3 d), and sum over tokens n of (patch_n . cos(0.7 d)) * cos(0.3 n).
REPA_REFERENCE = {
    "dinov2_vits14": (
        [[-0.6265941, 1.328571, -0.01250188, 0.1600714, 0.09328548, -1.792161],
         [-0.6511045, 1.475479, -0.1320664, 0.07648212, 0.01068714, -1.844321]],
        [[-12.58556, -12.67726], [-10.46635, -10.85208]],
        [26.10016, -85.31545],
    ),
    "dinov2_vits14_reg": (
        [[-0.6146894, 1.328646, -0.01113442, 0.1593232, 0.09091987, -1.775562],
         [-0.6366831, 1.472631, -0.1282012, 0.08151384, 0.01317957, -1.82535]],
        [[-12.6274, -12.75174], [-10.53744, -10.98097]],
        [25.523, -84.59575],
    ),
}
ARCH = {"dinov2_vits14": "vit_small_patch14_dinov2", "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2"}


def _images(n: int, size: int, channels: int = 3, seed: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(size if seed is None else seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("name", sorted(REPA_REFERENCE))
def test_dinov2_encoder_matches_repa(tmp_path, name: str) -> None:
    weights = make_random_dinov2_weights(tmp_path / "w.pth", ARCH[name], seed=0)
    enc = AlignmentEncoder(name, resolution=256, weights_path=str(weights))
    patches, cls = enc(_images(2, 256))
    assert patches.shape == (2, 256, 384) and cls.shape == (2, 384)
    first, proj, patch_proj = (torch.tensor(v, dtype=torch.float64) for v in REPA_REFERENCE[name])
    c, p = cls.double(), patches.double()
    d, n = torch.arange(384, dtype=torch.float64), torch.arange(256, dtype=torch.float64)
    assert torch.allclose(c[:, :6], first, rtol=0, atol=2e-5)
    assert torch.allclose(torch.stack([c @ torch.cos(0.7 * d), c @ torch.sin(1.3 * d)], 1), proj, rtol=0, atol=2e-4)
    assert torch.allclose(((p @ torch.cos(0.7 * d)) * torch.cos(0.3 * n)).sum(1), patch_proj, rtol=0, atol=5e-3)


# VA-VAE's VF-loss encoder path on make_random_dinov2_weights(seed=0) (ViT-S/14; the official run uses ViT-L/14 of
# the same family), computed once outside this repository (torch 2.14.1, timm 1.0.31, CPU, 1 thread):
# hustvl/LightningDiT @ 2725fed42a14898744433809949834e26957bcdd, vavae/ldm/models/foundation_models.py
# aux_foundation_model("dinov2") with timm.create_model(..., dynamic_img_size=True) given the file through
# checkpoint_filter_fn instead of the hub, on images/127.5 - 1 (vavae/ldm/data/imagenet.py) of the same images as
# REPA_REFERENCE; its (B, D, 16, 16) output flattened to (B, 256, D). The first token's first 6 features, and
# sum_n (patch_n . cos(0.7 d)) cos(0.3 n), sum_n (patch_n . sin(1.3 d)) sin(0.2 n) per image.
VAVAE_REFERENCE = (
    [[-0.1479532, 1.179674, 1.49569, -1.986928, 0.6078021, -1.593656],
     [-0.6463199, 1.145006, 2.124803, -1.214649, 1.762357, -0.4176619]],
    [17.93397, -98.34979],
    [-213.5381, -191.7139],
)


def test_dinov2_encoder_with_vavae_preprocessing_matches_the_vf_loss_encoder(tmp_path) -> None:
    weights = make_random_dinov2_weights(tmp_path / "w.pth", ARCH["dinov2_vits14"], seed=0)
    enc = AlignmentEncoder("dinov2_vits14", resolution=256, weights_path=str(weights), preprocess="vavae")
    patches, _ = enc(_images(2, 256))
    first, proj, proj2 = (torch.tensor(v, dtype=torch.float64) for v in VAVAE_REFERENCE)
    p = patches.double()
    d, n = torch.arange(384, dtype=torch.float64), torch.arange(256, dtype=torch.float64)
    assert torch.allclose(p[:, 0, :6], first, rtol=0, atol=2e-5)
    assert torch.allclose(((p @ torch.cos(0.7 * d)) * torch.cos(0.3 * n)).sum(1), proj, rtol=0, atol=5e-3)
    assert torch.allclose(((p @ torch.sin(1.3 * d)) * torch.sin(0.2 * n)).sum(1), proj2, rtol=0, atol=5e-3)
    # REPA's preprocessing (the default) gives other targets from the same weights
    repa, _ = AlignmentEncoder("dinov2_vits14", resolution=256, weights_path=str(weights))(_images(2, 256))
    assert (repa[:, 0, :6].double() - first).abs().max() > 0.1
    with pytest.raises(ValueError, match="preprocess='imagenet' is not one of"):
        AlignmentEncoder("dinov2_vits14", resolution=256, weights_path=str(weights), preprocess="imagenet")


def test_token_grid_at_several_resolutions() -> None:
    enc = AlignmentEncoder("dinov2_vits14_reg", resolution=32, random_init=True)
    assert (enc.dim, enc.num_prefix) == (384, 5)
    assert [enc.grid(r) for r in (32, 64, 256, 512)] == [2, 4, 16, 32]  # 224·r/256 px, patch 14
    for side in (32, 64):
        patches, cls = enc(_images(1, side))
        assert patches.shape == (1, enc.grid(side) ** 2, 384) and cls.shape == (1, 384)  # registers dropped
    with pytest.raises(ValueError, match="multiple of 16"):
        enc.grid(100)
    with pytest.raises(ValueError, match="square"):
        enc(torch.zeros(1, 3, 32, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        enc(torch.zeros(1, 3, 32, 32))
    assert AlignmentEncoder("foundation-shapes", resolution=32, random_init=True).grid(64) == 8


def test_yardstick_foundation_goes_through_the_same_class_and_path() -> None:
    from eval.classifier import FoundationNet, to_unit_range

    enc = AlignmentEncoder("foundation-mnist5k", resolution=32, random_init=True, seed=3)
    assert type(enc) is AlignmentEncoder and isinstance(enc.backbone.net, FoundationNet)
    x = _images(4, 32, channels=1)
    patches, cls = enc(x)
    assert patches.shape == (4, enc.grid(32) ** 2, 64) == (4, 16, 64) and cls.shape == (4, 64)
    # Its own preprocessing ([-1, 1], no resize); class token = the global embedding = mean patch token.
    expected = enc.backbone.net.tokens(to_unit_range(x))
    assert torch.allclose(patches, expected) and torch.allclose(cls, enc.backbone.net.features(to_unit_range(x)))
    rgb = AlignmentEncoder("foundation-shapes", resolution=32, random_init=True)
    assert rgb(x)[0].shape == (4, 16, 64)  # grey images are repeated to the RGB network's 3 channels


@pytest.mark.parametrize(("name", "resolution"), [("dinov2_vits14", 32), ("foundation-mnist5k", 32),
                                                ("foundation2-mnist5k", 32)])
def test_built_from_a_spec_frozen_and_identified(name: str, resolution: int) -> None:
    spec = {"_target_": "eval.encoders.AlignmentEncoder", "name": name, "resolution": resolution, "random_init": True}
    enc = build(spec)
    assert enc.config == {**spec, "weights_path": None, "cache_dir": None, "download": False, "seed": 0,
                          "preprocess": "repa"}
    again = build(enc.config)
    assert again.identity() == enc.identity() and enc.identity()["name"] == name
    assert enc.identity()["class"] == "eval.encoders.AlignmentEncoder" and len(enc.identity()["sha256"]) == 64
    assert build({**spec, "seed": 1}).identity()["sha256"] != enc.identity()["sha256"]
    # Frozen: no parameter trains, .train() keeps eval mode, outputs carry no graph.
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.train().training
    x = _images(2, resolution, channels=1)
    with torch.enable_grad():
        patches, cls = enc(x)
    assert not patches.requires_grad and not cls.requires_grad
    # Held by a method: outside its parameters and state dict, found by frozen_modules.
    owner = torch.nn.Linear(2, 2)
    hold_frozen(owner, "encoder", enc)
    assert set(owner.state_dict()) == {"weight", "bias"} and frozen_modules(owner) == {"encoder": enc}
    with pytest.raises(BuildError, match="unknown alignment encoder 'dinov2_vitx14'"):
        build({**spec, "name": "dinov2_vitx14"})


@pytest.mark.parametrize(("name", "file"), [("dinov2_vitb14", "dinov2_vitb14_pretrain.pth"),
                                            ("dinov2_vitl14_reg", "dinov2_vitl14_reg4_pretrain.pth")])
def test_missing_weights_name_the_file_and_where_to_put_it(tmp_path, monkeypatch, name: str, file: str) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as info:
        AlignmentEncoder(name, cache_dir=str(tmp_path / "cache"))
    msg = str(info.value)
    assert name in msg and file in msg and f"Put the file in {tmp_path / 'cache'}" in msg and "weights_path" in msg
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "nope.pth")):
        AlignmentEncoder(name, weights_path=str(tmp_path / "nope.pth"))


def test_encoder_names() -> None:
    names = encoder_names()
    assert {"dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14"} <= set(names)
    assert {"dinov2_vits14_reg", "dinov2_vitg14_reg", "foundation-mnist5k", "foundation-shapes"} <= set(names)


def test_foundation2_has_the_patch4_token_grid_and_refuses_bad_input() -> None:
    """foundation2-*: stride 4, so 32 px images give the 8x8 grid of a patch-4 backbone; frozen; bad input refused."""
    from eval.classifier import FoundationNet2, to_unit_range

    enc = AlignmentEncoder("foundation2-mnist5k", resolution=32, random_init=True, seed=3)
    assert isinstance(enc.backbone.net, FoundationNet2) and (enc.dim, enc.num_prefix) == (64, 0)
    assert [enc.grid(r) for r in (32, 64)] == [8, 16]
    x = _images(4, 32, channels=1)
    patches, cls = enc(x)
    assert patches.shape == (4, 64, 64) and cls.shape == (4, 64)
    expected = enc.backbone.net.tokens(to_unit_range(x))
    assert torch.allclose(patches, expected) and torch.allclose(cls, expected.mean(1))
    assert enc(_images(1, 64, channels=1))[0].shape == (1, 256, 64)  # the position table is resampled to 16x16
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.train().training
    with pytest.raises(ValueError, match="multiple of 4, got 30"):
        enc(torch.zeros(1, 1, 30, 30, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 4"):
        AlignmentEncoder("foundation2-mnist5k", resolution=30, random_init=True)
    with pytest.raises(ValueError, match="square"):
        enc(torch.zeros(1, 1, 32, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        enc(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="1-channel images"):
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert AlignmentEncoder("foundation2-shapes", resolution=32, random_init=True)(x)[0].shape == (4, 64, 64)
    # Another network than v1 (whose 32 px grid is 4x4), under its own name and identity.
    old = AlignmentEncoder("foundation-mnist5k", resolution=32, random_init=True, seed=3)
    assert old.grid(32) == 4 and old.identity()["name"] != enc.identity()["name"]
    assert {"foundation2-mnist5k", "foundation2-shapes"} <= set(encoder_names())
    with pytest.raises(ValueError, match="unknown alignment encoder 'foundation3-mnist5k'"):
        AlignmentEncoder("foundation3-mnist5k", resolution=32, random_init=True)


def test_foundation2_is_trained_once_cached_and_rebuilt_identically(tmp_path, monkeypatch) -> None:
    """First use trains and caches (here on 96 digits so it takes seconds); the second use loads the same file;
    training again in another cache gives the same weights bit for bit."""
    import functools

    import eval.classifier as classifier

    def few(dataset: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = classifier.load_dataset_tensors(dataset, split)
        return images[:96], labels[:96]

    monkeypatch.setattr(classifier, "load_or_train_classifier",
                        functools.partial(classifier.load_or_train_classifier, data_fn=few))
    enc = AlignmentEncoder("foundation2-mnist5k", resolution=32, cache_dir=str(tmp_path / "a"))
    files = list((tmp_path / "a").glob("foundation2-mnist5k-v1-*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = AlignmentEncoder("foundation2-mnist5k", resolution=32, cache_dir=str(tmp_path / "a"))
    assert files[0].stat().st_mtime_ns == mtime and again.identity() == enc.identity()
    fresh = AlignmentEncoder("foundation2-mnist5k", resolution=32, cache_dir=str(tmp_path / "b"))
    assert fresh.identity() == enc.identity() and fresh.weights_file_sha256 == enc.weights_file_sha256
    assert enc.identity() != AlignmentEncoder("foundation2-mnist5k", resolution=32, random_init=True).identity()
    x = _images(3, 32, channels=1)
    assert torch.equal(enc(x)[0], fresh(x)[0])
    assert not any(p.requires_grad for p in enc.parameters())


def test_the_v1_recipes_keep_their_cache_names() -> None:
    """Fields added to the recipe for foundation2 leave the v1 hashes (and so the cache file names) unchanged."""
    from eval.classifier import RECIPES

    assert RECIPES["lenet"].hash("abc") == "cf1ce2be2d7f"  # the values before foundation2 existed
    assert RECIPES["foundation"].hash("abc") == "34b91ed7aebf"
    assert RECIPES["foundation2"].hash("abc") not in ("cf1ce2be2d7f", "34b91ed7aebf")
