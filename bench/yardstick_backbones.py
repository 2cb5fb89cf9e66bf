"""Yardstick comparison of the backbone recipes (issue 4, "What it must show" 3; DESIGN.md §5).

Trains the plain DiT recipe, the LightningDiT recipe and the DDT recipe on mnist5k with tiny backbones of the same
width and depth (256, 6, patch 4) for the same number of training images, through ``train.py`` and the presets
``configs/experiment/yardstick_{dit,lightningdit,ddt}.yaml``; then, from each run's final EMA snapshot, the
yardstick FID (``eval.generate.yardstick_metrics``: LeNet features, samples vs the 4,500 training digits) and class
accuracy of ``--num-images`` samples with the same Euler sampler. For DDT it also samples with encoder sharing at
half the encoder calls, the recompute steps chosen by the statistical DP schedule on 8 template samples
(``samplers/sharing.py``), and reports FID and measured wall time per image with and without sharing (both through
``sample_euler_shared``, so the only difference is the skipped encoder passes).

Re-running resumes: finished trainings are not repeated and evaluations are cached in ``<runs>/evals.json`` (keyed
by snapshot and settings). The markdown tables are printed and written to ``<runs>/yardstick_backbones.md``.

Example (from the repository root; about 40 min on 2 free cores)::

    .venv/bin/python bench/yardstick_backbones.py --runs /tmp/yardstick --kimg 32 --num-images 2000 \
        --steps 20 --parallel --threads 1 --uniform

The evaluations of different recipes may also run side by side once the runs exist
(``--skip-train --recipes dit`` and ``--skip-train --recipes lightningdit`` in two shells); a last call with all
recipes and ``--skip-train`` then prints the whole table from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from gen.pipeline import Generator, SamplerSpec, generator_from_snapshot  # noqa: E402

from eval.generate import yardstick_metrics  # noqa: E402
from gen.data import to_uint8  # noqa: E402
from gen.paths import path_from_spec  # noqa: E402
from gen.utils.ckpt import list_snapshots  # noqa: E402
from gen.utils.seed import PerImageRandom  # noqa: E402
from samplers import uniform_grid  # noqa: E402
from samplers.sharing import (  # noqa: E402
    collect_encoder_outputs,
    dp_schedule,
    encoder_similarity,
    sample_euler_shared,
    save_schedule,
    schedule_error,
    shared_model_fn,
    uniform_steps,
)

RECIPES = {
    "dit": "plain DiT: uniform t, MSE, betas (0.9, 0.999)",
    "lightningdit": "LightningDiT: SwiGLU/RMSNorm/RoPE, logit-normal t, + cosine loss, betas (0.9, 0.95)",
    "ddt": "DDT 4En2De: logit-normal t, betas (0.9, 0.95)",
}
GenerateFn = Callable[[list[int]], "tuple[torch.Tensor, torch.Tensor]"]


# ----------------------------------------------------------------------------------------------------------
# Training through train.py


def _quiet_overrides() -> list[str]:
    """Overrides that switch off the run's own sample grids and evaluation (this script evaluates afterwards).

    The layout of ``configs/train.yaml`` is read, not assumed: an ``eval`` group with a ``preview`` node, or the
    older ``evaluate`` node.
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train")
    if "evaluate" in cfg:
        return ["evaluate.preview_images=0", "evaluate.fid=false", "evaluate.accuracy=false"]
    out = ["eval=none"] if "eval" in cfg else []
    return out + (["preview.images=0"] if "preview" in cfg else [])


def train(recipes: Sequence[str], runs: Path, kimg: float, threads: int, parallel: bool) -> None:
    """Run (or resume) ``train.py experiment=yardstick_<recipe>`` for each recipe, one after the other or all at once
    (``parallel``: one process per recipe, ``threads`` each; small GEMMs use cores better as separate processes)."""
    runs.mkdir(parents=True, exist_ok=True)
    quiet = _quiet_overrides()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    running: list[tuple[str, subprocess.Popen, Any]] = []
    for recipe in recipes:
        name = f"yardstick_{recipe}"
        cmd = [sys.executable, "train.py", f"experiment={name}", f"paths.runs={runs}", f"trainer.total_kimg={kimg}",
               "trainer.progress=false", "trainer.tensorboard=false", *quiet]
        print(f"[train] {' '.join(cmd[1:])}", flush=True)
        log = open(runs / f"{name}.log", "a")
        running.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        if not parallel:
            _wait(*running.pop(), runs)
    for item in running:
        _wait(*item, runs)


def _wait(name: str, proc: subprocess.Popen, log: Any, runs: Path) -> None:
    code = proc.wait()
    log.close()
    if code != 0:
        raise RuntimeError(f"train.py failed for {name} (exit {code}); see {runs / f'{name}.log'}")


def train_stats(run_dir: Path) -> dict[str, float]:
    """Median seconds per kimg (load-dependent on a shared machine) and the final training loss."""
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    return {"sec_per_kimg": statistics.median(r["sec_per_kimg"] for r in rows), "final_loss": rows[-1]["loss"],
            "final_mse": rows[-1].get("mse", float("nan")), "kimg": rows[-1]["kimg"]}


# ----------------------------------------------------------------------------------------------------------
# Sampling


class Timed:
    """Wraps a generate_fn and adds up the wall time spent in it (sampling only, not feature extraction)."""

    def __init__(self, fn: GenerateFn) -> None:
        self.fn, self.seconds, self.images = fn, 0.0, 0

    def __call__(self, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        out = self.fn(seeds)
        self.seconds += time.perf_counter() - t0
        self.images += len(seeds)
        return out

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(self.images, 1)


def plain_generate_fn(gen: Generator, steps: int) -> GenerateFn:
    """The pipeline's own Euler sampler (what ``sample.py`` and training previews use)."""
    spec = SamplerSpec(kind="euler", steps=steps)
    return lambda seeds: gen.generate(seeds, spec)


def shared_generate_fn(gen: Generator, steps: int, recompute: Sequence[int] | None) -> GenerateFn:
    """DDT sampling through ``sample_euler_shared`` (``recompute=None``: the encoder runs at every step)."""
    if gen.prediction.get("prediction", "velocity") != "velocity" or gen.prediction.get("precond") is not None:
        raise ValueError("encoder sharing here expects a velocity-prediction DDT")
    path = path_from_spec(gen.prediction["path"])
    ts = uniform_grid(steps, path.t_max)
    model_fn = shared_model_fn(gen.net)

    def fn(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rnd = PerImageRandom(seeds)
        y = rnd.randint(gen.num_classes)
        noise = rnd.randn(gen.input_shape)
        with torch.no_grad():
            x = sample_euler_shared(model_fn, noise, ts, path=path, y=y, recompute=recompute)
        return to_uint8(gen.tokenizer.decode(x).float().clamp(-1, 1)), y

    return fn


def ddt_schedules(gen: Generator, steps: int, k: int, out_dir: Path) -> dict[str, Any]:
    """DP and uniform schedules with ``k`` recomputations from 8 template samples (seeds 10^6.., random classes)."""
    path = path_from_spec(gen.prediction["path"])
    rnd = PerImageRandom(range(10**6, 10**6 + 8))
    y, noise = rnd.randint(gen.num_classes), rnd.randn(gen.input_shape)
    outs = collect_encoder_outputs(shared_model_fn(gen.net), noise, uniform_grid(steps, path.t_max), path=path, y=y)
    sim = encoder_similarity(outs)
    dp_steps, dp_err = dp_schedule(sim, k)
    uni = uniform_steps(steps, k)
    save_schedule(out_dir / f"sharing-euler{steps}-k{k}.json", dp_steps, num_steps=steps, estimated_error=dp_err,
                  meta={"sampler": "euler", "grid": "uniform", "templates": 8})
    return {"dp": dp_steps, "dp_error": dp_err, "uniform": uni, "uniform_error": schedule_error(sim, uni)}


# ----------------------------------------------------------------------------------------------------------
# Evaluation with a cache


class EvalCache:
    """``<runs>/evals.json``: results keyed by (snapshot, setting), so a re-run only evaluates what is missing.

    The file is re-read before each write and replaced atomically, so several invocations (e.g. one per recipe,
    ``--recipes dit`` and ``--recipes lightningdit`` side by side) can share it.
    """

    def __init__(self, file: Path) -> None:
        self.file = file

    def _load(self) -> dict[str, Any]:
        return json.loads(self.file.read_text()) if self.file.exists() else {}

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        data = self._load()
        if key not in data:
            value = compute()
            data = self._load()
            data[key] = value
            tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, self.file)
        return data[key]


def evaluate(fn: GenerateFn, num_images: int, cache_dir: str | None, batch_size: int) -> dict[str, Any]:
    timed = Timed(fn)
    t0 = time.perf_counter()
    m = yardstick_metrics(timed, num_images, "mnist5k", cache_dir, batch_size)
    return {**m, "ms_per_image": timed.ms_per_image, "eval_seconds": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------------


def sharing_timing(gen: Generator, steps: int, recompute: Sequence[int], reps: int, n: int) -> dict[str, float]:
    """Wall ms per image without and with sharing, alternating on the same ``n`` seeds ``reps`` times (median),
    so that load from other processes affects both alike."""
    fns = {"plain": shared_generate_fn(gen, steps, None), "shared": shared_generate_fn(gen, steps, recompute)}
    seeds = list(range(n))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn(seeds)
            times[key].append(1000.0 * (time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/yardstick_backbones"), help="run folders and results")
    ap.add_argument("--recipes", default="dit,lightningdit,ddt", help="comma-separated subset of dit,lightningdit,ddt")
    ap.add_argument("--kimg", type=float, default=32.0, help="training images per run, thousands (same for all)")
    ap.add_argument("--num-images", type=int, default=2000, help="samples per FID")
    ap.add_argument("--steps", type=int, default=30, help="Euler steps (NFE) of every sampler")
    ap.add_argument("--share-k", type=int, default=None, help="DDT encoder passes per image (default steps // 2)")
    ap.add_argument("--uniform", action="store_true", help="also FID of DDT sharing with K evenly spaced recomputes")
    ap.add_argument("--timing-reps", type=int, default=3, help="alternating timing rounds, sharing vs none")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (each training process, and sampling)")
    ap.add_argument("--parallel", action="store_true", help="train the recipes at the same time (one process each)")
    ap.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    ap.add_argument("--cache", default=".cache", help="yardstick classifier cache (as paths.cache)")
    ap.add_argument("--skip-train", action="store_true", help="evaluate the existing runs only")
    args = ap.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = sorted(set(recipes) - set(RECIPES))
    if bad:
        ap.error(f"unknown recipes {bad}; choose from {sorted(RECIPES)}")
    k = args.share_k if args.share_k is not None else max(args.steps // 2, 1)
    if not 1 <= k <= args.steps:
        ap.error(f"--share-k must be in [1, {args.steps}]")
    torch.set_num_threads(args.threads)
    runs = args.runs.resolve()
    runs.mkdir(parents=True, exist_ok=True)
    cache = EvalCache(runs / "evals.json")
    setting = f"n{args.num_images}-euler{args.steps}"
    if not args.skip_train:
        train(recipes, runs, args.kimg, args.threads, args.parallel)

    rows: list[dict[str, Any]] = []
    share: dict[str, Any] = {}
    for recipe in recipes:
        run_dir = runs / f"yardstick_{recipe}"
        snaps = list_snapshots(run_dir)
        if not snaps:
            raise FileNotFoundError(f"no snapshot in {run_dir}")
        snap = snaps[-1][1]
        gen, _ = generator_from_snapshot(str(snap))
        params = sum(p.numel() for n, p in gen.net.named_parameters() if n != "pos_embed")  # trainable ones
        print(f"[eval] {recipe}: {snap.name}, {params / 1e6:.2f}M params", flush=True)
        m = cache.get(f"{snap}|{setting}|plain", lambda: evaluate(plain_generate_fn(gen, args.steps), args.num_images,
                                                                   args.cache, args.batch_size))
        rows.append({"recipe": recipe, "params": params, **train_stats(run_dir), **m})
        print(f"        FID {m['fid']:.2f}  acc {m.get('class_accuracy', float('nan')):.3f}", flush=True)
        if recipe != "ddt":
            continue
        # Without sharing, the sharing sampler reproduces the pipeline's images exactly (so its FID is the row above).
        few = list(range(8))
        if not torch.equal(plain_generate_fn(gen, args.steps)(few)[0], shared_generate_fn(gen, args.steps, None)(few)[0]):
            raise AssertionError("sample_euler_shared without sharing differs from the pipeline's Euler sampler")
        sched = cache.get(f"{snap}|euler{args.steps}|k{k}|schedule", lambda: ddt_schedules(gen, args.steps, k, run_dir))
        share = {"plain": m, "sched": sched}
        share["timing"] = cache.get(
            f"{snap}|euler{args.steps}|k{k}|timing", lambda: sharing_timing(gen, args.steps, sched["dp"],
                                                                            args.timing_reps, 100))
        print(f"        timing ms/img: {share['timing']}", flush=True)
        kinds = [("dp", sched["dp"])] + ([("uniform", sched["uniform"])] if args.uniform else [])
        for kind, rec in kinds:
            share[kind] = cache.get(f"{snap}|{setting}|shared|{rec}", lambda rec=rec: evaluate(
                shared_generate_fn(gen, args.steps, rec), args.num_images, args.cache, args.batch_size))
            print(f"        sharing {kind}: FID {share[kind]['fid']:.2f}", flush=True)

    text = report(rows, share, args, k)
    (runs / "yardstick_backbones.md").write_text(text)
    print("\n" + text)


def report(rows: list[dict[str, Any]], share: dict[str, Any], args: argparse.Namespace, k: int) -> str:
    lines = [
        f"mnist5k 32x32, tiny backbones (width 256, depth 6, patch 4), {args.kimg:g} kimg each at batch 64; yardstick "
        f"FID of {args.num_images} samples vs the 4,500 training digits; Euler {args.steps} steps, no guidance.",
        "",
        "| recipe | params | final train MSE | train s/kimg (shared CPU) | yardstick FID | class accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {RECIPES[r['recipe']]} | {r['params'] / 1e6:.2f}M | {r['final_mse']:.4f} | "
                     f"{r['sec_per_kimg']:.1f} | **{r['fid']:.2f}** | {r.get('class_accuracy', float('nan')):.3f} |")
    if share:
        t, s = share["timing"], share["sched"]
        lines += [
            "",
            f"DDT encoder sharing: {args.steps} Euler steps, K = {k} encoder passes per image (of {args.steps}); "
            f"schedules from 8 template samples. ms/img: median of {args.timing_reps} alternating rounds of 100 images, "
            "same process, sharing vs none.",
            "",
            "| encoder recomputation | encoder passes | est. reuse error | yardstick FID | class accuracy | ms/img | speed-up |",
            "|---|---|---|---|---|---|---|",
            f"| every step (no sharing) | {args.steps} | 0 | {share['plain']['fid']:.2f} | "
            f"{share['plain'].get('class_accuracy', float('nan')):.3f} | {t['plain']:.1f} | 1.00x |",
            f"| statistical DP schedule | {k} | {s['dp_error']:.4f} | {share['dp']['fid']:.2f} | "
            f"{share['dp'].get('class_accuracy', float('nan')):.3f} | {t['shared']:.1f} | {t['plain'] / t['shared']:.2f}x |",
        ]
        if "uniform" in share:
            lines.append(f"| evenly spaced | {k} | {s['uniform_error']:.4f} | {share['uniform']['fid']:.2f} | "
                         f"{share['uniform'].get('class_accuracy', float('nan')):.3f} | (as DP) | |")
        elif s.get("uniform_error") is not None:
            lines.append(f"| evenly spaced (error only) | {k} | {s['uniform_error']:.4f} | | | | |")
        lines += ["", f"DP recompute steps: {s['dp']}; evenly spaced: {s['uniform']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
