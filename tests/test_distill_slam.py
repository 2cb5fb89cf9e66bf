"""SLAM (distill/slam.py; Xu et al. 2024, MCG-NJU/SPLAM splam/train_splam_distill_sd_wds.py).

Covers: the loss against a direct computation from the documented draws (the guided teacher's DDIM step, the EMA
target at gamma = 1, the sub-path point x_gamma and its noise level, the velocity read at that level, LCM's boundary
scalings, the sin-cos gamma embedding written out); the student starts as its teacher; the teacher gets no gradient
and is in no saved state; the multistep sampler; train.py then sample.py at 1 and 2 steps with no flags; a backbone
without the gamma slot refused in one line naming the key and the fix.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from distill.slam import SubpathLinearApproximation
from gen.ema import EMA
from gen.models.common import ModelOutput
from gen.models.dit import DiT
from gen.models.prediction import velocity_model
from gen.models.student import condition_embedding
from gen.paths import LinearPath
from gen.snapshot import load_network
from gen.train.method import Progress
from gen.utils.ckpt import load_snapshot
from gen.utils.seed import PerImageRandom, SampleRandom
from samplers import lcm_grid, sample_lcm, uniform_grid
from samplers.spec import SamplerSpec
from tests.conftest import ROOT, run_train, subprocess_env

KEYS = [2, 7, 11, 40]
LABELS = torch.tensor([0, 3, 6, 9])
DIM = 16


def _student(teacher: Path) -> DiT:
    net, _ = load_network(teacher)
    return DiT(**{**{k: v for k, v in net.config.items() if k != "_target_"}, "augment_dim": DIM}).train()


def _method(teacher: Path, perturb: bool = True, **kw) -> SubpathLinearApproximation:  # noqa: ANN003
    method = SubpathLinearApproximation(_student(teacher), partial(torch.optim.Adam, lr=1e-3), str(teacher),
                                        partial(EMA, decays=[0.95]), gamma_dim=DIM, guidance=1.5,
                                        data_name="mnist5k", image_resolution=32, image_channels=1, **kw)
    method.attach_emas({"net": EMA(method.net, decays=[0.95])})
    if perturb:
        torch.manual_seed(0)
        with torch.no_grad():  # the student moves away from its target, and gamma matters
            for p in method.net.parameters():
                p.add_(0.02 * torch.randn_like(p))
            method.net.aug_embedder.weight.normal_(0, 0.1)
    return method


def _emb(w: float) -> torch.Tensor:
    """LCM's embedding of w: ``[sin(1000 w omega_i), cos(1000 w omega_i)]``, ``omega_i = 10000^(-i / (D/2 - 1))``."""
    ang = [1000.0 * w / 10000 ** (i / (DIM / 2 - 1)) for i in range(DIM // 2)]
    return torch.tensor([[*map(math.sin, ang), *map(math.cos, ang)]])


def test_gamma_embedding_is_lcms_guidance_scale_embedding() -> None:
    """The frequencies of LCM's ``guidance_scale_embedding`` (MCG-NJU/SPLAM feeds gamma through it) run from 1 to
    exactly 1e-4: ``10000^(-i / (D/2 - 1))``, not the position tables' ``10000^(-i / (D/2))`` (the old code's)."""
    w = torch.tensor([0.0, 0.37, 4.2, 10.0], dtype=torch.float64)
    omega = torch.tensor([1.0, 10 ** (-4 / 3), 10 ** (-8 / 3), 1e-4], dtype=torch.float64)  # D = 8
    ang = 1000.0 * w[:, None] * omega
    want = torch.cat([ang.sin(), ang.cos()], 1)
    got = condition_embedding(w, 8)
    assert got.dtype == torch.float32 and got.shape == (4, 8)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="even width >= 4"):
        condition_embedding(w, 2)


def _boundary(t: float) -> tuple[float, float]:
    s = 10_000.0 * t
    return 0.25 / (s * s + 0.25), s / math.sqrt(s * s + 0.25)


def _v(net: torch.nn.Module, x: torch.Tensor, t: float, y: torch.Tensor, gamma: float | None = None) -> torch.Tensor:
    kw = {} if gamma is None else {"augment": _emb(10 - 10 * gamma)}
    return net(x.float(), torch.tensor([t]), y, **kw).out.double()


@pytest.mark.parametrize("loss,subpath", [("huber", True), ("l2", True), ("huber", False)])
def test_loss_equals_direct_computation(teacher_snapshot: Path, loss: str, subpath: bool) -> None:
    """SLAM, and with ``subpath=False`` LCM's consistency distillation (gamma = 1: the student at x_s, sigma_s)."""
    method = _method(teacher_snapshot, loss=loss, subpath=subpath)
    torch.manual_seed(1)
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    got = method.loss("net", {"x0": x0, "label": LABELS}, SampleRandom(KEYS, namespace="slam"), Progress(0, 1, 0))
    rng = SampleRandom(KEYS, namespace="slam")  # draws in the documented order: level, eps, gamma (, label drop)
    u, eps, gammas = rng.rand(dtype=torch.float64), rng.randn(1, 32, 32), rng.rand(dtype=torch.float64)
    if not subpath:
        gammas = torch.ones_like(gammas)
    want = []
    with torch.no_grad():
        for b in range(4):
            y, g = LABELS[b:b + 1], float(gammas[b])
            j = int(u[b] * 50) + 1
            t_s, t_e = 0.936 * j / 50, 0.936 * (j - 1) / 50
            x_s = (1 - t_s) * x0[b:b + 1].double() + t_s * eps[b:b + 1].double()
            v_c, v_u = _v(method.teacher, x_s, t_s, y), _v(method.teacher, x_s, t_s, torch.tensor([10]))
            v = v_c + 1.5 * (v_c - v_u)  # LCM's form of guidance
            x_e = (1 - t_e) * (x_s - t_s * v) + t_e * (x_s + (1 - t_s) * v)  # the DDIM step
            cs, co = _boundary(t_e)
            target = cs * x_e + co * (x_e - t_e * _v(method.averaged("net"), x_e, t_e, y, gamma=1.0))
            x_g = g * x_s + (1 - g) * (1 - t_s) / (1 - t_e) * x_e
            s_a = (1 - t_s) * t_e / (1 - t_e)
            s_tilde = math.sqrt((1 - g * g) * s_a**2 + g * g * t_s**2)
            v_s = _v(method.net, x_g, t_s, y, gamma=g)
            x0_hat = (x_g - s_tilde * v_s) / (1 - t_s + s_tilde)  # v = eps - x0 read at noise level s_tilde
            cs, co = _boundary(t_s)
            f = cs * x_g + co * x0_hat
            d = f - target
            want.append((((d * d + 1e-6).sqrt() - 1e-3) if loss == "huber" else d * d).mean())
    want = torch.stack(want)
    assert torch.allclose(got["loss"].double(), want, rtol=2e-4, atol=1e-6), (got["loss"], want)
    assert torch.allclose(got["gamma"].double(), gammas.float().double())


def test_student_starts_as_the_teacher_and_the_teacher_is_never_trained_or_saved(teacher_snapshot: Path) -> None:
    method = _method(teacher_snapshot, perturb=False)
    x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([0.3, 0.9]), LABELS[:2]
    with torch.no_grad():
        f = method.consistency_fn(method.net)(x, t, y).out.double()
        v = method.teacher(x, t, y).out.double()
    s = 10_000.0 * t.double().view(-1, 1, 1, 1)
    x0_teacher = x.double() - t.double().view(-1, 1, 1, 1) * v
    want = 0.25 / (s * s + 0.25) * x.double() + s / (s * s + 0.25).sqrt() * x0_teacher
    assert torch.allclose(f, want, atol=1e-5)
    teacher_params = {id(p) for p in method.teacher.parameters()}
    assert teacher_params and not teacher_params & {id(p) for p in method.parameters()}
    assert not any(k.startswith("teacher") for k in method.state_dict())
    assert list(method.trainable_modules()) == ["net"] and "teacher" in method.frozen_modules()
    out = method.loss("net", {"x0": torch.zeros(2, 1, 32, 32), "label": y}, SampleRandom([0, 1]), Progress(0, 1, 0))
    out["loss"].mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    grad = method.net.aug_embedder.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0  # gamma reaches the student


def test_multistep_sampler_returns_the_consistency_output_and_renoises_per_image() -> None:
    path = LinearPath()
    target = torch.linspace(-1, 1, 4).view(1, 1, 2, 2)
    seen = []

    def model_fn(x, t, y):  # noqa: ANN001, ANN202  # a consistency function with the constant output `target`
        seen.append(x.clone())
        return path.velocity_from_x0(x, target.expand_as(x).to(x.dtype), t)

    noise = PerImageRandom([0, 1]).randn((1, 2, 2))
    for steps in (1, 3):
        seen.clear()
        out = sample_lcm(model_fn, noise, uniform_grid(steps, path=path), path=path,
                         randn_like=PerImageRandom([0, 1]).randn_like)
        assert torch.allclose(out, target.expand_as(out), atol=1e-6) and len(seen) == steps
    # The second call's input is target re-noised to t = 2/3 with each image's own noise.
    n1 = PerImageRandom([5]).randn_like(noise[:1])
    sample_lcm(model_fn, noise[:1], uniform_grid(3, path=path), path=path, randn_like=PerImageRandom([5]).randn_like)
    assert torch.allclose(seen[-2], (1 / 3) * target + (2 / 3) * n1, atol=1e-6)


SLAM = ["experiment=yardstick_slam", "model.depth=2", "model.hidden_size=64", "model.num_heads=2", "method.gamma_dim=16",
        "trainer.total_kimg=0.128", "trainer.checkpoint_kimg=0.064", "trainer.snapshot_kimg=0.128",
        "trainer.status_kimg=0.064", "trainer.lr_warmup_kimg=0.064"]


def test_a_backbone_without_the_gamma_slot_is_refused_in_one_line(tmp_path: Path, teacher_snapshot: Path) -> None:
    with pytest.raises(ValueError, match=r"method.gamma_dim=16: the student backbone DiT .* set model.augment_dim=16"):
        load = load_network(teacher_snapshot)[0]
        SubpathLinearApproximation(copy.deepcopy(load), partial(torch.optim.Adam), str(teacher_snapshot),
                                   partial(EMA, decays=[0.95]), gamma_dim=16)
    extra = [*SLAM, f"trainer.init.net={teacher_snapshot}"]
    proc = run_train(tmp_path, "bad", [*extra, "model.augment_dim=0"], check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("train.py: error:"), proc.stderr
    assert "set model.augment_dim=16" in lines[0], lines[0]


@pytest.mark.slow
def test_train_then_sample_in_one_and_two_steps(tmp_path: Path, teacher_snapshot: Path) -> None:
    extra = [*SLAM, f"trainer.init.net={teacher_snapshot}"]
    run_train(tmp_path, "slam", extra)
    run = tmp_path / "slam"
    tensors, meta = load_snapshot(sorted(run.glob("snapshot-*.safetensors"))[-1])
    assert meta["distill"]["method"] == "slam" and meta["prediction"]["prediction"] == "consistency"
    assert set(tensors) == set(load_snapshot(teacher_snapshot)[0]) | {"aug_embedder.weight"}
    for steps in (1, 2):
        out = tmp_path / f"samples{steps}"
        proc = subprocess.run([sys.executable, "sample.py", f"snapshot={run}", f"outdir={out}", "seeds=0-3",
                               f"sampler=slam_{steps}step"], cwd=ROOT, env=subprocess_env(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with np.load(out / "samples.npz") as f:
            assert f["arr_0"].shape == (4, 32, 32, 1) and f["arr_0"].std() > 0
        assert "sample_lcm" in (out / "sample.json").read_text()


def test_trainer_init_keeps_a_zero_condition_slot_the_teacher_file_lacks(teacher_snapshot: Path) -> None:
    from gen.snapshot import init_from_snapshot

    student = _student(teacher_snapshot)
    init_from_snapshot(student, teacher_snapshot, "trainer.init.net")
    teacher, _ = load_network(teacher_snapshot)
    assert not student.aug_embedder.weight.detach().any()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items() if k in teacher.state_dict())
    with torch.no_grad():
        student.aug_embedder.weight.fill_(0.1)  # a trained slot is not silently kept: the file holds another network
    with pytest.raises(ValueError, match="trainer.init.net: cannot start from"):
        init_from_snapshot(student, teacher_snapshot, "trainer.init.net")


def _lcm_scheduler_levels(steps: int, num_levels: int) -> list[int]:
    """The levels j (DDPM step ``j 1000 / N - 1``) that diffusers' ``LCMScheduler`` samples at for ``steps`` steps."""
    from diffusers import LCMScheduler

    sched = LCMScheduler(num_train_timesteps=1000, original_inference_steps=num_levels)
    sched.set_timesteps(steps)
    return [(int(k) + 1) // (1000 // num_levels) for k in sched.timesteps]


@pytest.mark.parametrize("num_levels", [50, 8])
def test_lcm_grid_is_lcm_schedulers_times_on_the_students_levels(num_levels: int) -> None:
    levels = torch.linspace(0.0, 0.936, num_levels + 1, dtype=torch.float64)  # SubpathLinearApproximation.levels
    for steps in range(1, num_levels + 1):
        want = levels[_lcm_scheduler_levels(steps, num_levels) + [0]]
        assert torch.equal(lcm_grid(steps, 0.936, num_levels=num_levels), want), steps


def test_slam_presets_sample_at_the_students_levels() -> None:
    # The 4-step preset once used uniform_grid: levels 37.5 and 12.5, which the student never trained at.
    levels = torch.linspace(0.0, 0.936, 51, dtype=torch.float64)
    for steps in (1, 2, 4):
        cfg = yaml.safe_load((ROOT / "configs" / "sampler" / f"slam_{steps}step.yaml").read_text())
        ts = SamplerSpec.from_config(cfg).time_grid(LinearPath())
        torch.testing.assert_close(ts, levels[_lcm_scheduler_levels(steps, 50) + [0]], rtol=0, atol=1e-15)
    assert _lcm_scheduler_levels(4, 50) == [50, 38, 25, 13]


class _Slot(torch.nn.Module):
    """A closed-form velocity backbone with a 4-wide condition slot."""

    augment_dim = 4

    def forward(self, x, t, y=None, augment=None):  # noqa: ANN001, ANN201
        v = torch.tanh(1.3 * x + 0.5) * (1 + t.view(-1, 1, 1, 1)) - 0.7 * x + augment[:, :1].view(-1, 1, 1, 1)
        return ModelOutput(out=v)


def test_lcm_sampler_steps_are_lcms_update_rule() -> None:
    """sample_lcm on a SLAM student: f = c_skip x + c_out (x - t v) at gamma = 1, then (1 - t') f + t' n, f at the end."""
    path = LinearPath()
    spec = {"path": {"_target_": "gen.paths.LinearPath"}, "prediction": "consistency",
            "precond": {"_target_": "gen.models.student.SubpathConsistency", "gamma_dim": 4}}
    model_fn = velocity_model(_Slot(), spec)
    noise = PerImageRandom([3, 4]).randn((1, 4, 4)).double()
    ts = lcm_grid(4, 0.936)
    out = sample_lcm(model_fn, noise, ts, path=path, randn_like=PerImageRandom([7, 8]).randn_like)
    draws, x = PerImageRandom([7, 8]), ts[0] * noise
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        v = _Slot()(x, torch.full((2,), t, dtype=torch.float64), augment=torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)).out  # emb(0): sin 0, cos 0
        scaled = 10_000.0 * t
        f = 0.25 / (scaled**2 + 0.25) * x + scaled / math.sqrt(scaled**2 + 0.25) * (x - t * v)
        x = (1 - t_next) * f + t_next * draws.randn_like(f) if t_next > 0 else f
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)


def test_an_lcm_grid_on_other_levels_is_refused(teacher_snapshot: Path) -> None:
    method = _method(teacher_snapshot, perturb=False)
    grid = {"_target_": "samplers.grids.lcm_grid", "t_max": 0.936}
    method.check_sampler({"solver": {"_target_": "samplers.sample_lcm"}, "grid": grid})
    with pytest.raises(ValueError, match=r"sampler.grid.num_levels=20 differs .* set sampler.grid.num_levels=50"):
        method.check_sampler({"solver": {"_target_": "samplers.sample_lcm"}, "grid": {**grid, "num_levels": 20}})


def test_level_diagnosis_follows_the_methods_trajectory_and_start(teacher_snapshot: Path) -> None:
    """bench/slam_levels.py: its trajectory is the method's own guided DDIM steps down the grid, and its "student at
    the start" is the unperturbed student (teacher weights, zero gamma slot) at gamma = 1."""
    sys.path.insert(0, str(ROOT / "bench"))
    import slam_levels

    method = _method(teacher_snapshot, perturb=False, num_levels=4)
    levels, points, y = slam_levels.trajectory(str(teacher_snapshot), 3, 4, 0.936, 1.5, seed=5)
    assert torch.equal(levels, method.levels) and points.shape == (5, 3, 1, 32, 32) and y.tolist() == [0, 1, 2]
    for j in (4, 1):  # each point is one teacher step from the one above it
        want = method.teacher_step(points[j], levels[j].expand(3), levels[j - 1].expand(3), y)
        torch.testing.assert_close(points[j - 1], want, rtol=0, atol=0)
    start = slam_levels.student_at_start(str(teacher_snapshot), 0.5, 10_000.0)
    student = method.consistency_fn(method.net.eval())
    for j in (1, 3, 4):
        t = levels[j].expand(3).float()
        torch.testing.assert_close(start(points[j].float(), t, y).float(), student(points[j].float(), t, y).out,
                                   rtol=1e-5, atol=1e-5)
    err = slam_levels.level_errors(start, levels, points, y)
    assert err.shape == (4,) and bool((err[1:] > 0).all())
