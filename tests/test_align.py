"""Representation alignment (REPA, REG): the loss, the token-grid match, the frozen encoder's place, REG sampling.

Trainings here run the real loop in-process on the 8x8 digits with a micro backbone and a small frozen encoder
of the alignment interface, so each takes seconds.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gen.data import Digits
from gen.ema import EMA
from gen.objectives import EDMLoss, FlowMatching
from gen.objectives.align import Alignment, build_projector, match_grid, negative_cosine
from gen.train.diffusion import Diffusion
from gen.train.loop import TrainConfig, train
from gen.utils.ckpt import list_training_states, load_snapshot, load_training_state
from gen.utils.config import ConfigError
from gen.utils.seed import BatchRandom
from pipeline import Generator, SamplerSpec
from tests.conftest import free_port
from tests.presets import micro
from tokenizers.pixels import PixelTokenizer


class ToyEncoder(nn.Module):
    """A frozen encoder with the alignment interface: 4 pixels per token, width ``dim``."""

    def __init__(self, dim: int = 12, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.dim = dim
        self.conv = nn.Conv2d(1, dim, 4, stride=4)
        self.requires_grad_(False).eval()

    def grid(self, resolution: int) -> int:
        return resolution // 4

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.conv(images.float() / 127.5 - 1).flatten(2).transpose(1, 2)
        return tokens, tokens.mean(1)


def test_repa_loss_equals_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    direct = torch.tensor([-sum(float(pred[b, n] @ target[b, n] / (pred[b, n].norm() * target[b, n].norm()))
                                 for n in range(5)) / 5 for b in range(3)])
    torch.testing.assert_close(negative_cosine(pred, target), direct)
    torch.testing.assert_close(negative_cosine(target, target), -torch.ones(3))
    proj = build_projector(8, 16, 7)
    assert [type(m) for m in proj] == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert (proj[0].in_features, proj[2].in_features, proj[4].out_features) == (8, 16, 7)


# The projector's tensors after the official models' ``initialize_weights``, computed once outside this repository
# from sihyun-yu/REPA models/sit.py (commit 67f714503e3892f993844aab088ffc5791c92613) and Martinser/REG models/sit.py
# (commit 021ea2e50c38c5803bd9afff16316958a01fbd1d): SiT(hidden_size=64, projector_dim=256, z_dims=[128]) under
# torch.manual_seed(0); per Linear of the projector: max |bias|, max |w| / b and std(w) / b with the xavier bound
# b = sqrt(6 / (fan_in + fan_out)). PyTorch's default init gives max |w| / b = 0.91, 0.58, 0.69 and non-zero biases.
OFFICIAL_PROJECTOR_INIT = {
    "repa": [(0.0, 0.99997, 0.57688), (0.0, 1.0, 0.57672), (0.0, 0.99998, 0.57554)],
    "reg": [(0.0, 0.99992, 0.57951), (0.0, 1.0, 0.57542), (0.0, 0.99998, 0.57579)],
}


@pytest.mark.parametrize("repo", sorted(OFFICIAL_PROJECTOR_INIT))
def test_projector_init_is_the_official_xavier_uniform_with_zero_biases(repo: str) -> None:
    torch.manual_seed(0)
    proj = build_projector(64, 256, 128)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    for lin, (bias_max, wmax, wstd) in zip(linears, OFFICIAL_PROJECTOR_INIT[repo], strict=True):
        w = lin.weight.detach().double()
        bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))
        assert lin.bias.abs().max().item() == bias_max
        assert (w.abs().max() / bound).item() <= 1.0
        assert (w.abs().max() / bound).item() == pytest.approx(wmax, abs=2e-3)
        # std of U(-b, b) is b / sqrt(3); the official draws and ours agree to sampling error (n >= 8192 weights).
        assert (w.std() / bound).item() == pytest.approx(wstd, abs=0.012)


def test_objective_adds_the_weighted_alignment_loss() -> None:
    """FlowMatching + REPA: loss = mse + 0.5 * (-cos(projector(block tokens), encoder tokens)), by hand."""
    net = micro("dit", input_size=8, in_channels=1, num_classes=10)
    align = Alignment(ToyEncoder(), depth=1, weight=0.5, projector_dim=16)
    obj = FlowMatching(align=align, label_dropout=0.0)
    obj.bind(net, 8)
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    batch = {"x0": images.float() / 127.5 - 1, "label": torch.arange(4), "image": images}
    out = obj(net, batch, BatchRandom(4, torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(1)
    t = torch.rand(4, generator=g, dtype=torch.float64).float()
    eps = torch.randn(4, 1, 8, 8, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * batch["x0"] + t.view(-1, 1, 1, 1) * eps
    res = net(x_t, t, torch.arange(4), return_features=[1])
    patches, _ = align.encoder(images)  # 2x2 grid == the micro model's 8/4
    repa = -F.cosine_similarity(align.projector(res.features[0]), patches, dim=-1).mean(1)
    mse = (res.out - (eps - batch["x0"])).square().flatten(1).mean(1)
    torch.testing.assert_close(out["repa"], repa)
    torch.testing.assert_close(out["loss"], mse + 0.5 * repa)


def test_match_grid_by_area() -> None:
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # a 4x4 grid
    down = match_grid(tokens, 2)
    torch.testing.assert_close(down.flatten(), torch.tensor([2.5, 4.5, 10.5, 12.5]))  # 2x2 means
    up = match_grid(tokens, 8)
    grid4 = tokens.view(4, 4)
    want = torch.tensor([[grid4[r // 2, c // 2] for c in range(8)] for r in range(8)])  # each token covers 2x2
    assert up.shape == (1, 64, 1) and torch.equal(up.view(8, 8), want)
    assert torch.equal(match_grid(tokens, 4), tokens)
    with pytest.raises(ValueError, match="cannot be matched"):
        match_grid(tokens, 3)


def test_bind_refuses_what_cannot_fit() -> None:
    net = micro("dit", input_size=16, in_channels=1, num_classes=10)  # depth 2, 4x4 tokens
    with pytest.raises(ValueError, match="beyond the backbone's 2 blocks"):
        Alignment(ToyEncoder(), depth=3).bind(net, 16)
    with pytest.raises(ValueError, match="cannot be matched"):  # encoder 3x3 at 12 px... vs the backbone's 4x4
        Alignment(ToyEncoder(), depth=1).bind(net, 12)
    with pytest.raises(ValueError, match="model.extra_token_dim=12"):
        Alignment(ToyEncoder(), depth=1, reg=True).bind(net, 16)
    with pytest.raises(ValueError, match="extra token"):
        Alignment(ToyEncoder(), depth=1).bind(micro("dit", input_size=16, in_channels=1, num_classes=10,
                                                    extra_token_dim=12), 16)
    with pytest.raises(ValueError, match="REG is defined for flow matching"):
        EDMLoss(align=Alignment(ToyEncoder(), depth=1, reg=True))


def _train(run_dir: Path, encoder_seed: int = 0, reg: bool = False, total_kimg: float = 0.064):
    torch.manual_seed(0)
    net = micro("dit", input_size=8, in_channels=1, num_classes=10, extra_token_dim=12 if reg else 0)
    align = Alignment(ToyEncoder(seed=encoder_seed), depth=1, projector_dim=16, reg=reg)
    method = Diffusion(net, FlowMatching(align=align), functools.partial(torch.optim.Adam, lr=1e-3), image_resolution=8)
    cfg = TrainConfig(total_kimg=total_kimg, batch_size=16, status_kimg=0.032, checkpoint_kimg=0.032,
                      snapshot_kimg=0.032, tensorboard=False, progress=False, device="cpu")
    train(method=method, dataset=Digits(), tokenizer=PixelTokenizer(channels=1), ema=functools.partial(EMA, decays=[0.9]),
          cfg=cfg, run_dir=run_dir, config={"objective": {"align": "toy"}}, snapshot_meta={})
    return method


@pytest.mark.parametrize("reg", [False, True], ids=["repa", "reg"])
def test_encoder_is_frozen_and_never_saved_projector_only_in_states(tmp_path: Path, reg: bool) -> None:
    method = _train(tmp_path, reg=reg)
    enc = method.objective.align.encoder
    assert all(p.grad is None and not p.requires_grad for p in enc.parameters())
    assert "objective.align.encoder" in method.frozen_modules()
    state = load_training_state(list_training_states(tmp_path)[-1][1])
    saved = [k for item in state["registry"].values() if isinstance(item, dict) for k in item]
    assert not any("encoder" in k or "conv" in k for k in saved)
    assert any(k.startswith("align.projector.") for k in state["registry"]["module.objective"])
    assert set(state["frozen"]) == {"objective.align.encoder"}
    tensors, meta = load_snapshot(sorted(tmp_path.glob("snapshot-*.safetensors"))[-1])
    assert not any("projector" in k or "encoder" in k for k in tensors)
    assert ("extra_embed.weight" in tensors) == reg
    # The optimizer holds the backbone and the projector, never the encoder.
    opt_params = sum(len(g["params"]) for g in state["registry"]["optim.main"]["param_groups"])
    assert opt_params == sum(1 for p in method.net.parameters() if p.requires_grad) + len(
        list(method.objective.align.projector.parameters()))


def test_resuming_with_another_encoder_is_refused(tmp_path: Path) -> None:
    _train(tmp_path, encoder_seed=0)
    with pytest.raises(ConfigError, match="frozen network 'objective.align.encoder'"):
        _train(tmp_path, encoder_seed=1, total_kimg=0.128)


def test_reg_sampling_is_seed_exact_across_batch_sizes() -> None:
    torch.manual_seed(0)
    net = micro("dit", input_size=8, in_channels=1, num_classes=10, extra_token_dim=12).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec = FlowMatching().prediction_spec()
    gen = Generator(net, spec, PixelTokenizer(channels=1), (1, 8, 8), 10)
    sampler = SamplerSpec.from_config({"solver": {"_target_": "samplers.sample_euler"}, "steps": 6,
                                       "grid": {"_target_": "samplers.grids.uniform_grid"},
                                       "guidance": {"scale": [2.0, 1.5]}})
    calls = []
    net.register_forward_pre_hook(lambda m, a, kw: calls.append(kw.get("extra_token")), with_kwargs=True)
    all_at_once, labels = gen.generate(list(range(6)), sampler)
    assert calls and all(c is not None and c.shape[1] == 12 for c in calls)  # the token stream reached the net
    parts = [gen.generate(s, sampler)[0] for s in ([0, 1], [2, 3, 4], [5])]
    assert torch.equal(all_at_once, torch.cat(parts))
    assert all_at_once.float().std() > 0


# The v1 yardstick encoder (4x4 tokens at 32 px, trained once in about a minute and cached): these refusals need an
# encoder whose grid differs from the backbone's, and it is the cheaper one to train on a fresh machine.
V1 = "objective.align.encoder.name=foundation-mnist5k"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["align=repa"], "needs dinov2_vitb14_pretrain.pth"),  # missing DINOv2 weights: the file and where to put it
        (["experiment=yardstick_dit_repa", V1, "objective.align.depth=7"], "align depth 7 is beyond the backbone's 6"),
        # 24 px digits: the v1 foundation encoder's 3x3 grid against the backbone's 2x2 (patch 12): no exact match.
        (["experiment=yardstick_dit_repa", V1, "data.resolution=24", "data.dataset.mode=resize", "model.patch_size=12",
          "eval=none"], "cannot be matched"),
        (["experiment=yardstick_dit_reg", V1, "model.extra_token_dim=0"], "model.extra_token_dim=64"),
        (["experiment=yardstick_dit_repa", V1, "model.extra_token_dim=64"], "but alignment is REPA"),
    ],
    ids=["missing-weights", "depth", "grid", "reg-without-token", "token-without-reg"],
)
def test_train_py_refuses_alignment_misfits_before_work(tmp_path: Path, overrides: list[str], message: str) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "train.py", f"paths.runs={tmp_path}", "name=bad", *overrides]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not list((tmp_path / "bad").glob("state-*.pt"))


def test_reg_snapshot_and_plain_model_do_not_mix(tmp_path: Path) -> None:
    """A REG snapshot read as a model without the extra token (and the reverse) is refused, naming the keys."""
    from gen.utils.ckpt import save_snapshot
    from pipeline import generator_from_snapshot

    for reg, wrong, keys in ((True, 0, "unexpected keys"), (False, 12, "missing keys")):
        run = tmp_path / ("reg" if reg else "repa")
        _train(run, reg=reg)
        tensors, meta = load_snapshot(sorted(run.glob("snapshot-*.safetensors"))[-1])
        meta = {**meta, "model": {**meta["model"], "extra_token_dim": wrong}, "tokenizer": PixelTokenizer(1).config,
                "data": {"name": "digits", "channels": 1, "resolution": 8, "num_classes": 10}}
        bad = tmp_path / f"bad-{reg}.safetensors"
        save_snapshot(bad, tensors, meta)
        with pytest.raises(ValueError, match=f"{keys}.*extra_"):
            generator_from_snapshot(str(bad))
        meta["model"]["extra_token_dim"] = 12 if reg else 0  # the truthful metadata loads
        save_snapshot(bad, tensors, meta)
        gen, _ = generator_from_snapshot(str(bad))
        assert gen.net.extra_token_dim == (12 if reg else 0)


def test_reg_sample_py_is_seed_exact_on_two_processes(tmp_path: Path) -> None:
    """``sample.py`` on a REG snapshot (image and class-token streams, per-stream CFG): 2 gloo processes write the
    same samples as 1 process, and batch size 4 the same as 16."""
    import os
    import subprocess
    import sys

    import numpy as np

    from gen.utils.ckpt import save_snapshot

    root = Path(__file__).resolve().parents[1]
    _train(tmp_path / "run", reg=True)
    tensors, meta = load_snapshot(sorted((tmp_path / "run").glob("snapshot-*.safetensors"))[-1])
    meta = {**meta, "tokenizer": PixelTokenizer(1).config,
            "data": {"name": "digits", "channels": 1, "resolution": 8, "num_classes": 10}}
    snap = tmp_path / "reg.safetensors"
    save_snapshot(snap, tensors, meta)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}

    def sample(out: str, batch: int, procs: int) -> np.ndarray:
        launch = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                      f"--nproc_per_node={procs}", f"--master_port={free_port()}"]
        cmd = [*launch, "sample.py", f"snapshot={snap}", f"outdir={tmp_path / out}", "seeds=0-11", f"batch_size={batch}",
               "sampler.steps=6", "sampler.guidance.scale=[2.0,1.5]", "images=false"]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with np.load(tmp_path / out / "samples.npz") as f:
            return np.concatenate([f["arr_0"].reshape(12, -1), f["arr_1"][:, None]], axis=1)

    one = sample("one", 4, 1)
    assert one[:, :-1].std() > 0
    assert np.array_equal(one, sample("b16", 16, 1))
    assert np.array_equal(one, sample("two", 4, 2))


def test_check_sampler_counts_the_reg_stream() -> None:
    """Per-stream guidance scales are checked against the model's streams: two scales fit a REG model, not a plain
    one (the settings check used to assume one stream and refused every REG sampler with two scales)."""
    from pipeline import check_sampler

    spec = FlowMatching().prediction_spec()
    sampler = SamplerSpec.from_config({"solver": {"_target_": "samplers.sample_euler"}, "steps": 4,
                                       "grid": {"_target_": "samplers.grids.uniform_grid"},
                                       "guidance": {"scale": [2.0, 1.5]}})
    check_sampler(sampler, spec, 10, extra_token_dim=12)
    with pytest.raises(ValueError, match="2 guidance scales for 1 stream"):
        check_sampler(sampler, spec, 10)


def test_repa_with_foundation2_on_the_quick_start_backbone_matches_token_to_token() -> None:
    """The yardstick's REPA at depth 2 of the quick-start DiT (patch 4, 8x8 tokens at 32 px) with foundation2
    (8x8 tokens): the targets are the encoder's tokens as they are (no pooling), and the loss is by hand."""
    from eval.encoders import AlignmentEncoder
    from tests.presets import model_preset

    torch.manual_seed(0)
    net = model_preset("quickstart_dit", in_channels=1, input_size=32, num_classes=10)
    encoder = AlignmentEncoder("foundation2-mnist5k", resolution=32, random_init=True)
    align = Alignment(encoder, depth=2, weight=0.5, projector_dim=32)
    obj = FlowMatching(align=align, label_dropout=0.0)
    obj.bind(net, 32)
    assert net.grid == encoder.grid(32) == 8
    images = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    batch = {"x0": images.float() / 127.5 - 1, "label": torch.arange(3), "image": images}
    patches, _ = align.targets(batch)
    assert torch.equal(patches, encoder(images)[0]) and patches.shape == (3, 64, 64)
    out = obj(net, batch, BatchRandom(3, torch.Generator().manual_seed(1)))
    g = torch.Generator().manual_seed(1)
    t = torch.rand(3, generator=g, dtype=torch.float64).float()
    eps = torch.randn(3, 1, 32, 32, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * batch["x0"] + t.view(-1, 1, 1, 1) * eps
    res = net(x_t, t, torch.arange(3), return_features=[2])
    repa = -F.cosine_similarity(align.projector(res.features[0]), patches, dim=-1).mean(1)
    torch.testing.assert_close(out["repa"], repa)
    out["loss"].mean().backward()
    assert all(p.grad is not None for p in align.projector.parameters())
    assert all(p.grad is None for p in encoder.parameters())
