"""FID feature-extraction + statistics throughput: ours against torchmetrics, and 1 -> 2 process scaling.

For each extractor (the FID Inception-v3 and the yardstick LeNet) both pipelines see the same network
weights and the same uint8 images: ours is ``extractor(images)`` + ``FeatureStats.update`` (float64 sums),
torchmetrics' is ``FrechetInceptionDistance.update(images, real=False)`` (its own copy of the same module,
or the same LeNet passed as a custom feature module; ours runs the Inception channels-last, the
reported ``sum_rel_diff`` shows the features agree to float32 rounding). Timed batches alternate (ours, theirs, ours, ...)
so load from other processes on the machine affects both alike; reported are images/s from the median
batch time and the ratio ours / torchmetrics (also from the fastest batch, less disturbed by load).

Scaling: ``eval.generate.collect`` over all images (each process one thread, gloo), wall time including
the all-reduce, with 1 and with 2 processes; scaling = t(1) / t(2) (2.0 is perfect; needs two idle
cores). ``cpu_scaling`` compares the CPU time of the busiest process instead, which shows how evenly the
work is split even when other jobs occupy the cores.

Pretrained Inception weights cannot be downloaded everywhere; without ``--weights`` the bench writes
random weights of the identical architecture (speed does not depend on the values).

Examples (from the repository root)::

    OMP_NUM_THREADS=1 python bench/fid_throughput.py                          # both rows, 64x64 images
    python bench/fid_throughput.py --rows inception --num-images 96 --resolution 256 --threads 2
    python bench/fid_throughput.py --rows lenet --out bench/results/fid_throughput.json   # records for tables.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from eval.features import FeatureExtractor, InceptionFeatures, make_random_inception_weights  # noqa: E402
from eval.stats import FeatureStats  # noqa: E402


class _LeNetFeatures(FeatureExtractor):
    """Random-init yardstick LeNet (speed only; the trained one has the same cost)."""

    def __init__(self) -> None:
        from eval.classifier import LeNet

        torch.manual_seed(0)
        # As eval.classifier.load_or_train_classifier builds it: channels-last (torchmetrics gets this
        # same module object, so both run the same layout).
        self.net = LeNet(3, 10).eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.name, self.dim, self.resize, self.weights_sha256 = "lenet-random", 128, "none-32", "random"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.float().div(127.5).sub(1.0))


def _make_extractor(row: str, weights: str) -> FeatureExtractor:
    # channels_last: the opt-in fast layout this table measures (the default, NCHW, is bitwise
    # torch-fidelity and runs at torchmetrics' speed).
    return InceptionFeatures(weights, channels_last=True) if row == "inception" else _LeNetFeatures()


def _images(n: int, resolution: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, resolution, resolution), generator=g, dtype=torch.uint8)


def bench_vs_torchmetrics(row: str, weights: str, images: torch.Tensor, batch: int, repeats: int = 3) -> dict:
    from torchmetrics.image.fid import FrechetInceptionDistance

    ext = _make_extractor(row, weights)
    if row == "inception":
        tm = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights, antialias=False)
    else:
        lenet = ext

        class _Module(torch.nn.Module):  # torchmetrics takes a custom feature network as a Module
            num_features = 128

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return lenet(x)

        tm = FrechetInceptionDistance(feature=_Module())
    stats = FeatureStats(ext.dim)
    batches = list(images.split(batch))
    # Warm-up (allocator, oneDNN kernels) on one batch each, not timed.
    ext(batches[0])
    tm.update(batches[0], real=True)
    ours_t, theirs_t = [], []

    def ours_step(b: torch.Tensor) -> None:
        t0 = time.perf_counter()
        stats.update(ext(b))
        ours_t.append(time.perf_counter() - t0)

    def theirs_step(b: torch.Tensor) -> None:
        t0 = time.perf_counter()
        tm.update(b, real=False)
        theirs_t.append(time.perf_counter() - t0)

    for rep in range(repeats):
        if rep:  # a fresh accumulation each pass, so the final statistics cover the images once
            stats = FeatureStats(ext.dim)
            tm.reset()
        for i, b in enumerate(batches):
            # Alternate which pipeline goes first so neither always runs on a warm cache.
            for step in (ours_step, theirs_step) if i % 2 == 0 else (theirs_step, ours_step):
                step(b)
    # Our Inception runs channels-last (faster); its features differ from torchmetrics' by float32 rounding.
    rel_diff = float((stats.sum - tm.fake_features_sum.double()).abs().max() / tm.fake_features_sum.abs().max())
    ours, theirs = batch / statistics.median(ours_t), batch / statistics.median(theirs_t)
    # On a shared machine the fastest batch is the least disturbed estimate of the cost.
    ours_best, theirs_best = batch / min(ours_t), batch / min(theirs_t)
    return {"row": row, "images": len(images), "batch": batch, "timed_batches": len(ours_t),
            "ours_img_s": ours, "torchmetrics_img_s": theirs, "ratio": ours / theirs,
            "ratio_best": ours_best / theirs_best, "sum_rel_diff": rel_diff}


def _collect_worker(rank: int, world: int, port: int, row: str, weights: str, n: int, res: int, batch: int,
                    out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from eval.generate import collect, images_fn
    from gen.utils import dist

    dist.init_distributed(timeout_s=600)
    images = _images(n, res)
    ext = _make_extractor(row, weights)
    ext(images[:1])  # warm-up
    dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    got = collect(images_fn(images), range(n), ext, batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    Path(f"{out}.{rank}").write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "n": got.stats.n,
                                                 "sum0": float(got.stats.sum[0])}))
    if world > 1:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_scaling(row: str, weights: str, n: int, res: int, batch: int) -> dict:
    walls, cpus, sums = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out = os.path.join(tmp, f"w{world}.json")
            mp.spawn(_collect_worker, args=(world, _free_port(), row, weights, n, res, batch, out), nprocs=world)
            ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
            walls[world] = max(r["wall_s"] for r in ranks)
            cpus[world] = max(r["cpu_s"] for r in ranks)  # the busiest process
            sums[world] = ranks[0]["sum0"]
    # Wall-time scaling needs two free cores; CPU-time scaling (work of the busiest process) shows
    # how evenly the images are split, independent of other load on the machine.
    return {"row": row, "images": n, "wall_1proc_s": walls[1], "wall_2proc_s": walls[2],
            "scaling": walls[1] / walls[2], "cpu_scaling": cpus[1] / cpus[2],
            "scaling_same_stats": abs(sums[1] - sums[2]) <= 1e-9 * abs(sums[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="inception,lenet")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--resolution", type=int, default=64, help="Inception rows (LeNet rows use 32)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the images (ours vs torchmetrics)")
    p.add_argument("--threads", type=int, default=1, help="threads for the ours-vs-torchmetrics comparison")
    p.add_argument("--weights", help="Inception weights file (default: random weights, same architecture)")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--out", help="also write the rows as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights or str(make_random_inception_weights(Path(tmp) / "random_inception.pth"))
        rows = []
        for row in args.rows.split(","):
            res = args.resolution if row == "inception" else 32
            n = args.num_images if row == "inception" else max(args.num_images, 16384)
            batch = args.batch if row == "inception" else 256
            r = bench_vs_torchmetrics(row, weights, _images(n, res), batch, args.repeats)
            r["resolution"] = res
            if not args.no_scaling:
                r.update({k: v for k, v in bench_scaling(row, weights, n, res, batch).items() if k not in ("row", "images")})
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'row':10s} {'res':>4s} {'N':>6s} {'ours img/s':>11s} {'tm img/s':>9s} {'ratio':>6s} {'best':>6s} {'1proc s':>8s} {'2proc s':>8s} {'scale':>6s} {'cpu':>5s}")
    for r in rows:
        print(f"{r['row']:10s} {r['resolution']:4d} {r['images']:6d} {r['ours_img_s']:11.2f} {r['torchmetrics_img_s']:9.2f} "
              f"{r['ratio']:6.3f} {r['ratio_best']:6.3f} {r.get('wall_1proc_s', float('nan')):8.2f} {r.get('wall_2proc_s', float('nan')):8.2f} "
              f"{r.get('scaling', float('nan')):6.2f} {r.get('cpu_scaling', float('nan')):5.2f}")
    if args.out:
        _store(Path(args.out), rows, args)


def _store(file: Path, rows: list[dict], args: argparse.Namespace) -> None:
    """Add the rows to ``{"records": [...]}`` in ``file`` (``bench/tables.py`` reads it), replacing earlier
    records of the same row, resolution and image count."""
    import datetime
    import shlex

    data = json.loads(file.read_text())["records"] if file.exists() else []
    command = shlex.join(["python", "bench/fid_throughput.py", *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for r in rows:
        key = f"{r['row']}|{r['resolution']}|{r['images']}"
        data = [d for d in data if d.get("key") != key]
        data.append({**r, "kind": "fid_throughput", "key": key, "command": command, "threads": args.threads,
                     "repeats": args.repeats, "load_1min": round(os.getloadavg()[0], 2), "date": stamp})
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({"records": data}, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
