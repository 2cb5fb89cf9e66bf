"""Yardstick of consistency models: iCT from scratch and ECT tuned from the quick start, against the quick start at
1 to 20 Euler steps.

The teacher is the quick start's DiT (``yardstick_dit``, the backbone table's run, 96k images), sampled with Euler at
1, 2, 4, 8 and 20 steps without guidance. ECT (``yardstick_ect``: Geng et al. 2024, "Consistency Models Made Easy")
starts from that snapshot of the same seed and tunes it for 32k images (a third of the teacher's budget, 4 stages of
8k), evaluated at 8, 16 and 32k. iCT (``yardstick_ict``: Song & Dhariwal 2023, "Improved Techniques for Training
Consistency Models") trains the same backbone from scratch for the teacher's 96k images. Both are sampled in one
step (x = f(80 n, 80)) and two (re-noised to sigma 0.821, locuslab/ect's CIFAR-10 mid level); 1,000 samples, seeds
0 and 1, the wall time per image in every record. The aim (issue 18): ECT at 2 steps within 1.5x of the teacher's
20-step FID after at most a third of the teacher's images.

    nice -n 10 python bench/yardstick_consistency.py --jobs 2
    python bench/yardstick_all.py --benches consistency --estimate

Records: ``bench/results/consistency.json``; run folders: ``runs/yardstick/consistency/<method>-s<seed>`` (the
teacher's are the backbone table's, ``runs/yardstick/backbones/dit-s<seed>``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file

from yardstick import DEFAULT_KIMG, Bench, Row, Variant, main  # noqa: E402

TEACHER_KIMG = DEFAULT_KIMG  # the backbone table's points (the same run; its snapshots stay where that table reads)
ECT_KIMG = (8.0, 16.0, 32.0)
ICT_KIMG = (16.0, 32.0, 64.0, 96.0)


def consistency_sampler(mid_sigmas: tuple[float, ...]) -> dict[str, object]:
    """``configs/sampler/consistency*.yaml``: f at sigma 80, then re-noised to each of ``mid_sigmas`` and f again."""
    return {"solver": {"_target_": "samplers.sample_consistency", "sigma_min": 0.002}, "steps": 1 + len(mid_sigmas),
            "grid": {"_target_": "samplers.consistency_grid", "sigmas": list(mid_sigmas)},
            "guidance": {"scale": 1.0, "interval": None}, "sharing": None}


ROWS = (
    Row("dit", ("experiment=yardstick_dit",), "quick start (teacher), Euler", run_group="backbones", kimg=TEACHER_KIMG),
    Row("ect", ("experiment=yardstick_ect",), "ECT from the quick start (+ images tuned)", kimg=ECT_KIMG,
        init_from="dit"),
    Row("ict", ("experiment=yardstick_ict",), "iCT from scratch", kimg=ICT_KIMG),
)

FEW = ("ect", "ict")
VARIANTS = (
    *(Variant(f"euler{n}", n, methods=("dit",), at="last", label=f"Euler {n}") for n in (1, 2, 4, 8, 20)),
    Variant("cm1", 1, methods=FEW, label="consistency, 1 step", sampler=consistency_sampler(())),
    Variant("cm2", 2, methods=FEW, label="consistency, 2 steps (sigma 0.821)", sampler=consistency_sampler((0.821,))),
)

BENCH = Bench(
    name="consistency",
    description=__doc__.split("\n\n")[0],
    rows=ROWS,
    variants=VARIANTS,
    script="bench/yardstick_consistency.py",
    kimg=TEACHER_KIMG,
)

if __name__ == "__main__":
    main(BENCH)
