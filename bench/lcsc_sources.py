"""What holding LCSC's checkpoints in memory saves per fitness evaluation.

An LCSC fitness evaluation combines the last n checkpoints with new coefficients and scores the result. Streamed
(``scripts.lcsc --stream``, memory of two models) each evaluation reads and checks the n training states again;
held (the default where they total under 8 GiB) they are read once. This script times the combination step both
ways on the same sources in one process, in alternating rounds (the order rotating every round), and checks that
both give the same tensors. Sources: the last ``--last`` training states of a run folder (``--run``, up to
``--at-kimg``), or, with ``--synthetic-mparams M``, n training states written here of one float32 tensor of M
million parameters with Adam's two moments beside it (a training state's size, three times the weights).

    nice -n 10 python bench/lcsc_sources.py --run runs/yardstick/averaging/phema-s0 --at-kimg 48
    python bench/lcsc_sources.py --synthetic-mparams 50

Records are appended to ``bench/results/lcsc_sources.json``. The machine is shared: only the ratio of alternating
rounds means something, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gen.averaging import CheckpointSet, buffer_names, combine  # noqa: E402
from gen.utils.ckpt import atomic_write, save_snapshot, save_training_state  # noqa: E402
from scripts.lcsc import checkpoints  # noqa: E402


def synthetic_sources(folder: Path, n: int, mparams: float) -> tuple[list[Path], Path]:
    """n training states of one tensor of ``mparams`` million float32 values (with two Adam moments) and a
    reference snapshot of the same tensor."""
    size = int(mparams * 1e6)
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        w = torch.randn(size, generator=g)
        p = folder / f"state-{i:09d}.pt"
        save_training_state(p, {"registry": {"module.net": {"w": w},
                                             "optimizer": {"exp_avg": torch.randn(size, generator=g),
                                                           "exp_avg_sq": torch.rand(size, generator=g)}}})
        paths.append(p)
    ref = folder / "snapshot.safetensors"
    save_snapshot(ref, {"w": torch.zeros(size)}, {"model": {"_target_": "synthetic"}})
    return paths, ref


def measure(paths: list[Path], ref: Path, buffers: list[str], rounds: int, evals: int,
            work: Path) -> dict[str, object]:
    """Median seconds per combination written as a candidate snapshot, as a fitness evaluation does it, held
    (``CheckpointSet.combine``) and streamed (``combine``, which reads the reference and the n sources each time),
    over ``rounds`` alternating rounds of ``evals`` each."""
    rng = np.random.default_rng(0)
    alphas = [list(rng.normal(size=len(paths))) for _ in range(evals)]
    t0 = time.perf_counter()
    held = CheckpointSet(paths, ref, buffers=buffers, in_memory=True)
    hold_s = time.perf_counter() - t0
    out = work / "candidate.safetensors"

    def streamed(alpha: list[float]) -> dict[str, torch.Tensor]:
        return combine(paths, alpha, ref, out, {"method": "lcsc_candidate"}, buffers=buffers)

    def held_one(alpha: list[float]) -> dict[str, torch.Tensor]:
        return held.combine(alpha, out, {"method": "lcsc_candidate"})

    a, b = held_one(alphas[0]), streamed(alphas[0])
    identical = all(torch.equal(a[k], b[k]) for k in a)
    per: dict[str, list[float]] = {"held": [], "streamed": []}
    for r in range(rounds):
        for name in (("held", "streamed") if r % 2 == 0 else ("streamed", "held")):
            one = held_one if name == "held" else streamed
            t = time.perf_counter()
            for alpha in alphas:
                one(alpha)
            per[name].append((time.perf_counter() - t) / evals)
    ratios = [s / h for s, h in zip(per["streamed"], per["held"])]
    return {"identical": identical, "hold_seconds": hold_s, "held_s_per_eval": statistics.median(per["held"]),
            "streamed_s_per_eval": statistics.median(per["streamed"]), "speedup_median": statistics.median(ratios),
            "speedup_min_max": [min(ratios), max(ratios)], "rounds": per}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--run", default=None, help="a run folder with training states (state-*.pt)")
    p.add_argument("--at-kimg", type=float, default=None)
    p.add_argument("--last", type=int, default=6)
    p.add_argument("--synthetic-mparams", type=float, default=None, help="synthetic states of this many M values")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--evals", type=int, default=3, help="combinations per round and way")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "lcsc_sources.json"))
    args = p.parse_args(argv)
    if (args.run is None) == (args.synthetic_mparams is None):
        p.error("give --run RUN (its training states) or --synthetic-mparams M, one of them")
    with tempfile.TemporaryDirectory() as tmp:
        if args.run is not None:
            paths, ref = checkpoints(Path(args.run), "states", args.last, args.at_kimg)
            buffers, what = buffer_names(ref), f"{Path(args.run).name} states up to {args.at_kimg} kimg"
        else:
            paths, ref = synthetic_sources(Path(tmp), args.last, args.synthetic_mparams)
            buffers, what = [], f"synthetic {args.synthetic_mparams:g}M-value states"
        rec = measure(paths, ref, buffers, args.rounds, args.evals, Path(tmp))
        state_mb = sum(q.stat().st_size for q in paths) / len(paths) / 2**20
    rec = {"sources": what, "n": len(paths), "state_mb": round(state_mb, 1), "threads": torch.get_num_threads(),
           **rec}
    print(f"{what}: {len(paths)} states of {state_mb:.1f} MB; held {rec['held_s_per_eval']:.3f} s, streamed "
          f"{rec['streamed_s_per_eval']:.3f} s per combination: {rec['speedup_median']:.1f}x (rounds "
          f"{rec['speedup_min_max'][0]:.1f}-{rec['speedup_min_max'][1]:.1f}x); identical: {rec['identical']}; "
          f"holding took {rec['hold_seconds']:.1f} s once")
    out = Path(args.out)
    old = json.loads(out.read_text())["records"] if out.exists() else []
    text = json.dumps({"records": [*old, rec]}, indent=1)
    atomic_write(out, lambda t: Path(t).write_text(text))


if __name__ == "__main__":
    main()
