"""Tokenizer training (gen/train/tokenizer.py): loss terms against direct computations, the two optimizers in turn,
a short training whose reconstruction loss falls, snapshots that load as tokenizers, a diverging discriminator that
stops the run with the last good state kept, frozen networks outside training states, and resume after SIGKILL."""

from __future__ import annotations

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.encoders import AlignmentEncoder
from gen.data.shapes import Shapes
from gen.ema import EMA
from gen.train.loop import NonFiniteError, TrainConfig, train
from gen.train.tokenizer import (
    KLAutoencoderTraining,
    NLayerDiscriminator,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    match_grid,
    vf_loss_terms,
)
from gen.utils.ckpt import list_training_states, load_snapshot, load_training_state
from gen.utils.log import read_stats
from tests.conftest import Background, kill_mid_run, train_command
from tests.test_train import _env, _max_diff
from tokenizers.kl import AutoencoderKLTokenizer
from tokenizers.pixels import PixelTokenizer

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# Loss terms on known tensors


def test_vf_loss_terms_equal_a_direct_computation() -> None:
    """Three positions of one image with cosines 1, 0 and -1 to their features; margins m1 = 0.5, m2 = 0.25."""
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]).T.reshape(1, 2, 1, 3)  # (B, D, h, w), D = 2, N = 3
    f = torch.tensor([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]]).T.reshape(1, 2, 1, 3)
    mcos, mdms = vf_loss_terms(z, f, cos_margin=0.5, distmat_margin=0.25)
    # Marginal cosine: relu(1 - 0.5 - cos) for cos = 1, 0, -1 -> 0, 0.5, 1.5; mean 2/3.
    assert mcos.shape == (1,) and float(mcos) == pytest.approx(2.0 / 3.0, abs=1e-6)
    # Distance matrices over the 3 positions, by hand.
    zs = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]
    fs = [(1.0, 0.0)] * 3
    total = 0.0
    for i in range(3):
        for j in range(3):
            kz = zs[i][0] * zs[j][0] + zs[i][1] * zs[j][1]
            kf = fs[i][0] * fs[j][0] + fs[i][1] * fs[j][1]
            total += max(abs(kz - kf) - 0.25, 0.0)
    assert float(mdms) == pytest.approx(total / 9, abs=1e-6)  # (0.75 * 4 + 1.75 * 4) / 9
    # No margins: positions that agree perfectly still cost nothing, the others cost their full distance.
    mcos0, _ = vf_loss_terms(z, f, 0.0, 0.0)
    assert float(mcos0) == pytest.approx((0.0 + 1.0 + 2.0) / 3, abs=1e-6)
    # Per sample: a second, perfectly aligned image costs nothing and does not change the first one's terms.
    mcos2, mdms2 = vf_loss_terms(torch.cat([z, f]), torch.cat([f, f]), 0.5, 0.25)
    assert torch.allclose(mcos2, torch.tensor([2.0 / 3.0, 0.0])) and float(mdms2[1]) == 0.0


def test_match_grid_repeats_or_averages_by_area() -> None:
    tokens = torch.arange(4.0).view(1, 4, 1)  # a 2x2 grid, width 1
    up = match_grid(tokens, 4)
    assert up.shape == (1, 1, 4, 4) and up[0, 0].tolist()[0] == [0.0, 0.0, 1.0, 1.0]
    down = match_grid(torch.arange(16.0).view(1, 16, 1), 2)
    assert down[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]
    with pytest.raises(ValueError, match="cannot be matched"):
        match_grid(torch.zeros(1, 9, 1), 2)


def test_adaptive_weight_is_the_clamped_detached_gradient_ratio() -> None:
    """For L = c * sum(W x) the gradient at W is c * 1 x^T, so the ratio of the norms is |a| / |b| (up to the 1e-4)."""
    w = torch.nn.Parameter(torch.randn(3, 4))
    x = torch.randn(4)
    a, b = 2.0, 0.5
    ref, term = a * (w @ x).sum(), b * (w @ x).sum()
    grad_norm = math.sqrt(3) * float(x.norm())
    expected = a * grad_norm / (b * grad_norm + 1e-4)
    out = adaptive_weight(ref, term, w, 1e4)
    assert float(out) == pytest.approx(expected, rel=1e-5) and not out.requires_grad
    assert w.grad is None  # nothing accumulated into the parameters
    # A term without gradient at the layer gives ||ref|| / 1e-4, clamped.
    zero = 0.0 * (w @ x).sum()
    assert float(adaptive_weight(a * (w @ x).sum(), zero, w, 10.0)) == 10.0


def test_hinge_losses_on_known_logits() -> None:
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]]).view(2, 1, 1, 2)  # two samples, two patches each
    fake = torch.tensor([[-2.0, 0.0], [3.0, -1.0]]).view(2, 1, 1, 2)
    d = hinge_d_loss(real, fake)
    # sample 0: real relu(1-2)=0, relu(1-0.5)=0.5 -> 0.25; fake relu(1-2)=0, relu(1+0)=1 -> 0.5; 0.5 * 0.75
    # sample 1: real 2, 0 -> 1; fake 4, 0 -> 2; 0.5 * 3
    assert d.tolist() == pytest.approx([0.375, 1.5])
    assert hinge_g_loss(fake).tolist() == pytest.approx([1.0, -1.0])


def test_discriminator_is_taming_patchgan() -> None:
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, width=8, layers=3)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]  # BatchNorm layers have no bias
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)  # 32 -> 16 -> 8 -> 4 -> 3 -> 2
    assert 0.015 < float(convs[1].weight.detach().std()) < 0.025  # N(0, 0.02) init


# ---------------------------------------------------------------------------------------------------------
# In-process training


def _tokenizer() -> AutoencoderKLTokenizer:
    return AutoencoderKLTokenizer(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                                  image_channels=3, norm_num_groups=4, mid_attention=False, seed=0)


def _method(disc_start_kimg: float = 0.0, optimizer: object = None, disc_optimizer: object = None,
            lpips: torch.nn.Module | None = None, cls: type = KLAutoencoderTraining) -> KLAutoencoderTraining:
    torch.manual_seed(0)
    adam = functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9))
    foundation = AlignmentEncoder("foundation-shapes", resolution=32, random_init=True)
    return cls(_tokenizer(), optimizer or adam, disc_optimizer or adam, image_channels=3, lpips=lpips,
               foundation=foundation, perceptual_weight=1.0 if lpips is not None else 0.0,
               disc_start_kimg=disc_start_kimg, disc_width=8)


def _train(method: KLAutoencoderTraining, run_dir: Path, total_kimg: float, checkpoint_kimg: float = 1.0,
           batch_size: int = 16) -> None:
    cfg = TrainConfig(total_kimg=total_kimg, batch_size=batch_size, status_kimg=batch_size / 1000,
                      checkpoint_kimg=checkpoint_kimg, snapshot_kimg=checkpoint_kimg, tensorboard=False,
                      progress=False, device="cpu")
    train(method=method, dataset=Shapes(count=256, seed=0), tokenizer=PixelTokenizer(channels=3),
          ema=functools.partial(EMA, decays=[0.5]), cfg=cfg, run_dir=run_dir, config={},
          snapshot_meta={"data": {"name": "shapes", "channels": 3, "resolution": 32, "num_classes": 6}})


class _Recorder(torch.optim.Adam):
    """Adam that logs, at every step, its name and which of the method's modules' parameters changed."""

    log: list[tuple[str, set[str]]] = []
    method: KLAutoencoderTraining | None = None

    def __init__(self, params: object, name: str = "") -> None:
        super().__init__(params, lr=1e-3, betas=(0.5, 0.9))
        self.name = name

    def step(self, closure: object = None) -> object:
        method = type(self).method
        before = {n: [p.detach().clone() for p in m.parameters()] for n, m in method.trainable_modules().items()}
        out = super().step(closure)
        changed = {n for n, m in method.trainable_modules().items()
                   if any(not torch.equal(a, p) for a, p in zip(before[n], m.parameters()))}
        type(self).log.append((self.name, changed))
        return out


def test_two_optimizers_alternate_and_each_updates_only_its_modules(tmp_path: Path) -> None:
    _Recorder.log = []
    method = _method(disc_start_kimg=0.032, optimizer=functools.partial(_Recorder, name="autoencoder"),
                     disc_optimizer=functools.partial(_Recorder, name="discriminator"))
    _Recorder.method = method
    _train(method, tmp_path, total_kimg=0.064)  # 4 steps of 16; the discriminator starts at image 32
    names = [n for n, _ in _Recorder.log]
    assert names == ["autoencoder", "autoencoder", "autoencoder", "discriminator", "autoencoder", "discriminator"]
    for name, changed in _Recorder.log:
        if name == "autoencoder":
            assert changed == {"autoencoder", "projection", "logvar"}, changed
        else:
            assert changed == {"discriminator"}, changed
    stats = [r for r in read_stats(tmp_path / "stats.jsonl") if "autoencoder/loss" in r]
    assert "autoencoder/d_weight" not in stats[1] and stats[-1]["autoencoder/d_weight"] > 0  # GAN term from image 32
    assert all(r["autoencoder/vf_weight"] > 0 and r["autoencoder/mcos"] > 0 for r in stats)


def test_short_training_reduces_reconstruction_loss_and_snapshots_load_as_tokenizers(tmp_path: Path) -> None:
    method = _method(disc_start_kimg=0.2)
    _train(method, tmp_path, total_kimg=0.32, checkpoint_kimg=0.32)
    stats = [r for r in read_stats(tmp_path / "stats.jsonl") if "autoencoder/l1" in r]
    first, last = stats[0]["autoencoder/l1"], min(r["autoencoder/l1"] for r in stats[-3:])
    assert last < 0.7 * first, f"L1 did not fall: {first:.3f} -> {last:.3f}"
    assert "discriminator/loss" in stats[-1]
    # The snapshot is the EMA autoencoder in diffusers' layout; its metadata rebuilds the tokenizer.
    snap = sorted(tmp_path.glob("snapshot-*.safetensors"))[-1]
    tensors, meta = load_snapshot(snap)
    assert meta["tokenizer_weights"] == "snapshot" and meta["tokenizer"]["weights"] is None
    assert not any(k.startswith(("discriminator", "projection")) for k in tensors)
    from eval.__main__ import _tokenizer_spec
    from gen.utils.build import build

    tok = build(_tokenizer_spec(str(snap), []))
    ema = method.tokenizer  # same architecture; load the EMA weights into a fresh copy to compare
    for k, v in tok.vae.state_dict().items():
        assert torch.equal(v, tensors[k]), k
    x = Shapes(count=4, seed=0)[0][0][None]
    gen = [torch.Generator().manual_seed(0)]
    with torch.no_grad():
        via_tokenizer = tok.decode(tok.encode(x, gen))
        via_method = method.reconstruct(tok.vae, x, [torch.Generator().manual_seed(0)])
    assert torch.allclose(via_tokenizer, via_method, atol=1e-6)
    assert ema.latent_channels == tok.latent_channels


def test_a_diverging_discriminator_stops_the_run_and_keeps_the_last_good_state(tmp_path: Path) -> None:
    class Diverging(KLAutoencoderTraining):
        """The discriminator's weights blow up to infinity in its phase at step 5 (an injected divergence)."""

        def loss(self, phase, batch, rng, progress):  # type: ignore[no-untyped-def]
            if phase == "discriminator" and progress.step == 5:
                with torch.no_grad():
                    self.discriminator.main[-1].weight.fill_(float("inf"))
            return super().loss(phase, batch, rng, progress)

    method = _method(cls=Diverging)
    with pytest.raises(NonFiniteError, match=r"step 5 .*phase 'discriminator'"):
        _train(method, tmp_path, total_kimg=0.16, checkpoint_kimg=0.032)
    states = list_training_states(tmp_path)
    assert states and states[-1][0] == 64  # the state after step 4; nothing written after the divergence
    reg = load_training_state(states[-1][1])["registry"]
    assert all(bool(torch.isfinite(v).all()) for v in reg["module.discriminator"].values() if v.is_floating_point())
    assert not [p for p in tmp_path.glob("snapshot-*.safetensors") if int(p.name[9:18]) > 64]


def test_frozen_networks_are_identified_but_not_stored(tmp_path: Path) -> None:
    from gen.nn.lpips import LPIPS, make_random_vgg16_weights

    lpips = LPIPS(make_random_vgg16_weights(tmp_path / "vgg16.pth"))
    method = _method(lpips=lpips)
    assert "lpips" in method.frozen_modules() and "foundation" in method.frozen_modules()
    assert not any(n.startswith(("lpips", "foundation")) for n in method.state_dict())
    _train(method, tmp_path / "run", total_kimg=0.032, batch_size=8)
    state = load_training_state(list_training_states(tmp_path / "run")[-1][1])
    assert set(state["frozen"]) == {"foundation", "lpips"}
    assert all(len(v["sha256"]) == 64 for v in state["frozen"].values())
    keys = [k for item in state["registry"].values() if isinstance(item, dict) for k in item]
    assert not any("lpips" in str(k) or "foundation" in str(k) or "net.slice" in str(k) for k in keys)
    assert {"module.autoencoder", "module.projection", "module.logvar", "module.discriminator",
            "optim.autoencoder", "optim.discriminator", "ema.autoencoder"} <= set(state["registry"])
    stats = [r for r in read_stats(tmp_path / "run" / "stats.jsonl") if "autoencoder/lpips" in r]
    assert stats and stats[-1]["autoencoder/lpips"] > 0


# ---------------------------------------------------------------------------------------------------------
# train.py end to end: resume after SIGKILL equals an uninterrupted run


TINY = [
    "experiment=yardstick_vavae_f4d16", "data=shapes", "data.dataset.count=256",
    "method.autoencoder.image_channels=3", "method.autoencoder.block_out_channels=[8,16]", "method.autoencoder.downsample=2",
    "method.autoencoder.norm_num_groups=4", "method.autoencoder.mid_attention=false",
    "+method.foundation.random_init=true", "method.disc_width=8", "method.disc_start_kimg=0.064",
    "trainer.batch_size=16", "trainer.total_kimg=0.32", "trainer.status_kimg=0.016", "trainer.checkpoint_kimg=0.064",
    "trainer.snapshot_kimg=0.32", "trainer.progress=false", "trainer.tensorboard=false", "preview.images=0",
    "eval=none",
]


def _run_train(runs: Path, name: str, extra: list[str] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", f"paths.runs={runs}", f"name={name}", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_tokenizer_training_resumes_after_sigkill_exactly(tmp_path: Path) -> None:
    preview = ["preview.images=4", "preview.nrow=2", "preview.interval_kimg=0.32"]
    straight = Background(train_command(tmp_path, "straight", preview, small=TINY), tmp_path / "straight.log")
    run = tmp_path / "killed"
    # Killed once a state past the GAN start exists.
    assert kill_mid_run(train_command(tmp_path, "killed", small=TINY), run, 128) < 320
    straight.wait()
    assert (tmp_path / "straight" / "samples" / "grid-000000320.png").is_file()  # originals over reconstructions
    resumed = _run_train(tmp_path, "killed")
    assert "Resuming from" in resumed.stdout + resumed.stderr
    a = load_training_state(list_training_states(tmp_path / "straight")[-1][1])
    b = load_training_state(list_training_states(run)[-1][1])
    for k in ("module.autoencoder", "module.projection", "module.logvar", "module.discriminator", "ema.autoencoder"):
        diff = _max_diff(a["registry"][k], b["registry"][k]) if k != "ema.autoencoder" else max(
            _max_diff(x, y) for x, y in zip(_tensors(a["registry"][k]), _tensors(b["registry"][k])))
        assert diff <= 1e-6, f"{k}: the resumed run differs from the uninterrupted one by {diff}"
    assert set(b["frozen"]) == {"foundation"}
    meta = json.loads(json.dumps(load_snapshot(sorted(run.glob("snapshot-*.safetensors"))[-1])[1]))
    assert meta["tokenizer"]["_target_"] == "tokenizers.kl.AutoencoderKLTokenizer"


def _tensors(state: object) -> list[dict[str, torch.Tensor]]:
    """The tensor dicts inside an EMA state (one per profile), in a fixed order."""
    if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
        return [state]
    if isinstance(state, dict):
        return [d for k in sorted(state) for d in _tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [d for v in state for d in _tensors(v)]
    return []


YARDSTICK_SWEEP = [f"yardstick_{kind}_f4d{c}" for c in (4, 16, 64) for kind in ("kl", "vavae")]


@pytest.mark.parametrize("experiment", [*YARDSTICK_SWEEP, "vavae_f16d32_in256"])
def test_tokenizer_experiments_compose_and_the_yardstick_ones_build(experiment: str) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gen.utils.build import TRAINING_PACKAGES, build

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        c = OmegaConf.to_container(compose(config_name="train", overrides=[f"experiment={experiment}"]), resolve=True)
    assert c["tokenizer"]["_target_"] == "tokenizers.pixels.PixelTokenizer"  # the method sees pixels
    assert c["method"]["autoencoder"]["_target_"] == "tokenizers.kl.AutoencoderKLTokenizer"
    if experiment.startswith("vavae_f16d32"):
        assert c["method"]["foundation"]["name"] == "dinov2_vitl14" and c["method"]["autoencoder"]["downsample"] == 16
        assert c["method"]["foundation"]["preprocess"] == "vavae"  # VA-VAE's DINOv2 input, not REPA's
        # The official GAN start, worked out once from hustvl/LightningDiT at 2725fed42a14898744433809949834e26957bcdd
        # (vavae/configs/f16d32_vfdinov2.yaml disc_start 5001, batch 8 x 32 GPUs; vavae/ldm/models/autoencoder.py
        # training_step steps two optimizers per batch under pytorch-lightning 2.4 manual optimisation, one global
        # step each; vavae/ldm/modules/losses/contperceptual.py adopt_weight: factor 1 once global_step >= 5001):
        # batch b (0-based) computes the autoencoder loss at global step 2b, so the GAN term is first on at b = 2501.
        first_gan_batch, batch = 2501, 256
        start = round(c["method"]["disc_start_kimg"] * 1000)
        assert c["trainer"]["batch_size"] == batch
        assert (first_gan_batch - 1) * batch < start <= first_gan_batch * batch  # progress.nimg >= start from b = 2501
        return
    if c["method"]["foundation"]:
        c["method"]["foundation"]["random_init"] = True  # the yardstick network is trained on first use; not here
    adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-4}
    method = build(c["method"], allow=TRAINING_PACKAGES, optimizer=build(adam, allow=TRAINING_PACKAGES),
                   image_channels=c["data"]["channels"])
    channels = int(experiment.rsplit("d", 1)[1])  # the sweep's channel count is in the name: f4d<C>
    assert c["method"]["autoencoder"]["latent_channels"] == channels and c["name"] == experiment
    assert method.tokenizer.latent_shape(32) == (channels, 8, 8)
    assert (method.foundation is not None) == experiment.startswith("yardstick_vavae")
    if method.foundation is not None:  # the 1x1 projection maps the latent channels to the encoder's width
        assert c["method"]["foundation"]["name"] == "foundation2-mnist5k"  # 8 x 8 tokens, the f4 latent grid
        assert method.projection.weight.shape[1] == channels


@pytest.mark.parametrize("channels", [4, 16, 64])
def test_the_vf_encoder_of_the_yardstick_sweep_is_one_key(channels: int) -> None:
    """``method.foundation.name`` picks the VF loss's encoder for every VA-VAE preset of the sweep (they inherit
    yardstick_vavae_f4d16's); the plain KL presets have no encoder to set."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        c = compose(config_name="train", overrides=[f"experiment=yardstick_vavae_f4d{channels}",
                                                    "method.foundation.name=foundation-${data.name}"])
        assert c.method.foundation.name == "foundation-mnist5k" and c.method.autoencoder.latent_channels == channels
        with pytest.raises(ConfigCompositionException, match="method.foundation.name"):
            compose(config_name="train", overrides=[f"experiment=yardstick_kl_f4d{channels}",
                                                    "method.foundation.name=foundation2-${data.name}"])


@pytest.mark.parametrize("override, message", [
    (["data=shapes"], "the data has 3-channel images but the autoencoder takes 1; set method.autoencoder.image_channels=3"),
    (["eval=yardstick_quick"], "measures samples, but method KLAutoencoderTraining makes reconstructions"),
    (["method.lpips=null", "method.perceptual_weight=1.0"], "perceptual_weight > 0 needs method.lpips"),
])
def test_bad_tokenizer_training_configs_are_refused_before_work(tmp_path: Path, override: list[str], message: str) -> None:
    cmd = [sys.executable, "train.py", f"paths.runs={tmp_path}", "name=bad", "experiment=yardstick_kl_f4d4", *override]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not list_training_states(tmp_path / "bad")
