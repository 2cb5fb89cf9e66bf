"""A student initialised from a snapshot that reads an EMA target in its loss: consistency training.

Consistency models (Song et al. 2023, "Consistency Models"; official code openai/consistency_models,
cm/karras_diffusion.py ``consistency_losses``): ``f(x_t, t)`` maps any point of a trajectory to its start, and is
trained to agree with an EMA *target* network one discretisation step earlier on the same trajectory:
``|f_theta(x_t, t) - sg(f_target(x_{t - dt}, t - dt))|^2`` with ``x_t = (1 - t) x0 + t eps`` (one ``eps`` for both
points). Here ``f(x, t) = x - t v(x, t)`` (the one-step data estimate of a velocity network, exact at ``t = 0``), the
network starts from a trained diffusion snapshot (``trainer.init``, as ECT fine-tunes a pre-trained model), and the
target is the method's own EMA (``ema_specs`` from ``target_ema``; ``Method.averaged``), updated after each step.

Config: ``tests/configs/method/consistency_student.yaml``::

    python train.py hydra.searchpath=[file://tests/configs] method=consistency_student packages=[tests] \\
        'trainer.init={net: runs/quickstart/snapshot-000100000.safetensors}'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gen.ema import EMAFactory
from gen.objectives.base import drop_labels
from gen.paths import LinearPath
from gen.train.method import Batch, Method, OptimizerFactory, OptimizerSpec, Progress
from gen.utils.seed import Randomness


class ConsistencyStudent(Method):
    """Consistency training against the EMA target (module docstring); trainable ``net``, EMA ``target_ema``.

    Args:
        net: the backbone (a velocity network; ``trainer.init`` starts it from a snapshot).
        optimizer: the ``optim`` group's optimizer factory.
        target_ema: the target network's EMA factory (a ``_partial_`` spec of ``gen.ema.EMA``); its first profile
            is also the snapshot's.
        steps: the discretisation ``N`` of [0, 1]; a sample's two times are ``t`` and ``t - 1/N``.
        label_dropout: classifier-free guidance label dropout.
    """

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, target_ema: EMAFactory, steps: int = 16,
                 label_dropout: float = 0.1) -> None:
        super().__init__()
        self.net, self.path = net, LinearPath()
        self._optimizer, self._target_ema = optimizer, target_ema
        self.dt, self.label_dropout = 1.0 / int(steps), float(label_dropout)

    def ema_specs(self, default: EMAFactory) -> dict[str, EMAFactory]:
        return {"net": self._target_ema}

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("net", ("net",), self._optimizer)]

    def _f(self, net: nn.Module, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """One-step data estimate ``x - t v(x, t)`` (B, C, H, W)."""
        return x - t.view(-1, 1, 1, 1) * net(x, t, y).out.float()

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        x0 = batch["x0"].float()
        t = self.dt + (1 - self.dt) * rng.rand().to(x0.device)  # (B,) in [dt, 1]
        eps = rng.randn(*x0.shape[1:]).to(x0.device)
        y = drop_labels(batch["label"], self.label_dropout, self.net.num_classes, rng)
        with torch.no_grad():  # the target: the EMA network one step earlier on the same trajectory
            s = t - self.dt
            target = self._f(self.averaged("net"), self.path.sample(x0, eps, s), s, y)
        pred = self._f(self.net, self.path.sample(x0, eps, t), t, y)
        return {"loss": (pred - target).square().flatten(1).mean(1)}

    def snapshot_config(self) -> dict[str, Any]:
        return {"model": dict(self.net.config),
                "prediction": {"path": dict(self.path.config), "prediction": "velocity", "precond": None}}
