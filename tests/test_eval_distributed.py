"""Evaluation under 2 gloo processes gives the same statistics and FID as 1 process (eval.generate)."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port

NUM_IMAGES = 37  # 13 batches of 3 (the last of 1): 7 on one process, 6 on the other


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
    # One thread everywhere: oneDNN convolutions may sum in another order with another thread
    # count, and the 1-process and 2-process runs must see bitwise the same features.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _evaluate_single_thread()
    finally:
        torch.set_num_threads(threads)


def _evaluate_single_thread() -> dict[str, np.ndarray | float]:
    from eval.fid import InceptionScoreStats, fid_from_stats
    from eval.generate import collect, fixed_batches
    from gen.utils import dist
    from gen.utils.seed import PerImageRandom

    ext = _RandomLeNetFeatures()
    seeds = list(range(100, 100 + NUM_IMAGES))
    got = collect(_generate, seeds, ext, batch_size=3, classifier=ext.predict)  # type: ignore[arg-type]
    # A fixed reference: the first 300 seeds after the sample set, computed locally in every process.
    ref_images, _ = _generate(list(range(1000, 1300)))
    from eval.stats import FeatureStats

    ref = FeatureStats(ext.dim)
    ref.update(ext(ref_images))
    fid = fid_from_stats(got.stats.gaussian(), ref.gaussian(), allow_singular=True)
    # Inception Score sums: logits are a function of the seed, the split a function of its index.
    # ADM-style groups of 10 (10 + 10 + 10 + 7) and torch-fidelity's 5 shuffled splits.
    iss = InceptionScoreStats(NUM_IMAGES, num_classes=10, split_size=10)
    iss_tf = InceptionScoreStats(NUM_IMAGES, num_classes=10, convention="torch-fidelity", splits=5)
    for batch in fixed_batches(seeds, 3, dist.rank(), dist.world_size()):
        if batch:
            for acc in (iss, iss_tf):
                acc.update(PerImageRandom(batch).randn((10,)) * 3, torch.tensor([s - 100 for s in batch]))
    return {
        "n": float(got.stats.n),
        "mu": got.stats.mu(),
        "sigma": got.stats.sigma(),
        "fid": fid,
        "acc": float(got.class_accuracy),
        "is": iss.reduce().score()[0],
        "is_tf": iss_tf.reduce().score()[0],
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




def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def test_two_processes_match_one(tmp_path) -> None:
    single = _evaluate()
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as d:
            assert int(d["n"]) == NUM_IMAGES
            for key in ("mu", "sigma", "fid", "acc", "is", "is_tf"):
                assert _rel(d[key], single[key]) <= 1e-9, (rank, key, d[key], single[key])
    assert single["fid"] > 0


def test_batches_cover_every_seed_once_and_do_not_depend_on_world_size() -> None:
    from eval.generate import fixed_batches

    seeds = list(range(100, 100 + NUM_IMAGES))
    one = fixed_batches(seeds, 3, 0, 1)
    two = [fixed_batches(seeds, 3, r, 2) for r in range(2)]
    assert sorted(sum(two[0] + two[1], [])) == seeds
    assert sorted(two[0] + two[1]) == sorted(one)  # the same batches, only dealt differently
    assert (len(two[0]), len(two[1])) == (7, 6)


def _inception_worker(rank: int, world: int, port: int, out_dir: str, weights: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from gen.utils import dist

    dist.init_distributed(timeout_s=300)
    try:
        res = _inception_stats(weights)
        if rank == 0:
            np.savez(os.path.join(out_dir, "inception.npz"), **res)
    finally:
        torch.distributed.destroy_process_group()


def _inception_stats(weights: str) -> dict[str, np.ndarray]:
    from eval.features import InceptionFeatures
    from eval.generate import collect

    def generate(seeds: list[int]) -> tuple[torch.Tensor, None]:
        from gen.utils.seed import PerImageRandom

        return PerImageRandom(seeds).randn((3, 24, 24)).mul(70).add(128).clamp(0, 255).to(torch.uint8), None

    got = collect(generate, list(range(11)), InceptionFeatures(weights), batch_size=2, inception_score=True)
    return {"mu": got.stats.mu(), "sigma": got.stats.sigma(), "is": np.asarray(got.inception_score.score()[0])}


def test_two_processes_match_one_with_inception(tmp_path) -> None:
    """The real FID network (random weights): batches are identical in both runs, so features are too."""
    from eval.features import make_random_inception_weights

    weights = str(make_random_inception_weights(tmp_path / "random.pth"))
    torch.set_num_threads(1)
    single = _inception_stats(weights)
    mp.spawn(_inception_worker, args=(2, free_port(), str(tmp_path), weights), nprocs=2, join=True)
    with np.load(tmp_path / "inception.npz") as d:
        for key in ("mu", "sigma", "is"):
            assert _rel(d[key], single[key]) <= 1e-9, key
