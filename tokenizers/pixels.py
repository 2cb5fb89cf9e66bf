"""Identity tokenizer: the model works on pixels scaled to [-1, 1]."""

from __future__ import annotations

import torch

from tokenizers.base import Generators, Tokenizer


class PixelTokenizer(Tokenizer):
    """encode = u / 127.5 - 1, decode = identity; latent_channels = channels, downsample = 1.

    Args:
        channels: image channels (1 for MNIST/digits, 3 for RGB data).
        latent_channels: optional, must equal ``channels``. Accepted so every tokenizer config can
            carry ``latent_channels`` and ``downsample`` keys for other groups to interpolate.
        downsample: optional, must be 1.
    """

    def __init__(self, channels: int = 3, latent_channels: int | None = None, downsample: int = 1) -> None:
        if latent_channels is not None and int(latent_channels) != int(channels):
            raise ValueError(f"pixel tokenizer: latent_channels ({latent_channels}) must equal channels ({channels})")
        if int(downsample) != 1:
            raise ValueError(f"pixel tokenizer: downsample must be 1, got {downsample}")
        super().__init__(
            image_channels=channels, latent_channels=channels, downsample=1, config={"channels": int(channels)}
        )

    def encode_raw(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        return x

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return raw
