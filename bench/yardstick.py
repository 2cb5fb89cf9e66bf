"""The yardstick harness: train table rows through ``train.py``, evaluate their snapshots, keep one record each.

Every yardstick table in ``bench/README.md`` is measured the same way (the protocol is written there):

* **Training.** A row is a set of ``train.py`` overrides (an ``experiment=yardstick_*`` preset plus deltas); each
  (row, training seed) trains in its own run folder ``<runs>/<bench>/<method>-s<seed>`` up to the last evaluation
  point, writing snapshots every ``gcd`` of the points (8, 16, 32, 64 kimg -> every 8 kimg). Re-running resumes
  (``train.py`` resumes from the newest training state of its folder), and a finished run is not touched. Rows of
  different benches that train the same configuration share one run folder (``Row.run_group``), and a lock on the
  folder lets only one process train it at a time.
* **Evaluation.** A snapshot and a sampler config (``pipeline.SamplerSpec``: Euler 20 steps, no guidance unless a
  variant says otherwise) give the yardstick FID (``eval.generate.yardstick_metrics``: LeNet features of 1,000
  samples, seeds 0-999, labels drawn from the seeds, against the mnist5k training split), the class accuracy of the
  samples, and the wall and CPU seconds per image spent in sampling (feature extraction excluded).
* **Records.** One JSON record per (method, seed, kimg, variant) in ``bench/results/<bench>.json``, with the command
  that reproduces it (the bench script restricted to that record; ``--refresh`` recomputes it), the ``train.py``
  and evaluation commands, the snapshot's SHA-256 and the machine state. Evaluations are cached by that key, so a
  re-run computes only what is missing; several processes may share one file (``flock`` + atomic replace).
* **Timing.** Wall time per image under other jobs is noisy; variants that are compared for speed are also timed
  side by side (:func:`interleaved_timing`: the same seeds, alternating rounds, medians), stored as ``kind:
  "timing"`` records.

``bench/tables.py`` rebuilds the README tables and plots from the records. A bench script (e.g.
``bench/yardstick_backbones.py``) declares its rows and sampler variants and calls :func:`main`.

Command line (single evaluations, nothing stored)::

    python bench/yardstick.py eval runs/yardstick/backbones/ddt-s0/snapshot-000064000.safetensors --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any, Literal

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from gen.utils.ckpt import file_sha256, list_snapshots, load_snapshot_config, path_lock  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
# Protocol v2 (bench/README.md): FID at 16, 32, 64 and 96k images (the quick start's length), 1,000 samples.
DEFAULT_KIMG = (16.0, 32.0, 64.0, 96.0)
DEFAULT_NUM_IMAGES = 1000
# Seeds of the DP schedule's template samples: disjoint from the evaluation seeds 0..N-1.
TEMPLATE_SEEDS = tuple(range(10**6, 10**6 + 8))
GenerateFn = Callable[[list[int]], "tuple[torch.Tensor, torch.Tensor]"]


# ----------------------------------------------------------------------------------------------------------
# Sampler variants


def euler_config(
    steps: int, scale: float = 1.0, interval: Sequence[Any] | None = None, sharing: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A ``pipeline.SamplerSpec`` config: Euler on the uniform grid, optional CFG and DDT encoder sharing."""
    return {
        "solver": {"_target_": "samplers.sample_euler"},
        "steps": int(steps),
        "grid": {"_target_": "samplers.grids.uniform_grid"},
        "guidance": {"scale": float(scale), "interval": list(interval) if interval is not None else None},
        "sharing": dict(sharing) if sharing is not None else None,
    }


@dataclass(frozen=True)
class Variant:
    """How a snapshot is sampled for one table cell.

    Attributes:
        name: short unique name, used in records and on the command line (``euler20``, ``euler50-dp25``).
        steps: Euler steps (the NFE of one image without guidance).
        scale: CFG scale (1 = no guidance); ``interval`` limits it to ``[t_lo, t_hi]`` (data at t = 0; a third
            item ``"()"``, ``"[)"`` or ``"(]"`` opens ends, ``samplers.guidance``).
        sharing: DDT encoder sharing: None, ``("rate", r)`` (upstream's ``i % r == 0``) or ``("dp", k)`` (the
            statistical DP schedule with ``k`` encoder passes, from template samples drawn with this variant's
            guidance).
        methods: the rows it applies to (None = every row).
        at: evaluated at every kimg point ("all") or at the last one only ("last").
        label: what the tables call it.
        sampler: a whole ``pipeline.SamplerSpec`` config used instead of Euler (the consistency sampler); ``steps``
            is then its number of network evaluations.
    """

    name: str
    steps: int
    scale: float = 1.0
    interval: tuple[Any, ...] | None = None
    sharing: tuple[Literal["rate", "dp"], int] | None = None
    methods: tuple[str, ...] | None = None
    at: Literal["all", "last"] = "all"
    label: str = ""
    sampler: Mapping[str, Any] | None = None

    @property
    def nfe(self) -> int:
        """Network evaluations per image: one per Euler step, two with guidance (both branches batched)."""
        return self.steps * (2 if self.scale != 1.0 else 1)

    def encoder_passes(self) -> int:
        """Encoder passes per image (DDT sharing), one per recomputing step (a guided pass covers both branches)."""
        if self.sharing is None:
            return self.steps
        kind, n = self.sharing
        return len(range(0, self.steps, n)) if kind == "rate" else n

    def definition(self) -> dict[str, Any]:
        out = {"steps": self.steps, "scale": self.scale, "interval": self.interval, "sharing": self.sharing}
        if self.sampler is not None:  # only then: the stored records' keys of Euler variants stay as they were
            out["sampler"] = json.loads(json.dumps(self.sampler))
        return out


@dataclass(frozen=True)
class TimingGroup:
    """Variants whose sampling speed is compared side by side on the last snapshot of each of ``methods``."""

    name: str
    variants: tuple[str, ...]
    methods: tuple[str, ...] | None = None
    num_images: int = 100
    rounds: int = 3


@dataclass(frozen=True)
class Row:
    """One trained configuration of a table: its name, what the tables call it, and its ``train.py`` overrides.

    ``run_group`` names the folder group the run trains in (default: the bench's name); rows of several benches with
    the same overrides set it to one group so the configuration is trained once (the alignment table's plain DiT
    and LightningDiT rows are the backbone table's runs). ``kimg`` gives the row its own evaluation points (default:
    the bench's). ``init_from`` names another row of the bench whose last snapshot of the same seed the run starts
    from (``trainer.init.net``; ECT tunes the quick start's snapshot): that row is trained first. ``prepare`` is a
    command of this repository (arguments after the interpreter, with ``{init}`` and ``{run_dir}`` filled in) run
    before training, logged with it: a distillation student's pairs drawn from its teacher (``python -m distill.pairs``,
    itself resumable). ``seeds`` gives the row its own training seeds (default: the bench's): protocol v2 asks for a
    third seed where two rows' seed ranges overlap.
    """

    method: str
    overrides: tuple[str, ...]
    label: str = ""
    run_group: str | None = None
    kimg: tuple[float, ...] | None = None
    init_from: str | None = None
    prepare: tuple[str, ...] = ()
    # Training s/kimg assumed by ``yardstick_all.py --estimate`` until the row has logged its own (a method several
    # times the quick start's cost, such as TDM, would otherwise be estimated at the default); not in record keys.
    sec_per_kimg: float | None = None
    seeds: tuple[int, ...] | None = None


# The protocol's samplers: Euler 20 without guidance at every point, the quick start's sampler at the last.
EULER20 = Variant("euler20", 20, label="Euler 20")
QUICKSTART = Variant("qs", 20, scale=2.0, at="last", label="quick-start sampler (Euler 20, CFG 2)")


# ----------------------------------------------------------------------------------------------------------
# Training through train.py


def _kimg_str(k: float) -> str:
    return f"{k:g}"


def snapshot_interval(kimg: Sequence[float]) -> float:
    """The largest snapshot interval (kimg) whose multiples include every evaluation point."""
    nimg = [int(round(k * 1000)) for k in kimg]
    return reduce(math.gcd, nimg) / 1000


def run_logged(cmd: list[str], log_file: Path, threads: int, tag: str = "run") -> None:
    """Run a command of this repository (``cmd[0]`` the interpreter) from the root with ``threads`` threads, its
    output appended to ``log_file``; a non-zero exit raises, naming the log."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    print(f"[{tag}] {shlex.join(cmd[1:])}  (log: {log_file})", flush=True)
    t0 = time.time()
    with open(log_file, "a") as log:
        code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"{shlex.join(cmd[1:2])} failed (exit {code}); see {log_file}")
    print(f"[{tag}] done in {(time.time() - t0) / 60:.1f} min ({log_file.stem})", flush=True)


@dataclass(frozen=True)
class Run:
    """One (row, training seed) run folder."""

    bench: str
    row: Row
    seed: int
    kimg: tuple[float, ...]
    runs: Path
    init: Path | None = None  # the snapshot the network starts from (Row.init_from)

    @property
    def run_dir(self) -> Path:
        return self.runs / (self.row.run_group or self.bench) / f"{self.row.method}-s{self.seed}"

    def train_command(self, python: str = "python") -> list[str]:
        """``train.py`` with the row's overrides; sample grids and in-training FID are off (evaluated here)."""
        return [
            python, "train.py", *self.row.overrides, f"seed={self.seed}", f"name={self.bench}-{self.row.method}-s{self.seed}",
            f"run_dir={self.run_dir}", f"trainer.total_kimg={_kimg_str(max(self.kimg))}",
            f"trainer.snapshot_kimg={_kimg_str(snapshot_interval(self.kimg))}", "eval=none", "preview.images=0",
            "trainer.progress=false", "trainer.tensorboard=false",
        ] + ([f"++trainer.init.net={self.init}"] if self.init is not None else [])

    def snapshot_at(self, kimg: float) -> Path | None:
        """The snapshot written when training passed ``kimg`` (the first at or after it), or None."""
        target = int(round(kimg * 1000))
        for nimg, path in list_snapshots(self.run_dir):
            if nimg >= target:
                return path
        return None

    def trained(self) -> bool:
        return self.snapshot_at(max(self.kimg)) is not None

    def train(self, threads: int) -> None:
        """Run (or resume) the training; the output goes to ``<run_dir>.log``.

        A lock beside the folder (``gen.utils.ckpt.path_lock``, released when a process dies) makes a second
        bench that shares the run wait for the first instead of training the same folder at the same time.
        """
        if self.trained():
            return
        # The folder itself too: an override may name a sibling through it (``${run_dir}/../<row>-s<seed>/pairs``),
        # which the system resolves only where the run folder exists (train.py makes it after building the data).
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with path_lock(self.run_dir):
            if not self.trained():  # another bench may have finished it while this one waited
                if self.row.prepare:
                    fill = {"init": self.init, "run_dir": self.run_dir}
                    cmd = [sys.executable, *(a.format(**fill) for a in self.row.prepare)]
                    run_logged(cmd, self.run_dir.with_suffix(".log"), threads, "prepare")
                run_logged(self.train_command(sys.executable), self.run_dir.with_suffix(".log"), threads, "train")

    def train_summary(self, kimg: float) -> dict[str, Any]:
        """Training numbers up to ``kimg``: median s/kimg (load-dependent), last logged loss, batch, parameters."""
        stats = self.run_dir / "stats.jsonl"
        rows = [json.loads(line) for line in stats.read_text().splitlines() if line.strip()] if stats.exists() else []
        # Training lines are those with a speed (a tokenizer's loss is logged as "autoencoder/loss", not "loss").
        rows = [r for r in rows if "sec_per_kimg" in r and r["kimg"] <= kimg + 1e-9]
        out: dict[str, Any] = {}
        if rows:
            out["sec_per_kimg"] = statistics.median(r["sec_per_kimg"] for r in rows)
            for key in ("loss", "mse", "autoencoder/loss"):
                if key in rows[-1]:
                    out[key] = rows[-1][key]
        cfg = self.run_dir / "config.yaml"
        if cfg.exists():
            import yaml

            c = yaml.safe_load(cfg.read_text())
            out["batch_size"] = c["trainer"]["batch_size"]
        return out

    def remaining_kimg(self) -> float:
        """Training images (kimg) still to train to the last point (0 when trained)."""
        if self.trained():
            return 0.0
        done = max((int(p.name.split("-")[1].split(".")[0]) for p in self.run_dir.glob("state-*.pt")), default=0)
        return max(max(self.kimg) - done / 1000, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Records


class Store:
    """``bench/results/<bench>.json``: ``{"records": [...]}``, one record per key; safe for concurrent writers."""

    def __init__(self, file: Path) -> None:
        self.file = Path(file)

    def records(self) -> list[dict[str, Any]]:
        if not self.file.exists():
            return []
        return json.loads(self.file.read_text())["records"]

    def get(self, key: str) -> dict[str, Any] | None:
        return next((r for r in self.records() if r.get("key") == key), None)

    def put(self, record: dict[str, Any]) -> None:
        """Add ``record``, replacing the one with the same key; records stay sorted for readable diffs."""
        with path_lock(self.file):
            recs = [r for r in self.records() if r.get("key") != record["key"]] + [record]
            recs.sort(key=lambda r: (r.get("kind", "eval"), r.get("method", ""), r.get("variant", ""),
                                     r.get("kimg", 0), r.get("seed", 0)))
            tmp = self.file.with_name(f".{self.file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"records": recs}, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.file)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def machine() -> dict[str, Any]:
    """Where and under what load a number was measured (timings on a shared machine move with the load)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": _cpu_model(), "cores": os.cpu_count(),
            # The kernels' instruction set: records of hosts with different ones differ by float rounding, which
            # a training run amplifies into seed-noise-sized differences (README, the quick start's note).
            "isa": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "load_1min": round(load[0], 2), "torch": torch.__version__}


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def code_version() -> str:
    """The commit the numbers were measured at (``+dirty`` when tracked code differs, results excluded)."""
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--", ".", ":!bench/results", ":!bench/README.md"],
                                cwd=ROOT)
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------------------
# Evaluation


class Timed:
    """Wraps a ``generate_fn`` and adds up the wall and process CPU time spent in it (sampling and decoding)."""

    def __init__(self, fn: GenerateFn) -> None:
        self.fn, self.seconds, self.cpu_seconds, self.images = fn, 0.0, 0.0, 0

    def __call__(self, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.fn(seeds)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        self.images += len(seeds)
        return out


def load_generator(snapshot: Path) -> tuple[Any, dict[str, Any]]:
    from pipeline import generator_from_snapshot

    return generator_from_snapshot(str(snapshot))


def sampler_config(variant: Variant, gen: Any, run_dir: Path, snapshot: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The variant's sampler config for this snapshot, plus facts for the record (DP schedule, its error).

    A DP schedule is computed once per snapshot and variant from :data:`TEMPLATE_SEEDS` and saved next to the
    snapshot (``sharing-<snapshot>-<variant>.json``); the sampler reads it back through ``sharing: {schedule}``.
    """
    interval = variant.interval
    if variant.sampler is not None:
        return json.loads(json.dumps(variant.sampler)), {}
    if variant.sharing is None:
        return euler_config(variant.steps, variant.scale, interval), {}
    kind, n = variant.sharing
    stats = sharing_statistics(gen, euler_config(variant.steps, variant.scale, interval), run_dir, snapshot)
    from samplers.sharing import dp_schedule, save_schedule, schedule_error, uniform_steps

    sim = torch.tensor(stats["similarity"], dtype=torch.float64)
    if kind == "rate":
        steps = uniform_steps(variant.steps, n)
        return (euler_config(variant.steps, variant.scale, interval, {"rate": n}),
                {"recompute": steps, "estimated_error": schedule_error(sim, steps)})
    steps, err = dp_schedule(sim, n)
    file = run_dir / f"sharing-{snapshot.stem}-{variant.name}.json"
    save_schedule(file, steps, num_steps=variant.steps, estimated_error=err,
                  meta={"snapshot": snapshot.name, "templates": list(TEMPLATE_SEEDS), "sampler": variant.definition()})
    return (euler_config(variant.steps, variant.scale, interval, {"schedule": str(file)}),
            {"recompute": steps, "estimated_error": err})


def sharing_statistics(gen: Any, sampler: dict[str, Any], run_dir: Path, snapshot: Path) -> dict[str, Any]:
    """Encoder-output similarity of the template samples under the production sampler (cached as JSON).

    The templates go through ``Generator.generate`` itself with the network wrapped in
    ``EncoderSharing(..., record=True)`` (no sharing), so they see the real guidance: with CFG every recorded
    output holds the conditional and the unconditional rows, as the reference computes the statistics (MCG-NJU/DDT
    src/diffusion/stateful_flow_matching/sharing_sampling.py). The recorded images must equal the plain
    sampler's bit for bit, which checks that the recording changed nothing.
    """
    from gen.models.prediction import prediction_path
    from pipeline import MinRows, SamplerSpec
    from samplers.sharing import EncoderSharing, encoder_similarity

    # Sharing at rate 1 recomputes at every step (the same numbers as none) but makes guidance run both branches
    # at every step, so every recorded output has the same rows (also outside a guidance interval).
    sampler = {**sampler, "sharing": {"rate": 1}}
    file = run_dir / f"sharing-stats-{snapshot.stem}-{_digest(sampler)}.json"
    if file.exists():
        return json.loads(file.read_text())
    spec = SamplerSpec.from_config(sampler)
    ts = spec.time_grid(prediction_path(gen.prediction))
    # The pipeline puts EncoderSharing outside MinRows; recording there keeps padded rows out of the statistics.
    recorder = EncoderSharing(MinRows(gen.net, gen.min_rows), ts, record=True)
    rec_gen = dataclasses.replace(gen, net=recorder, min_rows=1)
    seeds = list(TEMPLATE_SEEDS)
    images, _ = rec_gen.generate(seeds, spec)
    if not torch.equal(images, gen.generate(seeds, spec)[0]):
        raise AssertionError("recording encoder outputs changed the samples")
    by_step: dict[int, torch.Tensor] = {}
    for step, z in recorder.history:
        by_step.setdefault(step, z)
    if sorted(by_step) != list(range(spec.steps)):
        raise AssertionError(f"recorded steps {sorted(by_step)} do not cover the {spec.steps} sampler steps")
    sim = encoder_similarity([by_step[i] for i in range(spec.steps)])
    out = {"snapshot": snapshot.name, "sampler": sampler, "templates": seeds,
           "rows_per_step": int(by_step[0].shape[0]), "similarity": sim.tolist()}
    file.write_text(json.dumps(out))
    return out


def evaluate(
    generate_fn: GenerateFn, num_images: int, dataset: str, cache_dir: str | None, batch_size: int, seed_offset: int = 0,
    memorisation: bool = False, trained_on: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Yardstick FID and class accuracy of ``num_images`` samples, with the sampling time per image (and the
    memorisation rate, ``eval.memorisation``, against ``trained_on`` (default: the training split) when asked)."""
    from eval.generate import yardstick_metrics

    timed = Timed(generate_fn)
    t0 = time.perf_counter()
    m = yardstick_metrics(timed, num_images, dataset, cache_dir, batch_size, seed_offset, memorisation, trained_on)
    extra = {k: float(m[k]) for k in ("memorisation_rate", "sample_nn_median", "heldout_nn_median") if k in m}
    return {
        **extra, "fid": float(m["fid"]), "class_accuracy": float(m.get("class_accuracy", float("nan"))),
        "sec_per_image": timed.seconds / max(timed.images, 1), "cpu_sec_per_image": timed.cpu_seconds / max(timed.images, 1),
        "eval_seconds": time.perf_counter() - t0,
    }


def interleaved_timing(fns: Mapping[str, GenerateFn], num_images: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Seconds per image of several samplers on the same seeds, alternating in every round (medians)."""
    seeds = list(range(num_images))
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))  # neither always runs first
        for k in order:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k](seeds)
            wall[k].append((time.perf_counter() - t0) / num_images)
            cpu[k].append((time.process_time() - c0) / num_images)
    return {k: {"sec_per_image": statistics.median(wall[k]), "cpu_sec_per_image": statistics.median(cpu[k]),
                "rounds_sec_per_image": wall[k]} for k in fns}


# ----------------------------------------------------------------------------------------------------------
# A bench: rows x seeds x kimg points x variants


@dataclass
class Bench:
    """What a bench script declares; :func:`main` runs it."""

    name: str
    description: str
    rows: Sequence[Row]
    variants: Sequence[Variant]
    timing: Sequence[TimingGroup] = ()
    script: str = ""
    seeds: tuple[int, ...] = (0, 1)
    kimg: tuple[float, ...] = DEFAULT_KIMG
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    memorisation: bool = False  # every evaluation also measures the memorisation rate (eval.memorisation)


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def parser(bench: Bench) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=bench.description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(r.method for r in bench.rows), help="rows to run (comma list)")
    ap.add_argument("--seeds", default=None, help="training seeds (comma list; default: the bench's, and each row's "
                    "own where it has more)")
    ap.add_argument("--kimg", default=",".join(map(_kimg_str, bench.kimg)), help="evaluation points (comma list)")
    ap.add_argument("--variants", default=",".join(v.name for v in bench.variants), help="sampler variants")
    ap.add_argument("--timing", default=",".join(t.name for t in bench.timing), help="timing groups ('' = none)")
    ap.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES, help="samples per FID (seeds 0..N-1)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "yardstick", help="root of the run folders")
    ap.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of the <bench>.json records")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (training and evaluation)")
    ap.add_argument("--jobs", type=int, default=1, help="(row, seed) workers at a time, each a subprocess")
    ap.add_argument("--batch-size", type=int, default=250, help="images per sampling batch")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "yardstick"), help="yardstick network cache")
    ap.add_argument("--skip-train", action="store_true", help="evaluate existing snapshots only")
    ap.add_argument("--refresh", action="store_true", help="recompute records that already exist")
    return ap


def record_command(bench: Bench, args: argparse.Namespace, method: str, seed: int, kimg: float | None,
                   variant: str | None, timing: str | None = None) -> str:
    """The bench command that recomputes exactly one record (add ``--refresh`` to replace a stored one)."""
    parts = ["python", bench.script, f"--methods={method}", f"--seeds={seed}",
             f"--kimg={_kimg_str(kimg) if kimg is not None else args.kimg}",
             f"--variants={variant or ''}", f"--timing={timing or ''}"]
    if args.num_images != DEFAULT_NUM_IMAGES:
        parts.append(f"--num-images={args.num_images}")
    default_runs = ROOT / "runs" / "yardstick"
    if args.runs.resolve() != default_runs:
        parts.append(f"--runs={rel_path(args.runs)}")
    return shlex.join(parts)


def rel_path(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it (records stay portable)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _eval_key(bench: str, row: Row, seed: int, kimg: float, variant: Variant, num_images: int) -> str:
    return f"{bench}|{row.method}|s{seed}|k{_kimg_str(kimg)}|{variant.name}|n{num_images}|" + _digest(
        [list(row.overrides), variant.definition()])


def row_kimg(row: Row, args_kimg: str | Sequence[float]) -> tuple[float, ...]:
    """The row's evaluation points: its own, else the command line's (the bench's by default)."""
    if row.kimg is not None:
        return tuple(row.kimg)
    return tuple(float(k) for k in (_split(args_kimg) if isinstance(args_kimg, str) else args_kimg))


def make_run(bench: Bench, row: Row, seed: int, args_kimg: str | Sequence[float], runs: Path,
             train_first: int | None = None) -> Run:
    """The run of (row, seed); with ``init_from`` its start snapshot is the named row's last one of the same seed,
    trained first when ``train_first`` (threads) is given, else its future path (for estimates)."""
    init = None
    if row.init_from is not None:
        rows = {r.method: r for r in bench.rows}
        if row.init_from not in rows:
            raise ValueError(f"row {row.method!r} starts from {row.init_from!r}, which is not a row of {bench.name}")
        teacher = make_run(bench, rows[row.init_from], seed, args_kimg, runs, train_first)
        if train_first is not None:
            teacher.train(train_first)
        init = teacher.snapshot_at(max(teacher.kimg))
        if init is None:
            if train_first is not None:
                raise SystemExit(f"{row.method}-s{seed} starts from {teacher.run_dir}, which has no snapshot at "
                                 f"{max(teacher.kimg):g} kimg; train it first (drop --skip-train)")
            init = teacher.run_dir / f"snapshot-{int(round(max(teacher.kimg) * 1000)):09d}.safetensors"
    return Run(bench.name, row, seed, row_kimg(row, args_kimg), runs, init)


def run_worker(bench: Bench, args: argparse.Namespace, row: Row, seed: int) -> None:
    """Train (or resume) one (row, seed) and compute its missing records."""
    store = Store(args.results / f"{bench.name}.json")
    run = make_run(bench, row, seed, args.kimg, args.runs.resolve(), None if args.skip_train else args.threads)
    kimg = run.kimg
    if row.kimg is not None and args.kimg != ",".join(map(_kimg_str, bench.kimg)):
        kimg = tuple(k for k in kimg if k in {float(x) for x in _split(args.kimg)})  # --kimg picks among the row's
    wanted = [v for v in bench.variants if v.name in _split(args.variants)
              and (v.methods is None or row.method in v.methods)]
    jobs = [(k, v) for v in wanted for k in (kimg if v.at == "all" else (max(kimg),))]
    todo = [(k, v) for k, v in jobs
            if args.refresh or store.get(_eval_key(bench.name, row, seed, k, v, args.num_images)) is None]
    groups = [g for g in bench.timing if g.name in _split(args.timing) and (g.methods is None or row.method in g.methods)]
    timing_key = {g.name: f"{bench.name}|timing|{g.name}|{row.method}|s{seed}|k{_kimg_str(max(kimg))}|"
                  + _digest([list(row.overrides), [v.definition() for v in bench.variants if v.name in g.variants],
                             g.num_images, g.rounds]) for g in groups}
    groups = [g for g in groups if args.refresh or store.get(timing_key[g.name]) is None]
    if not todo and not groups:
        print(f"[skip] {bench.name}/{row.method}-s{seed}: every record is stored", flush=True)
        return
    if not args.skip_train:
        run.train(args.threads)
    generators: dict[Path, Any] = {}

    def generator(snap: Path) -> Any:
        if snap not in generators:
            generators.clear()  # one network in memory at a time
            generators[snap] = load_generator(snap)[0]
        return generators[snap]

    from pipeline import SamplerSpec

    order = {v.name: i for i, v in enumerate(bench.variants)}
    for k, v in sorted(todo, key=lambda kv: (order[kv[1].name], kv[0])):  # declared order: main table first
        snap = run.snapshot_at(k)
        if snap is None:
            print(f"[miss] no snapshot at {k:g} kimg in {run.run_dir}", flush=True)
            continue
        gen = generator(snap)
        sampler, facts = sampler_config(v, gen, run.run_dir, snap)
        spec = SamplerSpec.from_config(sampler)
        print(f"[eval] {row.method}-s{seed} {k:g} kimg {v.name} ...", flush=True)
        m = evaluate(lambda seeds, gen=gen, spec=spec: gen.generate(seeds, spec), args.num_images,
                     _dataset(snap), args.cache, args.batch_size, memorisation=bench.memorisation,
                     trained_on=_trained_on(snap) if bench.memorisation else None)
        nimg = int(snap.name.split("-")[1].split(".")[0])
        record = {
            "kind": "eval", "key": _eval_key(bench.name, row, seed, k, v, args.num_images), "bench": bench.name,
            "method": row.method, "variant": v.name, "seed": seed, "kimg": k, "nimg": nimg, "nfe": v.nfe,
            "steps": v.steps, "guidance": v.scale, "encoder_passes": v.encoder_passes(), **m, **facts,
            "num_images": args.num_images, "sampler": _portable(sampler), "snapshot": rel_path(snap),
            # Trained parameters (the fixed sin-cos table is a parameter without gradient in the DiT family).
            "params": sum(p.numel() for n, p in gen.net.named_parameters() if n != "pos_embed"),
            "snapshot_sha256": file_sha256(snap), "train": run.train_summary(nimg / 1000),
            # The snapshot a student or tuned run started from (its teacher's): the tables check it is the snapshot
            # the teacher's records measured (a teacher trained again on another host differs in float rounding).
            **({"init_sha256": file_sha256(run.init)} if run.init is not None and run.init.is_file() else {}),
            "command": record_command(bench, args, row.method, seed, k, v.name),
            "train_command": shlex.join(run.train_command()).replace(str(ROOT) + "/", ""),
            "eval_command": eval_command(snap, sampler, args.num_images),
            "machine": machine(), "code": code_version(), "date": utc_now(),
        }
        store.put(record)
        print(f"        FID {m['fid']:.2f}  acc {m['class_accuracy']:.3f}  {1000 * m['sec_per_image']:.1f} ms/img "
              f"(eval {m['eval_seconds']:.0f} s)", flush=True)
    for g in groups:
        _time_group(bench, args, row, seed, run, g, timing_key[g.name], generator, store)

def _time_group(bench: Bench, args: argparse.Namespace, row: Row, seed: int, run: Run, g: TimingGroup, key: str,
                generator: Callable[[Path], Any], store: Store) -> None:
    """One timing record: the group's sampler variants timed interleaved on the last snapshot."""
    from pipeline import SamplerSpec

    snap = run.snapshot_at(max(run.kimg))
    if snap is None:
        return
    gen = generator(snap)
    variants = [v for v in bench.variants if v.name in g.variants]
    fns = {}
    extra = {}
    for v in variants:
        sampler, facts = sampler_config(v, gen, run.run_dir, snap)
        spec = SamplerSpec.from_config(sampler)
        fns[v.name] = lambda seeds, gen=gen, spec=spec: gen.generate(seeds, spec)
        extra[v.name] = {"nfe": v.nfe, "encoder_passes": v.encoder_passes(), **facts}
    print(f"[time] {row.method}-s{seed} {g.name}: {', '.join(fns)} ...", flush=True)
    res = interleaved_timing(fns, g.num_images, g.rounds)
    store.put({
        "kind": "timing", "key": key, "bench": bench.name, "group": g.name, "method": row.method,
        "seed": seed, "kimg": max(run.kimg), "variant": g.name, "num_images": g.num_images, "rounds": g.rounds,
        "results": {k: {**res[k], **extra[k]} for k in res}, "snapshot": rel_path(snap),
        "command": record_command(bench, args, row.method, seed, max(run.kimg), None, g.name),
        "machine": machine(), "code": code_version(), "date": utc_now(),
    })
    print("        " + ", ".join(f"{k} {1000 * r['sec_per_image']:.1f} ms/img" for k, r in res.items()), flush=True)


def _portable(sampler: dict[str, Any]) -> dict[str, Any]:
    """The sampler config with repository paths made relative (schedule files)."""
    out = json.loads(json.dumps(sampler))
    if out.get("sharing") and "schedule" in out["sharing"]:
        out["sharing"]["schedule"] = rel_path(Path(out["sharing"]["schedule"]))
    return out


def _dataset(snapshot: Path) -> str:
    return load_snapshot_config(snapshot)["data"]["name"]


def _trained_on(snapshot: Path) -> torch.Tensor:
    """The images the snapshot's run trained on (a row on a subset of the data measures memorisation against it)."""
    from gen.data.base import run_training_tensors

    return run_training_tensors(load_snapshot_config(snapshot)["data"])[0]


def utc_now() -> str:
    """The date of a record, UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def eval_command(snapshot: Path, sampler: Mapping[str, Any], num_images: int) -> str:
    return shlex.join(["python", "bench/yardstick.py", "eval", rel_path(snapshot), "--sampler",
                       json.dumps(_portable(dict(sampler)), separators=(",", ":")), f"--num-images={num_images}"])


def main(bench: Bench, argv: Sequence[str] | None = None) -> None:
    """Run a bench: every (row, seed) worker, ``--jobs`` at a time; each trains, then fills its missing records."""
    ap = parser(bench)
    if bench.extra_args is not None:
        bench.extra_args(ap)
    args = ap.parse_args(argv)
    rows = {r.method: r for r in bench.rows}
    methods = _split(args.methods)
    seeds = [int(s) for s in _split(args.seeds)] if args.seeds is not None else sorted(
        set(bench.seeds).union(*(r.seeds or () for r in bench.rows)))
    bad = [m for m in methods if m not in rows] + [v for v in _split(args.variants) if v not in
                                                    {x.name for x in bench.variants}]
    bad += [t for t in _split(args.timing) if t not in {g.name for g in bench.timing}]
    if bad:
        ap.error(f"unknown rows, variants or timing groups {bad}")
    torch.set_num_threads(args.threads)
    pairs = [(rows[m], s) for s in seeds for m in methods  # seed-major: a stopped run leaves whole seeds
             if args.seeds is not None or s in (rows[m].seeds or bench.seeds)]  # by default, each row its seeds
    if args.jobs <= 1 or len(pairs) == 1:
        for row, seed in pairs:
            run_worker(bench, args, row, seed)
        return
    # Each (row, seed) in its own process: small GEMMs use two cores better as two single-threaded processes.
    pending, running = list(pairs), []
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            row, seed = pending.pop(0)
            argv_w = _worker_argv(args, row.method, seed)
            log = args.runs.resolve() / bench.name / f"{row.method}-s{seed}.worker.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[worker] {row.method}-s{seed}: log {log}", flush=True)
            fh = open(log, "a")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
            proc = subprocess.Popen([sys.executable, str(ROOT / bench.script), *argv_w], cwd=ROOT, env=env,
                                    stdout=fh, stderr=subprocess.STDOUT)
            running.append((row.method, seed, proc, fh))
        time.sleep(5)
        for item in list(running):
            method, seed, proc, fh = item
            if proc.poll() is not None:
                fh.close()
                running.remove(item)
                print(f"[worker] {method}-s{seed} finished (exit {proc.returncode})", flush=True)
                if proc.returncode != 0:
                    failed.append(f"{method}-s{seed}")
    if failed:
        raise SystemExit(f"workers failed: {failed}")


def _worker_argv(args: argparse.Namespace, method: str, seed: int) -> list[str]:
    out = [f"--methods={method}", f"--seeds={seed}", f"--kimg={args.kimg}", f"--variants={args.variants}",
           f"--timing={args.timing}", f"--num-images={args.num_images}", f"--runs={args.runs}",
           f"--results={args.results}", f"--threads={args.threads}", f"--batch-size={args.batch_size}",
           f"--cache={args.cache}", "--jobs=1"]
    return out + (["--skip-train"] if args.skip_train else []) + (["--refresh"] if args.refresh else [])


# ----------------------------------------------------------------------------------------------------------
# python bench/yardstick.py eval SNAPSHOT ...: one evaluation, printed, nothing stored


def _cli(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Yardstick FID, class accuracy and s/img of one snapshot (prints JSON).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval", help="evaluate one snapshot")
    ev.add_argument("snapshot", type=Path)
    ev.add_argument("--sampler", default=None, help="a SamplerSpec config as JSON (default: Euler --steps)")
    ev.add_argument("--steps", type=int, default=20)
    ev.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES)
    ev.add_argument("--batch-size", type=int, default=250)
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--cache", default=str(ROOT / ".cache" / "yardstick"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pipeline import SamplerSpec

    gen, _ = load_generator(args.snapshot)
    sampler = json.loads(args.sampler) if args.sampler else euler_config(args.steps)
    spec = SamplerSpec.from_config(sampler)
    m = evaluate(lambda seeds: gen.generate(seeds, spec), args.num_images, _dataset(args.snapshot), args.cache,
                 args.batch_size)
    print(json.dumps({**m, "snapshot": str(args.snapshot), "sampler": sampler}, indent=1))


if __name__ == "__main__":
    _cli()
