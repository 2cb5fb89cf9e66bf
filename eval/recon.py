"""Tokenizer reconstruction metrics: rFID and PSNR.

rFID is the Fréchet distance between the features of real images and of their reconstructions
``decode(encode(x))`` (same images, so it measures only what the tokenizer loses). PSNR is computed per
image on uint8 pixels, PSNR = 10 log10(255² / MSE), and averaged over images (the convention of the LDM
and VA-VAE tables). Images are split across processes by index and every sum is reduced, so the numbers
do not depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from eval.features import FeatureExtractor, check_uint8_images
from eval.fid import fid_from_stats
from eval.generate import fixed_batches
from eval.stats import FeatureStats
from gen.data.transforms import to_uint8  # round-to-nearest, the inverse of the model input mapping
from gen.utils import dist

# MSE floor so identical images give a large finite PSNR (~148 dB) instead of inf, which JSON cannot hold.
MSE_FLOOR = 1e-10


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB between uint8 images (B, C, H, W) -> (B,) float64."""
    check_uint8_images(x)
    check_uint8_images(y)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.double() - y.double()).square().flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return 10.0 * torch.log10(255.0**2 / mse)


def tokenizer_roundtrip(tokenizer: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images -> uint8 reconstructions through a ``tokenizers`` Tokenizer (``decode(encode(x))``)."""

    @torch.no_grad()
    def fn(images: torch.Tensor) -> torch.Tensor:
        return to_uint8(tokenizer.decode(tokenizer.encode(images)))  # type: ignore[operator]

    return fn


def reconstruction_metrics(
    roundtrip: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    allow_singular: bool = False,
) -> dict[str, float]:
    """rFID and mean PSNR of a reconstruction function over an image set (split across processes).

    Args:
        roundtrip: uint8 (B, C, H, W) -> uint8 reconstructions of the same shape.
        images: uint8 (N, C, H, W), the same on every process.
        extractor: feature network for rFID.
        batch_size: images per call on one process.
        allow_singular: accept N ≤ feature dim (smoke tests).

    Returns:
        ``{"rfid": ..., "psnr": ..., "num_images": N}``.
    """
    check_uint8_images(images)
    real, recon = FeatureStats(extractor.dim), FeatureStats(extractor.dim)
    psnr_sum = torch.zeros(2, dtype=torch.float64)  # (Σ psnr, count)
    for batch in fixed_batches(range(images.shape[0]), batch_size, dist.rank(), dist.world_size()):
        if not batch:
            continue
        x = images[torch.tensor(batch)]
        y = roundtrip(x)
        if y.shape != x.shape or y.dtype != torch.uint8:
            raise ValueError(f"roundtrip must return uint8 {tuple(x.shape)}, got {y.dtype} {tuple(y.shape)}")
        real.update(extractor(x))
        recon.update(extractor(y))
        psnr_sum += torch.stack([psnr(x, y).sum(), torch.tensor(float(len(batch)), dtype=torch.float64)])
    real, recon = real.reduce(), recon.reduce()
    dist.all_reduce_sum(psnr_sum)
    manifest = extractor.manifest()
    rfid = fid_from_stats(recon.gaussian(manifest), real.gaussian(manifest), allow_singular=allow_singular)
    return {"rfid": rfid, "psnr": float(psnr_sum[0] / psnr_sum[1]), "num_images": int(psnr_sum[1])}
