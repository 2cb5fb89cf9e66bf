"""Training and sampling throughput before and after the training redesign, measured in one run on one machine.

"Before" is a checkout of commit 3bef4cd (the parent of "Training redesign: methods own their parts, one loop, one
state registry, one constructor"), "after" this checkout. Each side runs its own code in its own process (``cwd`` and
``PYTHONPATH`` = its tree). On a machine shared with other jobs, absolute rates move by 2x within minutes (process
CPU time too: contention for caches and cores), so the comparison is made of *pairs* measured at the same moment:

* ``train_step``: one persistent worker per side builds a backbone with that tree's ``bench/train_throughput.py``
  (``ROWS`` and ``make_step``: forward + MSE + backward + fused AdamW, batch 16) and the diffusers DiT of the same
  size; the driver then alternates short bursts (before, after, after, before, ...; ``--bursts`` each) and reports
  the median of the after/before ratios of adjacent bursts. The diffusers model is the same code on both sides: its
  ratio is an A/A control that shows the noise floor of the method. Both workers are pinned to one CPU (only one
  runs at a time): pinned apart, a core shared with a busy foreign job would favour one side throughout.
* ``sampling``: the same ping-pong with the quick-start sampler (the snapshot's own sampler config, Euler with
  CFG 2, at ``SAMPLING_STEPS`` = 30 steps on both sides) through each tree's ``Generator.generate`` on a
  quick-start snapshot that the same tree trained (``train_loop``); 32 images per burst.
* ``train_loop``: the quick start, ``train.py`` with its default config for ``--train-kimg`` kimg (previews,
  evaluation and TensorBoard off; status every kimg), both sides *at the same time* (one thread each, start order
  swapped every repetition): median wall seconds per kimg over the status intervals after the first. This covers
  what the redesign changed in the loop (per-sample random streams, its own DDP/AMP handling instead of accelerate,
  the method and registry layers).

Records go to ``bench/results/redesign.json`` (one per measurement: every burst's rate per side and every pair
ratio); ``bench/tables.py`` builds the README table.

    git worktree add --detach ../before 3bef4cd
    OMP_NUM_THREADS=1 python bench/redesign_throughput.py --before ../before
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
SIDES = ("before", "after")
SAMPLING_STEPS = 30  # the quick start's Euler steps at the time of the redesign (3bef4cd and after it)


def _commit(tree: Path) -> str:
    return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=tree, text=True).strip()


def _env(tree: Path, threads: int) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(tree))


# ----------------------------------------------------------------------------------------------------------
# Workers: run inside the measured tree, set up once, then time one burst per request on stdin


def _serve(bursts: dict[str, Any]) -> None:
    """Answer ``<name>`` lines on stdin with one timed burst each (JSON: wall and CPU seconds)."""
    print("ready", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name == "quit":
            return
        fn, work = bursts[name]
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        print(json.dumps({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "work": work}), flush=True)


def worker_train_step(tree: Path, model: str, steps: int, threads: int) -> None:
    """That tree's train_throughput row: our backbone and the diffusers DiT, ``steps`` steps per burst."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(tree / "bench"))
    import train_throughput as tt  # the measured tree's own bench

    row = tt.ROWS[model]
    build = getattr(tt, "build", None) or tt.build_model  # after / before the one constructor
    g = torch.Generator().manual_seed(0)
    b, c, r = 16, row.channels, row.resolution
    batch = (torch.randn(b, c, r, r, generator=g), torch.rand(b, generator=g),
             torch.randint(0, row.num_classes, (b,), generator=g), torch.randn(b, c, r, r, generator=g))
    torch.manual_seed(0)
    step = {"ours": tt.make_step(build(row.config).train(), "ours", batch),
            "diffusers": tt.make_step(tt.diffusers_reference(row).train(), "diffusers", batch)}
    for s in step.values():  # warm-up
        s()

    def burst(s: Any) -> Any:
        return lambda: [s() for _ in range(steps)]

    _serve({k: (burst(s), steps * b) for k, s in step.items()})


def worker_sampling(run_dir: Path, images: int, threads: int) -> None:
    """The tree's quick-start snapshot through its own Generator and the snapshot's sampler, ``images`` per burst."""
    import torch

    torch.set_num_threads(threads)
    try:
        from pipeline import SamplerSpec, generator_from_snapshot  # after the redesign
    except ImportError:
        from gen.pipeline import SamplerSpec, generator_from_snapshot  # before (3bef4cd)
    snap = sorted(run_dir.glob("snapshot-*.safetensors"))[-1]
    gen, config = generator_from_snapshot(str(snap))
    # Both sides sample the same number of steps: the quick start's sampler went from 30 to 20 steps after the
    # redesign, and each tree's snapshot stores its own.
    spec = SamplerSpec.from_config({**config["sampler"], "steps": SAMPLING_STEPS})
    seeds = list(range(images))
    gen.generate(seeds, spec)  # warm-up
    _serve({"sample": (lambda: gen.generate(seeds, spec), images)})


class Worker:
    """A worker process in one tree."""

    def __init__(self, tree: Path, threads: int, args: list[str], pin: int = -1) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args, "--threads", str(threads),
               "--tree", str(tree), "--pin", str(pin)]
        self.proc = subprocess.Popen(cmd, cwd=tree, env=_env(tree, threads), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        line = self.proc.stdout.readline().strip()  # type: ignore[union-attr]
        if line != "ready":
            raise RuntimeError(f"worker in {tree} failed to start ({line!r}); run {shlex.join(cmd)} to see why")

    def burst(self, name: str) -> dict[str, float]:
        self.proc.stdin.write(name + "\n")  # type: ignore[union-attr]
        return json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]

    def close(self) -> None:
        self.proc.stdin.write("quit\n")  # type: ignore[union-attr]
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(timeout=300)  # interpreter teardown can be slow on a loaded machine
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own worker, its measurements already taken
            self.proc.wait()


def ping_pong(workers: dict[str, Worker], names: Sequence[str], bursts: int) -> dict[str, dict[str, Any]]:
    """Alternate bursts of every ``name`` between the sides (ABBA order); rates and adjacent-pair ratios."""
    out: dict[str, dict[str, Any]] = {n: {s: {"rates": [], "cpu_rates": []} for s in SIDES} for n in names}
    for n in names:
        out[n]["pair_ratios"], out[n]["cpu_pair_ratios"] = [], []
    for i in range(bursts):
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        for n in names:
            got = {}
            for side in order:
                m = workers[side].burst(n)
                got[side] = m
                out[n][side]["rates"].append(m["work"] / m["wall"])
                out[n][side]["cpu_rates"].append(m["work"] / m["cpu"])
            out[n]["pair_ratios"].append(got["before"]["wall"] / got["after"]["wall"])
            out[n]["cpu_pair_ratios"].append(got["before"]["cpu"] / got["after"]["cpu"])
    return out


# ----------------------------------------------------------------------------------------------------------
# Measurements


def measure_train_loop(trees: dict[str, Path], threads: int, kimg: float, reps: int, tmp: Path) -> tuple[dict, dict]:
    """Both sides' quick-start training at the same time, ``reps`` times; returns the record and the run folders."""
    rec: dict[str, Any] = {s: {"rates": [], "cpu_rates": [], "sec_per_kimg": []} for s in SIDES}
    rec["pair_ratios"], rec["cpu_pair_ratios"] = [], []
    run_dirs: dict[str, Path] = {}
    cmd_tail = [f"trainer.total_kimg={kimg:g}", "trainer.status_kimg=1", "trainer.checkpoint_kimg=inf",
                "trainer.snapshot_kimg=inf", "eval=none", "preview.images=0", "trainer.tensorboard=false",
                "trainer.progress=false"]
    for rep in range(reps):
        procs = {}
        for side in (SIDES if rep % 2 == 0 else SIDES[::-1]):
            run_dirs[side] = tmp / f"loop-{side}-{rep}"
            cmd = [sys.executable, "train.py", f"run_dir={run_dirs[side]}", *cmd_tail]
            procs[side] = subprocess.Popen(cmd, cwd=trees[side], env=_env(trees[side], threads),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        rate, cpu_rate = {}, {}
        for side, p in procs.items():
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode != 0:
                raise RuntimeError(f"train.py failed in {trees[side]}: {p.stderr.read()[-3000:]}")  # type: ignore[union-attr]
            rows = [json.loads(x) for x in (run_dirs[side] / "stats.jsonl").read_text().splitlines() if x.strip()]
            secs = [r["sec_per_kimg"] for r in rows if "sec_per_kimg" in r]
            rate[side] = 1000.0 / statistics.median(secs[1:])  # the first interval holds the warm-up
            cpu_rate[side] = kimg * 1000.0 / (usage.ru_utime + usage.ru_stime)  # whole process, start-up included
            rec[side]["rates"].append(rate[side])
            rec[side]["cpu_rates"].append(cpu_rate[side])
            rec[side]["sec_per_kimg"].append(secs)
        rec["pair_ratios"].append(rate["after"] / rate["before"])
        rec["cpu_pair_ratios"].append(cpu_rate["after"] / cpu_rate["before"])
        print(f"train_loop rep {rep}: before {rate['before']:.1f} img/s, after {rate['after']:.1f} img/s", flush=True)
    rec.update({"what": "train_loop", "label": f"quick-start training, train.py (batch 32, {kimg:g} kimg, both at once)",
                "unit": "img/s", "command": shlex.join(["python", "train.py", "run_dir=<run_dir>", *cmd_tail])})
    return rec, run_dirs


def _summary(name: str, res: dict[str, Any]) -> str:
    return (f"{name}: before {statistics.median(res['before']['rates']):.3g}, after "
            f"{statistics.median(res['after']['rates']):.3g}, after/before {statistics.median(res['pair_ratios']):.3f}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, help="checkout of the commit before the redesign (3bef4cd)")
    ap.add_argument("--after", type=Path, default=ROOT, help="checkout after the redesign (default: this one)")
    ap.add_argument("--what", default="train_loop,sampling,train_step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default=TRAIN_STEP_MODELS, help="rows of bench/train_throughput.py in train_step")
    ap.add_argument("--bursts", type=int, default=10, help="bursts per side in train_step and sampling")
    ap.add_argument("--train-steps", type=int, default=2, help="training steps per burst (batch 16)")
    ap.add_argument("--train-kimg", type=float, default=6.0, help="quick-start training length in train_loop")
    ap.add_argument("--loop-reps", type=int, default=3, help="train_loop repetitions (both sides at once)")
    ap.add_argument("--sample-images", type=int, default=32, help="images per sampling burst")
    ap.add_argument("--pin", type=int, default=0,
                    help="CPU that both sides' workers are pinned to (bursts never overlap, so they share it; pinned "
                         "apart, a busier core would favour one side), or -1 to leave placement to the OS")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tree", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        if args.pin >= 0 and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {args.pin})
        kind, *rest = args.worker
        if kind == "train_step":
            worker_train_step(args.tree, rest[0], args.train_steps, args.threads)
        else:
            worker_sampling(Path(rest[0]), args.sample_images, args.threads)
        sys.stdout.flush()
        os._exit(0)  # skip interpreter teardown: freeing the heap took minutes on the loaded machine
    if args.before is None:
        ap.error("--before is required (a checkout of 3bef4cd)")
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    commits = {k: _commit(v) for k, v in trees.items()}
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    print(f"before = {trees['before']} ({commits['before']}), after = {trees['after']} ({commits['after']})", flush=True)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="redesign-") as tmp:
        run_dirs: dict[str, Path] = {}
        if "train_loop" in what or "sampling" in what:
            rec, run_dirs = measure_train_loop(trees, args.threads, args.train_kimg,
                                               args.loop_reps if "train_loop" in what else 1, Path(tmp))
            if "train_loop" in what:
                records.append(rec)
        if "sampling" in what:
            workers = {s: Worker(trees[s], args.threads, ["sampling", str(run_dirs[s])], args.pin) for s in SIDES}
            res = ping_pong(workers, ["sample"], args.bursts)["sample"]
            for w in workers.values():
                w.close()
            records.append({**res, "what": "sampling", "unit": "img/s",
                            "label": f"quick-start sampler (Euler {SAMPLING_STEPS}, CFG 2), Generator.generate, "
                                     f"{args.sample_images} images per burst",
                            "command": "python bench/redesign_throughput.py --what sampling"})
            print(_summary("sampling", res), flush=True)
        if "train_step" in what:
            for model in [m.strip() for m in args.models.split(",") if m.strip()]:
                workers = {s: Worker(trees[s], args.threads, ["train_step", model], args.pin) for s in SIDES}
                res = ping_pong(workers, ["ours", "diffusers"], args.bursts)
                for w in workers.values():
                    w.close()
                for kind, r in res.items():
                    control = kind == "diffusers"
                    records.append({**r, "what": f"train_step/{model}/{kind}", "unit": "img/s", "control": control,
                                    "label": f"train step, {model}, " + (
                                        "diffusers DiT (same code both sides: A/A control)" if control else "ours"),
                                    "command": f"python bench/redesign_throughput.py --what train_step --models {model}"})
                    print(_summary(f"train_step/{model}/{kind}", r), flush=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for r in records:
        r.update({"kind": "throughput", "commits": commits, "threads": args.threads, "date": stamp,
                  "load_1min_end": round(os.getloadavg()[0], 2)})
    data = json.loads(args.results.read_text())["records"] if args.results.exists() else []
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"records": data + records}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(records)} records to {args.results}")


if __name__ == "__main__":
    main()
