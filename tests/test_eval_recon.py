"""Tokenizer reconstruction metrics: SSIM, LPIPS (random VGG weights), the reduction across processes, the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from eval.recon import reconstruction_metrics, ssim, tokenizer_roundtrip
from gen.utils.weights import WeightsNotFoundError
from tests.conftest import free_port

TOKENIZER = {"_target_": "tokenizers.kl.AutoencoderKLTokenizer", "block_out_channels": [32, 32],
             "layers_per_block": 1, "latent_channels": 4, "seed": 0}
N = 40


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vgg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gen.nn.lpips import make_random_vgg16_weights

    return make_random_vgg16_weights(tmp_path_factory.mktemp("vgg") / "vgg16-random.pth", seed=0)


class _RowMeans:
    """A tiny extractor (32 row means per image) so the plumbing runs fast."""

    name, dim, resize, weights_sha256 = "row-means-test", 32, "none-32", "none"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(1, 3))

    def manifest(self) -> dict:
        return {"extractor": self.name, "weights_sha256": self.weights_sha256, "resize": self.resize, "dim": self.dim}


def _images(n: int = N) -> torch.Tensor:
    from gen.data.shapes import Shapes

    return Shapes(count=n, seed=1, resolution=32).tensors()[0]


def test_ssim_per_image() -> None:
    x = _images(4)
    assert torch.allclose(ssim(x, x), torch.ones(4, dtype=torch.float64))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    small = (x.float() + 5 * noise).round().clamp(0, 255).to(torch.uint8)
    large = (x.float() + 40 * noise).round().clamp(0, 255).to(torch.uint8)
    s_small, s_large = ssim(x, small), ssim(x, large)
    assert bool((s_large < s_small).all() and (s_small < 1).all() and (s_large > 0).all())
    assert torch.allclose(ssim(small, x), s_small, atol=1e-12)  # symmetric
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], x[..., :8, :8])


def test_lpips_on_random_vgg_weights(vgg: Path, tmp_path: Path) -> None:
    from gen.nn.lpips import LPIPS

    lp = LPIPS(vgg)
    x = _images(3).float() / 127.5 - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        same, near, far = lp(x, x), lp(x, (x + 0.05 * noise).clamp(-1, 1)), lp(x, (x + 0.5 * noise).clamp(-1, 1))
        assert same.shape == (3,) and torch.equal(same, torch.zeros(3))
        assert bool((near > 0).all() and (far > near).all())
        assert torch.allclose(lp((x + 0.5 * noise).clamp(-1, 1), x), far)
        grey = lp(x[:, :1], x[:, :1].flip(-1))
    assert grey.shape == (3,) and bool((grey > 0).all())
    lp.train()
    assert not lp.net.training  # dropout of the heads stays off
    assert lp.identity()["vgg_sha256"] != lp.identity()["heads_sha256"]

    with pytest.raises(WeightsNotFoundError, match=r"vgg16-397923af.pth .*download.pytorch.org"):
        LPIPS(cache_dir=tmp_path / "empty")
    torch.save({"classifier.0.weight": torch.zeros(1)}, tmp_path / "not-vgg.pth")
    with pytest.raises(ValueError, match="not a torchvision VGG16 state dict"):
        LPIPS(tmp_path / "not-vgg.pth")


def _metrics(vgg: str) -> dict:
    from gen.nn.lpips import LPIPS
    from gen.utils.build import build

    return reconstruction_metrics(tokenizer_roundtrip(build(TOKENIZER), seed=5), _images(), _RowMeans(),
                                  batch_size=6, lpips=LPIPS(vgg))


def test_metrics_of_a_tokenizer_and_of_the_identity(vgg: Path) -> None:
    from gen.nn.lpips import LPIPS
    from tokenizers import PixelTokenizer

    got = _metrics(str(vgg))
    assert got["num_images"] == N and got["rfid"] > 0 and 0 < got["ssim"] < 1 and got["lpips"] > 0
    assert 0 < got["psnr"] < 60
    # Noise images: shapes have constant rows, whose row-mean covariance is singular.
    noise = torch.randint(0, 256, (N, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ident = reconstruction_metrics(tokenizer_roundtrip(PixelTokenizer(channels=3)), noise, _RowMeans(),
                                   batch_size=4, lpips=LPIPS(vgg))
    assert ident["rfid"] < 1e-6 and ident["psnr"] > 140 and ident["ssim"] == pytest.approx(1.0)
    assert ident["lpips"] == 0.0


def _worker(rank: int, world: int, port: int, vgg: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from gen.utils import dist

    dist.init_distributed(timeout_s=120)
    try:
        got = _metrics(vgg)
        if rank == 0:
            Path(out).write_text(json.dumps(got))
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_give_the_numbers_of_one(vgg: Path, tmp_path: Path) -> None:
    one = _metrics(str(vgg))
    port = free_port()
    mp.spawn(_worker, args=(2, port, str(vgg), str(tmp_path / "two.json")), nprocs=2, join=True)
    two = json.loads((tmp_path / "two.json").read_text())
    assert two.keys() == one.keys()
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-9, abs=1e-12), key


def test_cli(vgg: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from eval.__main__ import main
    from eval.features import make_random_inception_weights
    from eval.stats import save_image_npz

    npz = tmp_path / "images.npz"
    save_image_npz(npz, _images(6))
    spec = tmp_path / "tok.yaml"
    spec.write_text(yaml.safe_dump({**TOKENIZER, "seed": 1}))
    inception = make_random_inception_weights(tmp_path / "inception.pth")
    args = ["recon", "--tokenizer", str(spec), "--set", "seed=0", "--npz", str(npz), "--weights", str(inception),
            "--lpips-weights", str(vgg), "--batch-size", "4", "--allow-singular", "--device", "cpu",
            "--out", str(tmp_path / "m.json")]
    assert main(args) == 0
    got = json.loads((tmp_path / "m.json").read_text())
    assert got["num_images"] == 6 and got["extractor"] == "inception-v3-pool3" and got["tokenizer_spec"]["seed"] == 0
    assert {"rfid", "psnr", "ssim", "lpips"} <= set(got) and np.isfinite([got[k] for k in ("rfid", "psnr", "ssim", "lpips")]).all()
    assert got["lpips_network"]["name"] == "lpips-vgg-v0.1"

    spec.write_text(yaml.safe_dump({**TOKENIZER, "weights": "${paths.weights}/vae.safetensors"}))
    assert main(args[:3] + args[5:]) == 2
    assert "is a config interpolation; give the value with --set weights=" in capsys.readouterr().err
    assert main([*args[:2], str(tmp_path / "none.yaml"), *args[3:]]) == 2
    assert "tokenizer spec" in capsys.readouterr().err
    spec.write_text(yaml.safe_dump(TOKENIZER))
    bad = [*args[:-2]]
    bad[bad.index("--lpips-weights") + 1] = str(tmp_path / "missing-vgg.pth")
    assert main(bad) == 2
    assert "vgg16-397923af.pth" in capsys.readouterr().err
