"""The yardstick scoring that the averaging commands share (``scripts.posthoc_ema --score``, ``scripts.lcsc``'s
fitness): the sampler flags and the FID of one snapshot with them."""

from __future__ import annotations

import argparse
from pathlib import Path

from gen.utils.cli import CommandError


def add_scoring_args(p: argparse.ArgumentParser, what: str = "scoring") -> None:
    """``--kind``, ``--steps``, ``--cfg`` (the snapshot's sampler unless given), ``--dataset``, ``--cache-dir``,
    ``--batch-size``."""
    p.add_argument("--kind", default=None, help=f"sampler for {what} by short name (euler, heun, consistency); "
                   "default the snapshot's")
    p.add_argument("--steps", type=int, default=None, help=f"sampler steps for {what}; default the snapshot's")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (1: none); default the snapshot's")
    p.add_argument("--dataset", default=None, help="yardstick dataset; default the snapshot's data.name")
    p.add_argument("--cache-dir", default=None, help="yardstick network cache (default ${GEN_CACHE}/yardstick)")
    p.add_argument("--batch-size", type=int, default=250)


def scoring_dataset(snapshot: Path, args: argparse.Namespace) -> str:
    """``--dataset``, else the data set the snapshot was trained on (its metadata); refused when neither says."""
    from gen.averaging import snapshot_metadata

    name = args.dataset or snapshot_metadata(snapshot).get("data", {}).get("name")
    if not name:
        raise CommandError(f"{snapshot}: its metadata names no data set; give --dataset (e.g. mnist5k)")
    return str(name)


def yardstick_fid(snapshot: Path, args: argparse.Namespace, num_images: int, dataset: str, seed_offset: int = 0) -> float:
    """Yardstick FID of ``num_images`` samples of ``snapshot`` (seeds from ``seed_offset``) with the flags' sampler."""
    from eval.generate import yardstick_metrics
    from eval.generator import snapshot_generate_fn

    gen = snapshot_generate_fn(str(snapshot), kind=args.kind, steps=args.steps, cfg=args.cfg)
    return float(yardstick_metrics(gen, num_images, dataset, args.cache_dir, args.batch_size, seed_offset)["fid"])
