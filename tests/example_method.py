"""A new training method in one file: flow matching with an adversarial critic on frozen features.

This is the worked example of docs/architecture.md ("Adding a training method") and the method the tests train
end to end (two optimizers stepped in turn, the second consuming the first one's samples through
``Method.shared``, a frozen network, resume after SIGKILL). It is a real, if small,
objective in the spirit of projected GANs (Sauer et al. 2021, "Projected GANs Converge Faster"): the backbone
is trained with rectified flow plus a hinge adversarial term on its one-step data estimate, judged by a critic
that looks at the images through a frozen random convolutional projection.

Its config is ``tests/configs/method/adversarial_flow.yaml``; train it with

    python train.py hydra.searchpath=[file://tests/configs] method=adversarial_flow packages=[tests]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.objectives.base import drop_labels
from gen.paths import LinearPath
from gen.train.method import Batch, Method, OptimizerFactory, OptimizerSpec, Progress
from gen.utils.frozen import hold_frozen
from gen.utils.seed import Randomness


def frozen_projection(channels: int, width: int, seed: int) -> nn.Module:
    """A fixed random conv projection (B, C, H, W) -> (B, width, H/4, W/4), the critic's frozen feature network."""
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                        nn.Conv2d(width, width, 4, stride=2, padding=1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p[0].numel()) ** 0.5)
    return net


def make_critic(feature_width: int) -> nn.Module:
    """A small conv critic on the frozen features: (B, width, h, w) -> (B, 1); its last layer sizes itself."""
    return nn.Sequential(nn.Conv2d(feature_width, 32, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(), nn.LazyLinear(1))


class AdversarialFlow(Method):
    """Rectified flow plus a hinge adversarial loss on the one-step estimate ``x0_hat = x_t - t v``.

    Phases per step: ``net`` (flow loss + ``adv_weight`` times the generator's hinge term) then ``critic`` (hinge
    loss on real images against the net phase's estimates, handed over through ``Method.shared``). Trainable: ``net`` (EMA, snapshots) and ``critic``;
    frozen: ``features``.

    Args:
        net: the backbone (built from the ``model`` group by train.py).
        optimizer: the ``optim`` group's optimizer factory, for the backbone.
        critic_optimizer: the critic's optimizer factory (its own config node).
        adv_weight: weight of the adversarial term in the backbone's loss.
        feature_width: channels of the frozen projection; feature_seed: its weights' seed.
        label_dropout: classifier-free guidance label dropout.
    """

    trainable = ("net", "critic")
    ema_modules = ("net",)
    snapshot_module = "net"

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        critic_optimizer: OptimizerFactory,
        adv_weight: float = 0.05,
        feature_width: int = 16,
        feature_seed: int = 0,
        label_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.net = net
        channels = net.in_channels
        self.critic = make_critic(feature_width)
        hold_frozen(self, "features", frozen_projection(channels, feature_width, feature_seed))
        with torch.no_grad():  # materialise the lazy layer so the optimizer sees its parameters
            self.critic(self.features(torch.zeros(1, channels, net.input_size, net.input_size)))
        self.path = LinearPath()
        self._optimizers = (optimizer, critic_optimizer)
        self.adv_weight, self.label_dropout = float(adv_weight), float(label_dropout)

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("net", ("net",), self._optimizers[0]),
                OptimizerSpec("critic", ("critic",), self._optimizers[1])]

    def _estimate(self, batch: Batch, rng: Randomness) -> tuple[Tensor, Tensor]:
        """Flow-matching draws and the one-step data estimate; returns (per-sample mse, x0_hat)."""
        x0 = batch["x0"].float()
        t = rng.rand().to(x0.device)
        eps = rng.randn(*x0.shape[1:]).to(x0.device)
        y = drop_labels(batch["label"], self.label_dropout, self.net.num_classes, rng)
        x_t = self.path.sample(x0, eps, t)
        v = self.net(x_t, t, y).out.float()
        mse = (v - (eps - x0)).square().flatten(1).mean(1)
        return mse, x_t - t.view(-1, 1, 1, 1) * v

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        if phase == "net":
            mse, x0_hat = self._estimate(batch, rng)
            adv = -self.critic(self.features(x0_hat)).squeeze(1)  # generator hinge term
            self.shared.put("fake", x0_hat)  # the critic phase of this step judges these very samples
            return {"loss": mse + self.adv_weight * adv, "mse": mse, "adv": adv.detach()}
        fake = self.shared.get("fake")  # the net phase's estimates of this micro-batch (detached)
        real = self.critic(self.features(batch["x0"].float())).squeeze(1)
        fake_score = self.critic(self.features(fake)).squeeze(1)
        loss = F.relu(1 - real) + F.relu(1 + fake_score)
        return {"loss": loss, "real": real.detach(), "fake": fake_score.detach()}

    def snapshot_config(self) -> dict[str, Any]:
        return {"model": dict(self.net.config),
                "prediction": {"path": dict(self.path.config), "prediction": "velocity", "precond": None}}
