"""The Inception extractor against torchmetrics, weights loading and its errors (eval.features).

Pretrained weights cannot be downloaded here, so both sides load the same randomly initialised
weights of the identical architecture from one file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eval.features import (
    INCEPTION_FILE,
    INCEPTION_SHA256,
    InceptionFeatures,
    WeightsNotFoundError,
    file_sha256,
    make_random_inception_weights,
)
from eval.fid import fid_from_stats
from eval.stats import FeatureStats


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> str:
    return str(make_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth", seed=0))


def _image_pair(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8)
    fake = (real.float() * 0.6 + torch.rand(real.shape, generator=g) * 90).clamp(0, 255).to(torch.uint8)
    return real, fake


def _compare_with_torchmetrics(weights: str, resize: str, antialias: bool, n: int) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _image_pair(n)
    ext = InceptionFeatures(weights, resize=resize)  # type: ignore[arg-type]
    a, b = FeatureStats(ext.dim), FeatureStats(ext.dim)
    for i in range(0, n, 16):
        a.update(ext(real[i : i + 16]))
        b.update(ext(fake[i : i + 16]))
    # n < 2048: the covariances are singular, so the guard must be lifted explicitly for this check.
    ours = fid_from_stats(a.gaussian(ext.manifest()), b.gaussian(ext.manifest()), allow_singular=True)
    tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, antialias=antialias)
    for i in range(0, n, 16):
        tm.update(real[i : i + 16], real=True)
        tm.update(fake[i : i + 16], real=False)
    theirs = float(tm.compute())
    assert ours > 0
    assert abs(ours - theirs) <= 1e-4 * abs(theirs)


def test_fid_equals_torchmetrics_tf1_resize(random_weights: str) -> None:
    _compare_with_torchmetrics(random_weights, "tf1-bilinear", antialias=False, n=32)


@pytest.mark.slow
def test_fid_equals_torchmetrics_antialias_resize(random_weights: str) -> None:
    _compare_with_torchmetrics(random_weights, "bilinear-antialias", antialias=True, n=64)


def _torch_fidelity_inception(weights: str) -> torch.nn.Module:
    # torch-fidelity's own module and forward; its constructor would unpickle the weights file with
    # weights_only=False, so it gets an empty placeholder and the weights are loaded safely afterwards.
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _SafeLoad(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # type: ignore[no-untyped-def]
            return None if not state_dict else super().load_state_dict(state_dict, strict=strict, assign=assign)

    placeholder = Path(weights).with_name("empty.pth")
    torch.save({}, placeholder)
    net = _SafeLoad("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(placeholder))
    torch.nn.Module.load_state_dict(net, torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


@pytest.mark.parametrize("size", [32, 299])
def test_default_features_are_bitwise_torch_fidelity(random_weights: str, size: int) -> None:
    # Reference: toshas/torch-fidelity 0.4.0, torch_fidelity/feature_extractor_inceptionv3.py
    # (FeatureExtractorInceptionV3.forward), same weights, same images, same process.
    x = torch.randint(0, 256, (3, 3, size, size), generator=torch.Generator().manual_seed(size), dtype=torch.uint8)
    with torch.no_grad():
        pool3, logits = _torch_fidelity_inception(random_weights)(x)
    ext = InceptionFeatures(random_weights)
    out = ext.extract(x)
    assert torch.equal(ext(x), pool3)
    assert torch.equal(out["pool3"], pool3) and torch.equal(out["logits"], logits)
    # channels_last is the opt-in fast path: float32 rounding away from the reference, never more.
    fast = InceptionFeatures(random_weights, channels_last=True)(x)
    assert torch.allclose(fast, pool3, rtol=0, atol=1e-3 * float(pool3.abs().max()))


def test_extract_outputs_and_grey_images(random_weights: str) -> None:
    ext = InceptionFeatures(random_weights)
    grey = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    out = ext.extract(grey, spatial=True)
    assert out["pool3"].shape == (2, 2048) and out["logits"].shape == (2, 1008) and out["spatial"].shape == (2, 2023)
    assert torch.equal(out["pool3"], ext(grey.expand(-1, 3, -1, -1)))
    manifest = ext.manifest()
    assert manifest.pop("spec") == ext.spec()  # what rebuilds the extractor for a statistics file
    assert manifest == {
        "extractor": "inception-v3-pool3",
        "weights_sha256": file_sha256(random_weights),
        "resize": "tf1-bilinear",
        "dim": 2048,
    }
    with pytest.raises(TypeError, match="uint8"):
        ext(grey.float())


def test_missing_weights_message_names_file_hash_and_place(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as info:
        InceptionFeatures(cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert INCEPTION_FILE in msg and INCEPTION_SHA256 in msg and str(tmp_path / "cache") in msg
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "nope.pth")):
        InceptionFeatures(weights_path=tmp_path / "nope.pth")


def test_cached_file_with_wrong_hash_refused(tmp_path, monkeypatch, random_weights: str) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / INCEPTION_FILE).write_bytes(open(random_weights, "rb").read())
    with pytest.raises(ValueError, match=f"expected {INCEPTION_SHA256}"):
        InceptionFeatures(cache_dir=tmp_path / "cache")
