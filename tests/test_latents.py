"""Latent extraction into shards and the memory-mapped latent dataset (gen.data.latents, scripts/extract_latents.py).

A small KL autoencoder with random weights stands in for SD-VAE / VA-VAE: it has a real stochastic posterior,
so these tests also check that image i's latent depends only on (seed, i, flip).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gen.data.latents import (
    LatentShards,
    NonFiniteLatentError,
    TokenizerMismatchError,
    apply_statistics,
    check_tokenizer,
    extract_latents,
    shard_name,
)
from gen.data.shapes import Shapes
from gen.utils.build import build
from tests.conftest import free_port
from tokenizers import PixelTokenizer, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = {"_target_": "tokenizers.kl.AutoencoderKLTokenizer", "block_out_channels": [32, 32],
             "layers_per_block": 1, "latent_channels": 4, "seed": 0}
N = 23  # 5 shards of 5 images, the last one short


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Byte-identical shards across runs and process counts need the same convolution order: one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(count: int = N, resolution: int = 16) -> Shapes:
    return Shapes(count=count, seed=3, resolution=resolution)


def _extract(out: Path, **kwargs) -> Path:
    opts = {"shard_size": 5, "batch_size": 3, "seed": 7, "store_images": True, "device": "cpu", **kwargs}
    return extract_latents(kwargs.pop("dataset", _data()), kwargs.pop("tokenizer", build(TOKENIZER)), out,
                           **{k: v for k, v in opts.items() if k not in ("dataset", "tokenizer")})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_items_follow_the_contract_and_statistics_are_exact(tmp_path: Path) -> None:
    from gen.utils.seed import per_image_generators

    out = _extract(tmp_path / "lat")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *[shard_name(k) for k in range(5)], "stats.json"]
    ds = LatentShards(out, resolution=16, channels=3, num_classes=6)
    data = _data()
    tok = build(TOKENIZER)
    assert len(ds) == N and (ds.num_classes, ds.resolution, ds.channels, ds.name) == (6, 16, 3, "shapes")
    assert ds.latent_shape == (4, 8, 8) and ds.has_images and ds.tokenizer == tok.identity()
    assert ds.tokenizer_config == tok.config
    for i in (0, 4, 5, 22, -1):
        item = ds[i]
        j = i % N
        image, label = data[j]
        assert set(item) == {"label", "latent", "latent_flip", "image"} and item["label"] == label
        assert item["latent"].dtype == torch.float32 and item["latent"].shape == (4, 8, 8)
        assert item["image"].dtype == torch.uint8 and torch.equal(item["image"], image)
        with torch.no_grad():
            plain = tok.raw_latents(image[None], per_image_generators([j], "latent", 7, "plain"))[0]
            flip = tok.raw_latents(image.flip(-1)[None], per_image_generators([j], "latent", 7, "flip"))[0]
        # Posterior samples seeded per image: equal to encoding the image alone (up to convolution rounding).
        assert torch.allclose(item["latent"], plain, atol=1e-5) and torch.allclose(item["latent_flip"], flip, atol=1e-5)
        assert not torch.allclose(item["latent"], item["latent_flip"].flip(-1), atol=1e-3)
    with pytest.raises(IndexError):
        ds[N]
    every = torch.cat([torch.stack([ds[i]["latent"], ds[i]["latent_flip"]]) for i in range(N)]).double()
    mean = every.mean((0, 2, 3))
    std = (every - mean.view(1, -1, 1, 1)).square().mean((0, 2, 3)).sqrt()
    assert torch.allclose(ds.latent_mean.double(), mean, atol=1e-6) and torch.allclose(ds.latent_std.double(), std, atol=1e-6)
    assert torch.equal(ds.labels, torch.tensor([data[i][1] for i in range(N)]))
    # Memory maps are reopened in DataLoader worker processes.
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=1)
    batch = next(iter(loader))
    assert batch["latent"].shape == (8, 4, 8, 8) and torch.equal(batch["latent"][3], ds[3]["latent"])


def test_interrupted_extraction_resumes_to_identical_bytes(tmp_path: Path) -> None:
    whole = _files(_extract(tmp_path / "whole"))

    class Stop(Exception):
        pass

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            raise Stop

    with pytest.raises(Stop):
        _extract(tmp_path / "cut", on_shard=stop_after_two)
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == ["manifest.json", shard_name(0), shard_name(1)]
    (tmp_path / "cut" / f".tmp-{shard_name(2)}.abc").write_bytes(b"half a shard")  # as a SIGKILL leaves it
    written = []
    _extract(tmp_path / "cut", on_shard=lambda done, total: written.append(done))
    assert _files(tmp_path / "cut") == whole
    # A finished extraction re-run writes nothing and changes nothing.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut").glob("shard-*")}
    _extract(tmp_path / "cut")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut").glob("shard-*")} == before


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from gen.utils import dist

    dist.init_distributed(timeout_s=120)
    try:
        _extract(Path(out))
    finally:
        torch.distributed.destroy_process_group()




def test_two_processes_write_the_same_bytes_as_one(tmp_path: Path) -> None:
    one = _files(_extract(tmp_path / "one"))
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    assert _files(tmp_path / "two") == one


def test_killed_command_resumes_to_identical_bytes(tmp_path: Path) -> None:
    """SIGKILL the command line in the middle of a run, re-run it: the same files as an uninterrupted run."""
    count, shard = 1500, 10
    args = [sys.executable, "-m", "scripts.extract_latents", "data=shapes", f"data.dataset.count={count}",
            "tokenizer=pixels", f"shard_size={shard}", "images=true", "device=cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*args, f"out={cut}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list(cut.glob("shard-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = len(list(cut.glob("shard-*")))
    assert 1 <= shards < count // shard and not (cut / "stats.json").exists(), f"kill landed at {shards} shards"
    done = subprocess.run([*args, f"out={cut}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    whole = extract_latents(Shapes(count=count), PixelTokenizer(channels=3), tmp_path / "whole", shard_size=shard,
                            batch_size=32, store_images=True, device="cpu")
    assert _files(cut) == _files(whole)


class _NaNOnBright(Tokenizer):
    """f=2 average pooling that returns NaN for images whose mean pixel exceeds a threshold."""

    def __init__(self, threshold: float) -> None:
        super().__init__(image_channels=3, latent_channels=3, downsample=2, config={})
        self.threshold = threshold

    def encode_raw(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        z = torch.nn.functional.avg_pool2d(x, 2)
        bright = x.flatten(1).mean(1) > self.threshold
        return torch.where(bright.view(-1, 1, 1, 1), torch.full_like(z, float("nan")), z)

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(raw, scale_factor=2.0)


def test_refusals(tmp_path: Path) -> None:
    data = _data()
    means = torch.stack([data[i][0].float().mean() / 127.5 - 1 for i in range(N)])
    worst = int(means.argmax())
    with pytest.raises(NonFiniteLatentError, match=f"non-finite latents for image {worst} of dataset 'shapes'"):
        _extract(tmp_path / "nan", tokenizer=_NaNOnBright(float(means.sort().values[-2])))
    assert not any(p.name == shard_name(worst // 5) for p in (tmp_path / "nan").iterdir())

    with pytest.raises(ValueError, match="image size 18x18 is not divisible by the downsampling factor 4"):
        _extract(tmp_path / "size", dataset=_data(resolution=18),
                 tokenizer=build({**TOKENIZER, "block_out_channels": [32, 32, 32]}))
    with pytest.raises(ValueError, match="takes 1-channel images but dataset 'shapes' has 3 channels"):
        _extract(tmp_path / "ch", tokenizer=PixelTokenizer(channels=1))

    _extract(tmp_path / "lat")
    with pytest.raises(ValueError, match="already holds an extraction with other settings .*tokenizer"):
        _extract(tmp_path / "lat", tokenizer=build({**TOKENIZER, "seed": 1}))
    with pytest.raises(ValueError, match="data.resolution is 32 but the latents .* resolution 16; set data.resolution=16"):
        LatentShards(tmp_path / "lat", resolution=32)
    (tmp_path / "lat" / shard_name(3)).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete .1 of 5 shards missing, e.g. shard-00003"):
        LatentShards(tmp_path / "lat")
    with pytest.raises(FileNotFoundError, match="scripts.extract_latents"):
        LatentShards(tmp_path / "nothing")


def test_tokenizer_checks(tmp_path: Path) -> None:
    ds = LatentShards(_extract(tmp_path / "a"))
    same = build({**TOKENIZER, "posterior": "mean"})  # a run-time option: same latent space
    check_tokenizer(same, ds)
    other = build({**TOKENIZER, "seed": 1})
    with pytest.raises(TokenizerMismatchError, match=r"extracted with tokenizers.kl.AutoencoderKLTokenizer.*weights_sha256"):
        check_tokenizer(other, ds)
    with pytest.raises(TokenizerMismatchError, match="tokenizers.pixels.PixelTokenizer"):
        check_tokenizer(PixelTokenizer(channels=3), ds)

    apply_statistics(same, ds)
    assert torch.equal(same.latent_mean, ds.latent_mean) and same.config["std"] == pytest.approx(ds.latent_std.tolist())
    z = same.encode(ds[0]["image"][None])
    assert z.shape == (1, 4, 8, 8)
    foreign = build({**TOKENIZER, "mean": [0.5] * 4, "std": [2.0] * 4})
    with pytest.raises(TokenizerMismatchError, match="statistics .* not those of the latents"):
        check_tokenizer(foreign, ds)

    # Statistics copied over from another tokenizer's extraction are refused when the folder is opened.
    _extract(tmp_path / "b", tokenizer=other)
    (tmp_path / "a" / "stats.json").write_bytes((tmp_path / "b" / "stats.json").read_bytes())
    with pytest.raises(TokenizerMismatchError, match="belongs to the latents of another tokenizer"):
        LatentShards(tmp_path / "a")


def test_latents_data_config_builds(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    out = _extract(tmp_path / "lat")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "data=latents", f"data.dataset.root={out}", "data.resolution=16", "data.num_classes=6"])
    ds = build(OmegaConf.to_container(cfg.data.dataset, resolve=True))
    assert isinstance(ds, LatentShards) and len(ds) == N and ds.channels == cfg.data.channels


def test_moved_extraction_keeps_its_content_identity(tmp_path: Path) -> None:
    """A latent folder moved elsewhere has the same content fingerprint (the training loop resumes on it)."""
    import shutil

    from gen.train.loop import data_identity

    out = _extract(tmp_path / "a", dataset=_data(count=7))
    first = data_identity(LatentShards(out))
    moved = tmp_path / "b"
    shutil.move(str(out), moved)
    assert data_identity(LatentShards(moved)) == first and first["kind"] == "latents" and first["count"] == 7
    other = _extract(tmp_path / "c", dataset=_data(count=7), seed=8)  # other posterior samples: other content
    assert data_identity(LatentShards(other))["sha256"] != first["sha256"]


# ----------------------------------------------------------------------------------------------
# Shards are checked before they are trusted (issue 17).


def _flip_byte(path: Path, offset_from_end: int = 40) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x5A  # a tensor byte (the header is at the start)
    path.write_bytes(bytes(data))


def test_damaged_or_foreign_shards_are_refused_and_rewritten(tmp_path: Path, caplog) -> None:
    out = _extract(tmp_path / "a")
    good = _files(out)
    # Damaged bytes inside a tensor: the shard still parses, its checksum does not match.
    _flip_byte(out / shard_name(2))
    with pytest.raises(ValueError, match=r"shard-00002.safetensors cannot be trusted: its contents do not match the "
                                         r"checksum .* Re-run the extraction command"):
        LatentShards(out)
    # Truncated: not a safetensors file any more.
    (out / shard_name(4)).write_bytes(good[shard_name(4)][:100])
    with pytest.raises(ValueError, match=r"shard-00002.safetensors cannot be trusted"):
        LatentShards(out)
    # Re-running the command rewrites exactly those shards, says so, and everything is as before.
    with caplog.at_level("WARNING", logger="gen.data.latents"):
        _extract(out)
    assert _files(out) == good
    assert "rewriting" in caplog.text and shard_name(2) in caplog.text and shard_name(4) in caplog.text

    # A shard copied from another tokenizer's extraction (same images, same start and count) is refused, and
    # re-extraction never mixes it into the statistics.
    other = _extract(tmp_path / "b", tokenizer=build({**TOKENIZER, "seed": 1}))
    (out / shard_name(1)).write_bytes((other / shard_name(1)).read_bytes())
    with pytest.raises(ValueError, match=r"shard-00001.safetensors cannot be trusted: it belongs to another "
                                         r"extraction \(another tokenizer"):
        LatentShards(out)
    (out / "stats.json").unlink()
    _extract(out)
    assert _files(out) == good


def test_shards_without_a_checksum_are_not_trusted(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = _extract(tmp_path / "a", dataset=_data(count=7))
    path = out / shard_name(0)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={"shard": '{"count": 5, "format": "gen-latents-v1", "start": 0}'})
    with pytest.raises(ValueError, match="shard-00000.safetensors cannot be trusted: it carries no checksum"):
        LatentShards(out)


@pytest.mark.parametrize("edit, message", [
    (lambda s: {**s, "std": [float("nan")] + s["std"][1:]}, "the std of latent channel 0 is nan"),
    (lambda s: {**s, "std": s["std"][:2] + [0.0] + s["std"][3:]}, "the std of latent channel 2 is 0.0"),
    (lambda s: {**s, "std": s["std"][:1] + [-1.0] + s["std"][2:]}, "the std of latent channel 1 is -1.0"),
    (lambda s: {**s, "mean": s["mean"][:3] + [float("inf")]}, "the mean of latent channel 3 is inf"),
    (lambda s: {**s, "mean": s["mean"][:3]}, "3 means and 4 stds"),
    (lambda s: {**s, "mean": "zero"}, "mean must be a list of numbers"),
])
def test_statistics_must_be_finite_and_positive(tmp_path: Path, edit, message: str) -> None:
    import json

    out = _extract(tmp_path / "a", dataset=_data(count=7))
    stats = json.loads((out / "stats.json").read_text())
    (out / "stats.json").write_text(json.dumps(edit(stats)))
    with pytest.raises(ValueError, match=rf"stats.json: {message}"):
        LatentShards(out)


def test_statistics_of_a_constant_channel_are_not_written(tmp_path: Path) -> None:
    class _ConstantChannel(PixelTokenizer):
        def raw_latents(self, images, generator=None):
            z = super().raw_latents(images, generator)
            return torch.cat([z[:, :1], torch.zeros_like(z[:, 1:])], dim=1)

    with pytest.raises(ValueError, match="the std of latent channel 1 is 0.0; per-channel normalisation needs"):
        _extract(tmp_path / "c", dataset=_data(count=7), tokenizer=_ConstantChannel(channels=3))
    assert not (tmp_path / "c" / "stats.json").exists()


# ----------------------------------------------------------------------------------------------
# The extraction command: unwritable outputs and a full disk are one line naming the file (issue 17).


def _extract_cli(overrides: list[str], capsys) -> tuple[int, str]:
    from hydra import compose, initialize_config_dir

    from scripts.extract_latents import main_checked

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="extract", overrides=["data=shapes", "data.dataset.count=7", "data.resolution=16",
                                                        "tokenizer=pixels", "shard_size=3", *overrides])
    code = main_checked(cfg)
    return code, capsys.readouterr().err


def _one_line(code: int, err: str, *names: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(n in lines[0] for n in names), (names, err)


def test_extraction_refuses_unwritable_outputs_in_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno
    import tempfile

    (tmp_path / "file").write_text("x")
    _one_line(*_extract_cli([f"out={tmp_path / 'file'}"], capsys), str(tmp_path / "file"), "is a file, not a folder")
    _one_line(*_extract_cli([f"out={tmp_path / 'file' / 'sub'}"], capsys), str(tmp_path / "file"), "is a file")

    real_mkstemp = tempfile.mkstemp

    def read_only(*args, **kwargs):  # tests run as root, so a read-only folder is simulated
        if str(kwargs.get("dir", "")).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", kwargs["dir"])
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    _one_line(*_extract_cli([f"out={tmp_path / 'ro'}"], capsys), str(tmp_path / "ro"), "read-only")
    assert not any((tmp_path / "ro").iterdir())


def test_full_disk_during_extraction_is_one_line_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    import errno

    out = tmp_path / "lat"
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        if self.name.startswith(".tmp-" + shard_name(1)):
            real(self, data[: len(data) // 2])  # a real full disk fails after writing part of the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    _one_line(*_extract_cli([f"out={out}"], capsys), str(out / shard_name(1)), "disk is full")
    assert not list(out.glob(".tmp-*")) and not (out / shard_name(1)).exists() and not (out / "stats.json").exists()
    monkeypatch.undo()
    code, err = _extract_cli([f"out={out}"], capsys)
    assert code == 0, err
    assert len(LatentShards(out)) == 7


def test_damaged_manifest_statistics_and_misplaced_shards_are_named(tmp_path: Path) -> None:
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    out = _extract(tmp_path / "a", dataset=_data(count=12))
    good = _files(out)
    # A shard of the same extraction in the wrong place (shard 1 copied over shard 2): same plan, other images.
    (out / shard_name(2)).write_bytes(good[shard_name(1)])
    with pytest.raises(ValueError, match=r"shard-00002.safetensors cannot be trusted: it holds images 5\+5, the "
                                         r"manifest says 10\+2"):
        LatentShards(out)
    # Shard metadata that is not a record.
    with safe_open(str(out / shard_name(1)), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out / shard_name(2)), metadata={"shard": "[1, 2]"})
    with pytest.raises(ValueError, match="shard-00002.safetensors cannot be trusted: its metadata is not a shard record"):
        LatentShards(out)
    (out / shard_name(2)).write_bytes(good[shard_name(2)])
    (out / "stats.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"stats.json is not a JSON statistics file .* re-run the extraction"):
        LatentShards(out)
    (out / "stats.json").write_bytes(good["stats.json"])
    (out / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"manifest.json is not a latent extraction of this toolkit \(format 'list'\)"):
        LatentShards(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match=r"manifest.json is not a JSON manifest"):
        _extract(out, dataset=_data(count=12))
