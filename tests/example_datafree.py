"""A data-free student whose loss differentiates through a 2-step sampler: knowledge distillation of a sampler.

Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative Models for Improved Sampling Speed": the
student's few-step sample from a noise is regressed onto the teacher's many-step sample from the same noise. The
student's sample is ``samplers.sample_euler`` with 2 steps, run *with* gradients, so the loss reaches the network
through both steps (as TDM and SLAM need); the teacher's is an 8-step Euler sample under ``torch.no_grad``. No
image is read: the batch hook keeps the labels and stream positions only (``prepare_batch``), every sample draws its
noise from its own stream. The teacher is a frozen network loaded with the one snapshot loader (``gen.snapshot``;
its identity is checked on resume); the student usually starts from the same snapshot (``trainer.init``).

Config: ``tests/configs/method/datafree_student.yaml``::

    python train.py hydra.searchpath=[file://tests/configs] method=datafree_student packages=[tests] \\
        method.teacher=runs/quickstart/snapshot-000100000.safetensors \\
        'trainer.init={net: runs/quickstart/snapshot-000100000.safetensors}'
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gen.models.prediction import velocity_model
from gen.snapshot import load_network
from gen.train.method import Batch, Method, OptimizerFactory, OptimizerSpec, Progress
from gen.utils.frozen import hold_frozen
from gen.utils.seed import Randomness, SampleRandom
from samplers import sample_euler, uniform_grid
from samplers.spec import prediction_path


class DataFreeStudent(Method):
    """A 2-step Euler student regressed onto an 8-step Euler teacher from the same noise (module docstring).

    Args:
        net: the student backbone (a velocity network of the teacher's architecture).
        optimizer: the ``optim`` group's optimizer factory.
        teacher: the teacher's snapshot file.
        student_steps / teacher_steps: Euler steps of the two samplers (uniform grids).
    """

    data_keys = ()
    flip_keys = ()  # nothing is mirrored: the method reads no image

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, teacher: str, student_steps: int = 2,
                 teacher_steps: int = 8) -> None:
        super().__init__()
        teacher_net, snap = load_network(teacher)
        hold_frozen(self, "teacher", teacher_net)
        self.prediction = snap.config["prediction"]
        self.path = prediction_path(self.prediction)
        self.net, self._optimizer = net, optimizer
        self.student_steps, self.teacher_steps = int(student_steps), int(teacher_steps)

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("net", ("net",), self._optimizer)]

    def prepare_batch(self, raw: Mapping[str, Tensor], tokenizer: Any, rng: SampleRandom, hflip: bool,
                      device: torch.device) -> Batch:
        return {"label": raw["label"].to(device), "position": raw["position"].to(device)}

    def _sample(self, net: nn.Module, noise: Tensor, y: Tensor, steps: int) -> Tensor:
        ts = uniform_grid(steps, path=self.path).to(noise.device)
        return sample_euler(velocity_model(net, self.prediction), noise, ts, path=self.path, y=y)

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        y = batch["label"]
        shape = (self.net.in_channels, self.net.input_size, self.net.input_size)
        noise = rng.randn(*shape).to(y.device)
        with torch.no_grad():
            target = self._sample(self.teacher, noise, y, self.teacher_steps)
        student = self._sample(self.net, noise, y, self.student_steps)  # gradients flow through both steps
        return {"loss": (student.float() - target.float()).square().flatten(1).mean(1)}

    def snapshot_config(self) -> dict[str, Any]:
        return {"model": dict(self.net.config), "prediction": dict(self.prediction)}
