"""Consistency distillation (distill/cd.py; Song et al. 2023, openai/consistency_models cm/karras_diffusion.py).

Covers: the loss from the ``teacher_snapshot`` fixture against a direct computation (the teacher's Heun step in EDM
sigma written out, the flow consistency function, the EMA target) for the L2 and pseudo-Huber metrics; the teacher
gets no gradient and is absent from the parameters, the optimizer, the training state and the student snapshot;
train.py with method=cd sampled by sample.py with no flags (1-step consistency sampler); resuming with another teacher
and an ODE sampler are refused with one line.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch

from distill.cd import ConsistencyDistillation
from gen.ema import EMA
from gen.snapshot import load_network
from gen.train.method import Progress
from gen.utils.ckpt import file_sha256, load_snapshot
from gen.utils.seed import SampleRandom
from tests.conftest import run_train, sample_four
from tests.test_distill_pairs import edited_teacher
from tests.test_train import _final_state

CD = ["method=cd", "sampler=consistency", "method.num_levels=18", "trainer.grad_clip=null"]


class _Perceptual(torch.nn.Module):
    """A stand-in perceptual distance (frozen, no weights)."""

    def forward(self, a, b):  # noqa: ANN001, ANN201
        return (a.tanh() - b.tanh()).abs().flatten(1).mean(1)


def _method(teacher: Path, metric: str = "l2") -> ConsistencyDistillation:
    student, _ = load_network(teacher)
    student = copy.deepcopy(student).train().requires_grad_(True)
    method = ConsistencyDistillation(student, partial(torch.optim.Adam, lr=1e-3), str(teacher),
                                     partial(EMA, decays=[0.95]), num_levels=18, metric=metric,
                                     perceptual=_Perceptual() if metric == "lpips" else None,
                                     data_name="mnist5k", image_resolution=32, image_channels=1)
    method.attach_emas({"net": EMA(method.net, decays=[0.95])})
    with torch.no_grad():  # the student moves away from its EMA target (as after some training)
        for p in method.net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return method


def _flow_d(net: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor, shift: float = 0.0):  # noqa: ANN202
    """``x / (1 + d) - d / (1 + d) v(x / (1 + sigma), sigma / (1 + sigma))`` with ``d = sigma - shift``, float64."""
    s = sigma.double().view(-1, 1, 1, 1)
    d = s - shift
    v = net((x.double() / (1 + s)).float(), (sigma.double() / (1 + sigma.double())).float(), y).out.double()
    return x.double() / (1 + d) - d / (1 + d) * v


@pytest.mark.parametrize("metric", ["l2", "huber", "lpips"])
def test_loss_equals_direct_computation(teacher_snapshot: Path, metric: str) -> None:
    torch.manual_seed(0)
    method = _method(teacher_snapshot, metric)
    x0 = torch.rand(4, 1, 32, 32) * 2 - 1
    y = torch.tensor([1, 4, 7, 9])
    keys = [3, 5, 8, 13]
    out = method.loss("net", {"x0": x0, "label": y}, SampleRandom(keys, namespace="cd"), Progress(0, 1, 0))
    rng = SampleRandom(keys, namespace="cd")  # the method's draws, in its documented order: level, z, label drop
    rng.rand(dtype=torch.float64)
    z = rng.randn(1, 32, 32)
    sig = method.sigmas
    s_hi = out["sigma"].double()
    n = torch.tensor([int(torch.argmin((sig - s).abs())) for s in s_hi]) - 1
    assert bool((n >= 0).all()) and torch.allclose(sig[n + 1], s_hi, rtol=1e-6)
    s_lo = sig[n]
    teacher, student, ema = method.teacher, method.net, method.averaged("net")
    with torch.no_grad():
        x = x0.double() + s_hi.view(-1, 1, 1, 1) * z.double()
        h = (s_lo - s_hi).view(-1, 1, 1, 1)
        d1 = (x - _flow_d(teacher, x, s_hi, y)) / s_hi.view(-1, 1, 1, 1)  # teacher denoiser: no boundary shift
        xe = x + h * d1
        d2 = (xe - _flow_d(teacher, xe, s_lo, y)) / s_lo.view(-1, 1, 1, 1)
        x_lo = x + 0.5 * h * (d1 + d2)
        f_s = _flow_d(student, x.float().double(), s_hi, y, 0.002)
        f_t = _flow_d(ema, x_lo.float().double(), s_lo, y, 0.002)
        if metric == "l2":
            want = (f_s - f_t).pow(2).flatten(1).mean(1)
        elif metric == "lpips":
            want = (f_s.tanh() - f_t.tanh()).abs().flatten(1).mean(1)
        else:
            c = 0.00054 * 1024**0.5
            want = ((f_s - f_t).pow(2).flatten(1).sum(1) + c * c).sqrt() - c
    assert torch.allclose(out["loss"].double(), want, rtol=1e-4, atol=1e-7), (out["loss"], want)


def test_teacher_gets_no_gradient_and_is_never_trained_or_saved(teacher_snapshot: Path) -> None:
    method = _method(teacher_snapshot)
    teacher_params = {id(p) for p in method.teacher.parameters()}
    assert teacher_params and not teacher_params & {id(p) for p in method.parameters()}
    assert not any(k.startswith("teacher") for k in method.state_dict())
    assert list(method.trainable_modules()) == ["net"] and "teacher" in method.frozen_modules()
    out = method.loss("net", {"x0": torch.zeros(2, 1, 32, 32), "label": torch.tensor([0, 1])},
                      SampleRandom([0, 1], namespace="cd"), Progress(0, 1, 0))
    out["loss"].mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in method.net.parameters())
    spec = method.optimizers()[0]
    opt = spec.factory([{"params": [p for m in spec.modules for p in getattr(method, m).parameters()]}])
    assert not teacher_params & {id(p) for g in opt.param_groups for p in g["params"]}


def test_train_sample_and_refusals(tmp_path: Path, teacher_snapshot: Path) -> None:
    extra = [*CD, f"method.teacher={teacher_snapshot}", f"trainer.init={{net: {teacher_snapshot}}}"]
    run_train(tmp_path, "cd", [*extra, "trainer.total_kimg=0.256"])
    run = tmp_path / "cd"
    state = _final_state(run)
    assert set(state["registry"]) >= {"module.net", "ema.net"}
    weights = {n: v for n, v in state["registry"].items() if n != "method"}  # "method": the teacher's reference
    assert not any("teacher" in k for k in weights) and not any(
        "teacher" in k for section in weights.values() if isinstance(section, dict) for k in section)
    assert "teacher" in state["frozen"]
    assert state["registry"]["method"]["teacher"]["sha256"] == file_sha256(teacher_snapshot)
    snap = sorted(run.glob("snapshot-*.safetensors"))[-1]
    tensors, meta = load_snapshot(snap)
    teacher_tensors, _ = load_snapshot(teacher_snapshot)
    assert set(tensors) == set(teacher_tensors)  # the student's network alone, no teacher copy
    assert meta["distill"]["method"] == "cd" and meta["prediction"]["prediction"] == "consistency"
    out = tmp_path / "samples"
    samples = sample_four(run, out)
    assert samples.shape == (4, 32, 32, 1) and samples.std() > 0
    assert "sample_consistency" in (out / "sample.json").read_text()

    other = edited_teacher(teacher_snapshot, tmp_path / "other.safetensors",
                           tensors_fn=lambda t: {k: v * 1.01 if v.is_floating_point() else v for k, v in t.items()})
    for bad, match in (([f"method.teacher={other}", "trainer.total_kimg=0.512"], "teacher"),
                       (["sampler=euler", "trainer.total_kimg=0.512"], "cannot serve a consistency-distilled")):
        proc = run_train(tmp_path, "cd", [*extra, *bad], check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("train.py: error:"), proc.stderr
        assert match in lines[0], lines[0]
