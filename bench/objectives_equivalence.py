"""Consistency objectives and checkpoint averaging against the official code, on the same inputs and random numbers.

The official code is not part of this repository: it is run outside it (bench/README.md, "Consistency objectives and
averaging against the official code", gives the repositories, commits, shims and steps). This script writes the
shared inputs (``--dir D``: ``D/inputs.pt``, seeded), and after the official run has saved ``D/official.pt`` (its
outputs and the random draws it made) it runs our functions on the same inputs and draws (``--compare``) and prints,
per quantity, the largest relative difference ``max |ours - official| / max |official|`` (and the absolute one).

Quantities:

- ECT (Geng et al. 2024, "Consistency Models Made Easy"; locuslab/ect ``training/loss.py`` ``ECMLoss``,
  ``training/networks.py`` ``ECMPrecond``, ``training/ct_training_loop.py``): the mapping r(t) for stages 0..5 and
  q = 2, 4, 256 (float32 and float64); the per-sample loss of :class:`gen.objectives.EasyConsistencyTuning` against
  ``ECMLoss`` with the official draws of xi and eps replayed (both preconditioning modes of the official network,
  adaptive-weighting c = 0 and 0.03, the ``imgnet`` branch's EDM weighting); the consistency function against
  ``ECMPrecond`` (eval mode: boundary-shifted; train mode: EDM's); the 1- and 2-step sampler against ``generator_fn``;
  the stage of r(t) over a CIFAR-10 run (batch 128, 12.8 kimg ticks, ``--double 250``) against the loop's bookkeeping.
- iCT's pieces that openai/consistency_models shares (``cm/karras_diffusion.py``): the Karras grid, the boundary
  scalings, the consistency function and CT's loss with ``loss_norm="l2"`` at the same level index and noise (ours:
  :class:`gen.objectives.ImprovedConsistencyTraining`'s ``mse`` term with the level forced).
- EDM2 post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models";
  NVlabs/edm2 ``training/phema.py``, ``reconstruct_phema.py``): sigma_rel <-> gamma, the per-step beta, the averages
  of :class:`gen.ema.PowerFunctionEMA` over the same weight sequence, the profile inner products, the solve's
  coefficients for the snapshots ``scripts.posthoc_ema`` would select (time in optimizer steps here, in images there),
  and the reconstructions (theirs stored as float16 by ``reconstruct_phema``).

Examples::

    python bench/objectives_equivalence.py --dir /tmp/objeq/run            # writes inputs.pt
    python bench/objectives_equivalence.py --dir /tmp/objeq/run --compare  # reads official.pt, prints the table
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from gen.averaging import StoredAverage  # noqa: E402
from gen.ema import (  # noqa: E402
    PowerFunctionEMA,
    PowerProfile,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    power_inner_product,
    sigma_rel_to_gamma,
)
from gen.models.common import ModelOutput  # noqa: E402
from gen.models.precond import ConsistencyPrecond, EDMPrecond, consistency_coefficients  # noqa: E402
from gen.models.prediction import velocity_model  # noqa: E402
from gen.objectives import EasyConsistencyTuning, ImprovedConsistencyTraining  # noqa: E402
from gen.objectives.consistency import karras_levels, lognormal_level_probs, pseudo_huber  # noqa: E402
from gen.objectives.ect import ect_r, ect_stage  # noqa: E402
from gen.paths import EDMPath  # noqa: E402
from samplers import sample_consistency  # noqa: E402
from scripts.posthoc_ema import target_inputs  # noqa: E402

B, C, H = 16, 3, 8
SEED = 1234
# ECT loss cases, "name:q:stage:c:branch:mode:sigma_min" (mode: the official network's train/eval coefficients).
ECT_CASES = (
    "s0_eval:2:0:0:main:eval:0.002",
    "s3_huber_eval:2:3:0.03:main:eval:0.002",
    "q256_eval:256:0:0:main:eval:0.002",
    "imgnet_s1_eval:4:1:0:imgnet:eval:0.002",
    "s0_train:2:0:0:main:train:0.002",
    "s3_train:2:3:0:main:train:0.002",
)
PHEMA_BATCH, PHEMA_STEPS, PHEMA_SNAP_EVERY = 256, 1000, 100  # snapshots every 25,600 images (25 x 1024)
PHEMA_STDS = (0.05, 0.10)  # EDM2's defaults
PHEMA_OUT = (0.01, 0.02, 0.05, 0.08, 0.10, 0.15, 0.20, 0.25)
CM_SCALES = (11, 41, 1281)


class TinyNet(nn.Module):
    """``F(x, c) = tanh(W x + b + c u)`` per pixel: the network both sides wrap (the official side builds the same
    function from ``W, b, u``); ``c`` is EDM's ``ln(sigma) / 4``."""

    num_classes = 0

    def __init__(self, W: Tensor, b: Tensor, u: Tensor) -> None:
        super().__init__()
        self.W, self.b, self.u = W, b, u

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, **kw: Any) -> ModelOutput:
        c = t.reshape(-1).to(x.dtype)
        h = torch.einsum("oc,bchw->bohw", self.W.to(x.dtype), x) + self.b.to(x.dtype)[None, :, None, None]
        return ModelOutput(out=torch.tanh(h + c[:, None, None, None] * self.u.to(x.dtype)[None, :, None, None]))


class Replay:
    """The ``Randomness`` interface returning recorded draws in order (each reshaped to ``(B, *shape)``)."""

    def __init__(self, draws: Sequence[Tensor], n: int) -> None:
        self.draws, self.n = list(draws), n

    def __len__(self) -> int:
        return self.n

    def _next(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        d = self.draws.pop(0)
        if d.numel() != self.n * math.prod(shape):
            raise ValueError(f"replayed draw of {d.numel()} numbers for a request of {(self.n, *shape)}")
        return d.reshape(self.n, *shape).to(dtype)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._next(shape, dtype)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._next(shape, dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self._next(tuple(x.shape[1:]), x.dtype)


def write_inputs(d: Path) -> None:
    """The shared inputs, seeded (``d/inputs.pt``)."""
    g = torch.Generator().manual_seed(SEED)
    inp: dict[str, Any] = {
        "W": 0.8 * torch.randn(C, C, generator=g), "b": 0.1 * torch.randn(C, generator=g),
        "u": 0.5 * torch.randn(C, generator=g), "x0": 0.5 * torch.randn(B, C, H, H, generator=g),
        "ect_t_grid": torch.cat([torch.logspace(-3, math.log10(80.0), 197, dtype=torch.float64),
                                 torch.tensor([0.002, 0.821, 1.0, 80.0], dtype=torch.float64)]),
        "ect_cases": list(ECT_CASES), "ect_seed": SEED,
        "precond_sigma": torch.cat([torch.tensor([0.002, 0.003, 0.0025, 0.821]),
                                    torch.exp(torch.linspace(math.log(0.002), math.log(80.0), B - 4))]),
        "precond_x": torch.randn(B, C, H, H, generator=g),
        "gen_noise": torch.randn(B, C, H, H, generator=g),
        "phema_sigma_grid": torch.linspace(0.005, 0.28, 200, dtype=torch.float64),
        "phema_gamma_grid": torch.cat([torch.linspace(-0.3, 5, 50, dtype=torch.float64),
                                       torch.logspace(0.7, 3, 50, dtype=torch.float64)]),
        "phema_batch": PHEMA_BATCH, "phema_snap_every": PHEMA_SNAP_EVERY,
        "phema_stds": torch.tensor(PHEMA_STDS, dtype=torch.float64),
        "phema_out_stds": torch.tensor(PHEMA_OUT, dtype=torch.float64),
        "cm_n": 18, "cm_num_scales": torch.tensor(CM_SCALES),
    }
    # A weight trajectory: a drifting random walk with a decaying oscillation (P = 32 weights per step), float64.
    steps = torch.arange(1, PHEMA_STEPS + 1, dtype=torch.float64)[:, None]
    walk = (0.02 * torch.randn(PHEMA_STEPS, 32, generator=g, dtype=torch.float64)).cumsum(0)
    inp["phema_weights"] = walk + torch.sin(steps / 37.0 + torch.arange(32)) * torch.exp(-steps / 400.0)
    n = 60  # profile pairs for the inner products: times 1e3 .. 1e8 images, widths 0.01 .. 0.25
    inp["corr_ta"] = torch.logspace(3, 8, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    inp["corr_tb"] = torch.logspace(3, 8, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    inp["corr_sa"] = 0.01 + 0.24 * torch.rand(n, generator=g, dtype=torch.float64)
    inp["corr_sb"] = 0.01 + 0.24 * torch.rand(n, generator=g, dtype=torch.float64)
    d.mkdir(parents=True, exist_ok=True)
    torch.save(inp, d / "inputs.pt")
    print(f"wrote {d / 'inputs.pt'}; now run the official side (bench/README.md), then --compare")


@dataclass
class Row:
    """One compared quantity: relative and absolute largest difference, and the official values' scale."""

    part: str
    quantity: str
    rel: float
    abs: float
    scale: float
    note: str = ""
    own: float = float("nan")  # the official code's float32 result against its float64 result (relative)
    rel64: float = float("nan")  # ours against the official float64 result (relative)


def diff(part: str, quantity: str, ours: Tensor | np.ndarray, official: Tensor | np.ndarray, note: str = "") -> Row:
    a = torch.as_tensor(np.asarray(ours) if not isinstance(ours, Tensor) else ours).double()
    b = torch.as_tensor(np.asarray(official) if not isinstance(official, Tensor) else official).double()
    if a.shape != b.shape:
        raise ValueError(f"{part} {quantity}: shapes {tuple(a.shape)} (ours) and {tuple(b.shape)} (official)")
    err = float((a - b).abs().max()) if a.numel() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    return Row(part, quantity, err / scale if scale > 0 else err, err, scale, note)


OFF64: dict[str, Tensor] = {}  # official64.pt, when the float64 run was made


def diffk(part: str, quantity: str, ours: Tensor | np.ndarray, off: dict[str, Tensor], key: str, note: str = "",
          ours64: Tensor | None = None) -> Row:
    """``diff`` against ``off[key]``, with the float64 columns where official64.pt has the key (``ours64``: our
    float64 result, if we compute one; else our float32 result is held against the official float64 one)."""
    row = diff(part, quantity, ours, off[key], note)
    if key in OFF64:
        row.own = diff(part, quantity, off[key], OFF64[key]).rel
        row.rel64 = diff(part, quantity, ours if ours64 is None else ours64, OFF64[key]).rel
    return row


def progress_at(nimg: int) -> SimpleNamespace:
    """The ``Progress`` fields an objective reads."""
    return SimpleNamespace(nimg=nimg, total_nimg=max(nimg, 1))


def ect_rows(inp: dict[str, Any], off: dict[str, Tensor]) -> list[Row]:
    rows = []
    tg = inp["ect_t_grid"]
    worst: dict[str, float] = {"fp32": 0.0, "fp64": 0.0}
    for q in (2.0, 4.0, 256.0):
        for stage in range(6):
            for prec, dt in (("fp64", torch.float64), ("fp32", torch.float32)):
                r = diff("ect", "r", ect_r(tg.to(dt), stage, q), off[f"ect_r_q{q:g}_s{stage}_{prec}"])
                worst[prec] = max(worst[prec], r.rel)
    rows.append(Row("ect", "r(t), stages 0-5, q 2/4/256, fp64", worst["fp64"], float("nan"), 80.0))
    rows.append(Row("ect", "r(t), stages 0-5, q 2/4/256, fp32", worst["fp32"], float("nan"), 80.0))

    net = TinyNet(inp["W"], inp["b"], inp["u"])
    x0 = inp["x0"]
    for case in inp["ect_cases"]:
        name, q, stage, c, branch, mode, smin = case.split(":")
        obj = EasyConsistencyTuning(teacher="edm", sigma_min=float(smin), q=float(q), stage_kimg=1.0,
                                    huber_c=float(c), weighting="edm" if branch == "imgnet" else "inv_dt")
        rng = Replay([off[f"ect_xi_{name}"], off[f"ect_eps_{name}"]], B)
        with torch.no_grad():
            res = obj(net, {"x0": x0.clone()}, rng, progress_at(int(stage) * 1000))
        note = "official network in train mode (EDM coefficients)" if mode == "train" else ""
        rows.append(diffk("ect", f"loss {name} (q {q}, stage {stage}, c {c}, {branch})", res["loss"], off,
                          f"ect_loss_{name}", note))

    # iCT's pseudo-Huber (gen.objectives.consistency.pseudo_huber) in place of ECT's adaptive_l2, against ECMLoss
    # with c = 0.03: the same whole-sample form sqrt(||a - b||^2 + c^2) - c.
    import gen.objectives.ect as ect_mod

    kept = ect_mod.adaptive_l2
    ect_mod.adaptive_l2 = pseudo_huber  # type: ignore[assignment]
    try:
        obj = EasyConsistencyTuning(teacher="edm", sigma_min=0.002, q=2.0, stage_kimg=1.0, huber_c=0.03)
        with torch.no_grad():
            res = obj(net, {"x0": x0.clone()}, Replay([off["ect_xi_s3_huber_eval"], off["ect_eps_s3_huber_eval"]], B),
                      progress_at(3000))
    finally:
        ect_mod.adaptive_l2 = kept
    rows.append(diffk("ict", "pseudo-Huber (iCT's) in ECT's loss, c 0.03, vs ECMLoss", res["loss"], off,
                      "ect_loss_s3_huber_eval"))

    xs, sig = inp["precond_x"], inp["precond_sigma"]
    with torch.no_grad():
        for smin in (0.002, 0.003):
            f = ConsistencyPrecond(net, 0.5, smin)(xs, sig).out
            f64 = ConsistencyPrecond(net, 0.5, smin)(xs.double(), sig.double()).out
            rows.append(diffk("ect", f"consistency fn vs ECMPrecond eval, sigma_min {smin:g}", f, off,
                              f"ect_precond_eval_{smin:g}", ours64=f64))
        rows.append(diff("ect", "consistency fn (0.002) vs ECMPrecond train mode", ConsistencyPrecond(net, 0.5, 0.002)(xs, sig).out,
                         off["ect_precond_train_0.002"], "EDM coefficients in official training"))
        # At the sampling levels (sigma 0.821 and 80): the official train -> eval switch, and ours against the
        # official evaluation function with its default sigma_min 0.003.
        at = [3, len(sig) - 1]
        rows.append(diff("ect", "ECMPrecond eval (0.003) vs its train mode, at sigma 0.821 and 80",
                         off["ect_precond_eval_0.003"][at], off["ect_precond_train_0.002"][at], "official's own switch"))
        rows.append(diff("ect", "consistency fn (0.002) vs ECMPrecond eval (0.003), at sigma 0.821 and 80",
                         ConsistencyPrecond(net, 0.5, 0.002)(xs, sig).out[at], off["ect_precond_eval_0.003"][at]))
        rows.append(diff("ect", "EDMPrecond vs ECMPrecond train mode", EDMPrecond(net, 0.5)(xs, sig).out,
                         off["ect_precond_train_0.002"]))
    rows.append(Row("ect", f"ECMPrecond default sigma_min (ct_train.py builds it so): "
                    f"{float(off['ect_precond_default_sigma_min']):g}", float("nan"), float("nan"), float("nan")))

    spec = EasyConsistencyTuning(teacher="edm", sigma_min=0.002).prediction_spec()
    model_fn = velocity_model(net, spec)
    for steps, mids in ((1, ()), (2, (0.821,))):
        replay = Replay(list(off[f"ect_gen_{steps}step_draws"]), B)  # the official run's re-noising draws
        grid = torch.tensor([80.0, *mids, 0.0], dtype=torch.float64)
        with torch.no_grad():
            xs_ = sample_consistency(model_fn, inp["gen_noise"].double(), grid, path=EDMPath(80.0),
                                     randn_like=replay.randn_like, sigma_min=0.002)
        rows.append(diffk("ect", f"sampler, {steps} step(s) (fp64) vs generator_fn", xs_, off, f"ect_gen_{steps}step",
                          "re-noise sqrt(t^2 - sigma_min^2) vs t" if steps == 2 else ""))

    trace = off["ect_stage_trace"]
    ours = torch.tensor([ect_stage(int(n), 3_200_000) for n in trace[:, 0]])
    bad = (ours != trace[:, 1]).nonzero().flatten()
    firsts = [int(trace[(trace[:, 1] == s).nonzero()[0, 0], 0]) for s in range(1, int(trace[:, 1].max()) + 1)]
    rows.append(Row("ect", f"stage over a CIFAR-10 run: {len(bad)} of {len(trace)} steps differ; official stage s "
                    f"starts at nimg {firsts[:3]}..., ours at s * 3,200,000", len(bad) / len(trace), float(len(bad)),
                    float(len(trace))))
    return rows


def ict_rows(inp: dict[str, Any], off: dict[str, Tensor]) -> list[Row]:
    rows = []
    n = int(inp["cm_n"])
    rows.append(diff("ict", f"Karras grid, N = {n} (fp32 official)", karras_levels(n).flip(0),
                     off["cm_karras"][:-1]))
    sig = inp["precond_sigma"].double()
    ours = torch.stack(consistency_coefficients(sig, 0.5, 0.002)[:3])
    rows.append(diff("ict", "c_skip, c_out, c_in (fp64)", ours, off["cm_scalings"]))
    net = TinyNet(inp["W"], inp["b"], inp["u"])
    with torch.no_grad():
        f = ConsistencyPrecond(net, 0.5, 0.002)(inp["precond_x"].double(), sig).out
    rows.append(diff("ict", "consistency fn vs KarrasDenoiser.denoise (fp64)", f, off["cm_denoise"],
                     "c_noise ln(sigma)/4 vs ln(sigma + 1e-44)/4"))
    for N in inp["cm_num_scales"].tolist():
        obj = ImprovedConsistencyTraining()
        obj.num_levels = lambda progress, N=N: N  # type: ignore[method-assign]  # the grid CM was given
        sigmas = obj.levels(N)
        cdf = lognormal_level_probs(sigmas).cumsum(0)
        # CM's index i counts from sigma_max (student at level i, teacher at i + 1): ours n = N - 2 - i, and the
        # uniform that selects n is the middle of its CDF interval.
        n_ours = N - 2 - off[f"cm_ct_idx_N{N}"]
        lo = torch.where(n_ours > 0, cdf[(n_ours - 1).clamp(min=0)], torch.zeros_like(cdf[0]))
        uu = ((lo + cdf[n_ours]) / 2).float()
        rng = Replay([uu, off[f"cm_ct_noise_N{N}"]], B)
        with torch.no_grad():
            res = obj(net, {"x0": inp["x0"].clone()}, rng, None)
        rows.append(diffk("ict", f"CT loss (l2, uniform weight) N = {N}, same index and noise", res["mse"], off,
                          f"cm_ct_loss_N{N}"))
    return rows


class Holder(nn.Module):
    """One float64 parameter vector: the 'network' whose weights the EMAs average."""

    def __init__(self, p: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(p, dtype=torch.float64))


def phema_rows(inp: dict[str, Any], off: dict[str, Tensor]) -> list[Row]:
    rows = []
    sg = inp["phema_sigma_grid"].tolist()
    rows.append(diff("phema", "sigma_rel -> gamma (0.005..0.28)", np.array([sigma_rel_to_gamma(s) for s in sg]),
                     off["phema_std_to_exp"]))
    rows.append(diff("phema", "gamma -> sigma_rel (-0.3..1000)",
                     np.array([gamma_to_sigma_rel(g) for g in inp["phema_gamma_grid"].tolist()]), off["phema_exp_to_std"]))
    bsz, seq = int(inp["phema_batch"]), inp["phema_weights"]
    stds = [float(s) for s in inp["phema_stds"]]
    profiles = [PowerProfile(f"p{s}", s) for s in stds]
    betas = torch.tensor([[p.beta(k * bsz, bsz) for p in profiles] for k in range(seq.shape[0])], dtype=torch.float64)
    rows.append(diff("phema", "per-step beta, 1000 steps", betas, off["phema_betas"]))

    holder = Holder(seq.shape[1])
    with torch.no_grad():
        holder.w.copy_(seq[0])
    ema = PowerFunctionEMA(holder, stds)
    snaps = []
    every = int(inp["phema_snap_every"])
    for k in range(seq.shape[0]):
        with torch.no_grad():
            holder.w.copy_(seq[k])
        ema.update(holder, k * bsz, bsz)  # images before the step, as gen.train.loop passes them
        if (k + 1) % every == 0:
            snaps.append(torch.stack([ema.averaged(n).w.detach().clone() for n in ema.names]))
    snaps_t = torch.stack(snaps)
    rows.append(diff("phema", "EMA averages at the 10 snapshots (fp64)", snaps_t, off["phema_snaps"]))

    rows.append(diff("phema", "profile inner products (60 pairs, 1e3..1e8)",
                     power_inner_product(inp["corr_ta"].numpy(), inp["corr_sa"].numpy(), inp["corr_tb"].numpy(),
                                         inp["corr_sb"].numpy()), off["phema_corr"]))
    snap_nimg = off["phema_snap_nimg"].tolist()
    stored = [StoredAverage(Path(f"snapshot-{n}-{s}"), int(n), int(n) // bsz, s) for n in snap_nimg for s in stds]
    out_stds = [float(s) for s in inp["phema_out_stds"]]
    # Direct EMAs of the target widths: what the reconstruction approximates.
    truth_holder = Holder(seq.shape[1])
    with torch.no_grad():
        truth_holder.w.copy_(seq[0])
    truth_ema = PowerFunctionEMA(truth_holder, out_stds)
    truth = {}
    for k in range(seq.shape[0]):
        with torch.no_grad():
            truth_holder.w.copy_(seq[k])
        truth_ema.update(truth_holder, k * bsz, bsz)
        if (k + 1) * bsz in snap_nimg:
            truth[(k + 1) * bsz] = torch.stack([truth_ema.averaged(n).w.detach().clone() for n in truth_ema.names])
    for label, t_idx in (("last", len(snap_nimg) - 1), ("mid", len(snap_nimg) // 2)):
        out_nimg = snap_nimg[t_idx]
        inputs = target_inputs(stored, out_nimg / 1000, Path("run"))
        t_out = max(s.step for s in inputs)
        x = posthoc_coefficients([s.step for s in inputs], [s.sigma_rel for s in inputs], [t_out] * len(out_stds),
                                 out_stds)
        in_off = off[f"phema_coef_{label}_in"]
        same_inputs = [(s.nimg, s.sigma_rel) for s in inputs] == [(int(a), float(b)) for a, b in in_off.tolist()]
        rows.append(diff("phema", f"coefficients at snapshot {t_idx + 1} of {len(snap_nimg)} ({len(inputs)} inputs; "
                         f"same inputs: {same_inputs})", x, off[f"phema_coef_{label}"]))
        weights = torch.stack([snaps_t[snap_nimg.index(s.nimg), stds.index(s.sigma_rel)] for s in inputs])
        rec = torch.from_numpy(x).T @ weights  # (n_out, P), float64
        rows.append(diff("phema", f"reconstruction at snapshot {t_idx + 1} (official stored as fp16)", rec,
                         off[f"phema_rec_{label}"]))
        rows.append(diff("phema", f"reconstruction at snapshot {t_idx + 1} vs a directly tracked EMA (ours)", rec,
                         truth[out_nimg], "fit error, not an implementation difference"))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| part | quantity | max rel. diff | max abs. diff | official max abs | official fp32 vs fp64 | ours vs "
             "official fp64 | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f64 = [f"{v:.1e}" if v == v else "" for v in (r.own, r.rel64)]
        lines.append(f"| {r.part} | {r.quantity} | {r.rel:.1e} | {r.abs:.1e} | {r.scale:.3g} | {f64[0]} | {f64[1]} | "
                     f"{r.note} |")
    return "\n".join(lines)


def compare(d: Path) -> list[Row]:
    inp = torch.load(d / "inputs.pt", weights_only=False)
    off = torch.load(d / "official.pt", weights_only=True)
    if (d / "official64.pt").exists():
        OFF64.update(torch.load(d / "official64.pt", weights_only=True))
    torch.set_num_threads(1)
    return ect_rows(inp, off) + ict_rows(inp, off) + phema_rows(inp, off)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="where inputs.pt and official.pt live")
    ap.add_argument("--compare", action="store_true", help="compare with D/official.pt instead of writing inputs")
    args = ap.parse_args(argv)
    if not args.compare:
        write_inputs(args.dir)
        return 0
    rows = compare(args.dir)
    print(table(rows))
    (args.dir / "comparison.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
