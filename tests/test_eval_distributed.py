"""Evaluation under 2 gloo processes gives the same statistics and FID as 1 process (eval.generate)."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

NUM_IMAGES = 37  # does not divide evenly into 2 processes x batches of 4


class _RandomLeNetFeatures:
    """Features of a randomly initialised (seeded) yardstick LeNet; identical in every process."""

    name, dim, resize, weights_sha256 = "lenet-random-test", 128, "none-32", "random-0"

    def __init__(self) -> None:
        from eval.classifier import LeNet, to_unit_range

        torch.manual_seed(0)
        self.net = LeNet(1, 10).eval()
        self.to_unit = to_unit_range

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.to_unit(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.to_unit(images)).argmax(1)

    def manifest(self) -> dict:
        return {"extractor": self.name, "weights_sha256": self.weights_sha256, "resize": self.resize, "dim": self.dim}


def _generate(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    from gen.utils.seed import PerImageRandom

    rnd = PerImageRandom(seeds)
    base = rnd.randn((1, 32, 32)).mul(60).add(128).clamp(0, 255).to(torch.uint8)
    return base, rnd.randint(10)


def _evaluate() -> dict[str, np.ndarray | float]:
    from eval.fid import InceptionScoreStats, fid_from_stats
    from eval.generate import collect
    from gen.utils.seed import PerImageRandom, shard_seeds
    from gen.utils import dist

    ext = _RandomLeNetFeatures()
    seeds = list(range(100, 100 + NUM_IMAGES))
    got = collect(_generate, seeds, ext, batch_size=4, classifier=ext.predict)  # type: ignore[arg-type]
    # A fixed reference: the first 300 seeds after the sample set, computed locally in every process.
    ref_images, _ = _generate(list(range(1000, 1300)))
    from eval.stats import FeatureStats

    ref = FeatureStats(ext.dim)
    ref.update(ext(ref_images))
    fid = fid_from_stats(got.stats.gaussian(), ref.gaussian(), allow_singular=True)
    # Inception Score sums: logits are a function of the seed, the split a function of its index.
    iss = InceptionScoreStats(NUM_IMAGES, splits=5, num_classes=10)
    for batch in shard_seeds(seeds, 4, dist.rank(), dist.world_size()):
        if batch:
            iss.update(PerImageRandom(batch).randn((10,)) * 3, torch.tensor([s - 100 for s in batch]))
    return {
        "n": float(got.stats.n),
        "mu": got.stats.mu(),
        "sigma": got.stats.sigma(),
        "fid": fid,
        "acc": float(got.class_accuracy),
        "is": iss.reduce().score()[0],
    }


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from gen.utils import dist

    dist.init_distributed(timeout_s=120)
    try:
        res = _evaluate()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **{k: np.asarray(v) for k, v in res.items()})
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def test_two_processes_match_one(tmp_path) -> None:
    single = _evaluate()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as d:
            assert int(d["n"]) == NUM_IMAGES
            for key in ("mu", "sigma", "fid", "acc", "is"):
                assert _rel(d[key], single[key]) <= 1e-9, (rank, key, d[key], single[key])
    assert single["fid"] > 0


def test_seed_sharding_covers_every_seed_once() -> None:
    from gen.utils.seed import shard_seeds

    seeds = list(range(NUM_IMAGES))
    shards = [sum(shard_seeds(seeds, 4, r, 2), []) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == seeds and shards[0] and shards[1]
