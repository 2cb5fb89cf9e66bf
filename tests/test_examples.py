"""The example methods of tests/ in-process (their end-to-end SIGKILL/resume runs are in tests/test_train.py): the
method's batch hook (pairs mirrored together; keys the dataset lacks and keys a flip would leave out of register
refused), phases sharing what one computed, a loss through a 2-step sampler, an EMA target."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from gen.ema import EMA
from gen.objectives import FlowMatching
from gen.train.diffusion import Diffusion
from gen.train.loop import TrainConfig, train
from gen.utils.config import ConfigError
from gen.utils.seed import SampleRandom
from tests.example_pairs import NoisePairs, PairedFlow
from tests.presets import micro
from tokenizers.pixels import PixelTokenizer

ADAM = functools.partial(torch.optim.Adam, lr=1e-3)


@pytest.fixture(scope="module")
def pairs() -> NoisePairs:
    return NoisePairs(seed=0, resolution=8, mode="resize")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return micro("dit", input_size=8, in_channels=1, num_classes=10)


def test_pairs_are_mirrored_together(pairs: NoisePairs) -> None:
    method = PairedFlow(_net(), ADAM)
    idx = torch.arange(64)
    raw = {k: v[idx] for k, v in pairs.tensors().items()} | {"position": idx}
    rng = SampleRandom(idx.tolist(), namespace="t")
    batch = method.prepare_batch(raw, PixelTokenizer(channels=1), rng, True, torch.device("cpu"))
    flipped = torch.tensor([not torch.equal(batch["image"][i], raw["image"][i]) for i in range(64)])
    assert 10 < int(flipped.sum()) < 54, "about half of the samples are mirrored"
    for i in range(64):
        want = (lambda x: x.flip(-1)) if flipped[i] else (lambda x: x)
        assert torch.equal(batch["image"][i], want(raw["image"][i]))
        assert torch.equal(batch["noise"][i], want(raw["noise"][i])), f"sample {i}: its noise was not mirrored with it"
    torch.testing.assert_close(batch["x0"], batch["image"].float() / 127.5 - 1)


def _train(method: torch.nn.Module, dataset: object, run_dir: Path, hflip: bool) -> None:
    cfg = TrainConfig(total_kimg=0.016, batch_size=16, status_kimg=0.016, hflip=hflip, tensorboard=False,
                      progress=False, device="cpu")
    train(method=method, dataset=dataset, tokenizer=PixelTokenizer(channels=1), ema=functools.partial(EMA, decays=[0.5]),
          cfg=cfg, run_dir=run_dir, config={}, snapshot_meta={})


def test_a_key_a_flip_would_leave_out_of_register_is_refused(pairs: NoisePairs, tmp_path: Path) -> None:
    diffusion = Diffusion(_net(), FlowMatching(), ADAM)  # mirrors the images only
    with pytest.raises(ConfigError, match=r"trainer.hflip=true mirrors \['image'\] but would leave the dataset's "
                                          r"\['noise'\] unmirrored"):
        _train(diffusion, pairs, tmp_path, hflip=True)
    _train(PairedFlow(_net(), ADAM), pairs, tmp_path / "ok", hflip=True)  # declares the pair: trains


def test_a_key_the_dataset_lacks_is_refused(tmp_path: Path) -> None:
    from gen.data import Digits

    with pytest.raises(ConfigError, match=r"PairedFlow reads dataset key\(s\) \['noise'\], which the dataset lacks"):
        _train(PairedFlow(_net(), ADAM), Digits(), tmp_path, hflip=False)


def test_the_critic_phase_judges_the_net_phase_samples(tmp_path: Path) -> None:
    """AdversarialFlow (tests/example_method.py): the critic phase consumes the very estimates the net phase put in
    Method.shared for the same micro-batch (2 accumulation rounds: two different micro-batches per step)."""
    from gen.data import Digits
    from tests.example_method import AdversarialFlow

    method = AdversarialFlow(_net(), ADAM, ADAM, feature_width=4)
    seen: list[tuple[str, torch.Tensor]] = []
    put, get = method.shared.put, method.shared.get
    method.shared.put = lambda k, v: (seen.append(("put", v.detach().clone())), put(k, v))[1]  # type: ignore[method-assign]
    method.shared.get = lambda k: (lambda v: (seen.append(("get", v.clone())), v)[1])(get(k))  # type: ignore[method-assign]
    cfg = TrainConfig(total_kimg=0.032, batch_size=16, batch_per_gpu=8, status_kimg=0.016, tensorboard=False,
                      progress=False, device="cpu")
    train(method=method, dataset=Digits(), tokenizer=PixelTokenizer(channels=1), ema=functools.partial(EMA, decays=[0.5]),
          cfg=cfg, run_dir=tmp_path, config={}, snapshot_meta={})
    assert [k for k, _ in seen] == ["put", "put", "get", "get"] * 2  # 2 steps: net phase on 2 rounds, then critic
    for step in range(2):
        puts, gets = seen[4 * step:4 * step + 2], seen[4 * step + 2:4 * step + 4]
        assert not torch.equal(puts[0][1], puts[1][1])
        assert all(torch.equal(p[1], g[1]) for p, g in zip(puts, gets))
    assert not method.shared.has("fake"), "the share is cleared after every step"
    with pytest.raises(KeyError, match="no 'fake' was shared for micro-batch 0"):
        method.shared.get("fake")


def test_datafree_student_reads_no_image_and_learns_through_both_sampler_steps(tmp_path: Path) -> None:
    from gen.utils.ckpt import save_snapshot
    from tests.example_datafree import DataFreeStudent

    teacher = _net()
    snap = tmp_path / "t.safetensors"
    save_snapshot(snap, teacher.state_dict(), {"model": dict(teacher.config), "prediction": FlowMatching().prediction_spec()})
    torch.manual_seed(1)
    method = DataFreeStudent(micro("dit", input_size=8, in_channels=1, num_classes=10), ADAM, str(snap))
    idx = torch.arange(4)
    raw = {"image": torch.zeros(4, 1, 8, 8, dtype=torch.uint8), "label": idx % 10, "position": idx}
    rng = SampleRandom(idx.tolist(), namespace="t")
    batch = method.prepare_batch(raw, None, rng, False, torch.device("cpu"))
    assert set(batch) == {"label", "position"}
    loss = method.loss("net", batch, rng, None)["loss"]
    assert loss.shape == (4,) and loss.requires_grad
    loss.sum().backward()
    assert all(p.grad is not None for p in method.net.parameters() if p.requires_grad)
    assert all(p.grad is None for p in method.teacher.parameters())
    # The student's sample equals two explicit Euler steps, so the gradient went through both.
    noise = torch.randn(1, 1, 8, 8)
    y = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        x = noise.clone()
        for t, dt in ((1.0, -0.5), (0.5, -0.5)):
            x = x + dt * method.net(x, torch.full((1,), t), y).out.float()
        torch.testing.assert_close(method._sample(method.net, noise, y, 2), x, rtol=1e-5, atol=1e-5)
