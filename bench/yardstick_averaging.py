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
* ``lcsc@<kimg>``: ``scripts.lcsc`` over the last ``--last`` raw states up to each of ``--lcsc-kimg`` (fitness on
  ``--fitness-images`` samples; the row's FID is the independent re-score on the row's seed set), with the search's
  cost (evaluations, seconds) and its overfitting to the fitness seeds: the winner's gap between fitness FID and
  re-score minus the same gap of the last checkpoint alone (FID's bias from the smaller fitness sample cancels).

"Images saved" is the first LCSC point whose FID reaches the best classic EMA's final FID, against the run length.

    nice -n 10 python bench/yardstick_averaging.py --seeds 0,1           # about 2 x (2 runs of 96k + the searches)
    python bench/yardstick_averaging.py --smoke                          # minutes: a tiny model, 1k images

Records: ``bench/results/averaging.json`` (``--smoke``: ``averaging_smoke.json``); runs in ``runs/yardstick/averaging``.
Re-running resumes the training runs and the searches; finished rows are read back, not recomputed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from gen.utils.ckpt import atomic_write, list_snapshots, list_training_states  # noqa: E402

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


def train(args: argparse.Namespace, seed: int, kind: str) -> Path:
    """Train (or resume, or leave finished) the seed's run with classic EMAs (``ema``) or ``phema``."""
    run = Path(args.runs) / f"{kind}-s{seed}"
    every = f"{args.snapshot_kimg:g}"
    ema = (["ema=phema", f"trainer.snapshot_kimg={every}", f"trainer.checkpoint_kimg={every}", "trainer.keep_states=0"]
           if kind == "phema" else [f"ema.halflife_kimg=[{','.join(f'{h:g}' for h in HALFLIVES)}]", "ema.decays=[]",
                                    f"trainer.snapshot_kimg={args.kimg:g}"])
    cmd = [sys.executable, "train.py", "experiment=yardstick_dit", f"seed={seed}", f"run_dir={run}",
           f"trainer.total_kimg={args.kimg:g}", "eval=none", *(SMOKE if args.smoke else []), *ema]
    if not (run / "results.json").exists():
        _run(cmd, run / "bench.log")
    return run


def fid(snapshot: Path, args: argparse.Namespace) -> float:
    """Yardstick FID of a snapshot on the row seed set (Euler 20, no guidance), disjoint from LCSC's fitness seeds."""
    from eval.generate import yardstick_metrics
    from eval.generator import snapshot_generate_fn

    gen = snapshot_generate_fn(str(snapshot), kind="euler", steps=20, cfg=1.0)
    return float(yardstick_metrics(gen, args.num_images, "mnist5k", args.cache_dir, seed_offset=ROW_SEEDS)["fid"])


def rows_for_seed(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    """Every row of one training seed."""
    from gen.averaging import combine

    classic, phema = train(args, seed, "ema"), train(args, seed, "phema")
    rows: list[dict[str, Any]] = []
    raw = phema / "raw.safetensors"
    combine([list_training_states(phema)[-1][1]], [1.0], list_snapshots(phema)[-1][1], raw, {"method": "raw"})
    rows.append({"method": "raw", "kimg": args.kimg, "fid": fid(raw, args)})
    end = list_snapshots(classic)[-1][0]
    for h in HALFLIVES:
        name = f"hl{h:g}k"
        snap = classic / (f"snapshot-{end:09d}.safetensors" if h == HALFLIVES[0] else
                          f"snapshot-{end:09d}-{name}.safetensors")
        rows.append({"method": f"ema-{name}", "kimg": args.kimg, "fid": fid(snap, args)})
    _run([sys.executable, "-m", "scripts.posthoc_ema", str(phema), "--sigma-rel", args.sigma_rel],
         phema / "bench.log")
    last = list_snapshots(phema)[-1][0]
    for sigma in [float(v) for v in args.sigma_rel.split(",")]:
        snap = phema / f"posthoc-{last:09d}-sigma{sigma:g}.safetensors"
        rows.append({"method": f"posthoc-{sigma:g}", "kimg": args.kimg, "fid": fid(snap, args)})
    for k in [float(v) for v in args.lcsc_kimg.split(",")]:
        out = phema / f"lcsc-{k:g}k.safetensors"
        t0 = time.time()
        _run([sys.executable, "-m", "scripts.lcsc", str(phema), "--source", "states", "--last", str(args.last),
              "--at-kimg", f"{k:g}", "--fitness-images", str(args.fitness_images), "--rescore-images",
              str(args.num_images), "--population", str(args.population), "--generations", str(args.generations),
              "--out", str(out), *SAMPLER, *_cache(args)], phema / "bench.log")
        rec = json.loads(out.with_suffix(".json").read_text())
        rows.append({"method": "lcsc", "kimg": k, "fid": rec["rescore_fid"], "fitness_fid": rec["fitness_fid"],
                     "last_alone_fid": rec["last_rescore_fid"], "last_alone_fitness_fid": rec["last_fitness_fid"],
                     "evaluations": rec["evaluations"],
                     "search_seconds": rec["search_seconds"], "wall_seconds_this_call": time.time() - t0})
    return [{"seed": seed, **r} for r in rows]


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

        def best(prefix: str, mine: list[dict[str, Any]] = mine) -> dict[str, Any]:
            return min((r for r in mine if r["method"].startswith(prefix)), key=lambda r: r["fid"])

        ema, post = best("ema-"), best("posthoc-")
        lcsc = sorted((r for r in mine if r["method"] == "lcsc"), key=lambda r: r["kimg"])
        final = lcsc[-1]
        reach = next((r["kimg"] for r in lcsc if r["fid"] <= ema["fid"]), None)
        saved = "not reached" if reach is None else f"{1 - reach / kimg:.0%} ({reach:g} of {kimg:g} kimg)"
        raw = next(r for r in mine if r["method"] == "raw")
        lines.append(f"| {seed} | {raw['fid']:.2f} | {ema['fid']:.2f} ({ema['method'][4:]}) | {post['fid']:.2f} "
                     f"({post['method'][8:]}) | {final['fid']:.2f} | {_overfit(final):+.2f} | "
                     f"{saved} |")
    return lines


def _overfit(row: dict[str, Any]) -> float:
    return (row["fitness_fid"] - row["fid"]) - (row["last_alone_fitness_fid"] - row["last_alone_fid"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--kimg", type=float, default=96.0)
    p.add_argument("--snapshot-kimg", type=float, default=4.0)
    p.add_argument("--sigma-rel", default="0.02,0.04,0.06,0.08,0.1,0.13,0.16,0.2")
    p.add_argument("--lcsc-kimg", default="24,48,72,96", help="times at which LCSC searches (images-saved curve)")
    p.add_argument("--last", type=int, default=6)
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--fitness-images", type=int, default=500)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--runs", default=str(ROOT / "runs" / "yardstick" / "averaging"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=None, help="records file (default bench/results/averaging.json)")
    p.add_argument("--smoke", action="store_true", help="a tiny model for 1.024k images: checks the pipeline only")
    args = p.parse_args(argv)
    if args.smoke:
        args.kimg, args.snapshot_kimg, args.lcsc_kimg, args.last = 1.024, 0.128, "0.512,1.024", 3
        args.population, args.generations, args.fitness_images, args.num_images = 4, 1, 160, 200
        args.sigma_rel, args.runs = "0.05,0.15", str(Path(args.runs) / "smoke")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows = [r for s in args.seeds.split(",") for r in rows_for_seed(args, int(s))]
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / ("averaging_smoke.json" if args.smoke else
                                                                         "averaging.json")
    text = json.dumps({"records": rows, "settings": vars(args)}, indent=1)  # "records" as every results file
    atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print("\n".join(summary(rows, args.kimg)))


if __name__ == "__main__":
    main()
