"""What makes the yardstick cheaper at the same numbers: compile modes, attention kernels, sampling batch, layout.

The yardstick (bench/README.md, protocol v2) trains the quick start's backbone (DiT width 128, depth 6, patch 4 on
1x32x32 mnist5k, batch 32, AdamW 1e-3) on 2 CPU cores. This script measures, on that model and method built as
``train.py`` builds them (Hydra compose of ``configs/train.yaml`` plus ``--overrides``):

* ``train``: one training step as the loop runs it (``gen.train.batches.Batches`` -> per-sample streams
  ``SampleRandom`` -> ``make_batch`` -> the method's loss through ``PhaseModule`` -> backward -> gradient clipping ->
  fused AdamW -> EMA update), in several variants built from the same initial weights in one process:
  ``eager`` (the reference), ``eager_aa`` (a second eager copy: the A/A control, whose ratio shows the noise floor),
  ``compile`` (``torch.compile`` of the phase module: ``trainer.compile=true``),
  ``compile_maxautotune`` (``mode="max-autotune-no-cudagraphs"``), ``compile_blocks`` (``model.compile=true``:
  each DiT block compiled), ``sdpa_math`` (eager with the math attention kernel instead of the default CPU flash
  kernel), ``flush_denormal`` (eager with subnormal floats flushed to zero in forward and backward). First every
  variant runs ``--check-steps`` steps on the same batches and its losses are compared with eager's (relative
  difference; float rounding is ~1e-7). Then ``--rounds`` rounds run ``--steps`` steps of every variant, in an
  order that rotates each round, and each round gives the ratio eager time / variant time; the record holds every
  round's seconds per step and the median ratio. The eager steps are also split into their parts (data + random
  streams, forward, backward, clip + optimizer, EMA) to show where the time goes.
* ``sample``: ``pipeline.Generator`` with Euler 20 (no guidance, the yardstick's sampler at every point) on
  ``--sample-images`` seeds, at batch sizes ``--batch-sizes``, eager and ``torch.compile(net, dynamic=False)``,
  alternating per round; images are compared with eager's at the same batch (and eager across batch sizes,
  which must be identical: sampling is seeded per image).
* ``layout``: 1 process x 2 threads (OpenMP's default spin-waiting, and ``OMP_WAIT_POLICY=PASSIVE``) against 2
  processes x 1 thread running at the same time (eager steps, persistent worker processes, bursts in rotating
  order): aggregate training images per second of each layout.

The machine is shared and loaded (a background benchmark, other engineers' tests): absolute rates move by 2x within
minutes, so only the ratios of alternating rounds in the same process (or the same burst pattern) mean something;
every record says so. Records are appended to ``bench/results/yardstick_speed.json``.

    OMP_NUM_THREADS=2 python bench/yardstick_speed.py train --threads 2
    OMP_NUM_THREADS=2 python bench/yardstick_speed.py sample --threads 2
    python bench/yardstick_speed.py layout
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from gen.train.batches import Batches, make_batch  # noqa: E402
from gen.train.method import PhaseModule, Progress, param_groups  # noqa: E402
from gen.utils.build import TRAINING_PACKAGES, build  # noqa: E402
from gen.utils.seed import SampleRandom, derive_seed  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "yardstick_speed.json"
NOTE = ("shared, loaded 2-core machine: absolute rates move with the load; only the same-process alternating A/B "
        "ratios (medians over rounds) are meaningful")
TRAIN_VARIANTS = ("eager", "eager_aa", "compile", "compile_maxautotune", "compile_blocks", "sdpa_math", "flush_denormal")


# ----------------------------------------------------------------------------------------------------------
# The quick-start model and method, built as train.py builds them.


def compose_config(overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved training config (``configs/train.yaml`` + overrides) as plain containers."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def build_parts(c: dict[str, Any], compile_blocks: bool = False) -> tuple[Any, Any, Any]:
    """(method, dataset, tokenizer) as ``train.run`` builds them, with the same initial weights for a seed."""
    from train import _interface

    packages = TRAINING_PACKAGES + tuple(c.get("packages") or [])
    dataset = build(c["data"]["dataset"], allow=packages)
    tokenizer = build(c["tokenizer"], allow=packages)
    channels, size, _ = tokenizer.latent_shape(dataset.resolution)
    shape = {"in_channels": channels, "input_size": size, "num_classes": dataset.num_classes}
    model = {**c["model"], **({"compile": True} if compile_blocks else {})}
    torch.manual_seed(derive_seed("init", c["seed"]))
    available = {
        "net": lambda: build(model, allow=packages, **shape),
        "objective": lambda: build(c["objective"], allow=packages),
        "optimizer": lambda: build({**c["optim"], "_partial_": True}, allow=packages),
        "image_resolution": lambda: dataset.resolution,
        "image_channels": lambda: dataset.channels,
    }
    spec = c["method"]
    method = build(spec, allow=packages, **_interface(str(spec["_target_"]), packages, available))
    return method, dataset, tokenizer


class Stepper:
    """One training step of the loop (single phase, no accumulation, one process) for one variant.

    The learning rate is the optimizer's base rate from the first step (no warm-up), so that the first steps
    already move the weights and the loss comparison between variants covers several different weights.
    """

    def __init__(self, c: dict[str, Any], variant: str) -> None:
        if variant not in TRAIN_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {TRAIN_VARIANTS}")
        self.variant = variant
        method, dataset, self.tokenizer = build_parts(c, compile_blocks=variant == "compile_blocks")
        self.method = method.train()
        (spec,) = method.optimizers()
        modules = {n: method.trainable_modules()[n] for n in spec.modules}
        wd = spec.weight_decay
        if wd is None:
            wd = float(getattr(spec.factory, "keywords", {}).get("weight_decay", 0.0))
        self.params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
        self.opt = spec.factory(param_groups(modules.values(), wd))
        self.module: Any = PhaseModule(method, spec.name, modules)
        if variant == "compile":
            self.module = torch.compile(self.module)
        elif variant == "compile_maxautotune":
            self.module = torch.compile(self.module, mode="max-autotune-no-cudagraphs")
        from train import TRAINING_PACKAGES, _ema_factory

        self.ema = _ema_factory(c["ema"], TRAINING_PACKAGES)(method.net)  # the ema spec as train.py builds it
        self.trainer = c["trainer"]
        self.seed = int(c["trainer"]["seed"])
        self.batch = int(c["trainer"]["batch_size"])
        self.batches = Batches(dataset, self.batch, 0, 1, self.seed, 0, 0)
        self.nimg = 0
        self.parts = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "ema": 0.0}

    @contextlib.contextmanager
    def _kernel(self) -> Iterator[None]:
        if self.variant == "sdpa_math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                yield
        elif self.variant == "flush_denormal":  # subnormal floats are slow on x86; this flushes them to zero
            torch.set_flush_denormal(True)
            try:
                yield
            finally:
                torch.set_flush_denormal(False)
        else:
            yield

    def step(self, timed_parts: bool = False) -> float:
        """One optimizer step; returns the mean loss."""
        t0 = time.perf_counter()
        raw = self.batches.next()
        rng = SampleRandom(raw["position"].tolist(), namespace=f"train/{self.seed}", device=torch.device("cpu"))
        batch = make_batch(raw, self.tokenizer, rng, bool(self.trainer["hflip"]), torch.device("cpu"))
        t1 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with self._kernel():
            out = self.module(batch, rng, Progress(self.nimg, 96_000, self.nimg // self.batch))
            loss = out["loss"].float().mean()
            t2 = time.perf_counter()
            loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, float(self.trainer["grad_clip"] or float("inf")))
        self.opt.step()
        t4 = time.perf_counter()
        self.ema.update(self.method.net, self.nimg, self.batch)
        self.nimg += self.batch
        t5 = time.perf_counter()
        if timed_parts:
            for k, a, b in (("data", t0, t1), ("forward", t1, t2), ("backward", t2, t3), ("optimizer", t3, t4),
                            ("ema", t4, t5)):
                self.parts[k] += b - a
        return float(loss.detach())


# ----------------------------------------------------------------------------------------------------------
# Records.


def machine(threads: int) -> dict[str, Any]:
    load = os.getloadavg()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": threads,
            "load_1min_at_start": round(load[0], 2), "torch": torch.__version__, "host": platform.node()}


def code_version() -> str:
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
        dirty = subprocess.call(["git", "diff", "--quiet", "HEAD", "--", ".", ":!bench/results"], cwd=ROOT)
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_record(record: dict[str, Any], path: Path = RESULTS) -> None:
    """Append one record to the results file (``{"records": [...]}``), atomically."""
    data = json.loads(path.read_text()) if path.exists() else {"records": []}
    data["records"].append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _stamp(args: argparse.Namespace, part: str) -> dict[str, Any]:
    return {"bench": "yardstick_speed", "part": part, "command": "python " + shlex.join(sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(args.threads), "code": code_version(), "note": NOTE}


def _summary(ratios: list[float]) -> dict[str, float]:
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2], "min": min(ratios), "max": max(ratios)}


def _rotations(names: Sequence[str], rounds: int) -> Iterator[list[str]]:
    for r in range(rounds):
        k = r % len(names)
        order = list(names[k:]) + list(names[:k])
        yield order if r % 2 == 0 else order[::-1]


# ----------------------------------------------------------------------------------------------------------
# Parts.


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    c = compose_config(args.overrides)
    variants = [v for v in args.variants.split(",") if v]
    if variants[0] != "eager":
        variants = ["eager"] + [v for v in variants if v != "eager"]
    steppers: dict[str, Stepper] = {}
    losses: dict[str, list[float]] = {}
    compile_s: dict[str, float] = {}
    for v in variants:
        steppers[v] = Stepper(c, v)
        start = time.perf_counter()
        losses[v] = [steppers[v].step() for _ in range(args.check_steps)]  # the first steps compile
        compile_s[v] = time.perf_counter() - start
        print(f"[train] {v}: first {args.check_steps} steps {compile_s[v]:.1f} s, losses {losses[v]}", flush=True)
    check = {v: max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[v], losses["eager"])) for v in variants}
    per_step: dict[str, list[float]] = {v: [] for v in variants}
    for r, order in enumerate(_rotations(variants, args.rounds)):
        for v in order:
            start = time.perf_counter()
            for _ in range(args.steps):
                steppers[v].step(timed_parts=v == "eager")
            per_step[v].append((time.perf_counter() - start) / args.steps)
        line = "  ".join(f"{v} {per_step[v][-1] * 1000 / steppers[v].batch:.2f}" for v in variants)
        print(f"[train] round {r + 1}/{args.rounds} s/kimg: {line}", flush=True)
    ratios = {v: [e / t for e, t in zip(per_step["eager"], per_step[v])] for v in variants if v != "eager"}
    parts = steppers["eager"].parts
    total = sum(parts.values())
    record = {
        **_stamp(args, "train"),
        "model": c["model"], "batch_size": c["trainer"]["batch_size"], "steps_per_round": args.steps,
        "rounds": args.rounds, "check_steps": args.check_steps,
        "check_losses": losses, "check_max_rel_diff": check, "first_steps_s": compile_s,
        "sec_per_step": per_step,
        "speedup_vs_eager": {v: _summary(r) for v, r in ratios.items()},
        "eager_parts_fraction": {k: v / total for k, v in parts.items()},
    }
    return record


def bench_sample(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline import Generator, SamplerSpec

    c = compose_config(args.overrides)
    stepper = Stepper(c, "eager")
    for _ in range(args.warm_steps):  # move the weights off the zero init (adaLN-zero outputs 0 at first)
        stepper.step()
    net = copy.deepcopy(stepper.ema.averaged()).eval()
    with torch.no_grad():  # an EMA of a few steps is still near zero: use the trained weights' direction too
        for pe, pn in zip(net.parameters(), stepper.method.net.parameters()):
            pe.copy_(pn)
    prediction = stepper.method.snapshot_config()["prediction"]
    shape = stepper.tokenizer.latent_shape(c["data"]["resolution"])
    classes = int(c["data"]["num_classes"])
    sampler = SamplerSpec.from_config({"solver": {"_target_": "samplers.sample_euler"}, "steps": args.sample_steps,
                                       "grid": {"_target_": "samplers.grids.uniform_grid"},
                                       "guidance": {"scale": args.guidance, "interval": None}, "sharing": None})
    compiled = torch.compile(net, dynamic=False)
    gens = {"eager": Generator(net, prediction, stepper.tokenizer, shape, classes),
            "compile": Generator(compiled, prediction, stepper.tokenizer, shape, classes)}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    seeds = list(range(args.sample_images))

    def run(name: str, b: int) -> torch.Tensor:
        return torch.cat([gens[name].generate(seeds[i : i + b], sampler)[0] for i in range(0, len(seeds), b)])

    images: dict[str, torch.Tensor] = {}
    first_s: dict[str, float] = {}
    for b in sizes:
        for name in gens:
            start = time.perf_counter()
            images[f"{name}/{b}"] = run(name, b)
            first_s[f"{name}/{b}"] = time.perf_counter() - start
            print(f"[sample] first pass {name} batch {b}: {first_s[f'{name}/{b}']:.1f} s", flush=True)
    ref = images[f"eager/{sizes[0]}"]
    check = {k: {"pixels_differing": int((v != ref).sum()), "max_abs": int((v.int() - ref.int()).abs().max())}
             for k, v in images.items()}
    keys = [f"{n}/{b}" for b in sizes for n in gens]
    secs: dict[str, list[float]] = {k: [] for k in keys}
    for r, order in enumerate(_rotations(keys, args.rounds)):
        for k in order:
            name, b = k.split("/")
            start = time.perf_counter()
            run(name, int(b))
            secs[k].append(time.perf_counter() - start)
        print(f"[sample] round {r + 1}/{args.rounds}: " + "  ".join(f"{k} {secs[k][-1]:.1f}s" for k in keys), flush=True)
    base = f"eager/{args.base_batch}" if f"eager/{args.base_batch}" in secs else keys[0]
    speed = {k: _summary([e / t for e, t in zip(secs[base], secs[k])]) for k in keys if k != base}
    return {
        **_stamp(args, "sample"),
        "model": c["model"], "sampler": {"solver": "euler", "steps": args.sample_steps, "guidance": args.guidance},
        "images": args.sample_images, "rounds": args.rounds, "baseline": base,
        "images_vs_first_eager": check, "first_pass_s": first_s, "seconds": secs, "speedup_vs_baseline": speed,
    }


def _worker(args: argparse.Namespace) -> None:
    """A persistent training process: reads ``<steps>`` lines, answers seconds per step (eager)."""
    torch.set_num_threads(args.threads)
    stepper = Stepper(compose_config(args.overrides), "eager")
    stepper.step()
    print("ready", flush=True)
    for line in sys.stdin:
        n = int(line)
        start = time.perf_counter()
        for _ in range(n):
            stepper.step()
        print((time.perf_counter() - start) / n, flush=True)


def bench_layout(args: argparse.Namespace) -> dict[str, Any]:
    def spawn(threads: int, passive: bool = False) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        if passive:  # idle OpenMP threads sleep instead of spinning (matters when the cores are shared)
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", "--threads", str(threads),
               *[f"--override={o}" for o in args.overrides]]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        return p

    def burst(procs: Sequence[subprocess.Popen], steps: int) -> list[float]:
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{steps}\n")
            p.stdin.flush()
        return [float(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]

    workers = {"1x2": [spawn(2)], "1x2_passive": [spawn(2, passive=True)], "2x1": [spawn(1), spawn(1)]}
    batch = int(compose_config(args.overrides)["trainer"]["batch_size"])
    rates: dict[str, list[float]] = {k: [] for k in workers}
    try:
        for r, order in enumerate(_rotations(list(workers), args.rounds)):
            for layout in order:
                # A layout's processes run at the same time; its rate is the sum of theirs.
                rates[layout].append(sum(batch / s for s in burst(workers[layout], args.steps)))
            print(f"[layout] round {r + 1}/{args.rounds} img/s: " + "  ".join(
                f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    finally:
        for p in (q for procs in workers.values() for q in procs):
            p.kill()
            p.wait()
    ratios = {k: _summary([b / a for a, b in zip(rates["1x2"], rates[k])]) for k in workers if k != "1x2"}
    return {**_stamp(args, "layout"), "steps_per_burst": args.steps, "rounds": args.rounds,
            "images_per_s": rates, "aggregate_vs_1x2": ratios}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("part", choices=["train", "sample", "layout", "_worker"])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (train, sample)")
    ap.add_argument("--override", dest="overrides", action="append", default=[],
                    help="a Hydra override of the training config (repeatable), e.g. experiment=yardstick_dit")
    ap.add_argument("--variants", default=",".join(TRAIN_VARIANTS), help="train: comma-separated variants")
    ap.add_argument("--check-steps", type=int, default=4, help="train: steps compared with eager's losses")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8, help="train/layout: steps per variant and round")
    ap.add_argument("--warm-steps", type=int, default=30, help="sample: training steps before sampling")
    ap.add_argument("--sample-images", type=int, default=1000)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--batch-sizes", default="50,125,250,500,1000")
    ap.add_argument("--base-batch", type=int, default=250, help="sample: the ratios' baseline (eager at this batch)")
    ap.add_argument("--no-record", action="store_true", help="print the record instead of appending it")
    args = ap.parse_args(argv)
    if args.part == "_worker":
        _worker(args)
        return 0
    torch.set_num_threads(args.threads)
    bench: Callable[[argparse.Namespace], dict[str, Any]] = {
        "train": bench_train, "sample": bench_sample, "layout": bench_layout}[args.part]
    record = bench(args)
    print(json.dumps({k: v for k, v in record.items() if k not in ("sec_per_step", "seconds", "check_losses")},
                     indent=1, default=str))
    if not args.no_record:
        write_record(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
