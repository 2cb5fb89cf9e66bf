"""The diffusion method: one backbone trained with one objective and one optimizer (DiT, SiT, LightningDiT, DDT, EDM).

Trainable modules: ``net`` (the backbone, which gets the EMAs and the snapshots) and ``objective`` (the
objective's own parameters, e.g. a REPA projector; empty for plain flow matching and EDM). One phase, ``main``,
steps both with one optimizer. The snapshot metadata holds the backbone's config and the objective's prediction
spec, so a snapshot alone rebuilds the velocity function.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gen.objectives.base import Objective
from gen.train.method import Batch, Method, OptimizerFactory, OptimizerSpec, Progress
from gen.utils.seed import Randomness


class Diffusion(Method):
    """Backbone + objective + optimizer.

    Args:
        net: the backbone (``net(x, t, y) -> ModelOutput``).
        objective: per-sample losses of ``net`` on a batch.
        optimizer: optimizer factory over parameter groups (the ``optim`` config group, ``_partial_``); its
            ``weight_decay`` applies to parameters with two or more dimensions only.
        image_resolution: side of the training images (checks the alignment encoder's token grid up front).
    """

    trainable = ("net", "objective")
    ema_modules = ("net",)
    snapshot_module = "net"

    def __init__(
        self, net: nn.Module, objective: Objective, optimizer: OptimizerFactory, image_resolution: int | None = None
    ) -> None:
        super().__init__()
        objective.bind(net, image_resolution)
        self.net = net
        self.objective = objective
        self._optimizer = optimizer

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("main", ("net", "objective"), self._optimizer)]

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        return self.objective(self.net, batch, rng, progress)

    def status(self, progress: Progress) -> dict[str, float]:
        # An objective with a schedule (iCT's N(k), ECT's stages) says where it stands.
        report = getattr(self.objective, "status", None)
        return dict(report(progress)) if callable(report) else {}

    def snapshot_config(self) -> dict[str, Any]:
        return {"model": dict(self.net.config), "prediction": self.objective.prediction_spec()}
