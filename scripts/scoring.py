"""The scoring that the averaging commands share (``scripts.posthoc_ema --score``, ``scripts.lcsc``'s fitness): the
sampler flags, the metric flags and the FID of one snapshot with them.

Two metrics: the yardstick FID (default; the data set's yardstick network, ``eval.generate.yardstick_metrics``), or,
with ``--ref STATS.npz``, the FID (or FD-DINOv2) against reference statistics written by ``python -m eval ref``: the
file's manifest names its feature extractor (Inception-v3 pool3 as the ADM/EDM evaluators use it, DINOv2, ...), which is
rebuilt once with ``--weights`` / the weights cache, so an ImageNet run is scored as its paper's table is.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gen.utils.cli import CommandError, float_arg, int_arg, printable

# (snapshot, number of images, first seed) -> FID; seeds first_seed .. first_seed + number - 1.
Scorer = Callable[[Path, int, int], float]


def add_scoring_args(p: argparse.ArgumentParser, what: str = "scoring") -> None:
    """``--kind``, ``--steps``, ``--cfg`` (the snapshot's sampler unless given), ``--dataset``, ``--ref``,
    ``--weights``, ``--assume-ref-extractor``, ``--download``, ``--cache-dir``, ``--batch-size``."""
    p.add_argument("--kind", type=_sampler_kind, default=None, help=f"sampler for {what} by short name (euler, heun, "
                   "consistency); default the snapshot's")
    p.add_argument("--steps", type=int_arg(1, MAX_STEPS), default=None,
                   help=f"sampler steps for {what}; default the snapshot's")
    p.add_argument("--cfg", type=float_arg(), default=None, help="guidance scale (1: none); default the snapshot's")
    p.add_argument("--dataset", default=None, help="yardstick dataset; default the snapshot's data.name")
    p.add_argument("--ref", default=None, help=f"reference statistics (.npz from `python -m eval ref`): {what} by "
                   "the FID against them, in the features their manifest names, instead of the yardstick's")
    p.add_argument("--weights", default=None, help="weights file of --ref's feature extractor (Inception, DINOv2); "
                   "default its cache")
    p.add_argument("--assume-ref-extractor", default=None, metavar="NAME[:RESIZE]", help="what made a --ref file "
                   "without a manifest (ADM's reference batches: inception-v3-pool3:tf1-bilinear)")
    p.add_argument("--download", action="store_true", help="download --ref's extractor weights when missing")
    p.add_argument("--cache-dir", default=None, help="network cache (default ${GEN_CACHE}/yardstick, or the weights "
                   "cache with --ref)")
    p.add_argument("--batch-size", type=int_arg(1), default=250)


# sampler.steps' bound (samplers.spec): refused here under the flag's own name.
MAX_STEPS = 100_000
# More images than sample.py takes seeds in one run: a typo, not a score (it would exhaust memory first).
MAX_IMAGES = 100_000_000


def _sampler_kind(text: str) -> str:
    """``--kind``: a sampler of ``samplers`` by its short name (``heun`` -> ``samplers.sample_heun``)."""
    import samplers

    kinds = sorted(n[len("sample_"):] for n in dir(samplers) if n.startswith("sample_") and callable(getattr(samplers, n)))
    if text not in kinds:
        raise argparse.ArgumentTypeError(f"unknown sampler {text!r}; one of {', '.join(kinds)}")
    return text


def scoring_dataset(snapshot: Path, args: argparse.Namespace) -> str:
    """``--dataset``, else the data set the snapshot was trained on (its metadata); refused when neither says."""
    from gen.averaging import snapshot_metadata

    name = args.dataset or snapshot_metadata(snapshot).get("data", {}).get("name")
    if not name:
        raise CommandError(f"{snapshot}: its metadata names no data set; give --dataset (e.g. mnist5k)")
    return str(name)


def scoring_context(args: argparse.Namespace) -> dict[str, Any]:
    """What a stored score depends on besides the snapshot (a resumed search refuses other values): the sampler
    flags, the yardstick data set, and the reference file's SHA-256."""
    from gen.utils.ckpt import file_sha256

    ref = {} if args.ref is None else {"ref": [str(args.ref), file_sha256(args.ref)]}
    return {"kind": args.kind, "steps": args.steps, "cfg": args.cfg, "dataset": args.dataset, **ref}


def metric_name(args: argparse.Namespace) -> str:
    """How the scores are named in messages and records."""
    return "yardstick FID" if args.ref is None else f"FID against {Path(args.ref).name}"


def make_scorer(reference: Path, args: argparse.Namespace, counts: dict[str, int] | None = None) -> Scorer:
    """The scorer the flags ask for; ``reference`` is a snapshot of the run (its data set names the yardstick).

    Args:
        counts: the image counts the caller will score with, by flag (``{"--fitness-images": 500}``): with ``--ref``
            each must exceed the feature dimension (a Frechet distance of fewer images than features is singular), so
            a long search is refused before it starts rather than at its first evaluation.

    Raises:
        CommandError: ``--ref`` with ``--dataset`` (two metrics asked for), a missing or manifest-less ``--ref``, too
            few images for its features, or ``--weights`` / ``--download`` without ``--ref``.
    """
    if args.ref is None:
        if args.weights is not None or args.download or args.assume_ref_extractor:
            raise CommandError("--weights, --download and --assume-ref-extractor are for --ref's statistics and "
                               "extractor; give --ref STATS.npz or drop them (the yardstick networks are trained locally)")
        dataset = scoring_dataset(reference, args)
        return lambda snap, n, first: yardstick_fid(snap, args, n, dataset, first)
    if args.dataset is not None:
        raise CommandError(f"--dataset {args.dataset} and --ref {printable(args.ref)} ask for two metrics; give one")
    ref = reference_statistics(args)
    for flag, n in (counts or {}).items():
        if n <= ref.dim:
            raise CommandError(f"{flag} {n}: the FID in --ref's {ref.dim} features needs more than {ref.dim} images "
                               f"(fewer give a singular covariance); give {flag} {max(ref.dim + 1, 2 * ref.dim)} or more")
    ext = reference_extractor(ref, args)
    from eval.stats import check_compatible

    try:  # other weights or resize than the file's would give a number not comparable with it: refused now
        check_compatible(ref.manifest, ext.manifest())
    except ValueError as e:
        raise CommandError(f"--ref {printable(args.ref)}: {e}") from e

    def score(snap: Path, n: int, first: int) -> float:
        from eval.generate import evaluate
        from eval.generator import snapshot_generate_fn

        gen = snapshot_generate_fn(str(snap), kind=args.kind, steps=args.steps, cfg=args.cfg)
        m = evaluate(gen, range(first, first + n), ext, ref, batch_size=args.batch_size)
        return float(m["fd_dinov2"] if "fd_dinov2" in m else m["fid"])

    return score


def reference_statistics(args: argparse.Namespace) -> Any:
    """``--ref``'s statistics (``eval.stats.GaussianStats``), refused in one line when missing or unreadable."""
    from eval.stats import load_stats

    path = Path(args.ref)
    if not path.is_file():
        raise CommandError(f"--ref {printable(path)}: no such file; write it with `python -m eval ref --out "
                           f"{printable(path)} ...` from the reference images")
    assume = None
    if args.assume_ref_extractor:
        name, _, resize = args.assume_ref_extractor.partition(":")
        assume = {"extractor": name, "resize": resize or "tf1-bilinear"}
    try:
        return load_stats(path, assume_manifest=assume)
    except ValueError as e:
        raise CommandError(f"--ref {printable(path)}: {e}") from e


def reference_extractor(ref: Any, args: argparse.Namespace) -> Any:
    """The feature extractor the manifest of ``--ref``'s statistics names, built once with ``--weights``."""
    from eval.features import extractor_from_manifest

    manifest = ref.manifest if ref.manifest is not None else {}
    if not (isinstance(manifest.get("spec"), dict) or manifest.get("extractor")):
        raise CommandError(f"--ref {printable(args.ref)} has no manifest naming its feature extractor (an ADM or "
                           "pytorch-fid file?); say what made it with --assume-ref-extractor "
                           "(inception-v3-pool3:tf1-bilinear for ADM's) or recompute it with `python -m eval ref`")
    return extractor_from_manifest(manifest, weights_path=args.weights, cache_dir=args.cache_dir, download=args.download)


def yardstick_fid(snapshot: Path, args: argparse.Namespace, num_images: int, dataset: str, seed_offset: int = 0) -> float:
    """Yardstick FID of ``num_images`` samples of ``snapshot`` (seeds from ``seed_offset``) with the flags' sampler."""
    from eval.generate import yardstick_metrics
    from eval.generator import snapshot_generate_fn

    gen = snapshot_generate_fn(str(snapshot), kind=args.kind, steps=args.steps, cfg=args.cfg)
    return float(yardstick_metrics(gen, num_images, dataset, args.cache_dir, args.batch_size, seed_offset)["fid"])
