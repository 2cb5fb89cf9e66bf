"""Tokenizer reconstruction metrics: rFID, PSNR, SSIM and LPIPS.

rFID is the Fréchet distance between the features of real images and of their reconstructions
``decode(encode(x))`` (same images, so it measures only what the tokenizer loses). PSNR is computed per
image on uint8 pixels, PSNR = 10 log10(255² / MSE), and averaged over images (the convention of the LDM
and VA-VAE tables). SSIM (Gaussian window 11, sigma 1.5; torchmetrics' ``structural_similarity_index_measure``)
and LPIPS-VGG (``gen.nn.lpips``) are computed per image on the uint8 reconstructions and averaged. This is the
protocol of hustvl/LightningDiT, evaluate_tokenizer.py (encode with a posterior sample, decode, rFID between
originals and reconstructions, PSNR, LPIPS, SSIM), except that SSIM and LPIPS there see the unclamped float
decoder output; here every metric sees the uint8 images a user gets.

Images are split across processes by index and every sum is reduced, so the numbers do not depend on the
number of processes; posterior samples are seeded per image index for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from eval.features import FeatureExtractor, check_uint8_images
from eval.fid import fid_from_stats
from eval.generate import fixed_batches
from eval.stats import FeatureStats
from gen.data.transforms import to_model_input, to_uint8  # to_uint8 rounds to nearest
from gen.utils import dist

# MSE floor so identical images give a large finite PSNR (~148 dB) instead of inf, which JSON cannot hold.
MSE_FLOOR = 1e-10

# (uint8 images (B, C, H, W), their dataset indices) -> uint8 reconstructions (B, C, H, W).
Roundtrip = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB between uint8 images (B, C, H, W) -> (B,) float64."""
    check_uint8_images(x)
    check_uint8_images(y)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.double() - y.double()).square().flatten(1).mean(1).clamp_min(MSE_FLOOR)
    return 10.0 * torch.log10(255.0**2 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM between uint8 images (B, C, H, W) (sides >= 11) -> (B,) float64.

    Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 255 (Wang et al., 2004), through torchmetrics.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    check_uint8_images(x)
    check_uint8_images(y)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11x11 pixels (its Gaussian window), got {tuple(x.shape[-2:])}")
    out = structural_similarity_index_measure(y.double(), x.double(), data_range=255.0, reduction="none")
    return out.double()  # type: ignore[union-attr]


def tokenizer_roundtrip(tokenizer: torch.nn.Module, seed: int = 0) -> Roundtrip:
    """uint8 images -> uint8 reconstructions through a ``tokenizers`` Tokenizer (``decode(encode(x))``).

    A stochastic encoder draws image i's posterior sample from a generator seeded by ``(seed, i)``.
    """
    from tokenizers.base import per_image_generators

    @torch.no_grad()
    def fn(images: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        gens = per_image_generators(indices, "recon", seed)
        return to_uint8(tokenizer.decode(tokenizer.encode(images, gens)))  # type: ignore[operator]

    return fn


def _take(images: Any, batch: Sequence[int]) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        return images[torch.tensor(batch)]
    items = [images[i] for i in batch]  # a dataset: (image, label) tuples, {"image": ...} dicts or tensors
    return torch.stack([it["image"] if isinstance(it, dict) else it[0] if isinstance(it, tuple) else it for it in items])


def reconstruction_metrics(
    roundtrip: Roundtrip,
    images: Any,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    allow_singular: bool = False,
    lpips: torch.nn.Module | None = None,
    with_ssim: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """rFID, mean PSNR, SSIM and LPIPS of a reconstruction function over an image set (split across processes).

    Args:
        roundtrip: (uint8 (B, C, H, W), indices) -> uint8 reconstructions of the same shape.
        images: uint8 (N, C, H, W), or a dataset of N such images (the same on every process).
        extractor: feature network for rFID.
        batch_size: images per call on one process.
        allow_singular: accept N ≤ feature dim (smoke tests).
        lpips: an ``gen.nn.lpips.LPIPS`` network, or None to skip LPIPS.
        with_ssim: compute SSIM (needs sides of at least 11 pixels).
        device: where LPIPS runs.

    Returns:
        ``{"rfid", "psnr", "num_images"}`` plus ``"ssim"`` and ``"lpips"`` when computed.
    """
    n = len(images)
    real, recon = FeatureStats(extractor.dim), FeatureStats(extractor.dim)
    sums = torch.zeros(4, dtype=torch.float64)  # Σ psnr, Σ ssim, Σ lpips, count
    for batch in fixed_batches(range(n), batch_size, dist.rank(), dist.world_size()):
        if not batch:
            continue
        x = _take(images, batch)
        check_uint8_images(x)
        y = roundtrip(x, batch)
        if y.shape != x.shape or y.dtype != torch.uint8:
            raise ValueError(f"roundtrip must return uint8 {tuple(x.shape)}, got {y.dtype} {tuple(y.shape)}")
        real.update(extractor(x))
        recon.update(extractor(y))
        sums[0] += psnr(x, y).sum()
        if with_ssim:
            sums[1] += ssim(x, y).sum()
        if lpips is not None:
            with torch.no_grad():
                sums[2] += lpips(to_model_input(x).to(device), to_model_input(y).to(device)).double().sum().cpu()
        sums[3] += len(batch)
    real, recon = real.reduce(), recon.reduce()
    dist.all_reduce_sum(sums)
    manifest = extractor.manifest()
    rfid = fid_from_stats(recon.gaussian(manifest), real.gaussian(manifest), allow_singular=allow_singular)
    count = float(sums[3])
    out: dict[str, Any] = {"rfid": rfid, "psnr": float(sums[0]) / count, "num_images": int(count)}
    if with_ssim:
        out["ssim"] = float(sums[1]) / count
    if lpips is not None:
        out["lpips"] = float(sums[2]) / count
    return out
