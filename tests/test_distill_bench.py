"""The distillation yardstick's plan (bench/yardstick_distill.py): the students start from the teacher's last
snapshot of their seed, which is also their frozen teacher; 2-RF++ first draws its pairs from it into its run folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import yardstick_all  # noqa: E402


def test_distill_plan_starts_students_from_the_teacher_and_draws_pairs_first(tmp_path: Path) -> None:
    args = argparse.Namespace(benches=["distill"], runs=tmp_path / "runs", results=tmp_path / "res",
                              num_images=1000, jobs=2, sec_per_kimg=10.0, sec_per_eval=60.0)
    by_name = {t.name: t for t in yardstick_all.plan(args)}
    teacher, rfpp, cd = (by_name[f"distill/{m}-s0"] for m in ("dit", "rfpp", "cd"))
    assert teacher.run.run_dir == tmp_path / "runs" / "backbones" / "dit-s0"
    snap = teacher.run.run_dir / "snapshot-000096000.safetensors"
    for student in (rfpp, cd):
        assert student.run.init == snap
        assert any(a.endswith(f"trainer.init.net={snap}") for a in student.run.train_command())  # ++ on newer main
        assert student.train_kimg == 32.0
    assert "data.dataset.root=${run_dir}/pairs" in rfpp.run.train_command()
    fill = {"init": rfpp.run.init, "run_dir": rfpp.run.run_dir}
    prepare = [a.format(**fill) for a in rfpp.run.row.prepare]
    assert prepare[:2] == ["-m", "distill.pairs"] and f"teacher={snap}" in prepare
    assert f"out={rfpp.run.run_dir}/pairs" in prepare and not cd.run.row.prepare
    # Teacher: Euler 1-32, Heun 2-16 steps, DPM-Solver++ 4-32, guided Euler 2-16 and 20 (the quick start's);
    # 2-RF++: 1 Euler + 2 noise-reusing at 3 points; CD: 2 x 3.
    assert (teacher.evals, rfpp.evals, cd.evals) == (6 + 4 + 4 + 5, 3 * 3, 2 * 3)


def test_tdm_and_slam_rows_start_from_the_teacher_and_are_sampled_at_1_2_and_4_nfe(tmp_path: Path) -> None:
    args = argparse.Namespace(benches=["distill"], runs=tmp_path / "runs", results=tmp_path / "res",
                              num_images=1000, jobs=2, sec_per_kimg=10.0, sec_per_eval=60.0)
    by_name = {t.name: t for t in yardstick_all.plan(args)}
    # the third seed only for the teacher, TDM and TDM-unify (their seed ranges overlap around the aim), from its teacher
    assert sorted(n for n in by_name if n.endswith("-s2")) == ["distill/dit-s2", "distill/tdm-s2",
                                                                   "distill/tdm_unify-s2"]
    assert by_name["distill/tdm-s2"].run.init == by_name["distill/dit-s2"].run.run_dir / "snapshot-000096000.safetensors"
    snap = by_name["distill/dit-s1"].run.run_dir / "snapshot-000096000.safetensors"
    for method in ("tdm", "tdm_unify", "slam"):
        for seed in (0, 1):
            student = by_name[f"distill/{method}-s{seed}"]
            assert student.run.init.name == snap.name and student.train_kimg == 32.0
            assert any(a.startswith(f"experiment=yardstick_{method.split('_')[0]}") for a in student.run.train_command())
        assert by_name[f"distill/{method}-s0"].evals == 3 * 3  # 1, 2 and 4 NFE at the 3 points
    from yardstick_distill import BENCH

    solvers = {v.name: (v.nfe, v.sampler["solver"]) for v in BENCH.variants if v.methods and v.methods[0] in
               ("tdm", "tdm_unify", "slam")}
    assert solvers["tdmu2"] == (2, {"_target_": "samplers.sample_ddim", "condition_steps": True})
    assert solvers["slam4"] == (4, {"_target_": "samplers.sample_lcm"})


def test_fid_against_nfe_and_wall_time_is_drawn_for_every_row_at_its_last_point(tmp_path: Path) -> None:
    import tables

    def rec(method: str, variant: str, kimg: float, seed: int, fid: float, sec: float) -> dict:
        return {"kind": "eval", "method": method, "variant": variant, "kimg": kimg, "seed": seed, "fid": fid,
                "sec_per_image": sec, "num_images": 1000}

    records = {"distill": [rec("dit", "euler4", 96.0, s, 50.0 + s, 0.004) for s in (0, 1)]
               + [rec("dit", "heun2", 96.0, 0, 40.0, 0.006), rec("slam", "slam1", 8.0, 0, 300.0, 0.001)]
               + [rec("slam", "slam1", 32.0, s, 30.0 + s, 0.001) for s in (0, 1)]
               + [rec("slam", "slam4", 32.0, 0, 20.0, 0.004), rec("dit", "euler4cfg2", 96.0, 0, 12.0, 0.008)]}
    series = tables.cost_series(records, "distill")
    assert series["slam (lcm, 32k)"] == [(1, 30.0, 0.001), (1, 31.0, 0.001), (4, 20.0, 0.004)]
    assert series["dit (heun, 96k)"] == [(3, 40.0, 0.006)] and len(series["dit (euler, 96k)"]) == 2
    assert series["dit (euler, CFG 2, 96k)"] == [(8, 12.0, 0.008)]  # never averaged with the unguided Euler
    path = tables.plot_fid_vs_cost(records, "distill", tmp_path)
    assert path == tmp_path / "distill_fid_vs_cost.png" and path.stat().st_size > 1000
    assert "| SLAM from the quick start" in tables.few_step(records, "distill")
    # The samples' class accuracy per NFE of a row (issue 19's table), mean of the seeds; "-" where none was stored.
    for r, acc in zip([r for r in records["distill"] if r["method"] == "slam" and r["kimg"] == 32.0], (0.9, 0.8, 0.5)):
        r["class_accuracy"] = acc
    text = tables.few_step(records, "distill")
    assert "class accuracy, by NFE" in text.splitlines()[0]
    slam = next(line for line in text.splitlines() if line.startswith("| SLAM") and "+ 32k" in line)
    assert "| 0.850 / 0.500 |" in slam
    assert "| - |" in next(line for line in text.splitlines() if line.startswith("| SLAM") and "+ 8k" in line)


def test_guided_teacher_is_a_row_of_its_own_and_the_aim_reads_the_teachers_best() -> None:
    import tables

    def rec(method: str, variant: str, kimg: float, seed: int, fid: float) -> dict:
        return {"kind": "eval", "method": method, "variant": variant, "kimg": kimg, "seed": seed, "fid": fid,
                "sec_per_image": 0.01, "num_images": 1000}

    records = {"distill": [rec("dit", "euler4", 96.0, s, 50.0) for s in (0, 1)]
               + [rec("dit", "euler2cfg2", 96.0, s, 20.0 + s) for s in (0, 1)]  # NFE 4 too, guided
               + [rec("dit", "qs", 96.0, 0, 8.0), rec("dit", "qs", 96.0, 1, 10.0)]
               + [rec("tdm", "tdm4", 32.0, 0, 8.4), rec("tdm", "tdm4", 32.0, 1, 10.5)]}
    text = tables.few_step(records, "distill")
    plain = next(line for line in text.splitlines() if line.startswith("| quick start (teacher) |"))
    guided = next(line for line in text.splitlines() if line.startswith("| quick start (teacher), CFG 2 |"))
    assert "50.0" in plain and "20.5" not in plain and "20.5" in guided and "50.0" not in guided
    # Two solvers at one NFE are two rows, never one cell (DPM-Solver++ 4 beside Euler 4).
    text = tables.few_step({"distill": records["distill"] + [rec("dit", "dpm4", 96.0, s, 45.0) for s in (0, 1)]},
                           "distill")
    euler = next(line for line in text.splitlines() if line.startswith("| quick start (teacher), Euler |"))
    dpm = next(line for line in text.splitlines() if line.startswith("| quick start (teacher), DPM-Solver++(2M) |"))
    assert "50.0" in euler and "45.0" not in euler and "45.0" in dpm and "50.0" not in dpm
    # Per seed the teacher's best is the quick start's sampler here: 8.4 / 8 and 10.5 / 10, both within 1.1x.
    tdm = next(line for line in tables.claims(records).splitlines() if line.startswith("| TDM |"))
    assert "vs the teacher's best 9.0 (qs): 1.05x (1.05 / 1.05; aim <= 1.1x) | yes |" in tdm
    # CD distils the unguided teacher: its aim reads the unguided samplers only (Euler 4 at 50 here, not qs at 9).
    cd = {"distill": records["distill"] + [rec("cd", "cm2", 32.0, s, 52.0) for s in (0, 1)]}
    line = next(x for x in tables.claims(cd).splitlines() if x.startswith("| CD |"))
    assert "vs the teacher's best unguided 50.0 (euler4): 1.04x (1.04 / 1.04; aim <= 1.1x) | yes |" in line
