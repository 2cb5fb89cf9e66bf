"""Consistency distillation, CD (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", Algorithm 2; official code
openai/consistency_models, ``cm/karras_diffusion.py`` ``consistency_losses`` and ``heun_solver``).

The student ``f_theta(x, sigma)`` (boundary parameterisation, ``f(x, sigma_min) = x``) starts from the teacher's
weights (``trainer.init``) and learns to agree with its EMA target one teacher ODE step earlier. One step, per sample,
in EDM sigma (``x = x0 + sigma z``):

1. Karras levels ``sigma_1 < ... < sigma_N`` (rho = 7); ``n ~ U{1..N-1}``; ``x_hi = x0 + sigma_{n+1} z``.
2. The teacher's **Heun** step of the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma`` from
   ``sigma_{n+1}`` to ``sigma_n`` (EDM Algorithm 1, one step; ``D`` is the teacher's clean-image estimate in its own
   path time, ``distill.teacher.Teacher.denoise``): ``x_lo``. The teacher runs under ``no_grad``.
3. ``student = f_theta(x_hi, sigma_{n+1})``; ``target = f_ema(x_lo, sigma_n)`` with the same dropout mask (the RNG
   state is restored, as iCT/ECT do), no gradient. ``ema`` is the target profile of the method's EMA (0.95 in the
   ImageNet-64 recipe).
4. Loss ``d(student, target)`` with ``lambda = 1``: ``"l2"`` (mean squared error), ``"huber"`` (pseudo-Huber on the
   whole sample, iCT's ``c = 0.00054 sqrt(D)`` by default), or ``"lpips"`` (a perceptual distance module).

The consistency function is ECT's: ``FlowConsistencyPrecond`` around a flow-matching teacher's velocity network, or
``ConsistencyPrecond`` around an EDM teacher's, so the snapshot is a consistency model on the EDM path sampled by
``samplers.sample_consistency`` (``sampler=consistency`` / ``consistency_2step``) with no flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.losses import HuberRule, pseudo_huber, resolve_huber_c
from distill.teacher import Teacher, check_same_teacher, check_student_sampler, check_teacher, load_teacher
from gen.ema import EMAFactory
from gen.models.precond import ConsistencyPrecond, FlowConsistencyPrecond
from gen.objectives.base import check_label_dropout, drop_labels
from gen.objectives.consistency import karras_levels, rng_states, set_rng_states
from gen.paths import EDMPath
from gen.train.method import Batch, Method, OptimizerFactory, OptimizerSpec, Progress
from gen.utils.frozen import hold_frozen
from gen.utils.seed import Randomness

CD_SOLVERS = ("samplers.sample_consistency",)


def teacher_heun_step(teacher: Teacher, x: Tensor, s_hi: Tensor, s_lo: Tensor, y: Tensor | None) -> Tensor:
    """One Heun step of ``dx/dsigma = (x - D(x, sigma)) / sigma`` from ``s_hi`` to ``s_lo`` (B,), in EDM sigma space.

    ``D`` is the teacher's clean-image estimate: the EDM state ``x`` is its path's ``x_t = alpha(t) x`` at
    ``t = t(sigma)`` (``Path.t_from_noise_ratio``), so any teacher path serves (EDM: alpha = 1, t = sigma; flow:
    ``t = sigma / (1 + sigma)``, ``alpha = 1 / (1 + sigma)``). Returns (B, C, H, W) float32.
    """
    path = teacher.path
    bshape = (-1,) + (1,) * (x.ndim - 1)

    def denoise(xs: Tensor, sigma: Tensor) -> Tensor:
        t = path.t_from_noise_ratio(sigma.double())
        a = path.alpha(t).reshape(bshape)
        return teacher.denoise((a * xs.double()).float(), t.float(), y).double()

    x = x.double()
    h = (s_lo - s_hi).double().reshape(bshape)
    d = (x - denoise(x, s_hi)) / s_hi.double().reshape(bshape)
    x_euler = x + h * d
    d_next = (x_euler - denoise(x_euler, s_lo)) / s_lo.double().reshape(bshape)
    return (x + 0.5 * h * (d + d_next)).float()


class ConsistencyDistillation(Method):
    """CD from a frozen teacher (module docstring); trainable ``net``, EMA profiles from ``target_ema``.

    Args:
        net: the student backbone (the teacher's architecture; ``trainer.init={net: <teacher>}``).
        optimizer: the ``optim`` group's optimizer factory.
        teacher: the teacher's snapshot (flow-matching velocity or EDM x0 model of the run's data).
        target_ema: the EMA factory (``_partial_`` ``gen.ema.EMA``); its first profile goes into snapshots.
        target_profile: the profile read as the target network (e.g. ``d0.95``; None: the first).
        num_levels: N of the Karras grid (18 CIFAR-10, 40 ImageNet-64).
        sigma_min, sigma_max, rho, sigma_data: the grid and the EDM parameterisation (0.002, 80, 7, 0.5).
        metric: ``"l2"``, ``"huber"`` or ``"lpips"``; huber_c: ``"ict"``, ``"rfpp"`` or a number.
        perceptual: the distance module of ``metric="lpips"``.
        label_dropout: null-label rate (0 in the paper).
        data_name, image_resolution, image_channels: the run's data (set by train.py; checked against the teacher's).
    """

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, teacher: str, target_ema: EMAFactory,
                 target_profile: str | None = None, num_levels: int = 40, sigma_min: float = 0.002,
                 sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5,
                 metric: Literal["l2", "huber", "lpips"] = "l2", huber_c: HuberRule | float = "ict",
                 perceptual: nn.Module | None = None, label_dropout: float = 0.0, data_name: str | None = None,
                 image_resolution: int | None = None, image_channels: int | None = None) -> None:
        super().__init__()
        if metric not in ("l2", "huber", "lpips"):
            raise ValueError(f"method.metric must be 'l2', 'huber' or 'lpips', got {metric!r}")
        if (metric == "lpips") != (perceptual is not None):
            raise ValueError("method.metric='lpips' needs method.perceptual and the other metrics take none")
        if num_levels < 2 or not 0 < sigma_min < sigma_max:
            raise ValueError(f"method: need num_levels >= 2 and 0 < sigma_min < sigma_max, got {num_levels}, "
                             f"{sigma_min}, {sigma_max}")
        resolve_huber_c(1, huber_c)
        teach = load_teacher(teacher)
        self.kind = check_teacher(teach.config, teacher, data_name=data_name, resolution=image_resolution,
                                  channels=image_channels, kinds=("flow", "edm"), method="cd")
        hold_frozen(self, "teacher", teach.net)
        self._teacher = teach
        self.teacher_ref = teach.identity()
        self.net, self._optimizer, self._target_ema = net, optimizer, target_ema
        self.target_profile = target_profile
        self.sigmas = karras_levels(int(num_levels), sigma_min, sigma_max, rho)  # ascending, float64
        self.sigma_min, self.sigma_data = float(sigma_min), float(sigma_data)
        self.metric, self.huber_rule = metric, huber_c
        self.label_dropout = check_label_dropout(label_dropout)
        self.path = EDMPath(sigma_max)
        if perceptual is not None:
            hold_frozen(self, "perceptual", perceptual)

    def ema_specs(self, default: EMAFactory) -> dict[str, EMAFactory]:
        return {"net": self._target_ema}

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("net", ("net",), self._optimizer)]

    def consistency_fn(self, net: nn.Module) -> nn.Module:
        if self.kind == "flow":
            return FlowConsistencyPrecond(net, self.sigma_min)
        return ConsistencyPrecond(net, self.sigma_data, self.sigma_min)

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """The metric ``d(a, b)`` per sample, (B, C, H, W) x2 -> (B,)."""
        if self.metric == "l2":
            return (a - b).square().flatten(1).mean(1)
        if self.metric == "huber":
            c = resolve_huber_c(a[0].numel(), self.huber_rule)
            return pseudo_huber(a, b, c, normalise=self.huber_rule == "rfpp")
        return self.perceptual(a, b)

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "sigma"}``. Draws per sample, in order: the level uniform, z, the label drop."""
        x0 = batch["x0"].float()
        dev = x0.device
        n = (rng.rand(dtype=torch.float64) * (len(self.sigmas) - 1)).long().clamp(max=len(self.sigmas) - 2)
        z = rng.randn(*x0.shape[1:]).to(dev)
        y = drop_labels(batch["label"], self.label_dropout, self.net.num_classes, rng)
        s_lo, s_hi = self.sigmas[n].to(dev), self.sigmas[n + 1].to(dev)  # (B,) float64
        bshape = (-1,) + (1,) * (x0.ndim - 1)
        x_hi = (x0.double() + s_hi.reshape(bshape) * z.double()).float()
        with torch.no_grad():
            x_lo = teacher_heun_step(self._teacher, x_hi, s_hi, s_lo, y)
        states = rng_states(dev)
        student = self.consistency_fn(self.net)(x_hi, s_hi.float(), y).out.float()
        after = rng_states(dev)
        set_rng_states(states, dev)  # the same dropout mask in the target pass
        with torch.no_grad():
            target_net = self.averaged("net", self.target_profile)
            target = self.consistency_fn(target_net)(x_lo, s_lo.float(), y).out.float()
        set_rng_states(after, dev)
        return {"loss": self.distance(student, target), "sigma": s_hi.float()}

    def extra_state(self) -> dict[str, Any]:
        return {"teacher": dict(self.teacher_ref)}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        check_same_teacher(state.get("teacher"), self.teacher_ref)

    def snapshot_config(self) -> dict[str, Any]:
        if self.kind == "flow":
            precond = {"_target_": "gen.models.precond.FlowConsistencyPrecond", "sigma_min": self.sigma_min}
        else:
            precond = {"_target_": "gen.models.precond.ConsistencyPrecond", "sigma_data": self.sigma_data,
                       "sigma_min": self.sigma_min}
        return {"model": dict(self.net.config),
                "prediction": {"path": dict(self.path.config), "prediction": "consistency", "precond": precond},
                "distill": {"method": "cd", "teacher": dict(self.teacher_ref), "solvers": list(CD_SOLVERS)}}

    def check_sampler(self, sampler: Mapping[str, Any]) -> None:
        check_student_sampler(sampler, CD_SOLVERS, "consistency-distilled", "consistency")
