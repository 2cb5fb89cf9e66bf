"""Yardstick of checkpoint averaging: raw weights, classic EMAs, EDM2's post-hoc EMA and LCSC on one training run.

The quick start's recipe (``experiment=yardstick_dit``, 96k images) is trained twice per seed with the same
trajectory (the average never feeds back into training): once with classic EMAs of several half-lives, once with
``ema=phema`` (EDM2's power-function EMA, widths 0.05 and 0.10, a snapshot and a raw training state every
``--snapshot-kimg``). Every row is a snapshot scored by the yardstick FID of ``--num-images`` samples (seeds 0..,
Euler 20 steps without guidance, the protocol of ``bench/yardstick.py``), on seeds from 1,000,000, which LCSC's
fitness never sees (its fitness uses seeds 0..); EMA widths and post-hoc widths are picked on that same set:

* ``raw``: the last training state's raw weights (the combiner with coefficient 1);
* ``ema-hl<h>k``: the classic EMAs at the end; the best of them is the baseline;
* ``posthoc-<width>``: the reconstructions of ``--sigma-rel`` at the end (``scripts.posthoc_ema``); the best is kept;
* ``posthoc-<width>@<kimg>``: at each earlier LCSC time, the reconstructions of ``--same-time-sigma-rel`` there:
  LCSC's baseline at equal training;
* ``lcsc@<kimg>``: ``scripts.lcsc`` over the last ``--last`` raw states up to each of ``--lcsc-kimg`` (fitness on
  ``--fitness-images`` samples; the row's FID is the independent re-score on the row's seed set), with the search's
  cost (evaluations, seconds) and its overfitting to the fitness seeds: the winner's gap between fitness FID and
  re-score minus the same gap of the last checkpoint alone (FID's bias from the smaller fitness sample cancels).

"Images saved" is the first LCSC point whose FID reaches the best classic EMA's final FID, against the run length.

The 1-step part (LCSC's headline case, consistency models): ECT (``experiment=yardstick_ect``, ``--ect-kimg``) tuned
from the seed's classic run (its half-life-2k snapshot: the quick start's recipe, the consistency table's teacher),
with a raw training state every 2k images, scored with its own 1-step consistency sampler:

* ``ect-raw``: its last raw weights; ``ect-ema``: its EMA snapshot (half-life 2k images), 1 step;
* ``ect-ema-2step``: the same snapshot with 2 steps (re-noised to sigma 0.821), the NFE LCSC claims to save;
* ``ect-lcsc``: ``scripts.lcsc`` over the last ``--last`` raw states, 1-step fitness and re-score.

    nice -n 10 python bench/yardstick_averaging.py --seeds 0,1 --jobs 2  # about 2 x (2 runs of 96k + the searches)
    python bench/yardstick_averaging.py --estimate                       # what is left and how long; does nothing
    python bench/yardstick_averaging.py --smoke                          # minutes: a tiny model, 1k images
    python bench/yardstick_all.py --benches averaging                    # the same through the one command

Records: ``bench/results/averaging.json`` (``--smoke``: ``averaging_smoke.json``); runs in ``runs/yardstick/averaging``.
With ``--jobs 2`` the runs train two at a time and then the seeds' rows are computed in parallel processes (one
thread each; their logs ``<runs>/rows-s<seed>.log``). Re-running resumes the training runs and the searches; rows
stored with the same settings are read back, not recomputed. Each row is added to the records file as soon as it is
known (under the file's lock: the seeds' processes add in turn), so a stopped run, or a checkout that kept
``bench/results`` but not ``runs/``, keeps every finished row. Only seeds with rows left are trained (again), and a
row is read back only for the training it was made from (``run_sha256``, the run's last snapshot): a seed trained
again on another host differs in float rounding, and one seed's rows must come from one training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from gen.utils.ckpt import atomic_write, file_sha256, list_snapshots, list_training_states, path_lock  # noqa: E402

SMOKE = ["model.depth=2", "model.hidden_size=64", "model.num_heads=2", "trainer.batch_size=32",
         "trainer.lr_warmup_kimg=0.064", "trainer.status_kimg=0.128", "trainer.progress=false", "preview.images=0"]
HALFLIVES = (0.5, 1.0, 2.0, 4.0, 8.0)
SAMPLER = ["--kind", "euler", "--steps", "20", "--cfg", "1"]
ROW_SEEDS = 1_000_000  # every row is scored on seeds from here: scripts.lcsc's re-score set, never its fitness set


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as out:
        code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}); see {log}")


KINDS = ("ema", "phema")
# What a stored row depends on: rows stored under other values are recomputed. The grids (--sigma-rel, --lcsc-kimg,
# --same-time-sigma-rel) are not in it: they only choose which rows exist (a row is keyed by its method and time),
# so a grid extended keeps the rows already made and a grid narrowed drops the rows outside it.
SETTINGS = ("kimg", "snapshot_kimg", "last", "population", "generations", "fitness_images", "num_images", "smoke",
            "ect_kimg")
ECT_STATE_KIMG = 2.0  # the ECT run's raw training states, LCSC's candidates (every 64 steps at batch 32)


def train_command(args: argparse.Namespace, seed: int, kind: str) -> tuple[Path, list[str]]:
    """The seed's run folder with classic EMAs (``ema``) or ``phema``, and the train.py command that trains it."""
    run = Path(args.runs) / f"{kind}-s{seed}"
    every = f"{args.snapshot_kimg:g}"
    ema = (["ema=phema", f"trainer.snapshot_kimg={every}", f"trainer.checkpoint_kimg={every}", "trainer.keep_states=0"]
           if kind == "phema" else [f"ema.halflife_kimg=[{','.join(f'{h:g}' for h in HALFLIVES)}]", "ema.decays=[]",
                                    f"trainer.snapshot_kimg={args.kimg:g}"])
    cmd = [sys.executable, "train.py", "experiment=yardstick_dit", f"seed={seed}", f"run_dir={run}",
           f"trainer.total_kimg={args.kimg:g}", "eval=none", *(SMOKE if args.smoke else []), *ema]
    return run, cmd


def teacher_snapshot(args: argparse.Namespace, seed: int) -> Path:
    """ECT's start: the classic run's half-life-2k average at its end (the quick start's recipe and EMA)."""
    run = train_command(args, seed, "ema")[0]
    return run / f"snapshot-{int(round(args.kimg * 1000)):09d}-hl2k.safetensors"


def ect_command(args: argparse.Namespace, seed: int) -> tuple[Path, list[str]]:
    """The seed's ECT run folder and its train.py command (a raw training state every ``ECT_STATE_KIMG``)."""
    run = Path(args.runs) / f"ect-s{seed}"
    every = f"{ECT_STATE_KIMG if not args.smoke else args.ect_kimg / 4:g}"
    stage = [] if not args.smoke else [f"objective.stage_kimg={args.ect_kimg / 4:g}"]
    cmd = [sys.executable, "train.py", "experiment=yardstick_ect", f"seed={seed}", f"run_dir={run}",
           f"trainer.init={{net: {teacher_snapshot(args, seed)}}}", f"trainer.total_kimg={args.ect_kimg:g}",
           f"trainer.checkpoint_kimg={every}", "trainer.keep_states=0", f"trainer.snapshot_kimg={args.ect_kimg:g}",
           "eval=none", *(SMOKE if args.smoke else []), *stage]
    return run, cmd


def train_all(args: argparse.Namespace, seeds: list[int]) -> None:
    """Train (or resume) every unfinished run, ``--jobs`` at a time, each a single-threaded process: the classic and
    phema runs of every seed, then the ECT runs that start from the classic ones."""
    _train([train_command(args, s, k) for s in seeds for k in KINDS], args)
    if args.ect_kimg > 0:
        _train([ect_command(args, s) for s in seeds], args)


def run_processes(todo: list[tuple[str, list[str], Path]], jobs: int, env: dict[str, str] | None) -> list[str]:
    """Run commands of this repository ``(name, command, log file)``, ``jobs`` at a time, each logging to its file;
    returns ``"<name> (exit <code>; see <log>)"`` for each that failed."""
    running: list[tuple[str, subprocess.Popen[bytes], Any]] = []
    failed = []
    todo = list(todo)
    while todo or running:
        while todo and len(running) < max(jobs, 1):
            name, cmd, log_file = todo.pop(0)
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log = open(log_file, "a")
            running.append((name, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            item[2].close()
            if item[1].returncode != 0:
                failed.append(f"{item[0]} (exit {item[1].returncode}; see {item[2].name})")
    return failed


def _train(todo: list[tuple[Path, list[str]]], args: argparse.Namespace) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1") if args.jobs > 1 else None
    failed = run_processes([(str(run), cmd, run / "bench.log") for run, cmd in todo
                            if not (run / "results.json").exists()], args.jobs, env)
    if failed:
        raise SystemExit(f"training failed: {'; '.join(failed)}")


def fid(snapshot: Path, args: argparse.Namespace, sampler: dict[str, Any] | str = "euler20") -> float:
    """Yardstick FID of a snapshot on the row seed set, disjoint from LCSC's fitness seeds. ``sampler``:
    ``"euler20"`` (Euler 20, no guidance), ``"own"`` (the snapshot's sampler: 1-step consistency for ECT), or a
    ``pipeline.SamplerSpec`` config."""
    from eval.generate import yardstick_metrics
    from eval.generator import snapshot_generate_fn

    if sampler == "euler20":
        gen = snapshot_generate_fn(str(snapshot), kind="euler", steps=20, cfg=1.0)
    elif sampler == "own":
        gen = snapshot_generate_fn(str(snapshot))
    else:
        from pipeline import SamplerSpec, generator_from_snapshot

        net, _ = generator_from_snapshot(str(snapshot))
        spec = SamplerSpec.from_config(dict(sampler))  # type: ignore[arg-type]

        def gen(seeds: list[int]) -> Any:
            return net.generate(seeds, spec)
    return float(yardstick_metrics(gen, args.num_images, "mnist5k", args.cache_dir, seed_offset=ROW_SEEDS)["fid"])


def planned_rows(args: argparse.Namespace) -> list[tuple[str, float]]:
    """(method, kimg) of every row of one seed, in the order they are computed (the 20-step searches last: they
    take most of the time)."""
    return ([("raw", args.kimg)] + [(f"ema-hl{h:g}k", args.kimg) for h in HALFLIVES]
            + [(f"posthoc-{float(v):g}", args.kimg) for v in args.sigma_rel.split(",")]
            + ([(m, args.ect_kimg) for m in ("ect-raw", "ect-ema", "ect-ema-2step", "ect-lcsc")]
               if args.ect_kimg > 0 else [])
            + [(f"posthoc-{w:g}", k) for k in earlier_lcsc_kimg(args) for w in same_time_widths(args)]
            + [("lcsc", float(v)) for v in args.lcsc_kimg.split(",")])


def earlier_lcsc_kimg(args: argparse.Namespace) -> list[float]:
    """LCSC's search times before the run's end: each gets post-hoc EMAs of its own time as LCSC's baseline there."""
    return [float(v) for v in args.lcsc_kimg.split(",") if float(v) < args.kimg]


def same_time_widths(args: argparse.Namespace) -> list[float]:
    """The post-hoc widths reconstructed at each of :func:`earlier_lcsc_kimg`."""
    return [float(v) for v in args.same_time_sigma_rel.split(",") if v.strip()]


def stored_rows(out: Path, args: argparse.Namespace) -> dict[tuple[int, str, float], dict[str, Any]]:
    """Rows already in the records file, by (seed, method, kimg), if they were computed with the same settings and
    are among the rows ``args`` plans."""
    if not out.exists():
        return {}
    data = json.loads(out.read_text())
    settings = data.get("settings", {})
    if any(settings.get(k) != getattr(args, k) for k in SETTINGS):
        return {}
    planned = {(m, float(k)) for m, k in planned_rows(args)}
    return {(int(r["seed"]), r["method"], float(r["kimg"])): r for r in data.get("records", [])
            if (r["method"], float(r["kimg"])) in planned}


def rows_for_seed(args: argparse.Namespace, seed: int,
                  done: dict[tuple[int, str, float], dict[str, Any]] | None = None,
                  on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Every row of one training seed (both runs trained); rows in ``done`` made from these trainings of the runs
    (``run_sha256``) are read back, not recomputed, and each newly computed row is passed to ``on_row`` (with its
    seed) as soon as it is known."""
    done = done or {}
    if all((seed, m, k) in done for m, k in planned_rows(args)):
        return [done[(seed, m, k)] for m, k in planned_rows(args)]

    classic, phema = (train_command(args, seed, kind)[0] for kind in KINDS)
    rows: list[dict[str, Any]] = []
    identities: dict[Path, str] = {}

    def identity(run: Path) -> str:
        if run not in identities:
            identities[run] = run_identity(run)
        return identities[run]

    def stored(method: str, kimg: float, run: Path) -> dict[str, Any] | None:
        """A stored row, if it was made from this training of ``run`` (else it is made again)."""
        old = done.get((seed, method, float(kimg)))
        return old if old is not None and old.get("run_sha256") == identity(run) else None

    def new(row: dict[str, Any]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row({"seed": seed, **row})

    def add(method: str, kimg: float, run: Path, snapshot: Callable[[], Path],
            sampler: dict[str, Any] | str = "euler20") -> None:
        old = stored(method, kimg, run)
        if old is not None:
            rows.append(old)
        else:
            new({"method": method, "kimg": kimg, "fid": fid(snapshot(), args, sampler), "run_sha256": identity(run)})

    add("raw", args.kimg, phema, lambda: raw_weights(phema))
    end = list_snapshots(classic)[-1][0]
    for h in HALFLIVES:
        name = f"hl{h:g}k"
        snap = classic / (f"snapshot-{end:09d}.safetensors" if h == HALFLIVES[0] else
                          f"snapshot-{end:09d}-{name}.safetensors")
        add(f"ema-{name}", args.kimg, classic, lambda snap=snap: snap)
    sigmas = [float(v) for v in args.sigma_rel.split(",")]
    if any(stored(f"posthoc-{s:g}", args.kimg, phema) is None for s in sigmas):
        _run([sys.executable, "-m", "scripts.posthoc_ema", str(phema), "--sigma-rel", args.sigma_rel],
             phema / "bench.log")
    last = list_snapshots(phema)[-1][0]
    for sigma in sigmas:
        add(f"posthoc-{sigma:g}", args.kimg, phema,
            lambda sigma=sigma: phema / f"posthoc-{last:09d}-sigma{sigma:g}.safetensors")
    # The 1-step rows first: their search samples one step, not 20, so a stopped bench has them early.
    if args.ect_kimg > 0:
        from yardstick_consistency import consistency_sampler  # the consistency table's samplers

        ect, k = ect_command(args, seed)[0], args.ect_kimg
        end = list_snapshots(ect)[-1][1]
        add("ect-raw", k, ect, lambda: raw_weights(ect), "own")
        add("ect-ema", k, ect, lambda: end, "own")
        add("ect-ema-2step", k, ect, lambda: end, consistency_sampler((0.821,)))
        old = stored("ect-lcsc", k, ect)
        if old is not None:
            rows.append(old)
        else:  # no sampler flags: the snapshot's own, 1-step consistency sampling
            new({"method": "ect-lcsc", "kimg": k, **lcsc(ect, k, args, []), "run_sha256": identity(ect)})
    # LCSC's baseline at each earlier search time: the post-hoc EMAs of that time (the run's end has the full grid).
    earlier, widths = earlier_lcsc_kimg(args), same_time_widths(args)
    if any(stored(f"posthoc-{w:g}", k, phema) is None for k in earlier for w in widths):
        _run([sys.executable, "-m", "scripts.posthoc_ema", str(phema), "--sigma-rel", args.same_time_sigma_rel,
              "--at-kimg", ",".join(f"{k:g}" for k in earlier)], phema / "bench.log")
    for k in earlier:
        for w in widths:
            add(f"posthoc-{w:g}", k, phema,
                lambda w=w, k=k: phema / f"posthoc-{round(k * 1000):09d}-sigma{w:g}.safetensors")
    for k in [float(v) for v in args.lcsc_kimg.split(",")]:
        old = stored("lcsc", k, phema)
        if old is not None:
            rows.append(old)
            continue
        new({"method": "lcsc", "kimg": k, **lcsc(phema, k, args, SAMPLER), "run_sha256": identity(phema)})
    return [{"seed": seed, **r} for r in rows]


def run_identity(run: Path) -> str:
    """SHA-256 of the run's last snapshot. Two trainings of one seed differ in float rounding from host to host (the
    quick start: FID 8.0 on one, 8.1 on another), so a row made from one training is not read back for another: a
    checkout without ``runs/`` trains the seed again, and the rows of one seed must come from one training."""
    return file_sha256(list_snapshots(run)[-1][1])


def raw_weights(run: Path) -> Path:
    """The run's last raw training weights as a snapshot (the combiner with coefficient 1), ``<run>/raw.safetensors``."""
    from gen.averaging import combine

    out = run / "raw.safetensors"
    combine([list_training_states(run)[-1][1]], [1.0], list_snapshots(run)[-1][1], out, {"method": "raw"})
    return out


def lcsc(run: Path, kimg: float, args: argparse.Namespace, sampler: list[str]) -> dict[str, Any]:
    """``scripts.lcsc`` over the run's last ``--last`` raw states up to ``kimg``: the re-scored FID (the row's), the
    fitness FID, the last state alone on both seed sets, and the search's cost."""
    out = run / f"lcsc-{kimg:g}k.safetensors"
    t0 = time.time()
    _run([sys.executable, "-m", "scripts.lcsc", str(run), "--source", "states", "--last", str(args.last),
          "--at-kimg", f"{kimg:g}", "--fitness-images", str(args.fitness_images), "--rescore-images",
          str(args.num_images), "--population", str(args.population), "--generations", str(args.generations),
          "--out", str(out), *sampler, *_cache(args)], run / "bench.log")
    rec = json.loads(out.with_suffix(".json").read_text())
    return {"fid": rec["rescore_fid"], "fitness_fid": rec["fitness_fid"], "last_alone_fid": rec["last_rescore_fid"],
            "last_alone_fitness_fid": rec["last_fitness_fid"], "evaluations": rec["evaluations"],
            "search_seconds": rec["search_seconds"], "wall_seconds_this_call": time.time() - t0}


def _cache(args: argparse.Namespace) -> list[str]:
    return ["--cache-dir", args.cache_dir] if args.cache_dir else []


def summary(rows: list[dict[str, Any]], kimg: float) -> list[str]:
    """Markdown lines: per seed the raw, best EMA, best post-hoc and LCSC FIDs, and the images LCSC saves."""
    # Overfitting to the fitness seeds: (fitness - re-score) of the winner minus the same gap of the last checkpoint
    # alone; FID's bias from the smaller fitness sample is in both gaps and cancels.
    lines = ["| seed | raw | best EMA | best post-hoc | LCSC (final) | LCSC overfit | images saved |",
             "|---|---|---|---|---|---|---|"]
    for seed in sorted({r["seed"] for r in rows}):
        mine = [r for r in rows if r["seed"] == seed]

        def best(prefix: str, mine: list[dict[str, Any]] = mine) -> dict[str, Any]:  # at the run's end
            return min((r for r in mine if r["method"].startswith(prefix) and float(r["kimg"]) == kimg),
                       key=lambda r: r["fid"])

        ema, post = best("ema-"), best("posthoc-")
        lcsc = sorted((r for r in mine if r["method"] == "lcsc"), key=lambda r: r["kimg"])
        final = lcsc[-1]
        reach = next((r["kimg"] for r in lcsc if r["fid"] <= ema["fid"]), None)
        saved = "not reached" if reach is None else f"{1 - reach / kimg:.0%} ({reach:g} of {kimg:g} kimg)"
        raw = next(r for r in mine if r["method"] == "raw")
        lines.append(f"| {seed} | {raw['fid']:.2f} | {ema['fid']:.2f} ({ema['method'][4:]}) | {post['fid']:.2f} "
                     f"({post['method'][8:]}) | {final['fid']:.2f} | {fitness_gap(final):+.2f} | "
                     f"{saved} |")
    ect = [r for r in rows if r["method"].startswith("ect-")]
    if ect:
        lines += ["", "1-step consistency model (ECT): FID at 1 step unless named",
                  "| seed | raw | EMA | EMA, 2 steps | LCSC | LCSC overfit |", "|---|---|---|---|---|---|"]
        for seed in sorted({r["seed"] for r in ect}):
            by = {r["method"]: r for r in ect if r["seed"] == seed}
            if len(by) < 4:
                continue
            lines.append(f"| {seed} | {by['ect-raw']['fid']:.2f} | {by['ect-ema']['fid']:.2f} | "
                         f"{by['ect-ema-2step']['fid']:.2f} | {by['ect-lcsc']['fid']:.2f} | "
                         f"{fitness_gap(by['ect-lcsc']):+.2f} |")
    return lines


def fitness_gap(row: dict[str, Any]) -> float:
    """How much better an LCSC winner scores on the fitness seeds than on the row seeds, beyond the same gap of the
    last checkpoint alone (FID's small-sample bias cancels): negative = the search fitted its own seed set."""
    return (row["fitness_fid"] - row["fid"]) - (row["last_alone_fitness_fid"] - row["last_alone_fid"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--kimg", type=float, default=96.0)
    p.add_argument("--snapshot-kimg", type=float, default=4.0)
    p.add_argument("--sigma-rel", default="0.01,0.015,0.02,0.04,0.06,0.08,0.1,0.13,0.16,0.2,0.25")
    p.add_argument("--lcsc-kimg", default="24,48,72,96", help="times at which LCSC searches (images-saved curve)")
    p.add_argument("--same-time-sigma-rel", default="0.005,0.01,0.02,0.05,0.1",
                   help="post-hoc widths reconstructed at each earlier LCSC time (LCSC's baseline at equal training; "
                        "0.05 and 0.1 are the tracked profiles themselves)")
    p.add_argument("--ect-kimg", type=float, default=32.0,
                   help="the 1-step part: ECT tuned this long from each seed's classic run (0 skips it)")
    p.add_argument("--last", type=int, default=6)
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--fitness-images", type=int, default=500)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--runs", default=str(ROOT / "runs" / "yardstick" / "averaging"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder of the records file")
    p.add_argument("--out", default=None, help="records file (default <results>/averaging.json)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (single-threaded each when > 1)")
    p.add_argument("--estimate", action="store_true", help="print what is left and its estimated time; do nothing")
    p.add_argument("--sec-per-kimg", type=float, default=10.0, help="estimate: training speed where none is measured")
    p.add_argument("--sec-per-eval", type=float, default=60.0, help="estimate: seconds per 1,000-sample FID")
    p.add_argument("--smoke", action="store_true", help="a tiny model for 1.024k images: checks the pipeline only")
    p.add_argument("--part", action="store_true", help=argparse.SUPPRESS)  # one seed's rows, for compute_parallel
    args = p.parse_args(argv)
    if args.smoke:
        args.kimg, args.snapshot_kimg, args.lcsc_kimg, args.last = 1.024, 0.128, "0.512,1.024", 3
        args.population, args.generations, args.fitness_images, args.num_images = 4, 1, 160, 200
        args.sigma_rel, args.same_time_sigma_rel, args.runs = "0.05,0.15", "0.05", str(Path(args.runs) / "smoke")
        args.ect_kimg = 0.512 if args.ect_kimg > 0 else 0.0
    return args


def seeds_left(args: argparse.Namespace, seeds: list[int],
               done: dict[tuple[int, str, float], dict[str, Any]]) -> list[int]:
    """The seeds with a planned row not stored: only their runs are trained (again, in a checkout without runs/)."""
    return [s for s in seeds if any((s, m, k) not in done for m, k in planned_rows(args))]


def estimate(args: argparse.Namespace, seeds: list[int], done: dict[tuple[int, str, float], dict[str, Any]]) -> float:
    """Seconds left: training images left per run at its measured s/kimg (else ``--sec-per-kimg``) over the jobs,
    plus the missing rows' FIDs and LCSC searches at ``--sec-per-eval`` per 1,000 samples (seeds ``--jobs`` at a
    time)."""
    train_s, eval_s = 0.0, 0.0
    per_eval = args.sec_per_eval * args.num_images / 1000
    per_fitness = args.sec_per_eval * args.fitness_images / 1000
    for seed in seeds_left(args, seeds, done):
        runs = [(train_command(args, seed, kind)[0], args.kimg) for kind in KINDS]
        if args.ect_kimg > 0:
            runs.append((ect_command(args, seed)[0], args.ect_kimg))
        for run, kimg in runs:
            if (run / "results.json").exists():
                continue
            states = list_training_states(run) if run.is_dir() else []
            left = kimg - (states[-1][0] / 1000 if states else 0.0)
            stats = run / "stats.jsonl"
            speeds = [json.loads(x).get("sec_per_kimg") for x in stats.read_text().splitlines()] if stats.exists() else []
            speed = statistics.median([v for v in speeds if v]) if any(speeds) else args.sec_per_kimg
            train_s += left * speed
            print(f"{run.name:12s} {left:7.1f} kimg left at {speed:.1f} s/kimg")
        missing = [(m, k) for m, k in planned_rows(args) if (seed, m, k) not in done]
        searches = sum(m in ("lcsc", "ect-lcsc") for m, _ in missing)
        eval_s += len(missing) * per_eval + searches * args.population * args.generations * per_fitness
        print(f"seed {seed}: {len(missing)} rows missing ({searches} LCSC searches)")
    return train_s / max(args.jobs, 1) + eval_s / max(min(args.jobs, len(seeds)), 1)  # seeds evaluate in parallel


def _write(path: Path, rows: list[dict[str, Any]], settings: dict[str, Any]) -> None:
    text = json.dumps({"records": rows, "settings": settings}, indent=1)  # "records" as every results file
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_row(out: Path, row: dict[str, Any], args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Add one row (with its seed) to the records file as soon as it is known, under the file's build lock.

    The records file is the only copy that outlives ``runs/`` (a new checkout keeps ``bench/results``), and seeds
    computed in parallel processes add their rows to it in turn. Rows stored under other settings are dropped.
    """
    with path_lock(out):
        rows = stored_rows(out, args)
        rows[(int(row["seed"]), row["method"], float(row["kimg"]))] = row
        _write(out, list(rows.values()), settings)


def compute_seed(args: argparse.Namespace, seed: int, out: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One seed's rows, each added to the records file as soon as it is known."""
    rows = rows_for_seed(args, seed, stored_rows(out, args), lambda row: save_row(out, row, args, settings))
    return [{"seed": seed, **r} for r in rows]


def compute_parallel(argv: list[str], seeds: list[int], jobs: int, out: Path, runs: Path) -> list[str]:
    """Every seed's rows in its own single-threaded process, ``jobs`` at a time (this script with ``--part``); the
    evaluations are most of this bench's time, and two 1-thread processes are the yardstick's fastest layout on 2
    cores. Returns the seeds whose process failed."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    script = str(Path(__file__).resolve())
    return run_processes([(f"seed {seed}", [sys.executable, script, *argv, "--seeds", str(seed), "--jobs", "1",
                                            "--part", "--out", str(out)], runs / f"rows-s{seed}.log")
                          for seed in seeds], jobs, env)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out) if args.out else Path(args.results) / ("averaging_smoke.json" if args.smoke else
                                                                 "averaging.json")
    if args.estimate:
        print(f"ESTIMATE_SECONDS={estimate(args, seeds, stored_rows(out, args)):.0f}")
        return
    settings = {k: v for k, v in vars(args).items() if k not in ("estimate", "jobs", "part", "out", "seeds")}
    if args.part:  # one seed's rows for compute_parallel: the training is done, each row is saved as it comes
        compute_seed(args, seeds[0], out, settings)
        return
    train_all(args, seeds_left(args, seeds, stored_rows(out, args)))
    failed: list[str] = []
    if args.jobs > 1 and len(seeds) > 1:
        Path(args.runs).mkdir(parents=True, exist_ok=True)
        failed = compute_parallel(argv, seeds, args.jobs, out, Path(args.runs))
    else:
        for seed in seeds:
            compute_seed(args, seed, out, settings)
    done = stored_rows(out, args)
    rows = [done[(s, m, k)] for s in seeds for m, k in planned_rows(args) if (s, m, k) in done]
    kept = [r for (s, _, _), r in done.items() if s not in seeds]
    with path_lock(out):
        _write(out, rows + kept, settings)  # the rows in table order, other seeds' rows after them
    if failed:
        raise SystemExit(f"rows failed: {'; '.join(failed)}; re-run the same command to resume")
    print("\n".join(summary(rows, args.kimg)))


if __name__ == "__main__":
    main()
