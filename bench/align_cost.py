"""The cost of representation alignment per training step, against plain training, in the same run.

One step = the objective (forward, loss), backward and AdamW on a batch, exactly as the training loop runs it
(``Diffusion.loss``), with the frozen encoder's forward included for REPA and REG. The three variants (plain,
REPA, REG) share the backbone size and the batch; they alternate (plain, REPA, REG, plain, ...) so that load from
other processes affects them alike, and the report gives the median seconds per step and the ratio to plain.

Rows:

* ``yardstick``: the yardstick recipe (tiny DiT, width 256, depth 6, patch 4 on 1x32x32 digits), the foundation
  encoder, alignment at block 2 with a 256-wide projector (``configs/experiment/yardstick_dit_{repa,reg}.yaml``).
* ``sit_b2``: SiT-B/2 size on 4x32x32 latents (what REPA's ImageNet runs see) with DINOv2-B/14 at 256 px on random
  weights of the identical architecture (the cost does not depend on the weights), block 4, projector 2048.

Example::

    OMP_NUM_THREADS=2 python bench/align_cost.py --rows yardstick --batch 32 --reps 5
    OMP_NUM_THREADS=2 python bench/align_cost.py --rows sit_b2 --batch 4 --reps 3
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from gen.objectives import FlowMatching  # noqa: E402
from gen.objectives.align import Alignment  # noqa: E402
from gen.train.diffusion import Diffusion  # noqa: E402
from gen.train.method import Progress, param_groups  # noqa: E402
from gen.utils.build import build  # noqa: E402
from gen.utils.seed import SampleRandom  # noqa: E402

ROWS: dict[str, dict[str, Any]] = {
    "yardstick": {
        "model": {"_target_": "gen.models.dit.DiT", "patch_size": 4, "hidden_size": 256, "depth": 6, "num_heads": 4,
                  "in_channels": 1, "input_size": 32, "num_classes": 10},
        "encoder": {"_target_": "eval.encoders.AlignmentEncoder", "name": "foundation-mnist5k", "resolution": 32,
                    "cache_dir": ".cache/yardstick"},
        "image": (1, 32), "depth": 2, "projector_dim": 256,
    },
    "sit_b2": {
        "model": {"_target_": "gen.models.dit.DiT", "patch_size": 2, "hidden_size": 768, "depth": 12, "num_heads": 12,
                  "in_channels": 4, "input_size": 32, "num_classes": 1000, "time_scale": 1.0},
        "encoder": {"_target_": "eval.encoders.AlignmentEncoder", "name": "dinov2_vitb14", "resolution": 256,
                    "random_init": True},
        "image": (3, 256), "depth": 4, "projector_dim": 2048,
    },
}


def make(row: dict[str, Any], variant: str, encoder: Any) -> Diffusion:
    torch.manual_seed(0)
    extra = encoder.dim if variant == "reg" else 0
    net = build({**row["model"], "extra_token_dim": extra})
    align = None
    if variant != "plain":
        align = Alignment(encoder, row["depth"], projector_dim=row["projector_dim"], reg=variant == "reg")
    return Diffusion(net, FlowMatching(align=align), functools.partial(torch.optim.AdamW, lr=1e-4),
                     image_resolution=row["image"][1])


def step_fn(method: Diffusion, batch: dict[str, torch.Tensor]) -> Any:
    opt = torch.optim.AdamW(param_groups([method.net, method.objective], 0.0), lr=1e-4)
    progress = Progress(0, 1, 0)

    def step() -> None:
        rng = SampleRandom(range(batch["label"].shape[0]), "bench")
        method.loss("main", batch, rng, progress)["loss"].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="yardstick")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    for name in args.rows.split(","):
        row = ROWS[name]
        encoder = build(row["encoder"])
        c, res = row["image"]
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.batch, c, res, res), generator=g, dtype=torch.uint8)
        lat_c, lat_s = row["model"]["in_channels"], row["model"]["input_size"]
        batch = {"image": images, "label": torch.randint(row["model"]["num_classes"], (args.batch,), generator=g),
                 "x0": torch.randn(args.batch, lat_c, lat_s, lat_s, generator=g)}
        steps = {v: step_fn(make(row, v, encoder), batch) for v in ("plain", "repa", "reg")}
        times: dict[str, list[float]] = {v: [] for v in steps}
        for rep in range(args.warmup + args.reps):
            for v, step in steps.items():
                t0 = time.perf_counter()
                step()
                if rep >= args.warmup:
                    times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(ts) for v, ts in times.items()}
        print(f"{name}: batch {args.batch}, {torch.get_num_threads()} threads, median s/step over {args.reps} reps")
        for v in steps:
            print(f"  {v:6s} {med[v]:8.3f} s/step   x{med[v] / med['plain']:.2f} of plain")


if __name__ == "__main__":
    main()
