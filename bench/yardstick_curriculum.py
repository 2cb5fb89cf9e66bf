"""Yardstick of the denoising-difficulty curriculum: FID against training images with and without it.

The curriculum (Kim et al. 2025, "Denoising Task Difficulty-based Curriculum for Training Diffusion Models";
``curriculum=difficulty``, gen/train/curriculum.py) trains the easy (high-noise) timestep clusters first and adds
harder ones as the smoothed loss stops improving, then trains ordinarily; the paper claims faster convergence. Rows:
the quick start's DiT (``yardstick_dit``, the backbone table's run) and the same recipe with the curriculum
(``yardstick_curriculum``, patience scaled to the run's length), protocol v2: FID at 16/32/64/96k images with 1,000
samples, Euler 20 without guidance and the quick start's sampler at the last point, seeds 0 and 1. The table also
gives the images the curriculum needs to reach the plain run's final FID.

    nice -n 10 python bench/yardstick_curriculum.py --jobs 2
    python bench/yardstick_all.py --benches curriculum --estimate

Records: ``bench/results/curriculum.json``; run folders: ``runs/yardstick/curriculum/curriculum-s<seed>`` (the plain
row's are the backbone table's, ``runs/yardstick/backbones/dit-s<seed>``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file

from yardstick import EULER20, QUICKSTART, Bench, Row, main  # noqa: E402

ROWS = (
    Row("dit", ("experiment=yardstick_dit",), "DiT (the quick start's recipe)", run_group="backbones"),
    Row("curriculum", ("experiment=yardstick_curriculum",), "the same with the difficulty curriculum (patience 25, smoother 0.92)"),
)

BENCH = Bench(
    name="curriculum",
    description=__doc__.split("\n\n")[0],
    rows=ROWS,
    variants=(EULER20, QUICKSTART),
    script="bench/yardstick_curriculum.py",
)

if __name__ == "__main__":
    main(BENCH)
