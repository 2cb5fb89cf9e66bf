"""The one snapshot loader (gen.snapshot) and the trainer's ``init``: a network rebuilt from a snapshot, a trainable
module started from one (source SHA-256 recorded and checked on resume), refusals of another shape and of NaN."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch

from gen.data import Digits
from gen.ema import EMA
from gen.objectives import FlowMatching
from gen.snapshot import init_from_snapshot, load_network
from gen.train.diffusion import Diffusion
from gen.train.loop import TrainConfig, train
from gen.utils.ckpt import file_sha256, list_training_states, load_training_state, save_snapshot
from gen.utils.config import ConfigError
from gen.utils.finite import NonFiniteError
from tests.presets import micro
from tokenizers.pixels import PixelTokenizer


def _net(seed: int = 0, **kw: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return micro("dit", input_size=8, in_channels=1, num_classes=10, **kw)


def _snapshot(path: Path, net: torch.nn.Module) -> Path:
    save_snapshot(path, net.state_dict(), {"model": dict(net.config)})
    return path


def test_load_network_rebuilds_the_snapshot(tmp_path: Path) -> None:
    net = _net(1)
    loaded, snap = load_network(_snapshot(tmp_path / "s.safetensors", net))
    assert snap.sha256 == file_sha256(tmp_path / "s.safetensors")
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_init_copies_weights_and_refuses_other_shapes_and_nan(tmp_path: Path) -> None:
    src = _snapshot(tmp_path / "s.safetensors", _net(1))
    dst = _net(2)
    assert init_from_snapshot(dst, src, "trainer.init.net") == file_sha256(src)
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in _net(1).state_dict().items())
    with pytest.raises(ValueError, match=r"(?s)trainer.init.net: cannot start from .* another network.*shape mismatches"):
        init_from_snapshot(_net(2, hidden_size=32), src, "trainer.init.net")
    bad = _net(1).state_dict()
    bad["pos_embed" if "pos_embed" in bad else next(iter(bad))] = torch.full_like(next(iter(bad.values())), float("nan"))
    nan = tmp_path / "nan.safetensors"
    save_snapshot(nan, {k: v.clone() for k, v in bad.items()}, {"model": dict(_net(1).config)})
    with pytest.raises(NonFiniteError, match="non-finite weights"):
        init_from_snapshot(_net(2), nan, "trainer.init.net")


def _train(run_dir: Path, init: dict[str, str], total_kimg: float, lr: float = 0.0) -> Diffusion:
    method = Diffusion(_net(3), FlowMatching(), functools.partial(torch.optim.SGD, lr=lr))
    cfg = TrainConfig(total_kimg=total_kimg, batch_size=16, status_kimg=0.016, checkpoint_kimg=1.0, snapshot_kimg=1.0,
                      tensorboard=False, progress=False, device="cpu", init=init)
    train(method=method, dataset=Digits(), tokenizer=PixelTokenizer(channels=1), ema=functools.partial(EMA, decays=[0.5]),
          cfg=cfg, run_dir=run_dir, config={}, snapshot_meta={})
    return method


def test_trainer_init_starts_from_the_snapshot_and_checks_it_on_resume(tmp_path: Path) -> None:
    src = _snapshot(tmp_path / "teacher.safetensors", _net(1))
    run = tmp_path / "run"
    method = _train(run, {"net": str(src)}, 0.032)  # lr 0: the weights stay the snapshot's
    assert all(torch.equal(method.net.state_dict()[k], v) for k, v in _net(1).state_dict().items())
    ema = method.averaged("net")  # the EMA starts from the snapshot's weights too, not from the random ones
    assert all(torch.equal(ema.state_dict()[k], v) for k, v in _net(1).state_dict().items())
    state = load_training_state(list_training_states(run)[-1][1])
    assert state["init"] == {"net": {"path": str(src), "sha256": file_sha256(src)}}
    _train(run, {"net": str(src)}, 0.048)  # the same file: resumes
    assert load_training_state(list_training_states(run)[-1][1])["init"]["net"]["sha256"] == file_sha256(src)
    _snapshot(src, _net(4))  # the file changed since the run started
    with pytest.raises(ConfigError, match="trainer.init.net=.* changed since"):
        _train(run, {"net": str(src)}, 0.064)
    with pytest.raises(ConfigError, match="trainer.init names"):
        _train(run, {}, 0.064)


@pytest.mark.parametrize("init, message", [
    ({"nte": "x.safetensors"}, r"trainer.init names \['nte'\], which is not a trainable module"),
    ({"net": "missing.safetensors"}, "trainer.init.net: snapshot missing.safetensors does not exist"),
])
def test_bad_init_is_refused_before_the_first_step(tmp_path: Path, init: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _train(tmp_path, init, 0.032)
    assert not list_training_states(tmp_path)


def test_init_setting_is_checked() -> None:
    with pytest.raises(ValueError, match="trainer.init"):
        dataclasses.replace(TrainConfig(), init={"net": ""})
