"""adaLN modulation (DiT, Peebles & Xie 2023, Sec. 3.2 "adaLN-Zero")."""

from __future__ import annotations

import torch
from torch import Tensor


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x * (1 + scale) + shift`` with per-sample or per-token shift/scale.

    Args:
        x: tokens (B, N, D).
        shift: (B, D) broadcast over tokens, or (B, N, D) per token (DDT's self-condition).
        scale: same shape as ``shift``.

    Returns:
        (B, N, D). Computed with one fused ``addcmul`` so no intermediate (B, N, D) tensor is made.
    """
    if shift.dim() == 2:
        shift, scale = shift.unsqueeze(1), scale.unsqueeze(1)
    return torch.addcmul(shift, x, 1 + scale)


def gated_residual(x: Tensor, gate: Tensor, h: Tensor) -> Tensor:
    """``x + gate * h`` (adaLN-Zero's gated residual), fused; gate is (B, D) or (B, N, D)."""
    if gate.dim() == 2:
        gate = gate.unsqueeze(1)
    return torch.addcmul(x, gate, h)
