"""Objective base class: an ``nn.Module`` that turns (net, clean batch, labels) into per-sample losses.

Contract (docs/architecture.md): ``forward(net, x0, y, *, generator=None) -> dict[str, Tensor]`` with a per-sample
``"loss"`` of shape ``(B,)`` and further ``(B,)`` entries that are only logged. The training loop reduces, scales and
backpropagates; it averages ``"loss"`` over the batch. How a sample's elements are reduced is the objective's choice,
stated in its docstring, because it sets the gradient scale that learning rates and clipping are tuned to (EDM sums,
flow matching averages). Every random draw takes the optional ``generator`` so one step is reproducible from
``gen.utils.seed.step_generator``. Auxiliary modules (projectors, ...) are children, so they reach the optimizer and
the training state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from gen.paths import Path, TimeSampler


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def sum_flat(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


class Objective(nn.Module, ABC):
    """Base of all training objectives.

    Subclasses set ``self.path`` and ``self.time_sampler`` and implement ``forward`` and ``prediction_spec``.
    """

    path: Path
    time_sampler: TimeSampler

    def sample_noise_and_time(
        self, x0: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw ``eps ~ N(0, I)`` shaped like ``x0`` (float32) and times ``t`` of shape ``(B,)`` (float32).

        The time is drawn first so that a run's time sequence does not depend on the image size.
        """
        t = self.time_sampler(x0.shape[0], generator, x0.device)
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        return eps, t

    @abstractmethod
    def forward(
        self, net: nn.Module, x0: Tensor, y: Tensor | None, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Per-sample losses: ``{"loss": (B,), <logged key>: (B,), ...}``."""

    @abstractmethod
    def prediction_spec(self) -> dict[str, Any]:
        """JSON-able ``{"path": path spec, "prediction": kind, "precond": None | {...}}`` stored in snapshots.

        ``gen.objectives.velocity_model(net, spec)`` turns a bare network plus this spec into the sampler's
        velocity function.
        """
