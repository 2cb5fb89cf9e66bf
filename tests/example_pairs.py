"""A method that reads noise-image pairs, with ``trainer.hflip`` on: each pair is mirrored together.

Reflow (Liu et al. 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow";
official code gnobitab/RectifiedFlow) trains on fixed couplings ``(x0, eps)``, e.g. a teacher's noise and the
image it generated; the interpolant is ``x_t = (1 - t) x0 + t eps`` and the target velocity ``eps - x0``. Here the
pairs are stored by the dataset (:class:`NoisePairs`: built-in digits, each with a fixed noise drawn from its
index); the method declares the key it reads (``data_keys``) and the keys flipped together (``flip_keys``), so a
mirrored image keeps its own mirrored noise. Config: ``tests/configs/method/paired_flow.yaml`` (+ the data config
``tests/configs/data/noise_pairs.yaml``)::

    python train.py hydra.searchpath=[file://tests/configs] method=paired_flow data=noise_pairs packages=[tests]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gen.data.builtin import MNIST5k
from gen.objectives.base import drop_labels
from gen.paths import LinearPath
from gen.train.method import Batch, Method, OptimizerFactory, OptimizerSpec, Progress
from gen.utils.seed import Randomness


class NoisePairs(MNIST5k):
    """mnist5k with a fixed unit-Gaussian ``"noise"`` (C, H, W) per image (seeded by ``seed``): noise-image pairs.

    Items: ``{"image": uint8 (C, H, W), "label": int, "noise": float32 (C, H, W)}``.
    """

    def __init__(self, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn(self.images.shape, generator=gen)
        self.name = "noise_pairs"

    def tensors(self) -> dict[str, Tensor]:
        return {"image": self.images, "label": self.labels, "noise": self.noise}

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        return {"image": self.images[index], "label": int(self.labels[index]), "noise": self.noise[index]}


class PairedFlow(Method):
    """Rectified flow on stored pairs: ``x_t = (1 - t) x0 + t noise``, loss ``|v(x_t, t, y) - (noise - x0)|^2``."""

    data_keys = ("noise",)
    flip_keys = ("image", "noise")  # a mirrored image keeps its (mirrored) partner

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, label_dropout: float = 0.1) -> None:
        super().__init__()
        self.net, self.path = net, LinearPath()
        self._optimizer, self.label_dropout = optimizer, float(label_dropout)

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("net", ("net",), self._optimizer)]

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        x0, eps = batch["x0"].float(), batch["noise"].float()
        t = rng.rand().to(x0.device)
        y = drop_labels(batch["label"], self.label_dropout, self.net.num_classes, rng)
        v = self.net(self.path.sample(x0, eps, t), t, y).out.float()
        return {"loss": (v - (eps - x0)).square().flatten(1).mean(1)}

    def snapshot_config(self) -> dict[str, Any]:
        return {"model": dict(self.net.config),
                "prediction": {"path": dict(self.path.config), "prediction": "velocity", "precond": None}}
