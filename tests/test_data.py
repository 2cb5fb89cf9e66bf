"""Data package: built-in datasets, sampler, pixel helpers, image folders and CIFAR-10."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gen.data import InfiniteSampler, MNIST5k, random_hflip, stratified_split, to_model_input, to_uint8

# ----------------------------------------------------------------------------------------------
# Pixel helpers


def test_uint8_round_trip_is_exact() -> None:
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(2, 3, 1, 1)
    x = to_model_input(u)
    assert x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(to_uint8(x), u)


def test_to_uint8_rounds_and_clamps() -> None:
    x = torch.tensor([-3.0, -1.0, 1.0, 5.0, 0.0])
    assert to_uint8(x).tolist() == [0, 0, 255, 255, 128]  # 127.5 * 1 = 127.5 rounds to even -> 128
    # Half a grey level below a level rounds to it, not down to the one below (truncation would).
    assert to_uint8(torch.tensor([(100 - 0.4) / 127.5 - 1.0])).item() == 100


def test_to_model_input_rejects_float() -> None:
    with pytest.raises(TypeError):
        to_model_input(torch.zeros(1, 1, 2, 2))


def test_random_hflip_is_deterministic_and_per_sample() -> None:
    x = torch.arange(64 * 3 * 4 * 4, dtype=torch.float32).view(64, 3, 4, 4)
    a = random_hflip(x, torch.Generator().manual_seed(0))
    b = random_hflip(x, torch.Generator().manual_seed(0))
    c = random_hflip(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    flipped = torch.tensor([torch.equal(a[i], x[i].flip(-1)) for i in range(64)])
    kept = torch.tensor([torch.equal(a[i], x[i]) for i in range(64)])
    assert bool((flipped ^ kept).all())  # each sample either mirrored or untouched
    assert 10 < int(flipped.sum()) < 54  # both outcomes occur
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(0), p=0.0), x)


# ----------------------------------------------------------------------------------------------
# InfiniteSampler


def _take(sampler: InfiniteSampler, n: int) -> list[int]:
    return list(itertools.islice(iter(sampler), n))


def test_sampler_epochs_are_permutations() -> None:
    s = InfiniteSampler(10, seed=3)
    stream = _take(s, 30)
    for e in range(3):
        assert sorted(stream[10 * e : 10 * e + 10]) == list(range(10))
    assert stream[:10] != stream[10:20]  # new permutation each epoch
    assert stream[:10] != list(range(10))
    assert _take(InfiniteSampler(10, seed=3), 30) == stream
    assert _take(InfiniteSampler(10, seed=4), 30) != stream
    assert _take(InfiniteSampler(10, shuffle=False), 12) == list(range(10)) + [0, 1]


@pytest.mark.parametrize("world", [2, 3])
def test_sampler_ranks_interleave_to_global_stream(world: int) -> None:
    size, n = 7, 40  # size not divisible by world: rank streams cross epoch boundaries mid-stride
    glob = _take(InfiniteSampler(size, rank=0, world=1, seed=5), n * world)
    per_rank = [_take(InfiniteSampler(size, rank=r, world=world, seed=5), n) for r in range(world)]
    merged = [per_rank[k % world][k // world] for k in range(n * world)]
    assert merged == glob


def test_sampler_resume_continues_stream() -> None:
    size, world, consumed = 13, 2, 18
    full = [_take(InfiniteSampler(size, rank=r, world=world, seed=1), 30) for r in range(world)]
    resumed = [_take(InfiniteSampler(size, rank=r, world=world, seed=1, start=consumed), 20) for r in range(world)]
    for r in range(world):
        assert resumed[r] == full[r][consumed // world : consumed // world + 20]
    # index_at agrees with iteration.
    s = InfiniteSampler(size, seed=1)
    assert [s.index_at(p) for p in range(40)] == _take(InfiniteSampler(size, seed=1), 40)


def test_sampler_batches_and_validation() -> None:
    s = InfiniteSampler(10, rank=1, world=2, seed=0)
    b = next(s.batches(4))
    assert b.dtype == torch.long and b.shape == (4,)
    assert b.tolist() == _take(InfiniteSampler(10, rank=1, world=2, seed=0), 4)
    with pytest.raises(ValueError):
        InfiniteSampler(0)
    with pytest.raises(ValueError):
        InfiniteSampler(5, rank=2, world=2)


# ----------------------------------------------------------------------------------------------
# Built-in MNIST (5k)


@pytest.fixture(scope="module")
def mnist_all() -> MNIST5k:
    return MNIST5k(split="all")


def test_mnist5k_all(mnist_all: MNIST5k) -> None:
    ds = mnist_all
    assert len(ds) == 5000 and ds.num_classes == 10 and ds.channels == 1 and ds.resolution == 32
    assert ds.name == "mnist5k"
    img, label = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (1, 32, 32) and isinstance(label, int)
    images, labels = ds.tensors()
    assert images.shape == (5000, 1, 32, 32) and labels.shape == (5000,)
    assert torch.bincount(labels, minlength=10).tolist() == [500] * 10
    # 28x28 digit centred: 2 zero rows/columns on each side, ink inside.
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(images[:, :, border].max()) == 0
    assert int(images[:, :, 2:30, 2:30].max()) == 255
    assert images.float().mean() > 10  # real digits, not blank


def test_mnist5k_splits(mnist_all: MNIST5k) -> None:
    train, held = MNIST5k(split="train"), MNIST5k(split="heldout")
    assert len(train) == 4500 and len(held) == 500
    assert torch.bincount(held.tensors()[1], minlength=10).tolist() == [50] * 10
    # Disjoint, together the whole set, and fixed across constructions.
    all_imgs = mnist_all.tensors()[0].flatten(1)
    key = {tuple(r.tolist()): i for i, r in enumerate(all_imgs)}
    tr_idx = {key[tuple(r.tolist())] for r in train.tensors()[0].flatten(1)}
    he_idx = {key[tuple(r.tolist())] for r in held.tensors()[0].flatten(1)}
    assert len(tr_idx | he_idx) == len(set(key.values()))
    assert not tr_idx & he_idx
    assert torch.equal(MNIST5k(split="heldout").tensors()[0], held.tensors()[0])


def test_mnist5k_subset_is_a_fixed_stratified_part_of_the_training_split() -> None:
    train = MNIST5k(split="train").tensors()[0].flatten(1)
    sub = MNIST5k(subset=500)
    images, labels = sub.tensors()
    assert len(sub) == 500 and torch.bincount(labels, minlength=10).tolist() == [50] * 10
    rows = {tuple(r.tolist()) for r in train}
    assert all(tuple(r.tolist()) in rows for r in images.flatten(1))  # never a held-out digit
    assert torch.equal(MNIST5k(subset=500).tensors()[0], images)  # the same choice on every construction
    assert torch.bincount(MNIST5k(subset=13).tensors()[1], minlength=10).tolist() == [2, 2, 2] + [1] * 7
    assert torch.equal(MNIST5k(subset=4500).tensors()[0], MNIST5k(split="train").tensors()[0])
    for bad in (0, 9, 4501, 2.5, True, "500"):
        with pytest.raises(ValueError, match=r"subset=.*whole number of training items from 10 .* to 4500"):
            MNIST5k(subset=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="takes part of the training split.*split='heldout'"):
        MNIST5k(split="heldout", subset=50)


def test_run_training_tensors_rebuild_what_a_run_trained_on(tmp_path) -> None:  # noqa: ANN001
    from gen.data.base import run_training_tensors

    spec = {"_target_": "gen.data.builtin.MNIST5k", "split": "train", "resolution": 32, "subset": 40}
    images, labels = run_training_tensors({"name": "mnist5k", "dataset": spec})
    assert torch.equal(images, MNIST5k(subset=40).tensors()[0]) and torch.equal(labels, MNIST5k(subset=40).labels)
    shapes = {"_target_": "gen.data.shapes.Shapes", "count": 12, "resolution": 32}
    assert run_training_tensors({"dataset": shapes})[0].shape == (12, 3, 32, 32)
    # a snapshot written before snapshots carried data.dataset trained on a built-in data set's whole training split
    old = run_training_tensors({"name": "mnist5k", "channels": 1, "resolution": 32, "num_classes": 10})
    assert torch.equal(old[0], MNIST5k(split="train").tensors()[0])
    assert run_training_tensors({"name": "shapes", "resolution": 16})[0].shape == (5000, 3, 16, 16)
    with pytest.raises(ValueError, match="no dataset spec .* names no built-in data set"):
        run_training_tensors({"name": "imagenet", "resolution": 256})
    with pytest.raises(ValueError, match="cannot rebuild the run's training data from data.dataset.*os.system"):
        run_training_tensors({"dataset": {"_target_": "os.system", "command": "true"}})  # a snapshot names project code only
    _write_class_folders(tmp_path)
    with pytest.raises(ValueError, match="ImageFolder, which is not held in memory"):
        run_training_tensors({"dataset": {"_target_": "gen.data.folder.ImageFolder", "root": str(tmp_path)}})


def test_mnist5k_resize_mode(mnist_all: MNIST5k) -> None:
    ds = MNIST5k(split="heldout", mode="resize", resolution=32)
    assert ds.tensors()[0].shape == (500, 1, 32, 32)
    # Resampling stretches ink into the old padding band.
    assert int(ds.tensors()[0][:, :, :2, :].max()) > 0 or int(ds.tensors()[0][:, :, :, :2].max()) > 0
    with pytest.raises(ValueError, match="resize"):
        MNIST5k(resolution=16, mode="pad")


def test_stratified_split_quota_and_determinism() -> None:
    labels = np.repeat(np.arange(3), [10, 20, 30])
    tr, he = stratified_split(labels, 7, key="k")
    assert np.bincount(labels[he], minlength=3).tolist() == [3, 2, 2]
    assert len(tr) + len(he) == 60 and not set(tr) & set(he)
    tr2, he2 = stratified_split(labels, 7, key="k")
    assert np.array_equal(he, he2)
    assert not np.array_equal(he, stratified_split(labels, 7, key="other")[1])


# ----------------------------------------------------------------------------------------------
# Procedural shapes


def test_shapes_deterministic_and_pure_in_index() -> None:
    from gen.data import SHAPES, Shapes

    a = Shapes(count=24, seed=7)
    assert len(a) == 24 and a.channels == 3 and a.resolution == 32 and a.num_classes == 6 and a.name == "shapes"
    img, label = a[5]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and label == 5
    assert torch.equal(Shapes(count=24, seed=7).tensors()[0], a.tensors()[0])
    assert not torch.equal(Shapes(count=24, seed=8).tensors()[0], a.tensors()[0])
    # Image i depends on (seed, i) only: a window of the stream equals the same slice.
    window = Shapes(count=10, seed=7, start=9)
    assert torch.equal(window.tensors()[0], a.tensors()[0][9:19])
    assert torch.equal(window.tensors()[1], a.tensors()[1][9:19])
    everything = Shapes(count=8, classes=SHAPES)
    assert everything.num_classes == len(SHAPES) and everything.classes == list(SHAPES)
    with pytest.raises(ValueError, match="classes"):
        Shapes(count=4, classes=["circle", "blob"])


def test_shapes_classes_are_distinguishable() -> None:
    from gen.data import Shapes

    images, labels = Shapes(count=1200, seed=0).tensors()
    assert torch.bincount(labels).tolist() == [200] * 6
    # Silhouettes: pixels far from the image's median colour, re-centred on their centre of mass so the
    # position jitter does not blur the class means. A nearest-class-mean rule on held-out images must
    # then beat chance (1/6) by far; identical or invisible shapes would sit at chance.
    x = images.float()
    contrast = (x - x.flatten(2).median(-1).values[..., None, None]).abs().mean(1)  # (N, 32, 32)
    masks = (contrast > 0.5 * contrast.flatten(1).amax(1)[:, None, None]).float()
    grid = torch.arange(32.0)
    area = masks.sum((1, 2))
    cy = (masks.sum(2) * grid).sum(1) / area
    cx = (masks.sum(1) * grid).sum(1) / area
    masks = torch.stack(
        [torch.roll(m, (16 - round(float(a)), 16 - round(float(b))), (0, 1)) for m, a, b in zip(masks, cy, cx)]
    )
    train, test = slice(0, 900), slice(900, None)
    means = torch.stack([masks[train][labels[train] == k].mean(0) for k in range(6)])
    pred = torch.cdist(masks[test].flatten(1), means.flatten(1)).argmin(1)
    assert (pred == labels[test]).float().mean() > 0.6
    # Textures vary: backgrounds are not flat.
    assert x[:, :, :4, :4].flatten(2).std(-1).mean() > 1.0


# ----------------------------------------------------------------------------------------------
# sklearn digits


def test_digits() -> None:
    from gen.data import Digits

    ds = Digits()
    assert len(ds) == 1797 and ds.num_classes == 10 and ds.channels == 1 and ds.resolution == 8
    images, labels = ds.tensors()
    assert images.dtype == torch.uint8 and images.shape == (1797, 1, 8, 8)
    assert int(images.max()) == 255 and int(images.min()) == 0
    held = Digits(split="heldout")
    assert len(held) == 200 and len(Digits(split="train")) == 1597
    assert torch.bincount(held.tensors()[1], minlength=10).tolist() == [20] * 10
    padded = Digits(resolution=16)
    assert padded.resolution == 16 and torch.equal(padded.tensors()[0][:, :, 4:12, 4:12], images)


# ----------------------------------------------------------------------------------------------
# Image folders


def _write_class_folders(root, sizes=((40, 30), (64, 64), (17, 50))):  # noqa: ANN001, ANN202
    from PIL import Image

    colours = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}
    for k, (cls, rgb) in enumerate(sorted(colours.items())):
        (root / cls).mkdir(parents=True)
        for j, size in enumerate(sizes):
            ext = "png" if (j + k) % 2 == 0 else "jpg"
            mode = "L" if (cls, j) == ("emu", 0) else "RGB"  # a grey file must come out RGB
            colour = rgb[2] if mode == "L" else rgb
            Image.new(mode, size, colour).save(root / cls / f"img{j}.{ext}")


def test_class_folders_labels_and_shapes(tmp_path) -> None:  # noqa: ANN001
    from gen.data import ImageFolder

    _write_class_folders(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, resolution=16)
    assert ds.classes == ["cat", "dog", "emu"] and ds.num_classes == 3 and ds.channels == 3 and ds.resolution == 16
    assert len(ds) == 9 and ds.targets == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 16) and label == ds.targets[i]
        if (label, ds.files[i].stem) == (2, "img0"):  # the grey file: converted to three equal channels
            assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2]) and int(img.max()) == 255
        else:  # red cats, green dogs, blue emus
            assert int(img.float().mean((1, 2)).argmax()) == label
    assert ds.verify() == []


def test_flat_folder_is_unlabelled(tmp_path) -> None:  # noqa: ANN001
    from PIL import Image

    from gen.data import ImageFolder

    for j in range(3):
        Image.new("RGB", (20 + j, 30), (j * 50, 0, 0)).save(tmp_path / f"{j}.png")
    ds = ImageFolder(tmp_path, resolution=8)
    assert len(ds) == 3 and ds.num_classes == 1 and not ds.labelled
    assert [ds[i][1] for i in range(3)] == [0, 0, 0] and ds[0][0].shape == (3, 8, 8)


def test_center_crop_resize_is_adm_style() -> None:
    from PIL import Image

    from gen.data import center_crop_resize

    # Left third black, right two thirds white, 300x100: crop keeps the central 100x100 square.
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, 150:] = 255
    out = np.asarray(center_crop_resize(Image.fromarray(arr), 20))
    assert out.shape == (20, 20, 3)
    assert out[:, :8].max() < 30 and out[:, 12:].min() > 225  # edge stays in the middle
    big = np.asarray(center_crop_resize(Image.new("RGB", (1000, 700), (10, 200, 30)), 64))
    assert big.shape == (64, 64, 3) and np.abs(big.astype(int) - [10, 200, 30]).max() <= 1


def test_corrupt_image_raises_naming_file_and_verify_lists_it(tmp_path, capsys) -> None:  # noqa: ANN001
    from gen.data import CorruptImageError, ImageFolder, verify_images

    _write_class_folders(tmp_path)
    garbage = tmp_path / "dog" / "zz_garbage.png"
    garbage.write_bytes(b"this is not a png at all" * 10)
    good = (tmp_path / "cat" / "img0.png").read_bytes()
    truncated = tmp_path / "cat" / "zz_truncated.png"
    truncated.write_bytes(good[: len(good) // 2])
    ds = ImageFolder(tmp_path, resolution=8)
    i = ds.files.index(garbage)
    with pytest.raises(CorruptImageError, match="zz_garbage.png") as info:
        ds[i]
    assert "Remove or replace" in str(info.value)
    with pytest.raises(CorruptImageError, match="zz_truncated.png"):
        ds[ds.files.index(truncated)]
    listed = [path for path, _ in verify_images(tmp_path)]
    assert listed == sorted([str(truncated), str(garbage)])
    assert [p for p, _ in ds.verify()] == listed
    ds[0]  # good files still load
    from gen.data.verify import main

    assert main([str(tmp_path)]) == 1
    assert str(garbage) in capsys.readouterr().out


def test_folder_errors(tmp_path) -> None:  # noqa: ANN001
    from PIL import Image

    from gen.data import ImageFolder

    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFolder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        ImageFolder(tmp_path)  # empty class "b" would shift labels
    Image.new("RGB", (8, 8)).save(tmp_path / "b" / "y.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "top.png")
    with pytest.raises(ValueError, match="labels="):
        ImageFolder(tmp_path)
    assert len(ImageFolder(tmp_path, labels="none")) == 3
    assert len(ImageFolder(tmp_path, labels="folders")) == 2


def test_folder_with_dataloader_and_sampler(tmp_path) -> None:  # noqa: ANN001
    from gen.data import ImageFolder

    _write_class_folders(tmp_path)
    ds = ImageFolder(tmp_path, resolution=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=InfiniteSampler(len(ds), seed=0))
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and images.dtype == torch.uint8 and labels.dtype == torch.long
    expected = _take(InfiniteSampler(len(ds), seed=0), 4)
    assert labels.tolist() == [ds.targets[i] for i in expected]


# ----------------------------------------------------------------------------------------------
# CIFAR-10


def _write_fake_cifar(parent, per_batch: int = 3) -> None:  # noqa: ANN001
    # torchvision's on-disk format: pickled dicts with uint8 "data" (N, 3072, channel-major) and "labels".
    import pickle

    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        labels = [(b * per_batch + j) % 10 for j in range(per_batch)]
        data = np.zeros((per_batch, 3, 32, 32), dtype=np.uint8)
        for j, y in enumerate(labels):
            data[j, y % 3] = 10 * y + 5  # channel and value encode the label
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data.reshape(per_batch, -1), "labels": labels}, f)
    meta = {"label_names": [f"class{k}" for k in range(10)]}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)


def test_cifar10_from_local_folder(tmp_path) -> None:  # noqa: ANN001
    from gen.data import CIFAR10

    _write_fake_cifar(tmp_path)
    train = CIFAR10(tmp_path, split="train", check_md5=False)
    test = CIFAR10(tmp_path / "cifar-10-batches-py", split="test", check_md5=False)
    assert len(train) == 15 and len(test) == 3
    assert train.num_classes == 10 and train.channels == 3 and train.resolution == 32 and train.name == "cifar10"
    assert train.classes[3] == "class3"
    for i in range(len(train)):
        img, y = train[i]
        assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
        assert int(img[y % 3].max()) == 10 * y + 5 and int(img.sum()) == (10 * y + 5) * 1024
    assert test.tensors()[1].tolist() == [5, 6, 7]
    # The hand-made files do not match the official checksums.
    with pytest.raises(ValueError, match="checksums"):
        CIFAR10(tmp_path, split="train")


def test_cifar10_missing_folder_error(tmp_path) -> None:  # noqa: ANN001
    from gen.data import CIFAR10

    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz") as info:
        CIFAR10(tmp_path / "data")
    assert "data_batch_1" in str(info.value) and str(tmp_path / "data") in str(info.value)


# ----------------------------------------------------------------------------------------------
# Configs: the plain keys other groups interpolate must describe the dataset that gets built.


@pytest.mark.parametrize("name", ["mnist5k", "shapes", "digits", "imagefolder", "cifar10"])
def test_data_configs_match_datasets(name: str, tmp_path) -> None:  # noqa: ANN001
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "configs"
    data = OmegaConf.load(root / "data" / f"{name}.yaml")
    cfg = OmegaConf.create({"paths": {"data": str(tmp_path)}, "data": data})
    assert set(cfg.data) >= {"name", "channels", "resolution", "num_classes", "hflip", "dataset"}
    assert cfg.data.hflip == (name not in ("mnist5k", "digits"))  # mirrored digits are wrong digits
    overrides: dict = {}
    if name == "shapes":
        overrides = {"count": 60}
    elif name == "imagefolder":
        _write_class_folders(tmp_path / "imagenet" / "train")
    elif name == "cifar10":
        _write_fake_cifar(tmp_path / "cifar10")
        overrides = {"check_md5": False}
    ds = instantiate(cfg.data.dataset, **overrides)
    assert ds.name == cfg.data.name
    assert (ds.channels, ds.resolution) == (cfg.data.channels, cfg.data.resolution)
    if name != "imagefolder":  # the ImageNet preset says 1000 classes; the test folder has 3
        assert ds.num_classes == cfg.data.num_classes
    img, _ = ds[0]
    assert img.shape == (cfg.data.channels, cfg.data.resolution, cfg.data.resolution)

