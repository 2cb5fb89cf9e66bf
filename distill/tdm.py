"""TDM, trajectory distribution matching (Luo, Hu, Sun, Cai & Tang 2025, "Learning Few-Step Diffusion Models by
Trajectory Distribution Matching", ICCV; official code Luo-Yihong/TDM, ``train_tdm_demo.py``).

A K-step deterministic student (DDIM steps at ``t_i = i / K``, ``samplers.sample_ddim``; Euler on ``LinearPath``)
is trained data-free so that, segment by segment, the distribution of its trajectory matches the teacher's marginals.
Two networks alternate as two phases of one step (``Method.phases``: ``"fake_score"`` then ``"net"``):

* **Rollout** (no gradient): per sample, unit noise ``z`` at ``t = 1`` and a segment ``i ~ U{1..K}``; the student
  runs its first ``K - i`` steps to the segment's start ``t_g = i / K``; its end is ``t_m = (i - 1) / K``. The
  teacher's trajectory is a grid of ``trajectory_steps`` = N steps and a segment spans L = N / K of them, so K must
  divide N (checked). Shared between the phases of a step (``Method.shared``).
* **Diffusion to tau**: the student's prediction at ``(x_g, t_g)`` gives ``(x0_hat, eps_hat)``, its
  deterministic segment end ``x_m = alpha_m x0_hat + sigma_m eps_hat``, then fresh noise ``n``:
  ``x_tau = (alpha_tau / alpha_m) x_m + sqrt(sigma_tau^2 - (alpha_tau sigma_m / alpha_m)^2) n`` with the grid index of
  tau uniform in ``[max(tau_min, (i - 1) L), i L - margin)`` (``separate``: non-overlapping segments, so one fake
  network never has to model a mixture of step distributions at one tau) or up to ``N - margin``.
* **Fake-score phase** (Eq. 7): ``|| x0_psi(x_tau, tau) - x0_hat ||^2`` (mean over elements) times
  ``omega_tau = min(SNR(tau), snr_cap)`` times the importance weight ``w = exp(-mean(m^2) / 2) / exp(-mean(n^2) / 2)``,
  ``m = (x_tau - alpha_tau x0_hat) / sigma_tau`` the effective noise of ``x_tau`` around ``x0_hat``.
* **Generator phase** (the KL objective of Eq. 5-6 through a stop-gradient surrogate): with the teacher's
  classifier-free-guided estimate ``x0_cfg = x0_c + (w - 1)(x0_c - x0_u)`` and the fake's ``x0_psi``, target
  ``x0_hat + x0_cfg - x0_psi`` (detached), loss ``mean(sqrt((x0_hat - target)^2 + c^2) - c) / eta`` (elementwise
  pseudo-Huber, c = 1e-3 as the official code) or the squared error, with the DMD-style normaliser
  ``eta = mean|x0_hat - x0_cfg|`` (detached; floored at 1e-8).
  Only the student's last step carries gradient.
* **Against the official code** (bench/README.md, "Distillation losses against the official code": the losses agree
  to 1e-7 given the same draws). Kept differences, all from running the demo's DDPM-index recipe on a continuous
  linear path: (1) the student starts at t = 1, pure noise, where the demo starts at DDPM step ``total_steps - 1``
  (899 with its README's 900: alpha-bar 2.8e-4, not the top); (2) its integer segments are
  ``[(i - 1) L, i L - 1]`` with tau in ``[max(20, (i - 1) L), i L - 12]``: ours are ``[(i - 1) / K, i / K]`` with tau's
  index up to ``i L - 11`` (one grid step); (3) tau is uniform in our time, not in the DDPM index, so its SNR
  distribution is the linear path's; (4) one segment per step serves both phases (the rollout stops at it, ``K - i``
  student calls), where the demo rolls out all K steps and draws a new segment for the generator phase: each
  phase's segment is uniform either way, only their coupling within a step differs.
* **TDM-unify** (the sampling-steps-aware objective, ``unify_steps``): K is drawn per sample from a set, and the
  student and the fake score are conditioned on it through the backbone's extra-condition slot
  (``gen.models.student.StepConditioned``).

Both trainable networks start from the teacher's weights (``distill.teacher.start_from_teacher``); the teacher is
frozen, never in a training state; the snapshot is the student's EMA, sampled by ``samplers.sample_ddim``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.losses import huber_elementwise
from distill.teacher import (
    Teacher,
    TeacherError,
    check_same_teacher,
    check_student_sampler,
    check_teacher,
    load_teacher,
    start_from_teacher,
)
from gen.models.student import StepConditioned, takes_condition
from gen.paths import LinearPath
from gen.train.method import Batch, Method, OptimizerFactory, OptimizerSpec, Progress
from gen.utils.frozen import hold_frozen
from gen.utils.seed import Randomness, SampleRandom


def check_steps(steps: Sequence[int], trajectory_steps: int, tau_min: int, margin: int) -> None:
    """Refuse a step count K that does not split the teacher's N-step trajectory into whole segments, or whose
    first segment leaves no tau (one line naming the keys and the fix)."""
    n = int(trajectory_steps)
    for k in steps:
        if int(k) < 1 or n % int(k):
            good = [d for d in range(1, 9) if n % d == 0]
            raise ValueError(f"method.num_steps/unify_steps: K={k} does not divide method.trajectory_steps={n} (the "
                             f"teacher's trajectory as configured), so its segments are not whole teacher steps; "
                             f"use K in {good} or a trajectory_steps that K divides")
        if n // int(k) - margin <= tau_min:
            raise ValueError(f"method: with K={k} a segment is {n // int(k)} steps, which leaves no tau in "
                             f"[tau_min_steps={tau_min}, L - tau_margin_steps={margin}); lower K or raise trajectory_steps")


class TrajectoryDistributionMatching(Method):
    """TDM from a frozen flow-matching teacher (module docstring); trainable ``net`` and ``fake_score``.

    Args:
        net: the student backbone (the teacher's architecture; with ``unify_steps``, ``augment_dim > 0``).
        optimizer: the generator's optimizer factory (AdamW betas (0, 0.95), lr/5 of the fake's in the official code).
        teacher: the teacher's snapshot (a velocity model on ``LinearPath``).
        fake_optimizer: the fake score's optimizer factory (None: ``optimizer``).
        fake_score: the fake-score network (None: a copy of ``net``); must have the teacher's shapes.
        num_steps: K of the student.
        unify_steps: TDM-unify's set of K (None: plain TDM with ``num_steps``).
        trajectory_steps: N, the teacher's trajectory grid (1000 DDPM steps in the official code).
        tau_min_steps, tau_margin_steps: tau's grid index lies in ``[max(tau_min, t_m), t_g - margin)`` (20, 10).
        separate: non-overlapping segments (``--use_separate``); False draws tau up to ``N - margin``.
        guidance: the teacher's CFG scale w (4.5 in the README).
        loss: ``"huber"`` (elementwise pseudo-Huber, ``huber_c``) or ``"l2"``.
        snr_cap: omega_tau = min(SNR(tau), snr_cap) (5).
        data_name, image_resolution, image_channels: the run's data (set by train.py; checked against the teacher's).
    """

    trainable = ("net", "fake_score")
    ema_modules = ("net",)
    data_keys = ()
    flip_keys = ()  # data-free: only the labels and stream positions are read

    def __init__(self, net: nn.Module, optimizer: OptimizerFactory, teacher: str,
                 fake_optimizer: OptimizerFactory | None = None, fake_score: nn.Module | None = None,
                 num_steps: int = 4, unify_steps: Sequence[int] | None = None, trajectory_steps: int = 1000,
                 tau_min_steps: int = 20, tau_margin_steps: int = 10, separate: bool = True, guidance: float = 4.5,
                 loss: Literal["huber", "l2"] = "huber", huber_c: float = 1e-3, snr_cap: float = 5.0,
                 data_name: str | None = None, image_resolution: int | None = None,
                 image_channels: int | None = None) -> None:
        super().__init__()
        if loss not in ("huber", "l2"):
            raise ValueError(f"method.loss must be 'huber' or 'l2', got {loss!r}")
        self.steps = [int(k) for k in (unify_steps if unify_steps else [num_steps])]
        self.unify = bool(unify_steps)
        check_steps(self.steps, trajectory_steps, int(tau_min_steps), int(tau_margin_steps))
        teach = load_teacher(teacher)
        check_teacher(teach.config, teacher, data_name=data_name, resolution=image_resolution,
                      channels=image_channels, kinds=("flow",), method="tdm")
        self.cond_dim = takes_condition(net)
        if self.unify and self.cond_dim == 0:
            raise ValueError(f"method.unify_steps={self.steps} conditions the student on K, but its backbone "
                             f"{type(net).__name__} has no extra-condition slot; set model.augment_dim (e.g. 64)")
        hold_frozen(self, "teacher", teach.net)
        self._teacher: Teacher = teach
        self.teacher_ref = teach.identity()
        self.path = LinearPath()
        fake = copy.deepcopy(net) if fake_score is None else fake_score
        start_from_teacher(net, teach.net, "method.net (the student, model=...)")
        start_from_teacher(fake, teach.net, "method.fake_score")
        if self.unify and takes_condition(fake) != self.cond_dim:
            raise TeacherError(f"method.fake_score has an extra-condition slot of {takes_condition(fake)}, the "
                               f"student {self.cond_dim}; TDM-unify conditions both on K: give it augment_dim={self.cond_dim}")
        self.net, self.fake_score = net, fake.train().requires_grad_(True)
        self._optimizers = (optimizer, fake_optimizer or optimizer)
        self.n, self.tau_min, self.margin = int(trajectory_steps), int(tau_min_steps), int(tau_margin_steps)
        self.separate, self.guidance, self.loss_kind = bool(separate), float(guidance), loss
        self.huber_c, self.snr_cap = float(huber_c), float(snr_cap)

    # --- the Method interface ------------------------------------------------------------------------------------
    def optimizers(self) -> list[OptimizerSpec]:
        return [OptimizerSpec("fake_score", ("fake_score",), self._optimizers[1]),
                OptimizerSpec("net", ("net",), self._optimizers[0])]

    def prepare_batch(self, raw: Mapping[str, Tensor], tokenizer: Any, rng: SampleRandom, hflip: bool,
                      device: torch.device) -> Batch:
        return {"label": raw["label"].to(device), "position": raw["position"].to(device)}

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        if phase == "fake_score":
            return self.fake_score_loss(batch, rng)
        if phase == "net":
            return self.generator_loss(batch, rng)
        raise ValueError(f"unknown phase {phase!r}")

    # --- pieces --------------------------------------------------------------------------------------------------
    def call(self, net: nn.Module, x: Tensor, t: Tensor, y: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(x0, eps)`` of a student-like network (conditioned on K for unify) at ``(x, t)``; float32 (B, C, H, W)."""
        model = StepConditioned(net, self.cond_dim) if self.unify else net
        kw = {"num_steps": k} if self.unify else {}
        v = model(x, t.float(), y, **kw).out.float()
        x0, eps = self.path.x0_eps_from_velocity(x.float(), v, t.float())
        return x0.float(), eps.float()

    @torch.no_grad()
    def rollout(self, rng: Randomness, y: Tensor) -> dict[str, Tensor]:
        """Draws (in order: the K choice for unify, z, the segment) and the student's no-grad steps to ``t_g``.

        Returns ``{"x": x_g (B, C, H, W), "k": K (B,), "seg": i (B,)}``.
        """
        dev = y.device
        steps = torch.tensor(self.steps, device=dev)
        if self.unify:
            k = steps[(rng.rand(dtype=torch.float64).to(dev) * len(self.steps)).long().clamp(max=len(self.steps) - 1)]
        else:
            k = steps.expand(y.shape[0]).clone()
        shape = (self.net.in_channels, self.net.input_size, self.net.input_size)
        x = rng.randn(*shape).to(dev)  # sigma(1) = 1 on LinearPath: the student's start
        seg = (rng.rand(dtype=torch.float64).to(dev) * k).long().clamp(max=k - 1) + 1  # i in 1..K
        todo = k - seg
        for j in range(int(todo.max())):
            t, t_next = (k - j).double() / k, (k - j - 1).double() / k
            x0, eps = self.call(self.net, x, t, y, k)
            stepped = self.path.sample(x0, eps, t_next.float()).float()
            x = torch.where((j < todo).view(-1, 1, 1, 1), stepped, x)
        return {"x": x, "k": k, "seg": seg}

    def _shared_rollout(self, rng: Randomness, y: Tensor) -> dict[str, Tensor]:
        """The step's rollout: the earlier phase's (``Method.shared``) or drawn now."""
        if self.shared.has("x"):
            return {key: self.shared.get(key) for key in ("x", "k", "seg")}
        roll = self.rollout(rng, y)
        for key, value in roll.items():
            self.shared.put(key, value)
        return roll

    def diffuse(self, rng: Randomness, x0: Tensor, eps: Tensor, k: Tensor, seg: Tensor) -> dict[str, Tensor]:
        """Draws tau (one uniform) and n; ``x_tau`` from the segment end, the effective noise ``m``, both (B, C, H, W)."""
        length = self.n // k  # L per sample
        lo = torch.clamp((seg - 1) * length, min=self.tau_min)
        hi = seg * length - self.margin if self.separate else torch.full_like(seg, self.n - self.margin)
        u = rng.rand(dtype=torch.float64).to(x0.device)
        tau = (lo + (u * (hi - lo)).long().clamp(max=hi - lo - 1)).double() / self.n  # (B,)
        n = rng.randn(*x0.shape[1:]).to(x0.device)
        t_m = ((seg - 1) * length).double() / self.n
        b = (-1, 1, 1, 1)
        a_m, s_m = self.path.alpha(t_m).view(b), self.path.sigma(t_m).view(b)
        a_t, s_t = self.path.alpha(tau).view(b), self.path.sigma(tau).view(b)
        x_m = a_m * x0.double() + s_m * eps.double()
        x_tau = a_t / a_m * x_m + (s_t.square() - (a_t * s_m / a_m).square()).clamp(min=0).sqrt() * n.double()
        m = (x_tau - a_t * x0.double()) / s_t
        return {"x_tau": x_tau.float(), "tau": tau, "m": m, "n": n.double()}

    def fake_score_loss(self, batch: Batch, rng: Randomness) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "weight", "tau"}`` of the fake-score regression (Eq. 7)."""
        y = batch["label"]
        roll = self._shared_rollout(rng, y)
        t_g = (roll["seg"].double() / roll["k"])
        with torch.no_grad():
            x0, eps = self.call(self.net, roll["x"], t_g, y, roll["k"])
            d = self.diffuse(rng, x0, eps, roll["k"], roll["seg"])
            w_is = torch.exp(-0.5 * (d["m"].square().flatten(1).mean(1) - d["n"].square().flatten(1).mean(1)))
            snr = (self.path.alpha(d["tau"]) / self.path.sigma(d["tau"])).square()
            weight = (snr.clamp(max=self.snr_cap) * w_is).float()
        x0_fake, _ = self.call(self.fake_score, d["x_tau"], d["tau"], y, roll["k"])
        mse = (x0_fake - x0).square().flatten(1).mean(1)
        return {"loss": mse * weight, "weight": weight, "tau": d["tau"].float()}

    def generator_loss(self, batch: Batch, rng: Randomness) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "eta", "tau"}`` of the generator's surrogate (Eq. 5-6)."""
        y = batch["label"]
        roll = self._shared_rollout(rng, y)
        t_g = (roll["seg"].double() / roll["k"])
        x0, eps = self.call(self.net, roll["x"], t_g, y, roll["k"])  # the one step with gradient
        with torch.no_grad():
            d = self.diffuse(rng, x0.detach(), eps.detach(), roll["k"], roll["seg"])
            real = self.teacher_x0(d["x_tau"], d["tau"], y)
            fake, _ = self.call(self.fake_score, d["x_tau"], d["tau"], y, roll["k"])
            target = x0.detach() + real - fake
            eta = (x0.detach() - real).abs().flatten(1).mean(1).clamp(min=1e-8)
        if self.loss_kind == "huber":
            dist = huber_elementwise(x0, target, self.huber_c)
        else:
            dist = (x0 - target).square().flatten(1).mean(1)
        return {"loss": dist / eta, "eta": eta, "tau": d["tau"].float()}

    @torch.no_grad()
    def teacher_x0(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The teacher's guided clean estimate ``x0_c + (w - 1)(x0_c - x0_u)`` (B, C, H, W) float32."""
        cond = self._teacher.denoise(x, t.float(), y)
        if self.guidance == 1.0:
            return cond
        uncond = self._teacher.denoise(x, t.float(), torch.full_like(y, self._teacher.num_classes))
        return cond + (self.guidance - 1.0) * (cond - uncond)

    # --- state and snapshots -------------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"teacher": dict(self.teacher_ref)}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        check_same_teacher(state.get("teacher"), self.teacher_ref)

    def solvers(self) -> tuple[str, ...]:
        return ("samplers.sample_ddim",) if self.unify else ("samplers.sample_ddim", "samplers.sample_euler")

    def snapshot_config(self) -> dict[str, Any]:
        precond = ({"_target_": "gen.models.student.StepConditioned", "dim": self.cond_dim, "steps": self.steps[-1]}
                   if self.unify else None)
        return {"model": dict(self.net.config),
                "prediction": {"path": dict(self.path.config), "prediction": "velocity", "precond": precond},
                "distill": {"method": "tdm", "teacher": dict(self.teacher_ref), "solvers": list(self.solvers()),
                            "steps": list(self.steps)}}

    def check_sampler(self, sampler: Mapping[str, Any]) -> None:
        check_student_sampler(sampler, self.solvers(), "TDM", "tdm_4step")
        if self.unify and not (sampler.get("solver") or {}).get("condition_steps"):
            raise ValueError("sampler.solver.condition_steps must be true for a TDM-unify student (it is told K); "
                             "use sampler=tdm_unify")
