"""Plumbing shared by the backbones in gen.models: input validation, time/label batching, unpatchify, outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def pack_outputs(out: Tensor, extra_out: Tensor | None, feats: list[Tensor] | None) -> Any:
    """Return convention shared by all backbones.

    ``out`` alone; ``(out, feats)`` with features; ``(out, extra_out)`` with REG's extra token;
    ``(out, extra_out, feats)`` with both. ``out`` always comes first and ``feats`` always last.
    """
    if extra_out is None:
        return out if feats is None else (out, feats)
    return (out, extra_out) if feats is None else (out, extra_out, feats)


def embed_extra_token(model: nn.Module, extra_token: Tensor, batch: int) -> Tensor:
    """REG's extra-token input: (B, D_extra) -> (B, 1, D) via ``model.extra_embed`` then ``model.extra_norm``.

    Used as a method by every backbone built with ``extra_token_dim > 0``.
    """
    if model.extra_token_dim <= 0:
        raise ValueError(
            f"{type(model).__name__} got extra_token but was built with extra_token_dim=0; "
            f"build it with extra_token_dim={extra_token.shape[-1]}"
        )
    if extra_token.shape != (batch, model.extra_token_dim):
        raise ValueError(f"extra_token must be ({batch}, {model.extra_token_dim}), got {tuple(extra_token.shape)}")
    return model.extra_norm(model.extra_embed(extra_token)).unsqueeze(1)
