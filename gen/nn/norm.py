"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization")."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: ``y = x / sqrt(mean(x^2) + eps) * weight``.

    The statistics are computed in fp32 whatever the input dtype (bf16 squares lose too many bits),
    then the result is cast back before the learnable scale is applied.

    Args:
        dim: size of the normalised (last) dimension.
        eps: added to the mean square inside the square root.
        affine: learn a per-channel weight (initialised to 1).
    """

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim)."""
        xf = x.float()
        # vector_norm is one fused reduction pass (pow + mean would be two, plus a temporary).
        ms = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / self.dim  # (..., 1)
        rstd = torch.rsqrt(ms + self.eps)  # (..., 1)
        if x.dtype == torch.float32 and self.weight is not None:
            return xf * (rstd * self.weight)  # one full-size multiply instead of two
        y = (xf * rstd).to(x.dtype)
        return y * self.weight if self.weight is not None else y

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, affine={self.weight is not None}"
