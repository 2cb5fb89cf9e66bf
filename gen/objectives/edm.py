"""EDM training loss (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Sec. 5 and Table 1; NVlabs/edm training/loss.py ``EDMLoss``).

``ln sigma ~ N(P_mean, P_std^2)``, ``x_sigma = x0 + sigma eps``, per-sample loss
``lambda(sigma) * sum over elements of (D(x_sigma, sigma) - x0)^2`` with ``lambda = (sigma^2 + sd^2) / (sigma sd)^2``
and D the ``EDMPrecond`` wrapper.

Reduction: a *sum* over the C*H*W elements of each sample, as EDM does (training/loss.py returns the unreduced
weighted error, training/training_loop.py backpropagates ``loss.sum() / batch``); the training loop then averages
over the batch. Gradients therefore have EDM's scale, so EDM's learning rates, Adam epsilon and (absent) gradient
clipping carry over unchanged. Flow matching instead averages over elements (``gen.objectives.flow_matching``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gen.models.precond import EDMPrecond
from gen.objectives.base import Objective, check_label_dropout, mean_flat, sum_flat
from gen.paths import EDMPath, LogNormalSigma
from gen.utils.seed import Randomness


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``: unit effective weight on F's target (EDM Eq. 8)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMLoss(Objective):
    """EDM denoising loss with preconditioning; the network is the bare backbone F.

    Args:
        p_mean: mean of ln sigma.
        p_std: standard deviation of ln sigma.
        sigma_data: data standard deviation used by the preconditioning and the weight.
        sigma_max: largest noise level used at sampling time (the path's ``t_max``; stored in the spec).
        label_dropout: probability of training a sample with the null label (classifier-free guidance).
    """

    def __init__(
        self,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_data: float = 0.5,
        sigma_max: float = 80.0,
        label_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.path = EDMPath(sigma_max)
        self.time_sampler = LogNormalSigma(p_mean, p_std)
        self.sigma_data = float(sigma_data)
        self.label_dropout = check_label_dropout(label_dropout)

    def forward(self, net: nn.Module, batch: dict[str, Tensor], rng: Randomness, progress: Any = None) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "mse", "sigma"}``, each ``(B,)``.

        ``loss`` is ``lambda(sigma) * sum((D - x0)^2)`` over the elements of a sample (EDM's reduction); ``mse`` is
        the unweighted squared error averaged over elements, logged for comparison with other objectives.
        """
        x0 = batch["x0"].float()
        eps, sigma, y = self.draw(x0, batch.get("label"), net.num_classes, rng)
        x_noisy = self.path.sample(x0, eps, sigma)
        denoised = EDMPrecond(net, self.sigma_data)(x_noisy, sigma, y).out
        sq = (denoised - x0) ** 2
        loss = edm_loss_weight(sigma, self.sigma_data) * sum_flat(sq)
        return {"loss": loss, "mse": mean_flat(sq), "sigma": sigma.detach()}

    def prediction_spec(self) -> dict[str, Any]:
        return {
            "path": dict(self.path.config),
            "prediction": "x0",
            "precond": {"_target_": "gen.models.precond.EDMPrecond", "sigma_data": self.sigma_data},
        }
