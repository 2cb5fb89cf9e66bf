"""Datasets (built-in, procedural, image folders, CIFAR-10, latent shards), the per-rank infinite sampler and pixel helpers.

Every image dataset yields ``(image, label)`` with image uint8 (C, H, W) and label an int, and exposes
``num_classes``, ``channels``, ``resolution``, ``name`` and ``len()``. In-memory datasets also have
``tensors()`` so the training loop can index batches without a DataLoader. ``LatentShards`` (pre-extracted
tokenizer latents) yields dicts ``{"label", "latent", "latent_flip"[, "image"]}`` and exposes the same
attributes plus the latent statistics and the identity of the tokenizer that made them.
"""

from __future__ import annotations

from gen.data.base import TensorImageDataset, stratified_split
from gen.data.builtin import Digits, MNIST5k
from gen.data.cifar import CIFAR10
from gen.data.folder import (
    CorruptImageError,
    FolderProblemError,
    ImageFolder,
    decode_image,
    find_images,
    load_image,
    scan_images,
    verify_images,
)
from gen.data.latents import LatentShards, apply_statistics, check_tokenizer, extract_latents
from gen.data.sampler import InfiniteSampler
from gen.data.shapes import SHAPES, Shapes
from gen.data.transforms import center_crop_resize, pad_or_resize, random_hflip, to_model_input, to_uint8

__all__ = [
    "CIFAR10",
    "CorruptImageError",
    "Digits",
    "FolderProblemError",
    "ImageFolder",
    "InfiniteSampler",
    "LatentShards",
    "MNIST5k",
    "SHAPES",
    "Shapes",
    "TensorImageDataset",
    "apply_statistics",
    "center_crop_resize",
    "decode_image",
    "check_tokenizer",
    "extract_latents",
    "find_images",
    "load_image",
    "pad_or_resize",
    "random_hflip",
    "scan_images",
    "stratified_split",
    "to_model_input",
    "to_uint8",
    "verify_images",
]
