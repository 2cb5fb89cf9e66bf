"""Training throughput of our backbones against diffusers' ``DiTTransformer2DModel`` of the same size.

One training step = forward + MSE loss + backward + fused AdamW step, fp32 weights (``--precision bf16``
wraps the forward of both models in bf16 autocast). Each row builds our model and the diffusers DiT with
the same width, depth, heads and patch size, warms both up, then alternates timed steps (ours, reference,
ours, ...) so that load from other processes affects both alike. Reported per model: median wall seconds
per step, median process CPU seconds per step (robust on a shared machine when run with ``--threads 1``),
images/s, analytic GFLOP per step (``torch.utils.flop_counter.FlopCounterMode`` over forward + backward:
matmuls, convolutions, attention) and achieved GFLOP/s; then ours / diffusers ratios (images/s from wall
time, and the same ratio from CPU time). LightningDiT and DDT rows compare against a diffusers DiT of
equal width and depth.

Examples (from the repository root)::

    python bench/train_throughput.py --threads 2                                 # DiT-S/2 and tiny DiT
    python bench/train_throughput.py --models dit_s2,tiny_dit,tiny_lightningdit,tiny_ddt --threads 1
    python bench/train_throughput.py --models tiny_dit --precision bf16 --compile --steps 10
    python bench/train_throughput.py --models dit_s2 --matmul-precision medium --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from gen.utils.build import build  # noqa: E402


@dataclass
class Row:
    """A benchmark row: our model config and the data shape (channels, resolution, classes)."""

    name: str
    config: dict
    channels: int
    resolution: int
    num_classes: int


ARCHS = {  # our classes and options for the three recipes (LightningDiT is DiT with RMSNorm, SwiGLU, RoPE)
    "dit": {"_target_": "gen.models.dit.DiT"},
    "lightningdit": {"_target_": "gen.models.dit.DiT", "norm": "rms", "ffn": "swiglu", "rope": "axial"},
    "ddt": {"_target_": "gen.models.ddt.DDT"},
}


def _dit_like(arch: str, width: int, depth: int, heads: int, patch: int, c: int, res: int, k: int, **kw) -> dict:
    return {
        **ARCHS[arch],
        "input_size": res,
        "patch_size": patch,
        "in_channels": c,
        "hidden_size": width,
        "depth": depth,
        "num_heads": heads,
        "num_classes": k,
        **kw,
    }


# Tiny rows follow the quick-start yardstick: width 256, depth 6, patch 4 on 1x32x32 MNIST (10 classes).
ROWS: dict[str, Row] = {
    "dit_s2": Row("DiT-S/2 4x32x32", _dit_like("dit", 384, 12, 6, 2, 4, 32, 1000), 4, 32, 1000),
    "tiny_dit": Row("DiT tiny 1x32x32", _dit_like("dit", 256, 6, 4, 4, 1, 32, 10), 1, 32, 10),
    "tiny_dit_rgb": Row("DiT tiny 3x32x32", _dit_like("dit", 256, 6, 4, 4, 3, 32, 10), 3, 32, 10),
    "lightningdit_s2": Row(
        "LightningDiT S/2-size 4x32x32", _dit_like("lightningdit", 384, 12, 6, 2, 4, 32, 1000), 4, 32, 1000
    ),
    "tiny_lightningdit": Row(
        "LightningDiT tiny 1x32x32", _dit_like("lightningdit", 256, 6, 4, 4, 1, 32, 10), 1, 32, 10
    ),
    "ddt_s2": Row(
        "DDT S/2-size 4x32x32 (8En4De)",
        _dit_like("ddt", 384, 12, 6, 2, 4, 32, 1000, num_encoder_blocks=8),
        4,
        32,
        1000,
    ),
    "tiny_ddt": Row(
        "DDT tiny 1x32x32 (4En2De)", _dit_like("ddt", 256, 6, 4, 4, 1, 32, 10, num_encoder_blocks=4), 1, 32, 10
    ),
}


def diffusers_reference(row: Row) -> nn.Module:
    """diffusers' DiT with the same width, depth, heads, patch size and output channels as ``row``."""
    from diffusers import DiTTransformer2DModel

    cfg = row.config
    return DiTTransformer2DModel(
        num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        in_channels=row.channels,
        out_channels=row.channels,
        num_layers=cfg["depth"],
        sample_size=row.resolution,
        patch_size=cfg["patch_size"],
        num_embeds_ada_norm=row.num_classes,
    )


def make_step(
    model: nn.Module, kind: str, batch: tuple[torch.Tensor, ...], precision: str = "fp32"
) -> Callable[[], None]:
    """A closure doing one training step (forward, MSE, backward, AdamW); fp32 weights, optional bf16 autocast."""
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel is ~7x faster than the per-tensor loop on CPU; both models get the same optimizer.
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    x, t, y, target = batch

    def forward() -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if kind.startswith("ours"):
                out = model(x, t, y).out
            else:
                out = model(x, timestep=t * 1000, class_labels=y, return_dict=False)[0]
        return out.float()

    def step() -> None:
        loss = F.mse_loss(forward(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.forward = forward  # type: ignore[attr-defined]
    return step


def count_flops(model: nn.Module, forward: Callable[[], torch.Tensor]) -> float:
    """FLOPs of one forward + backward, counted by FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        forward().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_row(row: Row, args: argparse.Namespace, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    B, C, R = args.batch, row.channels, row.resolution
    batch = (
        torch.randn(B, C, R, R, generator=g).to(device),
        torch.rand(B, generator=g).to(device),
        torch.randint(0, row.num_classes, (B,), generator=g).to(device),
        torch.randn(B, C, R, R, generator=g).to(device),
    )
    torch.manual_seed(0)
    models = {"ours": build(row.config).to(device).train()}
    if args.compile:
        models["ours+cmp"] = build({**row.config, "compile": True}).to(device).train()
    models["diffusers"] = diffusers_reference(row).to(device).train()
    steps = {k: make_step(m, k, batch, args.precision) for k, m in models.items()}
    # Counted in eager mode (compiled graphs are opaque to the counter; the FLOPs are the same).
    flops = {k: count_flops(models[k], steps[k].forward) for k in models if k != "ours+cmp"}  # type: ignore[attr-defined]
    if args.compile:
        flops["ours+cmp"] = flops["ours"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        for k in steps:
            steps[k]()
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.steps):
        for k in steps:  # interleaved so background load hits both models alike
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            steps[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    res = {"row": row.name}
    for k in steps:
        med = statistics.median(times[k])
        res[k] = {
            "params_M": sum(p.numel() for p in models[k].parameters() if p.requires_grad) / 1e6,
            "s_per_step": med,
            "cpu_s_per_step": statistics.median(cpu[k]),
            "img_per_s": B / med,
            "gflop_per_step": flops[k] / 1e9,
            "gflop_per_s": flops[k] / 1e9 / med,
        }
    res["ratio"] = {k: res[k]["img_per_s"] / res["diffusers"]["img_per_s"] for k in steps if k != "diffusers"}
    res["cpu_ratio"] = {k: res["diffusers"]["cpu_s_per_step"] / res[k]["cpu_s_per_step"] for k in res["ratio"]}
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="dit_s2,tiny_dit", help=f"comma list of rows: {','.join(ROWS)}")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per model (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 0)) or None)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast (weights stay fp32)")
    p.add_argument(
        "--matmul-precision",
        choices=["highest", "high", "medium"],
        default="highest",
        help="torch.set_float32_matmul_precision for both models; 'medium' runs fp32 GEMMs on bf16 units "
        "(AMX on recent Xeons; the CPU analogue of TF32)",
    )
    p.add_argument("--compile", action="store_true", help="add a row for our model with compile=True")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.precision}, "
          f"float32 matmul precision {args.matmul_precision}")
    header = f"{'row':34s} {'model':9s} {'params M':>9s} {'s/step':>8s} {'cpu s':>7s} {'img/s':>8s} {'GFLOP/step':>11s} {'GFLOP/s':>8s}"
    print(header)
    print("-" * len(header))
    for n in names:
        res = run_row(ROWS[n], args, device)
        kinds = [k for k in res if isinstance(res[k], dict) and "s_per_step" in res[k]]
        for k in kinds:
            r = res[k]
            print(f"{res['row'] if k == kinds[0] else '':34s} {k:9s} {r['params_M']:9.2f} {r['s_per_step']:8.3f} {r['cpu_s_per_step']:7.3f} "
                  f"{r['img_per_s']:8.2f} {r['gflop_per_step']:11.2f} {r['gflop_per_s']:8.2f}")
        for k, ratio in res["ratio"].items():
            print(f"{'':34s} {'ratio':9s} {k}/diffusers images/s = {ratio:.2f}x "
                  f"(process CPU time: {res['cpu_ratio'][k]:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
