"""Post-hoc EMA: reconstruct power-function averages of any width from a run's stored ones, after training.

    python train.py ema=phema ...                      # stores snapshots of sigma_rel 0.05 and 0.10
    python -m scripts.posthoc_ema runs/quickstart --sigma-rel 0.03,0.08 [--at-kimg 64,96] [--out-dir DIR]
    python sample.py snapshot=runs/quickstart/posthoc-000096000-sigma0.03.safetensors

For each target time (a time at which the run stored snapshots; default the latest) and width, the coefficients
over the stored snapshots up to that time are the float64 least-squares fit of EDM2 ("Analyzing and Improving the
Training Dynamics of Diffusion Models", Karras et al. 2024, Appendix C.2; NVlabs/edm2 ``reconstruct_phema.py``),
and ``gen.averaging.combine`` streams the weighted sum into an ordinary snapshot (buffers and metadata from the
stored snapshot at the target time), named ``posthoc-<nimg>-sigma<width>.safetensors``. The file's metadata
records the sources, their SHA-256 and coefficients. Exit status: 0 written, 2 refused (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gen.averaging import StoredAverage, buffer_names, combine, phema_snapshots
from gen.ema import posthoc_coefficients, sigma_rel_to_gamma
from gen.utils.cli import CommandError, check_writable_dir, printable, run_main

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("run", help="the run folder (trained with ema=phema)")
    p.add_argument("--sigma-rel", required=True, help="target widths, comma-separated, e.g. 0.03,0.08")
    p.add_argument("--at-kimg", default=None, help="target times in kimg (stored snapshot times; default the latest)")
    p.add_argument("--out-dir", default=None, help="where to write the snapshots (default: the run folder)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def go() -> int:
        run = Path(args.run)
        if not run.is_dir():
            raise CommandError(f"{printable(run)} is not a run folder; give the folder train.py wrote")
        sigmas = _numbers(args.sigma_rel, "--sigma-rel")
        kimgs = _numbers(args.at_kimg, "--at-kimg") if args.at_kimg is not None else None
        out_dir = check_writable_dir(args.out_dir or run, "--out-dir")
        reconstruct(run, sigmas, kimgs, out_dir)
        return 0

    return run_main(go, PROG)


if __name__ == "__main__":
    sys.exit(main())
