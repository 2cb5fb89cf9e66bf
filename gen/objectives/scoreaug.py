"""ScoreAug: augment the noisy input and the target together (Hou et al. 2025, "Score Augmentation for Diffusion
Models", arXiv 2508.07926).

Conventional data augmentation trains on ``T(x) + sigma n`` against ``T(x)`` and leaks ``T`` into the samples unless
the network is told. ScoreAug applies a *linear* transform ``T_omega`` to the noisy input and asks for the
transformed target: the input is ``T(x_t)`` and the target ``T(target)``. For linear ``T`` and the paths here
(``x_t = alpha_t x0 + sigma_t eps``) this is ``alpha_t T(x0) + sigma_t T(eps)``, so data and noise move together,
and every target that is linear in (x0, eps) (velocity, x0, epsilon) is transformed by the same ``T``. The network is
conditioned on ``omega`` through an embedding added to the time embedding (``gen.models.common.augment_embedding``);
sampling uses ``omega = 0``, the identity, for which the embedding adds exactly nothing.

Transforms (one kind per sample, drawn uniformly with the identity among them, as a port that states it follows the
paper does; the paper's own probabilities were not retrieved): horizontal flip, 90-degree rotations (square inputs),
integer translation with zero padding, brightness scaling, cutout (a zeroed square). Rotations and flips leave
i.i.d. Gaussian noise statistically unchanged, which is why the conditioning is needed: without omega the network
cannot tell a rotated sample from a plain one. The ranges follow EDM's augmentation pipe where the paper's were not
retrieved (translation up to 1/8 of the side, cutout of half the side; NVlabs/edm training/augment.py): stated as
such, not as the paper's.

omega (``OMEGA_DIM`` = 10 numbers per sample, all 0 for the identity)::

    [flip, rot90 x1, rot90 x2, rot90 x3, dx / W, dy / H, log brightness, cutout, cutout cx - 1/2, cutout cy - 1/2]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gen.utils.seed import Randomness

OMEGA_DIM = 10
KINDS = ("flip", "rot90", "translate", "brightness", "cutout")
DRAWS = 4  # uniforms per sample, whatever its kind: the random stream does not depend on the kinds drawn


class ScoreAug(nn.Module):
    """Draws a transform per sample and applies it to the noisy input and the target (no parameters of its own).

    Args:
        transforms: the kinds in use (a subset of ``KINDS``); the identity is always one more choice.
        max_translate: largest shift as a fraction of the side (rounded to whole pixels of the model input).
        max_log_brightness: brightness factors ``exp(u)`` with ``u`` uniform in ``[-b, b]``.
        cutout_size: side of the zeroed square as a fraction of the input side.
    """

    def __init__(
        self,
        transforms: Sequence[str] = KINDS,
        max_translate: float = 0.125,
        max_log_brightness: float = 0.4,
        cutout_size: float = 0.5,
    ) -> None:
        super().__init__()
        unknown = [k for k in transforms if k not in KINDS]
        if unknown or not transforms or len(set(transforms)) != len(transforms):
            raise ValueError(f"objective.augment.transforms={list(transforms)!r}: give distinct kinds of {list(KINDS)}")
        if not 0.0 <= max_translate < 0.5:
            raise ValueError(f"objective.augment.max_translate={max_translate} must be in [0, 0.5)")
        if not 0.0 <= max_log_brightness <= 2.0:
            raise ValueError(f"objective.augment.max_log_brightness={max_log_brightness} must be in [0, 2]")
        if not 0.0 < cutout_size <= 1.0:
            raise ValueError(f"objective.augment.cutout_size={cutout_size} must be in (0, 1]")
        self.transforms = tuple(transforms)
        self.max_translate, self.max_log_brightness, self.cutout_size = max_translate, max_log_brightness, cutout_size

    def bind(self, net: nn.Module) -> None:
        """Check the backbone takes omega and, with rotations, square inputs (before any work)."""
        if getattr(net, "augment_dim", 0) != OMEGA_DIM:
            raise ValueError(
                f"ScoreAug conditions the network on {OMEGA_DIM} transform parameters, but the model has "
                f"augment_dim={getattr(net, 'augment_dim', 0)}; set model.augment_dim={OMEGA_DIM} (augment=scoreaug does)"
            )
        size = getattr(net, "input_size", None)
        if "rot90" in self.transforms and isinstance(size, (tuple, list)) and size[0] != size[1]:
            raise ValueError(f"ScoreAug's rot90 needs square inputs, the model takes {size}; remove rot90 from "
                             "objective.augment.transforms")

    def draw(self, rng: Randomness, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Per-sample kinds (B,) (0 = identity, k = ``transforms[k - 1]``) and omega (B, OMEGA_DIM).

        ``shape`` is the model input's (B, C, H, W)."""
        u = rng.rand(1 + DRAWS).double()  # (B, 1 + DRAWS)
        kinds = (u[:, 0] * (len(self.transforms) + 1)).floor().long().clamp_max(len(self.transforms))
        H, W = shape[-2], shape[-1]
        if "rot90" in self.transforms and H != W:
            raise ValueError(f"ScoreAug's rot90 needs square inputs, got {H}x{W}; remove rot90 from the transforms")
        omega = torch.zeros(u.shape[0], OMEGA_DIM, dtype=torch.float64)
        for i, k in enumerate(kinds.tolist()):
            if k == 0:
                continue
            kind, a, b = self.transforms[k - 1], float(u[i, 1]), float(u[i, 2])
            if kind == "flip":
                omega[i, 0] = 1.0
            elif kind == "rot90":
                omega[i, 1 + min(int(a * 3), 2)] = 1.0
            elif kind == "translate":
                mx, my = round(self.max_translate * W), round(self.max_translate * H)
                omega[i, 4] = min(int(a * (2 * mx + 1)), 2 * mx) - mx
                omega[i, 5] = min(int(b * (2 * my + 1)), 2 * my) - my
                omega[i, 4] /= W
                omega[i, 5] /= H
            elif kind == "brightness":
                omega[i, 6] = (2.0 * a - 1.0) * self.max_log_brightness
            else:  # cutout
                omega[i, 7], omega[i, 8], omega[i, 9] = 1.0, a - 0.5, b - 0.5
        return kinds, omega.float()

    def apply(self, x: Tensor, omega: Tensor) -> Tensor:
        """``T_omega(x)`` for each sample: (B, C, H, W) -> (B, C, H, W); linear in ``x``."""
        return torch.stack([transform(x[i], omega[i].tolist(), self.cutout_size) for i in range(x.shape[0])])

    def forward(self, x_t: Tensor, target: Tensor, rng: Randomness) -> tuple[Tensor, Tensor, Tensor]:
        """``(T(x_t), T(target), omega)`` with one draw per sample from ``rng``."""
        _, omega = self.draw(rng, x_t.shape)
        omega = omega.to(x_t.device)
        return self.apply(x_t, omega), self.apply(target, omega), omega


def transform(x: Tensor, w: Sequence[float], cutout_size: float) -> Tensor:
    """One sample's transform from its omega ``w`` (see the module docstring): (C, H, W) -> (C, H, W)."""
    H, W = x.shape[-2:]
    if w[0]:
        return x.flip(-1)
    for k in (1, 2, 3):
        if w[k]:
            return torch.rot90(x, k, dims=(-2, -1))
    if w[4] or w[5]:
        return _shift(x, round(w[4] * W), round(w[5] * H))
    if w[6]:
        return x * math.exp(w[6])
    if w[7]:
        side_h, side_w = max(round(cutout_size * H), 1), max(round(cutout_size * W), 1)
        cy, cx = (w[9] + 0.5) * H, (w[8] + 0.5) * W
        y0, x0 = max(round(cy - side_h / 2), 0), max(round(cx - side_w / 2), 0)
        mask = torch.ones_like(x)
        mask[..., y0:y0 + side_h, x0:x0 + side_w] = 0
        return x * mask
    return x


def _shift(x: Tensor, dx: int, dy: int) -> Tensor:
    """Move the content by (dx, dy) pixels (right, down), filling with zeros."""
    H, W = x.shape[-2:]
    out = torch.zeros_like(x)
    out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = x[..., max(-dy, 0):H - max(dy, 0),
                                                                       max(-dx, 0):W - max(dx, 0)]
    return out
