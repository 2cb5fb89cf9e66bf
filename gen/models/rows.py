"""Network calls padded to a minimum number of rows, so that an image depends only on its seed (batch-size
invariance on CPU GEMM kernels). Used by every seeded generator: ``eval.generator`` and ``distill.teacher``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gen.models.common import ModelOutput


class MinRows(nn.Module):
    """Calls ``net`` on at least ``min_rows`` rows, padding small batches with copies of row 0.

    CPU GEMM libraries switch to other kernels (another summation order) for matrices of very few
    rows, so without padding a batch of 4 images can differ in the last bit from the same images
    inside a batch of 16, and after rounding to uint8 an occasional pixel differs. Padding keeps
    every call in the large-matrix regime, so an image depends only on its seed.
    """

    def __init__(self, net: nn.Module, min_rows: int = 16) -> None:
        super().__init__()
        self.net, self.min_rows = net, int(min_rows)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None, **kwargs: Any) -> ModelOutput:
        n = x.shape[0]
        if n >= self.min_rows:
            return self.net(x, t, y, **kwargs)
        idx = torch.cat([torch.arange(n), torch.zeros(self.min_rows - n, dtype=torch.long)]).to(x.device)
        pad = {k: v[idx] if isinstance(v, Tensor) and v.shape[:1] == (n,) else v for k, v in kwargs.items()}
        res = self.net(x[idx], t[idx], None if y is None else y[idx], **pad)
        return ModelOutput(
            res.out[:n],
            None if res.extra is None else res.extra[:n],
            [f[:n] for f in res.features],
            None if res.encoder_out is None else res.encoder_out[:n],
        )
