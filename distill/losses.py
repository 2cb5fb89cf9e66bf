"""Distances of the distillation losses: the two pseudo-Huber conventions and the perceptual (LPIPS) distance.

Pseudo-Huber on whole samples, ``H(a, b) = sqrt(||a - b||^2 + c^2) - c`` (Song & Dhariwal 2023, "Improved Techniques
for Training Consistency Models", Sec. 3.3). Two conventions for ``c`` meet in this package:

* **iCT** (``"ict"``): ``c = 0.00054 sqrt(D)`` (D = C*H*W; CIFAR-10: 0.030). Used by consistency distillation here.
* **2-rectified flow++** (``"rfpp"``): the official code (sangyun884/rfpp, ``train.py``) computes
  ``(sqrt(||a - b||^2 + c^2) - c) / D`` with ``c = 0.00054 D`` (CIFAR-10: 1.66). This is what its reported numbers
  were trained with, so it is our default for reflow. With the larger c the loss is quadratic (``~||a-b||^2 / 2cD``)
  for per-sample errors far below c and linear above it; iCT's small c makes it nearly the L2 norm everywhere.

The perceptual term: ``gen.nn.lpips.LPIPS`` (VGG16 + learned linear heads, local weights; ``distill.perceptual``) or
any module with the same call, ``distance(a, b) -> (B,)`` on images in [-1, 1].
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

HuberRule = Literal["rfpp", "ict"]


def resolve_huber_c(numel: int, rule: HuberRule | float) -> float:
    """The pseudo-Huber constant for D = ``numel`` elements per sample: ``0.00054 D`` (rfpp), ``0.00054 sqrt(D)``
    (iCT), or the number given."""
    if isinstance(rule, (int, float)):
        if not rule >= 0 or not math.isfinite(rule):
            raise ValueError(f"huber_c must be 'rfpp', 'ict' or a number >= 0, got {rule!r}")
        return float(rule)
    if rule == "rfpp":
        return 0.00054 * numel
    if rule == "ict":
        return 0.00054 * math.sqrt(numel)
    raise ValueError(f"huber_c must be 'rfpp', 'ict' or a number >= 0, got {rule!r}")


def pseudo_huber(a: Tensor, b: Tensor, c: float, normalise: bool = False) -> Tensor:
    """``sqrt(||a - b||^2 + c^2) - c`` per sample, (B, ...) x2 -> (B,); divided by D with ``normalise`` (rfpp).

    The squared norm is floored at 1e-30 so that the gradient stays finite when ``a == b`` and ``c == 0``.
    """
    diff = (a.float() - b.float()).reshape(a.shape[0], -1)
    h = (diff.pow(2).sum(1).clamp(min=1e-30) + c * c).sqrt() - c
    return h / diff.shape[1] if normalise else h


def huber_elementwise(a: Tensor, b: Tensor, c: float) -> Tensor:
    """``mean(sqrt((a - b)^2 + c^2) - c)`` over each sample's elements, (B, ...) x2 -> (B,): the elementwise
    pseudo-Huber of the TDM and SLAM official code (c = 1e-3; Luo-Yihong/TDM ``train_tdm_demo.py`` ``--use_huber``,
    MCG-NJU/SPLAM ``train_splam_distill_sd_wds.py`` ``--loss_type huber``)."""
    d = (a.float() - b.float()).flatten(1)
    return ((d.square() + c * c).sqrt() - c).mean(1)
