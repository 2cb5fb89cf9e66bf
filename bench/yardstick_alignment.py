"""Yardstick of representation alignment: DiT and LightningDiT, each plain, with REPA and with REG.

Protocol v2 (bench/README.md): rows are the presets ``configs/experiment/yardstick_{dit,lightningdit}{,_repa,_reg}.yaml``
on the quick start's backbone size (width 128, depth 6, patch 4; same data, batch, optimizer and EMA within a
backbone); the alignment rows add the ``align`` group with the yardstick's frozen foundation encoder at depth 2 and a
projector of the backbone's width. Each row is trained with seeds 0 and 1 and evaluated with Euler 20 steps (no
guidance, 1,000 samples) at 16, 32, 64 and 96 kimg, and with the quick start's sampler at 96 kimg, through the harness
in ``bench/yardstick.py``. The plain rows are the backbone table's runs (``run_group="backbones"``: trained once).
The tables add how many training images each row needs to reach the plain DiT's final FID (``bench/tables.py``,
``reach``). ``dit_repa_enc1`` is REPA with the first (v1) foundation encoder, to measure the REPA paper's claim that
a better encoder gives a larger gain.

REPA: Yu et al. 2025, "Representation Alignment for Generation: Training Diffusion Transformers Is Easier Than
You Think" (sihyun-yu/REPA). REG: Wu et al. 2025, "Representation Entanglement for Generation: Training Diffusion
Transformers Is Much Easier Than You Think" (Martinser/REG).

    python bench/yardstick_all.py                                 # every yardstick table (this one included)
    nice -n 10 python bench/yardstick_alignment.py --jobs 2       # this table only
    python bench/yardstick_alignment.py --methods dit,dit_repa --seeds 0 --kimg 16,32
    python bench/tables.py                                        # tables in bench/README.md, plots

Records: ``bench/results/alignment.json``; run folders: ``runs/yardstick/alignment/<method>-s<seed>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file

from yardstick import EULER20, QUICKSTART, Bench, Row, main  # noqa: E402

# Protocol v2: a third seed where two compared rows' 96k seed ranges overlap (2 seeds: DiT 25.2-31.6 and DiT + REG
# 23.9-26.6; the two REPA encoders 22.6-22.8 and 19.3-23.4; LightningDiT 12.9-13.1 and + REG 11.1-13.0).
THREE = (0, 1, 2)
ROWS = (
    Row("dit", ("experiment=yardstick_dit",), "DiT", run_group="backbones", seeds=THREE),
    Row("dit_repa", ("experiment=yardstick_dit_repa",), "DiT + REPA (depth 2, lambda 0.5)", seeds=THREE),
    Row("dit_repa_enc1", ("experiment=yardstick_dit_repa", "objective.align.encoder.name=foundation-mnist5k"),
        "DiT + REPA, v1 foundation encoder (4x4 tokens, 6-epoch classifier)", seeds=THREE),
    Row("dit_reg", ("experiment=yardstick_dit_reg",), "DiT + REG (depth 2, lambda 0.5, beta 0.03)", seeds=THREE),
    Row("lightningdit", ("experiment=yardstick_lightningdit",), "LightningDiT", run_group="backbones", seeds=THREE),
    Row("lightningdit_repa", ("experiment=yardstick_lightningdit_repa",), "LightningDiT + REPA"),
    Row("lightningdit_reg", ("experiment=yardstick_lightningdit_reg",), "LightningDiT + REG", seeds=THREE),
)

BENCH = Bench(
    name="alignment",
    description=__doc__.split("\n\n")[0],
    rows=ROWS,
    variants=(EULER20, QUICKSTART),
    timing=(),
    script="bench/yardstick_alignment.py",
)

if __name__ == "__main__":
    main(BENCH)
