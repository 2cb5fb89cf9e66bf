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
from gen.objectives.align import Alignment, align_terms
from gen.objectives.base import Objective, check_augment, check_label_dropout, mean_flat, sum_flat
from gen.objectives.scoreaug import ScoreAug
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
        align: REPA added to the loss (``gen.objectives.align``); the backbone's tokens are those of the
            preconditioned call. REG is not offered here: its class token would need its own preconditioning.
    """

    def __init__(
        self,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        sigma_data: float = 0.5,
        sigma_max: float = 80.0,
        label_dropout: float = 0.1,
        align: Alignment | None = None,
        augment: ScoreAug | None = None,
    ) -> None:
        super().__init__()
        self.augment = check_augment(augment, align)
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.path = EDMPath(sigma_max)
        self.time_sampler = LogNormalSigma(p_mean, p_std)
        self.sigma_data = float(sigma_data)
        self.label_dropout = check_label_dropout(label_dropout)
        if align is not None and align.reg:
            raise ValueError("REG is defined for flow matching (objective=rectified_flow); with EDM use REPA (align=repa)")
        self.align = align

    def forward(self, net: nn.Module, batch: dict[str, Tensor], rng: Randomness, progress: Any = None) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "mse", "sigma"}``, each ``(B,)``.

        ``loss`` is ``lambda(sigma) * sum((D - x0)^2)`` over the elements of a sample (EDM's reduction); ``mse`` is
        the unweighted squared error averaged over elements, logged for comparison with other objectives.
        """
        x0 = batch["x0"].float()
        eps, sigma, y = self.draw(x0, batch.get("label"), net.num_classes, rng)
        x_noisy = self.path.sample(x0, eps, sigma)
        precond = EDMPrecond(net, self.sigma_data)
        out: dict[str, Tensor] = {}
        kw = {}
        if self.augment is not None:  # ScoreAug: D(T(x + sigma n)) against T(x0); c_skip T(x_noisy) stays consistent
            x_noisy, x0, kw["augment"] = self.augment(x_noisy, x0, rng)
        if self.align is None:
            denoised, extra = precond(x_noisy, sigma, y, **kw).out, 0.0
        else:
            res, terms = align_terms(self.align, precond, x_noisy, sigma, y, batch, self.path, rng,
                                     lambda f, x, t, yy, **kw: f(x, t, yy, **kw))
            denoised, extra = res.out, terms.pop("total")
            out.update(terms)
        sq = (denoised - x0) ** 2
        loss = edm_loss_weight(sigma, self.sigma_data) * sum_flat(sq) + extra
        return {"loss": loss, "mse": mean_flat(sq), "sigma": sigma.detach(), **out}

    def prediction_spec(self) -> dict[str, Any]:
        return {
            "path": dict(self.path.config),
            "prediction": "x0",
            "precond": {"_target_": "gen.models.precond.EDMPrecond", "sigma_data": self.sigma_data},
        }
