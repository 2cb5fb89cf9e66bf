"""Rebuild every table of ``bench/README.md`` from ``bench/results/*.json``, and plot FID against training images and
against NFE (``bench/results/<bench>_fid_vs_kimg.png``, ``<bench>_fid_vs_nfe.png``; the consistency and distillation
benches, whose rows stop at different points and use several solvers, have ``<bench>_fid_vs_cost.png`` instead: FID
against NFE and wall time per image, each row at its last point).

A table sits in the README between ``<!-- tables.py: <name> -->`` and ``<!-- /tables.py -->``; this script replaces
what is between the markers and nothing else. ``--check`` only reports whether the README is up to date (exit 1 if
not), which the test suite runs, so a table cannot drift from its records.

    python bench/tables.py            # rewrite the tables, draw the plots
    python bench/tables.py --check    # README in sync with the records?
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
MARKER = re.compile(r"(<!-- tables\.py: (?P<name>[\w/.-]+) -->\n)(?P<body>.*?)(<!-- /tables\.py -->)", re.DOTALL)
# Bench name -> the module that declares it (rows, variants and labels in the order the tables use).
BENCH_MODULES = {"backbones": "yardstick_backbones", "alignment": "yardstick_alignment",
                 "consistency": "yardstick_consistency", "curriculum": "yardstick_curriculum",
                 "scoreaug": "yardstick_scoreaug", "distill": "yardstick_distill"}

Records = dict[str, list[dict[str, Any]]]


def load(results: Path = RESULTS_DIR) -> Records:
    """Every ``<bench>.json`` in ``results``: bench name -> records."""
    out: Records = {}
    for f in sorted(Path(results).glob("*.json")):
        data = json.loads(f.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise ValueError(f"{f}: a results file holds {{\"records\": [...]}}; move other files out of {results}")
        out[f.stem] = data["records"]
    return out


def bench_spec(name: str) -> Any:
    """The ``yardstick.Bench`` a bench script declares (None for benches without a module)."""
    module = BENCH_MODULES.get(name)
    return None if module is None else bench_module(module).BENCH


def bench_module(module: str) -> Any:
    """A bench script of this folder, imported as a module."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(module)


# ----------------------------------------------------------------------------------------------------------
# Formatting


def fmt_seeds(values: dict[int, float], digits: int = 1) -> str:
    """``mean (seed 0 / seed 1)``; a single seed is marked as such; missing is blank."""
    if not values:
        return ""
    vals = [values[s] for s in sorted(values)]
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f} (1 seed)"
    inner = " / ".join(f"{v:.{digits}f}" for v in vals)
    return f"**{statistics.mean(vals):.{digits}f}** ({inner})"


def mean_or_blank(values: Iterable[float], digits: int = 3, scale: float = 1.0) -> str:
    vals = [v for v in values if v == v]  # drop NaN
    return f"{scale * statistics.mean(vals):.{digits}f}" if vals else ""


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def evals(records: Sequence[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in records if r.get("kind", "eval") == "eval" and all(r.get(k) == v for k, v in match.items())]


def by_seed(records: Iterable[dict[str, Any]], key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in records if r.get(key) is not None}


def _label(row: Any) -> str:
    return row.label or row.method


def _params(records: Sequence[dict[str, Any]], method: str) -> str:
    p = [r["params"] for r in evals(records, method=method) if "params" in r]
    return f"{p[0] / 1e6:.2f}M" if p else ""


# ----------------------------------------------------------------------------------------------------------
# Yardstick tables (any bench declared through bench/yardstick.py)


def _rows(bench: str, methods: Sequence[str] | None) -> list[Any]:
    """The bench's rows, or those named in ``methods`` (a table of rows with their own points, e.g. another data set)."""
    return [row for row in bench_spec(bench).rows if methods is None or row.method in methods]


def fid_vs_kimg(records: Records, bench: str, variant: str = "euler20", methods: Sequence[str] | None = None) -> str:
    """FID at every kimg point (mean and both seeds), class accuracy and train speed at the last point; the rows in
    ``methods`` only, when given."""
    rows_ = _rows(bench, methods)
    recs = [r for r in records.get(bench, []) if r.get("method") in {row.method for row in rows_}]
    points = sorted({r["kimg"] for r in evals(recs, variant=variant)})
    header = ["row", "params", *[f"FID @ {k:g} kimg" for k in points], "class acc. (last)", "train s/kimg"]
    rows = []
    for row in rows_:
        mine = evals(recs, method=row.method, variant=variant)
        if not mine:
            continue
        cells = [fmt_seeds(by_seed([r for r in mine if r["kimg"] == k], "fid")) for k in points]
        last = [r for r in mine if r["kimg"] == max(points)]
        acc = mean_or_blank(r["class_accuracy"] for r in last)
        speed = mean_or_blank((r["train"].get("sec_per_kimg", float("nan")) for r in last), 1)
        rows.append([_label(row), _params(recs, row.method), *cells, acc, speed])
    return table(header, rows)


def memorisation(records: Records, bench: str, variant: str = "euler20", methods: Sequence[str] | None = None) -> str:
    """The memorisation rate (``eval.memorisation``: share of samples nearer to a training image than the median
    held-out image is; ~0.5 for samples like fresh data, towards 1 for copies) at every kimg point, mean and seeds;
    the rows in ``methods`` only, when given."""
    rows_ = _rows(bench, methods)
    recs = [r for r in evals(records.get(bench, []), variant=variant)
            if "memorisation_rate" in r and r["method"] in {row.method for row in rows_}]
    points = sorted({r["kimg"] for r in recs})
    rows = []
    for row in rows_:
        mine = [r for r in recs if r["method"] == row.method]
        if mine:
            rows.append([_label(row), *[fmt_seeds(by_seed([r for r in mine if r["kimg"] == k], "memorisation_rate"), 3)
                                        for k in points]])
    return table(["row", *[f"memorisation @ {k:g} kimg" for k in points]], rows)


def at_last_point(records: Records, bench: str, variant: str) -> str:
    """FID and class accuracy of one sampler variant at its (last) point, every row with records."""
    spec = bench_spec(bench)
    recs = evals(records.get(bench, []), variant=variant)
    rows = []
    for row in spec.rows:
        mine = [r for r in recs if r["method"] == row.method]
        if not mine:
            continue
        last = max(r["kimg"] for r in mine)
        at = [r for r in mine if r["kimg"] == last]
        rows.append([_label(row), f"{last:g}", fmt_seeds(by_seed(at, "fid")), mean_or_blank(r["class_accuracy"] for r in at),
                     mean_or_blank((r["sec_per_image"] for r in at), 1, 1000)])
    return table(["row", "kimg", "FID", "class acc.", "ms / image (wall)"], rows)


def fid_vs_nfe(records: Records, bench: str) -> str:
    """FID against the number of Euler steps at the last kimg point (no guidance, no sharing)."""
    spec = bench_spec(bench)
    recs = records.get(bench, [])
    plain = {v.name: v for v in spec.variants if v.sharing is None and v.scale == 1.0}
    rs = [r for r in evals(recs) if r["variant"] in plain]
    if not rs:
        return table(["row"], [])
    last = max(r["kimg"] for r in rs)
    steps = sorted({plain[r["variant"]].steps for r in rs if r["kimg"] == last})
    header = ["row", *[f"FID, Euler {s} (NFE {s})" for s in steps]]
    rows = []
    for row in spec.rows:
        cells = []
        for s in steps:
            names = [n for n, v in plain.items() if v.steps == s]
            cells.append(fmt_seeds(by_seed([r for r in rs if r["method"] == row.method and r["kimg"] == last
                                             and r["variant"] in names], "fid")))
        if any(cells):
            rows.append([_label(row), *cells])
    return f"At {last:g} kimg.\n\n" + table(header, rows)


def interval_label(interval: Sequence[Any]) -> str:
    """``(0.0, 0.7, "()")`` -> ``(0, 0.7)``; ``(0.0, 0.7)`` -> ``[0, 0.7]`` (interval notation)."""
    ends = interval[2] if len(interval) == 3 else "[]"
    return f"{ends[0]}{interval[0]:g}, {interval[1]:g}{ends[1]}"


def sharing(records: Records, bench: str) -> str:
    """DDT encoder sharing: FID and timed speed of each schedule against no sharing, per timing group."""
    spec = bench_spec(bench)
    recs = records.get(bench, [])
    variants = {v.name: v for v in spec.variants}
    timing = [r for r in recs if r.get("kind") == "timing"]
    header = ["sampler", "encoder recomputation", "encoder passes / image", "est. reuse error", "FID", "class acc.",
              "ms / image (wall)", "ms / image (CPU)", "speed-up (CPU)"]
    rows = []
    # Only records of the variants as they are defined now: a variant whose sampler changed (e.g. DDT's guidance
    # interval, closed before, open now) keeps its name, and its old records must not fill the new row.
    from yardstick import _digest  # bench_spec put bench/ on the path

    overrides = {r.method: list(r.overrides) for r in spec.rows}
    groups = {g.name: g for g in spec.timing}
    timing = [t for t in timing if t["group"] in groups and t["key"].endswith("|" + _digest(
        [overrides.get(t["method"]), [variants[n].definition() for n in groups[t["group"]].variants],
         groups[t["group"]].num_images, groups[t["group"]].rounds]))]
    recs = [r for r in recs if r.get("kind", "eval") != "eval" or r.get("variant") not in variants
            or r["key"].endswith("|" + _digest([overrides.get(r["method"]), variants[r["variant"]].definition()]))]
    for g in spec.timing:
        for method in g.methods or [r.method for r in spec.rows]:
            t_recs = [t for t in timing if t["group"] == g.name and t["method"] == method]
            base = g.variants[0]
            for name in g.variants:
                v = variants[name]
                e = [r for r in evals(recs, method=method, variant=name)]
                if e:
                    e = [r for r in e if r["kimg"] == max(r2["kimg"] for r2 in e)]
                wall = [t["results"][name]["sec_per_image"] for t in t_recs if name in t["results"]]
                cpu = [t["results"][name]["cpu_sec_per_image"] for t in t_recs if name in t["results"]]
                speed = [t["results"][base]["cpu_sec_per_image"] / t["results"][name]["cpu_sec_per_image"]
                         for t in t_recs if name in t["results"] and base in t["results"]]
                if not e and not wall:
                    continue
                guide = f", CFG {v.scale:g} on t in {interval_label(v.interval)}" if v.scale != 1.0 and v.interval else (
                    f", CFG {v.scale:g}" if v.scale != 1.0 else "")
                what = "every step (no sharing)" if v.sharing is None else (
                    f"DP schedule, K = {v.sharing[1]}" if v.sharing[0] == "dp" else f"even, i % {v.sharing[1]} == 0")
                errs = [r.get("estimated_error", 0.0 if v.sharing is None else float("nan")) for r in e]
                err = f"{statistics.mean(errs):.3g}" if errs and all(x == x for x in errs) else ""
                rows.append([f"{method} Euler {v.steps}{guide}", what, str(v.encoder_passes()), err,
                             fmt_seeds(by_seed(e, "fid")), mean_or_blank(r["class_accuracy"] for r in e),
                             mean_or_blank(wall, 1, 1000), mean_or_blank(cpu, 1, 1000),
                             f"{statistics.mean(speed):.2f}x" if speed else ""])
    return table(header, rows)


# ----------------------------------------------------------------------------------------------------------
# Throughput tables (bench/redesign_throughput.py, bench/train_throughput.py)


def redesign(records: Records, bench: str = "redesign") -> str:
    """Before/after the training redesign: medians per side and the median after/before ratio of paired bursts."""
    recs = [r for r in records.get(bench, []) if r.get("kind") == "throughput"]
    header = ["measurement", "before (3bef4cd)", "after", "after / before (wall)", "after / before (CPU)", "pairs"]
    rows = []
    for r in recs:
        def med(side: str, key: str = "rates", r: dict[str, Any] = r) -> str:
            vals = r[side][key]
            return f"{statistics.median(vals):.3g} {r['unit']} ({min(vals):.3g}-{max(vals):.3g})"

        ratio, cpu = statistics.median(r["pair_ratios"]), statistics.median(r["cpu_pair_ratios"])
        spread = f" ({min(r['pair_ratios']):.2f}-{max(r['pair_ratios']):.2f})"
        rows.append([r["label"], med("before"), med("after"), f"**{ratio:.3f}**{spread}", f"{cpu:.3f}",
                     str(len(r["pair_ratios"]))])
    return table(header, rows)


def ours_vs_diffusers(records: Records, bench: str = "redesign") -> str:
    """Training step of our backbones against diffusers' DiT of the same size, from the paired bursts of
    ``redesign_throughput.py`` (ours and diffusers alternate inside one process): medians and the median ratio."""
    recs = [r for r in records.get(bench, []) if r.get("kind") == "throughput" and r["what"].startswith("train_step/")]
    header = ["row (batch 16, fp32, 1 thread)", "ours img/s", "diffusers img/s", "ours / diffusers", "(before the redesign)"]
    rows = []
    for r in recs:
        _, model, kind = r["what"].split("/")
        ref = next((d for d in recs if d["what"] == f"train_step/{model}/diffusers"), None)
        if kind != "ours" or ref is None:
            continue
        ratio = {s: statistics.median(a / b for a, b in zip(r[s]["rates"], ref[s]["rates"])) for s in ("after", "before")}
        rows.append([model, f"{statistics.median(r['after']['rates']):.3g}", f"{statistics.median(ref['after']['rates']):.3g}",
                     f"**{ratio['after']:.2f}x**", f"{ratio['before']:.2f}x"])
    return table(header, rows)


def fid_throughput(records: Records, bench: str = "fid_throughput") -> str:
    """``bench/fid_throughput.py``: ours vs torchmetrics, and 1 -> 2 processes."""
    header = ["row", "ours img/s", "torchmetrics img/s", "ours / torchmetrics (median batch; fastest batch)",
              "1 -> 2 processes, wall", "1 -> 2, busiest process CPU time", "command"]
    rows = []
    for r in records.get(bench, []):
        what = (f"Inception-v3 (random weights), {r['images']} images at {r['resolution']}x{r['resolution']}"
                if r["row"] == "inception" else f"yardstick LeNet, {r['images']:,} images")
        rows.append([what, f"{r['ours_img_s']:.1f}", f"{r['torchmetrics_img_s']:.1f}",
                     f"{r['ratio']:.2f}x; {r['ratio_best']:.2f}x", f"{r.get('scaling', float('nan')):.2f}x",
                     f"{r.get('cpu_scaling', float('nan')):.2f}x", f"`{r['command']}`"])
    return table(header, rows)


def images_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The first training kimg at which a FID curve, linear between its measured ``(kimg, fid)`` points, falls to
    ``target``; None when it never does within the points."""
    pts = sorted(points)
    for i, (k, f) in enumerate(pts):
        if f <= target:
            if i == 0:
                return k
            k0, f0 = pts[i - 1]
            return k0 + (k - k0) * (f0 - target) / (f0 - f)
    return None


def reach(records: Records, bench: str, baseline: str, variant: str = "euler20") -> str:
    """Training images each row needs to reach the baseline row's final FID (mean over seeds; per seed in brackets,
    against that seed's target), and the ratio to the baseline's own count."""
    spec = bench_spec(bench)
    recs = evals(records.get(bench, []), variant=variant)
    base = [r for r in recs if r["method"] == baseline]
    if not base:
        return table(["row", "kimg to reach the baseline's final FID"], [])
    last = max(r["kimg"] for r in base)
    seeds = sorted({int(r["seed"]) for r in base})

    def curve(method: str, seed: int | None) -> list[tuple[float, float]]:
        """The row's FID curve: one seed's, or the mean over the row's own seeds at the points all of them reached
        (a row may have fewer seeds than the baseline: protocol v2 adds a third only where ranges overlap)."""
        mine = [r for r in recs if r["method"] == method and (seed is None or int(r["seed"]) == seed)]
        own = {int(r["seed"]) for r in mine}
        ks = sorted({r["kimg"] for r in mine})
        return [(k, statistics.mean(r["fid"] for r in mine if r["kimg"] == k)) for k in ks
                if seed is not None or {int(r["seed"]) for r in mine if r["kimg"] == k} == own]

    target = statistics.mean(r["fid"] for r in base if r["kimg"] == last)
    base_k = images_to_reach(curve(baseline, None), target)
    header = ["row", f"kimg to reach FID {target:.1f} (baseline {baseline} at {last:g} kimg)", "per seed",
              "vs baseline"]
    rows = []
    for row in spec.rows:
        if not any(r["method"] == row.method for r in recs):
            continue
        mean_curve = curve(row.method, None)  # points that every seed has reached
        k = images_to_reach(mean_curve, target)
        per = []
        for s in seeds:
            t = statistics.mean([r["fid"] for r in base if r["kimg"] == last and int(r["seed"]) == s] or [target])
            mine = curve(row.method, s)
            ks = images_to_reach(mine, t)
            per.append("no run" if not mine else "-" if ks is None else f"{ks:.1f}")
        if k is not None:
            reached = f"{k:.1f}"
        else:
            reached = f"not within {max(p[0] for p in mean_curve):g}" if mean_curve else "- (not every seed yet)"
        ratio = "" if k is None or not base_k else f"{k / base_k:.2f}x"
        rows.append([_label(row), reached, " / ".join(per), ratio])
    return table(header, rows)


SOLVERS = {"sample_euler": "Euler", "sample_heun": "Heun", "sample_dpmpp_2m": "DPM-Solver++(2M)",
           "sample_reuse_noise": "noise-reusing update", "sample_ddim": "DDIM", "sample_lcm": "LCM multistep",
           "sample_consistency": "consistency"}


def solver_name(variant: Any) -> str:
    """The solver a variant samples with, as the tables name it (Euler where the variant names none)."""
    target = ((variant.sampler or {}).get("solver") or {}).get("_target_", "samplers.sample_euler")
    short = target.rsplit(".", 1)[-1]
    return SOLVERS.get(short, short.removeprefix("sample_"))


def few_step(records: Records, bench: str = "consistency") -> str:
    """``bench/yardstick_consistency.py``: FID by network evaluations per image. The teacher (Euler at 1-20 steps,
    its last point) and, at each of their points, the consistency students at 1 and 2 steps; the training images
    of ECT count on top of the teacher's. The samples' class accuracy at each NFE of the row (mean of the seeds), and
    wall time per image at the fewest steps."""
    spec = bench_spec(bench)
    recs = evals(records.get(bench, []))
    variants = {v.name: v for v in spec.variants}
    nfes = sorted({variants[r["variant"]].nfe for r in recs if r["variant"] in variants})
    header = ["row", "training images", *[f"FID, NFE {n}" for n in nfes], "class accuracy, by NFE",
              "ms / image at the fewest NFE (wall)"]
    rows = []
    for row in spec.rows:
        base = 0.0
        if row.init_from is not None:
            start = [r for r in recs if r["method"] == row.init_from]
            base = max((r["kimg"] for r in start), default=0.0)
        # Guided and unguided sampling, and each solver, of one network are rows of their own (at one NFE they are
        # other samplers: the teacher's Euler 8 and DPM-Solver++ 8 are two numbers, never one cell).
        groups = sorted({(variants[r["variant"]].scale, solver_name(variants[r["variant"]])) for r in recs
                         if r["method"] == row.method and r["variant"] in variants})
        several = len({g[1] for g in groups}) > 1
        for scale, solver in groups:
            mine = [r for r in recs if r["method"] == row.method and r["variant"] in variants
                    and (variants[r["variant"]].scale, solver_name(variants[r["variant"]])) == (scale, solver)]
            label = _label(row) + (f", {solver}" if several else "") + (f", CFG {scale:g}" if scale != 1.0 else "")
            for k in sorted({r["kimg"] for r in mine}):
                at = [r for r in mine if r["kimg"] == k]
                cells = [fmt_seeds(by_seed([r for r in at if variants[r["variant"]].nfe == n], "fid")) for n in nfes]
                fewest = min(variants[r["variant"]].nfe for r in at)
                ms = mean_or_blank((r["sec_per_image"] for r in at if variants[r["variant"]].nfe == fewest), 2, 1000)
                images = f"{base:g}k + {k:g}k" if base else f"{k:g}k"
                acc = " / ".join(mean_or_blank(r.get("class_accuracy", math.nan) for r in at
                                               if variants[r["variant"]].nfe == n) or "-"
                                 for n in sorted({variants[r["variant"]].nfe for r in at}))
                rows.append([label, images, *cells, acc, ms])
    return table(header, rows)


def tokenizers(records: Records, bench: str = "yardstick_tokenizers") -> str:
    """``bench/yardstick_tokenizers.py``: per row its latent channels, VF loss, the tokenizer's rFID / PSNR / SSIM and
    the generation FID of the generator trained on its latents at every point (Euler 20, no guidance; mean and each
    seed), with the quick start's sampler (Euler 20, CFG 2) at the last point and the class accuracy there."""
    recs = records.get(bench, [])
    recon = {r["method"]: r for r in recs if r.get("kind") == "recon"}
    ev = evals(recs)
    points = sorted({r["kimg"] for r in ev if r.get("variant") == "euler20"})
    last = max(points, default=None)
    header = ["row", "channels", "VF loss", "rFID", "PSNR", "SSIM", *[f"FID @ {k:g} kimg" for k in points],
              f"FID, CFG 2 @ {last:g} kimg" if last is not None else "FID, CFG 2", "class acc. (Euler 20 / CFG 2)"]
    pixels = {"pixels", "lightningdit"}  # the pixels row is the backbone table's LightningDiT run
    methods = {r["method"] for r in ev} | set(recon)
    # Pixels first, then the sweep: by channels, without the VF loss before with it.
    order = sorted(methods, key=lambda m: (m not in pixels, recon.get(m, {}).get("channels", 0),
                                           bool(recon.get(m, {}).get("vf")), m))
    rows = []
    for m in order:
        rec = recon.get(m)
        mine = [r for r in ev if r["method"] == m]
        fids = [fmt_seeds(by_seed([r for r in mine if r["variant"] == "euler20" and r["kimg"] == k], "fid"))
                for k in points]
        at_last = {v: [r for r in mine if r["variant"] == v and r["kimg"] == last] for v in ("euler20", "qs")}
        acc = " / ".join(mean_or_blank(r["class_accuracy"] for r in at_last[v]) or "-" for v in ("euler20", "qs"))
        if rec is None:
            cells = ["pixels (patch 4)" if m in pixels else m, "-", "-", "-", "-", "-"]
        else:
            vf = f"yes ({rec['vf_encoder']})" if rec["vf"] else "no"
            cells = [m, str(rec["channels"]), vf, f"{rec['rfid']:.2f}", f"{rec['psnr']:.2f}", f"{rec['ssim']:.3f}"]
            # Every generator record of the row decoded with the tokenizer the rFID measured (one training of it).
            shas = {r["tokenizer_sha256"] for r in mine if "tokenizer_sha256" in r} | (
                {rec["snapshot_sha256"]} if "snapshot_sha256" in rec else set())
            if len(shas) > 1:
                cells[0] += f" (records from {len(shas)} tokenizer trainings)"
        rows.append([*cells, *fids, fmt_seeds(by_seed(at_last["qs"], "fid")), acc])
    kimg = sorted({r["kimg"] for r in recon.values()})
    samples = sorted({r["num_images"] for r in ev})
    note = (f"Tokenizers trained {', '.join(f'{k:g}' for k in kimg)} kimg (seed 0); generator FID of "
            f"{', '.join(f'{n:,}' for n in samples)} samples, mean (seed 0 / seed 1).\n\n") if recon else ""
    return note + table(header, rows)


# ----------------------------------------------------------------------------------------------------------
# Claim against yardstick: each paper's claim beside what the records show


def final_fids(records: Records, bench: str, method: str, variant: str = "euler20") -> dict[int, float]:
    """FID per seed at the row's last evaluated point (every seed at the same point, else the common last one)."""
    recs = evals(records.get(bench, []), method=method, variant=variant)
    if not recs:
        return {}
    seeds = {int(r["seed"]) for r in recs}
    common = [k for k in sorted({r["kimg"] for r in recs}) if {int(r["seed"]) for r in recs if r["kimg"] == k} == seeds]
    if not common:
        return {}
    return by_seed([r for r in recs if r["kimg"] == common[-1]], "fid")


# ----------------------------------------------------------------------------------------------------------
# Checkpoint averaging (bench/yardstick_averaging.py: its own records, one per seed, method and kimg; every FID on
# the row seed set, which LCSC's fitness never sees)


def _averaging_rows(records: Records, method: str, kimg: float | None = None) -> dict[int, dict[str, Any]]:
    """The averaging bench's rows of ``method`` at ``kimg`` (default: its last), by seed."""
    rs = [r for r in records.get("averaging", []) if r.get("method") == method]
    if kimg is None and rs:
        kimg = max(float(r["kimg"]) for r in rs)
    return {int(r["seed"]): r for r in rs if float(r["kimg"]) == kimg}


def _averaging_end() -> float:
    """The averaging bench's run length (its default settings), in kimg."""
    return float(bench_module("yardstick_averaging").parse_args([]).kimg)


def _averaging_complete(records: Records, prefix: str, kimg: float | None = None) -> set[int]:
    """Seeds that hold every row the bench plans (its default settings) whose method starts with ``prefix`` (at
    ``kimg``, where given).

    The bench stores each row as it comes, so a best-of or a first-to-reach over a seed's partial set would be
    drawn from the rows that happened to finish first.
    """
    ya = bench_module("yardstick_averaging")
    planned = {(m, float(k)) for m, k in ya.planned_rows(ya.parse_args([]))
               if m.startswith(prefix) and (kimg is None or float(k) == kimg)}
    have: dict[int, set[tuple[str, float]]] = {}
    for r in records.get("averaging", []):
        have.setdefault(int(r["seed"]), set()).add((r["method"], float(r["kimg"])))
    return {s for s, got in have.items() if planned <= got}


def _averaging_best(records: Records, prefix: str, kimg: float | None = None) -> dict[int, dict[str, Any]]:
    """Per seed, the row of lowest FID among the methods named ``prefix...`` at ``kimg`` (default: the run's end;
    picked per seed, as a user would pick the EMA length on their own run), for the seeds that hold all of them."""
    kimg = _averaging_end() if kimg is None else kimg
    out: dict[int, dict[str, Any]] = {}
    complete = _averaging_complete(records, prefix, kimg)
    for r in records.get("averaging", []):
        s = int(r["seed"])
        if (s in complete and r["method"].startswith(prefix) and float(r["kimg"]) == kimg
                and (s not in out or r["fid"] < out[s]["fid"])):
            out[s] = r
    return out


def lcsc_saved(records: Records) -> dict[int, float | None]:
    """Per seed, the share of the run's images LCSC saves: ``1 - k / K`` for the first LCSC point k whose FID reaches
    the seed's best classic EMA at the run's end K (None where no point reaches it); seeds with every planned EMA and
    LCSC row only."""
    out: dict[int, float | None] = {}
    searched = _averaging_complete(records, "lcsc")  # every search time, or "not reached" could be premature
    for s, ema in sorted(_averaging_best(records, "ema-").items()):
        if s not in searched:
            continue
        pts = sorted((float(r["kimg"]), float(r["fid"])) for r in records.get("averaging", [])
                     if r["method"] == "lcsc" and int(r["seed"]) == s)
        if pts:
            k = next((k for k, f in pts if f <= ema["fid"]), None)
            out[s] = None if k is None else 1 - k / float(ema["kimg"])
    return out


def lcsc_equivalent(records: Records) -> dict[float, dict[int, float]]:
    """Per LCSC search time k and seed, the training images at which the seed's best post-hoc EMA (the best width at
    each of the bench's times, linear in FID between them, as ``images_to_reach``) reaches LCSC's FID at k: the
    training LCSC's combination is worth at equal FID: ``inf`` beyond the run's end, ``-inf`` worse than the post-hoc
    EMA at the first time (the curve starts there). Seeds with every planned LCSC and post-hoc row only."""
    searched = _averaging_complete(records, "lcsc") & _averaging_complete(records, "posthoc-")
    recs = records.get("averaging", [])
    times = sorted({float(r["kimg"]) for r in recs if r["method"] == "lcsc"} | {_averaging_end()})
    best = {k: _averaging_best(records, "posthoc-", k) for k in times}  # every searched seed has each time's rows
    curves = {s: [(k, float(best[k][s]["fid"])) for k in times] for s in searched}
    out: dict[float, dict[int, float]] = {}
    for r in recs:
        s, fid = int(r["seed"]), float(r["fid"])
        if r["method"] == "lcsc" and s in searched:
            k = images_to_reach(curves[s], fid)
            out.setdefault(float(r["kimg"]), {})[s] = (math.inf if k is None else -math.inf if fid > curves[s][0][1]
                                                       else k)
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def search_cost(by_seed: dict[int, dict[str, Any]]) -> str:
    """LCSC searches' mean evaluations and each seed's wall time ("untimed": resumed from a state written without
    its time)."""
    minutes = [r.get("search_seconds") for _, r in sorted(by_seed.items())]
    return (f"{statistics.mean(r['evaluations'] for r in by_seed.values()):.0f} evaluations, "
            + " / ".join("untimed" if v is None else f"{v / 60:.0f}" for v in minutes) + " min")


def averaging(records: Records) -> str:
    """``bench/yardstick_averaging.py``: FID of each averaging at the run's end (the classic EMAs and post-hoc widths
    one row each, then the best per seed), LCSC at each search time with its search cost and fitness gap, and the
    1-step consistency part (ECT)."""
    recs = records.get("averaging", [])
    if not recs:
        return "Not measured yet (`python bench/yardstick_all.py --benches averaging`).\n"
    fitness_gap = bench_module("yardstick_averaging").fitness_gap  # LCSC's overfitting, as the bench defines it
    rows: list[list[str]] = []

    def fids(by_seed: dict[int, dict[str, Any]]) -> str:
        return fmt_seeds({s: float(r["fid"]) for s, r in by_seed.items()}, 2)

    def add(label: str, method: str, note: str = "", kimg: float | None = None) -> None:
        got = _averaging_rows(records, method, kimg)
        if got:
            rows.append([label, f"{max(float(r['kimg']) for r in got.values()):g}k", fids(got), note])

    methods = sorted({r["method"] for r in recs})
    end = _averaging_end()
    add("raw weights (last training state)", "raw")
    for m in sorted((m for m in methods if m.startswith("ema-")), key=lambda m: float(m[6:-1])):
        add(f"classic EMA, half-life {m[6:-1]}k images", m)
    best = _averaging_best(records, "ema-")
    if best:
        rows.append(["best classic EMA, per seed", f"{max(float(r['kimg']) for r in best.values()):g}k", fids(best),
                     " / ".join(r["method"][4:] for _, r in sorted(best.items()))])
    for m in sorted((m for m in methods if m.startswith("posthoc-")), key=lambda m: float(m[8:])):
        add(f"post-hoc EMA, sigma_rel {m[8:]}", m, kimg=end)
    best = _averaging_best(records, "posthoc-")
    if best:
        rows.append(["best post-hoc EMA, per seed", f"{max(float(r['kimg']) for r in best.values()):g}k", fids(best),
                     " / ".join(f"sigma_rel {r['method'][8:]}" for _, r in sorted(best.items()))])
    for k in sorted({float(r["kimg"]) for r in recs if r["method"] == "lcsc"}):
        best = _averaging_best(records, "posthoc-", k) if k < end else {}
        if best:  # LCSC's baseline at equal training
            rows.append([f"best post-hoc EMA at {k:g}k, per seed", f"{k:g}k", fids(best),
                         " / ".join(f"sigma_rel {r['method'][8:]}" for _, r in sorted(best.items()))])
        got = _averaging_rows(records, "lcsc", k)
        alone = " / ".join(f"{r['last_alone_fid']:.2f}" for _, r in sorted(got.items()))
        note = (f"last state alone {alone}; "
                f"fitness FID {statistics.mean(r['fitness_fid'] for r in got.values()):.2f}; fitness gap "
                f"{' / '.join(f'{fitness_gap(r):+.2f}' for _, r in sorted(got.items()))}; " + search_cost(got))
        add("LCSC over the last raw states", "lcsc", note, k)
    saved = lcsc_saved(records)
    if saved:
        rows.append(["images LCSC saves to the best EMA's final FID", "", " / ".join(
            "not reached" if v is None else f"{v:.0%}" for _, v in sorted(saved.items())), "per seed; aim: 50%"])
    worth = lcsc_equivalent(records)
    if worth:
        rows.append(["training images the best post-hoc EMA needs to LCSC's FID", "", "; ".join(
            f"{k:g}k: {_worth(v, min(worth))}" for k, v in worth.items()), "per seed, linear between its times"])
    start = max((float(r["kimg"]) for r in recs if r["method"] == "raw"), default=0.0)  # ECT tunes the run's end
    ect = [("ECT raw weights, 1 step", "ect-raw"), ("ECT EMA (half-life 2k), 1 step", "ect-ema"),
           ("ECT EMA, 2 steps", "ect-ema-2step"), ("ECT LCSC, 1 step", "ect-lcsc")]
    for label, m in ect:
        got = _averaging_rows(records, m)
        note = "" if m != "ect-lcsc" or not got else (
            f"fitness gap {' / '.join(f'{fitness_gap(r):+.2f}' for _, r in sorted(got.items()))}; " + search_cost(got))
        if got:
            rows.append([label, f"{start:g}k + {max(float(r['kimg']) for r in got.values()):g}k", fids(got), note])
    return table(["averaging", "training images", "FID (seeds)", "notes"], rows)


def rate_at_fid(curve: Sequence[tuple[float, float]], fid: float) -> float | None:
    """The memorisation rate a run had when its FID was ``fid``: linear in FID between the two points of ``curve``
    ((FID, rate) in training order) where the FID first falls through ``fid``; None where it never gets there."""
    for (f0, r0), (f1, r1) in zip(curve, curve[1:]):
        if f1 <= fid <= f0 and f0 > f1:
            return r0 + (r1 - r0) * (f0 - fid) / (f0 - f1)
    return None


def _scoreaug_matched(recs: Sequence[dict[str, Any]], aug: str = "scoreaug", base: str = "dit") -> str:
    """Memorisation at matched FID, per seed: ScoreAug's (row ``aug``) at its last point against the plain run's
    (``base``) when the plain run had the same FID (interpolated between its points), which separates holding
    memorisation down from learning slower; empty where a seed's plain run never had that FID."""
    out = []
    for s in sorted({int(r["seed"]) for r in recs}):
        mine = {m: sorted((r for r in recs if r["method"] == m and int(r["seed"]) == s), key=lambda r: r["kimg"])
                for m in (aug, base)}
        if not mine[aug] or not mine[base]:
            continue
        end = mine[aug][-1]
        plain = rate_at_fid([(r["fid"], r["memorisation_rate"]) for r in mine[base]], end["fid"])
        if plain is not None:
            out.append(f"{end['memorisation_rate']:.3f} vs {plain:.3f}")
    return (f"; memorisation at matched FID (ScoreAug's final FID, the plain run interpolated to it): {' / '.join(out)}"
            if out else "")


def _scoreaug(aug: str, base: str) -> Callable[[Records], tuple[str, str] | None]:
    """ScoreAug (row ``aug``) against the plain run (``base``) at their last point: memorisation rate (lower is
    better) and FID."""
    return lambda records: _scoreaug_claim(records, aug, base)


def _scoreaug_claim(records: Records, aug: str, base: str) -> tuple[str, str] | None:
    recs = evals(records.get("scoreaug", []), variant="euler20")
    recs = [r for r in recs if r["method"] in (aug, base)]
    if not recs:
        return None
    last = max(r["kimg"] for r in recs)
    rate = {m: by_seed([r for r in recs if r["method"] == m and r["kimg"] == last], "memorisation_rate")
            for m in (aug, base)}
    fid = compare(final_fids(records, "scoreaug", aug), final_fids(records, "scoreaug", base))
    mem = compare(rate[aug], rate[base])
    if fid is None or mem is None:
        return None
    a, b = rate[aug], rate[base]
    mem_text = (f"{statistics.mean(a.values()):.3f} ({min(a.values()):.3f}-{max(a.values()):.3f}) vs "
                f"{statistics.mean(b.values()):.3f} ({min(b.values()):.3f}-{max(b.values()):.3f})")
    verdict = (PENDING if PENDING in (mem[1], fid[1]) else
               "yes" if mem[1] == "yes" and fid[1] != "no" else "no" if mem[1] == "no" or fid[1] == "no" else
               "within seed spread")
    matched = _scoreaug_matched([r for r in recs if "memorisation_rate" in r], aug, base)
    return f"at {last:g}k: memorisation {mem_text}; FID {fid[0]}{matched}", verdict


def _posthoc_vs_ema(records: Records) -> tuple[str, str] | None:
    out = compare({s: r["fid"] for s, r in _averaging_best(records, "posthoc-").items()},
                  {s: r["fid"] for s, r in _averaging_best(records, "ema-").items()})
    return None if out is None else (f"FID {out[0]} (best post-hoc vs best classic EMA, per seed)", _as_good(out[1]))


def _worth(by_seed: dict[int, float], first: float) -> str:
    """``lcsc_equivalent``'s images per seed (its curve starting at ``first`` kimg)."""
    return " / ".join("beyond the run" if v == math.inf else f"under {first:g}k" if v == -math.inf else f"{v:.1f}k"
                      for _, v in sorted(by_seed.items()))


def _lcsc_saves(records: Records) -> tuple[str, str] | None:
    saved = lcsc_saved(records)
    if not saved:
        return None
    vals = [v for v in saved.values() if v is not None]
    verdict = ("yes" if len(vals) == len(saved) and min(vals) >= 0.5 else
               "direction only" if vals and max(vals) > 0 else "no")
    verdict = PENDING if len(saved) < MIN_SEEDS else verdict
    text = (f"saves {' / '.join('none (not reached)' if v is None else f'{v:.0%}' for _, v in sorted(saved.items()))} "
            "of the images to the best classic EMA's final FID (aim: 50%)")
    worth = lcsc_equivalent(records)
    if worth:  # how far it got: the training its FID is worth on the same run's post-hoc EMA
        text += "; at equal FID the post-hoc EMA needs " + "; ".join(
            f"{_worth(v, min(worth))} where LCSC has {k:g}k" for k, v in worth.items())
    return text, verdict


def _lcsc_one_step(records: Records) -> tuple[str, str] | None:
    out = compare({s: r["fid"] for s, r in _averaging_rows(records, "ect-lcsc").items()},
                  {s: r["fid"] for s, r in _averaging_rows(records, "ect-ema-2step").items()})
    return None if out is None else (f"FID {out[0]} (LCSC at 1 step vs the EMA at 2 steps)", out[1])


# Protocol v2 decides with 2 seeds (3 where the rows' ranges overlap). Records land one (row, seed, point) at a time
# and are committed as they come, so a claim whose either side has fewer seeds shows its numbers with this verdict
# instead of one drawn from a single seed.
MIN_SEEDS = 2
PENDING = "pending (fewer than 2 seeds)"


def _as_good(verdict: str) -> str:
    """A claim of "as good as" (not "better"): ``compare``'s verdict with the seed ranges overlapping counted as yes."""
    return verdict if verdict == PENDING else "no" if verdict == "no" else "yes"


def compare(a: dict[int, float], b: dict[int, float]) -> tuple[str, str] | None:
    """``a`` against ``b`` (lower FID is better): the difference of the means with both seed ranges, and whether
    ``a`` is better ("yes": every seed of ``a`` below every seed of ``b``; "no": the reverse; "within seed spread";
    ``PENDING`` while either side has fewer than ``MIN_SEEDS`` seeds)."""
    if not a or not b:
        return None
    d = statistics.mean(a.values()) - statistics.mean(b.values())
    text = (f"{statistics.mean(a.values()):.1f} ({min(a.values()):.1f}-{max(a.values()):.1f}) vs "
            f"{statistics.mean(b.values()):.1f} ({min(b.values()):.1f}-{max(b.values()):.1f}), {d:+.1f}")
    verdict = "yes" if max(a.values()) < min(b.values()) else "no" if min(a.values()) > max(b.values()) else (
        "within seed spread")
    return text, PENDING if min(len(a), len(b)) < MIN_SEEDS else verdict


def reach_ratio(records: Records, bench: str, method: str, baseline: str, variant: str = "euler20") -> float | None:
    """Images ``method`` needs to reach ``baseline``'s final mean FID, over the images the baseline needs."""
    target = final_fids(records, bench, baseline, variant)
    if not target:
        return None
    goal = statistics.mean(target.values())

    def curve(m: str) -> list[tuple[float, float]]:
        rs = evals(records.get(bench, []), method=m, variant=variant)
        seeds = {int(r["seed"]) for r in rs}
        return [(k, statistics.mean(r["fid"] for r in rs if r["kimg"] == k)) for k in sorted({r["kimg"] for r in rs})
                if {int(r["seed"]) for r in rs if r["kimg"] == k} == seeds]

    k, k0 = images_to_reach(curve(method), goal), images_to_reach(curve(baseline), goal)
    return None if k is None or not k0 else k / k0


def seed_reach_ratios(records: Records, bench: str, method: str, baseline: str,
                      variant: str = "euler20") -> list[float | None]:
    """Per seed (ascending): the images ``method`` needs to reach the same seed's final ``baseline`` FID, over the
    baseline's last point (None where it does not reach it); as the reach table's "per seed"."""
    target = final_fids(records, bench, baseline, variant)
    base = evals(records.get(bench, []), method=baseline, variant=variant)
    if not target or not base:
        return []
    last = max(r["kimg"] for r in base)
    out: list[float | None] = []
    for seed in sorted(target):
        mine = [r for r in evals(records.get(bench, []), method=method, variant=variant) if int(r["seed"]) == seed]
        k = images_to_reach(sorted((r["kimg"], r["fid"]) for r in mine), target[seed])
        out.append(None if k is None else k / last)
    return out


@dataclass(frozen=True)
class Claim:
    """A paper's claim and how the yardstick tests it: ``measure(records) -> (what it shows, agrees)`` or None while
    the records are missing; ``reason`` says why where it does not agree (written after reading the numbers)."""

    method: str
    paper: str
    claim: str
    measure: Callable[[Records], tuple[str, str] | None]
    reason: str = ""


def _faster(bench: str, method: str, baseline: str, aim: float) -> Callable[[Records], tuple[str, str] | None]:
    def measure(records: Records) -> tuple[str, str] | None:
        r = reach_ratio(records, bench, method, baseline)
        if r is None:
            fids = compare(final_fids(records, bench, method), final_fids(records, bench, baseline))
            return None if fids is None else (f"does not reach {baseline}'s final FID; FID {fids[0]}",
                                              PENDING if fids[1] == PENDING else "no")
        per = seed_reach_ratios(records, bench, method, baseline)
        verdict = "yes" if r <= aim else "direction only" if r < 1 else "no"
        if verdict == "yes" and any(x is None or x > aim for x in per):
            verdict = "yes on the mean, not every seed"
        if min(len(final_fids(records, bench, m)) for m in (method, baseline)) < MIN_SEEDS:
            verdict = PENDING
        seeds = f"; per seed, to its own target: {' / '.join('-' if x is None else f'{x:.2f}' for x in per)}" if per else ""
        return f"{r:.2f}x the images of {baseline} to its final FID (aim <= {aim:g}x{seeds})", verdict

    return measure


def _better(bench: str, method: str, baseline: str) -> Callable[[Records], tuple[str, str] | None]:
    def measure(records: Records) -> tuple[str, str] | None:
        out = compare(final_fids(records, bench, method), final_fids(records, bench, baseline))
        return None if out is None else (f"FID {out[0]} ({method} vs {baseline}, final point)", out[1])

    return measure


def _dilemma(records: Records, bench: str = "yardstick_tokenizers") -> tuple[str, str] | None:
    """VA-VAE's dilemma on the plain KL rows: reconstruction (rFID of the seed-0 tokenizer) improves from 4 to 64
    channels while generation (the generators' final FID, per seed) worsens; the text gives every channel count."""
    recon = {r["method"]: r for r in records.get(bench, []) if r.get("kind") == "recon"}
    sweep = [m for m in ("kl_f4d4", "kl_f4d16", "kl_f4d64") if m in recon and final_fids(records, bench, m)]
    if "kl_f4d4" not in sweep or "kl_f4d64" not in sweep:
        return None
    gen = compare(final_fids(records, bench, "kl_f4d4"), final_fids(records, bench, "kl_f4d64"))
    assert gen is not None
    means = {m: statistics.mean(final_fids(records, bench, m).values()) for m in sweep}
    rfid = " / ".join(f"{recon[m]['rfid']:.2f}" for m in sweep)
    text = (f"rFID {rfid}, generation FID "
            f"{' / '.join(f'{means[m]:.1f}' for m in sweep)} at {' / '.join(str(recon[m]['channels']) for m in sweep)} "
            f"channels; generation 4 vs 64 channels: {gen[0]}")
    recon_better = recon["kl_f4d64"]["rfid"] < recon["kl_f4d4"]["rfid"]
    # Each half on its own: a "no" only where neither holds or generation goes the other way.
    verdict = (gen[1] if gen[1] == PENDING else "no" if gen[1] == "no" or (not recon_better and gen[1] != "yes")
               else "yes" if recon_better and gen[1] == "yes"
               else "generation only; reconstruction not better" if gen[1] == "yes"
               else "reconstruction only; generation within seed spread")
    return text, verdict


def _sharing(records: Records) -> tuple[str, str] | None:
    recs = records.get("backbones", [])
    t = [r for r in recs if r.get("kind") == "timing" and r.get("group") == "sharing20"]
    base, shared = final_fids(records, "backbones", "ddt", "euler20"), final_fids(records, "backbones", "ddt", "euler20-dp10")
    if not t or not base or not shared:
        return None
    speed = statistics.mean(x["results"]["euler20"]["cpu_sec_per_image"] / x["results"]["euler20-dp10"]["cpu_sec_per_image"]
                            for x in t)
    out = compare(shared, base)
    assert out is not None
    return f"{speed:.2f}x faster at 10 of 20 encoder passes; FID {out[0]}", _as_good(out[1])


def other_teacher(records: Records, bench: str, student: str, teacher: str) -> str:
    """A note naming the seeds whose student started from another training of its teacher than the one the
    teacher's records measured (its ``init_sha256`` is none of their ``snapshot_sha256``): a teacher trained again,
    in a checkout without ``runs/`` and on another host, differs in float rounding. Empty when all match, or for
    records from before students named their start."""
    recs = records.get(bench, [])
    started = {int(r["seed"]): r["init_sha256"] for r in evals(recs, method=student) if "init_sha256" in r}
    measured: dict[int, set[str]] = {}
    for r in evals(recs, method=teacher):
        if "snapshot_sha256" in r:
            measured.setdefault(int(r["seed"]), set()).add(r["snapshot_sha256"])
    odd = sorted(s for s, sha in started.items() if s in measured and sha not in measured[s])
    return (f"; seed {', '.join(map(str, odd))}: the student started from another training of the teacher than its "
            "records measured" if odd else "")


def _within(bench: str, method: str, variant: str, baseline: str, base_variant: str,
            factor: float) -> Callable[[Records], tuple[str, str] | None]:
    """``method``'s final FID with ``variant`` within ``factor`` times ``baseline``'s with ``base_variant`` (per seed)."""

    def measure(records: Records) -> tuple[str, str] | None:
        a = final_fids(records, bench, method, variant)
        b = final_fids(records, bench, baseline, base_variant)
        seeds = sorted(set(a) & set(b))
        if not seeds:
            return None
        ratios = [a[s] / b[s] for s in seeds]
        verdict = "yes" if max(ratios) <= factor else "no" if min(ratios) > factor else "within seed spread"
        verdict = PENDING if len(seeds) < MIN_SEEDS else verdict
        text = (f"FID {statistics.mean(a[s] for s in seeds):.1f} vs {statistics.mean(b[s] for s in seeds):.1f}: "
                f"{statistics.mean(ratios):.2f}x ({' / '.join(f'{x:.2f}' for x in ratios)}; aim <= {factor:g}x)")
        return text + other_teacher(records, bench, method, baseline), verdict

    return measure


def _near_best(bench: str, method: str, variant: str, teacher: str, factor: float,
               unguided: bool = False) -> Callable[[Records], tuple[str, str] | None]:
    """``method``'s final FID with ``variant`` within ``factor`` times the best FID of ``teacher`` with any of its
    variants (per seed, the best picked per seed); ``unguided``: only the teacher's unguided samplers (for a student
    that distils the unguided teacher)."""

    def measure(records: Records) -> tuple[str, str] | None:
        a = final_fids(records, bench, method, variant)
        spec = bench_spec(bench)
        scales = {v.name: v.scale for v in spec.variants} if spec is not None else {}
        names = {r["variant"] for r in evals(records.get(bench, []), method=teacher)
                 if not unguided or scales.get(r["variant"], 1.0) == 1.0}
        per = [final_fids(records, bench, teacher, v) for v in sorted(names)]
        seeds = sorted(set(a).intersection(*[set(p) for p in per])) if per else []
        if not seeds:
            return None
        best = {s: min((p[s], v) for p, v in zip(per, sorted(names))) for s in seeds}
        ratios = [a[s] / best[s][0] for s in seeds]
        verdict = "yes" if max(ratios) <= factor else "no" if min(ratios) > factor else "within seed spread"
        verdict = PENDING if len(seeds) < MIN_SEEDS else verdict
        used = sorted({best[s][1] for s in seeds})
        text = (f"FID {statistics.mean(a[s] for s in seeds):.1f} vs the teacher's best{' unguided' if unguided else ''} "
                f"{statistics.mean(best[s][0] for s in seeds):.1f} ({', '.join(used)}): {statistics.mean(ratios):.2f}x "
                f"({' / '.join(f'{x:.2f}' for x in ratios)}; aim <= {factor:g}x)")
        return text + other_teacher(records, bench, method, teacher), verdict

    return measure


def _better_variants(records: Records, bench: str, a: tuple[str, str], b: tuple[str, str]) -> tuple[str, str] | None:
    out = compare(final_fids(records, bench, *a), final_fids(records, bench, *b))
    return None if out is None else (f"FID {out[0]} ({a[0]} {a[1]} vs {b[0]} {b[1]}, final point)"
                                     + other_teacher(records, bench, a[0], b[0]), out[1])


CLAIMS: tuple[Claim, ...] = (
    Claim("LightningDiT", "Yao et al. 2025", "the LightningDiT recipe (SwiGLU, RMSNorm, RoPE, logit-normal t, "
          "direction loss) converges much faster than DiT", _faster("backbones", "lightningdit", "dit", 0.5),
          "the ratio is set by DiT's steep last segment (FID 69.9 -> 28.4 from 64 to 96k) between coarse points; at equal "
          "images LightningDiT's FID is 2.2x lower (13.0 vs 28.4 at 96k), the paper's kind of gap; 16k points between "
          "64 and 96k would pin the ratio"),
    Claim("DDT", "Wang et al. 2025", "a decoupled encoder-decoder converges faster than a plain DiT of the same size",
          _better("backbones", "ddt", "dit")),
    Claim("DDT sharing", "Wang et al. 2025, Sec. 4.4", "sharing the encoder's condition across steps (DP schedule) "
          "speeds sampling at nearly the same FID", _sharing,
          "at 20 steps the encoder's output still moves between neighbouring steps (estimated reuse error 0.066); at 50 "
          "steps the same halving costs +1.2 FID (12.4 -> 13.6) for 1.43x, and the paper samples with 250 steps"),
    Claim("REPA", "Yu et al. 2025", "aligning block features to a foundation encoder reaches DiT's FID with "
          "17.5x fewer iterations", _faster("alignment", "dit_repa", "dit", 0.5),
          "REPA is ahead at every point (3 seeds: FID 97.4 vs 135.8 at 32k, 22.6 vs 29.3 at 96k; class accuracy 0.86 vs "
          "0.78), "
          "but the images-to-reach ratio is set by DiT's steep last segment between coarse points; and the "
          "yardstick's encoder is a small network trained on the same 4.5k digits, not DINOv2 from 142M images, so it "
          "holds little the denoiser cannot learn from the data (likely; the paper's 17.5x is SiT-XL on ImageNet)"),
    Claim("REPA, encoder", "Yu et al. 2025, Table 2", "a better encoder gives a larger gain",
          _better("alignment", "dit_repa", "dit_repa_enc1"),
          "the two encoders differ in token grid (8x8 vs 4x4) and training length, not in data or scale as the "
          "paper's encoders do; both are trained on the same digits, and at this size their difference is inside "
          "the seed spread (v1's seeds alone span 19.3-23.4)"),
    Claim("REG", "Wu et al. 2025", "entangling the encoder's class token converges faster than REPA",
          _better("alignment", "dit_reg", "dit_repa"),
          "the encoder's class token, from a network trained to tell 10 digits apart, carries little beyond the "
          "label the DiT is already conditioned on (likely), where DINOv2's carries image-level semantics. With a "
          "third seed of each the two are level within REG's spread (its seeds span 19.9-26.6 at 96k, REPA's "
          "22.3-22.8), and with the quick start's guidance too (6.5 vs 6.8, seeds overlap); on LightningDiT REG is "
          "level with the plain recipe (12.5 vs 12.3 at 96k, 3 seeds)"),
    Claim("VA-VAE, dilemma", "Yao et al. 2025", "a plain KL tokenizer with more channels reconstructs better but "
          "generates worse (f4: 4 vs 64 channels)", _dilemma,
          "reconstruction does not bind at f4 on 32 px digits: 4 channels already hold 256 numbers per digit, a "
          "quarter of its pixels (the paper's f16d16 holds 2% of a 256 px image's values, its d64 8%), so all six "
          "tokenizers reach the same reconstruction (rFID 0.20-0.40, PSNR 24.9-25.5 dB), set by their 64k-image "
          "training rather than by channels; generation worsens as the paper's does, steeply at 64 channels. An f8 "
          "sweep (4 x 4 latents: 6-100% of the pixels) would let the small end bind; not run"),
    Claim("VA-VAE, VF loss", "Yao et al. 2025", "aligning the latents with a foundation model (VF loss) recovers "
          "generation at the largest channel count", _better("yardstick_tokenizers", "vavae_f4d64", "kl_f4d64"),
          "where not: the recovery is partial, 12% of the FID (the paper's f16d64 with DINOv2: 35%, 36.8 -> 24.0 "
          "with LightningDiT-B), still far above 4 channels' 4.1; the encoder is a small network trained on the same "
          "digits, not DINOv2 (likely, as for REPA). At 4 channels the VF loss costs generation (5.7 vs 4.1, both "
          "seeds), at 16 it is level within the spread (7.7 vs 6.3); the paper finds it level at f16d16"),
    Claim("REPA on LightningDiT", "Yao et al. 2025; Yu et al. 2025", "alignment helps the stronger recipe too",
          _better("alignment", "lightningdit_repa", "lightningdit")),
    Claim("ECT", "Geng et al. 2024", "tuning a diffusion model into a consistency model gives 2-step samples near the "
          "diffusion model's many-step quality at a fraction of its training (aim: 2 steps within 1.5x of the "
          "teacher's Euler 20 FID after a third of its images)",
          _within("consistency", "ect", "cm2", "dit", "euler20", 1.5)),
    Claim("iCT", "Song & Dhariwal 2023", "consistency training from scratch samples in 2 steps better than a "
          "diffusion model of the same training does in 2 steps", lambda r: _better_variants(
              r, "consistency", ("ict", "cm2"), ("dit", "euler2")),
          "the budget: 96k images (3,000 steps at batch 32) where the paper trains 409.6M on CIFAR-10, and consistency "
          "training from scratch is known to be slow (ECT's motivation); the samples are not digits yet (class accuracy "
          "at chance, 0.10, though the labels reach both passes: tested), the loss still falls, and the quick start's "
          "lr 1e-3 was worse (seed 0, 16k images, 1-step FID 751 vs 473)"),
    Claim("Curriculum", "Kim et al. 2025", "training easy (high-noise) timesteps first converges faster",
          _faster("curriculum", "curriculum", "dit", 0.8),
          "seed 1's plain run ends lower (FID 25.2 against seed 0's 31.6), a harder target for its seed; both "
          "curriculum seeds are below both plain seeds at 64k and 96k (FID 18.6 vs 28.4 at 96k). The pacing is scaled "
          "to the run (patience 25, smoother 0.92): with the default smoother the curriculum never reached its last "
          "stages in 96k images"),
    Claim("2-RF++", "Lee et al. 2024", "a 2-rectified flow samples in 1 step better than its teacher does in 8 "
          "(issue 19's aim: 1-NFE FID below the teacher's 8-NFE Euler)",
          lambda r: _better_variants(r, "distill", ("rfpp", "rf1"), ("dit", "euler8")),
          "the budget, likely: 1,000 steps at the paper's ImageNet lr 1e-4 on 20k pairs (the paper: 5M pairs and far "
          "more steps), and the 1-step FID still falls steeply (seed 0: 140, 90, 57 at 8, 16, 32k); at 2 NFE the "
          "noise-reusing update (19.3) is already below the teacher's 8-NFE Euler (35.3). The lr 5e-4 row on the same "
          "pairs supports the budget reading: its 1-step students are below their own seed's teacher at 8 NFE (34.7 "
          "vs 38.9, 26.8 vs 30.2; next row)"),
    Claim("2-RF++, lr 5e-4", "Lee et al. 2024", "the same aim at 5x the paper's ImageNet lr on the same pairs "
          "(a sensitivity row: does the shortfall at lr 1e-4 come from the 1,000-step budget?)",
          lambda r: _better_variants(r, "distill", ("rfpp_lr5e-4", "rf1"), ("dit", "euler8")),
          "the ranges overlap because the teachers' seeds differ (Euler 8: 38.9 / 30.2, and 36.8 for the third "
          "seed, which has no student); paired by seed, each 1-step student is below its own teacher's 8 NFE (34.7 vs "
          "38.9, 26.8 vs 30.2), where at lr 1e-4 both were above (57.3, 46.6): the shortfall at the paper's lr is the "
          "1,000-step budget. Not the paper's setting: a sensitivity row"),
    Claim("2-RF++, guided", "Lee et al. 2024", "the same against the teacher the student learns from: its pairs' "
          "guidance (CFG 2) at the same 8 NFE (Euler 4 steps, 2 evaluations each)",
          lambda r: _better_variants(r, "distill", ("rfpp", "rf1"), ("dit", "euler4cfg2"))),
    Claim("CD", "Song et al. 2023", "consistency distillation samples in 2 steps near its teacher's best "
          "(aim as issue 20's: within 1.1x; CD distils the unguided teacher, so against its unguided samplers)",
          _near_best("distill", "cd", "cm2", "dit", 1.1, unguided=True),
          "the budget, likely: 1,000 steps (the paper: 600k-800k) and the 2-step FID still falling (seed 0: 45.2, "
          "40.0, 36.9 at 8, 16, 32k); pseudo-Huber instead of LPIPS (no VGG weights here). At the same budget from the "
          "same teacher CD's 2 steps (35.4) are level with ECT's (36.4, the consistency table)"),
    Claim("TDM", "Luo et al. 2025", "a 4-step student matches (or beats) its teacher's many-step quality "
          "(issue 20's aim: within 1.1x of the teacher's best)", _near_best("distill", "tdm", "tdm4", "dit", 1.1),
          "met on the mean of 3 seeds (1.08x), not by two of them (1.16, 1.16); those two are still improving at "
          "the end (seed 0: 10.9, 10.1, 9.4 at 8, 16, 32k; seed 2: 11.0, 10.5, 10.3), and the best they are judged "
          "against is the teacher's guided 20-40 NFE; at 4 NFE the student is below the guided teacher at 8 and 16 "
          "NFE on the mean (12.9 and 9.2). The paper compares with human preference at 1024 px, not FID against the teacher"),
    Claim("TDM-unify", "Luo et al. 2025", "one student for any step count, as good at 4 steps",
          _near_best("distill", "tdm_unify", "tdmu4", "dit", 1.1),
          "its seeds fall on both sides of the aim, as TDM's did: 1.09x on the mean of 3 seeds (1.16 / 0.96 / 1.15), "
          "two of them above. The third seed's student started from a re-training of its teacher (same config and "
          "seed; the first training's folder was lost with a checkout, and the two differ in float rounding), so "
          "its ratio is against the recorded teacher's best of seed 2, not its own teacher's (flagged); re-measuring "
          "that teacher would put TDM's seed-2 student on another teacher in turn, so the clean fix is TDM and "
          "TDM-unify seed 2 both from one training (about 1.2 h)"),
    Claim("SLAM", "Xu et al. 2024", "a 4-step student near its teacher's quality (aim as issue 20's: within 1.1x of "
          "the teacher's best)", _near_best("distill", "slam", "slam4", "dit", 1.1),
          "the sub-path part, measured: LCM, the same run with gamma = 1 only, reaches 47.5 / 16.3 / 10.8 at 1 / 2 / 4 "
          "steps where SLAM has 213 / 85 / 44 (seed 0, 16k; the 'SLAM vs LCM' row has both seeds at 32k). Along "
          "the trajectory it distils SLAM's student ends farther from the trajectory's end than it started at every "
          "level (RMS per pixel 0.023 vs 0.006 at the five lowest, 0.43 vs 0.35 at the top; bench/slam_levels.py, "
          "seed 0, 32k), and its 4-step FID rises from 16k to 32k on both seeds (44 -> 89, 45 -> 66); 18 levels "
          "instead of 50 do worse (seed 0, 16k: 264 / 126 / 75), so it is not the grid. Likely: the points "
          "x_gamma, shown at time t_s with noise between the two ends' levels, ask the 1.9M-parameter student for a "
          "gamma-indexed family of functions that 1,000 steps do not fit (the paper: ~6 A100-days from SD), and a "
          "velocity network reads them differently from the official epsilon network (4.6e-2 relative, "
          "'Distillation losses against the official code')"),
    Claim("SLAM vs LCM", "Xu et al. 2024", "consistency along sub-path linear ODEs (gamma embedded) beats LCM's "
          "endpoint-only consistency distillation at few steps (4 steps; LCM is the same run with gamma = 1 only)",
          lambda r: _better_variants(r, "distill", ("slam", "slam4"), ("lcm", "slam4")),
          "the SLAM row's reason: at this size and budget the sub-path points (gamma < 1) move the sampled gamma = 1 "
          "function away from the trajectory's end at every level, where LCM moves it towards it (bench/README.md, "
          "'Why SLAM falls short here'); the paper's comparison is SD-v1.5 after days of A100 training"),
    Claim("ScoreAug, 500 digits", "Hou et al. 2025", "augmenting the noisy input and the target together (the network "
          "told the transform) keeps a small data set from being memorised, at equal or better FID (here: 500 of the "
          "digits, to 384k images: 768 passes)", _scoreaug("scoreaug_500", "dit_500"),
          "the plain run memorises its 500 digits by 384k images (768 passes): its rate crosses the 0.5 of fresh "
          "digits between 192 and 384k (0.40 -> 0.55, both seeds above; its samples' median nearest-digit distance "
          "5.1 against the held-out digits' 5.4), where the full-data run stays at 0.35, so this is where it overfits "
          "by memorisation. Its FID against the whole split still falls, though (11.1 -> 6.6), only a little behind "
          "the full-data run's 6.2: the FID turning up, where the paper's FID gain comes from, is not reached, and "
          "ScoreAug's harder task costs learning speed (9.3). It does hold memorisation down, by 0.20 at the end and "
          "at matched FID on both seeds (0.36 vs 0.50 / 0.35 vs 0.42)"),
    Claim("ScoreAug", "Hou et al. 2025", "augmenting the noisy input and the target together (the network told the "
          "transform) keeps a small data set from being memorised, at equal or better FID (here: mnist5k's 4,500 "
          "training digits, 384k images)", _scoreaug("scoreaug", "dit"),
          "the plain run has not overfitted mnist5k by 384k images (85 passes): its memorisation rate stays below the "
          "held-out level 0.5 (0.15, 0.28, 0.35 at 96, 192, 384k) and its FID still falls (10.8 -> 6.2 from 192 to "
          "384k), so there is no overfitting yet for ScoreAug to prevent, and its harder task costs learning speed; "
          "at matched FID it does memorise less (0.27 vs 0.31). The paper's gains are where the baseline overfits; at "
          "the rate's growth here (+0.07 per doubling) that is near 2M images (4 h per run on this machine)"),
    Claim("Post-hoc EMA", "Karras et al. 2024", "the EMA length can be chosen after training: the best post-hoc "
          "reconstruction is as good as the best of the EMAs tracked during training", _posthoc_vs_ema),
    Claim("LCSC", "Liu et al. 2024", "a searched combination of saved checkpoints reaches the best EMA's quality with "
          "far less training (issue 21's aim: half the images)", _lcsc_saves,
          "the run is far from converged: its FID still halves every 24k images (the best post-hoc EMA at 24, 48, 72, "
          "96k: 134, 89, 46, 26), so no combination of the states up to 72k comes near the end's 25.7 (LCSC at 72k: "
          "41.1 / 40.4). It does buy training, on one seed at 24 and 48k and on both from 72k: at equal FID the "
          "post-hoc EMA needs 30k for seed 1's LCSC at 24k, 58k for seed 0's at 48k (47k on seed 1) and 81k / 75k "
          "for LCSC's 72k (11% / 4% saved there), and at 96k LCSC beats the best EMA of the whole run on both seeds "
          "(by 11% / 9%: 27.4 -> 24.5, 24.0 -> 21.8; fit to its fitness seeds at most 1.3). The paper's 23x / 15x are consistency training run to convergence "
          "(its weights at 830k-1,000k iterations), where the late checkpoints scatter around a plateau whose level "
          "a combination can reach early; here the states it combines (the last 20k images) still improve fast, so it "
          "gains on them (last state alone at 96k: 36.0 / 29.1) but cannot move far ahead of their training"),
    Claim("LCSC, 1 step", "Liu et al. 2024", "on a consistency model, LCSC at 1 NFE beats the EMA at 2 NFE",
          _lcsc_one_step,
          "the step gap: after 32k images of ECT tuning the second step nearly halves the EMA's FID (57.4 -> 31.4), "
          "where the paper's consistency models are trained to convergence and their second step gains about 17% "
          "(CD on CIFAR-10: 3.55 -> 2.93, Song et al. 2023). LCSC does improve the 1-step model, on both seeds and on "
          "seeds its fitness never saw (vs the EMA: 58.9 -> 51.8, 55.9 -> 43.4, of which the fit to its own seeds is "
          "0.5 / 1.1), by 17%: about the paper's step gap, not this one"),
)




def _evaluation(r: dict[str, Any]) -> tuple[Any, ...]:
    """What makes an evaluation record one evaluation: a re-evaluation of the same snapshot has the same FID (the
    sampling is seeded) but its own timing; a copy has both."""
    return r["snapshot"], r["variant"], r["num_images"], r["fid"], r.get("eval_seconds")


def cost(records: Records) -> str:
    """What the stored records cost on this machine, in single-thread process-hours: training (each run once, however
    many benches share it: its last point's images at its median s/kimg; the tokenizer table adds its tokenizers'
    training from their ``recon`` records) and evaluation (every stored FID's ``eval_seconds`` once: a record another
    bench adopted as it was, the tokenizer table's pixels row, is not counted again; rFID's ``seconds``). The
    yardstick runs two such processes at a time (``--jobs 2``), so its wall time on 2 cores is about half the total.
    Pair drawing (2-RF++), latent extraction and the averaging bench are not in these records and not counted."""
    seen: set[str] = set()
    counted: set[tuple[Any, ...]] = set()  # evaluations already counted (an adopted record is a copy, timing included)
    rows, totals = [], [0, 0.0, 0.0, 0, 0.0]
    for bench, label in [(b, b) for b in BENCH_MODULES] + [("yardstick_tokenizers", "tokenizers")]:
        recs = [r for r in evals(records.get(bench, [])) if _evaluation(r) not in counted]
        recon = [r for r in records.get(bench, []) if r.get("kind") == "recon"]
        if not recs and not recon:
            continue
        counted.update(_evaluation(r) for r in recs)
        runs: dict[str, dict[str, Any]] = {}
        for r in recs + recon:
            run = str(Path(r["snapshot"]).parent)
            if run not in seen and (run not in runs or r["kimg"] > runs[run]["kimg"]):
                runs[run] = r
        seen.update(runs)
        kimg = sum(r["kimg"] for r in runs.values())
        train_h = sum(r["kimg"] * r.get("train", {}).get("sec_per_kimg", 0.0) for r in runs.values()) / 3600
        eval_h = (sum(float(r.get("eval_seconds", 0.0)) for r in recs) + sum(float(r["seconds"]) for r in recon)) / 3600
        for i, v in enumerate((len(runs), kimg, train_h, len(recs) + len(recon), eval_h)):
            totals[i] += v
        rows.append([label, str(len(runs)), f"{kimg:,.0f}k", f"{train_h:.1f}", str(len(recs) + len(recon)),
                     f"{eval_h:.1f}", f"{train_h + eval_h:.1f}"])
    n, kimg, train_h, fids, eval_h = totals
    rows.append(["**all**", str(n), f"{kimg:,.0f}k", f"{train_h:.1f}", str(fids), f"{eval_h:.1f}",
                 f"**{train_h + eval_h:.1f}** (wall at 2 jobs: about {(train_h + eval_h) / 2:.1f})"])
    return table(["bench", "training runs (new)", "training images", "training, process-hours", "FIDs stored",
                  "evaluation, process-hours", "total, process-hours"], rows)


def claims(records: Records) -> str:
    """The claim table at the top of bench/README.md."""
    rows = []
    for c in CLAIMS:
        got = c.measure(records)
        shows, agrees = got if got is not None else ("not measured yet", "")
        rows.append([c.method, c.paper, c.claim, shows, agrees, c.reason])
    return table(["method", "paper", "claim", "yardstick (protocol v2, 2 seeds)", "agrees", "why not, where not"], rows)


TABLES: dict[str, Callable[[Records], str]] = {
    "claims": claims,
    "cost": cost,
    "backbones/fid_vs_kimg": lambda r: fid_vs_kimg(r, "backbones"),
    "backbones/fid_vs_nfe": lambda r: fid_vs_nfe(r, "backbones"),
    "backbones/quickstart": lambda r: at_last_point(r, "backbones", "qs"),
    "alignment/quickstart": lambda r: at_last_point(r, "alignment", "qs"),
    "backbones/sharing": lambda r: sharing(r, "backbones"),
    "redesign/throughput": lambda r: redesign(r, "redesign"),
    "redesign/ours_vs_diffusers": lambda r: ours_vs_diffusers(r, "redesign"),
    "fid_throughput": lambda r: fid_throughput(r, "fid_throughput"),
    "alignment/fid_vs_kimg": lambda r: fid_vs_kimg(r, "alignment"),
    "alignment/reach": lambda r: reach(r, "alignment", "dit"),
    "tokenizers": lambda r: tokenizers(r, "yardstick_tokenizers"),
    "consistency/few_step": lambda r: few_step(r, "consistency"),
    "distill/few_step": lambda r: few_step(r, "distill"),
    "curriculum/fid_vs_kimg": lambda r: fid_vs_kimg(r, "curriculum"),
    "curriculum/reach": lambda r: reach(r, "curriculum", "dit"),
    "curriculum/quickstart": lambda r: at_last_point(r, "curriculum", "qs"),
    "averaging": averaging,
    "scoreaug/fid_vs_kimg": lambda r: fid_vs_kimg(r, "scoreaug", methods=("dit", "scoreaug")),
    "scoreaug/memorisation": lambda r: memorisation(r, "scoreaug", methods=("dit", "scoreaug")),
    "scoreaug/fid_vs_kimg_500": lambda r: fid_vs_kimg(r, "scoreaug", methods=("dit_500", "scoreaug_500")),
    "scoreaug/memorisation_500": lambda r: memorisation(r, "scoreaug", methods=("dit_500", "scoreaug_500")),
    "scoreaug/quickstart": lambda r: at_last_point(r, "scoreaug", "qs"),
}


def render(text: str, records: Records) -> str:
    """The README with every marked table rebuilt."""

    def sub(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in TABLES:
            raise KeyError(f"README names table {name!r}; known: {sorted(TABLES)}")
        return m.group(1) + TABLES[name](records) + m.group(4)

    return MARKER.sub(sub, text)


# ----------------------------------------------------------------------------------------------------------
# Plots


def cost_series(records: Records, bench: str) -> dict[str, list[tuple[int, float, float]]]:
    """Per row and solver, at the row's last evaluated point: ``(NFE, FID, seconds per image)`` of each record.

    A row's series are split by solver and guidance (the teacher's Euler, Heun, DPM-Solver++ and guided Euler are
    four curves); every row of
    a bench counts, whatever its training length (the distilled students stop earlier than their teacher)."""
    spec = bench_spec(bench)
    variants = {v.name: v for v in spec.variants} if spec is not None else {}
    recs = [r for r in evals(records.get(bench, [])) if r["variant"] in variants]
    out: dict[str, list[tuple[int, float, float]]] = {}
    for row in spec.rows if spec is not None else ():
        mine = [r for r in recs if r["method"] == row.method]
        if not mine:
            continue
        last = max(r["kimg"] for r in mine)
        for r in mine:
            if r["kimg"] != last:
                continue
            v = variants[r["variant"]]
            solver = ((v.sampler or {}).get("solver") or {}).get("_target_", "samplers.sample_euler")
            guided = f", CFG {v.scale:g}" if v.scale != 1.0 else ""  # guided and unguided are separate curves
            key = f"{row.method} ({solver.rsplit('.', 1)[-1].removeprefix('sample_')}{guided}, {last:g}k)"
            out.setdefault(key, []).append((v.nfe, float(r["fid"]), float(r["sec_per_image"])))
    return out


def plot_fid_vs_cost(records: Records, bench: str, out_dir: Path) -> Path | None:
    """FID against NFE and against wall time per image, one curve per row and solver (``cost_series``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = cost_series(records, bench)
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, pts) in enumerate(sorted(series.items())):
        for ax, col in ((axes[0], 0), (axes[1], 2)):
            xs = sorted({p[col] for p in pts})
            mean = [statistics.mean(p[1] for p in pts if p[col] == x) for x in xs] if col == 0 else None
            if col == 0:
                ax.plot(xs, mean, "-o", color=f"C{i % 10}", label=name, ms=4)
            else:  # one point per record; the line joins the fastest record per NFE (the one least slowed by
                # other jobs on the shared CPU: timing noise only ever adds) at the mean FID
                by_nfe = sorted({p[0] for p in pts})
                ax.plot([1000 * min(p[2] for p in pts if p[0] == n) for n in by_nfe],
                        [statistics.mean(p[1] for p in pts if p[0] == n) for n in by_nfe], "-o", color=f"C{i % 10}",
                        ms=4)
            ax.scatter([p[col] * (1000 if col == 2 else 1) for p in pts], [p[1] for p in pts], s=8,
                       color=f"C{i % 10}", alpha=0.5)
    for ax, label in ((axes[0], "NFE per image"), (axes[1], "wall time per image (ms)")):
        ax.set_xscale("log", base=2 if ax is axes[0] else 10)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("yardstick FID")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{bench}: FID against sampling cost, each row at its last point", fontsize=9)
    fig.tight_layout()
    path = out_dir / f"{bench}_fid_vs_cost.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


COST_PLOTS = ("consistency", "distill")  # benches whose rows stop at different points (students after their teacher)


def plot(records: Records, out_dir: Path) -> list[Path]:
    """FID against training images (the main variant, every seed and the mean) and against NFE (last point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for bench in records:
        spec = bench_spec(bench)
        if spec is None:
            continue
        recs = evals(records[bench])
        main = next((v for v in spec.variants if v.at == "all"), None)
        plain = {v.name: v for v in spec.variants if v.sharing is None and v.scale == 1.0}
        # a bench with a cost plot has rows of several solvers: its NFE axis is drawn there, one curve per solver
        for kind in ("kimg",) if bench in COST_PLOTS else ("kimg", "nfe"):
            fig, ax = plt.subplots(figsize=(5.5, 4))
            drawn, lasts = False, set()
            for i, row in enumerate(spec.rows):
                if kind == "kimg":
                    rs = [r for r in recs if main is not None and r["method"] == row.method and r["variant"] == main.name]
                    pts = [(r["kimg"], r["fid"]) for r in rs]
                else:  # each row at its own last point (rows may have their own points)
                    mine = [r for r in recs if r["method"] == row.method and r["variant"] in plain]
                    last = max((r["kimg"] for r in mine), default=None)
                    pts = [(plain[r["variant"]].steps, r["fid"]) for r in mine if r["kimg"] == last]
                    lasts.update({last} if pts else set())
                if not pts:
                    continue
                xs = sorted({x for x, _ in pts})
                mean = [statistics.mean(f for x2, f in pts if x2 == x) for x in xs]
                color = f"C{i}"
                ax.plot(xs, mean, "-o", color=color, label=row.method)
                ax.scatter([x for x, _ in pts], [f for _, f in pts], s=10, color=color, alpha=0.5)
                drawn = True
            if not drawn:
                plt.close(fig)
                continue
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("training images (kimg)" if kind == "kimg" else "NFE (Euler steps)")
            counts = sorted({r["num_images"] for r in recs})
            ax.set_ylabel(f"yardstick FID ({', '.join(f'{n:,}' for n in counts)} samples)")
            title = f"{bench}: FID vs training images ({main.label if main else ''})" if kind == "kimg" else (
                f"{bench}: FID vs NFE at " + (f"{next(iter(lasts)):g} kimg" if len(lasts) == 1 else "each row's last point"))
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{bench}_fid_vs_{kind}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    for bench in COST_PLOTS:
        path = plot_fid_vs_cost(records, bench, out_dir)
        if path is not None:
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS_DIR)
    ap.add_argument("--readme", type=Path, default=README)
    ap.add_argument("--check", action="store_true", help="exit 1 if the README tables differ from the records")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    records = load(args.results)
    text = args.readme.read_text()
    new = render(text, records)
    if args.check:
        if new != text:
            print(f"{args.readme} is out of date; run python bench/tables.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.readme.write_text(new)
        print(f"updated {args.readme}")
    if not args.no_plots:
        for p in plot(records, args.results):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
