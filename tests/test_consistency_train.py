"""iCT end to end through train.py and sample.py (subprocesses, tiny DiT on the built-in digits).

Covers: an iCT run SIGKILLed mid-way (mid discretisation stage) and re-run equals the uninterrupted run (<= 1e-6);
the snapshot records a consistency model, sample.py runs the consistency sampler on it with no sampler flags,
and an ODE sampler asked for it is refused with a one-line message.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from gen.utils.ckpt import load_snapshot
from gen.utils.log import read_stats
from tests.conftest import Background, kill_mid_run, train_command
from tests.test_train import ROOT, _env, _final_state, _max_diff, _train

# N(k) over 1.024 kimg: 8 stages of 128 images, so the kill (after 256 images) lands inside a stage.
ICT = ["objective=ict", "sampler=consistency", "trainer.grad_clip=null", "optim.lr=1e-4", "trainer.total_kimg=1.024"]


def test_ict_sigkill_rerun_equals_uninterrupted_and_samples_without_flags(tmp_path: Path) -> None:
    straight = Background(train_command(tmp_path, "straight", ICT), tmp_path / "straight.log")
    run = tmp_path / "killed"
    assert kill_mid_run(train_command(tmp_path, "killed", ICT), run, 256) < 1024
    straight.wait()
    resumed = _train(tmp_path, "killed", ICT)
    assert "Resuming from" in resumed.stdout + resumed.stderr
    a, b = _final_state(tmp_path / "straight")["registry"], _final_state(run)["registry"]
    for k in ("module.net", "ema.net"):
        diff = _max_diff(a[k], b[k])
        assert diff <= 1e-6, f"{k}: the resumed iCT run differs from the uninterrupted one by {diff}"
    records = [r for r in read_stats(tmp_path / "straight" / "stats.jsonl") if "loss" in r]
    losses = [r["loss"] for r in records]
    assert len(losses) == 16 and all(np.isfinite(losses))
    # N(k) is on every record: the next step's, as ict_num_levels gives it for the record's images.
    from gen.objectives.consistency import ict_num_levels

    total = int(round(1000 * max(r["kimg"] for r in records)))
    assert [r["ict_levels"] for r in records] == [ict_num_levels(r["nimg"], total, 10, 1280) for r in records]

    snaps = sorted(run.glob("snapshot-*.safetensors"))
    _, meta = load_snapshot(snaps[-1])
    assert meta["prediction"]["prediction"] == "consistency"
    assert meta["sampler"]["solver"]["_target_"] == "samplers.sample_consistency"

    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, "sample.py", f"snapshot={run}", f"outdir={out}", "seeds=0-7"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (8, 32, 32, 1) and f["arr_0"].std() > 0
    assert "sample_consistency" in (out / "sample.json").read_text()

    bad = subprocess.run([sys.executable, "sample.py", f"snapshot={run}", f"outdir={tmp_path / 'ode'}", "seeds=0-7",
                          "sampler=heun"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "is a consistency model" in bad.stderr and "sampler=consistency" in bad.stderr
    assert "Traceback" not in bad.stderr
