"""Sample images from an inference snapshot (safetensors written by train.py).

Examples:
    python sample.py snapshot=runs/quickstart                       # 64 images, grid + PNGs + npz
    python sample.py snapshot=runs/quickstart seeds=0-99 sampler=heun sampler.steps=20 \
        sampler.guidance.scale=2.0
    torchrun --nproc_per_node=2 sample.py snapshot=runs/quickstart seeds=0-9999 grid=false

Outputs in ``outdir``: ``grid.png``, ``images/<seed>.png`` and ``samples.npz`` (``arr_0`` uint8
NHWC, ``arr_1`` labels, ``seeds``). Image k depends only on seed k: the same seeds give the same
images at any batch size and on any number of processes (work is split by seed).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from gen.utils import dist
from gen.utils.ckpt import atomic_write, list_snapshots
from gen.utils.images import load_png, save_grid, save_png
from gen.utils.seed import shard_seeds
from pipeline import SamplerSpec, generator_from_snapshot


def parse_seeds(spec: Any) -> list[int]:
    """'0-63' (inclusive) | '1,5,9' | 7 | [1, 2] -> list of ints."""
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, (list, tuple)) or OmegaConf.is_list(spec):
        return [int(s) for s in spec]
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if "-" in part[1:]:
            a, b = part.split("-", 1) if not part.startswith("-") else part[1:].split("-", 1)
            lo, hi = int(a), int(b)
            if hi < lo:
                raise ValueError(f"bad seed range {part!r}: end before start")
            out += list(range(lo, hi + 1))
        elif part:
            out.append(int(part))
    if not out:
        raise ValueError(f"no seeds in {spec!r}")
    return out


def resolve_snapshot(path: str) -> Path:
    """A snapshot file, or the newest primary snapshot in a run folder."""
    p = Path(path)
    if p.is_dir():
        snaps = list_snapshots(p)
        if not snaps:
            raise FileNotFoundError(f"no snapshot-*.safetensors in {p}; train first or pass a snapshot file")
        return snaps[-1][1]
    if not p.is_file():
        raise FileNotFoundError(f"snapshot {p} does not exist")
    return p


def sample(
    snapshot: str,
    seeds: Sequence[int],
    sampler: SamplerSpec,
    *,
    outdir: Path,
    batch_size: int = 64,
    class_label: int | None = None,
    device: str = "auto",
    grid: bool = True,
    grid_max: int = 256,
    grid_nrow: int | None = None,
    images: bool = True,
    npz: bool = True,
) -> dict[str, Any]:
    """Generate ``seeds`` from ``snapshot`` into ``outdir`` (split across processes by seed)."""
    dist.init_distributed()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda":
        dev = dist.default_device()
    snap = resolve_snapshot(snapshot)
    gen, config = generator_from_snapshot(str(snap), dev)
    if class_label is not None and not 0 <= class_label < gen.num_classes:
        raise ValueError(f"class_label={class_label} is outside [0, {gen.num_classes - 1}]")
    png_dir = outdir / "images"
    for batch in shard_seeds(seeds, batch_size, dist.rank(), dist.world_size()):
        if not batch:
            continue
        labels = None if class_label is None else torch.full((len(batch),), class_label, dtype=torch.long)
        imgs, ys = gen.generate(batch, sampler, labels=labels, device=dev)
        for s, img, y in zip(batch, imgs, ys):
            save_png(img, png_dir / f"{s:06d}-class{int(y)}.png")
    dist.barrier()
    result: dict[str, Any] = {"snapshot": str(snap), "outdir": str(outdir), "num_images": len(seeds)}
    if dist.is_main():
        files = {int(f.name.split("-")[0]): f for f in png_dir.glob("*.png")}
        missing = [s for s in seeds if s not in files]
        if missing:
            raise RuntimeError(f"{len(missing)} images missing after sampling (e.g. seed {missing[0]})")
        arr = torch.stack([load_png(files[s]) for s in seeds])  # (N, C, H, W) uint8
        labels_arr = np.array([int(files[s].stem.split("class")[1]) for s in seeds], dtype=np.int64)
        if npz:
            hwc = arr.permute(0, 2, 3, 1).numpy()
            if hwc.shape[-1] == 1:  # ADM-style evaluators expect RGB
                hwc = np.repeat(hwc, 3, axis=-1)
            atomic_write(outdir / "samples.npz",
                         lambda tmp: np.savez(open(tmp, "wb"), arr_0=hwc, arr_1=labels_arr, seeds=np.array(seeds)))
            result["npz"] = str(outdir / "samples.npz")
        if grid:
            save_grid(arr[:grid_max], outdir / "grid.png", nrow=grid_nrow, scale=2)
            result["grid"] = str(outdir / "grid.png")
        if not images:
            for f in files.values():
                f.unlink()
        else:
            result["images"] = str(png_dir)
    dist.barrier()
    return result


@hydra.main(version_base="1.3", config_path="configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    try:
        spec = SamplerSpec.from_config(OmegaConf.to_container(cfg.sampler, resolve=True))  # type: ignore[arg-type]
        seeds = parse_seeds(cfg.seeds)
        snap = resolve_snapshot(str(cfg.snapshot))
        outdir = Path(cfg.outdir) if cfg.outdir else snap.parent / "samples" / snap.stem
        result = sample(
            str(snap), seeds, spec, outdir=outdir, batch_size=int(cfg.batch_size), class_label=cfg.class_label,
            device=str(cfg.device), grid=bool(cfg.grid), grid_max=int(cfg.grid_max), grid_nrow=cfg.grid_nrow,
            images=bool(cfg.images), npz=bool(cfg.npz),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if dist.is_main():
        for k, v in result.items():
            print(f"{k:>12}: {v}")


if __name__ == "__main__":
    main()
