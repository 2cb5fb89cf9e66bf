"""Objective base class: an ``nn.Module`` that turns (network, batch) into per-sample losses.

Contract (docs/architecture.md)::

    objective(net, batch, rng, progress=None) -> {"loss": (B,), <logged term>: (B,), ...}

``batch["x0"]`` is the clean model input (B, C, H, W) (pixels in [-1, 1] or normalised latents),
``batch["label"]`` the class labels (B,); other keys (``"image"``: uint8 pixels) are there for objectives that
need them (representation alignment). ``rng`` is the per-sample randomness (``gen.utils.seed.SampleRandom``):
every draw goes through it, so a sample's loss does not depend on the batch it is in. The training method
averages ``"loss"`` over the batch and backpropagates. How a sample's elements are reduced is the objective's
choice, stated in its docstring, because it sets the gradient scale that learning rates and clipping are tuned to
(EDM sums, flow matching averages). Auxiliary trainable modules (projectors) are children, so they reach the optimizer
and the training state; frozen networks are held with ``gen.utils.frozen.hold_frozen``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from gen.paths import Path, TimeSampler
from gen.utils.seed import Randomness


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def sum_flat(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def drop_labels(y: Tensor, p: float, null_class: int, rng: Randomness) -> Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022): each label becomes the null class with probability p.

    One uniform per sample is drawn from ``rng`` whatever ``p`` is, so later draws do not depend on it.
    """
    drop = rng.rand().to(y.device) < p  # (B,)
    return torch.where(drop, torch.full_like(y, null_class), y)


class Objective(nn.Module, ABC):
    """Base of the training objectives.

    Subclasses set ``self.path``, ``self.time_sampler`` and ``self.label_dropout`` and implement ``forward`` and
    ``prediction_spec``.
    """

    path: Path
    time_sampler: TimeSampler
    label_dropout: float = 0.0

    def draw(self, x0: Tensor, y: Tensor | None, null_class: int, rng: Randomness) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-sample draws in a fixed order: time ``t`` (B,), noise ``eps`` like x0 (float32), dropped labels.

        The time is drawn first so that a run's time sequence does not depend on the image size.
        """
        t = self.time_sampler(rng).to(x0.device)
        eps = rng.randn(*x0.shape[1:]).to(x0.device)
        if y is not None:
            y = drop_labels(y, self.label_dropout, null_class, rng)
        return eps, t, y

    def bind(self, net: nn.Module, image_resolution: int | None = None) -> None:
        """Join the objective to its backbone before training: check what must fit (alignment depth, width, token
        grid, REG's extra token) and create parts sized by the backbone (the alignment projector)."""
        align = getattr(self, "align", None)
        if align is not None:
            align.bind(net, image_resolution)
        augment = getattr(self, "augment", None)
        if augment is not None:
            augment.bind(net)

    @abstractmethod
    def forward(self, net: nn.Module, batch: dict[str, Tensor], rng: Randomness, progress: Any = None) -> dict[str, Tensor]:
        """Per-sample losses: ``{"loss": (B,), <logged key>: (B,), ...}``."""

    @abstractmethod
    def prediction_spec(self) -> dict[str, Any]:
        """JSON-able ``{"path": path spec, "prediction": kind, "precond": None | spec}`` stored in snapshots.

        ``gen.models.prediction.velocity_model(net, spec)`` turns a bare network plus this spec into the sampler's
        velocity function.
        """


def check_augment(augment: Any, align: Any) -> Any:
    """ScoreAug (``objective.augment``) as given, refusing it beside representation alignment: the encoder would see
    the clean image while the backbone sees a transformed one, so their tokens would no longer correspond."""
    if augment is not None and align is not None:
        raise ValueError("objective.augment (ScoreAug) cannot be combined with representation alignment "
                         "(objective.align); use one of them (align=none or augment=none)")
    return augment


def check_label_dropout(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1], got {p}")
    return float(p)
