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
    # Teacher: Euler 1-32, Heun 2-16 steps, DPM-Solver++ 4-32; 2-RF++: 1 Euler + 2 noise-reusing at 3 points; CD: 2 x 3.
    assert (teacher.evals, rfpp.evals, cd.evals) == (6 + 4 + 4, 3 * 3, 2 * 3)
