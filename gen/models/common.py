"""Plumbing shared by the backbones: input validation, time/label batching, unpatchify, the output type, REG's token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor, nn


def check_image(x: Tensor, in_channels: int, input_size: int, patch_size: int, name: str) -> None:
    """Raise ValueError unless x is (B, in_channels, input_size, input_size) with input_size % p == 0."""
    if x.dim() != 4:
        raise ValueError(f"{name} expects x of shape (B, C, H, W), got {tuple(x.shape)}")
    _, c, h, w = x.shape
    if c != in_channels:
        raise ValueError(
            f"{name} was built for in_channels={in_channels} but x has {c} channels; "
            f"set model in_channels={c} (or feed {in_channels}-channel inputs)"
        )
    if h % patch_size or w % patch_size:
        raise ValueError(
            f"{name}: image size {h}x{w} is not divisible by patch_size={patch_size}; "
            f"resize/crop the input or pick a patch size that divides {h}"
        )
    if h != input_size or w != input_size:
        raise ValueError(
            f"{name} was built for input_size={input_size} but x is {h}x{w}; "
            f"set model input_size={h} (position tables are fixed at construction)"
        )


def batch_time(t: Tensor | float, batch: int, device: torch.device, name: str) -> Tensor:
    """Time as a (B,) float tensor; a scalar is broadcast to the batch."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        return t.float().expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} expects t of shape ({batch},) or a scalar, got {tuple(t.shape)}")
    return t


def batch_labels(y: Tensor | None, batch: int, null_class: int, device: torch.device, name: str) -> Tensor:
    """Labels as a (B,) long tensor; None means the null class (unconditional)."""
    if y is None:
        return torch.full((batch,), null_class, dtype=torch.long, device=device)
    if y.shape != (batch,):
        raise ValueError(f"{name} expects y of shape ({batch},) with class indices, got {tuple(y.shape)}")
    return y.long()


def feature_indices(return_features: Sequence[int], depth: int, name: str) -> dict[int, int]:
    """Map 1-indexed block numbers to their position in the returned list; validates the range."""
    idx = {}
    for pos, k in enumerate(return_features):
        if not 1 <= int(k) <= depth:
            raise ValueError(f"{name}: return_features holds block {k}, valid blocks are 1..{depth}")
        idx.setdefault(int(k), pos)
    if len(idx) != len(return_features):
        raise ValueError(f"{name}: return_features has duplicates: {list(return_features)}")
    return idx


def unpatchify(x: Tensor, patch_size: int, channels: int, grid: int) -> Tensor:
    """(B, N, p·p·C) tokens with (p, q, c) channel order -> (B, C, grid·p, grid·p)."""
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=grid, w=grid, p=patch_size, q=patch_size, c=channels)


@dataclass
class ModelOutput:
    """What every backbone returns (one small type, whatever was asked for).

    Attributes:
        out: the image prediction (B, C_out, H, W) (velocity, x0 or epsilon, as the objective trained it).
        extra: REG's extra-token prediction (B, D_extra), when an extra token was given.
        features: token outputs (B, n_extra + N, D) of the blocks named in ``return_features``, in that order.
        encoder_out: DDT's self-condition z_t (B, n_extra + N, D), reusable through ``encoder_out=`` (DDT only).
    """

    out: Tensor
    extra: Tensor | None = None
    features: list[Tensor] = field(default_factory=list)
    encoder_out: Tensor | None = None


def make_extra_token(model: nn.Module, extra_dim: int, dim: int) -> None:
    """Give ``model`` REG's extra-token modules when ``extra_dim > 0`` (Wu et al. 2025, "Representation
    Entanglement for Generation"; Martinser/REG models/sit.py).

    ``extra_embed`` (Linear D_extra -> D) and ``extra_norm`` (LayerNorm) embed the token, which is prepended at
    sequence index 0 with a zero position (zero absolute embedding, identity RoPE rotation); ``extra_head``
    (Linear D -> D_extra) predicts it. They sit directly on the model so checkpoints keep one flat key layout.
    """
    model.extra_token_dim = int(extra_dim)
    if extra_dim > 0:
        model.extra_embed = nn.Linear(extra_dim, dim)
        model.extra_norm = nn.LayerNorm(dim, eps=1e-6)
        model.extra_head = nn.Linear(dim, extra_dim)


def init_extra_token(model: nn.Module) -> None:
    """Zero the extra-token head, so its prediction starts at 0 like the image output."""
    if model.extra_token_dim > 0:
        nn.init.zeros_(model.extra_head.weight)
        nn.init.zeros_(model.extra_head.bias)


def embed_extra_token(model: nn.Module, extra_token: Tensor, batch: int) -> Tensor:
    """REG's extra-token input: (B, D_extra) -> (B, 1, D) via ``model.extra_embed`` then ``model.extra_norm``."""
    if model.extra_token_dim <= 0:
        raise ValueError(
            f"{type(model).__name__} got extra_token but was built with extra_token_dim=0; "
            f"build it with extra_token_dim={extra_token.shape[-1]}"
        )
    if extra_token.shape != (batch, model.extra_token_dim):
        raise ValueError(f"extra_token must be ({batch}, {model.extra_token_dim}), got {tuple(extra_token.shape)}")
    return model.extra_norm(model.extra_embed(extra_token)).unsqueeze(1)


def make_augment_embedder(model: nn.Module, augment_dim: int, dim: int) -> None:
    """ScoreAug's conditioning (Hou et al. 2025, "Score Augmentation for Diffusion Models"): when
    ``augment_dim > 0``, ``aug_embedder`` (Linear D_aug -> D, no bias) embeds the transform parameters omega, and the
    embedding is added to the time embedding. Zero-initialised and bias-free, so omega = 0 (the identity, used at
    sampling) adds exactly nothing and training starts from the unconditioned network."""
    model.augment_dim = int(augment_dim)
    if augment_dim < 0:
        raise ValueError(f"augment_dim must be >= 0, got {augment_dim}")
    if augment_dim > 0:
        model.aug_embedder = nn.Linear(augment_dim, dim, bias=False)
    init_augment_embedder(model)


def init_augment_embedder(model: nn.Module) -> None:
    """Zero ScoreAug's embedder (after an init that visits every Linear), so omega = 0 adds nothing."""
    if model.augment_dim > 0:
        nn.init.zeros_(model.aug_embedder.weight)


def augment_embedding(model: nn.Module, augment: Tensor | None, batch: int) -> Tensor | float:
    """The embedding of ScoreAug's transform parameters ``augment`` (B, D_aug) to add to the time embedding (B, D);
    0 without them (sampling, or a model built without ``augment_dim``)."""
    if augment is None:
        return 0.0
    if model.augment_dim <= 0:
        raise ValueError(
            f"{type(model).__name__} got ScoreAug parameters but was built with augment_dim=0; build it with "
            f"augment_dim={augment.shape[-1]} (augment=scoreaug sets model.augment_dim)"
        )
    if augment.shape != (batch, model.augment_dim):
        raise ValueError(f"augment must be ({batch}, {model.augment_dim}), got {tuple(augment.shape)}")
    return model.aug_embedder(augment.to(model.aug_embedder.weight.dtype))
