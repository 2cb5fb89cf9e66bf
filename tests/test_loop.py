"""The training loop in-process: fp16 gradient scaling skips an overflowing step and goes on; settings are checked."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from gen.data import Digits
from gen.ema import make_profiles
from gen.objectives import FlowMatching
from gen.train.diffusion import Diffusion
from gen.train.loop import NonFiniteError, TrainConfig, train
from gen.utils.ckpt import list_training_states, load_training_state
from gen.utils.log import read_stats
from tests.presets import micro
from tokenizers.pixels import PixelTokenizer


class OverflowAt(FlowMatching):
    """Flow matching whose loss overflows fp16 at the steps in ``bad`` (an injected overflow)."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad = bad

    def forward(self, net, batch, rng, progress=None):
        out = super().forward(net, batch, rng, progress)
        if progress.step in self.bad:
            out["loss"] = out["loss"] * 1e30  # finite in fp32, infinite once scaled by the gradient scaler
        return out


def _run(run_dir: Path, objective: FlowMatching, precision: str, total_kimg: float = 0.16) -> Diffusion:
    torch.manual_seed(0)
    net = micro("dit", input_size=8, in_channels=1, num_classes=10)
    method = Diffusion(net, objective, functools.partial(torch.optim.Adam, lr=1e-3))
    cfg = TrainConfig(total_kimg=total_kimg, batch_size=16, status_kimg=0.016, checkpoint_kimg=1.0, snapshot_kimg=1.0,
                      precision=precision, tensorboard=False, progress=False, device="cpu")
    train(method=method, dataset=Digits(), tokenizer=PixelTokenizer(channels=1), ema_profiles=make_profiles([0.9]),
          cfg=cfg, run_dir=run_dir, config={}, snapshot_meta={})
    return method


def test_fp16_skips_an_overflowing_step_and_continues(tmp_path: Path) -> None:
    _run(tmp_path, OverflowAt({3}), "fp16")
    state = load_training_state(list_training_states(tmp_path)[-1][1])
    reg = state["registry"]
    assert reg["counters"] == {"nimg": 160, "step": 10}
    adam_steps = {float(v["step"]) for v in reg["optim.main"]["state"].values()}
    assert adam_steps == {9.0}, "exactly one of the 10 steps was skipped"
    assert reg["scaler.main"]["scale"] < 65536.0  # the scale was lowered after the overflow
    assert all(torch.isfinite(v).all() for v in reg["module.net"].values())
    skipped = [r for r in read_stats(tmp_path / "stats.jsonl") if r.get("skipped_steps")]
    assert [r["nimg"] for r in skipped] == [64] and skipped[0]["skipped_steps"] == 1.0


def test_fp32_stops_at_a_non_finite_loss(tmp_path: Path) -> None:
    class NaNAt(FlowMatching):
        def forward(self, net, batch, rng, progress=None):
            out = super().forward(net, batch, rng, progress)
            if progress.step == 2:
                out["loss"] = out["loss"] * float("nan")
            return out

    with pytest.raises(NonFiniteError, match="non-finite loss/gradient at step 2"):
        _run(tmp_path, NaNAt(), "no")
    assert not list_training_states(tmp_path)


def test_fp16_stops_after_too_many_skipped_steps(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteError, match="steps in a row overflowed"):
        torch.manual_seed(0)
        net = micro("dit", input_size=8, in_channels=1, num_classes=10)
        method = Diffusion(net, OverflowAt(set(range(100))), functools.partial(torch.optim.Adam, lr=1e-3))
        cfg = TrainConfig(total_kimg=0.16, batch_size=16, precision="fp16", max_skipped_steps=4, tensorboard=False,
                          progress=False, device="cpu")
        train(method=method, dataset=Digits(), tokenizer=PixelTokenizer(channels=1), ema_profiles=make_profiles([0.9]),
              cfg=cfg, run_dir=tmp_path, config={}, snapshot_meta={})


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("grad_clip", 0.0, "positive number"),
        ("grad_clip", -1.0, "positive number"),
        ("batch_per_gpu", 0, "batch_per_gpu"),
        ("total_kimg", float("inf"), "finite"),
        ("lr_warmup_kimg", float("nan"), "lr_warmup_kimg"),
        ("status_kimg", 0.0, "status_kimg"),
        ("keep_states", -1, "keep_states"),
    ],
)
def test_settings_that_break_training_are_refused(key: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})
