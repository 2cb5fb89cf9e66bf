"""2-rectified flow++: reflow on a teacher's fixed noise-image pairs (Lee, Lin & Fanti 2024, "Improving the Training of
Rectified Flows", NeurIPS; official code sangyun884/rfpp, ``train.py``, ``t_dist.py``, ``generate.py``).

The teacher (1-rectified flow: a flow-matching snapshot, ``x_t = (1 - t) x0 + t eps``, or an EDM snapshot read as
one, as the paper does with EDM's models: ``gen.models.precond.EDMFlowPrecond``) draws pairs ``(z, x)`` once
(``python -m distill.pairs``, ``data=pairs``); the student starts from the teacher's weights (``trainer.init``) and
learns the straight coupling between them. One step, per pair:

1. ``t`` from the U-shaped density ``prop. to exp(a t) + exp(a (1 - t))`` on ``[1e-5, 1 - 1e-5]`` (a = 4; paper Sec. 4.1,
   ``gen.paths.UShapedTime``): most mass near both ends, where the reflow loss is largest.
2. ``x_t = (1 - t) x + t z``, ``v = v_theta(x_t, t, y)``, target ``z - x``, one-step estimate ``x_hat = x_t - t v``.
3. Loss (``loss``):
   * ``"huber"``: ``H(v, z - x)``, the pseudo-Huber distance with ``huber_c`` (``distill.losses``; default the
     reference code's ``c = 0.00054 D`` with the 1/D normalisation, see there for iCT's ``sqrt(D)``);
   * ``"lpips-huber"``: ``(1 - t) H(v, z - x) + LPIPS(x_hat, x) / t^k`` with ``k = 1`` when ``lpips_divt`` (the CIFAR-10
     recipe) else 0 (ImageNet-64), ``t`` floored at ``t_floor`` for the division (the 1/t weight explodes at t -> 0);
   * ``"l2"``: mean squared error (vanilla reflow, the paper's config A).

Sampling (``configs/sampler/reflow_*.yaml``): Euler with 1 or 2 steps, or the noise-reusing update
(``samplers.sample_reuse_noise``). The student snapshot stores its sampler and a ``distill`` section (teacher path and
SHA-256, the solvers it serves) so that ``sample.py`` and ``python -m eval`` use it without flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.losses import HuberRule, pseudo_huber, resolve_huber_c
from distill.teacher import (
    TeacherError,
    check_same_teacher,
    check_student_sampler,
    check_teacher,
    open_teacher,
)
from gen.models.precond import EDMFlowPrecond
from gen.objectives.base import check_label_dropout, drop_labels
from gen.paths import LinearPath, UShapedTime
from gen.train.method import Batch, Method, OptimizerFactory, OptimizerSpec, Progress
from gen.utils.frozen import hold_frozen
from gen.utils.seed import Randomness, SampleRandom

# Deterministic ODE solvers a reflow student serves (an SDE or consistency sampler cannot).
REFLOW_SOLVERS = ("samplers.sample_euler", "samplers.sample_heun", "samplers.sample_reuse_noise",
                  "samplers.sample_dpmpp_2m")


def rfpp_loss(v: Tensor, x: Tensor, z: Tensor, t: Tensor, c: float, *, x_hat_distance: Tensor | None = None,
              divt: bool = False, t_floor: float = 1e-5, normalise: bool = True) -> dict[str, Tensor]:
    """The per-sample 2-RF++ loss (module docstring, step 3) from the velocity ``v`` (B, C, H, W).

    Args:
        v: predicted velocity at ``x_t``. x, z: the pair (image, noise). t: times (B,).
        c: the pseudo-Huber constant; ``normalise`` divides the distance by D (the reference's convention).
        x_hat_distance: LPIPS(x_hat, x) (B,) for ``"lpips-huber"``; None: the Huber term alone, unweighted.
        divt: divide the perceptual term by ``max(t, t_floor)``.

    Returns:
        ``{"loss", "huber", "perceptual"}``, each (B,).
    """
    h = pseudo_huber(v, z - x, c, normalise=normalise)
    if x_hat_distance is None:
        return {"loss": h, "huber": h.detach(), "perceptual": torch.zeros_like(h)}
    w = 1.0 / t.float().clamp(min=t_floor) if divt else torch.ones_like(h)
    return {"loss": (1.0 - t.float()) * h + w * x_hat_distance, "huber": h.detach(),
            "perceptual": x_hat_distance.detach()}


def edm_flow_precond(prediction: Mapping[str, Any], source: str = "the teacher") -> dict[str, float]:
    """``EDMFlowPrecond``'s settings from an EDM teacher's prediction spec: its sigma_data and its path's sigma_max.

    Raises:
        TeacherError: the teacher's preconditioning is not EDM's (``EDMFlowPrecond`` rewrites exactly that one).
    """
    precond = prediction.get("precond") or {}
    if precond.get("_target_") != "gen.models.precond.EDMPrecond":
        raise TeacherError(f"reflow: teacher {source} is an x0 model on the EDM path with preconditioning "
                           f"{precond.get('_target_')!r}; an EDM teacher must use gen.models.precond.EDMPrecond "
                           "(an objective=edm snapshot)")
    return {"sigma_data": float(precond.get("sigma_data", 0.5)),
            "sigma_max": float((prediction.get("path") or {}).get("sigma_max", 80.0))}


class Reflow(Method):
    """2-rectified flow++ on stored pairs (module docstring); trainable ``net`` (the student).

    Args:
        net: the student backbone (the teacher's architecture; ``trainer.init={net: <teacher>}``).
        optimizer: the ``optim`` group's optimizer factory.
        teacher: the teacher's snapshot file (checked: data, resolution, a flow-matching velocity model or an EDM
            model, whose network then runs inside ``EDMFlowPrecond`` with the teacher's sigma_data and sigma_max;
            recorded by SHA-256 in the snapshot and the training state, and checked on resume).
        loss: ``"huber"``, ``"lpips-huber"`` or ``"l2"``.
        huber_c: ``"rfpp"`` (0.00054 D, divided by D), ``"ict"`` (0.00054 sqrt(D), not divided) or a number (divided).
        perceptual: the perceptual distance module of ``"lpips-huber"`` (``distill.perceptual.Resized`` around ``gen.nn.lpips.LPIPS``, or a stand-in).
        lpips_divt: divide the perceptual term by t (CIFAR-10 recipe).
        time_a, time_eps: the U-shaped time density's a and its margin.
        label_dropout: classifier-free guidance label dropout (0 in the paper).
        data_name, image_resolution, image_channels: the run's data (set by train.py; checked against the teacher's).
    """

    data_keys = ("x", "noise")
    flip_keys = ("x", "noise")  # a mirrored image keeps its mirrored noise

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, teacher: str,
                 loss: Literal["huber", "lpips-huber", "l2"] = "huber", huber_c: HuberRule | float = "rfpp",
                 perceptual: nn.Module | None = None, lpips_divt: bool = False, time_a: float = 4.0,
                 time_eps: float = 1e-5, label_dropout: float = 0.0, data_name: str | None = None,
                 image_resolution: int | None = None, image_channels: int | None = None) -> None:
        super().__init__()
        if loss not in ("huber", "lpips-huber", "l2"):
            raise ValueError(f"method.loss must be 'huber', 'lpips-huber' or 'l2', got {loss!r}")
        if (loss == "lpips-huber") != (perceptual is not None):
            raise ValueError("method.loss='lpips-huber' needs method.perceptual (e.g. distill.perceptual.Resized around gen.nn.lpips.LPIPS) and "
                             "the other losses take none; set both or neither")
        huber_c_value = huber_c if isinstance(huber_c, str) else float(huber_c)
        resolve_huber_c(1, huber_c_value)  # refuses an unknown rule or a negative c now, not at the first step
        snap = open_teacher(teacher)
        kind = check_teacher(snap.config, teacher, data_name=data_name, resolution=image_resolution,
                             channels=image_channels, kinds=("flow", "edm"), method="reflow")
        self.teacher_ref = {"path": str(teacher), "sha256": snap.sha256}
        self.net, self._optimizer, self.path = net, optimizer, LinearPath()
        self.precond = edm_flow_precond(snap.config["prediction"], str(teacher)) if kind == "edm" else None
        self.loss_kind, self.huber_rule, self.lpips_divt = loss, huber_c_value, bool(lpips_divt)
        self.time_sampler = UShapedTime(time_a, time_eps)
        self.label_dropout = check_label_dropout(label_dropout)
        if perceptual is not None:
            hold_frozen(self, "perceptual", perceptual)

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("net", ("net",), self._optimizer)]

    def prepare_batch(self, raw: Mapping[str, Tensor], tokenizer: Any, rng: SampleRandom, hflip: bool,
                      device: torch.device) -> Batch:
        """``{"x0": teacher endpoint, "noise", "label", "position"}`` on ``device``; with ``hflip`` each pair is
        mirrored together (one uniform from the sample's stream)."""
        batch = {k: v.to(device) for k, v in raw.items()}
        if hflip:
            flip = (rng.rand().to(device) < 0.5).view(-1, 1, 1, 1)
            for key in self.flip_keys:
                batch[key] = torch.where(flip, batch[key].flip(-1), batch[key])
        batch["x0"] = batch.pop("x").float()
        return batch

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "huber", "perceptual", "t"}``. Draws per sample, in order: t (two uniforms), label drop."""
        x, z = batch["x0"].float(), batch["noise"].float()
        t = self.time_sampler(rng).to(x.device).float()  # (B,)
        y = drop_labels(batch["label"], self.label_dropout, self.net.num_classes, rng)
        x_t = self.path.sample(x, z, t)
        v = self.velocity(x_t, t, y)
        if self.loss_kind == "l2":
            mse = (v - (z - x)).square().flatten(1).mean(1)
            return {"loss": mse, "huber": mse.detach(), "perceptual": torch.zeros_like(mse), "t": t}
        numel = x[0].numel()
        c = resolve_huber_c(numel, self.huber_rule)
        normalise = self.huber_rule != "ict"
        lp = None
        if self.loss_kind == "lpips-huber":
            x_hat = x_t - t.view(-1, 1, 1, 1) * v
            lp = self.perceptual(x_hat, x)
        return {**rfpp_loss(v, x, z, t, c, x_hat_distance=lp, divt=self.lpips_divt, normalise=normalise), "t": t}

    def velocity(self, x_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        """The student's velocity (B, C, H, W) float32: the network's output, or through ``EDMFlowPrecond``."""
        if self.precond is None:
            return self.net(x_t, t, y).out.float()
        return EDMFlowPrecond(self.net, **self.precond)(x_t, t, y).out.float()

    def extra_state(self) -> dict[str, Any]:
        return {"teacher": dict(self.teacher_ref)}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        check_same_teacher(state.get("teacher"), self.teacher_ref)

    def snapshot_config(self) -> dict[str, Any]:
        return {"model": dict(self.net.config),
                "prediction": {"path": dict(self.path.config), "prediction": "velocity",
                               "precond": None if self.precond is None else
                               {"_target_": "gen.models.precond.EDMFlowPrecond", **self.precond}},
                "distill": {"method": "reflow", "teacher": dict(self.teacher_ref), "solvers": list(REFLOW_SOLVERS)}}

    def check_sampler(self, sampler: Mapping[str, Any]) -> None:
        check_student_sampler(sampler, REFLOW_SOLVERS, "reflow", "reflow_1step")
