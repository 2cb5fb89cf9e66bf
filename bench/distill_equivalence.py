"""The distillation methods against their official code: 2-RF++, CD, TDM and SLAM (bench/README.md, "Distillation
losses against the official code").

The official side runs outside this repository (README: the repositories, commits and shims) and saves, in one
safetensors file per precision, the tiny network's weights, the inputs, the random draws it made and what the
official code computed. This script is our side: it rebuilds the same network from the saved weights, replays the
official draws through our methods' own ``loss`` (their ``rng`` argument), samplers and helpers, and prints the largest
relative difference ``max |ours - official| / max |official|`` of each quantity.

    python bench/distill_equivalence.py --official /tmp/distilleq/off32.safetensors --official64 /tmp/distilleq/off64.safetensors

The shared network ``g(x, s, y, cond)`` (a velocity in the linear path's time, or the x0-network of an EDM teacher in
sigma) is a closed form, so both sides compute the same function without sharing code: a per-pixel channel mix with
tanh, a time modulation, a label embedding and an optional condition vector (TDM-unify's K, SLAM's gamma embedding).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from distill.cd import ConsistencyDistillation, teacher_heun_step  # noqa: E402
from distill.perceptual import Resized  # noqa: E402
from distill.reflow import Reflow  # noqa: E402
from distill.slam import SubpathLinearApproximation  # noqa: E402
from distill.tdm import TrajectoryDistributionMatching  # noqa: E402
from gen.ema import EMA  # noqa: E402
from gen.models.common import ModelOutput  # noqa: E402
from gen.models.dit import DiT  # noqa: E402
from gen.models.student import condition_embedding, lcm_boundary  # noqa: E402
from gen.paths import EDMPath, LinearPath, UShapedTime  # noqa: E402
from gen.utils.ckpt import save_snapshot  # noqa: E402
from samplers import sample_euler, sample_heun, sample_reuse_noise, uniform_grid  # noqa: E402

C, H, NC, CD = 2, 8, 3, 8  # channels, size, classes (label NC is the null class), condition width


class EqNet(nn.Module):
    """The shared closed-form network as a backbone: ``forward(x, t, y, augment=None) -> ModelOutput``.

    Args:
        weights: its tensors (``W b E a P K``) as the official side saved them.
        time: ``"t"`` (the time input is the canonical time) or ``"edm"`` (the input is EDM's ``ln(sigma) / 4``).
        augment_dim: width of the condition slot (0: none).
    """

    def __init__(self, weights: Mapping[str, Tensor], time: str = "t", augment_dim: int = 0) -> None:
        super().__init__()
        for k, v in weights.items():
            self.register_buffer(k, v.double())
        self.time, self.augment_dim = time, augment_dim
        self.num_classes, self.in_channels, self.input_size = NC, C, H

    def forward(self, x: Tensor, t: Tensor, y: Tensor, augment: Tensor | None = None, **_: Any) -> ModelOutput:
        dt = x.dtype
        s = (torch.exp(4.0 * t.double()) if self.time == "edm" else t.double()).to(dt).expand(x.shape[0])
        s = s.reshape(-1, 1, 1, 1)
        w = {k: getattr(self, k).to(dt) for k in "WbEaPK"}
        h = torch.einsum("oc,bchw->bohw", w["W"], x) + w["b"].view(1, -1, 1, 1)
        out = torch.tanh(h) * (1 + 0.3 * torch.sin(2 * s + w["a"].view(1, -1, 1, 1)))
        out = out + 0.5 * w["E"][y].view(-1, C, 1, 1) * s + torch.einsum("oc,bchw->bohw", w["K"], x) * s
        if augment is not None:
            out = out + (augment.to(dt) @ w["P"]).view(-1, C, 1, 1)
        return ModelOutput(out=out)


class Replay:
    """A ``Randomness`` that hands out given draws in order (each call: one tensor of shape (B, *shape))."""

    def __init__(self, draws: list[Tensor]) -> None:
        self.draws = list(draws)

    def _next(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        v = self.draws.pop(0)
        if tuple(v.shape[1:]) != tuple(shape):
            raise AssertionError(f"replay: asked for (B, {shape}), next draw is {tuple(v.shape)}")
        return v.to(dtype)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._next(shape, dtype)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._next(shape, dtype)


def standin_distance(a: Tensor, b: Tensor) -> Tensor:
    """The perceptual stand-in on images in [-1, 1] (our LPIPS' input range): the official side's stand-in on [0, 1]."""
    a, b = a * 0.5 + 0.5, b * 0.5 + 0.5
    fa, fb = torch.tanh(3 * (a - 0.5)), torch.tanh(3 * (b - 0.5))
    return (fa - fb).square().mean((1, 2, 3)) + 0.1 * (a - b).abs().mean((1, 2, 3))


class StandIn(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return standin_distance(a, b)


def weights(d: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.rsplit("/", 1)[1]: v for k, v in d.items() if k.startswith(prefix + "/") and k.count("/") == prefix.count("/") + 1}


def rel(ours: Tensor, official: Tensor) -> float:
    """``max |ours - official| / max |official|`` (0 when both are 0)."""
    ours, official = ours.double().reshape(official.shape), official.double()
    den = official.abs().max().item()
    num = (ours - official).abs().max().item()
    return num / den if den > 0 else num


def teacher_file(folder: Path, kind: str, augment_dim: int = 0) -> str:
    """A tiny DiT snapshot with a flow (``LinearPath`` velocity) or EDM prediction spec: the methods' constructors
    read a teacher file; the network itself is swapped for ``EqNet`` afterwards."""
    torch.manual_seed(0)
    net = DiT(input_size=H, patch_size=4, in_channels=C, hidden_size=16, depth=1, num_heads=2, num_classes=NC,
              augment_dim=augment_dim)
    if kind == "flow":
        pred = {"path": dict(LinearPath().config), "prediction": "velocity", "precond": None}
    else:
        pred = {"path": dict(EDMPath(80.0).config), "prediction": "x0",
                "precond": {"_target_": "gen.models.precond.EDMPrecond", "sigma_data": 0.5}}
    path = folder / f"teacher_{kind}.safetensors"
    save_snapshot(path, net.state_dict(), {"model": dict(net.config), "prediction": pred,
                                           "data": {"name": "eq", "resolution": H, "channels": C, "num_classes": NC}})
    return str(path)


def dit_student(augment_dim: int = 0) -> DiT:
    return DiT(input_size=H, patch_size=4, in_channels=C, hidden_size=16, depth=1, num_heads=2, num_classes=NC,
               augment_dim=augment_dim)


Row = tuple[str, str, float]  # (method, quantity, relative difference)


# ---------------------------------------------------------------------------------------------------------------
def rfpp(d: Mapping[str, Tensor], folder: Path) -> list[Row]:
    rows: list[Row] = []
    n = d["rfpp/t_u"].shape[0]
    u, perm = d["rfpp/t_u"].double(), d["rfpp/t_perm"]
    # the inverse CDF: ours in closed form, the official scipy's numerical ppf of the same uniforms
    a = 4.0
    ours_ppf = torch.log1p(u * torch.expm1(torch.tensor(a, dtype=torch.float64))) / a
    rows.append(("2-RF++", "U-shaped t: inverse CDF of the same uniforms (scipy ppf vs closed form)",
                 rel(ours_ppf, d["rfpp/t_ppf"])))
    # the official mirrors by concatenating [t, 1 - t] and keeping n of the 2n after a shuffle: replay as (u, flip)
    ts = UShapedTime(a, 1e-5)
    p = perm[:n]
    draws = [u[p % n], torch.where(p >= n, 0.25, 0.75).double()]  # ours mirrors where its uniform is < 0.5
    t_ours = ts(Replay(draws))
    rows.append(("2-RF++", "U-shaped t: sample_t with the same uniforms and shuffle", rel(t_ours, d["rfpp/t"])))
    pairs = n - len(set((p % n).tolist()))
    rows.append(("2-RF++", f"(sample_t kept both a draw and its mirror {pairs} times in {n}; ours never)", float("nan")))

    # the loss, through Reflow.loss with the official draws
    teacher = teacher_file(folder, "flow")
    x, z, y = d["rfpp/x"].float(), d["rfpp/z"].float(), d["rfpp/y"]
    bsz = x.shape[0]
    lu, lp = d["rfpp/loss_u"].double(), d["rfpp/loss_perm"][:bsz]
    for name, loss, divt in (("huber", "huber", False), ("lpips_huber", "lpips-huber", False),
                             ("lpips_huber_divt", "lpips-huber", True)):
        method = Reflow(dit_student(), partial(torch.optim.Adam, lr=1e-4), teacher, loss=loss, lpips_divt=divt,
                        perceptual=Resized(StandIn()) if loss == "lpips-huber" else None)
        method.net = EqNet(weights(d, "rfpp/student"))
        rng = Replay([lu[lp % bsz], torch.where(lp >= bsz, 0.25, 0.75).double(), torch.ones(bsz)])
        out = method.loss("net", {"x0": x.to(d["rfpp/x"].dtype), "noise": z.to(d["rfpp/z"].dtype), "label": y},
                          rng, None)  # type: ignore[arg-type]
        rows.append(("2-RF++", f"t of the loss ({loss}{', 1/t' if divt else ''})", rel(out["t"], d[f"rfpp/{name}/t"])))
        rows.append(("2-RF++", f"per-sample loss ({loss}{', 1/t' if divt else ''})",
                     rel(out["loss"], d[f"rfpp/{name}/loss"])))

    # the samplers: the official grids start at t = 1 - 1e-5 from the unscaled noise; ours at t = 1 (uniform_grid)
    net = EqNet(weights(d, "rfpp/student"))
    fn: Callable[..., Tensor] = lambda x, t, y: net(x, t, y).out  # noqa: E731
    z1, path = d["rfpp/z1"], LinearPath()
    for key, solver, steps in (("euler_1_default", sample_euler, 1), ("euler_2_default", sample_euler, 2),
                               ("euler_4_default", sample_euler, 4), ("euler_2_new", sample_reuse_noise, 2),
                               ("euler_4_new", sample_reuse_noise, 4), ("heun_3_default", sample_heun, 2)):
        ours = solver(fn, z1, uniform_grid(steps, 1.0), path=path, y=d["rfpp/y"])
        rows.append(("2-RF++", f"sampler {key.replace('_default', '').replace('_new', ', noise-reusing')} "
                     f"(official from t=1-1e-5)", rel(ours, d[f"rfpp/sample/{key}"])))
        if solver is not sample_reuse_noise:
            # the official grid itself: its state z at t0 = 1 - 1e-5 is our prior sigma(t0) z' with z' = z / t0
            t0 = 1 - 1e-5
            grid = uniform_grid(steps, 1.0).clone()
            grid[0] = t0  # rfpp generate.py: i / N for i = N .. 0, the first replaced by 1 - 1e-5
            ours = solver(fn, z1 / t0, grid, path=path, y=d["rfpp/y"])
            rows.append(("2-RF++", f"sampler {key.replace('_default', '')} on the official grid and start state",
                         rel(ours, d[f"rfpp/sample/{key}"])))
    return rows


# ---------------------------------------------------------------------------------------------------------------
def cd(d: Mapping[str, Tensor], folder: Path) -> list[Row]:
    rows: list[Row] = []
    teacher = teacher_file(folder, "edm")
    x, noise, y = d["cd/x"], d["cd/noise"], d["cd/y"]
    bsz = x.shape[0]
    for n_levels in (18, 40):
        for norm in ("l2", "lpips"):
            key = f"cd/N{n_levels}/{norm}"
            method = ConsistencyDistillation(dit_student(), partial(torch.optim.Adam, lr=1e-4), teacher,
                                             target_ema=partial(EMA, decays=[0.95]), num_levels=n_levels,
                                             metric=norm, perceptual=Resized(StandIn()) if norm == "lpips" else None)
            method._teacher.net = EqNet(weights(d, "cd/teacher"), time="edm")
            method.net = EqNet(weights(d, "cd/student"), time="edm")
            target = EqNet(weights(d, "cd/target"), time="edm")
            method.averaged = lambda *a, _t=target, **k: _t  # type: ignore[method-assign]
            i = d[f"{key}/index"]  # official level index, 0 = sigma_max; ours ascending: n + 1 = N - 1 - i
            u = ((n_levels - 2 - i).double() + 0.5) / (n_levels - 1)
            out = method.loss("net", {"x0": x.float(), "label": y}, Replay([u, noise.float(), torch.ones(bsz)]), None)  # type: ignore[arg-type]
            n = (n_levels - 2 - i)
            s_lo, s_hi = method.sigmas[n], method.sigmas[n + 1]
            tag = f"N={n_levels}, {norm}"
            rows.append(("CD", f"levels sigma_(n+1), sigma_n ({tag})",
                         max(rel(s_hi, d[f"{key}/sigma"]), rel(s_lo, d[f"{key}/sigma2"]))))
            x_hi = (x.double() + s_hi.view(-1, 1, 1, 1) * noise.double()).float()
            x_lo = teacher_heun_step(method._teacher, x_hi, s_hi, s_lo, y)
            rows.append(("CD", f"teacher Heun step x_(n) ({tag})", rel(x_lo, d[f"{key}/x_t2"])))
            student = method.consistency_fn(method.net)(x_hi, s_hi.float(), y).out
            tgt = method.consistency_fn(target)(d[f"{key}/x_t2"].float(), s_lo.float(), y).out
            rows.append(("CD", f"student f(x_(n+1)) ({tag})", rel(student, d[f"{key}/student"])))
            rows.append(("CD", f"target f_ema(x_n) ({tag})", rel(tgt, d[f"{key}/target"])))
            rows.append(("CD", f"per-sample loss ({tag})", rel(out["loss"], d[f"{key}/loss"])))
    # one EMA update at 0.95
    tgt, src = EqNet(weights(d, "cd/target")), EqNet(weights(d, "cd/student"))
    for m in (tgt, src):  # EMA averages parameters: make the buffers parameters
        for k in "WbEaPK":
            v = getattr(m, k)
            delattr(m, k)
            m.register_parameter(k, nn.Parameter(v.to(d["cd/x"].dtype)))
    ema = EMA(tgt, decays=[0.95])
    ema.update(src, nimg=1, batch_size=1)
    avg = ema.averaged("d0.95")
    rows.append(("CD", "EMA target after one update (rate 0.95)",
                 max(rel(getattr(avg, k).detach(), d[f"cd/ema/{k}"]) for k in "WbEaPK")))
    return rows


# ---------------------------------------------------------------------------------------------------------------
def tdm(d: Mapping[str, Tensor], folder: Path) -> list[Row]:
    rows: list[Row] = []
    teacher = teacher_file(folder, "flow")
    y = d["tdm/y"]
    n_traj, k = 1000, 4
    length = n_traj // k
    for loss in ("huber", "l2"):
        key = f"tdm/{loss}"
        method = TrajectoryDistributionMatching(dit_student(), partial(torch.optim.Adam, lr=1e-4), teacher,
                                                num_steps=k, trajectory_steps=n_traj, guidance=2.0, loss=loss)
        method.net = EqNet(weights(d, "tdm/student"))
        method.fake_score = EqNet(weights(d, "tdm/fake"))
        method._teacher.net = EqNet(weights(d, "tdm/teacher"))
        seg = d[f"{key}/seg"]
        lo = torch.clamp((seg - 1) * length, min=20)
        hi = seg * length - 10

        def tau_u(index: Tensor, lo: Tensor = lo, hi: Tensor = hi) -> Tensor:
            return (index - lo).double().add(0.5) / (hi - lo).double()

        draws = [d[f"{key}/noise"].float(), (seg - 1).double().add(0.5) / k,
                 tau_u(d[f"{key}/fake/tau_index"]), d[f"{key}/fake/n"].float(),
                 tau_u(d[f"{key}/gen/tau_index"]), d[f"{key}/gen/n"].float()]
        rng = Replay(draws)
        batch = {"label": y}
        fake = method.loss("fake_score", batch, rng, None)  # type: ignore[arg-type]
        x_g = method.shared.get("x")
        rows.append(("TDM", f"rollout: student state at the segment start t_g ({loss})", rel(x_g, d[f"{key}/fake/x_g"])))
        t_g = seg.double() / k
        x0, eps = method.call(method.net, x_g, t_g, y, torch.full_like(seg, k))
        rows.append(("TDM", f"student x0 at t_g ({loss})", rel(x0, d[f"{key}/fake/x0"])))
        rows.append(("TDM", f"tau ({loss}; same index)",
                     rel(fake["tau"], d["tdm/t_table"][d[f"{key}/fake/tau_index"]])))
        dd = method.diffuse(Replay([tau_u(d[f"{key}/fake/tau_index"]), d[f"{key}/fake/n"].float()]), x0, eps,
                            torch.full_like(seg, k), seg)
        rows.append(("TDM", f"x_tau ({loss})", rel(dd["x_tau"], d[f"{key}/fake/x_tau"])))
        w_is = torch.exp(-0.5 * (dd["m"].square().flatten(1).mean(1) - dd["n"].square().flatten(1).mean(1)))
        rows.append(("TDM", f"importance weight ({loss})", rel(w_is, d[f"{key}/fake/is_weight"])))
        snr = (method.path.alpha(dd["tau"]) / method.path.sigma(dd["tau"])).square().clamp(max=5.0)
        rows.append(("TDM", f"min(SNR(tau), 5) ({loss})", rel(snr, d[f"{key}/fake/snr"])))
        rows.append(("TDM", f"fake-score loss, batch mean ({loss})", rel(fake["loss"].mean(), d[f"{key}/fake/loss"])))
        gen = method.loss("net", batch, rng, None)  # type: ignore[arg-type]
        rows.append(("TDM", f"generator: eta ({loss})", rel(gen["eta"], d[f"{key}/gen/eta"])))
        rows.append(("TDM", f"generator loss, batch mean ({loss})", rel(gen["loss"].mean(), d[f"{key}/gen/loss"])))
        # the generator target x0 + x0_cfg - x0_fake at the generator phase's x_tau
        dg = method.diffuse(Replay([tau_u(d[f"{key}/gen/tau_index"]), d[f"{key}/gen/n"].float()]), x0, eps,
                            torch.full_like(seg, k), seg)
        real = method.teacher_x0(dg["x_tau"], dg["tau"], y)
        fk, _ = method.call(method.fake_score, dg["x_tau"], dg["tau"], y, torch.full_like(seg, k))
        rows.append(("TDM", f"generator target x0 + x0_cfg - x0_fake ({loss})", rel(x0 + real - fk, d[f"{key}/gen/target"])))
    return rows


# ---------------------------------------------------------------------------------------------------------------
def slam(d: Mapping[str, Tensor], folder: Path) -> list[Row]:
    rows: list[Row] = []
    teacher = teacher_file(folder, "flow")
    x0, y = d["slam/x0"], d["slam/y"]
    bsz, n_levels = x0.shape[0], 50
    method = SubpathLinearApproximation(dit_student(CD), partial(torch.optim.Adam, lr=1e-4), teacher,
                                        target_ema=partial(EMA, decays=[0.95]), gamma_dim=CD, guidance=3.0)
    # the boundary scalings at the official DDIM steps: ours at their level t_j = j t_max / 50, the official at 10 k
    c_skip, c_out = lcm_boundary(method.levels[1:])
    rows.append(("SLAM", "c_skip at the 50 levels (ours 10^4 t_j, official 10 k_j)",
                 rel(c_skip, d["slam/cskip_official_int"])))
    rows.append(("SLAM", "c_out at the 50 levels (ours 10^4 t_j, official 10 k_j)", rel(c_out, d["slam/cout_official_int"])))
    rows.append(("SLAM", "levels t_j vs the table's times of the official DDIM steps",
                 rel(method.levels[1:], d["slam/t_table"][torch.arange(19, 1000, 20)])))
    for loss in ("huber", "l2"):
        for g in ("gamma", "gamma1"):
            key = f"slam/{loss}/{g}"
            m = SubpathLinearApproximation(dit_student(CD), partial(torch.optim.Adam, lr=1e-4), teacher,
                                           target_ema=partial(EMA, decays=[0.95]), gamma_dim=CD, guidance=3.0,
                                           loss=loss)
            m._teacher.net = EqNet(weights(d, "slam/teacher"))
            m.net = EqNet(weights(d, "slam/student"), augment_dim=CD)
            target = EqNet(weights(d, "slam/target"), augment_dim=CD)
            m.averaged = lambda *a, _t=target, **k: _t  # type: ignore[method-assign]
            index, gamma = d[f"{key}/index"], d[f"{key}/gamma"]
            u = (index.double() + 0.5) / n_levels  # official DDIM index 0..49 = our level j - 1
            tag = f"{loss}, {'gamma = 1' if g == 'gamma1' else 'gamma ~ U(0, 1)'}"
            out = m.loss("net", {"x0": x0.float(), "label": y},
                         Replay([u, d[f"{key}/noise"].float(), gamma, torch.ones(bsz)]), None)  # type: ignore[arg-type]
            rows.append(("SLAM", f"loss, batch mean ({tag})", rel(out["loss"].mean(), d[f"{key}/loss"])))
            if g == "gamma1" and loss == "l2":
                rows.append(("SLAM", f"loss vs the official loss with LCM's reading ({tag})",
                             rel(out["loss"].mean(), d[f"{key}/loss_lcm"])))
                continue
            # the pieces, recomputed with the method's own helpers
            j = index + 1
            t_s, t_e = m.levels[j], m.levels[j - 1]
            b = (-1, 1, 1, 1)
            eps = d[f"{key}/noise"].double()
            x_s = (1 - t_s).view(b) * x0.double() + t_s.view(b) * eps
            x_e = m.teacher_step(x_s, t_s, t_e, y)
            rows.append(("SLAM", f"teacher DDIM step with CFG, x_e ({tag})", rel(x_e, d[f"{key}/x_prev"])))
            tgt = m.consistency_fn(target)(x_e.float(), t_e, y).out
            rows.append(("SLAM", f"target f_ema(x_e, t_e; gamma = 1) ({tag})", rel(tgt, d[f"{key}/target"])))
            gb = gamma.view(b)
            x_g = gb * x_s + (1 - gb) * ((1 - t_s) / (1 - t_e)).view(b) * x_e
            rows.append(("SLAM", f"x_gamma ({tag})", rel(x_g, d[f"{key}/inter_input"])))
            s_a = (1 - t_s) * t_e / (1 - t_e)
            s_t = ((1 - gamma.square()) * s_a.square() + gamma.square() * t_s.square()).sqrt()
            rows.append(("SLAM", f"sigma~ on the linear path (the official formula is the VP case) ({tag})",
                         rel(s_t, d[f"{key}/inter_sigma"])))
            a_s, s_s, a_e, s_e = d[f"{key}/vp_ends"].double().unbind(1)  # SD-v1.5's VP schedule at the same steps
            s_a_vp = a_s * s_e / a_e
            s_vp = ((1 - gamma.square()) * s_a_vp.square() + gamma.square() * s_s.square()).sqrt()
            rows.append(("SLAM", f"sigma~ on SD-v1.5's VP schedule, our formula vs the official ({tag})",
                         rel(s_vp, d[f"{key}/vp_inter_sigma"])))
            rows.append(("SLAM", f"gamma embedding emb(10 - 10 gamma) ({tag})",
                         rel(condition_embedding(10 - 10 * gamma, CD), d[f"{key}/gamma_embeds"])))
            st = m.consistency_fn(m.net)(x_g.float(), t_s, y, gamma=gamma, noise_level=s_t).out
            rows.append(("SLAM", f"student output vs the official sub-path reading ({tag})",
                         rel(st, d[f"{key}/model_pred"])))
            if g == "gamma1":
                rows.append(("SLAM", f"student output vs the official read at the start level (LCM's) ({tag})",
                             rel(st, d[f"{key}/model_pred_lcm"])))
                rows.append(("SLAM", f"loss vs the official loss with LCM's reading ({tag})",
                             rel(out["loss"].mean(), d[f"{key}/loss_lcm"])))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, help="the official side's float32 file (rfpp, cd, slam)")
    ap.add_argument("--official64", type=Path, help="the official side's float64 file (rfpp, cd, tdm, slam)")
    args = ap.parse_args(argv)
    results: dict[str, dict[tuple[str, str], float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, path in (("float32", args.official), ("float64", args.official64)):
            if path is None:
                continue
            d = load_file(str(path))
            rows: list[Row] = []
            for name, fn in (("rfpp", rfpp), ("cd", cd), ("tdm", tdm), ("slam", slam)):
                if any(k.startswith(name + "/") for k in d):
                    rows += fn(d, Path(tmp))
            results[tag] = {(m, q): v for m, q, v in rows}
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    print("| method | quantity | " + " | ".join(f"max rel. diff., {t}" for t in results) + " |")
    print("|---|---|" + "---|" * len(results))
    for k in keys:
        vals = [results[t].get(k) for t in results]
        cells = ["" if v is None else ("-" if v != v else f"{v:.1e}") for v in vals]
        print(f"| {k[0]} | {k[1]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
