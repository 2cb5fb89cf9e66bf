"""LCSC search: the linear combination of a run's last saved checkpoints with the best yardstick FID (or, with
``--ref STATS.npz``, the best FID against reference statistics: Inception or DINOv2, ``scripts.scoring``).

    python -m scripts.lcsc runs/quickstart --last 6 --fitness-images 500 --rescore-images 2000 [--at-kimg 64] \\
        [--source snapshots|states] [--population 12 --generations 8 --max-norm 5 --seed 0] [--kind euler --steps 8]
    python sample.py snapshot=runs/quickstart/lcsc.safetensors
    torchrun --nproc_per_node=8 -m scripts.lcsc RUN --ref in256_inception.npz --weights pt_inception-2015-12-05.pth

"Linear Combination of Saved Checkpoints Makes Consistency and Diffusion Models Better" (Liu et al., ICLR 2025).
The search (``distill.lcsc.search``) scores each coefficient vector by the FID of ``--fitness-images`` samples on the
fixed seeds 0.. of the combined checkpoints, sampled with the snapshot's own sampler or ``--kind`` / ``--steps`` (any sampler, 1-step consistency
sampling included). After every generation the search is written to ``OUT.search.json``: a killed search, run again
with the same arguments, continues to the same result. The winner is written by ``gen.averaging.combine`` as an
ordinary snapshot (OUT) and re-scored on an independent, larger seed set (seeds from 1,000,000), beside the last
checkpoint alone, so that overfitting to the fitness seeds shows; both go to ``OUT.json`` with the search's cost.

Under ``torchrun --nproc_per_node=N -m scripts.lcsc ...`` every fitness evaluation is spread over the N processes
(each generates its share of the seeds; the statistics are reduced), which run the same search; one writes the files.

Sources: ``snapshots`` (the run's snapshots, ``snapshot-<nimg>.safetensors``, the first EMA profile) or ``states``
(the raw weights of its training states; keep enough with ``trainer.keep_states``). Exit status: 0 written, 2 refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from distill.lcsc import SearchSettings, search
from gen.averaging import CheckpointSet, buffer_names
from gen.utils import dist
from gen.utils.ckpt import atomic_write, list_snapshots, list_training_states
from gen.utils.cli import CommandError, check_writable_file, float_arg, int_arg, printable, run_main
from gen.utils.dist import print0
from scripts.scoring import MAX_IMAGES, Scorer, add_scoring_args, make_scorer, metric_name, scoring_context

PROG = "python -m scripts.lcsc"
RESCORE_SEED_OFFSET = 1_000_000


def checkpoints(run: Path, source: str, last: int, at_kimg: float | None = None) -> tuple[list[Path], Path]:
    """The last ``last`` checkpoints of ``run`` up to ``at_kimg`` (oldest first) and the reference snapshot (the
    newest snapshot up to then)."""
    until = math.inf if at_kimg is None else int(round(at_kimg * 1000))
    snaps = [p for n, p in list_snapshots(run) if n <= until]
    if not snaps:
        raise CommandError(f"{printable(run)} holds no snapshot-<nimg>.safetensors"
                           + ("" if at_kimg is None else f" up to kimg {at_kimg:g}") + "; give the folder of a train.py run")
    found = snaps if source == "snapshots" else [p for n, p in list_training_states(run) if n <= until]
    if last < 2 or len(found) < last:
        fix = "trainer.keep_states" if source == "states" else "trainer.snapshot_kimg"
        upto = "" if at_kimg is None else f" up to kimg {at_kimg:g}"
        raise CommandError(f"--last {last}: {printable(run)} holds {len(found)} {source}{upto}; LCSC needs at least 2 and at "
                           f"most what the run kept (a smaller --last, or train with more: {fix})")
    return found[-last:], snaps[-1]


HOLD_LIMIT_BYTES = 8 * 2**30  # sources held in memory up to this total (see checkpoint_set)


def checkpoint_set(paths: list[Path], reference: Path, args: argparse.Namespace) -> CheckpointSet:
    """The sources of every combination of the search, held in memory where they total under ``HOLD_LIMIT_BYTES``
    and ``--stream`` is not given: a fitness evaluation then reads no checkpoint (each is read once), where streaming
    reads the n training states at each of the ~100 evaluations. The combinations are the same, bit for bit."""
    sources = CheckpointSet(paths, reference, args.state_key, buffer_names(reference))
    if not args.stream and len(paths) * sources.nbytes <= HOLD_LIMIT_BYTES:
        sources.hold()
    return sources


def fitness_of(sources: CheckpointSet, score: Scorer, work: Path, seed_offset: int,
               num_images: int) -> Callable[[np.ndarray], float]:
    """FID of the combination ``alpha`` on a fixed seed set (the combined snapshot is written into ``work``)."""
    candidate = work / "candidate.safetensors"

    def fitness(alpha: np.ndarray) -> float:
        sources.combine(alpha.tolist(), candidate, {"method": "lcsc_candidate"})
        return score(candidate, num_images, seed_offset)

    return fitness


def run_search(args: argparse.Namespace) -> dict[str, Any]:
    """Search, write the winner and the record; returns the record."""
    run = Path(args.run)
    if not run.is_dir():
        raise CommandError(f"{printable(run)} is not a run folder; give the folder train.py wrote")
    paths, reference = checkpoints(run, args.source, args.last, args.at_kimg)
    out = check_writable_file(args.out or run / "lcsc.safetensors", "--out",
                              {**{f"checkpoint {p.name}": p for p in [*paths, reference]}, "--ref": args.ref})
    settings = SearchSettings(population=args.population, generations=args.generations, elite=args.elite,
                              mutation_std=args.mutation_std, max_norm=args.max_norm, seed=args.seed)
    settings.check(len(paths), {k: "--" + k.replace("_", "-") for k in
                                ("population", "generations", "elite", "mutation_std", "max_norm")})
    score = make_scorer(reference, args, {"--fitness-images": args.fitness_images,
                                          "--rescore-images": args.rescore_images})
    with tempfile.TemporaryDirectory(prefix="lcsc-") as tmp:
        sources = checkpoint_set(paths, reference, args)
        fitness = fitness_of(sources, score, Path(tmp), 0, args.fitness_images)
        context = {"sources": [[p.name, d] for p, d in zip(paths, sources.digests())],
                   "fitness_images": args.fitness_images,
                   **scoring_context(args), "state_key": args.state_key}
        found = search(len(paths), fitness, settings, out.with_suffix(".search.json"),
                       lambda r: print0(f"generation {r['generation']}: best FID {r['best']:.3f}, mean "
                                        f"{r['mean']:.3f}, {r['evaluations']} evaluated"), context, dist.is_main())
        dist.barrier()  # the state is written before any process starts the next step
        rescore = fitness_of(sources, score, Path(tmp), RESCORE_SEED_OFFSET, args.rescore_images)
        last_alone = np.eye(len(paths))[-1]
        # The last checkpoint alone is in the first population, so its fitness is known: the gap between fitness and
        # re-score of the winner, against the same gap of the last checkpoint, is the overfitting to the fitness seeds
        # (FID's bias from the sample count is in both).
        record = {"alpha": found.alpha.tolist(), "sources": [p.name for p in paths], "fitness_fid": found.fitness,
                  "rescore_fid": rescore(found.alpha), "last_fitness_fid": found.score_of(last_alone),
                  "last_rescore_fid": rescore(last_alone),
                  "fitness_images": args.fitness_images, "rescore_images": args.rescore_images,
                  "evaluations": found.evaluations, "search_seconds": found.seconds, "history": found.history,
                  "settings": dataclasses.asdict(settings),
                  "sampler": {"kind": args.kind, "steps": args.steps, "cfg": args.cfg}, "metric": metric_name(args)}
    if dist.is_main():
        sources.combine(found.alpha.tolist(), out, {"method": "lcsc", "name": "lcsc",
                                                    **{k: record[k] for k in ("fitness_fid", "rescore_fid", "settings")}})
        text = json.dumps(record, indent=1)
        atomic_write(out.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))
    dist.barrier()
    print0(f"LCSC over {len(paths)} {args.source}: fitness FID {found.fitness:.3f}, re-scored {record['rescore_fid']:.3f} "
          f"(last checkpoint alone {record['last_rescore_fid']:.3f}), {found.evaluations} evaluations in "
          f"{'an untimed resume' if found.seconds is None else f'{found.seconds:.0f} s'} -> {printable(out)}")
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SearchSettings()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("run", help="the run folder")
    p.add_argument("--last", type=int_arg(2), default=6, help="how many of the last checkpoints to combine")
    p.add_argument("--source", choices=["snapshots", "states"], default="snapshots")
    p.add_argument("--at-kimg", type=float_arg(0), default=None, help="use the checkpoints up to this time (default: all)")
    p.add_argument("--state-key", default="module.net", help="weights read from training states (--source states)")
    p.add_argument("--stream", action="store_true",
                   help="read the checkpoints at every fitness evaluation (memory of two models) instead of holding "
                        "them in memory (the default where they total under 8 GiB)")
    p.add_argument("--out", default=None, help="the snapshot to write (default RUN/lcsc.safetensors)")
    p.add_argument("--fitness-images", type=int_arg(2, MAX_IMAGES), default=500)
    p.add_argument("--rescore-images", type=int_arg(2, MAX_IMAGES), default=2000)
    p.add_argument("--population", type=int_arg(2), default=d.population)
    p.add_argument("--generations", type=int_arg(0), default=d.generations)
    p.add_argument("--elite", type=int_arg(1), default=d.elite)
    p.add_argument("--mutation-std", type=float_arg(0), default=d.mutation_std)
    p.add_argument("--max-norm", type=float_arg(0), default=d.max_norm)
    p.add_argument("--seed", type=int_arg(0), default=d.seed)
    add_scoring_args(p, "the fitness")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def go() -> int:
        if args.fitness_images < 2 or args.rescore_images < 2:
            raise CommandError("--fitness-images and --rescore-images must be at least 2 (FID needs a covariance)")
        dist.init_distributed()
        run_search(args)
        return 0

    return run_main(go, PROG)


if __name__ == "__main__":
    sys.exit(main())
