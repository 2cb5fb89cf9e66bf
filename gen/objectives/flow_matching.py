"""Flow matching / rectified flow with a velocity target (Lipman et al. 2023; Liu et al. 2023; SiT, Ma et al. 2024).

One step: ``t ~ p(t)``, ``eps ~ N(0, I)``, ``x_t = alpha_t x0 + sigma_t eps``, target ``v = alpha'_t x0 + sigma'_t eps``
(``eps - x0`` on the linear path), loss ``mean ||v_hat(x_t, t, y) - v||^2`` per sample. Optional LightningDiT
velocity-direction loss: ``1 - cos(v_hat, v)`` along channels at every spatial position, averaged over positions,
added with weight ``cos_velocity_weight`` (Yao et al. 2025, "Reconstruction vs. Generation").

Reduction: the squared error is *averaged* over the C*H*W elements of each sample (and the loop averages over the
batch), as SiT (willisma/SiT transport/transport.py ``training_losses``: ``mean_flat``), REPA (sihyun-yu/REPA loss.py)
and LightningDiT (hustvl/LightningDiT transport/transport.py, train.py ``loss.mean()``) do, so their learning rates
carry over. EDM's loss is a sum instead (``gen.objectives.edm``).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from gen.objectives.align import Alignment, align_terms
from gen.objectives.base import Objective, check_augment, check_label_dropout, mean_flat
from gen.objectives.scoreaug import ScoreAug
from gen.paths import LinearPath, Path, TimeSampler, UniformTime
from gen.utils.seed import Randomness


def cosine_direction_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - cos(pred, target)`` along dim 1 (channels) per position, averaged over positions: ``(B, C, ...) -> (B,)``."""
    cos = F.cosine_similarity(pred, target, dim=1, eps=eps)  # (B, H, W)
    return mean_flat(1.0 - cos)


class FlowMatching(Objective):
    """Velocity-prediction flow matching on any ``Path``; the network receives ``(x_t, t, y)`` in path time.

    Args:
        path: the noising path (default the linear path: rectified flow).
        time_sampler: training-time distribution (default uniform on [0, 1]); e.g.
            ``LogitNormalTime(0.0, 1.0)`` for LightningDiT.
        shift: timestep shift ``s`` applied on top of the time sampler's own (``t' = s t / (1 + (s - 1) t)``);
            1 = none.
        cos_velocity_weight: weight of the velocity-direction (cosine) loss; 0 disables it.
        label_dropout: probability of training a sample with the null label (classifier-free guidance).
        align: representation alignment (REPA, or REG) added to the loss (``gen.objectives.align``).
        augment: ScoreAug (``gen.objectives.scoreaug``): the noisy input and the velocity target transformed together,
            the network conditioned on the transform.
    """

    def __init__(
        self,
        path: Path | None = None,
        time_sampler: TimeSampler | None = None,
        shift: float = 1.0,
        cos_velocity_weight: float = 0.0,
        label_dropout: float = 0.1,
        align: Alignment | None = None,
        augment: ScoreAug | None = None,
    ) -> None:
        super().__init__()
        self.augment = check_augment(augment, align)
        self.path = LinearPath() if path is None else path
        self.time_sampler = UniformTime() if time_sampler is None else time_sampler
        if shift != 1.0:
            if self.time_sampler.shift != 1.0:
                raise ValueError("shift given both to the objective and inside time_sampler; give it once")
            self.time_sampler.shift = float(shift)
        if cos_velocity_weight < 0:
            raise ValueError(f"cos_velocity_weight must be >= 0, got {cos_velocity_weight}")
        self.cos_velocity_weight = float(cos_velocity_weight)
        self.label_dropout = check_label_dropout(label_dropout)
        self.align = align

    def forward(self, net: nn.Module, batch: dict[str, Tensor], rng: Randomness, progress: Any = None) -> dict[str, Tensor]:
        """Per-sample losses ``{"loss", "mse"[, "cos", "repa", "reg"]}``, each ``(B,)``; ``batch["x0"]`` is (B, C, H, W)."""
        x0 = batch["x0"].float()
        eps, t, y = self.draw(x0, batch.get("label"), net.num_classes, rng)
        x_t = self.path.sample(x0, eps, t)
        target = self.path.velocity(x0, eps, t)
        out: dict[str, Tensor] = {}
        kw = {}
        if self.augment is not None:  # ScoreAug: T(x_t) against T(v), omega to the network
            x_t, target, kw["augment"] = self.augment(x_t, target, rng)
        if self.align is None:
            v_hat = net(x_t, t, y, **kw).out.float()
            loss = 0.0
        else:
            res, terms = align_terms(self.align, net, x_t, t, y, batch, self.path, rng, _call)
            v_hat, loss = res.out.float(), terms.pop("total")
            out.update(terms)
        mse = mean_flat((v_hat - target) ** 2)
        out["mse"] = mse
        loss = loss + mse
        if self.cos_velocity_weight > 0:
            cos = cosine_direction_loss(v_hat, target)
            out["cos"] = cos
            loss = loss + self.cos_velocity_weight * cos
        out["loss"] = loss
        return out

    def prediction_spec(self) -> dict[str, Any]:
        return {"path": dict(self.path.config), "prediction": "velocity", "precond": None}


def _call(net: nn.Module, x: Tensor, t: Tensor, y: Tensor | None, **kw: Any) -> Any:
    return net(x, t, y, **kw)
