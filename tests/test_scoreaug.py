"""ScoreAug (gen/objectives/scoreaug.py): the transforms are linear and move input and target together, omega = 0 is
the identity for every backbone, the objectives' losses equal a direct computation, and training through train.py
reduces the loss and samples with no augmentation flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gen.models.ddt import DDT
from gen.models.dit import DiT
from gen.objectives.edm import EDMLoss, edm_loss_weight
from gen.objectives.flow_matching import FlowMatching
from gen.objectives.scoreaug import KINDS, OMEGA_DIM, ScoreAug, transform
from gen.utils.seed import BatchRandom
from tests.conftest import run_train


def _rng(n: int, seed: int) -> BatchRandom:
    return BatchRandom(n, torch.Generator().manual_seed(seed))


def _omega(kind: str, a: float = 0.3, b: float = 0.7) -> list[float]:
    w = [0.0] * OMEGA_DIM
    if kind == "flip":
        w[0] = 1.0
    elif kind == "rot90":
        w[2] = 1.0  # 180 degrees
    elif kind == "translate":
        w[4], w[5] = 2 / 8, -1 / 8
    elif kind == "brightness":
        w[6] = 0.25
    elif kind == "cutout":
        w[7], w[8], w[9] = 1.0, a - 0.5, b - 0.5
    return w


@pytest.mark.parametrize("kind", KINDS)
def test_each_transform_is_linear_and_the_identity_is_exact(kind: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    w = _omega(kind)
    # T(a x + b n) = a T(x) + b T(n): data and noise move together, so T(x_t) = alpha T(x0) + sigma T(eps).
    torch.testing.assert_close(transform(0.6 * x + 0.8 * n, w, 0.5), 0.6 * transform(x, w, 0.5) + 0.8 * transform(n, w, 0.5))
    assert torch.equal(transform(x, [0.0] * OMEGA_DIM, 0.5), x)
    assert not torch.equal(transform(x, w, 0.5), x)


def test_transforms_equal_their_definitions() -> None:
    x = torch.arange(1.0, 65.0).reshape(1, 8, 8)
    assert torch.equal(transform(x, _omega("flip"), 0.5), x.flip(-1))
    assert torch.equal(transform(x, _omega("rot90"), 0.5), x.flip(-1).flip(-2))
    shifted = transform(x, _omega("translate"), 0.5)  # right by 2, up by 1, zeros coming in
    assert torch.equal(shifted[0, :7, 2:], x[0, 1:, :6]) and shifted[0, 7].abs().sum() == 0 and shifted[0, :, :2].abs().sum() == 0
    assert torch.allclose(transform(x, _omega("brightness"), 0.5), x * torch.exp(torch.tensor(0.25)))
    cut = transform(x, _omega("cutout", 0.5, 0.5), 0.5)  # a centred 4x4 square
    assert cut[0, 2:6, 2:6].abs().sum() == 0 and torch.equal(cut[0, :2], x[0, :2]) and int((cut == 0).sum()) == 16


def test_draws_cover_every_kind_with_the_identity_and_omega_matches() -> None:
    aug = ScoreAug()
    kinds, omega = aug.draw(_rng(600, 1), (600, 1, 8, 8))
    counts = torch.bincount(kinds, minlength=len(KINDS) + 1)
    assert (counts > 60).all()  # uniform over identity + 5 kinds (100 each expected)
    assert torch.equal(omega[kinds == 0], torch.zeros(int(counts[0]), OMEGA_DIM))
    # A drawn transform moves something, except a translation that drew a zero shift (then omega = 0 too).
    still = omega[kinds != 0].abs().sum(1) == 0
    assert 0 < float(still.float().mean()) < 0.05
    assert omega[:, 4:6].abs().max() <= 1 / 8 + 1e-6 and omega[:, 6].abs().max() <= 0.4 + 1e-6
    with pytest.raises(ValueError, match="rot90 needs square inputs"):
        aug.draw(_rng(4, 0), (4, 1, 8, 12))
    with pytest.raises(ValueError, match="transforms=.*give distinct kinds"):
        ScoreAug(["flip", "shear"])


@pytest.mark.parametrize("cls", ["dit", "ddt"])
def test_zero_omega_is_the_unconditioned_network(cls: str) -> None:
    torch.manual_seed(0)
    kw = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    if cls == "ddt":
        kw["num_encoder_blocks"] = 1
    net = (DiT if cls == "dit" else DDT)(augment_dim=OMEGA_DIM, **kw).eval()
    for p in net.parameters():  # a trained network: nothing left at its zero init
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([0, 2])
    plain = net(x, t, y).out
    assert torch.equal(net(x, t, y, augment=torch.zeros(2, OMEGA_DIM)).out, plain)
    assert not torch.allclose(net(x, t, y, augment=torch.ones(2, OMEGA_DIM)).out, plain)
    bare = (DiT if cls == "dit" else DDT)(**kw)
    with pytest.raises(ValueError, match="augment_dim=0.*augment=scoreaug"):
        bare(x, t, y, augment=torch.zeros(2, OMEGA_DIM))


class _Recorder(torch.nn.Module):
    """A backbone stand-in that records its inputs and returns a fixed linear function of them."""

    num_classes, augment_dim, input_size = 3, OMEGA_DIM, 8

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, augment: torch.Tensor | None = None):
        from gen.models.common import ModelOutput

        self.seen = (x, augment)
        return ModelOutput(out=0.5 * x + 0.1)


def test_flow_matching_loss_is_the_transformed_velocity_error() -> None:
    aug = ScoreAug()
    obj = FlowMatching(augment=aug, label_dropout=0.0)
    net = _Recorder()
    obj.bind(net)
    x0 = torch.randn(6, 1, 8, 8)
    batch = {"x0": x0, "label": torch.zeros(6, dtype=torch.long)}
    out = obj(net, batch, _rng(6, 3))
    # The same draws by hand: t, eps, labels, then the transforms.
    rng = _rng(6, 3)
    eps, t, _ = obj.draw(x0, batch["label"], 3, rng)
    kinds, omega = aug.draw(rng, x0.shape)
    x_t = obj.path.sample(x0, eps, t)
    v = obj.path.velocity(x0, eps, t)
    tx, tv = aug.apply(x_t, omega), aug.apply(v, omega)
    assert torch.equal(net.seen[0], tx) and torch.equal(net.seen[1], omega)
    torch.testing.assert_close(out["mse"], ((0.5 * tx + 0.1 - tv) ** 2).flatten(1).mean(1))
    assert (kinds > 0).any()


def test_edm_loss_is_the_transformed_denoising_error() -> None:
    aug = ScoreAug(["flip", "cutout"])
    obj = EDMLoss(augment=aug, label_dropout=0.0)
    net = _Recorder()
    obj.bind(net)
    x0 = torch.randn(4, 1, 8, 8)
    batch = {"x0": x0, "label": torch.zeros(4, dtype=torch.long)}
    out = obj(net, batch, _rng(4, 5))
    rng = _rng(4, 5)
    eps, sigma, _ = obj.draw(x0, batch["label"], 3, rng)
    _, omega = aug.draw(rng, x0.shape)
    xn, tx0 = aug.apply(obj.path.sample(x0, eps, sigma), omega), aug.apply(x0, omega)
    s = sigma.view(-1, 1, 1, 1)
    c_skip, c_out, c_in = 0.25 / (s**2 + 0.25), s * 0.5 / (s**2 + 0.25).sqrt(), 1 / (s**2 + 0.25).sqrt()
    denoised = c_skip * xn + c_out * (0.5 * (c_in * xn) + 0.1)
    want = edm_loss_weight(sigma, 0.5) * ((denoised - tx0) ** 2).flatten(1).sum(1)
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-5)


def test_refusals_before_any_work() -> None:
    with pytest.raises(ValueError, match="model.augment_dim=10"):
        FlowMatching(augment=ScoreAug()).bind(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1,
                                                   num_heads=2, num_classes=3))
    from gen.objectives.base import check_augment

    with pytest.raises(ValueError, match="cannot be combined with representation alignment"):
        check_augment(ScoreAug(), object())


def test_training_with_scoreaug_lowers_the_loss_and_samples_without_flags(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from gen.utils.ckpt import load_snapshot
    from gen.utils.log import read_stats
    from tests.conftest import ROOT, subprocess_env

    run_train(tmp_path, "aug", ["augment=scoreaug", "trainer.total_kimg=1.024", "trainer.status_kimg=0.128"])
    losses = [r["loss"] for r in read_stats(tmp_path / "aug" / "stats.jsonl") if "loss" in r]
    assert losses[-1] < 0.7 * losses[0], losses
    snap = sorted((tmp_path / "aug").glob("snapshot-*.safetensors"))[-1]
    weights, meta = load_snapshot(snap)
    assert meta["model"]["augment_dim"] == OMEGA_DIM and weights["aug_embedder.weight"].abs().sum() > 0
    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, "sample.py", f"snapshot={snap}", f"outdir={out}", "seeds=0-3",
                           "sampler.steps=4"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "sample.json").read_text())["complete"]
