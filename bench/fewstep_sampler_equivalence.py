"""The few-step students' samplers against their official code: TDM's K-step DDIM generator and SLAM's LCM multistep
sampler (bench/README.md, "Few-step student samplers against the official code").

The official side runs outside this repository (README: repositories, commits, shims): TDM's demo loop
``generate_new`` on its DDPM schedule (linear beta 1e-4 ... 0.02) and diffusers' ``LCMScheduler`` on SD-v1.5's
(scaled-linear beta 0.00085 ... 0.012), both on variance-preserving (VP) paths, with an epsilon network that is the VP
reading of one closed-form velocity ``g`` on our linear path. It saves the weights of ``g``, the unit noise, the
official grids, the LCM scheduler's fresh re-noising draws and the samples (float32 and float64) in one safetensors
file. This script is our side: it rebuilds ``g`` as a backbone, runs ``samplers.sample_ddim`` and ``sample_lcm``
through the snapshot wrappers (``gen.models.prediction.velocity_model``; ``StepConditioned``, ``SubpathConsistency``)
on the times that correspond exactly to the official ones, replays the official draws, and prints the largest
relative difference ``max |ours - official| / max |official|`` per quantity.

    python bench/fewstep_sampler_equivalence.py --official /tmp/fssamp/official.safetensors

The exact correspondence: a VP state ``x_vp = a x0 + s eps`` at DDPM step k (``a^2 = alpha-bar_k``,
``s^2 = 1 - a^2``) is the linear-path state ``x = x_vp / (a + s) = (1 - t) x0 + t eps`` at ``t = s / (a + s)`` (the
same signal-to-noise ratio), with the same ``x0`` and ``eps``. Deterministic DDIM steps, the epsilon reading and the
re-noising ``a' x0 + s' n`` are therefore the same maps in either coordinate; only LCM's ``c_skip`` multiplies the
state itself (``x_vp`` there, ``x`` here), and it is below 3e-9 at every LCM time. The official start is the unit
noise at the top step (no ``a x0`` term, ``s < 1``): ours starts from ``noise / s_top`` so that the two states agree.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from gen.models.common import ModelOutput  # noqa: E402
from gen.models.prediction import velocity_model  # noqa: E402
from gen.models.student import condition_embedding, lcm_boundary  # noqa: E402
from gen.paths import LinearPath  # noqa: E402
from samplers import lcm_grid, sample_ddim, sample_lcm, uniform_grid  # noqa: E402

DIM = 16  # width of the condition slot (TDM-unify's K, SLAM's gamma)
STEPS = (1, 2, 4)
LINEAR = {"_target_": "gen.paths.LinearPath"}


class EqNet(nn.Module):
    """The shared closed form as a velocity backbone on ``LinearPath``: ``forward(x, t, y, augment=None)``.

    ``v = tanh(W x + b) (1 + sin(3 f t + p) / 2) - 0.8 x + 0.1 augment A`` (per-pixel channel mix ``W``; the official
    side computes the same formula from the same saved weights).
    """

    augment_dim = DIM

    def __init__(self, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        for k in "WbfpA":
            self.register_buffer(k, weights[k].double())

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, augment: Tensor | None = None,
                **_: Any) -> ModelOutput:
        dt = x.dtype
        w = {k: getattr(self, k).to(dt) for k in "WbfpA"}
        t = t.to(dt).reshape(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", w["W"], x) + w["b"].view(1, -1, 1, 1)
        v = torch.tanh(h) * (1 + 0.5 * torch.sin(w["f"].view(1, -1, 1, 1) * 3 * t + w["p"].view(1, -1, 1, 1))) - 0.8 * x
        if augment is not None:
            v = v + 0.1 * (augment.to(dt) @ w["A"]).view(x.shape[0], -1, 1, 1)
        return ModelOutput(out=v)


def rel(ours: Tensor, official: Tensor) -> float:
    """``max |ours - official| / max |official|`` (0 when both are 0)."""
    ours, official = ours.double().reshape(official.shape), official.double()
    den = official.abs().max().item()
    num = (ours - official).abs().max().item()
    return num / den if den > 0 else num


def vp_times(alphas_cumprod: Tensor, steps: list[int]) -> tuple[Tensor, float]:
    """The linear-path times ``s / (a + s)`` of VP steps (then 0), and ``s`` at the first step. float64."""
    ac = alphas_cumprod.double()[torch.tensor(steps)]
    a, s = ac.sqrt(), (1 - ac).sqrt()
    return torch.cat([s / (a + s), torch.zeros(1, dtype=torch.float64)]), float(s[0])


class Draws:
    """``randn_like`` that hands out the official scheduler's re-noising draws in order."""

    def __init__(self, draws: list[Tensor]) -> None:
        self.draws = list(draws)

    def __call__(self, like: Tensor) -> Tensor:
        return self.draws.pop(0).to(like.dtype).reshape(like.shape)


def compare(off: Mapping[str, Tensor]) -> list[tuple[str, str, float, float]]:
    """Rows ``(method, quantity, float32, float64)``."""
    net = EqNet({k[2:]: v for k, v in off.items() if k.startswith("w.")})
    noise = off["w.noise"]
    path = LinearPath()
    tdm_fn = velocity_model(net, {"path": LINEAR, "prediction": "velocity"})
    unify_fn = velocity_model(net, {"path": LINEAR, "prediction": "velocity",
                                    "precond": {"_target_": "gen.models.student.StepConditioned", "dim": DIM}})
    lcm_fn = velocity_model(net, {"path": LINEAR, "prediction": "consistency",
                                  "precond": {"_target_": "gen.models.student.SubpathConsistency", "gamma_dim": DIM}})
    res: dict[tuple[str, str], dict[str, float]] = {}

    def put(method: str, what: str, tag: str, value: float) -> None:
        cell = res.setdefault((method, what), {})
        cell[tag] = max(cell.get(tag, 0.0), value)

    for tag, dt in (("f32", torch.float32), ("f64", torch.float64)):
        for k in STEPS:
            # TDM: the demo's K-step generator at steps T - 1 - i T / K.
            grid = off[f"{tag}.tdm{k}.grid"].tolist()
            ts, s_top = vp_times(off[f"{tag}.tdm.ac"], grid)
            x = (noise / s_top).to(dt)
            put("TDM", f"samples, {k} step(s), ours on the official times", tag,
                rel(sample_ddim(tdm_fn, x, ts, path=path), off[f"{tag}.tdm{k}"]))
            put("TDM-unify", f"samples, {k} step(s), student told K (`condition_steps`)", tag,
                rel(sample_ddim(unify_fn, x, ts, path=path, condition_steps=True), off[f"{tag}.tdmu{k}"]))
            put("TDM-unify", "K embedding: `condition_embedding(K)` vs LCM's `guidance_scale_embedding(K)`", tag,
                rel(condition_embedding(torch.full((noise.shape[0],), float(k)), DIM), off[f"{tag}.tdmu{k}.emb"]))
            preset = uniform_grid(k, path=path)  # configs/sampler/tdm_*: t_i = i / K from t = 1
            put("TDM", f"samples, {k} step(s), ours as the preset runs (t_i = i/K from 1)", tag,
                rel(sample_ddim(tdm_fn, noise.to(dt), preset, path=path), off[f"{tag}.tdm{k}"]))
            # SLAM: diffusers' LCMScheduler, lcm_origin_steps = 50, guidance 1 (gamma = 1: emb(0)).
            grid = off[f"{tag}.lcm{k}.grid"].tolist()
            ts, s_top = vp_times(off[f"{tag}.lcm.ac"], grid)
            draws = [off[f"{tag}.lcm{k}.draw{i}"] for i in range(k - 1)]
            x = (noise / s_top).to(dt)
            put("SLAM", f"samples, {k} step(s), ours on the official times, the official draws", tag,
                rel(sample_lcm(lcm_fn, x, ts, path=path, randn_like=Draws(draws)), off[f"{tag}.lcm{k}"]))
            put("SLAM", f"samples, {k} step(s), ours as the presets run (`lcm_grid` levels from sigma(t) noise)", tag,
                rel(sample_lcm(lcm_fn, noise.to(dt), lcm_grid(k, 0.936), path=path, randn_like=Draws(draws)),
                    off[f"{tag}.lcm{k}"]))
            # Our levels and the official steps under distill/slam.py's table (step 20 j - 1 <-> level j t_max / 50).
            table = torch.tensor([(s + 1) // 20 * 0.936 / 50 for s in grid] + [0.0], dtype=torch.float64)
            put("SLAM", f"times, {k} step(s): `lcm_grid` (the presets) vs the official steps under the table", tag,
                rel(lcm_grid(k, 0.936), table))
            put("SLAM", f"times, {k} step(s): the old presets' `uniform_grid` vs the same", tag,
                rel(uniform_grid(k, 0.936), table))
            put("SLAM", f"samples, {k} step(s): ours on the old uniform times vs on `lcm_grid`", tag,
                rel(sample_lcm(lcm_fn, noise.to(dt), uniform_grid(k, 0.936), path=path, randn_like=Draws(draws)),
                    sample_lcm(lcm_fn, noise.to(dt), lcm_grid(k, 0.936), path=path, randn_like=Draws(draws))))
            # TDM's preset grid under the loss comparison's table (step i L - 1 <-> i / K).
            tgrid = off[f"{tag}.tdm{k}.grid"].tolist()
            ttable = torch.tensor([(s + 1) / 1000 for s in tgrid] + [0.0], dtype=torch.float64)
            put("TDM", f"times, {k} step(s): the preset's `uniform_grid` vs the official steps under the table", tag,
                rel(uniform_grid(k, path=path), ttable))
        put("SLAM", "gamma = 1 embedding: `condition_embedding(0)` vs the LCM pipeline's `w = guidance - 1 = 0`", tag,
            rel(condition_embedding(torch.zeros(noise.shape[0]), DIM), off[f"{tag}.lcm.emb"]))
        steps4 = off[f"{tag}.lcm4.grid"].tolist()
        ours_c = lcm_boundary(vp_times(off[f"{tag}.lcm.ac"], steps4)[0][:-1])[0]
        put("SLAM", "c_skip at the 4-step times, largest: ours (10^4 t, t the SNR image)", tag, float(ours_c.max()))
        put("SLAM", "c_skip at the 4-step times, largest: LCM's formula at 10 k", tag,
            max(0.25 / ((10.0 * k) ** 2 + 0.25) for k in steps4))
    order = list(dict.fromkeys(k for k in res))
    return [(m, w, res[(m, w)].get("f32", float("nan")), res[(m, w)].get("f64", float("nan"))) for m, w in order]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True, help="the official side's safetensors file")
    args = ap.parse_args(argv)
    off = load_file(str(args.official))
    print("| method | quantity | float32 | float64 |")
    print("|---|---|---|---|")
    for method, what, a, b in compare(off):
        print(f"| {method} | {what} | {a:.1e} | {b:.1e} |")


if __name__ == "__main__":
    main()
