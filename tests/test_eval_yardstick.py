"""The yardstick classifier and FID on the built-in digits (eval.classifier; the small benchmark of bench/README.md)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from eval.classifier import (
    RECIPES,
    load_dataset_tensors,
    load_or_train_classifier,
    tensors_sha256,
    train_classifier,
)
from eval.features import YardstickFeatures
from eval.fid import fid_from_stats
from eval.generate import image_stats, yardstick_metrics, yardstick_reference
from gen.utils.seed import PerImageRandom
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache folder holding the trained network: trained (about 20-40 s on 2 cores) once in the cache the
    suite shares, under its build lock, and copied here, so each test worker of this module does not train it."""
    path = tmp_path_factory.mktemp("yardstick")
    shutil.copy(load_or_train_classifier("mnist5k", ROOT / ".cache" / "yardstick").path, path)
    return path


_BUILD = """
import sys, time
from pathlib import Path
import torch
import eval.classifier as c

real = c.train_classifier
def counted(*args, **kwargs):
    with open(sys.argv[2], "a") as f:
        f.write("trained\\n")
    time.sleep(1.0)  # long enough for the other process to find no file and wait on the lock
    return real(*args, **kwargs)
c.train_classifier = counted
g = torch.Generator().manual_seed(0)
few = lambda name, split: (torch.randint(0, 256, (20, 1, 32, 32), generator=g, dtype=torch.uint8), torch.arange(20) % 10)
print(c.load_or_train_classifier("mnist5k", sys.argv[1], data_fn=few).weights_sha256)
"""


def test_two_processes_building_the_same_network_train_it_once(tmp_path) -> None:
    """Two processes that find no cached network at once: one trains it, the other waits on the build lock and loads
    the file (before the lock, both trained it: two bench workers or test workers started together)."""
    log = tmp_path / "trained.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path / "cache"), str(log)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert log.read_text() == "trained\n"
    assert outs[0][0] == outs[1][0]  # the same weights in both
    assert len(list((tmp_path / "cache").glob("lenet-mnist5k-v1-*.safetensors"))) == 1


def test_classifier_accuracy_on_heldout_digits(cache) -> None:
    ys = load_or_train_classifier("mnist5k", cache)
    images, labels = load_dataset_tensors("mnist5k", "heldout")
    acc = ys.class_accuracy(images, labels)
    assert acc >= 0.97, f"held-out accuracy {acc:.4f}"
    assert ys.name == "lenet-mnist5k-v1" and ys.path.suffix == ".safetensors"
    assert ys.path.name.startswith("lenet-mnist5k-v1-")


def test_cached_network_is_reused(cache) -> None:
    ys = load_or_train_classifier("mnist5k", cache)
    mtime = ys.path.stat().st_mtime_ns
    again = load_or_train_classifier("mnist5k", cache)  # loaded, not retrained: the file is untouched
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


def test_memorisation_rate_tells_copies_from_fresh_digits(cache) -> None:
    """Copies of training digits score ~1, held-out digits (fresh data) ~0.5, noise 0, in yardstick features."""
    train, _ = load_dataset_tensors("mnist5k", "train")
    held, labels = load_dataset_tensors("mnist5k", "heldout")

    def source(images: torch.Tensor) -> Callable:
        def generate(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            idx = torch.tensor(seeds) % len(images)
            return images[idx], labels[idx % len(labels)]
        return generate

    kw = dict(num_images=250, dataset_name="mnist5k", cache_dir=cache, batch_size=64, memorisation=True)
    copies = yardstick_metrics(source(train), **kw)
    fresh = yardstick_metrics(source(held), **kw)
    noise = torch.randint(0, 256, held.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert copies["memorisation_rate"] == 1.0 and copies["sample_nn_median"] < 1e-4  # cdist rounding
    assert 0.4 < fresh["memorisation_rate"] < 0.6, fresh
    assert yardstick_metrics(source(noise), **kw)["memorisation_rate"] == 0.0
    assert copies["heldout_nn_median"] == fresh["heldout_nn_median"] > 0


def test_memorisation_follows_the_images_a_run_trained_on(cache) -> None:
    """A run on a subset of the training split is measured against that subset: copies of digits outside it are not
    copies of its training data, and the held-out threshold is the distance to the subset."""
    from gen.data.base import run_training_tensors

    data = {"name": "mnist5k", "dataset": {"_target_": "gen.data.builtin.MNIST5k", "split": "train", "subset": 100}}
    subset, _ = run_training_tensors(data)
    train, labels = load_dataset_tensors("mnist5k", "train")
    rows = {bytes(r) for r in subset.flatten(1).numpy()}
    outside = train[torch.tensor([bytes(r) not in rows for r in train.flatten(1).numpy()])]
    assert len(subset) == 100 and len(outside) == 4400

    def source(images: torch.Tensor) -> Callable:
        return lambda seeds: (images[torch.tensor(seeds) % len(images)], labels[torch.tensor(seeds) % len(labels)])

    kw = dict(num_images=200, dataset_name="mnist5k", cache_dir=cache, batch_size=100, memorisation=True)
    whole = yardstick_metrics(source(outside), **kw)  # against the whole split (the default): all copies
    mine = yardstick_metrics(source(outside), **kw, trained_on=subset)
    assert whole["memorisation_rate"] == 1.0
    assert mine["memorisation_rate"] < 0.8 and mine["sample_nn_median"] > 0.1 * mine["heldout_nn_median"]
    assert mine["heldout_nn_median"] > whole["heldout_nn_median"]  # 100 digits lie farther from held-out ones
    assert yardstick_metrics(source(subset), **kw, trained_on=subset)["memorisation_rate"] == 1.0
    assert mine["fid"] == whole["fid"]  # FID's reference stays the whole training split


def test_nearest_distances_equal_brute_force() -> None:
    from eval.memorisation import memorisation_rate, nearest_distances

    g = torch.Generator().manual_seed(0)
    q, r = torch.randn(37, 5, generator=g), torch.randn(50, 5, generator=g)
    brute = torch.tensor([min(float((a - b).double().norm()) for b in r) for a in q], dtype=torch.float64)
    torch.testing.assert_close(nearest_distances(q, r, chunk=8), brute)
    with pytest.raises(ValueError, match=r"need \(M, D\) and \(N, D\)"):
        nearest_distances(q, r[:, :4])
    assert memorisation_rate(r[:10], r, q)["memorisation_rate"] == 1.0


def test_yardstick_features_refuse_wrong_images(cache) -> None:
    ext = YardstickFeatures("mnist5k", cache)
    with pytest.raises(ValueError, match="32x32"):
        ext(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    colour = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    colour[:, 0] = 255  # grey repeated to RGB (sample.py npz_rgb=true) is read as grey; colour is refused
    with pytest.raises(ValueError, match="1-channel.*channels differ"):
        ext(colour)
    assert torch.equal(ext(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)), ext(torch.zeros(2, 1, 32, 32, dtype=torch.uint8)))
    with pytest.raises(TypeError, match="uint8"):
        ext(torch.zeros(2, 1, 32, 32))


# ----------------------------------------------------------------------------------------------
# The command line on the yardstick.


def test_cli_ref_then_npz_and_folder(cache, tmp_path, capsys) -> None:
    import json

    from PIL import Image

    from eval.__main__ import main
    from eval.stats import load_stats, save_image_npz

    ref = tmp_path / "ref.npz"
    assert main(["ref", "--dataset", "mnist5k", "--extractor", "yardstick", "--cache-dir", str(cache), "--out", str(ref)]) == 0
    manifest = load_stats(ref).manifest
    assert manifest["extractor"] == "lenet-mnist5k-v1" and manifest["num_images"] == 4500
    assert manifest["dataset"] == "mnist5k/train" and len(manifest["weights_sha256"]) == 64
    capsys.readouterr()

    images, labels = load_dataset_tensors("mnist5k", "heldout")
    save_image_npz(tmp_path / "held.npz", images, labels)
    out = tmp_path / "m.json"
    assert main(["npz", str(tmp_path / "held.npz"), "--ref", str(ref), "--cache-dir", str(cache), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    written = json.loads(out.read_text())
    assert printed == written
    assert written["fid"] < 5 and written["class_accuracy"] >= 0.97 and written["num_images"] == 500

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(200):
        Image.fromarray(images[i, 0].numpy()).save(folder / f"{i:04d}.png")
    assert main(["folder", str(folder), "--ref", str(ref), "--cache-dir", str(cache), "--out", str(out)]) == 0
    from_folder = json.loads(out.read_text())
    capsys.readouterr()
    # The same 200 images through the npz path give the same FID.
    save_image_npz(tmp_path / "first200.npz", images[:200])
    assert main(["npz", str(tmp_path / "first200.npz"), "--ref", str(ref), "--cache-dir", str(cache), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["fid"] == pytest.approx(from_folder["fid"], rel=1e-12)


def test_cli_refuses_bad_samples_and_foreign_stats(cache, tmp_path, capsys) -> None:
    import numpy as np

    from eval.__main__ import main
    from eval.stats import GaussianStats, save_stats

    foreign = tmp_path / "foreign.npz"
    save_stats(foreign, GaussianStats(np.zeros(128), np.eye(128), 4500,
                                      {"extractor": "lenet-mnist5k-v1", "weights_sha256": "0" * 64, "resize": "none-32"}))
    images, _ = load_dataset_tensors("mnist5k", "heldout")
    from eval.stats import save_image_npz

    save_image_npz(tmp_path / "held.npz", images)
    assert main(["npz", str(tmp_path / "held.npz"), "--ref", str(foreign), "--cache-dir", str(cache)]) == 2
    assert "weights_sha256" in capsys.readouterr().err
    np.savez(tmp_path / "float.npz", arr_0=np.random.rand(10, 32, 32, 1).astype(np.float32))
    assert main(["npz", str(tmp_path / "float.npz"), "--ref", str(foreign), "--cache-dir", str(cache)]) == 2
    assert "expected uint8" in capsys.readouterr().err
    few = tmp_path / "few.npz"
    save_image_npz(few, images[:50])
    ref = tmp_path / "ref.npz"
    main(["ref", "--dataset", "mnist5k", "--extractor", "yardstick", "--cache-dir", str(cache), "--out", str(ref)])
    capsys.readouterr()
    assert main(["npz", str(few), "--ref", str(ref), "--cache-dir", str(cache)]) == 2
    assert "singular" in capsys.readouterr().err
    assert main(["npz", str(few), "--ref", str(ref), "--cache-dir", str(cache), "--allow-singular"]) == 0


def test_cli_preset_with_a_generator_factory(cache, tmp_path, capsys, monkeypatch) -> None:
    import json
    import sys
    import types

    from eval.__main__ import main

    ref = tmp_path / "ref.npz"
    main(["ref", "--dataset", "mnist5k", "--extractor", "yardstick", "--cache-dir", str(cache), "--out", str(ref)])
    images, labels = load_dataset_tensors("mnist5k", "heldout")
    seen: dict[str, object] = {}

    def factory(snapshot: str, **options: str):
        seen.update(snapshot=snapshot, **options)

        def generate(seeds: list[int]):
            idx = PerImageRandom(seeds).randint(len(images))
            return images[idx], labels[idx]

        return generate

    monkeypatch.setitem(sys.modules, "fake_sampler", types.SimpleNamespace(make=factory))
    out = tmp_path / "m.json"
    argv = ["fid5k", "snap.safetensors", "--generator", "fake_sampler:make", "--option", "steps=8",
            "--num-images", "300", "--ref", str(ref), "--cache-dir", str(cache), "--out", str(out)]
    assert main(argv) == 0
    got = json.loads(out.read_text())
    assert seen == {"snapshot": "snap.safetensors", "steps": "8"}
    assert got["num_images"] == 300 and got["seeds"] == "0-299" and got["class_accuracy"] >= 0.97


@pytest.mark.slow  # trains the second network (about 30 s on 2 cores)
def test_foundation_encoder_is_a_different_network_behind_the_encoder_interface(cache) -> None:
    from eval.encoders import AlignmentEncoder

    enc = AlignmentEncoder("foundation-mnist5k", resolution=32, cache_dir=str(cache))
    lenet = load_or_train_classifier("mnist5k", cache)
    assert enc.weights_file_sha256 != lenet.weights_sha256
    assert enc.identity() == AlignmentEncoder("foundation-mnist5k", resolution=32, cache_dir=str(cache)).identity()
    images, labels = load_dataset_tensors("mnist5k", "heldout")
    patches, cls = enc(images[:8])
    assert patches.shape == (8, 16, enc.dim) and cls.shape == (8, enc.dim)
    foundation = load_or_train_classifier("mnist5k", cache, kind="foundation")
    assert foundation.weights_sha256 == enc.weights_file_sha256 and foundation.class_accuracy(images, labels) >= 0.9
    dino = AlignmentEncoder("dinov2_vits14", resolution=32, random_init=True)
    assert dino(images[:2])[0].shape == (2, 4, 384)



@pytest.mark.slow  # trains foundation2 (24 epochs: about 4 min on one idle core)
def test_foundation2_is_stronger_than_v1_and_tiles_like_the_backbone(cache) -> None:
    """foundation2-mnist5k: an 8x8 grid at 32 px, another network than the FID LeNet and than v1, and held-out
    digits classified at least as well as by v1 (which the test above holds to >= 0.9)."""
    from eval.encoders import AlignmentEncoder

    enc = AlignmentEncoder("foundation2-mnist5k", resolution=32, cache_dir=str(cache))
    images, labels = load_dataset_tensors("mnist5k", "heldout")
    patches, cls = enc(images[:8])
    assert patches.shape == (8, 64, 64) and cls.shape == (8, 64) and enc.grid(32) == 8
    new = load_or_train_classifier("mnist5k", cache, kind="foundation2")
    old = load_or_train_classifier("mnist5k", cache, kind="foundation")
    lenet = load_or_train_classifier("mnist5k", cache)
    assert new.name == "foundation2-mnist5k-v1" and new.weights_sha256 == enc.weights_file_sha256
    assert len({new.weights_sha256, old.weights_sha256, lenet.weights_sha256}) == 3
    assert new.class_accuracy(images, labels) >= max(0.98, old.class_accuracy(images, labels))

def test_cli_under_torchrun_matches_one_process(cache, tmp_path, capsys) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from eval.__main__ import main
    from eval.stats import save_image_npz

    ref = tmp_path / "ref.npz"
    main(["ref", "--dataset", "mnist5k", "--extractor", "yardstick", "--cache-dir", str(cache), "--out", str(ref)])
    images, labels = load_dataset_tensors("mnist5k", "heldout")
    save_image_npz(tmp_path / "s.npz", images[:333], labels[:333])  # 333 images: 6 batches of 64 (last 13)
    args = ["npz", str(tmp_path / "s.npz"), "--ref", str(ref), "--cache-dir", str(cache), "--batch-size", "64"]
    # The same thread count as the 2 processes below: oneDNN convolutions sum in another order with more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    port = free_port()
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "eval", *args, "--out", str(tmp_path / "two.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["num_images"] == 333
    assert abs(two["fid"] - one["fid"]) <= 1e-9 * one["fid"]
    assert two["class_accuracy"] == one["class_accuracy"]
