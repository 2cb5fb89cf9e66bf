"""TDM (distill/tdm.py; Luo et al. 2025, Luo-Yihong/TDM train_tdm_demo.py).

Covers: both phase losses against a direct computation from the documented draws (the student's Euler rollout, the
segment, tau on the teacher's grid, the diffusion from the segment end, the importance weight, the guided teacher, the
eta-normalised pseudo-Huber surrogate); each phase leaves the other network unchanged; the teacher gets no gradient and
is in no saved state; a run killed between the two phases and re-run equals the uninterrupted run and samples with no
flags; the step-count-conditioned (unify) student and sampler; refusals (K not dividing the trajectory, a fake score of
another shape, a unify student without the condition slot), each one line naming the key.
"""

from __future__ import annotations

import copy
import math
import subprocess
from functools import partial
from pathlib import Path

import pytest
import torch

from distill.tdm import TrajectoryDistributionMatching
from distill.teacher import TeacherError
from gen.models.dit import DiT
from gen.paths import CosinePath, LinearPath
from gen.snapshot import load_network
from gen.train.method import Progress
from gen.utils.ckpt import load_snapshot
from gen.utils.seed import SampleRandom
from samplers import sample_ddim, sample_euler, uniform_grid
from tests.conftest import ROOT, Background, run_train, sample_four, subprocess_env, train_command
from tests.test_train import _final_state, _max_diff

KEYS = [3, 5, 8, 13]
LABELS = torch.tensor([1, 4, 7, 9])


def _method(teacher: Path, guidance: float = 2.0, **kw) -> TrajectoryDistributionMatching:  # noqa: ANN003
    student, _ = load_network(teacher)
    student = copy.deepcopy(student).train().requires_grad_(True)
    method = TrajectoryDistributionMatching(student, partial(torch.optim.Adam, lr=1e-3), str(teacher),
                                            guidance=guidance, data_name="mnist5k", image_resolution=32,
                                            image_channels=1, **kw)
    torch.manual_seed(0)
    with torch.no_grad():  # student and fake score move away from the teacher (as after some training)
        for p in [*method.net.parameters(), *method.fake_score.parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    return method


def _x0_eps(net: torch.nn.Module, x: torch.Tensor, t: float, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LinearPath: ``x0 = x - t v``, ``eps = x + (1 - t) v`` of one sample (1, C, H, W), float64."""
    v = net(x.float(), torch.tensor([t]), y).out.double()
    return x.double() - t * v, x.double() + (1 - t) * v


def _direct(method: TrajectoryDistributionMatching, phase: str) -> torch.Tensor:
    """Both losses of K = 4, N = 1000 written out per sample from the draws: z, segment, tau, n."""
    rng = SampleRandom(KEYS, namespace="tdm")
    z, u_seg = rng.randn(1, 32, 32), rng.rand(dtype=torch.float64)
    u_tau, n = rng.rand(dtype=torch.float64), rng.randn(1, 32, 32)
    out = []
    with torch.no_grad():
        for b in range(len(KEYS)):
            y = LABELS[b:b + 1]
            i = int(u_seg[b] * 4) + 1
            x = z[b:b + 1].double()
            for j in range(4 - i):  # Euler steps 1 -> (4 - j - 1) / 4 until t_g = i / 4
                x0, eps = _x0_eps(method.net, x, (4 - j) / 4, y)
                x = (1 - (3 - j) / 4) * x0 + (3 - j) / 4 * eps
            x0, eps = _x0_eps(method.net, x, i / 4, y)
            lo, hi = max(20, 250 * (i - 1)), 250 * i - 10
            tau = (lo + int(u_tau[b] * (hi - lo))) / 1000
            t_m = (i - 1) / 4
            x_m = (1 - t_m) * x0 + t_m * eps
            nb = n[b:b + 1].double()
            x_tau = (1 - tau) / (1 - t_m) * x_m + (tau**2 - ((1 - tau) * t_m / (1 - t_m)) ** 2) ** 0.5 * nb
            fake, _ = _x0_eps(method.fake_score, x_tau, tau, y)
            if phase == "fake_score":
                m = (x_tau - (1 - tau) * x0) / tau
                w = torch.exp(-0.5 * m.square().mean()) / torch.exp(-0.5 * nb.square().mean())
                out.append((fake - x0).square().mean() * min(((1 - tau) / tau) ** 2, 5.0) * w)
                continue
            real_c, _ = _x0_eps(method.teacher, x_tau, tau, y)
            real_u, _ = _x0_eps(method.teacher, x_tau, tau, torch.tensor([10]))
            real = real_c + (2.0 - 1.0) * (real_c - real_u)
            target = x0 + real - fake
            eta = (x0 - real).abs().mean()
            out.append((((x0 - target).square() + 1e-6).sqrt() - 1e-3).mean() / eta)
    return torch.stack(out)


@pytest.mark.parametrize("phase", ["fake_score", "net"])
def test_phase_losses_equal_direct_computation(teacher_snapshot: Path, phase: str) -> None:
    method = _method(teacher_snapshot)
    got = method.loss(phase, {"label": LABELS}, SampleRandom(KEYS, namespace="tdm"), Progress(0, 1, 0))["loss"]
    want = _direct(method, phase)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-7), (got, want)
    assert float(want.abs().min()) > 0


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_each_phase_leaves_the_other_network_unchanged_and_the_teacher_untouched(teacher_snapshot: Path) -> None:
    method = _method(teacher_snapshot)
    teacher_params = {id(p) for p in method.teacher.parameters()}
    assert teacher_params and not teacher_params & {id(p) for p in method.parameters()}
    assert not any(k.startswith("teacher") for k in method.state_dict())
    assert list(method.trainable_modules()) == ["net", "fake_score"] and "teacher" in method.frozen_modules()
    specs = {s.name: s for s in method.optimizers()}
    assert [s.name for s in method.optimizers()] == list(method.phases(Progress(0, 1, 0))) == ["fake_score", "net"]
    rng = SampleRandom(KEYS, namespace="tdm")
    for phase, other in (("fake_score", "net"), ("net", "fake_score")):
        spec = specs[phase]
        assert spec.modules == (phase,)
        opt = spec.factory([{"params": list(getattr(method, phase).parameters())}])
        before, mine = _params(getattr(method, other)), _params(getattr(method, phase))
        method.zero_grad(set_to_none=True)
        method.loss(phase, {"label": LABELS}, rng, Progress(0, 1, 0))["loss"].mean().backward()
        assert all(p.grad is None for p in getattr(method, other).parameters()), f"{phase} reached {other}"
        assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
        opt.step()
        assert _max_diff(before, _params(getattr(method, other))) == 0.0
        assert _max_diff(mine, _params(getattr(method, phase))) > 0
    assert method.shared.has("x")  # the generator phase reused the fake phase's rollout


def test_refusals_name_the_key_and_the_fix(teacher_snapshot: Path) -> None:
    with pytest.raises(ValueError, match=r"K=3 does not divide method.trajectory_steps=1000 .*use K in"):
        _method(teacher_snapshot, num_steps=3)
    with pytest.raises(ValueError, match=r"K=3 does not divide method.trajectory_steps=1000"):
        _method(teacher_snapshot, unify_steps=[1, 2, 3])
    net, _ = load_network(teacher_snapshot)
    other = DiT(in_channels=1, input_size=32, num_classes=10, depth=2, hidden_size=32, num_heads=2, patch_size=4)
    with pytest.raises(TeacherError, match=r"method.fake_score is another network than the teacher .*teacher's "
                                           r"model config"):
        TrajectoryDistributionMatching(copy.deepcopy(net), partial(torch.optim.Adam), str(teacher_snapshot),
                                       fake_score=other)
    with pytest.raises(ValueError, match=r"method.unify_steps=\[1, 2, 4\] .* set model.augment_dim"):
        _method(teacher_snapshot, unify_steps=[1, 2, 4])


def test_train_refuses_a_bad_step_count_and_fake_score_in_one_line(teacher_snapshot: Path, tmp_path: Path) -> None:
    small_fake = ("method.fake_score={_target_: gen.models.dit.DiT, in_channels: 1, input_size: 32, num_classes: 10, "
                  "depth: 2, hidden_size: 32, num_heads: 2, patch_size: 4}")
    for bad, match in (("method.num_steps=3", "method.trajectory_steps=1000"),
                       (small_fake, "method.fake_score is another network than the teacher")):
        proc = run_train(tmp_path, "bad", ["method=tdm", "sampler=tdm_4step", f"method.teacher={teacher_snapshot}",
                                           bad], check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("train.py: error:"), proc.stderr
        assert match in lines[0], lines[0]


def test_unify_student_is_told_its_step_count(teacher_snapshot: Path) -> None:
    net, _ = load_network(teacher_snapshot)
    student = DiT(**{**{k: v for k, v in net.config.items() if k != "_target_"}, "augment_dim": 16}).train()
    method = TrajectoryDistributionMatching(student, partial(torch.optim.Adam), str(teacher_snapshot),
                                            unify_steps=[1, 2, 4], guidance=1.0)
    assert method.fake_score.augment_dim == 16
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # the zero slot: the student starts as exactly the teacher, whatever K
        same = method.call(method.net, x, torch.full((2,), 0.5), LABELS[:2], torch.tensor([1, 4]))[0]
        ref = method.teacher(x, torch.full((2,), 0.5), LABELS[:2]).out
        assert torch.allclose(same, x - 0.5 * ref, atol=1e-6)
        method.net.aug_embedder.weight.normal_()
        a = method.call(method.net, x, torch.full((2,), 0.5), LABELS[:2], torch.tensor([1, 1]))[0]
        b = method.call(method.net, x, torch.full((2,), 0.5), LABELS[:2], torch.tensor([4, 4]))[0]
    assert float((a - b).abs().max()) > 1e-3
    out = method.loss("fake_score", {"label": LABELS}, SampleRandom(KEYS, namespace="u"), Progress(0, 1, 0))
    assert out["loss"].shape == (4,) and bool(torch.isfinite(out["loss"]).all())
    seen = []

    def model_fn(x, t, y, num_steps=None):  # noqa: ANN001, ANN202
        seen.append(num_steps)
        return torch.zeros_like(x)

    sample_ddim(model_fn, torch.randn(1, 1, 2, 2), uniform_grid(2, path=LinearPath()), path=LinearPath(),
                condition_steps=True)
    assert seen == [2, 2]


def test_ddim_is_euler_on_the_linear_path() -> None:
    torch.manual_seed(0)
    w = torch.randn(1, 1, 4, 4)

    def model_fn(x, t, y):  # noqa: ANN001, ANN202
        return torch.tanh(x * w + t.view(-1, 1, 1, 1))

    noise = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    ts = uniform_grid(4, path=LinearPath())
    a = sample_ddim(model_fn, noise, ts, path=LinearPath())
    b = sample_euler(model_fn, noise, ts, path=LinearPath())
    assert torch.allclose(a, b, atol=1e-12)


TDM = ["method=tdm", "sampler=tdm_4step", "method.guidance=2.0", "trainer.grad_clip=1.0",
       "method._target_=tests.example_tdm_kill.KillBetweenPhases", "packages=[tests]",
       "trainer.total_kimg=0.256", "trainer.checkpoint_kimg=0.064", "trainer.snapshot_kimg=0.128"]


@pytest.mark.slow
def test_killed_between_phases_resumes_to_the_uninterrupted_run_and_samples(tmp_path: Path,
                                                                            teacher_snapshot: Path) -> None:
    extra = [*TDM, f"method.teacher={teacher_snapshot}", f"trainer.init={{net: {teacher_snapshot}}}"]
    straight = Background(train_command(tmp_path, "straight", extra), tmp_path / "straight.log")
    env = {**subprocess_env(), "TDM_KILL_AT_NIMG": "160"}  # step 6 of 8; the last state is at 128 images
    killed = subprocess.run(train_command(tmp_path, "killed", extra), cwd=ROOT, env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    straight.wait()
    resumed = run_train(tmp_path, "killed", extra)
    assert "Resuming from" in resumed.stdout + resumed.stderr
    a, b = _final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")
    for k in ("module.net", "module.fake_score", "ema.net"):
        diff = _max_diff(a["registry"][k], b["registry"][k]) if k != "ema.net" else max(
            _max_diff(x, y) for x, y in zip(_tensor_dicts(a["registry"][k]), _tensor_dicts(b["registry"][k])))
        assert diff <= 1e-6, f"{k}: {diff}"
    assert set(b["frozen"]) == {"teacher"} and not any("teacher" in k for k in b["registry"]["module.net"])
    run = tmp_path / "killed"
    tensors, meta = load_snapshot(sorted(run.glob("snapshot-*.safetensors"))[-1])
    teacher_tensors, _ = load_snapshot(teacher_snapshot)
    assert set(tensors) == set(teacher_tensors)  # the student alone: no fake score, no teacher
    assert meta["distill"]["method"] == "tdm" and meta["sampler"]["steps"] == 4
    out = tmp_path / "samples"
    samples = sample_four(run, out)
    assert samples.shape == (4, 32, 32, 1) and samples.std() > 0


def _tensor_dicts(state: object) -> list[dict[str, torch.Tensor]]:
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return [state]
    if isinstance(state, dict):
        return [d for k in sorted(state) for d in _tensor_dicts(state[k])]
    if isinstance(state, (list, tuple)):
        return [d for v in state for d in _tensor_dicts(v)]
    return []


def test_ddim_steps_are_the_eta0_update_written_out_on_a_variance_preserving_path() -> None:
    """x0 and eps from the velocity at (x, t), then ``alpha(t') x0 + sigma(t') eps``; the last step returns x0
    (Song et al. 2021, Eq. 12 with eta = 0; TDM's ``generate_new``). On the cosine path DDIM is not Euler."""
    torch.manual_seed(1)
    w = torch.randn(1, 2, 3, 3, dtype=torch.float64)

    def model_fn(x, t, y):  # noqa: ANN001, ANN202
        return torch.tanh(x * w) * (1 + t.view(-1, 1, 1, 1)) - 0.5 * x

    noise = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    ts = torch.tensor([1.0, 0.7, 0.35, 0.0], dtype=torch.float64)
    out = sample_ddim(model_fn, noise, ts, path=CosinePath())
    h = math.pi / 2
    x = math.sin(h * 1.0) * noise
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        v = model_fn(x, torch.full((2,), t, dtype=torch.float64), None)
        a, s, da, ds = math.cos(h * t), math.sin(h * t), -h * math.sin(h * t), h * math.cos(h * t)
        x0, eps = (ds * x - s * v) / (a * ds - s * da), (a * v - da * x) / (a * ds - s * da)
        x = math.cos(h * t_next) * x0 + math.sin(h * t_next) * eps if t_next > 0 else x0
    torch.testing.assert_close(out, x, rtol=0, atol=1e-12)
