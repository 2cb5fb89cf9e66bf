"""Denoising-difficulty curriculum: equal-probability clusters, easy-to-hard stages, pacing, refusals and exact
resume through train.py (SIGKILL mid-stage, then re-run equals the uninterrupted run)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gen.objectives.curriculum import DifficultyCurriculum, time_quantile
from gen.paths import LogitNormalTime, LogNormalSigma, UniformTime, UShapedTime
from gen.utils.seed import BatchRandom


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_clusters_have_equal_probability_under_the_time_sampler() -> None:
    cur = DifficultyCurriculum(LogNormalSigma(-1.2, 1.2), clusters=20)
    edges = cur.boundaries()
    cdf = [_normal_cdf((math.log(float(e)) + 1.2) / 1.2) if 0 < float(e) < math.inf else float(e > 0) for e in edges]
    assert np.allclose(np.diff(cdf), 1 / 20, atol=1e-12)
    uni = DifficultyCurriculum(UniformTime(), clusters=4).boundaries()
    assert torch.allclose(uni, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    ln = time_quantile(LogitNormalTime(0.3, 1.1), torch.tensor([0.5]))
    assert abs(float(ln) - 1 / (1 + math.exp(-0.3))) < 1e-12


def test_stages_draw_from_the_easiest_clusters_with_the_base_distribution() -> None:
    cur = DifficultyCurriculum(UniformTime(), clusters=10)
    rng = BatchRandom(20_000, torch.Generator().manual_seed(0))
    t = cur(rng)
    assert float(t.min()) >= 0.9 and float(t.max()) <= 1.0  # stage 1: only C_10 = [0.9, 1]
    cur.stage = 3
    t = cur(rng).double()
    assert float(t.min()) >= 0.7 - 1e-7
    counts = torch.histc(t, bins=3, min=0.7, max=1.0) / len(t)  # uniform over the three easiest clusters
    assert torch.allclose(counts, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)
    cur.stage = 11  # done: the base sampler itself, draw for draw
    a = cur(BatchRandom(8, torch.Generator().manual_seed(1)))
    b = UniformTime()(BatchRandom(8, torch.Generator().manual_seed(1)))
    assert torch.equal(a, b)


def test_pacing_advances_after_patience_steps_without_a_new_best_and_resets() -> None:
    cur = DifficultyCurriculum(UniformTime(), clusters=3, patience=3, smoothing=0.0)
    seq = [1.0, 0.9, 0.95, 0.95, 0.95]  # best 0.9 at step 2; steps 3, 4, 5 do not improve -> advance at step 5
    assert [cur.observe(v) for v in seq] == [False, False, False, False, True]
    assert cur.stage == 2 and cur.best is None and cur.wait == 0
    # Smoothing: s = 0.5 s + 0.5 loss; a constant loss after a drop keeps improving the smoothed value.
    sm = DifficultyCurriculum(UniformTime(), clusters=3, patience=2, smoothing=0.5)
    sm.observe(1.0)
    sm.observe(0.0)
    assert sm.smoothed == 0.5 and sm.wait == 0
    for _ in range(2):
        cur.observe(1.0)
    assert cur.stage == 2  # the restarted tracker: step 1 sets the best, step 2 waits
    state = cur.state_dict()
    other = DifficultyCurriculum(UniformTime(), clusters=3, patience=3, smoothing=0.0)
    other.load_state_dict(state)
    assert other.state_dict() == state
    for _ in range(10):
        cur.observe(2.0)
    assert cur.done and not cur.observe(0.1) and cur.stage == 4


def test_refusals() -> None:
    with pytest.raises(ValueError, match=r"clusters=20 leaves cluster\(s\) \[.*\] empty"):
        DifficultyCurriculum(UniformTime(shift=1e9), clusters=20)
    with pytest.raises(ValueError, match="closed-form quantile.*UShapedTime"):
        DifficultyCurriculum(UShapedTime(), clusters=20)
    with pytest.raises(ValueError, match="curriculum.clusters must be a positive integer"):
        DifficultyCurriculum(UniformTime(), clusters=0)
    with pytest.raises(ValueError, match="curriculum.patience must be a positive integer"):
        DifficultyCurriculum(UniformTime(), patience=0)


def test_curriculum_sigkill_rerun_equals_uninterrupted_run(tmp_path: Path) -> None:
    from tests.conftest import Background, kill_mid_run, train_command
    from tests.test_train import _final_state, _max_diff, _train

    # 4 clusters, patience 1 on the raw loss: stages advance within the 32-step run, so the kill lands mid-curriculum.
    cur = ["curriculum=difficulty", "method.clusters=4", "method.patience=1", "method.smoothing=0.0",
           "trainer.total_kimg=1.024"]
    straight = Background(train_command(tmp_path, "straight", cur), tmp_path / "straight.log")
    run = tmp_path / "killed"
    assert kill_mid_run(train_command(tmp_path, "killed", cur), run, 256) < 1024
    straight.wait()
    resumed = _train(tmp_path, "killed", cur)
    assert "Resuming from" in resumed.stdout + resumed.stderr
    sa, sb = _final_state(tmp_path / "straight"), _final_state(run)
    a, b = sa["registry"], sb["registry"]
    for k in ("module.net", "ema.net"):
        diff = _max_diff(a[k], b[k])
        assert diff <= 1e-6, f"{k}: the resumed curriculum run differs from the uninterrupted one by {diff}"
    assert a["method"] == b["method"]
    assert a["method"]["curriculum"]["stage"] > 1, a["method"]  # the curriculum did advance
    # The stage is on every status record, never falls, and ends where the training state does.
    from gen.utils.log import read_stats

    stages = [r["curriculum_stage"] for r in read_stats(tmp_path / "straight" / "stats.jsonl")]
    assert stages and stages == sorted(stages) and stages[-1] == a["method"]["curriculum"]["stage"], stages


def test_curriculum_refuses_ict() -> None:
    from gen.objectives import ImprovedConsistencyTraining
    from gen.train.curriculum import CurriculumDiffusion

    with pytest.raises(ValueError, match="objective=ict draws its own discrete noise levels"):
        CurriculumDiffusion(torch.nn.Identity(), ImprovedConsistencyTraining(), lambda params: None)
