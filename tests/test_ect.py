"""ECT (gen/objectives/ect.py; Geng et al. 2024, "Consistency Models Made Easy", locuslab/ect training/loss.py).

Covers: r(t) and the stage schedule against the paper's formula by hand; the flow-snapshot consistency function's
boundary and its agreement with the flow denoiser; the first ECT loss from the teacher snapshot against a direct
computation (same noise); train.py with objective=ect from the ``teacher_snapshot`` fixture, SIGKILLed mid-run and
re-run equal to the uninterrupted run, sampled by sample.py with no sampler flags; the one-line refusals.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch

from gen.models.precond import FlowConsistencyPrecond
from gen.objectives.ect import EasyConsistencyTuning, ect_r, ect_stage
from gen.snapshot import load_network
from gen.train.method import Progress
from gen.utils.ckpt import load_snapshot, save_snapshot
from gen.utils.seed import BatchRandom
from tests.conftest import (
    Background,
    kill_mid_run,
    run_train,
    sample_four,
    train_command,
)
from tests.test_train import _final_state, _max_diff

ECT = ["objective=ect", "sampler=consistency", "trainer.grad_clip=null", "optim.lr=1e-4"]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_r_mapping_and_stages_equal_the_paper_formula_by_hand() -> None:
    t = torch.tensor([0.01, 0.5, 2.0, 10.0, 80.0], dtype=torch.float64)
    for stage, q, k, b in [(0, 2.0, 8.0, 1.0), (1, 2.0, 8.0, 1.0), (3, 4.0, 8.0, 1.0), (2, 2.0, 4.0, 0.5)]:
        want = [max(0.0, ti * (1 - q ** -(stage + 1) * (1 + k * _sigmoid(-b * ti)))) for ti in t.tolist()]
        got = ect_r(t, stage, q, k, b)
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12), (stage, got, want)
    # Stage 0, q = 2: r = t (1 - (1 + 8 sigmoid(-t)) / 2); small t is clamped to 0, large t gives r ~ t / 2.
    assert float(ect_r(torch.tensor(0.5), 0)) == 0.0
    assert abs(float(ect_r(torch.tensor(80.0, dtype=torch.float64), 0)) - 80 * (1 - 0.5 * (1 + 8 * _sigmoid(-80)))) < 1e-12
    assert [ect_stage(n, 8000) for n in (0, 7999, 8000, 24000, 31999)] == [0, 0, 1, 3, 3]
    obj = EasyConsistencyTuning(stage_kimg=0.064)
    assert obj.stage(None) == 0 and obj.stage(Progress(nimg=128, total_nimg=512, step=4)) == 2


def test_flow_consistency_function_boundary_and_denoiser() -> None:
    class Vel(torch.nn.Module):
        def forward(self, x, t, y=None):  # noqa: ANN001, ANN202
            from gen.models.common import ModelOutput
            return ModelOutput(out=torch.sin(3 * x) + t.reshape(-1, 1, 1, 1))

    f = FlowConsistencyPrecond(Vel(), 0.002)
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(f(x, torch.full((3,), 0.002)).out, x)
    sigma = torch.tensor([0.5, 3.0, 80.0], dtype=torch.float64)
    xd = x.double()
    t = sigma / (1 + sigma)
    x_t = xd / (1 + sigma).reshape(-1, 1, 1, 1)
    denoised = x_t - t.reshape(-1, 1, 1, 1) * (torch.sin(3 * x_t) + t.reshape(-1, 1, 1, 1))
    assert (f(xd, sigma).out - denoised).abs().max() < 0.002 * 10


def _direct_loss(net: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor, xi: torch.Tensor, eps: torch.Tensor,
                 stage: int) -> torch.Tensor:
    """ECT's loss by hand for the flow teacher: c = 0, weight 1 / (t - r), q 2, k 8, b 1, sigma_min 0.002."""
    t = (-1.1 + 2.0 * xi.double()).exp()
    r = (t * (1 - 0.5 ** (stage + 1) * (1 + 8 * torch.sigmoid(-t)))).clamp(min=0)
    s_min = float(torch.tensor(0.002, dtype=torch.float32))

    def f(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.float().double()
        b = (-1, 1, 1, 1)
        v = net((x.double() / (1 + s).reshape(b)).float(), (s / (1 + s)).float(), y).out.double()
        d = (s - s_min).reshape(b)
        return (x.double() / (1 + d) - d / (1 + d) * v).float()

    b = (-1, 1, 1, 1)
    student = f((x0.double() + t.reshape(b) * eps.double()).float(), t)
    target = f((x0.double() + r.reshape(b) * eps.double()).float(), r.clamp(min=0.002))
    target = torch.where((r > 0).reshape(b), target, x0)
    dist = (student - target).reshape(len(x0), -1).pow(2).sum(1).sqrt()
    return (1.0 / (t - r)).float() * dist


def test_first_ect_loss_from_the_snapshot_equals_a_direct_computation(teacher_snapshot: Path) -> None:
    net, _ = load_network(teacher_snapshot)
    x0 = torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    y = torch.arange(6) % 10
    for stage in (0, 2):
        obj = EasyConsistencyTuning(teacher="flow", stage_kimg=0.064)
        out = obj(net, {"x0": x0, "label": y}, BatchRandom(6, torch.Generator().manual_seed(5)),
                  Progress(nimg=64 * stage, total_nimg=512, step=0))
        g = torch.Generator().manual_seed(5)
        xi, eps = torch.randn(6, generator=g), torch.randn(6, 1, 32, 32, generator=g)
        want = _direct_loss(net, x0, y, xi, eps, stage)
        assert torch.isfinite(out["loss"]).all()
        torch.testing.assert_close(out["loss"], want, rtol=1e-6, atol=1e-6)


def _write_variant(src: Path, dst: Path, nan: bool = False, data_name: str | None = None) -> Path:
    tensors, config = load_snapshot(src)
    if nan:
        k = next(iter(tensors))
        tensors[k] = tensors[k].clone().float().fill_(float("nan")).to(tensors[k].dtype)
    if data_name is not None:
        config["data"]["name"] = data_name
    return save_snapshot(dst, tensors, config)


def _refused(tmp_path: Path, name: str, extra: list[str]) -> subprocess.CompletedProcess:
    proc = run_train(tmp_path, name, ECT + extra, check=False)
    assert proc.returncode in (2, 3), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if "error" in ln]) == 1, proc.stderr[-3000:]
    return proc


def test_ect_refusals(tmp_path: Path, teacher_snapshot: Path) -> None:
    p = _refused(tmp_path, "noinit", [])
    assert "give trainer.init={net:" in p.stderr
    other = _write_variant(teacher_snapshot, tmp_path / "other.safetensors", data_name="shapes")
    p = _refused(tmp_path, "otherdata", [f"trainer.init={{net: {other}}}"])
    assert "trained on data 'shapes', not on 'mnist5k'" in p.stderr
    nan = _write_variant(teacher_snapshot, tmp_path / "nan.safetensors", nan=True)
    p = _refused(tmp_path, "nan", [f"trainer.init={{net: {nan}}}"])
    assert p.returncode == 3 and "non-finite weights" in p.stderr
    p = _refused(tmp_path, "kind", [f"trainer.init={{net: {teacher_snapshot}}}", "objective.teacher=edm"])
    assert "needs a x0 snapshot on gen.paths.EDMPath, got velocity" in p.stderr
    p = _refused(tmp_path, "shape", [f"trainer.init={{net: {teacher_snapshot}}}", "model.depth=3"])
    assert "trainer.init.net" in p.stderr and "another network" in p.stderr


def test_ect_sigkill_rerun_equals_uninterrupted_and_samples_without_flags(tmp_path: Path,
                                                                           teacher_snapshot: Path) -> None:
    # 0.512 kimg in stages of 0.128 kimg (4 stages); the kill after 256 images lands mid-run, inside stage 2.
    extra = ECT + [f"trainer.init={{net: {teacher_snapshot}}}", "objective.stage_kimg=0.128"]
    straight = Background(train_command(tmp_path, "straight", extra), tmp_path / "straight.log")
    run = tmp_path / "killed"
    assert kill_mid_run(train_command(tmp_path, "killed", extra), run, 256) < 512
    straight.wait()
    resumed = run_train(tmp_path, "killed", extra)
    assert "Resuming from" in resumed.stdout + resumed.stderr
    a, b = _final_state(tmp_path / "straight")["registry"], _final_state(run)["registry"]
    for k in ("module.net", "ema.net"):
        assert _max_diff(a[k], b[k]) <= 1e-6, k
    # The stage of r(t) is on every status record (the next step's: images // 128).
    from gen.utils.log import read_stats

    records = [r for r in read_stats(tmp_path / "straight" / "stats.jsonl") if "loss" in r]
    assert [r["ect_stage"] for r in records] == [r["nimg"] // 128 for r in records] and records[-1]["ect_stage"] == 4

    snap = sorted(run.glob("snapshot-*.safetensors"))[-1]
    _, meta = load_snapshot(snap)
    assert meta["prediction"]["prediction"] == "consistency"
    assert meta["prediction"]["precond"]["_target_"] == "gen.models.precond.FlowConsistencyPrecond"
    assert meta["sampler"]["solver"]["_target_"] == "samplers.sample_consistency"
    out = tmp_path / "samples"
    samples = sample_four(run, out)
    assert samples.shape == (4, 32, 32, 1) and samples.std() > 0
    assert "sample_consistency" in (out / "sample.json").read_text()


@pytest.mark.parametrize("teacher", ["flow", "edm"])
def test_prediction_spec_is_a_consistency_model(teacher: str) -> None:
    spec = EasyConsistencyTuning(teacher=teacher).prediction_spec()
    assert spec["prediction"] == "consistency" and spec["path"]["_target_"] == "gen.paths.EDMPath"


def test_edm_teacher_starts_as_its_own_denoiser() -> None:
    # teacher=edm: ConsistencyPrecond shares EDM's c_in and c_noise, so away from sigma_min it is the EDM denoiser.
    from gen.models.common import ModelOutput
    from gen.models.precond import EDMPrecond

    class Net(torch.nn.Module):
        def forward(self, x, t, y=None):  # noqa: ANN001, ANN202
            return ModelOutput(out=torch.tanh(x) * t.reshape(-1, 1, 1, 1))

    obj = EasyConsistencyTuning(teacher="edm")
    f, d = obj.consistency_fn(Net()), EDMPrecond(Net(), 0.5)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([1.0, 10.0, 80.0], dtype=torch.float64)
    assert (f(x, sigma).out - d(x, sigma).out).abs().max() < 0.01
    assert torch.equal(f(x.float(), torch.full((3,), 0.002)).out, x.float())
