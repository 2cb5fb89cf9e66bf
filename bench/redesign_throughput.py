"""Training and sampling throughput before and after the training redesign, measured in one run on one machine.

"Before" is a checkout of commit 3bef4cd (the last commit before "Training redesign: methods own their parts, one
loop, one state registry, one constructor"), "after" this checkout. Three measurements, each run as a subprocess
inside the tree it measures (that tree's code, its own configs), repeated ``--reps`` times with the two sides
alternating (before, after, after, before, ...) so that load from other processes falls on both alike:

* ``train_step``: that tree's ``bench/train_throughput.py`` (backbone forward + MSE + backward + fused AdamW against
  diffusers' DiT, which is the same code on both sides and so also shows the load): our model's images/s, wall and
  CPU time per step.
* ``train_loop``: the quick start, ``train.py`` with its default config for ``--train-kimg`` kimg (previews,
  evaluation and TensorBoard off; status every kimg): median wall seconds per kimg over the status intervals after
  the first, and the whole process's CPU seconds per kimg. This covers what the redesign changed in the loop
  (per-sample random streams, its own DDP/AMP handling instead of accelerate, the method/registry layers).
* ``sampling``: the quick-start sampler (Euler 30 steps, CFG 2, from the snapshot's own sampler config) through
  that tree's ``Generator`` on the snapshot the ``train_loop`` run of the same side wrote; images/s over
  ``--sample-images`` images in batches of 250.

Records (one per side, measurement and repetition) go to ``bench/results/redesign.json``; ``bench/tables.py`` builds
the README table (medians per side, after / before ratios).

    git worktree add --detach ../before 3bef4cd
    OMP_NUM_THREADS=1 python bench/redesign_throughput.py --before ../before --reps 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "redesign.json"
TRAIN_STEP_MODELS = "tiny_dit,tiny_lightningdit,tiny_ddt,dit_s2"


def _commit(tree: Path) -> str:
    return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=tree, text=True).strip()


def _run(cmd: list[str], tree: Path, threads: int) -> tuple[str, float, float]:
    """Run ``cmd`` in ``tree``; returns (stdout, wall seconds, child CPU seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed in {tree}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.stdout, wall, cpu


# ----------------------------------------------------------------------------------------------------------
# Measurements (each returns records without side/rep)


def parse_train_throughput(text: str) -> dict[str, dict[str, dict[str, float]]]:
    """``bench/train_throughput.py`` output -> {row: {model: {s_per_step, cpu_s_per_step, img_per_s}}}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    row = ""
    for line in text.splitlines():
        tok = line.split()
        if len(tok) >= 7 and tok[-7] in ("ours", "diffusers"):
            if not line.startswith(" "):
                row = line[:34].strip()
            _, s_step, cpu, img_s = (float(x) for x in tok[-6:-2])
            out.setdefault(row, {})[tok[-7]] = {"s_per_step": s_step, "cpu_s_per_step": cpu, "img_per_s": img_s}
    return out


def measure_train_step(tree: Path, threads: int, steps: int, models: str) -> list[dict[str, Any]]:
    cmd = [sys.executable, "bench/train_throughput.py", "--models", models, "--batch", "16", "--steps",
           str(steps), "--warmup", "1", "--threads", str(threads)]
    text, _, _ = _run(cmd, tree, threads)
    recs = []
    for row, models in parse_train_throughput(text).items():
        for model, m in models.items():
            who = "ours" if model == "ours" else "diffusers (same code both sides: load control)"
            recs.append({
                "what": f"train_step/{row}/{model}", "label": f"train step, {row}, {who}", "unit": "img/s",
                "rate": m["img_per_s"], "cpu_rate": 16 / m["cpu_s_per_step"], "raw": m,
                "command": shlex.join(["python", *cmd[1:]]),
            })
    return recs


def measure_train_loop(tree: Path, threads: int, kimg: float, run_dir: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "train.py", f"run_dir={run_dir}", f"trainer.total_kimg={kimg:g}", "trainer.status_kimg=1",
           "trainer.checkpoint_kimg=inf", "trainer.snapshot_kimg=inf", "eval=none", "preview.images=0",
           "trainer.tensorboard=false", "trainer.progress=false"]
    _, wall, cpu = _run(cmd, tree, threads)
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "sec_per_kimg" in r]
    steady = [r["sec_per_kimg"] for r in rows[1:]]  # the first interval holds the warm-up
    return [{
        "what": "train_loop", "label": f"quick-start training (train.py, {kimg:g} kimg, batch 32)", "unit": "img/s",
        "rate": 1000.0 / statistics.median(steady), "cpu_rate": kimg * 1000.0 / cpu,
        "raw": {"sec_per_kimg": [r["sec_per_kimg"] for r in rows], "process_wall_s": wall, "process_cpu_s": cpu,
                "final_loss": rows[-1].get("loss")},
        "command": shlex.join(["python", *cmd[1:]]).replace(str(run_dir), "<run_dir>"),
    }]


def measure_sampling(tree: Path, threads: int, run_dir: Path, images: int) -> list[dict[str, Any]]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-sampling", str(run_dir), "--sample-images",
           str(images), "--threads", str(threads)]
    text, _, _ = _run(cmd, tree, threads)
    m = json.loads(text.strip().splitlines()[-1])
    return [{
        "what": "sampling", "label": "quick-start sampler (Euler 30, CFG 2) through Generator.generate",
        "unit": "img/s", "rate": m["img_per_s"], "cpu_rate": m["cpu_img_per_s"], "raw": m,
        "command": "python bench/redesign_throughput.py --worker-sampling <run_dir>",
    }]


def worker_sampling(run_dir: Path, images: int, threads: int) -> None:
    """Runs inside the measured tree: sample from its quick-start snapshot with its own Generator."""
    import torch

    torch.set_num_threads(threads)
    try:
        from pipeline import SamplerSpec, generator_from_snapshot  # after the redesign
    except ImportError:
        from gen.pipeline import SamplerSpec, generator_from_snapshot  # before (3bef4cd)
    snap = sorted(run_dir.glob("snapshot-*.safetensors"))[-1]
    gen, config = generator_from_snapshot(str(snap))
    spec = SamplerSpec.from_config(config["sampler"])
    gen.generate(list(range(16)), spec)  # warm-up
    seeds = list(range(images))
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, images, 250):
        gen.generate(seeds[i : i + 250], spec)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"img_per_s": images / wall, "cpu_img_per_s": images / cpu, "images": images,
                      "snapshot": snap.name, "sampler": config["sampler"]}))


# ----------------------------------------------------------------------------------------------------------


def _store(records: list[dict[str, Any]], file: Path) -> None:
    data = json.loads(file.read_text())["records"] if file.exists() else []
    data += records
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps({"records": data}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, file)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, help="checkout of the commit before the redesign (3bef4cd)")
    ap.add_argument("--after", type=Path, default=ROOT, help="checkout after the redesign (default: this one)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per side, alternating")
    ap.add_argument("--what", default="train_step,train_loop,sampling")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=5, help="timed steps per model in train_step")
    ap.add_argument("--models", default=TRAIN_STEP_MODELS, help="rows of bench/train_throughput.py in train_step")
    ap.add_argument("--train-kimg", type=float, default=8.0, help="quick-start training length in train_loop")
    ap.add_argument("--sample-images", type=int, default=500)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--worker-sampling", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_sampling is not None:
        worker_sampling(args.worker_sampling, args.sample_images, args.threads)
        return
    if args.before is None:
        ap.error("--before is required (a checkout of 3bef4cd)")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    commits = {k: _commit(v) for k, v in trees.items()}
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    print(f"before = {trees['before']} ({commits['before']}), after = {trees['after']} ({commits['after']})", flush=True)
    with tempfile.TemporaryDirectory(prefix="redesign-") as tmp:
        for rep in range(args.reps):
            order = ["before", "after"] if rep % 2 == 0 else ["after", "before"]
            for side in order:
                tree = trees[side]
                run_dir = Path(tmp) / f"{side}-{rep}"
                recs: list[dict[str, Any]] = []
                if "train_step" in what:
                    recs += measure_train_step(tree, args.threads, args.train_steps, args.models)
                if "train_loop" in what or "sampling" in what:
                    recs += [r for r in measure_train_loop(tree, args.threads, args.train_kimg, run_dir)
                             if "train_loop" in what]
                if "sampling" in what:
                    recs += measure_sampling(tree, args.threads, run_dir, args.sample_images)
                load = os.getloadavg()[0]
                stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                for r in recs:
                    r.update({"kind": "throughput", "side": side, "rep": rep, "commit": commits[side],
                              "threads": args.threads, "load_1min": round(load, 2), "date": stamp})
                _store(recs, args.results)
                print(f"rep {rep} {side}: " + ", ".join(f"{r['what']} {r['rate']:.3g}" for r in recs), flush=True)


if __name__ == "__main__":
    main()
