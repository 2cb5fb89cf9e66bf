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

from gen.paths import EDMPath, LinearPath
from gen.utils.build import TRAINING_PACKAGES, build
from pipeline import SamplerSpec, run_sampler
from samplers.guidance import in_interval

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides: list[str], name: str = "train") -> OmegaConf:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _build_model(c: dict) -> torch.nn.Module:
    """The model as train.py builds it: input shape from the tokenizer, classes from the data.

    Every tokenizer preset states ``latent_channels`` and ``downsample``; they give the shape without building
    the tokenizer (pretrained SD-VAE / VA-VAE weights are not on this machine).
    """
    channels = c["tokenizer"]["latent_channels"]
    size = c["data"]["resolution"] // c["tokenizer"]["downsample"]
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
    net = _build_model(c)
    if (c["objective"].get("align") or {}).get("encoder"):
        # The identical architecture with random weights: no DINOv2 weights here, and the yardstick's foundation
        # encoders would be trained (minutes) only to check that their shapes fit (their training: test_eval_encoders).
        c["objective"]["align"]["encoder"]["random_init"] = True
    objective = build(c["objective"])
    if c["objective"].get("align"):
        objective.bind(net, c["data"]["resolution"])  # depth, width, token grid and REG's token fit the backbone
    build({**c["optim"], "_partial_": True}, allow=TRAINING_PACKAGES)
    SamplerSpec.from_config(c["sampler"])


def test_unknown_override_is_refused_with_its_name() -> None:
    with pytest.raises(ConfigCompositionException, match="trainer.batchsize"):
        _compose(["trainer.batchsize=3"])


def test_sample_config_composes() -> None:
    cfg = _compose(["snapshot=x.safetensors"], name="sample")
    assert cfg.sampler.solver._target_ == "samplers.sample_euler" and cfg.seeds == "0-63"


def _sampler(overrides: list[str]) -> tuple[SamplerSpec, dict]:
    c = OmegaConf.to_container(_compose(overrides), resolve=True)
    return SamplerSpec.from_config(c["sampler"]), c


@pytest.mark.parametrize("epochs,scale,start", [(64, 10.0, 0.10), (800, 6.7, 0.125)])
def test_lightningdit_sampler_presets_match_their_inference(epochs: int, scale: float, start: float) -> None:
    # hustvl/LightningDiT transport/integrators.py ode: t = linspace(0, 1, 250) shifted by s t / (1 + (s - 1) t) with
    # s = 0.3 (data at t = 1), Euler between the points; models/lightningdit.py forward_with_cfg guides the first 3
    # channels unless t < cfg_interval_start (configs/reproductions/lightningdit_xl_vavae_f16d32_{64,800}ep_cfg.yaml).
    spec, _ = _sampler([f"sampler=euler_lightningdit_{epochs}ep"])
    t_l = torch.linspace(0.0, 1.0, 250, dtype=torch.float64)
    t_l = 0.3 * t_l / (1 + (0.3 - 1) * t_l)
    ts = spec.time_grid(LinearPath())
    assert spec.config["solver"]["_target_"] == "samplers.sample_euler" and spec.steps == 249 and len(ts) == 250
    torch.testing.assert_close(ts, 1.0 - t_l, rtol=0, atol=1e-14)  # t_ours = 1 - t_theirs, point by point
    guided = in_interval(ts, tuple(spec.guidance["interval"]))
    assert torch.equal(guided, t_l >= start)
    assert spec.guidance["scale"] == scale and spec.guidance["dit_legacy_channels"] == 3


# The first guided step of the official DDT sampler (MCG-NJU/DDT src/diffusion/stateful_flow_matching/sampling.py
# EulerSampler at commit 1d1b4d291325939dd98f6b91687af95c98c34d5c, guidance_interval_min 0.3, guidance_interval_max
# 1.0, timeshift 1, a guidance_fn that records its scale), computed once outside this repository for num_steps
# N = 1..100 with its default last_step (1/N: the uniform grid) and with last_step 0.04 (the preset's); every later
# step is guided too. Plus N in {125, 200, 250, 500, 1000}.
DDT_FIRST_GUIDED = {
    None: [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7, 7, 8, 8, 8, 9, 9, 9, 10, 10, 10, 10, 11,
           11, 11, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 15, 15, 15, 16, 16, 16, 16, 17, 17, 17, 18, 18, 18, 19, 19,
           19, 19, 20, 20, 20, 21, 21, 21, 22, 22, 22, 22, 23, 23, 23, 24, 24, 24, 25, 25, 25, 25, 26, 26, 26, 27, 27,
           27, 28, 28, 28, 28, 29, 29, 29, 30, 30, 30, 31],
    0.04: [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 8, 8, 8, 9, 9, 9, 10, 10, 10, 11, 11,
           11, 11, 12, 12, 12, 13, 13, 13, 14, 14, 14, 15, 15, 15, 16, 16, 16, 16, 17, 17, 17, 18, 18, 18, 19, 19, 19,
           20, 20, 20, 21, 21, 21, 21, 22, 22, 22, 23, 23, 23, 24, 24, 24, 25, 25, 25, 26, 26, 26, 26, 27, 27, 27, 28,
           28, 28, 29, 29, 29, 30, 30, 30, 31, 31, 31, 31],
}
DDT_FIRST_GUIDED_LONG = {(125, None): 38, (200, None): 61, (250, None): 76, (500, None): 151, (1000, None): 301,
                         (125, 0.04): 39, (200, 0.04): 63, (250, 0.04): 78, (500, 0.04): 156, (1000, 0.04): 313}


def test_ddt_preset_guides_the_same_steps_as_the_official_sampler() -> None:
    from samplers.grids import uniform_grid

    spec, _ = _sampler(["experiment=in256_ddt_xl"])
    interval = tuple(spec.guidance["interval"])
    assert interval == (0.0, 0.7, "()") and spec.steps == 250
    cases = {(n, last): first for last, row in DDT_FIRST_GUIDED.items() for n, first in enumerate(row, start=1)}
    cases.update(DDT_FIRST_GUIDED_LONG)
    for (n, last), first in cases.items():
        if last is not None and n == 1:
            continue  # upstream's one-step grid ignores last_step; ours needs steps >= 2 with t_min
        # upstream: t_D = linspace(0, 1 - last, N) then 1 (data); ours: t = 1 - t_D
        ts = uniform_grid(n) if last is None else uniform_grid(n, t_min=last)
        guided = in_interval(ts[:-1], interval)
        assert guided.tolist() == [i >= first for i in range(n)], (n, last)
    # The preset's own grid and the closed [0, 0.7] of before: one step more wherever 0.7 is a grid point.
    assert int(in_interval(spec.time_grid(LinearPath())[:-1], interval).sum()) == 250 - 78
    ts = uniform_grid(10)
    assert int(in_interval(ts[:-1], (0.0, 0.7)).sum()) == int(in_interval(ts[:-1], interval).sum()) + 1


def test_lightningdit_experiment_uses_the_64_epoch_sampler() -> None:
    spec, c = _sampler(["experiment=in256_lightningdit_xl1"])
    assert c["trainer"]["total_kimg"] == 81920  # 80K steps x 1024 = 64 epochs
    assert spec.guidance == {"scale": 10.0, "interval": [0.0, 0.9], "dit_legacy_channels": 3} and spec.steps == 249


def test_sit_sde_preset_and_dit_experiment_match_sit_defaults() -> None:
    # willisma/SiT sample_sde defaults: Euler, diffusion "sigma" (norm 1), last step "Mean" of size 0.04, 250 steps on
    # linspace(0, 0.96, 250) of its time (data at 1).
    for overrides in (["sampler=euler_maruyama_sit"], ["experiment=in256_dit_xl2"]):
        spec, _ = _sampler(overrides)
        ts = spec.time_grid(LinearPath())
        want = torch.cat([1.0 - torch.linspace(0.0, 0.96, 250, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
        torch.testing.assert_close(ts, want, rtol=0, atol=1e-14)
        assert spec.steps == 250 and spec.config["solver"] == {
            "_target_": "samplers.sample_euler_maruyama", "diffusion": "sigma", "diffusion_norm": 1.0,
            "last_step": "mean"}
    assert spec.guidance["scale"] == 1.5 and spec.guidance["dit_legacy_channels"] == 3


def test_edm_imagenet64_preset_reproduces_edm_stochastic_sampler() -> None:
    # NVlabs/edm README (ImageNet-64): --steps=256 --S_churn=40 --S_min=0.05 --S_max=50 --S_noise=1.003. Reference:
    # edm_sampler of NVlabs/edm generate.py at commit 008a4e5316c8e3bfe61a62f874bddba254295afb with those settings, run
    # outside this repository in float64 on the Gaussian of tests/test_samplers.py (net = E[x0 | x]), latents
    # [[0.3, -1.2], [1.5, 0.7], [-0.8, 0.1]] and randn_like from torch.Generator().manual_seed(0) (float64).
    from tests.test_samplers import GaussianVelocity

    spec, _ = _sampler(["sampler=heun_edm_in64"])
    assert spec.config["solver"] == {"_target_": "samplers.sample_heun", "s_churn": 40.0, "s_min": 0.05,
                                     "s_max": 50.0, "s_noise": 1.003}
    path = EDMPath()
    g = torch.Generator().manual_seed(0)
    noise = torch.tensor([[0.3, -1.2], [1.5, 0.7], [-0.8, 0.1]], dtype=torch.float64)
    x = run_sampler(GaussianVelocity(path), noise, None, path, spec,
                    randn_like=lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype))
    want = [[1.16828939079334, -1.88228585248926], [0.479035957089768, -2.39815164080638],
            [2.00842872365513, -1.72856014553525]]
    torch.testing.assert_close(x, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-9)
