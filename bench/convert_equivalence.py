"""Converted checkpoints against the official modules and samplers, on the same random weights (issue 22).

For each source (dit, sit, repa, reg, lightningdit, ddt) this script writes a checkpoint with seeded random values
in the official layout (the key names and shapes of ``tests/fixtures/convert/<source>_keys.json``: width 64, 3 blocks,
4 heads, 10 classes, 4 channels, 8x8 latents; DDT 4 blocks, 3 in the encoder). The official code is not part of this
repository: it is run outside it (bench/README.md, "Converted checkpoints against the official code", gives the
repositories, commits and steps); it loads these files with ``strict=True``, evaluates the network at several
``(x, t, y)`` (the null class included) and runs the official sampler from given noise, and saves inputs and results
in ``official_<source>.safetensors``. This script then converts the same files (``gen.models.convert``), rebuilds
the models as a snapshot is rebuilt, and reports, per source, the largest absolute and relative
(``max |ours - official| / max |official|``) differences of

- ``net``: our bare backbone against the official module's output, at the official time (DiT: all 8 channels,
  learned variance included; SiT: the 4 channels the official forward returns; REG: also the class-token output);
- ``adapter``: our velocity function (``gen.models.prediction.velocity_model`` with the snapshot's prediction spec,
  i.e. the time adapter) at our time, mapped to the official convention (SiT/LightningDiT/DDT: ``-v(x, 1 - s)``;
  DiT: epsilon at the EDM time ``t = r_k = sqrt((1 - abar_k) / abar_k)`` of step k on ``x * sqrt(1 + r_k^2)``);
- ``ode`` / ``sde``: our samplers (``samplers.sample_euler`` / ``sample_heun`` / ``sample_euler_maruyama``) on the
  converted model against the official sampler from the same noise (SDE: the official run's ``randn_like`` /
  ``randn`` draws are replayed in order), unguided and (``*_cfg``) with the guidance of the source's stored sampler
  preset (``samplers.cfg``), against the official guided sampler; ``*_sensitivity``: how far our sample moves when
  the noise moves by 1e-6.

With ``official64_<source>.safetensors`` (the same run on a float64 copy of the official sources, their float32
casts made float64) the same rows are reported in float64 (``*_fp64``; our backbones keep the sinusoid, RMSNorm and
RoPE in float32 by design, which bounds these), and ``official_*_fp32_vs_fp64`` gives the official code's own float32
rounding, the scale against which the float32 differences are judged.

Examples::

    python bench/convert_equivalence.py --dir /tmp/conv_eq                 # writes <dir>/<source>.pt
    python bench/convert_equivalence.py --dir /tmp/conv_eq --compare       # reads <dir>/official[64]_<source>.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from gen.models.adapters import ddpm_alphas_cumprod  # noqa: E402
from gen.models.convert import SOURCES, convert_state, read_checkpoint, select_weights  # noqa: E402
from gen.models.prediction import prediction_path, velocity_model  # noqa: E402
from gen.nn import rope_2d_axial  # noqa: E402
from gen.utils.ckpt import build_from_snapshot  # noqa: E402
from samplers import (  # noqa: E402
    Streams,
    cfg,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
    shifted_grid,
    uniform_grid,
)

FIXTURES = ROOT / "tests" / "fixtures" / "convert"
NULL_CLASS = 10
ODE_STEPS = 20  # intervals of every sampler run (the outside script uses the same)
LIGHTNINGDIT_SHIFT = 0.3  # hustvl/LightningDiT inference: timestep_shift 0.3 in their time (data at 1)


def random_official_state(source: str, seed: int = 0) -> dict[str, Tensor]:
    """Seeded random tensors with the official key names and shapes of the fixture (norm weights near 1).

    REG's ``pos_embed`` row 0 (the class token's position) is zero, as the official initialisation makes it;
    LightningDiT's ``feat_rope`` buffers hold the axial RoPE tables (the outside run checks them against the
    official module's own).
    """
    keys = json.loads((FIXTURES / f"{source}_keys.json").read_text())["keys"]
    g = torch.Generator().manual_seed(seed)
    state: dict[str, Tensor] = {}
    for key, shape in keys.items():
        v = 0.2 * torch.randn(shape, generator=g)
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm_final.weight")):
            v = 1.0 + 0.1 * v
        state[key] = v
    if source == "reg":
        state["pos_embed"][:, 0] = 0.0
    if source == "lightningdit":
        cos, sin = rope_2d_axial(64 // 4, 8, 8, 10000.0)
        state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = cos, sin
    return state


def write_checkpoints(folder: Path, seed: int = 0) -> list[Path]:
    """``<folder>/<source>.pt`` for every source: a bare state dict, DDT in its Lightning container."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in SOURCES:
        state = random_official_state(source, seed)
        obj: Any = {"state_dict": {f"ema_denoiser.{k}": v for k, v in state.items()}} if source == "ddt" else state
        torch.save(obj, folder / f"{source}.pt")
        paths.append(folder / f"{source}.pt")
    return paths


def converted_model(source: str, ckpt: Path, input_size: int = 8) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The converted backbone (rebuilt as from a snapshot) and its prediction spec."""
    state, _ = select_weights(read_checkpoint(ckpt), source, ckpt)
    conv = convert_state(source, state, ckpt, num_heads=4, encoder_blocks=3, input_size=input_size)
    return build_from_snapshot(conv.model, conv.tensors, str(ckpt)).eval(), conv.prediction


def _diff(ours: Tensor, ref: Tensor) -> dict[str, float]:
    err = float((ours.double() - ref.double()).abs().max())
    return {"abs": err, "rel": err / float(ref.double().abs().max())}


def _replay(draws: dict[tuple[int, ...], list[Tensor]]) -> Callable[[Tensor], Tensor]:
    """A ``randn_like`` that returns the recorded official draws of x's shape, in order."""

    def randn_like(x: Tensor) -> Tensor:
        queue = draws[tuple(x.shape)]
        if not queue:
            raise RuntimeError(f"more noise draws of shape {tuple(x.shape)} than the official sampler made")
        return queue.pop(0).to(x.dtype)

    return randn_like


@torch.no_grad()
def compare_source(source: str, ckpt: Path, ref: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Differences of the network, the adapted velocity and the samplers against the official outputs.

    Everything runs in the dtype of the official run's inputs (float32, or float64 for ``official64_*`` files).
    """
    net, spec = converted_model(source, ckpt)
    net = net.to(ref["x"].dtype)
    model_fn = velocity_model(net, spec)
    path = prediction_path(spec)
    x, t, y = ref["x"], ref["t"], ref["y"]
    rows: dict[str, dict[str, float]] = {}
    official = ref["out"]
    if source == "reg":
        res = net(x, t, y, extra_token=ref["cls_in"])
        rows["net"] = _diff(res.out, official)
        rows["net_cls_token"] = _diff(res.extra, ref["cls_out"])
        v_img, v_tok = model_fn((x, ref["cls_in"]), t.double(), y)
        rows["adapter"] = _diff(v_img, official)
        rows["adapter_cls_token"] = _diff(v_tok, ref["cls_out"])
    else:
        out = net(x, t, y).out
        rows["net"] = _diff(out[:, : official.shape[1]], official)
        c = x.shape[1]
        if source == "dit":  # our time on the EDM path: the noise ratio r_k of DDPM step k; x in our state x / alpha
            abar = ddpm_alphas_cumprod(1000)[t.long()]
            r = torch.sqrt((1 - abar) / abar)
            x_ours = (x.double() * torch.sqrt(1 + r**2).view(-1, 1, 1, 1)).to(x.dtype)
            rows["adapter"] = _diff(model_fn(x_ours, r, y), official[:, :c])
        elif source == "repa":
            rows["adapter"] = _diff(model_fn(x, t.double(), y), official)
        else:  # data at s = 1 in theirs: our t = 1 - s, our velocity = -theirs
            rows["adapter"] = _diff(-model_fn(x, 1.0 - t.double(), y), official[:, :c])
    if "out16" in ref:  # DDT (no position table) at 16x16 latents: its RoPE on an 8x8 token grid
        net16 = converted_model(source, ckpt, input_size=16)[0].to(x.dtype)
        rows["net_16x16"] = _diff(net16(ref["x16"], t, y).out, ref["out16"])
    # Sampling from the same noise, without guidance and with the guidance of the snapshot's stored sampler.
    # LightningDiT also at guidance 1.5: at its 6.7 the random-weight ODE is chaotic (see *_sensitivity).
    runs = [("", model_fn), ("_cfg", guided_model_fn(model_fn, source))]
    if "ode_cfg15.out" in ref:
        runs.append(("_cfg15", guided_model_fn(model_fn, source, 1.5)))
    for tag, fn in runs:
        for k, v in compare_sampling(source, fn, path, ref, tag).items():
            rows[k.replace("_sensitivity", "") + tag + ("_sensitivity" if k.endswith("_sensitivity") else "")] = v
    rows["output_max_abs"] = {"abs": float(official.abs().max()), "rel": 1.0}
    return rows


def guided_model_fn(model_fn: Callable, source: str, scale: float | None = None) -> Callable:
    """``model_fn`` with the classifier-free guidance of the source's stored sampler preset (scripts/convert.py
    ``DEFAULT_SAMPLER``: scale, interval, DiT-style 3-channel guidance), null label ``NULL_CLASS``; ``scale``
    replaces the preset's scale. The official counterparts: ``forward_with_cfg`` (DiT/SiT models.py, LightningDiT
    models/lightningdit.py), the ``cfg_scale`` / ``guidance_high`` of REPA's and REG's samplers.py, DDT's
    ``guidance_interval_min``."""
    from scripts.convert import DEFAULT_SAMPLER, _yaml

    g = _yaml("sampler", DEFAULT_SAMPLER[source])["guidance"]
    interval = g.get("interval")
    return cfg(model_fn, g["scale"] if scale is None else scale, NULL_CLASS,
               interval=None if interval is None else tuple(interval),
               dit_legacy_channels=g.get("dit_legacy_channels"))


def compare_sampling(
    source: str, model_fn: Callable, path: Any, ref: dict[str, Tensor], tag: str = ""
) -> dict[str, dict[str, float]]:
    """Our samplers on ``model_fn`` against the official ``ode{tag}.out`` / ``sde{tag}.out`` from the same noise.

    The official samplers (run outside): facebookresearch/DiT diffusion/gaussian_diffusion.py ``ddim_sample_loop``;
    willisma/SiT transport/transport.py ``Sampler.sample_ode`` / ``sample_sde``; sihyun-yu/REPA samplers.py
    ``euler_sampler(heun=True)`` / ``euler_maruyama_sampler`` (Martinser/REG: the latter, with the class token);
    hustvl/LightningDiT transport/ ``sample_ode(timestep_shift=0.3)``; MCG-NJU/DDT
    src/diffusion/stateful_flow_matching/sampling.py ``EulerSampler``.

    Each row also gets ``*_sensitivity``: how far our sample moves (max abs) when the noise moves by 1e-6 N(0, I),
    the scale below which no implementation can agree with another (rounding is a perturbation of that size).
    """
    y, noise = ref["y"], ref["noise"]
    nudge = 1e-6 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(5)).to(noise.dtype)
    runs: dict[str, tuple[Callable[[Tensor], Tensor], Tensor]] = {}
    if source == "dit":
        # DDIM (eta 0) on the respaced steps k_0 > ... > k_{n-1} = 0, then to the data, is Euler on the EDM path
        # with the grid r_{k_0}, ..., r_0, 0 in the state x / sqrt(abar); the official start x_T = noise at step k_0
        # is the EDM state sqrt(1 + r^2) noise, so our prior sigma(t_0) * noise' gets noise' = noise sqrt(1+r^2)/r.
        steps = ref["ode.steps"].flip(0).long()
        abar = ddpm_alphas_cumprod(1000)[steps]
        ts = torch.cat([torch.sqrt((1 - abar) / abar), torch.zeros(1, dtype=torch.float64)])
        scale = math.sqrt(1 + float(ts[0]) ** 2) / float(ts[0])
        runs["ode"] = (lambda z: sample_euler(model_fn, (z.double() * scale).to(z.dtype), ts, path=path, y=y),
                       ref[f"ode{tag}.out"])
        if not tag:
            runs["ode_prior_sigma_noise"] = (lambda z: sample_euler(model_fn, z, ts, path=path, y=y), ref["ode.out"])
    elif f"ode{tag}.out" in ref:
        if source == "lightningdit":
            ts = shifted_grid(ODE_STEPS, 1.0 / LIGHTNINGDIT_SHIFT)
        elif source == "ddt":
            ts = uniform_grid(ODE_STEPS, t_min=0.04)
        else:
            ts = uniform_grid(ODE_STEPS)
        solver = sample_heun if source == "repa" else sample_euler
        runs["ode"] = (lambda z: solver(model_fn, z, ts, path=path, y=y), ref[f"ode{tag}.out"])
    if f"sde{tag}.out" in ref:

        def sde(z: Tensor) -> Tensor:
            # SiT's guided sampler integrates the doubled batch [x; x] (forward_with_cfg): the conditional half it
            # returns took the first half of each draw.
            img = ref[f"sde{tag}.draws"][:, : z.shape[0]]
            draws = {tuple(img.shape[1:]): list(img)}
            start: Any = z
            if f"sde{tag}.draws_cls" in ref:
                draws[tuple(ref[f"sde{tag}.draws_cls"].shape[1:])] = list(ref[f"sde{tag}.draws_cls"])
                start = Streams((z, ref["cls_noise"]))
            res = sample_euler_maruyama(model_fn, start, uniform_grid(ODE_STEPS, t_min=0.04), path=path, y=y,
                                        randn_like=_replay(draws), diffusion="sigma", last_step="mean")
            if any(q for q in draws.values()):
                raise RuntimeError(f"{source}: the official SDE sampler drew more noise than ours used")
            return res[0] if isinstance(res, tuple) else res

        runs["sde"] = (sde, ref[f"sde{tag}.out"])
    rows: dict[str, dict[str, float]] = {}
    for name, (run, official) in runs.items():
        out = run(noise)
        rows[name] = _diff(out, official)
        moved = float((run(noise + nudge) - out).abs().max())
        rows[f"{name}_sensitivity"] = {"abs": moved, "rel": moved / float(official.abs().max())}
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", required=True, type=Path, help="folder of the checkpoints and the official outputs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", action="store_true", help="compare with <dir>/official_<source>.safetensors")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not args.compare:
        for path in write_checkpoints(args.dir, args.seed):
            print(f"wrote {path}")
        return
    from safetensors import safe_open
    from safetensors.torch import load_file

    table = {}
    for source in SOURCES:
        f = args.dir / f"official_{source}.safetensors"
        if not f.is_file():
            print(f"{source}: no {f}; skipped")
            continue
        with safe_open(str(f), "pt") as h:
            settings = json.loads(h.metadata()["settings"])
        ref = load_file(str(f))
        rows = compare_source(source, args.dir / f"{source}.pt", ref)
        f64 = args.dir / f"official64_{source}.safetensors"
        if f64.is_file():  # the same in float64 (the official sources with their float32 casts made float64)
            ref64 = load_file(str(f64))
            rows.update({f"{k}_fp64": v for k, v in compare_source(source, args.dir / f"{source}.pt", ref64).items()
                         if k != "output_max_abs"})
            rows["official_fp32_vs_fp64"] = _diff(ref["out"], ref64["out"])
            for k in ("ode", "sde", "ode_cfg", "sde_cfg", "ode_cfg15"):
                if f"{k}.out" in ref:
                    rows[f"official_{k}_fp32_vs_fp64"] = _diff(ref[f"{k}.out"], ref64[f"{k}.out"])
        table[source] = {"settings": settings, **{k: {m: float(f"{v:.3g}") for m, v in r.items()}
                                                  for k, r in rows.items()}}
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
