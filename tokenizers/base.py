"""The tokenizer interface: pixels <-> the space the diffusion model works in.

Chain (same for every tokenizer):

    uint8 pixels (B, C_img, H, W)
      -> x = u / 127.5 - 1                       in [-1, 1]
      -> raw = encode_raw(x)                      (B, C_lat, H / f, W / f)   f = downsample
      -> z = (raw - mean) / std * scaling_factor  normalised latents the model sees

and ``decode`` runs it backwards to float images in [-1, 1] (not clamped; ``to_uint8`` clamps).
``mean``/``std`` are per-channel latent statistics (zeros/ones when unused); ``scaling_factor`` is
the single scale SD-VAE-style tokenizers use instead. A pixel tokenizer is the identity with f = 1.
This is the chain of EDM2's latent encoders (NVlabs/edm2, training/encoders.py): stored raw latents,
normalised only where the model sees them.

Stochastic encoders (a VAE posterior) take their randomness from ``generator``: one generator, or one per
image so that image k's latent does not depend on the batch it is encoded in (``per_image_generators``).

``identity()`` names the latent space (class, architecture, weights hash) without the run-time options
(weights location, posterior mode, statistics): pre-extracted latents record it, and training on them with
another tokenizer is refused (``gen.data.latents.check_tokenizer``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gen.utils.frozen import weights_sha256
from gen.utils.seed import per_image_generators as per_image_generators  # re-exported for tokenizer users

# One generator for the whole batch, or one per image (row k of the batch uses generator k).
Generators = torch.Generator | Sequence[torch.Generator] | None

# Config keys that choose how a tokenizer is loaded or used, not which latent space it defines.
RUNTIME_KEYS: tuple[str, ...] = ("weights", "download", "cache_dir", "posterior", "mean", "std", "scaling_factor")


def _pixels_to_unit(images: torch.Tensor) -> torch.Tensor:
    # Same mapping as gen.data.transforms.to_model_input, duplicated so tokenizers do not import the
    # data package (layering: tokenizers -> gen.nn, gen.utils only).
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 127.5 - 1.0
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 pixels or float images in [-1, 1], got {images.dtype}")
    return images


class Tokenizer(nn.Module, ABC):
    """Base class: subclasses implement ``encode_raw`` and ``decode_raw`` on [-1, 1] images.

    Args:
        image_channels: channels of the pixel images (3 for RGB, 1 for grey).
        latent_channels: channels of the latents.
        downsample: spatial reduction factor f (H_lat = H / f).
        mean: per-channel raw-latent mean, length latent_channels (None -> zeros).
        std: per-channel raw-latent standard deviation (None -> ones).
        scaling_factor: multiplies the standardised latents.
        config: JSON-able constructor arguments, recorded in snapshots to rebuild the tokenizer;
            ``_target_`` (this class's dotted path) is added automatically.

    Attributes:
        latent_channels, downsample, image_channels, scaling_factor, config.
    """

    def __init__(
        self,
        *,
        image_channels: int,
        latent_channels: int,
        downsample: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        scaling_factor: float = 1.0,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.image_channels = int(image_channels)
        self.latent_channels = int(latent_channels)
        self.downsample = int(downsample)
        self.scaling_factor = float(scaling_factor)
        mean_t = torch.zeros(latent_channels) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.ones(latent_channels) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if mean_t.shape != (latent_channels,) or std_t.shape != (latent_channels,):
            raise ValueError(f"mean and std need {latent_channels} entries, got {tuple(mean_t.shape)}, {tuple(std_t.shape)}")
        if bool((std_t <= 0).any()):
            raise ValueError("latent std must be positive")
        # Buffers so .to(device) moves them and state_dict records them with the weights.
        self.register_buffer("latent_mean", mean_t.clone(), persistent=True)
        self.register_buffer("latent_std", std_t.clone(), persistent=True)
        cls = type(self)
        self.config: dict[str, Any] = {"_target_": f"{cls.__module__}.{cls.__qualname__}", **(config or {})}

    # --- to implement -------------------------------------------------------------------------
    @abstractmethod
    def encode_raw(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """Images (B, C_img, H, W) in [-1, 1] -> raw latents (B, C_lat, H / f, W / f).

        ``generator`` drives posterior sampling in stochastic encoders: one generator, one per image, or
        None (torch's global generator). Deterministic encoders ignore it.
        """

    @abstractmethod
    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, C_lat, h, w) -> images (B, C_img, h * f, w * f), nominally in [-1, 1]."""

    # --- shared ---------------------------------------------------------------------------------
    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents -> model-space latents: (raw - mean) / std * scaling_factor, per channel."""
        mean = self.latent_mean.view(1, -1, 1, 1).to(raw)
        std = self.latent_std.view(1, -1, 1, 1).to(raw)
        return (raw - mean) / std * self.scaling_factor

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of ``normalize``."""
        mean = self.latent_mean.view(1, -1, 1, 1).to(z)
        std = self.latent_std.view(1, -1, 1, 1).to(z)
        return z / self.scaling_factor * std + mean

    def check_image_size(self, height: int, width: int) -> None:
        """Refuse images whose sides the downsampling factor does not divide (the message says the fix)."""
        f = self.downsample
        if height % f or width % f:
            name = self.config.get("_target_", type(self).__name__)
            raise ValueError(
                f"image size {height}x{width} is not divisible by the downsampling factor {f} of {name}; "
                f"crop or resize the images to a multiple of {f} (e.g. {max(f, height // f * f)}x{max(f, width // f * f)})"
            )

    def raw_latents(self, images: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """Pixels -> raw (un-normalised) latents, the tensors latent extraction stores.

        Args:
            images: uint8 (B, C_img, H, W) in [0, 255], or float (B, C_img, H, W) already in [-1, 1].
            generator: randomness for stochastic encoders (see ``encode_raw``).

        Returns:
            float (B, latent_channels, H / downsample, W / downsample).
        """
        if images.ndim != 4 or images.shape[1] != self.image_channels:
            raise ValueError(f"expected (B, {self.image_channels}, H, W) images, got {tuple(images.shape)}")
        self.check_image_size(int(images.shape[-2]), int(images.shape[-1]))
        if isinstance(generator, Sequence) and len(generator) != images.shape[0]:
            raise ValueError(f"{len(generator)} per-image generators for a batch of {images.shape[0]} images")
        return self.encode_raw(_pixels_to_unit(images), generator)

    def encode(self, images: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """Pixels -> normalised latents.

        Args:
            images: uint8 (B, C_img, H, W) in [0, 255], or float (B, C_img, H, W) already in [-1, 1]
                (e.g. after flipping in model space).
            generator: optional randomness for stochastic encoders (one, or one per image).

        Returns:
            float (B, latent_channels, H / downsample, W / downsample).
        """
        return self.normalize(self.raw_latents(images, generator))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, latent_channels, h, w) -> float images (B, C_img, h*f, w*f) in ~[-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"expected (B, {self.latent_channels}, h, w) latents, got {tuple(z.shape)}")
        return self.decode_raw(self.denormalize(z))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C_lat, h, w) of the latents of a square image of side ``resolution``."""
        self.check_image_size(resolution, resolution)
        side = resolution // self.downsample
        return (self.latent_channels, side, side)

    # --- statistics and identity ------------------------------------------------------------------
    def set_statistics(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor) -> None:
        """Use per-channel raw-latent statistics from now on; recorded in ``config`` so snapshots keep them."""
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten().cpu()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten().cpu()
        if mean_t.shape != (self.latent_channels,) or std_t.shape != (self.latent_channels,):
            raise ValueError(
                f"statistics need {self.latent_channels} entries per channel, got {tuple(mean_t.shape)}, {tuple(std_t.shape)}"
            )
        if not bool(torch.isfinite(mean_t).all() and torch.isfinite(std_t).all()) or bool((std_t <= 0).any()):
            raise ValueError("latent statistics must be finite with a positive std")
        self.latent_mean.copy_(mean_t)
        self.latent_std.copy_(std_t)
        self.config["mean"] = [float(v) for v in mean_t]
        self.config["std"] = [float(v) for v in std_t]

    def has_statistics(self) -> bool:
        """True when per-channel statistics differ from the neutral zeros/ones."""
        return bool(self.latent_mean.abs().max() > 0 or (self.latent_std - 1).abs().max() > 0)

    def weights_sha256(self) -> str:
        """SHA-256 of the networks' weights (gen.utils.frozen.weights_sha256), without the latent statistics."""
        return weights_sha256(nn.ModuleDict(dict(self.named_children())))

    def identity(self) -> dict[str, Any]:
        """What defines this latent space: ``{"_target_", "config" (architecture), "weights_sha256"}``.

        The run-time keys (``RUNTIME_KEYS``: weights location, posterior mode, statistics) are left out, so
        the same weights loaded from another folder, or a switch from posterior samples to means, keep the
        identity; other weights or another architecture change it.
        """
        config = {k: v for k, v in self.config.items() if k != "_target_" and k not in RUNTIME_KEYS}
        return {"_target_": self.config["_target_"], "config": config, "weights_sha256": self.weights_sha256()}

    def describe(self) -> str:
        """Short human-readable name, e.g. ``tokenizers.sdvae.SDVAE(variant='ema')``."""
        ident = self.identity()
        args = ", ".join(f"{k}={v!r}" for k, v in ident["config"].items())
        return f"{ident['_target_']}({args})"
