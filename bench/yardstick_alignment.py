"""Yardstick of representation alignment: DiT and LightningDiT, each plain, with REPA and with REG.

Rows (the presets ``configs/experiment/yardstick_{dit,lightningdit}{,_repa,_reg}.yaml``; width 256, depth 6,
patch 4, same data, batch, optimizer and EMA within a backbone; the alignment rows add the ``align`` group with
the yardstick's frozen foundation encoder ``foundation-mnist5k`` at depth 2 and a projector of width 256), each
trained with seeds 0 and 1 and evaluated with the yardstick sampler (Euler 20 steps, no guidance) at 4, 8, 16,
32 and 64 kimg, through the harness in ``bench/yardstick.py``. The tables add how many training images each row
needs to reach the plain DiT's final FID (``bench/tables.py``, ``reach``).

REPA: Yu et al. 2025, "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than
You Think" (sihyun-yu/REPA). REG: Wu et al. 2025, "Representation Entanglement for Generation: Training Diffusion
Transformers Is Much Easier Than You Think" (Martinser/REG).

    nice -n 10 python bench/yardstick_alignment.py --jobs 2       # every row, two processes at a time
    python bench/yardstick_alignment.py --methods dit,dit_repa --seeds 0 --kimg 4,8
    python bench/tables.py                                        # tables in bench/README.md, plots

Records: ``bench/results/alignment.json``; run folders: ``runs/yardstick/alignment/<method>-s<seed>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file

from yardstick import Bench, Row, Variant, main  # noqa: E402

ROWS = (
    Row("dit", ("experiment=yardstick_dit",), "DiT"),
    Row("dit_repa", ("experiment=yardstick_dit_repa",), "DiT + REPA (depth 2, lambda 0.5)"),
    Row("dit_reg", ("experiment=yardstick_dit_reg",), "DiT + REG (depth 2, lambda 0.5, beta 0.03)"),
    Row("lightningdit", ("experiment=yardstick_lightningdit",), "LightningDiT"),
    Row("lightningdit_repa", ("experiment=yardstick_lightningdit_repa",), "LightningDiT + REPA"),
    Row("lightningdit_reg", ("experiment=yardstick_lightningdit_reg",), "LightningDiT + REG"),
)

BENCH = Bench(
    name="alignment",
    description=__doc__.split("\n\n")[0],
    rows=ROWS,
    variants=(Variant("euler20", 20, label="Euler 20"),),
    timing=(),
    script="bench/yardstick_alignment.py",
    kimg=(4.0, 8.0, 16.0, 32.0, 64.0),
)

if __name__ == "__main__":
    main(BENCH)
