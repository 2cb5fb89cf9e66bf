"""The one constructor (gen.utils.build) and frozen-module holding (gen.utils.frozen)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from gen.utils.build import TRAINING_PACKAGES, BuildError, build, capture_config, resolve
from gen.utils.frozen import frozen_identity, frozen_modules, hold_frozen, weights_sha256


def test_build_nested_and_partial() -> None:
    from gen.paths import LinearPath, LogitNormalTime

    path = build({"_target_": "gen.paths.LinearPath"})
    assert isinstance(path, LinearPath)
    ts = build({"_target_": "gen.paths.LogitNormalTime", "mean": 0.5, "std": 2.0})
    assert isinstance(ts, LogitNormalTime) and ts.mean == 0.5 and ts.std == 2.0
    fn = build({"_target_": "samplers.grids.uniform_grid", "_partial_": True, "t_max": 1.0})
    assert isinstance(fn, functools.partial)
    assert torch.equal(fn(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "target, message",
    [
        ("os.system", "outside the allowed packages"),
        ("torch.load", "outside the allowed packages"),
        ("subprocess.run", "outside the allowed packages"),
        ("gen.utils.ckpt.torch", "not a class or function of the allowed packages"),  # a module re-exported
        ("gen.utils.ckpt.save_file", "not a class or function of the allowed packages"),  # safetensors' function
        ("gen.paths.NoSuchPath", "has no attribute"),
        ("gen.nosuchmodule.X", "cannot be imported"),
        ("nodots", "dotted path"),
    ],
)
def test_untrusted_targets_are_refused(target: str, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        build({"_target_": target})


def test_training_packages_allow_optimizers_only_when_asked() -> None:
    with pytest.raises(BuildError, match="outside"):
        resolve("torch.optim.AdamW")
    assert resolve("torch.optim.AdamW", TRAINING_PACKAGES) is torch.optim.AdamW


def test_unknown_and_clashing_arguments_name_the_key() -> None:
    with pytest.raises(BuildError, match=r"'stdd' \(did you mean 'std'\?\)"):
        build({"_target_": "gen.paths.LogitNormalTime", "stdd": 1.0})
    with pytest.raises(BuildError, match="set by the caller"):
        build({"_target_": "gen.paths.LogitNormalTime", "std": 1.0}, std=2.0)
    with pytest.raises(BuildError, match="cannot build gen.paths.LogitNormalTime: std must be > 0"):
        build({"_target_": "gen.paths.LogitNormalTime", "std": -1.0})
    with pytest.raises(BuildError, match="unsupported special key"):
        build({"_target_": "gen.paths.LinearPath", "_recursive_": False})


@capture_config
class _Toy(nn.Module):
    def __init__(self, width: int, depth: int = 2, **extra: float) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)


def test_capture_config_round_trips() -> None:
    toy = _Toy(3, scale=0.5)
    assert toy.config == {"_target_": f"{__name__}._Toy", "width": 3, "depth": 2, "scale": 0.5}
    # A module outside the project is refused by default; the test module is allowed explicitly.
    with pytest.raises(BuildError):
        build(toy.config)
    again = build(toy.config, allow=(__name__.split(".")[0],))
    assert again.config == toy.config


class _Owner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trained = nn.Linear(2, 2)
        hold_frozen(self, "teacher", nn.Linear(2, 2))


def test_frozen_modules_are_held_but_not_registered() -> None:
    owner = nn.Sequential(_Owner())
    inner = owner[0]
    assert set(owner.state_dict()) == {"0.trained.weight", "0.trained.bias"}
    assert all(p is not inner.teacher.weight for p in owner.parameters())
    owner.train()
    assert not inner.teacher.training and not inner.teacher.weight.requires_grad
    assert frozen_modules(owner) == {"0.teacher": inner.teacher}
    ident = frozen_identity(inner.teacher)
    assert ident["class"] == "torch.nn.modules.linear.Linear" and len(ident["sha256"]) == 64
    before = weights_sha256(inner.teacher)
    with torch.no_grad():
        inner.teacher.weight[0, 0] += 1e-3
    assert weights_sha256(inner.teacher) != before
    assert weights_sha256(nn.Linear(2, 2).to(torch.bfloat16)) != weights_sha256(nn.Linear(2, 2))
