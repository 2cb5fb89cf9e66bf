"""Flow matching / rectified flow with a velocity target (objectives.md Sec. 2, backbones.md Sec. 3.2).

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

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gen.objectives.base import Objective, mean_flat
from gen.paths import LinearPath, Path, TimeSampler, path_from_spec, time_sampler_from_spec


def cosine_direction_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """``1 - cos(pred, target)`` along dim 1 (channels) per position, averaged over positions: ``(B, C, ...) -> (B,)``."""
    cos = F.cosine_similarity(pred, target, dim=1, eps=eps)  # (B, H, W)
    return mean_flat(1.0 - cos)


class FlowMatching(Objective):
    """Velocity-prediction flow matching on any ``Path``; the network receives ``(x_t, t, y)`` in path time.

    Args:
        path: a ``Path`` or its spec (``{"kind": "linear"}`` by default: rectified flow).
        time_sampler: a ``TimeSampler`` or its spec, e.g. ``{"kind": "logit_normal", "mean": 0.0, "std": 1.0}``
            (default uniform on [0, 1]).
        shift: timestep shift ``s`` applied on top of the time sampler's own (``t' = s t / (1 + (s - 1) t)``);
            1 = none.
        cos_velocity_weight: weight of the velocity-direction (cosine) loss; 0 disables it.
    """

    def __init__(
        self,
        path: Path | Mapping[str, Any] | str = "linear",
        time_sampler: TimeSampler | Mapping[str, Any] | str = "uniform",
        shift: float = 1.0,
        cos_velocity_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.path = path if isinstance(path, Path) else path_from_spec(path)
        self.time_sampler = time_sampler_from_spec(time_sampler)
        if shift != 1.0:
            if self.time_sampler.shift != 1.0:
                raise ValueError("shift given both to the objective and inside time_sampler; give it once")
            self.time_sampler.shift = float(shift)
        if cos_velocity_weight < 0:
            raise ValueError(f"cos_velocity_weight must be >= 0, got {cos_velocity_weight}")
        self.cos_velocity_weight = float(cos_velocity_weight)

    def predict(self, net: nn.Module, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The network's velocity in float32 (the only place the input meets the network's dtype)."""
        return net(x_t, t, y).float()

    def forward(
        self, net: nn.Module, x0: Tensor, y: Tensor | None, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Per-sample losses ``{"loss", "mse"[, "cos"]}``, each ``(B,)``; x0 is ``(B, C, H, W)``."""
        x0 = x0.float()
        eps, t = self.sample_noise_and_time(x0, generator)
        x_t = self.path.sample(x0, eps, t)
        target = self.path.velocity(x0, eps, t)
        v_hat = self.predict(net, x_t, t, y)
        mse = mean_flat((v_hat - target) ** 2)
        out = {"mse": mse}
        loss = mse
        if self.cos_velocity_weight > 0:
            cos = cosine_direction_loss(v_hat, target)
            out["cos"] = cos
            loss = loss + self.cos_velocity_weight * cos
        out["loss"] = loss
        return out

    def prediction_spec(self) -> dict[str, Any]:
        return {"path": self.path.spec(), "prediction": "velocity", "precond": None}


class RectifiedFlow(FlowMatching):
    """Flow matching on the linear path (rectified flow): ``x_t = (1 - t) x0 + t eps``, target ``eps - x0``."""

    def __init__(
        self,
        time_sampler: TimeSampler | Mapping[str, Any] | str = "uniform",
        shift: float = 1.0,
        cos_velocity_weight: float = 0.0,
    ) -> None:
        super().__init__(LinearPath(), time_sampler, shift, cos_velocity_weight)
