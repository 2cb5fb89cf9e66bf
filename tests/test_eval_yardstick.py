"""The yardstick classifier and FID on the built-in digits (eval.classifier, DESIGN.md §5)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from eval.classifier import RECIPES, load_dataset_tensors, load_or_train_classifier, tensors_sha256, train_classifier
from eval.features import YardstickFeatures
from eval.fid import fid_from_stats
from eval.generate import image_stats, yardstick_metrics, yardstick_reference
from gen.utils.seed import PerImageRandom


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("yardstick")
    start = time.perf_counter()
    load_or_train_classifier("mnist5k", path)  # trains once for the module (about 20-40 s on 2 cores)
    pytest.yardstick_train_s = time.perf_counter() - start  # type: ignore[attr-defined]
    return path


def test_classifier_accuracy_on_heldout_digits(cache) -> None:
    ys = load_or_train_classifier("mnist5k", cache)
    images, labels = load_dataset_tensors("mnist5k", "heldout")
    acc = ys.class_accuracy(images, labels)
    assert acc >= 0.97, f"held-out accuracy {acc:.4f}"
    assert ys.name == "lenet-mnist5k-v1" and ys.path.suffix == ".safetensors"
    assert ys.path.name.startswith("lenet-mnist5k-v1-")
    assert pytest.yardstick_train_s < 120  # type: ignore[attr-defined]


def test_cached_network_is_reused(cache) -> None:
    ys = load_or_train_classifier("mnist5k", cache)
    mtime = ys.path.stat().st_mtime_ns
    start = time.perf_counter()
    again = load_or_train_classifier("mnist5k", cache)
    assert time.perf_counter() - start < 10
    assert again.path.stat().st_mtime_ns == mtime and again.weights_sha256 == ys.weights_sha256


def test_training_is_deterministic_and_seed_dependent() -> None:
    images, labels = load_dataset_tensors("mnist5k", "train")
    idx = torch.arange(0, 4500, 15)  # 300 images of every class
    quick = dataclasses.replace(RECIPES["lenet"], epochs=1)
    a = tensors_sha256(train_classifier(images[idx], labels[idx], quick).state_dict())
    b = tensors_sha256(train_classifier(images[idx], labels[idx], quick).state_dict())
    c = tensors_sha256(train_classifier(images[idx], labels[idx], dataclasses.replace(quick, seed=1)).state_dict())
    assert a == b != c


def test_yardstick_fid_heldout_small_noise_large(cache) -> None:
    ext, ref = yardstick_reference("mnist5k", "train", cache)
    assert ref.manifest["extractor"] == "lenet-mnist5k-v1" and ref.n == 4500
    held, _ = load_dataset_tensors("mnist5k", "heldout")
    fid_held = fid_from_stats(image_stats(held, ext, 250).stats.gaussian(ext.manifest()), ref)
    noise = torch.randint(0, 256, held.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    fid_noise = fid_from_stats(image_stats(noise, ext, 250).stats.gaussian(ext.manifest()), ref)
    assert fid_held < 5.0, fid_held
    assert fid_noise > 50 * fid_held, (fid_held, fid_noise)


def test_yardstick_metrics_of_a_generator_returning_real_digits(cache) -> None:
    images, labels = load_dataset_tensors("mnist5k", "heldout")

    def generate(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = PerImageRandom(seeds).randint(len(images))  # one held-out digit per seed
        return images[idx], labels[idx]

    got = yardstick_metrics(generate, num_images=400, dataset_name="mnist5k", cache_dir=cache, batch_size=64)
    assert got["class_accuracy"] >= 0.97
    assert got["fid"] < 10.0


def test_yardstick_features_refuse_wrong_images(cache) -> None:
    ext = YardstickFeatures("mnist5k", cache)
    with pytest.raises(ValueError, match="32x32"):
        ext(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1-channel"):
        ext(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        ext(torch.zeros(2, 1, 32, 32))
