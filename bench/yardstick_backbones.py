"""Yardstick of the backbone recipes: plain DiT vs LightningDiT vs DDT, and DDT encoder sharing.

Protocol v2 (bench/README.md): rows are the presets ``configs/experiment/yardstick_{dit,lightningdit,ddt}.yaml`` on
the quick start's backbone size (width 128, depth 6, patch 4, batch 32, AdamW lr 1e-3 with a 2 kimg warm-up, grad
clip 1, EMA half-life 2 kimg; ``yardstick_dit`` *is* the quick start, the others change only their recipe), each
trained with seeds 0 and 1 and evaluated at 16, 32, 64 and 96 kimg with Euler 20 steps and no guidance (1,000
samples), through the harness in ``bench/yardstick.py``. At the last point every row is also sampled with the quick
start's sampler (Euler 20, CFG 2) and with 5, 10 and 50 Euler steps (FID against NFE).

DDT encoder sharing (Wang et al. 2025, "DDT: Decoupled Diffusion Transformer", Sec. 4.4; MCG-NJU/DDT
src/diffusion/stateful_flow_matching/sharing_sampling.py) is measured on the last DDT snapshots at 20 and 50 steps:
the statistical DP schedule against upstream's even spacing (``i % rate == 0``) at the same number of encoder passes,
both through the production sampler (``pipeline.Generator`` with ``sampler.sharing``), the DP statistics recorded
from 8 template samples under the same sampler and guidance; plus the same at 20 steps with classifier-free
guidance (scale 2 on DDT's interval, our open t in (0, 0.7)), where both branches run at every step. Sampling speed with
and without sharing is timed side by side (alternating rounds on the same 100 seeds).

    python bench/yardstick_all.py                                   # every yardstick table (this one included)
    nice -n 10 python bench/yardstick_backbones.py --jobs 2         # this table only
    python bench/yardstick_backbones.py --methods ddt --seeds 0 --kimg 96 --variants euler20-dp10 --timing ''
    python bench/tables.py                                          # tables in bench/README.md, plots

Records: ``bench/results/backbones.json``; run folders: ``runs/yardstick/backbones/<method>-s<seed>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file

from yardstick import EULER20, QUICKSTART, Bench, Row, TimingGroup, Variant, main  # noqa: E402

ROWS = (
    Row("dit", ("experiment=yardstick_dit",), "DiT (the quick start): uniform t, MSE, betas (0.9, 0.99)"),
    Row("lightningdit", ("experiment=yardstick_lightningdit",),
        "LightningDiT: SwiGLU/RMSNorm/RoPE, logit-normal t, + cosine loss, betas (0.9, 0.95)"),
    Row("ddt", ("experiment=yardstick_ddt",), "DDT 4En2De: logit-normal t, betas (0.9, 0.95)"),
)

DDT = ("ddt",)
# DDT's open guidance interval 0.3 < t < 1 with data at t = 1 is the open (0, 0.7) in our time (data at t = 0): of the
# 20 uniform steps it guides the 14 with t < 0.7, as the official sampler, not t = 0.7 as well.
CFG = {"scale": 2.0, "interval": (0.0, 0.7, "()")}
VARIANTS = (
    EULER20,
    QUICKSTART,
    Variant("euler5", 5, at="last", label="Euler 5"),
    Variant("euler10", 10, at="last", label="Euler 10"),
    Variant("euler50", 50, at="last", label="Euler 50"),
    Variant("euler20-dp10", 20, sharing=("dp", 10), methods=DDT, at="last", label="DP schedule"),
    Variant("euler20-even2", 20, sharing=("rate", 2), methods=DDT, at="last", label="even, rate 2"),
    Variant("euler20-dp5", 20, sharing=("dp", 5), methods=DDT, at="last", label="DP schedule"),
    Variant("euler20-even4", 20, sharing=("rate", 4), methods=DDT, at="last", label="even, rate 4"),
    Variant("euler50-dp25", 50, sharing=("dp", 25), methods=DDT, at="last", label="DP schedule"),
    Variant("euler50-even2", 50, sharing=("rate", 2), methods=DDT, at="last", label="even, rate 2"),
    Variant("euler50-dp10", 50, sharing=("dp", 10), methods=DDT, at="last", label="DP schedule"),
    Variant("euler50-even5", 50, sharing=("rate", 5), methods=DDT, at="last", label="even, rate 5"),
    Variant("cfg20", 20, methods=DDT, at="last", label="no sharing", **CFG),
    Variant("cfg20-dp10", 20, sharing=("dp", 10), methods=DDT, at="last", label="DP schedule", **CFG),
    Variant("cfg20-even2", 20, sharing=("rate", 2), methods=DDT, at="last", label="even, rate 2", **CFG),
)
TIMING = (
    TimingGroup("sharing20", ("euler20", "euler20-dp10", "euler20-even2", "euler20-dp5", "euler20-even4"), DDT),
    TimingGroup("sharing50", ("euler50", "euler50-dp25", "euler50-even2", "euler50-dp10", "euler50-even5"), DDT),
    TimingGroup("sharing_cfg20", ("cfg20", "cfg20-dp10", "cfg20-even2"), DDT),
)

BENCH = Bench(
    name="backbones",
    description=__doc__.split("\n\n")[0],
    rows=ROWS,
    variants=VARIANTS,
    timing=TIMING,
    script="bench/yardstick_backbones.py",
)

if __name__ == "__main__":
    main(BENCH)
