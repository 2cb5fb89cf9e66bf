"""The training loop in-process: fp16 gradient scaling skips an overflowing step and goes on; settings are checked."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from gen.data import Digits
from gen.ema import EMA
from gen.objectives import FlowMatching
from gen.train.diffusion import Diffusion
from gen.train.loop import NonFiniteError, TrainConfig, train
from gen.train.method import Method, OptimizerSpec, Progress
from gen.utils.ckpt import list_training_states, load_snapshot, load_training_state
from gen.utils.config import ConfigError
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
    train(method=method, dataset=Digits(), tokenizer=PixelTokenizer(channels=1), ema=functools.partial(EMA, decays=[0.9]),
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
        train(method=method, dataset=Digits(), tokenizer=PixelTokenizer(channels=1), ema=functools.partial(EMA, decays=[0.9]),
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


class AuxOnce(Diffusion):
    """The diffusion method plus a module ``aux`` whose optimizer steps at step 0 only; both modules have EMAs."""

    trainable = ("net", "objective", "aux")
    ema_modules = ("net", "aux")

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__(net, FlowMatching(), functools.partial(torch.optim.SGD, lr=1e-2))
        self.aux = torch.nn.Linear(2, 1)

    def optimizers(self) -> list[OptimizerSpec]:
        return [*super().optimizers(), OptimizerSpec("aux", ("aux",), functools.partial(torch.optim.SGD, lr=0.5))]

    def phases(self, progress: Progress) -> list[str]:
        return ["main", "aux"] if progress.step == 0 else ["main"]

    def loss(self, phase, batch, rng, progress):
        if phase == "main":
            return super().loss(phase, batch, rng, progress)
        return {"loss": self.aux(torch.ones(batch["x0"].shape[0], 2)).squeeze(1)}


def _train_micro(method: Method, run_dir: Path, ema: object, total_kimg: float = 0.048) -> None:
    cfg = TrainConfig(total_kimg=total_kimg, batch_size=16, status_kimg=0.016, checkpoint_kimg=1.0, snapshot_kimg=1.0,
                      tensorboard=False, progress=False, device="cpu")
    train(method=method, dataset=Digits(), tokenizer=PixelTokenizer(channels=1), ema=ema, cfg=cfg, run_dir=run_dir,
          config={}, snapshot_meta={})


def test_ema_updates_only_after_its_module_stepped_and_is_readable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    method = AuxOnce(micro("dit", input_size=8, in_channels=1, num_classes=10))
    w0 = {k: v.clone() for k, v in method.aux.state_dict().items()}
    _train_micro(method, tmp_path, functools.partial(EMA, decays=[0.5]))  # 3 steps; aux steps at step 0 only
    reg = load_training_state(list_training_states(tmp_path)[-1][1])["registry"]
    w1 = reg["module.aux"]
    assert not torch.equal(w0["weight"], w1["weight"])
    ema = reg["ema.aux"]
    for k in w0:  # one update of decay 0.5 (step 0), none at steps 1 and 2
        torch.testing.assert_close(ema[f"copies.d0_5.{k}"], 0.5 * w0[k] + 0.5 * w1[k], rtol=0, atol=1e-7)
    # The method reads its averages (the target network) through the one EMA the loop keeps.
    assert method.averaged("aux") is method.__dict__["_emas"]["aux"].averaged()
    with pytest.raises(KeyError, match="no EMA of 'objective'"):
        method.averaged("objective")
    _, meta = load_snapshot(sorted(tmp_path.glob("snapshot-*.safetensors"))[-1])
    assert meta["ema"] == "d0.5" and meta["ema_spec"] == {"_target_": "gen.ema.EMA", "decays": [0.5],
                                                          "halflife_kimg": [], "rampup_ratio": None}


def test_ema_first_names_the_snapshot_profile(tmp_path: Path) -> None:
    net = micro("dit", input_size=8, in_channels=1, num_classes=10)
    ema = EMA(net, decays=[0.5], halflife_kimg=[0.016], rampup_ratio=None, first="hl0.016k")
    assert ema.names == ["hl0.016k", "d0.5"] and ema.spec["first"] == "hl0.016k"
    with pytest.raises(ValueError, match=r"first='d0.9' is not one of its profiles \['d0.5'\]"):
        EMA(net, decays=[0.5], first="d0.9")
    # The run's snapshot is the named profile's, the other one is written beside it.
    _train_micro(Diffusion(net, FlowMatching(), functools.partial(torch.optim.SGD, lr=1e-2)), tmp_path,
                 functools.partial(EMA, decays=[0.5], halflife_kimg=[0.016], first="hl0.016k"))
    main = sorted(tmp_path.glob("snapshot-?????????.safetensors"))[-1]
    assert load_snapshot(main)[1]["ema"] == "hl0.016k"
    assert load_snapshot(main.with_name(main.stem + "-d0.5.safetensors"))[1]["ema"] == "d0.5"


class EMAOf(Diffusion):
    def __init__(self, net: torch.nn.Module, names: tuple[str, ...]) -> None:
        super().__init__(net, FlowMatching(), functools.partial(torch.optim.SGD, lr=1e-2))
        self.ema_modules = names


@pytest.mark.parametrize("names, message", [
    (("net", "nte"), r"declares an EMA of \['nte'\], which is not a trainable module"),
    (("objective",), "snapshot_module='net' has no EMA"),
])
def test_bad_ema_declarations_are_refused_before_the_first_step(tmp_path: Path, names: tuple, message: str) -> None:
    method = EMAOf(micro("dit", input_size=8, in_channels=1, num_classes=10), names)
    with pytest.raises(ConfigError, match=message):
        _train_micro(method, tmp_path, functools.partial(EMA, decays=[0.5]))
    assert not list_training_states(tmp_path)
