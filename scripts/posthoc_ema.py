"""Post-hoc EMA: reconstruct power-function averages of any width from a run's stored ones, after training.

    python train.py ema=phema ...                      # stores snapshots of sigma_rel 0.05 and 0.10
    python -m scripts.posthoc_ema runs/quickstart --sigma-rel 0.03,0.08 [--at-kimg 64,96] [--out-dir DIR]
    python sample.py snapshot=runs/quickstart/posthoc-000096000-sigma0.03.safetensors
    python -m scripts.posthoc_ema runs/quickstart --sigma-rel 0.02,0.04,0.06,0.08,0.1,0.15,0.2 --score 1000 [--steps 8]

For each target time (a time at which the run stored snapshots; default the latest) and width, the coefficients
over the stored snapshots up to that time are the float64 least-squares fit of EDM2 ("Analyzing and Improving the
Training Dynamics of Diffusion Models", Karras et al. 2024; NVlabs/edm2 ``reconstruct_phema.py``),
and ``gen.averaging.combine`` streams the weighted sum into an ordinary snapshot (buffers and metadata from the
stored snapshot at the target time), named ``posthoc-<nimg>-sigma<width>.safetensors``. The file's metadata
records the sources, their SHA-256 and coefficients. ``--score N`` sweeps: each reconstruction is scored by the
yardstick FID of N samples (or the FID against ``--ref STATS.npz`` in its extractor's features, ``scripts.scoring``;
seeds 0..N-1, the snapshot's sampler or ``--kind`` / ``--steps``), written to
``posthoc_sweep.json`` and plotted against sigma_rel in ``posthoc_sweep.png`` (in the output folder).
Exit status: 0 written, 2 refused (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gen.averaging import StoredAverage, buffer_names, combine, phema_snapshots
from gen.ema import posthoc_coefficients, sigma_rel_to_gamma
from gen.utils.ckpt import atomic_write, list_snapshots
from gen.utils.cli import CommandError, int_arg, output_dir, printable, run_main
from scripts.scoring import MAX_IMAGES, Scorer, add_scoring_args, make_scorer, metric_name

PROG = "python -m scripts.posthoc_ema"
# Snapshots of one time only fit profiles ending at that time with the stored widths; a fit of another width
# needs the profiles' different shapes over time, so at least two stored times.
MIN_TIMES = 2


def _numbers(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise CommandError(f"{flag} {text!r}: give numbers separated by commas, e.g. {flag} 0.03,0.08") from e
    if not values:
        raise CommandError(f"{flag} is empty; give numbers separated by commas, e.g. {flag} 0.03,0.08")
    return values


def target_inputs(stored: list[StoredAverage], kimg: float, run: Path) -> list[StoredAverage]:
    """The stored averages usable for a target at ``kimg``: those written at or before it (refusals named)."""
    nimg = int(round(kimg * 1000))
    times = sorted({s.nimg for s in stored})
    if nimg not in times:
        have = ", ".join(f"{t / 1000:g}" for t in times)
        raise CommandError(f"--at-kimg {kimg:g}: {printable(run)} has no power-function EMA snapshot at kimg {kimg:g} "
                           f"(it has kimg {have}); give one of those times")
    inputs = [s for s in stored if s.nimg <= nimg]
    n_times = len({s.nimg for s in inputs})
    if n_times < MIN_TIMES:
        raise CommandError(f"--at-kimg {kimg:g}: {printable(run)} stored power-function EMA snapshots at only {n_times} "
                           f"time(s) up to kimg {kimg:g}; the solve needs snapshots at {MIN_TIMES} times or more. Give "
                           "a later --at-kimg, or train with more snapshots (a smaller trainer.snapshot_kimg)")
    return inputs


def _check_no_other_result(out: Path, reference: Path) -> None:
    """Refuse to replace a file at ``out`` that is not a reconstruction from the same stored snapshot (another run's,
    given the same ``--out-dir``, or a file this command did not write); the same run's is recomputed identically."""
    if not out.exists():
        return
    from gen.averaging import snapshot_metadata
    from gen.utils.ckpt import CheckpointError, file_sha256

    try:
        made_from = (snapshot_metadata(out).get("averaging") or {}).get("reference") or {}
    except CheckpointError:
        made_from = {}
    if made_from.get("sha256") != file_sha256(reference):
        what = f"a reconstruction from {made_from.get('name')} of another run" if made_from else "a file this command did not write"
        raise CommandError(f"--out-dir: {printable(out)} already holds {what}; give another --out-dir, or delete that file")


def reconstruct(run: Path, sigmas: list[float], kimgs: list[float] | None, out_dir: Path) -> list[Path]:
    """Write one snapshot per (target time, width); returns their paths."""
    for s in sigmas:
        try:
            sigma_rel_to_gamma(s)
        except ValueError as e:
            raise CommandError(f"--sigma-rel: {e}") from e
    stored = phema_snapshots(run)
    if not stored:
        raise CommandError(f"{printable(run)} holds no power-function EMA snapshots; train the run with ema=phema")
    for kimg in kimgs or [stored[-1].nimg / 1000]:  # every output checked before the first is written
        inputs = target_inputs(stored, kimg, run)
        reference = next(s.path for s in reversed(inputs) if s.step == max(s.step for s in inputs))
        for sigma in sigmas:
            _check_no_other_result(out_dir / f"posthoc-{inputs[-1].nimg:09d}-sigma{sigma:g}.safetensors", reference)
    written = []
    for kimg in kimgs or [stored[-1].nimg / 1000]:
        inputs = target_inputs(stored, kimg, run)
        t_out = max(s.step for s in inputs)
        x = posthoc_coefficients([s.step for s in inputs], [s.sigma_rel for s in inputs],
                                 [t_out] * len(sigmas), sigmas)
        reference = next(s.path for s in reversed(inputs) if s.step == t_out)
        buffers = buffer_names(reference)
        for j, sigma in enumerate(sigmas):
            out = out_dir / f"posthoc-{inputs[-1].nimg:09d}-sigma{sigma:g}.safetensors"
            record = {"method": "posthoc_ema", "name": f"posthoc{sigma:g}", "sigma_rel": sigma,
                      "gamma": sigma_rel_to_gamma(sigma), "nimg": inputs[-1].nimg, "step": t_out}
            combine([s.path for s in inputs], x[:, j].tolist(), reference, out, record, buffers=buffers)
            print(f"kimg {inputs[-1].nimg / 1000:g} sigma_rel {sigma:g}: {len(inputs)} snapshots, "
                  f"coefficients in [{x[:, j].min():.3g}, {x[:, j].max():.3g}] -> {printable(out)}")
            written.append(out)
    return written


def sweep(written: list[Path], args: argparse.Namespace, out_dir: Path, score: Scorer | None = None) -> list[dict[str, float]]:
    """Yardstick FID of every reconstruction; JSON record and a plot of FID against sigma_rel per target time."""
    from gen.averaging import snapshot_metadata

    rows = []
    score = score or make_scorer(written[0], args, {"--score": args.score})
    for path in written:
        meta = snapshot_metadata(path)
        fid = score(path, args.score, 0)
        rec = meta["averaging"]
        rows.append({"kimg": rec["nimg"] / 1000, "sigma_rel": rec["sigma_rel"], "fid": fid, "snapshot": path.name})
        print(f"kimg {rows[-1]['kimg']:g} sigma_rel {rec['sigma_rel']:g}: {metric_name(args)} {fid:.3f} ({args.score} images)")
    record = {"images": args.score, "sampler": {"kind": args.kind, "steps": args.steps, "cfg": args.cfg},
              "metric": metric_name(args), "rows": rows}
    text = json.dumps(record, indent=1)
    atomic_write(out_dir / "posthoc_sweep.json", lambda tmp: Path(tmp).write_text(text))
    _plot(rows, out_dir / "posthoc_sweep.png")
    return rows


def _plot(rows: list[dict[str, float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for kimg in sorted({r["kimg"] for r in rows}):
        pts = sorted((r["sigma_rel"], r["fid"]) for r in rows if r["kimg"] == kimg)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1.2, label=f"kimg {kimg:g}")
    ax.set_xlabel("sigma_rel (post-hoc EMA width)")
    ax.set_ylabel("yardstick FID")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("run", help="the run folder (trained with ema=phema)")
    p.add_argument("--sigma-rel", required=True, help="target widths, comma-separated, e.g. 0.03,0.08")
    p.add_argument("--at-kimg", default=None, help="target times in kimg (stored snapshot times; default the latest)")
    p.add_argument("--out-dir", default=None, help="where to write the snapshots (default: the run folder)")
    p.add_argument("--score", type=int_arg(0, MAX_IMAGES), default=0, help="score each reconstruction by the yardstick FID of N samples")
    add_scoring_args(p, "--score")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def go() -> int:
        run = Path(args.run)
        if not run.is_dir():
            raise CommandError(f"{printable(run)} is not a run folder; give the folder train.py wrote")
        sigmas = _numbers(args.sigma_rel, "--sigma-rel")
        kimgs = _numbers(args.at_kimg, "--at-kimg") if args.at_kimg is not None else None
        with output_dir(args.out_dir or run, "--out-dir") as out_dir:
            if args.score < 0:
                raise CommandError(f"--score {args.score}: give a number of images (0: no scoring)")
            snaps = list_snapshots(run)
            # The scoring flags are checked before anything is written (the run's newest snapshot names its data).
            score = make_scorer(snaps[-1][1], args, {"--score": args.score}) if args.score and snaps else None
            written = reconstruct(run, sigmas, kimgs, out_dir)
            if args.score:
                sweep(written, args, out_dir, score)
        return 0

    return run_main(go, PROG)


if __name__ == "__main__":
    sys.exit(main())
