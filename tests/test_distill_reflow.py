"""2-rectified flow++ (distill/reflow.py; Lee et al. 2024, sangyun884/rfpp) and its samplers.

Covers: the U-shaped time density against its closed form; the noise-reusing update against Euler (1 step) and by
hand (2 steps); each loss (rfpp and iCT pseudo-Huber, LPIPS-Huber with and without 1/t, L2) against a direct
computation on known tensors; a student run SIGKILLed mid-way and re-run equal to the uninterrupted run (<= 1e-6),
its snapshot sampled by sample.py with no flags (the stored 1-step sampler); the one-line refusals of train.py (a
missing or consistency teacher, another teacher's pairs, a sampler the student cannot serve); an EDM teacher read as a
1-rectified flow (EDMFlowPrecond) against the EDM denoiser, finite at t = 1, and its snapshot spec.
"""

from __future__ import annotations

import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from distill.pairs import PairsConfig, make_pairs
from distill.reflow import Reflow
from distill.teacher import TeacherError
from gen.models import ModelOutput
from gen.paths import LinearPath, UShapedTime
from gen.train.method import Progress
from gen.utils.ckpt import load_snapshot
from gen.utils.seed import SampleRandom
from samplers import sample_euler, sample_reuse_noise, uniform_grid
from tests.conftest import (
    ROOT,
    Background,
    kill_mid_run,
    run_train,
    sample_four,
    subprocess_env,
    train_command,
)
from tests.test_distill_pairs import edited_teacher
from tests.test_train import _final_state, _max_diff


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, teacher_snapshot: Path) -> Path:
    out = tmp_path_factory.mktemp("pairs") / "p"
    make_pairs(PairsConfig(teacher=str(teacher_snapshot), out=str(out), num=64, shard_size=32, steps=4, device="cpu"))
    return out


def reflow_args(teacher: Path, pairs: Path, *extra: str) -> list[str]:
    return ["method=reflow", "data=pairs", "sampler=reflow_1step", f"method.teacher={teacher}",
            f"data.dataset.root={pairs}", f"trainer.init={{net: {teacher}}}", *extra]


def test_u_shaped_time_density() -> None:
    a = 4.0
    t = UShapedTime(a, 1e-5)(SampleRandom(range(40000), namespace="u")).numpy()
    assert 1e-5 <= t.min() and t.max() <= 1 - 1e-5
    # Density (e^{a t} + e^{a (1 - t)}) / (2 (e^a - 1) / a): mass of [0, 0.1] and of [0.4, 0.6].
    cdf = lambda x: (math.exp(a * x) - math.exp(a * (1 - x)) + math.exp(a) - 1) / (2 * (math.exp(a) - 1))  # noqa: E731
    for lo, hi in ((0.0, 0.1), (0.4, 0.6), (0.9, 1.0)):
        assert abs(((t >= lo) & (t < hi)).mean() - (cdf(hi) - cdf(lo))) < 0.01, (lo, hi)


def test_noise_reusing_update_by_hand() -> None:
    path = LinearPath()
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    target = torch.randn(3, 1, 4, 4, dtype=torch.float64)

    def model_fn(x, t, y):  # noqa: ANN001, ANN202  # a curved field: its x0 estimate depends on x and t
        return torch.sin(x) * (1 + t.view(-1, 1, 1, 1)) - target

    one = uniform_grid(1, path=path)
    assert torch.equal(sample_reuse_noise(model_fn, z, one, path=path), sample_euler(model_fn, z, one, path=path))
    got = sample_reuse_noise(model_fn, z, uniform_grid(2, path=path), path=path)
    x0_1 = z - 1.0 * model_fn(z, torch.ones(3, dtype=torch.float64), None)
    x_half = 0.5 * x0_1 + 0.5 * z  # jump along the straight line to the initial noise
    x0_2 = x_half - 0.5 * model_fn(x_half, torch.full((3,), 0.5, dtype=torch.float64), None)
    assert torch.allclose(got, x0_2, atol=1e-12)
    # From t = 1 on the linear path the first step's noise estimate is z itself, so 2 steps equal Euler's; from the
    # third step on, the update re-uses z where Euler uses its own noise estimate.
    assert torch.allclose(got, sample_euler(model_fn, z, uniform_grid(2, path=path), path=path), atol=1e-12)
    three = uniform_grid(3, path=path)
    assert not torch.allclose(sample_reuse_noise(model_fn, z, three, path=path), sample_euler(model_fn, z, three, path=path))


class _Net(torch.nn.Module):
    """A small velocity network with the backbone interface."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.emb = torch.nn.Embedding(11, 1)

    def forward(self, x, t, y):  # noqa: ANN001, ANN201
        return ModelOutput(self.conv(x) * (1 + t.view(-1, 1, 1, 1)) + self.emb(y).view(-1, 1, 1, 1))


class _Perceptual(torch.nn.Module):
    def forward(self, a, b):  # noqa: ANN001, ANN201
        return (a.tanh() - b.tanh()).abs().flatten(1).mean(1)


@pytest.mark.parametrize("loss,huber_c,divt", [("huber", "rfpp", False), ("huber", "ict", False), ("huber", 0.5, False),
                                               ("lpips-huber", "rfpp", True), ("lpips-huber", "rfpp", False),
                                               ("l2", "rfpp", False)])
def test_loss_equals_direct_computation(teacher_snapshot: Path, loss: str, huber_c, divt: bool) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    method = Reflow(_Net(), partial(torch.optim.Adam), str(teacher_snapshot), loss=loss, huber_c=huber_c,
                    perceptual=_Perceptual() if loss == "lpips-huber" else None, lpips_divt=divt)
    x, z = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 3, 5, 9])
    batch = {"x0": x, "noise": z, "label": y}
    out = method.loss("net", batch, SampleRandom([7, 8, 9, 10], namespace="r"), Progress(0, 1, 0))
    t = out["t"].view(-1, 1, 1, 1)
    assert out["t"].min() > 0 and out["t"].max() < 1
    with torch.no_grad():
        x_t = (1 - t) * x + t * z
        v = method.net(x_t, out["t"], y).out
        D = 64
        sq = ((v - (z - x)) ** 2).sum(dim=(1, 2, 3))
        c = {"rfpp": 0.00054 * D, "ict": 0.00054 * math.sqrt(D)}.get(huber_c, huber_c)
        h = (torch.sqrt(sq + c**2) - c) / (1 if huber_c == "ict" else D)
        if loss == "l2":
            want = ((v - (z - x)) ** 2).mean(dim=(1, 2, 3))
        elif loss == "huber":
            want = h
        else:
            x_hat = x_t - t * v
            lp = (x_hat.tanh() - x.tanh()).abs().mean(dim=(1, 2, 3))
            want = (1 - out["t"]) * h + lp / (out["t"] if divt else 1.0)
    assert torch.allclose(out["loss"], want, rtol=1e-5, atol=1e-8), (out["loss"], want)
    out["loss"].mean().backward()
    assert method.net.conv.weight.grad is not None


def test_killed_student_resumes_to_the_uninterrupted_run_and_samples_without_flags(
        tmp_path: Path, teacher_snapshot: Path, pairs: Path) -> None:
    extra = reflow_args(teacher_snapshot, pairs)
    straight = Background(train_command(tmp_path, "straight", extra), tmp_path / "straight.log")
    run = tmp_path / "killed"
    assert kill_mid_run(train_command(tmp_path, "killed", extra), run, 256) < 512
    straight.wait()
    resumed = run_train(tmp_path, "killed", extra)
    assert "Resuming from" in resumed.stdout + resumed.stderr
    a, b = _final_state(tmp_path / "straight"), _final_state(run)
    for k in ("module.net", "ema.net"):
        assert _max_diff(a["registry"][k], b["registry"][k]) <= 1e-6, k
    assert not any("teacher" in k for k in a["registry"]["module.net"])
    snap = sorted(run.glob("snapshot-*.safetensors"))[-1]
    tensors, meta = load_snapshot(snap)
    assert meta["distill"]["method"] == "reflow" and meta["distill"]["teacher"]["path"] == str(teacher_snapshot)
    assert meta["sampler"]["steps"] == 1 and meta["prediction"]["prediction"] == "velocity"
    out = tmp_path / "samples"
    samples = sample_four(run, out)
    assert samples.shape == (4, 32, 32, 1) and samples.std() > 0
    assert '"steps": 1' in (out / "sample.json").read_text()
    bad = subprocess.run([sys.executable, "sample.py", f"snapshot={run}", f"outdir={tmp_path / 's2'}", "seeds=0-3",
                          "sampler=euler_maruyama"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot serve this reflow student" in bad.stderr


def _refused(tmp_path: Path, extra: list[str], match: str) -> None:
    proc = run_train(tmp_path, "refused", extra, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode in (2, 3) and len(lines) == 1 and lines[0].startswith("train.py: error:"), proc.stderr
    assert match in lines[0], lines[0]


def test_train_refusals_are_one_line(tmp_path: Path, teacher_snapshot: Path, pairs: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    _refused(tmp_path, reflow_args(teacher_snapshot, pairs, f"method.teacher={missing}"), "does not exist")
    cm = edited_teacher(teacher_snapshot, tmp_path / "cm.safetensors", config_fn=lambda c: {
        **c, "prediction": {"path": {"_target_": "gen.paths.EDMPath", "sigma_max": 80.0}, "prediction": "consistency",
                            "precond": {"_target_": "gen.models.precond.ConsistencyPrecond", "sigma_data": 0.5}}})
    # train.py builds the data first, so such a teacher meets its pairs' check before the method's; the method's own
    # refusal is checked here directly.
    with pytest.raises(TeacherError, match="this method needs a velocity model on gen.paths.LinearPath or x0 model on gen.paths.EDMPath"):
        Reflow(_Net(), partial(torch.optim.Adam), str(cm), data_name="mnist5k", image_resolution=32)
    other = edited_teacher(teacher_snapshot, tmp_path / "other.safetensors",
                           tensors_fn=lambda t: {k: v * 1.01 if v.is_floating_point() else v for k, v in t.items()})
    _refused(tmp_path, reflow_args(teacher_snapshot, pairs, f"method.teacher={other}"), "were made by teacher")
    _refused(tmp_path, reflow_args(teacher_snapshot, pairs, "sampler=euler_maruyama"), "cannot serve a reflow student")


def _edm_teacher(teacher_snapshot: Path, out: Path, precond: str = "EDMPrecond") -> Path:
    return edited_teacher(teacher_snapshot, out, config_fn=lambda c: {
        **c, "prediction": {"path": {"_target_": "gen.paths.EDMPath", "sigma_max": 40.0}, "prediction": "x0",
                            "precond": {"_target_": f"gen.models.precond.{precond}", "sigma_data": 0.4}}})


def test_edm_teacher_is_read_as_a_rectified_flow(tmp_path: Path, teacher_snapshot: Path) -> None:
    """The student of an EDM teacher: v(x_t, t) = (x_t - D(x_t / (1 - t), t / (1 - t))) / t with the teacher's own
    EDM denoiser D below t = sigma_max / (1 + sigma_max); finite at t = 1 (sigma clamped to sigma_max); the loss uses
    it; the snapshot's spec rebuilds the same velocity for the samplers."""
    from gen.models.precond import EDMPrecond
    from gen.models.prediction import velocity_model

    edm = _edm_teacher(teacher_snapshot, tmp_path / "edm.safetensors")
    torch.manual_seed(0)
    method = Reflow(_Net(), partial(torch.optim.Adam), str(edm), data_name="mnist5k", image_resolution=32)
    x_t, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 3, 5, 10])
    t = torch.tensor([1e-3, 0.3, 0.7, 0.97], dtype=torch.float64)
    got = method.velocity(x_t.float(), t.float(), y)
    net64 = _Net().double()
    net64.load_state_dict(method.net.state_dict())
    b = (-1, 1, 1, 1)
    denoised = EDMPrecond(net64, sigma_data=0.4)(x_t / (1 - t).view(b), t / (1 - t), y).out
    want = (x_t - denoised) / t.view(b)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    ones = torch.ones(4, dtype=torch.float64)
    at_one = method.velocity(x_t.float(), ones.float(), y)
    # t = 1: c_skip = 0, c_out = sd, c_in x = x_t, noise input ln(sigma_max) / 4.
    want_one = x_t - 0.4 * net64(x_t, torch.full((4,), math.log(40.0) / 4, dtype=torch.float64), y).out
    assert torch.isfinite(at_one).all() and torch.allclose(at_one.double(), want_one, rtol=1e-5, atol=1e-5)
    method.net.config = {"_target_": "tests.test_distill_reflow._Net"}  # what a backbone records of itself
    spec = method.snapshot_config()["prediction"]
    assert spec["precond"] == {"_target_": "gen.models.precond.EDMFlowPrecond", "sigma_data": 0.4, "sigma_max": 40.0}
    v = velocity_model(method.net, spec)(x_t.float(), t.float(), y)
    assert torch.allclose(v, got.float(), rtol=1e-5, atol=1e-5)
    out = method.loss("net", {"x0": torch.randn(4, 1, 8, 8), "noise": torch.randn(4, 1, 8, 8), "label": y},
                      SampleRandom([1, 2, 3, 4], namespace="r"), Progress(0, 1, 0))
    assert torch.isfinite(out["loss"]).all()
    with pytest.raises(TeacherError, match="EDMPrecond"):
        Reflow(_Net(), partial(torch.optim.Adam), str(_edm_teacher(teacher_snapshot, tmp_path / "odd.safetensors",
                                                                   "ConsistencyPrecond")), data_name="mnist5k")
