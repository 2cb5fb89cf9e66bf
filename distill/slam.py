"""SLAM, the sub-path linear approximation model (Xu et al. 2024, "Accelerating Image Generation with Sub-path Linear
Approximation Model", ECCV; official code MCG-NJU/SPLAM, ``splam/train_splam_distill_sd_wds.py``).

Consistency distillation along straight sub-paths. On a grid of ``num_levels`` = N levels ``t_j = j t_max / N``
(the official code: 50 DDIM steps over SD-v1.5's 1000 with skip 20, the top at DDPM step 999 where alpha-bar =
0.0047; ``t_max = 0.936`` is that level at the same signal-to-noise ratio on ``LinearPath``,
``((1 - t) / t)^2 = alpha-bar / (1 - alpha-bar)``: at t = 0.999 alpha would be 0.001, not SD's 0.068), one step per
sample:

1. ``j ~ U{1..N}``: sub-path start ``t_s = t_j``, end ``t_e = t_{j-1}``; ``x_s = alpha_s x0 + sigma_s eps``.
2. The frozen teacher's classifier-free-guided velocity in LCM's form ``v = v_c + w (v_c - v_u)`` at ``(x_s, t_s)``
   gives ``(x0_hat, eps_hat)``; one DDIM step ``x_e = alpha_e x0_hat + sigma_e eps_hat``.
3. Target: the EMA network's consistency output at ``(x_e, t_e)`` with ``gamma = 1`` (no gradient).
4. ``gamma ~ U(0, 1)``; the point on the sub-path linear ODE between ``x_s`` and the drift-compensated end
   ``(alpha_s / alpha_e) x_e``: ``x_gamma = gamma x_s + (1 - gamma)(alpha_s / alpha_e) x_e``, at the noise level
   ``sigma~^2 = (1 - gamma^2) sigma_a^2 + gamma^2 sigma_s^2`` with ``sigma_a = alpha_s sigma_e / alpha_e``, which is the
   official ``(alpha_s sigma_e / alpha_e)^2 + gamma^2 (1 - (alpha_s / alpha_e)^2)`` on a variance-preserving path
   (``sigma^2 = 1 - alpha^2``) and the same interpolation of the two ends' noise levels on ours.
5. Student ``f_theta(x_gamma, t_s; gamma, sigma~)`` (``gen.models.student.SubpathConsistency``: gamma embedded as
   ``emb(10 - 10 gamma)`` through the backbone's extra-condition slot, its velocity read at the noise level sigma~ as
   the official code reads its epsilon, LCM's boundary scalings); loss the elementwise
   pseudo-Huber ``mean(sqrt((f - target)^2 + c^2) - c)`` with c = 1e-3 (``--loss_type huber``) or the squared error.
6. The loop steps the optimizer and updates the EMA; ``target_profile`` (rate 0.95 every step) is the target.

Against the official code (bench/README.md, "Distillation losses against the official code"): the teacher's guided
DDIM step, the target, ``x_gamma``, the gamma embedding and, at gamma = 1, the student and the loss agree to 1e-7.
Kept differences: the levels are uniform in our time, the official's in SD's DDPM index (20 j - 1), so the two
spread their levels differently in SNR; the boundary scalings read ``10^4 t`` where the official reads ``10 k`` of the
integer step (``c_skip`` < 1e-5 at every level but t = 0 either way); ``sigma~`` and the velocity reading (step 4, 5).

The student is the teacher's backbone with the extra-condition slot added (``model.augment_dim = gamma_dim``), started
from the teacher's weights (``distill.teacher.start_from_teacher``; the slot is zero, so it starts as the teacher).
Its snapshot is a consistency function on ``LinearPath`` sampled in 1-4 steps by ``samplers.sample_lcm`` at LCM's
times on these levels (``samplers.grids.lcm_grid``, ``configs/sampler/slam_*``; ``check_sampler`` refuses an
``lcm_grid`` on another number of levels).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.losses import huber_elementwise
from distill.teacher import (
    Teacher,
    check_same_teacher,
    check_student_sampler,
    check_teacher,
    load_teacher,
    start_from_teacher,
)
from gen.ema import EMAFactory
from gen.models.student import SubpathConsistency, takes_condition
from gen.objectives.base import check_label_dropout, drop_labels
from gen.paths import LinearPath
from gen.train.method import Batch, Method, OptimizerFactory, OptimizerSpec, Progress
from gen.utils.frozen import hold_frozen
from gen.utils.seed import Randomness

SLAM_SOLVERS = ("samplers.sample_lcm",)


@torch.no_grad()
def guided_ddim_step(teacher: Teacher, guidance: float, x_s: Tensor, t_s: Tensor, t_e: Tensor, y: Tensor) -> Tensor:
    """One DDIM step on ``LinearPath`` from ``t_s`` to ``t_e`` (B,) of the teacher guided in LCM's form
    ``v = v_c + w (v_c - v_u)``: (B, C, H, W) float64."""
    vel = teacher.velocity_fn(pad=False)
    v = vel(x_s.float(), t_s.float(), y).double()
    if guidance != 0.0:
        v_u = vel(x_s.float(), t_s.float(), torch.full_like(y, teacher.num_classes)).double()
        v = v + guidance * (v - v_u)
    path = LinearPath()
    x0, eps = path.x0_eps_from_velocity(x_s.double(), v, t_s)
    return path.sample(x0, eps, t_e)


class SubpathLinearApproximation(Method):
    """SLAM from a frozen flow-matching teacher (module docstring); trainable ``net``, EMA profiles from ``target_ema``.

    Args:
        net: the student backbone: the teacher's architecture with ``augment_dim = gamma_dim``.
        optimizer: the ``optim`` group's optimizer factory.
        teacher: the teacher's snapshot (a velocity model on ``LinearPath``).
        target_ema: the EMA factory (``_partial_`` ``gen.ema.EMA``); its first profile goes into snapshots.
        target_profile: the profile read as the target network (e.g. ``d0.95``; None: the first).
        gamma_dim: width of the gamma embedding (the backbone's extra-condition slot).
        num_levels: N of the grid (50); t_max: its top (0.936: SD's DDPM step 999 at the same SNR; the samplers'
            grid starts there too, ``configs/sampler/slam_*``).
        guidance: w of the teacher's guidance in LCM's form (8, an effective scale of 9).
        sigma_data, time_scale: LCM's boundary scalings (0.5; 10 x 1000 in continuous time).
        loss: ``"huber"`` (elementwise, ``huber_c``) or ``"l2"``.
        label_dropout: null-label rate of the student's labels (0).
        subpath: False trains at the sub-path start only (gamma = 1: ``x_gamma = x_s`` at ``sigma_s``), which is
            LCM's consistency distillation on the same grid, teacher and target: SLAM's own baseline (the paper
            compares with LCM). The draws are the same, so both see the same levels, noise and labels.
        data_name, image_resolution, image_channels: the run's data (set by train.py; checked against the teacher's).
    """

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, teacher: str, target_ema: EMAFactory,
                 target_profile: str | None = None, gamma_dim: int = 64, num_levels: int = 50, t_max: float = 0.936,
                 guidance: float = 8.0, sigma_data: float = 0.5, time_scale: float = 10_000.0,
                 loss: Literal["huber", "l2"] = "huber", huber_c: float = 1e-3, label_dropout: float = 0.0,
                 subpath: bool = True, data_name: str | None = None, image_resolution: int | None = None,
                 image_channels: int | None = None) -> None:
        super().__init__()
        if loss not in ("huber", "l2"):
            raise ValueError(f"method.loss must be 'huber' or 'l2', got {loss!r}")
        if int(num_levels) < 1 or not 0 < t_max < 1:
            raise ValueError(f"method: need num_levels >= 1 and 0 < t_max < 1, got {num_levels}, {t_max}")
        if int(gamma_dim) < 4 or int(gamma_dim) % 2:
            raise ValueError(f"method.gamma_dim must be an even number >= 4 (LCM's sin-cos embedding), got {gamma_dim}")
        if takes_condition(net) != int(gamma_dim):
            raise ValueError(f"method.gamma_dim={gamma_dim}: the student backbone {type(net).__name__} has an "
                             f"extra-condition slot of {takes_condition(net)} (augment_dim), so it cannot take SLAM's "
                             f"gamma embedding; set model.augment_dim={gamma_dim} (a DiT, LightningDiT or DDT backbone)")
        teach = load_teacher(teacher)
        check_teacher(teach.config, teacher, data_name=data_name, resolution=image_resolution,
                      channels=image_channels, kinds=("flow",), method="slam")
        hold_frozen(self, "teacher", teach.net)
        self._teacher: Teacher = teach
        self.teacher_ref = teach.identity()
        start_from_teacher(net, teach.net, "method.net (the student, model=...)")
        self.net, self._optimizer, self._target_ema = net, optimizer, target_ema
        self.target_profile = target_profile
        self.path = LinearPath()
        self.levels = torch.linspace(0.0, float(t_max), int(num_levels) + 1, dtype=torch.float64)
        self.gamma_dim, self.guidance = int(gamma_dim), float(guidance)
        self.sigma_data, self.time_scale = float(sigma_data), float(time_scale)
        self.loss_kind, self.huber_c = loss, float(huber_c)
        self.label_dropout = check_label_dropout(label_dropout)
        if not isinstance(subpath, bool):
            raise ValueError(f"method.subpath must be true or false, got {subpath!r}")
        self.subpath = subpath

    def ema_specs(self, default: EMAFactory) -> dict[str, EMAFactory]:
        return {"net": self._target_ema}

    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("net", ("net",), self._optimizer)]

    def consistency_fn(self, net: nn.Module) -> SubpathConsistency:
        return SubpathConsistency(net, self.gamma_dim, self.sigma_data, self.time_scale)

    def teacher_step(self, x_s: Tensor, t_s: Tensor, t_e: Tensor, y: Tensor) -> Tensor:
        """One DDIM step of the guided teacher from ``t_s`` to ``t_e`` (B,): (B, C, H, W) float64."""
        return guided_ddim_step(self._teacher, self.guidance, x_s, t_s, t_e, y)

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "t", "gamma"}``. Draws per sample, in order: the level, eps, gamma, the label drop."""
        x0 = batch["x0"].double()
        dev = x0.device
        n_levels = len(self.levels) - 1
        j = (rng.rand(dtype=torch.float64).to(dev) * n_levels).long().clamp(max=n_levels - 1) + 1  # 1..N
        eps = rng.randn(*x0.shape[1:]).to(dev).double()
        gamma = rng.rand(dtype=torch.float64).to(dev)
        if not self.subpath:  # LCM: the sub-path's start only (drawn all the same, so the streams stay aligned)
            gamma = torch.ones_like(gamma)
        y = drop_labels(batch["label"], self.label_dropout, self.net.num_classes, rng)
        levels = self.levels.to(dev)
        t_s, t_e = levels[j], levels[j - 1]
        b = (-1, 1, 1, 1)
        a_s, s_s = self.path.alpha(t_s).view(b), self.path.sigma(t_s).view(b)
        a_e, s_e = self.path.alpha(t_e).view(b), self.path.sigma(t_e).view(b)
        x_s = a_s * x0 + s_s * eps
        x_e = self.teacher_step(x_s, t_s, t_e, y)
        with torch.no_grad():
            target = self.consistency_fn(self.averaged("net", self.target_profile))(x_e.float(), t_e, y).out.float()
        g = gamma.view(b)
        x_g = g * x_s + (1.0 - g) * (a_s / a_e) * x_e
        s_a = a_s * s_e / a_e
        noise = ((1.0 - g.square()) * s_a.square() + g.square() * s_s.square()).sqrt().view(-1)
        student = self.consistency_fn(self.net)(x_g.float(), t_s, y, gamma=gamma, noise_level=noise).out.float()
        if self.loss_kind == "huber":
            dist = huber_elementwise(student, target, self.huber_c)
        else:
            dist = (student - target).square().flatten(1).mean(1)
        return {"loss": dist, "t": t_s.float(), "gamma": gamma.float()}

    def extra_state(self) -> dict[str, Any]:
        return {"teacher": dict(self.teacher_ref)}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        check_same_teacher(state.get("teacher"), self.teacher_ref)

    def snapshot_config(self) -> dict[str, Any]:
        precond = {"_target_": "gen.models.student.SubpathConsistency", "gamma_dim": self.gamma_dim,
                   "sigma_data": self.sigma_data, "time_scale": self.time_scale}
        return {"model": dict(self.net.config),
                "prediction": {"path": dict(self.path.config), "prediction": "consistency", "precond": precond},
                "distill": {"method": "slam", "teacher": dict(self.teacher_ref), "solvers": list(SLAM_SOLVERS)}}

    def check_sampler(self, sampler: Mapping[str, Any]) -> None:
        """Refuse another solver, a grid that starts above the student's top level (it never trained there), and an
        ``lcm_grid`` on another number of levels."""
        check_student_sampler(sampler, SLAM_SOLVERS, "SLAM", "slam_4step")
        grid = sampler.get("grid") or {}
        if str(grid.get("_target_", "")).endswith("lcm_grid"):
            n = int(grid.get("num_levels", 50))
            if n != len(self.levels) - 1:
                raise ValueError(f"sampler.grid.num_levels={n} differs from the SLAM student's method.num_levels="
                                 f"{len(self.levels) - 1}, so LCM's times miss its levels; set sampler.grid.num_levels="
                                 f"{len(self.levels) - 1}")
        top = grid.get("t_max")
        top = self.path.t_max if top is None else float(top)
        if top > float(self.levels[-1]) + 1e-9:
            raise ValueError(f"sampler.grid.t_max={top:g} starts above the SLAM student's top level method.t_max="
                             f"{float(self.levels[-1]):g}; set sampler.grid.t_max={float(self.levels[-1]):g} "
                             "(e.g. sampler=slam_4step)")
