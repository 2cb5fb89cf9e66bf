"""ECT, easy consistency tuning (Geng et al. 2024, "Consistency Models Made Easy"; official code locuslab/ect,
``training/loss.py`` ``ECMLoss`` and ``ct_train.py`` / ``training/ct_training_loop.py`` for the stage schedule, at
``main`` 4311059; ImageNet details from its ``imgnet`` branch, 75aa88a). ``bench/objectives_equivalence.py`` runs
this loss against ``ECMLoss`` on the same draws (bench/README.md, "Consistency objectives and averaging against the
official code"): equal to float32 rounding when the official network uses its evaluation coefficients.

Continuous-time consistency training started from a diffusion snapshot (``trainer.init={net: <snapshot>}``):

1. ``t = exp(P_mean + P_std xi)``, xi ~ N(0, 1) (EDM's lognormal; paper Sec. 3).
2. ``r = max(0, t (1 - q^-(s+1) (1 + k sigmoid(-b t))))`` (the paper's mapping with ``Delta t`` shrinking as the
   stage s grows), ``s = floor(nimg / stage_nimg)`` from the method's ``Progress``. Early stages: r far below t
   (diffusion-like targets); later r -> t (consistency).
3. Shared noise: ``x_t = x0 + t eps``, ``x_r = x0 + r eps``. Student ``f(x_t, t)``; target ``stopgrad f(x_r, r)``
   from the same network with the same dropout mask (RNG restored); where ``r = 0`` the target is ``x0``; NaNs in the
   target are zeroed (as the official loss does).
4. Per-sample loss ``(sqrt(||f_t - f_r||^2 + c^2) - c) / (t - r)`` (adaptive weighting with c; c = 0 is the plain
   L2 norm, the official CIFAR-10 default). ``weighting="edm"`` multiplies by EDM's
   ``lambda(t) = (t^2 + sd^2) / (t sd)^2`` instead of ``1 / (t - r)`` (the official ``imgnet`` branch).

Teachers (``teacher``): ``"edm"`` (an EDM snapshot, ``x0`` prediction with EDM preconditioning; the consistency
function is ``ConsistencyPrecond``, which shares EDM's c_in and c_noise and shifts c_skip/c_out to the boundary) or
``"flow"`` (a rectified-flow velocity snapshot on ``LinearPath``; ``FlowConsistencyPrecond`` rescales
``x_t = x / (1 + sigma)``, ``t_flow = sigma / (1 + sigma)`` and uses ``f = x / (1 + d) - d / (1 + d) v``,
``d = sigma - sigma_min``). Either way ``f(x, sigma_min) = x`` and ECT runs in EDM sigma, so the snapshot records
a consistency model on the EDM path and ``sample.py`` uses the consistency sampler with no flags.

Deviation (kept): the official code trains with EDM's unshifted coefficients (``ECMPrecond`` in train mode, locuslab/ect
``training/networks.py``) and switches to the boundary-shifted ones, with ``sigma_min = 0.003``, only for evaluation;
here training and sampling use one boundary-shifted function with ``sigma_min = 0.002`` (CM/iCT's level, the one our
consistency sampler and iCT use), so the sampler evaluates exactly the function the loss shaped. Measured on a tiny
network (bench/README.md): the per-sample loss differs from the official training loss by up to 2.2 % at stage 0
and 0.16 % at stage 3 (the 1/(t - r) weight magnifies the O(sigma_min) change at small t); at the sampling levels
(sigma 0.821 and 80) our function differs from the official evaluation function by 0.19 % of its output, less than
the official train -> eval switch itself changes it (0.58 %).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gen.models.precond import ConsistencyPrecond, FlowConsistencyPrecond
from gen.objectives.base import Objective, check_label_dropout, drop_labels, mean_flat
from gen.objectives.consistency import rng_states, set_rng_states
from gen.paths import EDMPath, LogNormalSigma
from gen.utils.seed import Randomness

# What each teacher kind's snapshot stores as its prediction spec (checked by ``check_start``).
TEACHER_PREDICTIONS = {"flow": ("velocity", "gen.paths.LinearPath"), "edm": ("x0", "gen.paths.EDMPath")}


def ect_stage(nimg: int, stage_nimg: int) -> int:
    """Stage ``s = floor(nimg / stage_nimg)`` (official code: ``stage = cur_tick // double``, in images here).

    The official loop (locuslab/ect ``training/ct_training_loop.py``) changes stage at the end of a tick, and its tick 0
    is a single batch, so its stage s starts one batch after ``s * stage_nimg`` (3,200,128 images for CIFAR-10's batch
    128): one step per stage boundary differs, which is not worth copying the tick bookkeeping for.
    """
    if stage_nimg < 1:
        raise ValueError(f"ect stage length must be >= 1 image, got {stage_nimg}")
    return int(nimg) // int(stage_nimg)


def ect_r(t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0) -> Tensor:
    """``r(t) = max(0, t (1 - q^-(s+1) (1 + k sigmoid(-b t))))`` (ECT paper Sec. 3, locuslab/ect loss.py ``t_to_r``)."""
    decay = float(q) ** -(int(stage) + 1)
    return (t * (1.0 - decay * (1.0 + k * torch.sigmoid(-b * t)))).clamp(min=0.0)


def adaptive_l2(a: Tensor, b: Tensor, c: float) -> Tensor:
    """``sqrt(||a - b||^2 + c^2) - c`` over each whole sample, (B, ...) x2 -> (B,); c = 0: the L2 norm.

    The squared norm is floored at 1e-30 so that the gradient of ``sqrt`` stays finite when ``a == b``."""
    sq = (a - b).reshape(a.shape[0], -1).pow(2).sum(dim=1)
    return (sq.clamp(min=1e-30) + c * c).sqrt() - c


class EasyConsistencyTuning(Objective):
    """ECT from a diffusion snapshot (module docstring for the step); the network is the bare backbone.

    Args:
        teacher: the kind of snapshot tuned from, ``"flow"`` (velocity, LinearPath) or ``"edm"`` (EDM x0).
        sigma_min, sigma_max: the boundary level and the sampler's starting level (0.002, 80; EDM/CM).
        sigma_data: EDM data std (0.5), used by the ``edm`` teacher and by ``weighting="edm"``.
        p_mean, p_std: lognormal t (-1.1, 2.0 on CIFAR-10; -0.8, 1.6 on the ImageNet branch).
        q, k, b: the mapping's parameters (q = 2 CIFAR-10 / 4 ImageNet branch, k = 8, b = 1).
        stage_kimg: images per stage in kimg (CIFAR-10: 250 ticks x 12.8 kimg = 3200).
        huber_c: c of the adaptive weighting (0: plain L2 norm, official default).
        weighting: ``"inv_dt"`` 1/(t - r) (CIFAR-10) or ``"edm"`` EDM's lambda(t) (ImageNet branch).
        label_dropout: null-label rate (0 in the paper).
        align: must be None.
    """

    def __init__(
        self,
        teacher: Literal["flow", "edm"] = "flow",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        q: float = 2.0,
        k: float = 8.0,
        b: float = 1.0,
        stage_kimg: float = 3200.0,
        huber_c: float = 0.0,
        weighting: Literal["inv_dt", "edm"] = "inv_dt",
        label_dropout: float = 0.0,
        align: Any = None,
    ) -> None:
        super().__init__()
        if align is not None:
            raise ValueError("objective=ect does not take representation alignment; use align=none")
        if teacher not in TEACHER_PREDICTIONS:
            raise ValueError(f"objective.teacher must be one of {sorted(TEACHER_PREDICTIONS)}, got {teacher!r}")
        if weighting not in ("inv_dt", "edm"):
            raise ValueError(f"objective.weighting must be 'inv_dt' or 'edm', got {weighting!r}")
        if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
            raise ValueError(f"objective: need 0 < sigma_min < sigma_max (finite), got {sigma_min}, {sigma_max}")
        if not (sigma_data > 0 and p_std > 0 and q > 1 and k >= 0 and stage_kimg > 0 and huber_c >= 0):
            raise ValueError("objective: need sigma_data > 0, p_std > 0, q > 1, k >= 0, stage_kimg > 0, huber_c >= 0")
        self.teacher, self.weighting = teacher, weighting
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.q, self.k, self.b = float(q), float(k), float(b)
        self.stage_nimg = max(int(round(float(stage_kimg) * 1000)), 1)
        self.huber_c = float(huber_c)
        self.label_dropout = check_label_dropout(label_dropout)
        self.path = EDMPath(sigma_max)
        self.time_sampler = LogNormalSigma(p_mean, p_std)

    def status(self, progress: Any) -> dict[str, float]:
        """The training log's view of the schedule: the stage of r(t) at ``progress``."""
        return {"ect_stage": float(self.stage(progress))}

    def stage(self, progress: Any) -> int:
        """The stage at this progress (0 when ``progress`` is None)."""
        return 0 if progress is None else ect_stage(progress.nimg, self.stage_nimg)

    def consistency_fn(self, net: nn.Module) -> nn.Module:
        if self.teacher == "flow":
            return FlowConsistencyPrecond(net, self.sigma_min)
        return ConsistencyPrecond(net, self.sigma_data, self.sigma_min)

    def check_start(self, snapshot_config: Mapping[str, Any], data_name: str) -> None:
        """Refuse a start snapshot of another dataset or of another teacher kind (one-line ``ValueError``)."""
        data = snapshot_config.get("data") or {}
        if data.get("name") != data_name:
            raise ValueError(f"objective=ect: the start snapshot was trained on data '{data.get('name')}', not on "
                             f"'{data_name}'; tune from a snapshot of the same dataset")
        pred = snapshot_config.get("prediction") or {}
        kind, path = TEACHER_PREDICTIONS[self.teacher]
        got = (pred.get("prediction"), (pred.get("path") or {}).get("_target_"))
        if got != (kind, path):
            raise ValueError(f"objective=ect with teacher={self.teacher} needs a {kind} snapshot on {path}, got "
                             f"{got[0]} on {got[1]}; set objective.teacher (flow or edm) to the snapshot's kind")

    def forward(self, net: nn.Module, batch: dict[str, Tensor], rng: Randomness, progress: Any = None) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "l2", "sigma", "r", "mse"}``, each ``(B,)``. Draws, in order: xi, eps, label drop."""
        x0 = batch["x0"].float()
        dev = x0.device
        t = (self.p_mean + self.p_std * rng.randn().double()).exp().to(dev)  # (B,) float64
        r = ect_r(t, self.stage(progress), self.q, self.k, self.b)
        eps = rng.randn(*x0.shape[1:]).to(dev)
        y = batch.get("label")
        if y is not None:
            y = drop_labels(y, self.label_dropout, net.num_classes, rng)
        bshape = (-1,) + (1,) * (x0.ndim - 1)
        x_t = (x0.double() + t.reshape(bshape) * eps.double()).float()
        x_r = (x0.double() + r.reshape(bshape) * eps.double()).float()
        f = self.consistency_fn(net)
        states = rng_states(dev)
        student = f(x_t, t.float(), y).out.float()
        after = rng_states(dev)
        target = x0
        if bool((r > 0).any()):
            set_rng_states(states, dev)  # the same dropout mask in the target pass
            with torch.no_grad():
                d_r = torch.nan_to_num(f(x_r, r.float().clamp(min=self.sigma_min), y).out.float().detach())
            target = torch.where((r > 0).reshape(bshape), d_r, x0)
        set_rng_states(after, dev)
        dist = adaptive_l2(student, target, self.huber_c)
        if self.weighting == "inv_dt":
            weight = 1.0 / (t - r)
        else:
            weight = (t**2 + self.sigma_data**2) / (t * self.sigma_data) ** 2
        return {
            "loss": weight.float() * dist,
            "l2": dist.detach(),
            "sigma": t.float().detach(),
            "r": r.float().detach(),
            "mse": mean_flat((student - target) ** 2).detach(),
        }

    def prediction_spec(self) -> dict[str, Any]:
        if self.teacher == "flow":
            precond = {"_target_": "gen.models.precond.FlowConsistencyPrecond", "sigma_min": self.sigma_min}
        else:
            precond = {"_target_": "gen.models.precond.ConsistencyPrecond", "sigma_data": self.sigma_data,
                       "sigma_min": self.sigma_min}
        return {"path": dict(self.path.config), "prediction": "consistency", "precond": precond}
