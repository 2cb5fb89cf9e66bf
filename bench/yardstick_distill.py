"""Yardstick of few-step distillation: 2-rectified flow++ and consistency distillation from the quick start, against
the teacher at 1 to 32 NFE with Euler, Heun and DPM-Solver++.

The teacher is the quick start's DiT (``yardstick_dit``, the backbone table's run, 96k images), sampled without
guidance with Euler at 1, 2, 4, 8, 16 and 32 steps, Heun at 2, 4, 8 and 16 steps (2N - 1 = 3, 7, 15 and 31
NFE) and DPM-Solver++(2M) at 4, 8, 16 and 32 steps; and with the guidance
the students learn from (CFG 2, 2 NFE per step): Euler at 2, 4, 8, 16 and 20 steps (the quick start's sampler), its
own row in the table. "The teacher's best FID" of issue 20's aim is the best of all of these. The students start from
the teacher's 96k snapshot of the same seed (``trainer.init.net``, read by the presets as ``method.teacher``):

* 2-RF++ (``yardstick_rfpp``: Lee et al. 2024, "Improving the Training of Rectified Flows"): first 20k pairs drawn
  from the teacher with its own sampler (Euler 20, CFG 2: 40 NFE per pair, 800k network evaluations, counted as
  training cost) into ``<run>/pairs``, then 32k training images; sampled with Euler at 1 step, the noise-reusing
  update at 2 and 4 steps.
* CD (``yardstick_cd``: Song et al. 2023, "Consistency Models"): 32k images, 2 teacher NFE each (its Heun step);
  sampled with the consistency sampler at 1 and 2 steps (mid level 0.821).

* TDM (``yardstick_tdm``: Luo et al. 2025, "Learning Few-Step Diffusion Models by Trajectory Distribution
  Matching"): data-free, a 4-step student and its fake score alternating as two phases, teacher CFG 2; 32k images
  (labels only); sampled with its DDIM steps at 1, 2 and 4 (the 4-step student run with fewer steps). TDM-unify, the
  same with K drawn from {1, 2, 4} and told to the student, sampled at the K it is told.
* SLAM (``yardstick_slam``: Xu et al. 2024, "Accelerating Image Generation with Sub-path Linear Approximation
  Model"): 32k images, 2 teacher NFE each (its guided DDIM step, CFG 2); sampled with LCM's multistep sampler at 1, 2
  and 4 steps. LCM, its baseline (the paper compares with it): the same run with gamma = 1 only
  (``method.subpath=false``), sampled the same way.

1,000 samples, seeds 0 and 1, wall time per image in every record; ``bench/tables.py`` plots FID against NFE and
against wall time per image for every row (``distill_fid_vs_cost.png``). The aim (issue 19): the 1-NFE 2-RF++ student
below the teacher's 8-NFE Euler FID.

    nice -n 10 python bench/yardstick_distill.py --jobs 2

Records: ``bench/results/distill.json``; run folders: ``runs/yardstick/distill/<method>-s<seed>`` (the teacher's are
the backbone table's, ``runs/yardstick/backbones/dit-s<seed>``).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file

from yardstick import DEFAULT_KIMG, QUICKSTART, Bench, Row, Variant, main  # noqa: E402
from yardstick_consistency import consistency_sampler  # noqa: E402

STUDENT_KIMG = (8.0, 16.0, 32.0)
NUM_PAIRS = 20000


def ode_sampler(solver: str, steps: int, grid: str = "uniform_grid") -> dict[str, object]:
    """A whole sampler config of ``configs/sampler``: ``samplers.<solver>`` on ``steps`` intervals, no guidance."""
    return {"solver": {"_target_": f"samplers.{solver}"}, "steps": steps,
            "grid": {"_target_": f"samplers.grids.{grid}"}, "guidance": {"scale": 1.0, "interval": None},
            "sharing": None}


# sec_per_kimg: training speed of each student in the smoke runs (a loaded 2-core host), for --estimate until a run
# logs its own; 2-RF++'s pair drawing (20k pairs at about 7 per second) comes on top.
ROWS = (
    # Protocol v2's third seed where ranges overlap: TDM's 4 steps against the teacher's best (1.16x / 0.92x on
    # seeds 0 / 1 around the 1.1x aim) need the teacher and TDM at seed 2 (the teacher is the alignment table's run).
    Row("dit", ("experiment=yardstick_dit",), "quick start (teacher)", run_group="backbones", kimg=DEFAULT_KIMG,
        seeds=(0, 1, 2)),
    Row("rfpp", ("experiment=yardstick_rfpp", "data.dataset.root=${run_dir}/pairs"),
        f"2-RF++ from the quick start ({NUM_PAIRS // 1000}k pairs at 40 NFE + images trained)", kimg=STUDENT_KIMG,
        init_from="dit", prepare=("-m", "distill.pairs", "teacher={init}", "out={run_dir}/pairs", f"num={NUM_PAIRS}",
                                  "batch_size=250", "shard_size=2000", "device=cpu"), sec_per_kimg=18.0),
    Row("cd", ("experiment=yardstick_cd",), "CD from the quick start (+ images trained, 2 teacher NFE each)",
        kimg=STUDENT_KIMG, init_from="dit", sec_per_kimg=30.0),
    Row("tdm", ("experiment=yardstick_tdm",), "TDM, 4-step student, from the quick start (data-free)",
        kimg=STUDENT_KIMG, init_from="dit", sec_per_kimg=45.0, seeds=(0, 1, 2)),
    Row("tdm_unify", ("experiment=yardstick_tdm", "method.unify_steps=[1,2,4]", "+model.augment_dim=64",
                      "sampler=tdm_unify"),
        "TDM-unify, one student for 1, 2 and 4 steps, from the quick start (data-free)", kimg=STUDENT_KIMG,
        init_from="dit", sec_per_kimg=45.0, seeds=(0, 1, 2)),  # its 2 seeds fell on both sides of the aim, as TDM's
    Row("slam", ("experiment=yardstick_slam",), "SLAM from the quick start (+ images trained, 2 teacher NFE each)",
        kimg=STUDENT_KIMG, init_from="dit", sec_per_kimg=20.0),
    # SLAM's own baseline, as the paper compares: LCM's consistency distillation, the same run with gamma = 1 only.
    Row("lcm", ("experiment=yardstick_slam", "method.subpath=false"),
        "LCM from the quick start (SLAM with gamma = 1 only: its baseline; + images trained, 2 teacher NFE each)",
        kimg=STUDENT_KIMG, init_from="dit", sec_per_kimg=20.0),
    # Sensitivity, not the paper's setting: 2-RF++ on the same seed's pairs (the rfpp row draws them) at 5x the
    # paper's ImageNet lr, to tell whether a shortfall at 1e-4 is the 1,000-step budget or the method.
    Row("rfpp_lr5e-4", ("experiment=yardstick_rfpp", "data.dataset.root=${run_dir}/../rfpp-s${seed}/pairs",
                        "optim.lr=5e-4"),
        "2-RF++ at lr 5e-4 (the same pairs; sensitivity, the paper's lr is 1e-4)", kimg=STUDENT_KIMG, init_from="dit",
        sec_per_kimg=18.0),
)

TEACHER = ("dit",)
REFLOW = ("rfpp", "rfpp_lr5e-4")
VARIANTS = (
    *(Variant(f"euler{n}", n, methods=TEACHER, at="last", label=f"Euler {n}") for n in (1, 2, 4, 8, 16, 32)),
    *(Variant(f"heun{n}", 2 * n - 1, methods=TEACHER, at="last", label=f"Heun {n} steps ({2 * n - 1} NFE)",
              sampler=ode_sampler("sample_heun", n)) for n in (2, 4, 8, 16)),
    *(Variant(f"dpm{n}", n, methods=TEACHER, at="last", label=f"DPM-Solver++(2M) {n}",
              sampler=ode_sampler("sample_dpmpp_2m", n)) for n in (4, 8, 16, 32)),
    # The guided teacher the students learn from (2-RF++'s pairs, TDM's and SLAM's teacher CFG 2): 2 NFE per step.
    *(Variant(f"euler{n}cfg2", n, scale=2.0, methods=TEACHER, at="last", label=f"Euler {n}, CFG 2 ({2 * n} NFE)")
      for n in (2, 4, 8, 16)),
    replace(QUICKSTART, methods=TEACHER),
    Variant("rf1", 1, methods=REFLOW, label="Euler 1 step", sampler=ode_sampler("sample_euler", 1)),
    *(Variant(f"rfnew{n}", n, methods=REFLOW, label=f"noise-reusing update, {n} steps",
              sampler=ode_sampler("sample_reuse_noise", n)) for n in (2, 4)),
    Variant("cm1", 1, methods=("cd",), label="consistency, 1 step", sampler=consistency_sampler(())),
    Variant("cm2", 2, methods=("cd",), label="consistency, 2 steps (sigma 0.821)", sampler=consistency_sampler((0.821,))),
    *(Variant(f"tdm{n}", n, methods=("tdm",), label=f"DDIM {n} steps", sampler=ode_sampler("sample_ddim", n))
      for n in (1, 2, 4)),
    *(Variant(f"tdmu{n}", n, methods=("tdm_unify",), label=f"DDIM {n} steps, told K = {n}",
              sampler={**ode_sampler("sample_ddim", n), "solver": {"_target_": "samplers.sample_ddim",
                                                                   "condition_steps": True}}) for n in (1, 2, 4)),
    *(Variant(f"slam{n}", n, methods=("slam", "lcm"), label=f"LCM multistep, {n} steps from t = 0.936",
              sampler={**ode_sampler("sample_lcm", n), "grid": {"_target_": "samplers.grids.lcm_grid",  # LCM's levels
                                                                "t_max": 0.936, "num_levels": 50}}) for n in (1, 2, 4)),
)

BENCH = Bench(
    name="distill",
    description=__doc__.split("\n\n")[0],
    rows=ROWS,
    variants=VARIANTS,
    script="bench/yardstick_distill.py",
    kimg=DEFAULT_KIMG,
)

if __name__ == "__main__":
    main(BENCH)
