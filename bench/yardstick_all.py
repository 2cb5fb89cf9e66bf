"""Every yardstick table from scratch, or the rest of a stopped run: one command (protocol v2, bench/README.md).

    python bench/yardstick_all.py --estimate        # what is left and how long it should take; does nothing
    nice -n 10 python bench/yardstick_all.py        # train, evaluate, then rebuild the tables and plots
    python bench/yardstick_all.py --benches backbones,alignment --jobs 2

It prints the estimated time first, then runs every (bench, row, seed) worker of the harness benches
(``bench/yardstick_backbones.py``, ``bench/yardstick_alignment.py``, ...) ``--jobs`` at a time, each a
single-threaded subprocess of its bench script restricted to that row and seed, then the benches with their own
drivers: the tokenizer sweep (``bench/yardstick_tokenizers.py``, which has its own preparation steps) and checkpoint
averaging (``bench/yardstick_averaging.py``, training runs then searches), then ``bench/tables.py``. Everything is
cached or resumable: trained runs and stored records are not repeated, a killed training resumes from its newest
state, so re-running the same command continues where it stopped. Rows that several benches share (the alignment
table's plain DiT and LightningDiT are the backbone table's runs) train once: two workers whose runs share a folder
are never started together, and the harness's folder lock guards the rest.

The estimate counts the training images left per run (from the newest training state in its folder) at the s/kimg
measured in that folder's ``stats.jsonl`` (else in any run of the same row, else ``--sec-per-kimg``), plus one
evaluation per missing record at ``--sec-per-eval``, divided over the jobs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import yardstick  # noqa: E402

# The harness benches in the order they run (the backbone runs first: alignment reuses two of them).
HARNESS_BENCHES = {"backbones": "yardstick_backbones", "alignment": "yardstick_alignment", "consistency": "yardstick_consistency",
                   "curriculum": "yardstick_curriculum", "scoreaug": "yardstick_scoreaug", "distill": "yardstick_distill"}
# Benches with their own driver, run after the harness benches with --jobs; each has --estimate.
DRIVER_BENCHES = {"tokenizers": "bench/yardstick_tokenizers.py", "averaging": "bench/yardstick_averaging.py"}


@dataclass
class Task:
    """One (bench, row, seed) worker of a harness bench and what it still has to do."""

    bench: yardstick.Bench
    run: yardstick.Run
    train_kimg: float
    evals: int

    @property
    def name(self) -> str:
        return f"{self.bench.name}/{self.run.row.method}-s{self.run.seed}"


def missing_evals(bench: yardstick.Bench, run: yardstick.Run, num_images: int, store: yardstick.Store) -> int:
    """Records of this (row, seed) that are not stored yet (every variant at its points, plus timing groups)."""
    keys = {r.get("key") for r in store.records()}
    n = 0
    for v in bench.variants:
        if v.methods is not None and run.row.method not in v.methods:
            continue
        for k in run.kimg if v.at == "all" else (max(run.kimg),):
            n += yardstick._eval_key(bench.name, run.row, run.seed, k, v, num_images) not in keys
    timed = {r.get("group") for r in store.records() if r.get("kind") == "timing" and r.get("method") == run.row.method
             and r.get("seed") == run.seed}
    n += sum(1 for g in bench.timing if (g.methods is None or run.row.method in g.methods) and g.name not in timed)
    return n


def measured_sec_per_kimg(run_dirs: Sequence[Path]) -> float | None:
    """Median s/kimg logged in the first of ``run_dirs`` that has any (this run, else a sibling of the same row)."""
    for d in run_dirs:
        stats = d / "stats.jsonl"
        if stats.exists():
            vals = [json.loads(x).get("sec_per_kimg") for x in stats.read_text().splitlines() if x.strip()]
            vals = [v for v in vals if v]
            if vals:
                return statistics.median(vals)
    return None


def plan(args: argparse.Namespace) -> list[Task]:
    """The workers of every selected harness bench, seed-major, with the work each has left."""
    tasks = []
    for name in [b for b in args.benches if b in HARNESS_BENCHES]:
        bench = importlib.import_module(HARNESS_BENCHES[name]).BENCH
        store = yardstick.Store(args.results / f"{bench.name}.json")
        seeds = sorted(set(bench.seeds).union(*(r.seeds or () for r in bench.rows)))
        for seed in seeds:  # seed-major; a row with its own seeds (a third where ranges overlap) is planned at those
            for row in [r for r in bench.rows if seed in (r.seeds or bench.seeds)]:
                run = yardstick.make_run(bench, row, seed, bench.kimg, args.runs.resolve())
                tasks.append(Task(bench, run, run.remaining_kimg(), missing_evals(bench, run, args.num_images, store)))
    return tasks


def needed(tasks: Sequence[Task]) -> list[Task]:
    """The workers that still owe a record, and those whose run folder such a worker starts from (transitively).

    A worker whose records are all stored has nothing to do even where its training state is gone (a new checkout
    keeps the records, not ``runs/``): it trains again only when a worker that owes records starts from its snapshot.
    """
    keep = {id(t) for t in tasks if t.evals}
    by_dir: dict[Path, list[Task]] = {}
    for t in tasks:
        by_dir.setdefault(t.run.run_dir, []).append(t)
    todo = [t for t in tasks if id(t) in keep]
    while todo:
        t = todo.pop()
        if t.run.init is None:
            continue
        for src in by_dir.get(t.run.init.parent, []):
            if id(src) not in keep:
                keep.add(id(src))
                todo.append(src)
    return [t for t in tasks if id(t) in keep]


def estimate(tasks: Sequence[Task], args: argparse.Namespace) -> float:
    """Estimated seconds of the harness part; prints one line per worker with work left."""
    total, seen = 0.0, set()
    print(f"{'worker':44s} {'kimg left':>9s} {'s/kimg':>7s} {'evals':>5s} {'est. min':>8s}")
    for t in tasks:
        shared = t.run.run_dir in seen  # a shared run is trained once
        seen.add(t.run.run_dir)
        kimg = 0.0 if shared else t.train_kimg
        if not kimg and not t.evals:
            continue
        siblings = [t.run.run_dir, *sorted(t.run.run_dir.parent.glob(f"{t.run.row.method}-s*"))]
        spk = measured_sec_per_kimg(siblings) or t.run.row.sec_per_kimg or args.sec_per_kimg
        sec = kimg * spk + t.evals * args.sec_per_eval
        total += sec
        print(f"{t.name:44s} {kimg:9.1f} {spk:7.1f} {t.evals:5d} {sec / 60:8.1f}")
    return total / max(args.jobs, 1)


def driver_estimate(script: str, args: argparse.Namespace) -> float | None:
    """A driver bench's own estimate (its ``--estimate`` prints ``ESTIMATE_SECONDS=<n>``), or None."""
    out = subprocess.run([sys.executable, script, "--estimate", f"--jobs={args.jobs}"], cwd=ROOT, text=True,
                         capture_output=True, env=_env(args))
    found = re.findall(r"ESTIMATE_SECONDS=([0-9.]+)", out.stdout)
    if out.returncode != 0 or not found:
        print(f"[estimate] {script} gave no estimate (exit {out.returncode}): {out.stderr.strip()[-300:]}")
        return None
    return float(found[-1])


def _env(args: argparse.Namespace) -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))


def folders(task: Task) -> set[Path]:
    """The run folders a worker trains in: its own, and the one its start snapshot comes from (trained first)."""
    return {task.run.run_dir} | ({task.run.init.parent} if task.run.init is not None else set())


def pick(pending: Sequence[Task], busy: set[Path]) -> Task | None:
    """The first pending worker none of whose run folders a running worker holds (None: wait).

    A worker whose run folder another pending worker starts from (a teacher still to train) goes before the rest:
    its dependants wait on it, so starting it late leaves a slot idle at the end.
    """
    free = [t for t in pending if not folders(t) & busy]
    needed = {t.run.init.parent for t in pending if t.run.init is not None}
    return next((t for t in free if t.run.run_dir in needed), free[0] if free else None)


def run_tasks(tasks: Sequence[Task], args: argparse.Namespace) -> list[str]:
    """Run the workers ``--jobs`` at a time; two workers sharing a run folder never run together."""
    pending = [t for t in tasks if t.train_kimg or t.evals]
    running: list[tuple[Task, subprocess.Popen, object]] = []
    failed = []
    while pending or running:
        busy = set().union(*(folders(t) for t, _, _ in running))
        while len(running) < args.jobs:
            nxt = pick(pending, busy)
            if nxt is None:
                break
            pending.remove(nxt)
            busy |= folders(nxt)
            log = args.runs.resolve() / nxt.bench.name / f"{nxt.run.row.method}-s{nxt.run.seed}.worker.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, nxt.bench.script, f"--methods={nxt.run.row.method}", f"--seeds={nxt.run.seed}",
                   f"--num-images={args.num_images}", f"--runs={args.runs}", f"--results={args.results}",
                   f"--threads={args.threads}", "--jobs=1"]
            print(f"[worker] {nxt.name} started (log {yardstick.rel_path(log)})", flush=True)
            fh = open(log, "a")
            running.append((nxt, subprocess.Popen(cmd, cwd=ROOT, env=_env(args), stdout=fh, stderr=subprocess.STDOUT), fh))
        time.sleep(5)
        for item in list(running):
            task, proc, fh = item
            if proc.poll() is None:
                continue
            fh.close()  # type: ignore[attr-defined]
            running.remove(item)
            print(f"[worker] {task.name} finished (exit {proc.returncode})", flush=True)
            if proc.returncode != 0:
                failed.append(task.name)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benches", default=",".join([*HARNESS_BENCHES, *DRIVER_BENCHES]),
                    help=f"which tables (comma list of {[*HARNESS_BENCHES, *DRIVER_BENCHES]})")
    ap.add_argument("--jobs", type=int, default=2, help="workers at a time, each a single-threaded process")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--num-images", type=int, default=yardstick.DEFAULT_NUM_IMAGES, help="samples per FID")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "yardstick", help="root of the run folders")
    ap.add_argument("--results", type=Path, default=yardstick.RESULTS_DIR, help="folder of the records")
    ap.add_argument("--sec-per-kimg", type=float, default=10.0,
                    help="training s/kimg per worker where no run has measured it (quick-start size, 1 thread)")
    ap.add_argument("--sec-per-eval", type=float, default=75.0, help="seconds per evaluation record (estimate)")
    ap.add_argument("--estimate", action="store_true", help="print the estimate and stop")
    args = ap.parse_args(argv)
    args.benches = [b.strip() for b in args.benches.split(",") if b.strip()]
    unknown = [b for b in args.benches if b not in HARNESS_BENCHES and b not in DRIVER_BENCHES]
    if unknown:
        ap.error(f"unknown benches {unknown}; known: {[*HARNESS_BENCHES, *DRIVER_BENCHES]}")
    tasks = needed(plan(args))
    seconds = estimate(tasks, args)
    print(f"[estimate] harness benches: {seconds / 3600:.1f} h with {args.jobs} jobs")
    drivers = [b for b in args.benches if b in DRIVER_BENCHES]
    for b in drivers:
        extra = driver_estimate(DRIVER_BENCHES[b], args)
        if extra is not None:
            print(f"[estimate] {b}: {extra / 3600:.1f} h")
            seconds += extra
    print(f"[estimate] total: {seconds / 3600:.1f} h on this machine (s/kimg as measured so far)", flush=True)
    if args.estimate:
        return 0
    failed = run_tasks(tasks, args)
    for b in drivers:
        code = subprocess.call([sys.executable, DRIVER_BENCHES[b], f"--jobs={args.jobs}", f"--runs={args.runs / b}",
                                f"--results={args.results}"], cwd=ROOT, env=_env(args))
        if code != 0:
            failed.append(b)
    subprocess.call([sys.executable, "bench/tables.py"], cwd=ROOT, env=_env(args))
    if failed:
        print(f"[yardstick_all] failed: {failed} (see their worker logs); re-run the same command to retry")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
