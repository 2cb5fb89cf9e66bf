"""SD-VAE tokenizer throughput: our path against a direct diffusers call, and latent extraction on 1 vs 2 processes.

Encode: ours is ``SDVAE.encode(uint8, per-image generators)`` (pixel mapping, posterior sample drawn per image,
x 0.18215); the direct call is ``vae.encode(u / 127.5 - 1).latent_dist.sample(generator=generators) * 0.18215``.
Decode: ``SDVAE.decode(z)`` against ``vae.decode(z / 0.18215).sample``. Both sides use the very same
``AutoencoderKL`` module (random weights of the published config; speed does not depend on the values), so the
ratio measures only what our wrapper adds. Timed calls alternate in ABBA order (ours, direct, direct, ours, ...)
so load from other processes and warm-up affect both alike; reported are images/s from the median call,
ours / direct from the medians, from the fastest calls and from CPU time, and the spread (quartiles) of the
per-pair ratios, which shows the noise of the machine. Because the two paths run the same network, the bench
also times the wrapper alone: both paths with the network's ``encode`` / ``decode`` replaced by returning a
stored output; ``overhead`` is the extra time of our path per call as a fraction of a real network call.

Extraction: ``gen.data.latents.extract_latents`` of ``shapes`` images with the same SD-VAE, one thread per
process, gloo, 1 and 2 processes; images/s from the wall time, and the CPU time of the busiest process
(how evenly the work splits even when other jobs occupy the cores).

Examples (from the repository root)::

    OMP_NUM_THREADS=1 python bench/tokenizer_throughput.py
    python bench/tokenizer_throughput.py --resolution 256 --batch 8 --repeats 5 --threads 2
    python bench/tokenizer_throughput.py --skip-extraction --out bench/tokenizer_throughput.json
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

from tokenizers.base import per_image_generators  # noqa: E402
from tokenizers.sdvae import SD_VAE_SCALING, SDVAE, make_random_sd_vae  # noqa: E402


def _timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _wrapper_overhead(vae: torch.nn.Module, op: str, ours, direct, calls: int = 200) -> float:
    """Seconds per call that our path adds when the network itself costs nothing (its output is replayed)."""
    real = getattr(vae, op)
    captured = {}

    def record(*args, **kwargs):
        captured["out"] = real(*args, **kwargs)
        return captured["out"]

    setattr(vae, op, record)
    try:
        ours()
        setattr(vae, op, lambda *args, **kwargs: captured["out"])
        per = {}
        for name, fn in (("ours", ours), ("direct", direct), ("ours2", ours), ("direct2", direct)):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per[name] = (time.perf_counter() - t0) / calls
    finally:
        delattr(vae, op)  # back to the class method
    return min(per["ours"], per["ours2"]) - min(per["direct"], per["direct2"])


def bench_paths(folder: str, resolution: int, batch: int, repeats: int) -> dict:
    tok = SDVAE(weights=folder)
    vae = tok.vae
    u = torch.randint(0, 256, (batch, 3, resolution, resolution), generator=torch.Generator().manual_seed(0),
                      dtype=torch.uint8)
    seeds = list(range(batch))

    @torch.no_grad()
    def ours_encode() -> torch.Tensor:
        return tok.encode(u, per_image_generators(seeds, "bench"))

    @torch.no_grad()
    def direct_encode() -> torch.Tensor:
        x = u.float() / 127.5 - 1.0
        return vae.encode(x).latent_dist.sample(generator=per_image_generators(seeds, "bench")) * SD_VAE_SCALING

    z = ours_encode()
    assert torch.equal(z, direct_encode()), "the two paths must compute the same latents"

    @torch.no_grad()
    def ours_decode() -> torch.Tensor:
        return tok.decode(z)

    @torch.no_grad()
    def direct_decode() -> torch.Tensor:
        return vae.decode(z / SD_VAE_SCALING).sample

    assert torch.equal(ours_decode(), direct_decode())
    rows = {}
    for op, ours, direct in (("encode", ours_encode, direct_encode), ("decode", ours_decode, direct_decode)):
        times: dict[str, list[tuple[float, float]]] = {"ours": [], "direct": []}
        for r in range(repeats):
            pair = (("ours", ours), ("direct", direct)) if r % 2 == 0 else (("direct", direct), ("ours", ours))
            for name, fn in pair:
                times[name].append(_timed(fn))
        wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
        best = {k: min(t[0] for t in v) for k, v in times.items()}
        cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
        pairs = sorted(d[1] / o[1] for o, d in zip(times["ours"], times["direct"], strict=True))
        q1, q3 = pairs[len(pairs) // 4], pairs[(3 * len(pairs)) // 4]
        rows[op] = {
            "ours_img_s": round(batch / wall["ours"], 3), "direct_img_s": round(batch / wall["direct"], 3),
            "ratio_median": round(wall["direct"] / wall["ours"], 4), "ratio_best": round(best["direct"] / best["ours"], 4),
            "ratio_cpu": round(cpu["direct"] / cpu["ours"], 4), "pair_ratio_cpu_quartiles": [round(q1, 3), round(q3, 3)],
            "overhead": round(_wrapper_overhead(vae, op, ours, direct) / wall["direct"], 6),
        }
    return rows


def _extract_worker(rank: int, world: int, port: int, folder: str, n: int, res: int, out: str, result: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from gen.data.latents import extract_latents
    from gen.data.shapes import Shapes
    from gen.utils import dist

    dist.init_distributed(timeout_s=600)
    try:
        dataset, tok = Shapes(count=n, resolution=res), SDVAE(weights=folder)
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        extract_latents(dataset, tok, out, shard_size=4, batch_size=4, device="cpu")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        Path(f"{result}.{rank}").write_text(json.dumps({"wall": wall, "cpu": cpu}))
    finally:
        if dist.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_extraction(folder: str, n: int, res: int) -> dict:
    got = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            result = os.path.join(tmp, f"res{world}")
            mp.spawn(_extract_worker, args=(world, _free_port(), folder, n, res, os.path.join(tmp, f"lat{world}"), result),
                     nprocs=world)
            runs = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]
            got[world] = {"wall": max(r["wall"] for r in runs), "cpu": max(r["cpu"] for r in runs)}
        same = all((Path(tmp, "lat1", p.name).read_bytes() == p.read_bytes()) for p in Path(tmp, "lat2").iterdir())
    return {
        "images": n, "resolution": res,
        "img_s_1proc": round(n / got[1]["wall"], 3), "img_s_2proc": round(n / got[2]["wall"], 3),
        "scaling_wall": round(got[1]["wall"] / got[2]["wall"], 3), "scaling_cpu": round(got[1]["cpu"] / got[2]["cpu"], 3),
        "identical_files": same,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--extract-images", type=int, default=32)
    p.add_argument("--extract-resolution", type=int, default=64)
    p.add_argument("--skip-extraction", action="store_true")
    p.add_argument("--out", help="write the results as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(make_random_sd_vae(Path(tmp) / "sd-vae", seed=0))
        result = {"threads": args.threads, "resolution": args.resolution, "batch": args.batch,
                  "paths": bench_paths(folder, args.resolution, args.batch, args.repeats)}
        print(json.dumps(result, indent=1), flush=True)
        if not args.skip_extraction:
            result["extraction"] = bench_extraction(folder, args.extract_images, args.extract_resolution)
            print(json.dumps(result["extraction"], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
