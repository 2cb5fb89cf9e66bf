"""GPU benchmark: training and sampling images/s, MFU and peak memory of the XL backbones; FID feature speed.

Rows (issue 22), each beside a reference in the same process:

- training: our DiT-XL/2 on 4x32x32 latents (SD-VAE, 256 px) and our LightningDiT-XL/1 on 32x16x16 latents
  (VA-VAE f16d32, 256 px, as in Yao et al. 2025), each against diffusers' ``DiTTransformer2DModel`` of DiT-XL/2
  size (width 1152, depth 28, 16 heads, patch 2 on 4x32x32: the same 256 tokens). One step = forward + MSE +
  backward + fused AdamW, fp32 weights, bf16 autocast, a stated batch (default 32). Eager, then ``torch.compile``
  (each transformer block compiled in place, for ours and for diffusers alike: what ``model.compile=true`` does).
  Warm-up steps are not timed; each repetition times ``--steps`` CUDA-synchronised steps of ours, then of the
  reference (the order alternates), so the ratio ours / reference is paired per repetition; reported: median
  images/s and the median of the paired ratios.
- MFU = images/s x 3 x forward FLOPs per image / the GPU's peak dense bf16 FLOP/s (``PEAK_BF16``, by device name;
  an unknown GPU gets no MFU and a note). Forward FLOPs are the analytic matmul count of ``forward_flops``
  (2 FLOPs per multiply-add; the DiT paper's "118.6 Gflops" of DiT-XL/2 count one per multiply-add). Both sides of
  a pair use our architecture's count, so MFU compares like with like (diffusers' per-block timestep embedders,
  a few MFLOPs, are not counted).
- peak memory: the model's weights and optimizer state plus the largest transient of one step
  (``torch.cuda.max_memory_allocated`` over a step minus what was allocated before it).
- sampling: ``eval.generator.Generator`` with Euler, ``--sample-steps`` steps (default 50) and CFG scale 1.5 (two
  network rows per image per step: NFE = 2 x steps), bf16 autocast, the identity tokenizer (latents are not decoded:
  the VAE decode is not in the number).
- FID features: ``eval.features.InceptionFeatures`` (the FID network, channels-last) on uint8 256x256 images;
  random weights of the same architecture when no weights file is found (speed does not depend on the values; the
  record says which).

``--budget-min`` (default 8) bounds the whole run: repetitions stop when a section's share of the budget is spent
(at least two repetitions each, one for sampling). Without a CUDA device the script refuses (exit 2) unless ``--device cpu --tiny``:
a tiny smoke mode (width 64, depth 2, a few steps, ``torch.compile`` with the ``eager`` backend) that runs every
code path on CPU, for tests/test_bench_gpu.py.

Examples (from the repository root)::

    python bench/gpu.py                                   # one GPU, about 8 minutes; writes bench/results/gpu.json
    python bench/gpu.py --budget-min 4 --batch 16         # shorter
    python bench/gpu.py --inception-weights ~/.cache/pt_inception-2015-12-05-6726825d.pth
    python bench/gpu.py --device cpu --tiny --out /tmp/gpu_tiny.json     # CPU smoke test
    python bench/gpu.py --print bench/results/gpu.json    # the markdown tables of a stored record
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
sys.path.insert(0, str(ROOT / "bench"))  # the yardstick harness beside this file (its code_version)

from yardstick import code_version  # noqa: E402

from gen.nn.mlp import swiglu_hidden  # noqa: E402
from gen.utils.build import build  # noqa: E402

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name in order (first match wins).
PEAK_BF16: list[tuple[tuple[str, ...], str, float]] = [
    (("GH200",), "GH200", 989.4e12),
    (("H200",), "H200", 989.4e12),
    (("H100", "PCIE"), "H100 PCIe", 756.0e12),
    (("H100", "NVL"), "H100 NVL", 835.0e12),
    (("H100",), "H100 SXM", 989.4e12),
    (("A100",), "A100", 312.0e12),
]
TIME_EMBED_FREQ = 256  # sinusoid width fed to the timestep MLP (gen.nn.embed.TimestepEmbedder)


def peak_bf16(device_name: str) -> tuple[str | None, float | None]:
    """(table name, peak dense bf16 FLOP/s) of a GPU by its device name; (None, None) when unknown."""
    up = device_name.upper()
    for keys, name, flops in PEAK_BF16:
        if all(k in up for k in keys):
            return name, flops
    return None, None


def forward_flops(cfg: dict[str, Any]) -> float:
    """Analytic forward FLOPs per image of a ``gen.models.dit.DiT`` config (2 per multiply-add, matmuls only).

    With N = (H/p)^2 tokens, width D, depth L, FFN hidden F (GELU: F = r D, two matrices; SwiGLU:
    F = int(2/3 int(r D)), three), m adaLN vectors per block (6, or 4 with ``wo_shift``), C_out output channels:

        per block:  2 N (3 D^2 + D^2)        qkv and output projections
                  + 2 * 2 N^2 D              q k^T and (softmax) v, over all heads
                  + 2 N D F (2 or 3)         FFN
                  + 2 D (m D)                adaLN modulation (once per image)
        outside:    2 N (C p^2) D            patch embedding
                  + 2 (256 D + D^2)          timestep MLP
                  + 2 D (2 D) + 2 N D (p^2 C_out)   final adaLN and linear

    Norms, activations, softmax, RoPE and biases are left out (under 1% at XL size).
    """
    D, L, p = cfg["hidden_size"], cfg["depth"], cfg["patch_size"]
    C = cfg["in_channels"]
    N = (cfg["input_size"] // p) ** 2
    c_out = 2 * C if cfg.get("learn_sigma") else C
    swiglu = cfg.get("ffn", "gelu") == "swiglu"
    ratio = cfg.get("mlp_ratio", 4.0)
    hidden = swiglu_hidden(D, ratio) if swiglu else int(D * ratio)
    m = 4 if cfg.get("wo_shift") else 6
    block = 2 * N * 4 * D * D + 4 * N * N * D + 2 * N * D * hidden * (3 if swiglu else 2) + 2 * D * m * D
    outside = 2 * N * C * p * p * D + 2 * (TIME_EMBED_FREQ * D + D * D) + 4 * D * D + 2 * N * D * p * p * c_out
    return float(L * block + outside)


# ----------------------------------------------------------------------------------------------------------
# Backbones

@dataclass
class Backbone:
    """One training row: our model config (a ``configs/model`` preset plus the data shape) and its reference."""

    name: str
    config: dict[str, Any]
    ref: dict[str, Any] = field(default_factory=dict)  # diffusers DiT: width, depth, heads, patch, channels, size

    @property
    def shape(self) -> tuple[int, int, int]:
        c = self.config
        return c["in_channels"], c["input_size"], c["input_size"]


def _preset(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())


def backbones(tiny: bool) -> list[Backbone]:
    """DiT-XL/2 on 4x32x32 and LightningDiT-XL/1 on 32x16x16, each against a diffusers DiT-XL/2 (tiny: width 64,
    depth 2, 2 heads on 4x8x8 and 32x4x4)."""
    size = {"hidden_size": 64, "depth": 2, "num_heads": 2} if tiny else {}
    dit = {**_preset("dit_xl2"), **size, "in_channels": 4, "input_size": 8 if tiny else 32, "num_classes": 1000}
    ldit = {**_preset("lightningdit_xl1"), **size, "in_channels": 32, "input_size": 4 if tiny else 16,
            "num_classes": 1000}
    ref = {"width": dit["hidden_size"], "depth": dit["depth"], "heads": dit["num_heads"], "patch": 2,
           "channels": 4, "size": dit["input_size"], "classes": 1000}
    tag = " (tiny)" if tiny else ""
    return [Backbone(f"DiT-XL/2 4x32x32{tag}", dit, ref), Backbone(f"LightningDiT-XL/1 32x16x16{tag}", ldit, ref)]


def diffusers_dit(ref: dict[str, Any]) -> nn.Module:
    """diffusers' ``DiTTransformer2DModel`` of the given width, depth, heads, patch and input shape."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=ref["heads"], attention_head_dim=ref["width"] // ref["heads"],
        in_channels=ref["channels"], out_channels=ref["channels"], num_layers=ref["depth"],
        sample_size=ref["size"], patch_size=ref["patch"], num_embeds_ada_norm=ref["classes"],
    )


def compile_blocks(model: nn.Module, backend: str) -> None:
    """``torch.compile`` each transformer block in place (ours: ``blocks``; diffusers: ``transformer_blocks``)."""
    blocks = getattr(model, "blocks", None) or model.transformer_blocks
    for block in blocks:
        block.compile(backend=backend)


# ----------------------------------------------------------------------------------------------------------
# Training

@dataclass
class Trainee:
    """A model with its optimizer, a fixed batch and the closure of one training step."""

    name: str
    model: nn.Module
    step: Callable[[], None]
    batch_size: int
    mode: str = "eager"
    alloc_before: int = 0  # memory allocated before the model was built
    static_bytes: int = 0  # weights + optimizer state (measured after the first steps)
    peak_bytes: dict[str, int] = field(default_factory=dict)  # mode -> static + largest transient of one step


def make_trainee(name: str, model: nn.Module, ours: bool, shape: tuple[int, int, int], batch: int,
                 device: torch.device) -> Trainee:
    """One training step: bf16-autocast forward, MSE in fp32, backward, fused AdamW, gradients freed."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=g).to(device)
    target = torch.randn(batch, *shape, generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if ours:
                out = model(x, t, y).out
            else:
                out = model(x, timestep=t * 1000, class_labels=y, return_dict=False)[0]
        F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Trainee(name, model, step, batch)


class Clock:
    """Wall time with the device synchronised, and the memory counters of CUDA (zeros elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else 0

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else 0


def warm_up(tr: Trainee, mode: str, steps: int, clock: Clock) -> float:
    """Untimed steps (compilation, allocator, optimizer state); records the mode's peak memory; returns seconds."""
    t0 = clock.now()
    for _ in range(max(steps - 1, 1)):
        tr.step()
    base = clock.allocated()  # gradients are freed after each step: weights + optimizer state (+ earlier models)
    if not tr.static_bytes:
        tr.static_bytes = base - tr.alloc_before
    clock.reset_peak()
    tr.step()  # the measured step, with the optimizer state already allocated
    tr.peak_bytes[mode] = tr.static_bytes + clock.peak() - base
    return clock.now() - t0


def timed_pair(pair: list[Trainee], steps: int, max_reps: int, seconds: float, clock: Clock) -> list[list[float]]:
    """Images/s per repetition for each trainee; the order alternates per repetition; at least two repetitions."""
    rates: list[list[float]] = [[] for _ in pair]
    end = time.perf_counter() + seconds
    for rep in range(max_reps):
        if rep >= 2 and time.perf_counter() > end:
            break
        order = list(range(len(pair))) if rep % 2 == 0 else list(reversed(range(len(pair))))
        for i in order:
            t0 = clock.now()
            for _ in range(steps):
                pair[i].step()
            rates[i].append(steps * pair[i].batch_size / (clock.now() - t0))
    return rates


def ref_config(ref: dict[str, Any]) -> dict[str, Any]:
    """Our DiT config of the reference's size (for its analytic FLOPs)."""
    return {"hidden_size": ref["width"], "depth": ref["depth"], "num_heads": ref["heads"], "patch_size": ref["patch"],
            "in_channels": ref["channels"], "input_size": ref["size"], "ffn": "gelu", "mlp_ratio": 4.0}


def _summary(tr: Trainee, rates: list[float], warm_s: float, flops: float, peak: float | None,
             cuda: bool) -> dict[str, Any]:
    img_s = statistics.median(rates)
    return {"img_per_s": img_s, "img_per_s_reps": rates, "warmup_s": warm_s, "fwd_gflop_per_image": flops / 1e9,
            "train_tflop_per_s": img_s * 3 * flops / 1e12, "mfu": img_s * 3 * flops / peak if peak else None,
            "peak_mem_gib": tr.peak_bytes[tr.mode] / 2**30 if cuda else None}


def bench_training(bb: Backbone, args: argparse.Namespace, device: torch.device, clock: Clock,
                   seconds: float, peak: float | None) -> dict[str, Any]:
    """Ours against diffusers, eager then compiled; ``seconds`` for the whole row (compilation included)."""
    start = time.perf_counter()
    pair: list[Trainee] = []
    warm: dict[str, float] = {}
    for name, ours in (("ours", True), ("diffusers", False)):
        torch.manual_seed(0)
        before = clock.allocated()
        with device:  # initialised where it runs: seconds instead of a minute for 675M parameters on a CPU
            model = (build(bb.config) if ours else diffusers_dit(bb.ref)).train()
        shape = bb.shape if ours else (bb.ref["channels"], bb.ref["size"], bb.ref["size"])
        pair.append(make_trainee(name, model, ours, shape, args.batch, device))
        pair[-1].alloc_before = before
        # Warmed up before the next model is built, so its optimizer state is counted as its own.
        warm[name] = warm_up(pair[-1], "eager", args.warmup, clock)
    flops = {"ours": forward_flops(bb.config), "diffusers": forward_flops(ref_config(bb.ref))}
    params = {tr.name: sum(p.numel() for p in tr.model.parameters()) / 1e6 for tr in pair}
    res: dict[str, Any] = {"row": bb.name, "batch": args.batch, "steps_per_rep": args.steps, "params_M": params}
    for k, mode in enumerate(("eager", "compile")):
        if mode == "compile":
            for tr in pair:
                compile_blocks(tr.model, args.compile_backend)
                tr.mode = mode
                warm[tr.name] = warm_up(tr, mode, args.warmup, clock)
        left = start + seconds * (k + 1) / 2 - time.perf_counter()
        rates = timed_pair(pair, args.steps, args.reps, left, clock)
        out = {tr.name: _summary(tr, r, warm[tr.name], flops[tr.name], peak, clock.cuda) for tr, r in zip(pair, rates)}
        paired = [a / b for a, b in zip(*rates)]
        out["ratio"] = statistics.median(paired)
        out["ratio_reps"] = paired
        res[mode] = out
    del pair
    torch.compiler.reset()  # compiled graphs and their guards may hold the models: free them for the next row
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------------------------------------
# Sampling and FID features

def bench_sampling(bb: Backbone, args: argparse.Namespace, device: torch.device, clock: Clock,
                   seconds: float) -> dict[str, Any]:
    """Images/s of ``Generator.generate`` (Euler, CFG 1.5, bf16 autocast, no VAE decode) on our backbone."""
    from eval.generator import Generator
    from samplers.spec import SamplerSpec
    from tokenizers.pixels import PixelTokenizer

    start = time.perf_counter()
    torch.manual_seed(0)
    with device:
        net = build(bb.config).eval().requires_grad_(False)
    pred = {"path": {"_target_": "gen.paths.LinearPath"}, "prediction": "velocity", "precond": None}
    gen = Generator(net, pred, PixelTokenizer(channels=bb.shape[0]), bb.shape, 1000, min_rows=1)

    def spec(steps: int) -> SamplerSpec:
        return SamplerSpec.from_config({"solver": {"_target_": "samplers.sample_euler"}, "steps": steps,
                                        "grid": {"_target_": "samplers.grids.uniform_grid"},
                                        "guidance": {"scale": args.cfg}})

    B = args.sample_batch
    rates: list[float] = []
    with torch.autocast(device.type, dtype=torch.bfloat16):
        gen.generate(list(range(B)), spec(2), device=device)  # warm-up: kernels, allocator
        for rep in range(args.reps):
            if rep >= 1 and time.perf_counter() > start + seconds:
                break
            t0 = clock.now()
            gen.generate(list(range(rep * B, (rep + 1) * B)), spec(args.sample_steps), device=device)
            rates.append(B / (clock.now() - t0))
    guided = args.cfg != 1.0
    return {"row": bb.name, "solver": "euler", "steps": args.sample_steps, "cfg": args.cfg,
            "nfe": args.sample_steps * (2 if guided else 1), "batch": B, "img_per_s": statistics.median(rates),
            "img_per_s_reps": rates, "decode": "none (identity tokenizer: latents, no VAE decode)"}


def inception(weights: str | None, device: torch.device, tmp: str) -> tuple[Any, str]:
    """The FID Inception extractor (channels-last) and where its weights came from (random when none is found)."""
    from eval.features import InceptionFeatures, make_random_inception_weights
    from gen.utils.weights import WeightsNotFoundError

    try:
        ext = InceptionFeatures(weights, device=device, channels_last=True)
        return ext, f"file {ext.weights_path} (SHA-256 {ext.weights_sha256})"
    except WeightsNotFoundError:
        if weights:
            raise
    # Deterministic (seed 0), so one file serves every run: making it takes seconds on a CPU.
    path = Path(tmp) / "gen_bench_random_inception_seed0.pth"
    if not path.exists():
        part = make_random_inception_weights(path.with_name(f".{path.name}.{os.getpid()}"))
        part.replace(path)
    ext = InceptionFeatures(path, device=device, channels_last=True)
    return ext, "random (no weights file found; throughput does not depend on the values)"


def bench_fid(args: argparse.Namespace, device: torch.device, clock: Clock, seconds: float) -> dict[str, Any]:
    """Images/s of the FID Inception pool3 features on uint8 images (resized to 299 inside)."""
    start = time.perf_counter()
    B, R = args.fid_batch, args.fid_resolution
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, 3, R, R), generator=g, dtype=torch.uint8).to(device)
    ext, weights = inception(args.inception_weights, device, tempfile.gettempdir())
    with torch.no_grad():
        ext(images)  # warm-up (cuDNN algorithm choice, allocator)
        rates: list[float] = []
        for rep in range(args.reps):
            if rep >= 2 and time.perf_counter() > start + seconds:
                break
            t0 = clock.now()
            for _ in range(args.fid_batches):
                feats = ext(images)
            rates.append(args.fid_batches * B / (clock.now() - t0))
    assert feats.shape == (B, 2048)
    return {"extractor": ext.name, "weights": weights, "resolution": R, "batch": B, "channels_last": True,
            "precision": "fp32", "img_per_s": statistics.median(rates), "img_per_s_reps": rates}


# ----------------------------------------------------------------------------------------------------------
# Record and tables

def machine(device: torch.device) -> dict[str, Any]:
    """Host, device name, peak bf16 FLOP/s used for MFU, library versions."""
    import diffusers

    info: dict[str, Any] = {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
                            "torch": torch.__version__, "diffusers": diffusers.__version__, "device": device.type}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table, peak = peak_bf16(name)
        info.update(gpu=name, gpu_table=table, peak_bf16_tflops=peak / 1e12 if peak else None,
                    cuda=torch.version.cuda, gpu_mem_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    else:
        info.update(gpu=None, gpu_table=None, peak_bf16_tflops=None)
    return info


def store(file: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``{"records": [...]}`` in ``file``, replacing an earlier one of the same GPU, batch
    and mode (atomic replace)."""
    data = json.loads(file.read_text())["records"] if file.exists() else []
    key = f"{record['machine'].get('gpu')}|{record['batch']}|{'tiny' if record['tiny'] else 'full'}"
    data = [d for d in data if d.get("key") != key] + [{**record, "key": key}]
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps({"records": data}, indent=1, sort_keys=True) + "\n")
    tmp.replace(file)


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(rec: dict[str, Any]) -> str:
    """The record as three markdown tables: training, sampling, FID features."""
    m = rec["machine"]
    lines = [f"{m.get('gpu') or m['device']}, torch {m['torch']}, diffusers {m['diffusers']}, code {rec['code']}, "
             f"{rec['date']}; bf16 autocast, batch {rec['batch']}" + (" (tiny CPU smoke mode)" if rec["tiny"] else ""),
             "", "| backbone | mode | ours img/s | diffusers img/s | ours / diffusers | ours MFU | diffusers MFU "
             "| ours peak GiB | diffusers peak GiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rec["train"]:
        for mode in ("eager", "compile"):
            o, d = r[mode]["ours"], r[mode]["diffusers"]
            lines.append(f"| {r['row']} | {mode} | {o['img_per_s']:.1f} | {d['img_per_s']:.1f} | {r[mode]['ratio']:.2f} "
                         f"| {_f(o['mfu'], '.1%')} | {_f(d['mfu'], '.1%')} | {_f(o['peak_mem_gib'])} "
                         f"| {_f(d['peak_mem_gib'])} |")
    lines += ["", "| backbone | sampler | NFE | batch | img/s |", "|---|---|---|---|---|"]
    for s in rec["sampling"]:
        lines.append(f"| {s['row']} | Euler {s['steps']}, CFG {s['cfg']} | {s['nfe']} | {s['batch']} "
                     f"| {s['img_per_s']:.2f} |")
    f = rec["fid"]
    lines += ["", "| FID features | weights | input | batch | img/s |", "|---|---|---|---|---|",
              f"| {f['extractor']} | {f['weights'].split(' (')[0]} | {f['resolution']}px uint8 | {f['batch']} "
              f"| {f['img_per_s']:.1f} |"]
    lines += [""] + [f"- {n}" for n in rec["notes"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line

# (full, tiny) defaults of the size options; the tiny column is the CPU smoke test.
DEFAULTS: dict[str, tuple[Any, Any]] = {
    "batch": (32, 2), "steps": (10, 1), "warmup": (3, 2), "reps": (10, 2), "sample_steps": (50, 2),
    "sample_batch": (64, 2), "fid_batch": (200, 1), "fid_resolution": (256, 32), "fid_batches": (5, 1),
    "compile_backend": ("inductor", "eager"),
}
SHARES = {"train": 0.8, "sampling": 0.12, "fid": 0.08}  # of the time budget


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu with --tiny")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes: the CPU smoke test of every code path")
    p.add_argument("--budget-min", type=float, default=8.0, help="time budget in minutes; repetitions are trimmed to it")
    p.add_argument("--batch", type=int, help="training batch (default 32)")
    p.add_argument("--steps", type=int, help="timed training steps per repetition (default 10)")
    p.add_argument("--warmup", type=int, help="untimed training steps per model and mode (default 3)")
    p.add_argument("--reps", type=int, help="most repetitions per measurement (default 10; at least 2 are run)")
    p.add_argument("--sample-steps", type=int, help="Euler steps (default 50)")
    p.add_argument("--sample-batch", type=int, help="images per sampling batch (default 64)")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance scale (1 = no CFG, half the NFE)")
    p.add_argument("--fid-batch", type=int, help="images per Inception batch (default 200)")
    p.add_argument("--fid-resolution", type=int, help="uint8 image size fed to the extractor (default 256)")
    p.add_argument("--fid-batches", type=int, help="Inception batches per repetition (default 5)")
    p.add_argument("--inception-weights", help="FID Inception weights file (default: the cache, else random weights)")
    p.add_argument("--compile-backend", help="torch.compile backend (default inductor; tiny: eager)")
    p.add_argument("--out", help="JSON records file (default bench/results/gpu.json; tiny: none unless given)")
    p.add_argument("--print", metavar="JSON", help="print the markdown tables of the newest record in JSON and exit")
    args = p.parse_args(argv)
    for k, (full, tiny) in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, tiny if args.tiny else full)
    if args.out is None and not args.tiny:
        args.out = str(ROOT / "bench" / "results" / "gpu.json")
    return args


def refuse(args: argparse.Namespace) -> str | None:
    """Why the run cannot start (one line), or None."""
    if args.device == "cpu":
        return None if args.tiny else "bench/gpu.py: --device cpu runs only with --tiny (the CPU smoke test)"
    if not args.device.startswith("cuda"):
        return f"bench/gpu.py: unknown device {args.device!r}; use cuda, or cpu with --tiny"
    if not torch.cuda.is_available():
        return ("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False); run it on a GPU, "
                "or use --device cpu --tiny for the CPU smoke test")
    return None


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Every measurement, within the time budget; the record."""
    budget = args.budget_min * 60
    clock = Clock(device)
    info = machine(device)
    peak = info["peak_bf16_tflops"] * 1e12 if info["peak_bf16_tflops"] else None
    notes = [f"MFU against {info['gpu_table']} peak dense bf16 {info['peak_bf16_tflops']:.0f} TFLOP/s"
             if peak else f"MFU omitted: {info.get('gpu') or device.type} is not in the peak bf16 table (PEAK_BF16)"]
    t0 = time.perf_counter()
    rows = backbones(args.tiny)
    train = []
    for i, bb in enumerate(rows):
        left = t0 + budget * SHARES["train"] * (i + 1) / len(rows) - time.perf_counter()
        train.append(bench_training(bb, args, device, clock, max(left, 0.0), peak))
        print(f"trained {bb.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    sampling = []
    for i, bb in enumerate(rows):
        share = budget * (SHARES["train"] + SHARES["sampling"] * (i + 1) / len(rows))
        sampling.append(bench_sampling(bb, args, device, clock, max(t0 + share - time.perf_counter(), 0.0)))
        print(f"sampled {bb.name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    fid = bench_fid(args, device, clock, max(t0 + budget - time.perf_counter(), 0.0))
    print(f"FID features: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if fid["weights"].startswith("random"):
        notes.append("FID Inception with random weights (no weights file found): throughput does not depend on them")
    notes.append(f"torch.compile backend {args.compile_backend}, each transformer block compiled in place")
    elapsed = time.perf_counter() - t0
    if elapsed > budget:
        notes.append(f"ran {elapsed:.0f} s, over the {budget:.0f} s budget (compilation and model building)")
    return {"kind": "gpu", "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": shlex.join(["python", "bench/gpu.py", *sys.argv[1:]]), "machine": info, "code": code_version(),
            "tiny": args.tiny, "batch": args.batch, "budget_min": args.budget_min, "elapsed_s": elapsed,
            "train": train, "sampling": sampling, "fid": fid, "notes": notes}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.print:
        print(markdown(json.loads(Path(args.print).read_text())["records"][-1]))
        return 0
    why = refuse(args)
    if why:
        print(why, file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts (loss, optimizer, Inception) as a GPU run sets them
    torch.backends.cudnn.allow_tf32 = True
    record = run(args, device)
    if args.out:
        store(Path(args.out), record)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
