"""Every config group composes with the primary configs, and every preset instantiates.

Large model presets are instantiated on the ``meta`` device (no memory, no init cost), which still
runs the constructors and so checks every argument.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from gen.utils.build import TRAINING_PACKAGES, build
from pipeline import SamplerSpec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides: list[str], name: str = "train") -> OmegaConf:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _build_model(c: dict) -> torch.nn.Module:
    """The model as train.py builds it: input shape from the tokenizer, classes from the data."""
    tokenizer = build(c["tokenizer"])
    channels, size, _ = tokenizer.latent_shape(c["data"]["resolution"])
    with torch.device("meta"):
        return build(c["model"], in_channels=channels, input_size=size, num_classes=c["data"]["num_classes"])


def test_default_config_resolves_and_names_its_run_dir() -> None:
    cfg = _compose([])
    c = OmegaConf.to_container(cfg, resolve=True)
    assert c["data"]["name"] == "mnist5k" and c["run_dir"].endswith("quickstart")
    assert "in_channels" not in c["model"]  # the tokenizer decides it
    assert _build_model(c).config["in_channels"] == c["data"]["channels"] == 1


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_preset_instantiates(model: str) -> None:
    c = OmegaConf.to_container(_compose([f"model={model}"]), resolve=True)
    net = _build_model(c)
    assert net.config["in_channels"] == c["data"]["channels"]
    assert sum(p.numel() for p in net.parameters()) > 0


@pytest.mark.parametrize("objective", _options("objective"))
def test_every_objective_instantiates(objective: str) -> None:
    obj = build(OmegaConf.to_container(_compose([f"objective={objective}"]).objective, resolve=True))
    spec = obj.prediction_spec()
    assert {"path", "prediction"} <= set(spec)


@pytest.mark.parametrize("sampler", _options("sampler"))
def test_every_sampler_config_is_valid(sampler: str) -> None:
    spec = SamplerSpec.from_config(OmegaConf.to_container(_compose([f"sampler={sampler}"]).sampler, resolve=True))
    assert spec.steps >= 1


@pytest.mark.parametrize("group", ["ema", "optim", "trainer", "tokenizer", "data", "paths"])
def test_every_option_of_the_small_groups_composes(group: str) -> None:
    for option in _options(group):
        cfg = _compose([f"{group}={option}"])
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_builds(experiment: str) -> None:
    cfg = _compose([f"experiment={experiment}"])
    c = OmegaConf.to_container(cfg, resolve=True)
    assert c["name"], "experiments must set a run name"
    _build_model(c)
    build(c["objective"])
    build({**c["optim"], "_partial_": True}, allow=TRAINING_PACKAGES)
    SamplerSpec.from_config(c["sampler"])


def test_unknown_override_is_refused_with_its_name() -> None:
    with pytest.raises(ConfigCompositionException, match="trainer.batchsize"):
        _compose(["trainer.batchsize=3"])


def test_sample_config_composes() -> None:
    cfg = _compose(["snapshot=x.safetensors"], name="sample")
    assert cfg.sampler.solver._target_ == "samplers.sample_euler" and cfg.seeds == "0-63"
