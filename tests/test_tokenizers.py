"""Tokenizer interface and the identity (pixel) tokenizer."""

from __future__ import annotations

import pytest
import torch

from tokenizers import PixelTokenizer, Tokenizer


def test_pixel_tokenizer_round_trip() -> None:
    tok = PixelTokenizer(channels=3)
    assert tok.latent_channels == 3 and tok.downsample == 1
    assert tok.config == {"_target_": "tokenizers.pixels.PixelTokenizer", "channels": 3}
    u = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    z = tok.encode(u)
    assert z.dtype == torch.float32 and z.shape == (4, 3, 8, 8)
    assert torch.equal(z, u.float() / 127.5 - 1.0)
    x = tok.decode(z)
    assert torch.equal(x, z)
    assert torch.equal((127.5 * (x + 1)).round().to(torch.uint8), u)
    assert tok.latent_shape(32) == (3, 32, 32)


def test_pixel_tokenizer_checks() -> None:
    tok = PixelTokenizer(channels=1)
    with pytest.raises(ValueError):
        tok.encode(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError):
        PixelTokenizer(channels=1, latent_channels=3)
    with pytest.raises(ValueError):
        PixelTokenizer(channels=1, downsample=2)


class _Pool(Tokenizer):
    """Toy f=2 tokenizer with latent statistics, standing in for a VAE."""

    def __init__(self) -> None:
        super().__init__(
            image_channels=1, latent_channels=1, downsample=2, mean=[0.5], std=[2.0], scaling_factor=0.5, config={}
        )

    def encode_raw(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x, 2)

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(raw, scale_factor=2.0, mode="nearest")


def test_base_normalisation_and_shapes() -> None:
    tok = _Pool()
    u = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    z = tok.encode(u)
    assert z.shape == (2, 1, 2, 2) == (2, *tok.latent_shape(4))
    assert torch.allclose(z, torch.full_like(z, (1.0 - 0.5) / 2.0 * 0.5))
    assert torch.allclose(tok.decode(z), torch.ones(2, 1, 4, 4))
    assert "latent_mean" in tok.state_dict() and "latent_std" in tok.state_dict()
    with pytest.raises(ValueError, match="divisible"):
        tok.encode(torch.zeros(1, 1, 5, 5, dtype=torch.uint8))


def test_tokenizer_config_builds_pixel_tokenizer() -> None:
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1] / "configs"
    cfg = OmegaConf.create(
        {"data": OmegaConf.load(root / "data" / "mnist5k.yaml"), "tokenizer": OmegaConf.load(root / "tokenizer" / "pixels.yaml")}
    )
    tok = instantiate(cfg.tokenizer)
    assert tok.latent_channels == cfg.tokenizer.latent_channels == 1 and tok.downsample == cfg.tokenizer.downsample == 1
