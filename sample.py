"""Sample images from an inference snapshot (safetensors written by train.py).

Examples:
    python sample.py snapshot=runs/quickstart                       # 64 images, grid + PNGs + npz
    python sample.py snapshot=runs/quickstart seeds=0-99 sampler=heun sampler.steps=20 \
        sampler.guidance.scale=2.0
    torchrun --nproc_per_node=2 sample.py snapshot=runs/quickstart seeds=0-9999 grid=false

Outputs in ``outdir``: ``grid.png``, ``images/<seed>-class<label>.png`` and ``samples.npz`` (``arr_0`` uint8
NHWC with the data's channels, grey digits as 1 channel; ``arr_1`` labels, ``seeds``). Image k depends only on
seed k: the same seeds give the same images at any batch size and on any number of processes (work is split by
seed).

An output folder holds one sample set, recorded in ``outdir/sample.json`` (written atomically): the snapshot's
SHA-256, the sampler settings, the class label and the device type. Re-running into the same folder with the same
set continues it: images already there are kept and only the missing seeds are generated (so a killed run
resumes), and ``samples.npz`` and ``grid.png`` hold exactly this run's seeds. A folder holding another set is
refused unless ``overwrite=true``; files the toolkit did not write are never read or deleted. With
``images=false`` the PNGs of this run go to a hidden staging folder that is removed at the end; PNGs of earlier
runs are left alone. Temp files of a killed run are removed at the start.

An expected failure ends with one ``sample.py: error:`` line naming the setting or file and the fix (exit status
2; 3 when the snapshot's weights or the generated values are not finite: nothing is written from them).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from eval.generator import generator_from_snapshot
from gen.models.prediction import is_consistency
from gen.utils import dist
from gen.utils.ckpt import atomic_write, file_sha256, list_snapshots, remove_stale_temp_files
from gen.utils.ckpt import tokenizer_weights as tokenizer_weights_from
from gen.utils.cli import CommandError, check_writable_dir, printable, run_hydra_entry, run_main
from gen.utils.config import ConfigError, from_mapping
from gen.utils.images import load_png, save_grid, save_png
from gen.utils.progress import Progress
from gen.utils.seed import PerImageRandom, shard_seeds
from samplers.spec import SamplerSpec, check_sampler

# The 1-step consistency sampler (configs/sampler/consistency.yaml), for a consistency snapshot without a stored one.
CONSISTENCY_SAMPLER = {
    "solver": {"_target_": "samplers.sample_consistency", "sigma_min": 0.002}, "steps": 1,
    "grid": {"_target_": "samplers.consistency_grid", "sigmas": []}, "guidance": {"scale": 1.0}, "sharing": None,
}


def _sampler_overridden() -> bool:
    """Whether the command line set the ``sampler`` group or one of its keys (False outside a Hydra run)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return False
    return any(o.lstrip("+~").split("=")[0].split(".")[0] == "sampler" for o in task)

PROG = "sample.py"
MANIFEST = "sample.json"
MANIFEST_FORMAT = "gen-samples-v1"
PNG_NAME = re.compile(r"^(\d+)-class(\d+)\.png$")  # the PNGs this tool writes; other files are not ours
MAX_SEEDS = 100_000_000


def parse_seeds(spec: Any) -> list[int]:
    """'0-63' (inclusive) | '1,5,9' | 7 | [1, 2] -> list of distinct ints >= 0 (errors name ``seeds``)."""
    if isinstance(spec, bool):
        raise ValueError(f"seeds={spec!r}: give seeds as 'a-b', 'a,b,c', an integer or a list")
    if isinstance(spec, int):
        out = [spec]
    elif isinstance(spec, (list, tuple)) or OmegaConf.is_list(spec):
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in spec):
            raise ValueError(f"seeds={list(spec)!r}: every seed must be an integer")
        out = [int(s) for s in spec]
    elif isinstance(spec, str):
        out = []
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
            if m is None:
                raise ValueError(f"seeds={spec!r}: {part!r} is not a seed or a range 'a-b' of seeds >= 0")
            if m.group(3) is not None:
                out.append(int(m.group(3)))
                continue
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ValueError(f"seeds={spec!r}: the range {part!r} ends before it starts")
            if hi - lo + 1 + len(out) > MAX_SEEDS:
                raise ValueError(f"seeds={spec!r}: more than {MAX_SEEDS:,} seeds; sample in several runs")
            out += range(lo, hi + 1)
    else:
        raise ValueError(f"seeds={spec!r}: give seeds as 'a-b', 'a,b,c', an integer or a list")
    if not out:
        raise ValueError(f"seeds={spec!r} holds no seeds")
    if min(out) < 0:
        raise ValueError(f"seeds={spec!r}: seeds must be >= 0, got {min(out)}")
    if len(set(out)) != len(out):
        dup = next(s for i, s in enumerate(out) if s in out[:i])
        raise ValueError(f"seeds={spec!r} names seed {dup} twice; a repeated seed repeats an image")
    return out


def compact_seeds(seeds: Sequence[int]) -> str:
    """Seeds as 'a-b,c' ranges (the inverse of ``parse_seeds`` for sorted runs)."""
    parts: list[str] = []
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if i == j else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def resolve_snapshot(path: str) -> Path:
    """A snapshot file, or the newest primary snapshot in a run folder."""
    p = Path(path)
    if p.is_dir():
        snaps = list_snapshots(p)
        if not snaps:
            raise FileNotFoundError(f"snapshot={printable(p)}: no snapshot-*.safetensors in this folder; train first or "
                                    "pass a snapshot file")
        return snaps[-1][1]
    if not p.is_file():
        raise FileNotFoundError(f"snapshot={printable(p)} does not exist; give a snapshot file or a run folder")
    return p


@dataclass
class SampleConfig:
    """The settings of sample.py besides ``sampler`` (see configs/sample.yaml), checked before any work."""

    snapshot: str
    seeds: Any = "0-63"
    class_label: int | None = None
    batch_size: int = 64
    outdir: str | None = None
    grid: bool = True
    grid_max: int = 256
    grid_nrow: int | None = None
    images: bool = True
    npz: bool = True
    npz_rgb: bool = False
    overwrite: bool = False
    device: str = "auto"
    tokenizer_weights: str | None = None

    def __post_init__(self) -> None:
        if not self.snapshot:
            raise ValueError("snapshot is empty; give snapshot=<snapshot file or run folder>")
        if self.class_label is not None and self.class_label < 0:
            raise ValueError(f"class_label={self.class_label} must be null or a class index >= 0")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        if self.grid_max < 1:
            raise ValueError(f"grid_max={self.grid_max} must be >= 1 (grid=false writes no grid)")
        if self.grid_nrow is not None and self.grid_nrow < 1:
            raise ValueError(f"grid_nrow={self.grid_nrow} must be null or >= 1")
        if self.outdir is not None and not self.outdir.strip():
            raise ValueError("outdir is empty; give a folder or null (<snapshot folder>/samples/<snapshot name>)")
        if not (self.images or self.npz or self.grid):
            raise ValueError("images=false npz=false grid=false would write nothing; keep at least one output")
        if self.npz_rgb and not self.npz:
            raise ValueError("npz_rgb=true has no effect with npz=false")
        if self.tokenizer_weights is not None and not os.path.exists(self.tokenizer_weights):
            raise ValueError(f"tokenizer_weights={self.tokenizer_weights} does not exist; give the tokenizer's weights "
                             "file or folder")


# ---- the output folder: one sample set, identified by sample.json -------------------------------------------


def _read_manifest(outdir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((outdir / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: a set of unknown origin
    return data if isinstance(data, dict) else {}


def _our_pngs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(f for f in folder.iterdir() if PNG_NAME.match(f.name) and f.is_file())


def _remove_staging(outdir: Path, keep: str | None = None) -> None:
    """Remove hidden staging folders (PNGs of ``images=false`` runs) except ``keep``, and only our files in them."""
    for d in outdir.glob(".staging-*"):
        if d.name == keep or not d.is_dir():
            continue
        for f in d.iterdir():
            if PNG_NAME.match(f.name) or f.name.startswith(".tmp-"):
                f.unlink(missing_ok=True)
        try:
            d.rmdir()
        except OSError:
            pass  # something else lives there: leave it


def check_outdir(outdir: Path, identity: dict[str, Any], key: str, overwrite: bool) -> list[Path]:
    """Every process: refuse an ``outdir`` holding another sample set (read-only, so all processes agree and stop
    together). Returns that set's files to remove when ``overwrite`` is on."""
    check_writable_dir(outdir, "outdir")
    old = _read_manifest(outdir)
    images = outdir / "images"
    outputs = [*_our_pngs(images), *[outdir / n for n in ("samples.npz", "grid.png") if (outdir / n).is_file()]]
    if (old is not None and old.get("id") == key) or not outputs:
        return []
    if old is None or not old.get("id"):
        origin = f"of unknown origin (no readable {MANIFEST})"
    else:
        changed = [k for k in ("snapshot_sha256", "sampler", "class_label", "device") if old.get(k) != identity[k]]
        origin = f"of another {'/'.join(changed) or 'setup'} (snapshot {old.get('snapshot')}, see {MANIFEST})"
    if not overwrite:
        pngs = sum(1 for f in outputs if f.parent == images)
        raise CommandError(
            f"outdir {printable(outdir)} holds a sample set {origin}: {pngs} PNG(s) in images/"
            f"{', samples.npz' if (outdir / 'samples.npz').is_file() else ''}"
            f"{', grid.png' if (outdir / 'grid.png').is_file() else ''}. Mixing them with this run's images would "
            "give a wrong set; give another outdir=..., or overwrite=true to replace that set (files not written "
            "by sample.py are left alone)"
        )
    return outputs


def claim_outdir(outdir: Path, identity: dict[str, Any], key: str, replaced: list[Path]) -> None:
    """Rank 0: remove the set being replaced, temp files of killed runs and stale staging; write the manifest."""
    for f in replaced:
        f.unlink(missing_ok=True)
    old = _read_manifest(outdir)
    if old is None or old.get("id") != key:
        _remove_staging(outdir)  # staged PNGs of another set
    for folder in (outdir, outdir / "images", *[d for d in outdir.glob(".staging-*") if d.is_dir()]):
        remove_stale_temp_files(folder)  # left by a killed run: never complete files
    manifest = {"format": MANIFEST_FORMAT, "id": key, **identity, "complete": False}
    atomic_write(outdir / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))


def _labels(seeds: Sequence[int], num_classes: int, class_label: int | None) -> list[int]:
    """The label of each seed, as ``Generator.generate`` draws it (first draw of the seed's own generator)."""
    if class_label is not None:
        return [class_label] * len(seeds)
    out: list[int] = []
    for i in range(0, len(seeds), 4096):
        out += PerImageRandom(seeds[i : i + 4096]).randint(num_classes).tolist()
    return out


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
    npz_rgb: bool = False,
    overwrite: bool = False,
    tokenizer_weights: str | None = None,
    sampler_chosen: bool = True,
) -> dict[str, Any]:
    """Generate ``seeds`` from ``snapshot`` into ``outdir`` (split across processes by seed; see the module doc).

    ``tokenizer_weights``: the tokenizer's weights file or folder, named by the user (a path in the snapshot's
    metadata is never read; ``gen.utils.ckpt.build_snapshot_tokenizer``). ``sampler_chosen=False`` (no ``sampler`` on
    the command line): a consistency snapshot is sampled with the sampler its training run stored (a consistency
    sampler), since the default ODE sampler cannot serve it.
    """
    dist.init_distributed()
    dev = dist.resolve_device(device, "device")
    snap = resolve_snapshot(snapshot)
    with tokenizer_weights_from(tokenizer_weights):
        gen, meta = generator_from_snapshot(str(snap), dev)
    student = meta.get("distill") if isinstance(meta.get("distill"), dict) else None
    if not sampler_chosen and (is_consistency(gen.prediction) or (student and meta.get("sampler"))):
        # A consistency model or a distilled student samples with the sampler its run stored (its step count,
        # times and update rule), which the default ODE sampler would not reproduce.
        sampler = SamplerSpec.from_config(meta.get("sampler") or CONSISTENCY_SAMPLER)
    elif student and isinstance(student.get("solvers"), list):
        name = (sampler.config.get("solver") or {}).get("_target_")
        if name not in student["solvers"]:
            raise ValueError(f"sampler.solver={name} cannot serve this {student.get('method')} student; use one of "
                             f"{student['solvers']}, or no sampler=... to use the one stored in the snapshot")
    if class_label is not None and not 0 <= class_label < gen.num_classes:
        raise ValueError(
            f"class_label={class_label} is outside [0, {gen.num_classes - 1}] (label {gen.num_classes} is the null class)"
        )
    check_sampler(sampler, gen.prediction, gen.num_classes, int(getattr(gen.net, "extra_token_dim", 0) or 0))
    identity = {
        "snapshot": str(snap), "snapshot_sha256": file_sha256(snap), "sampler": sampler.config,
        "class_label": class_label, "device": dev.type,
    }
    key = file_key(identity)
    png_dir = outdir / "images" if images else outdir / f".staging-{key[:16]}"
    replaced = check_outdir(outdir, identity, key, overwrite)
    dist.barrier()  # every process has checked before rank 0 changes anything
    if dist.is_main():
        claim_outdir(outdir, identity, key, replaced)
        png_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    seeds = list(seeds)
    labels = _labels(seeds, gen.num_classes, class_label)
    names = {s: f"{s:06d}-class{y}.png" for s, y in zip(seeds, labels)}
    places = (outdir / "images", outdir / f".staging-{key[:16]}")
    _generate_missing(gen, sampler, seeds, names, places, png_dir, batch_size, class_label, dev, snap, outdir)
    dist.barrier()
    result: dict[str, Any] = {"snapshot": str(snap), "outdir": str(outdir), "num_images": len(seeds)}
    if dist.is_main():
        result.update(_write_outputs(outdir, seeds, labels, names, places, png_dir, identity, key,
                                     images=images, npz=npz, npz_rgb=npz_rgb, grid=grid, grid_max=grid_max,
                                     grid_nrow=grid_nrow))
    dist.barrier()
    return result


def _generate_missing(
    gen: Any, sampler: SamplerSpec, seeds: list[int], names: Mapping[int, str], places: tuple[Path, Path],
    png_dir: Path, batch_size: int, class_label: int | None, dev: torch.device, snap: Path, outdir: Path,
) -> None:
    """Generate this process's share of the seeds whose PNG is in neither ``images/`` nor the staging folder."""
    missing = [s for s in seeds if not any((d / names[s]).is_file() for d in places)]
    if len(missing) < len(seeds):
        dist.print0(f"{len(seeds) - len(missing)} of {len(seeds)} images are already in {printable(outdir)} (same "
                    f"snapshot and sampler); generating the other {len(missing)}")
    batches = [b for b in shard_seeds(missing, batch_size, dist.rank(), dist.world_size()) if b] if missing else []
    with Progress(sum(len(b) for b in batches), f"sampling {len(missing)} images from {printable(snap)}") as bar:
        for batch in batches:
            fixed = None if class_label is None else torch.full((len(batch),), class_label, dtype=torch.long)
            imgs, ys = gen.generate(batch, sampler, labels=fixed, device=dev)
            for s, img, y in zip(batch, imgs, ys):
                if f"{s:06d}-class{int(y)}.png" != names[s]:
                    raise RuntimeError(f"seed {s}: label {int(y)} differs from the label drawn for its file name")
                save_png(img, png_dir / names[s])
            bar.advance(len(batch))


def _write_outputs(
    outdir: Path, seeds: list[int], labels: Sequence[int], names: Mapping[int, str], places: tuple[Path, Path],
    png_dir: Path, identity: Mapping[str, Any], key: str, *, images: bool, npz: bool, npz_rgb: bool, grid: bool,
    grid_max: int, grid_nrow: int | None,
) -> dict[str, str]:
    """Rank 0, after every process sampled: the npz, grid and manifest of the whole set; the files written."""
    written: dict[str, str] = {}
    files = {}
    for s in seeds:
        found = [d / names[s] for d in places if (d / names[s]).is_file()]
        if not found:
            raise RuntimeError(f"image of seed {s} missing after sampling: {png_dir / names[s]}")
        if images and found[0].parent != png_dir:
            os.replace(found[0], png_dir / names[s])  # staged by an earlier images=false attempt of this set
            found = [png_dir / names[s]]
        files[s] = found[0]
    try:
        arr = torch.stack([load_png(files[s]) for s in seeds])  # (N, C, H, W) uint8
    except (OSError, RuntimeError, ValueError) as e:
        raise CommandError(f"an image of this set in {printable(outdir)} cannot be read ({e}); delete it and "
                           "re-run to generate it again") from e
    labels_arr = np.array(labels, dtype=np.int64)
    if npz:
        hwc = arr.permute(0, 2, 3, 1).numpy()
        if npz_rgb and hwc.shape[-1] == 1:  # for evaluators that need RGB (ADM's TensorFlow evaluator)
            hwc = np.repeat(hwc, 3, axis=-1)

        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=hwc, arr_1=labels_arr, seeds=np.array(seeds))

        atomic_write(outdir / "samples.npz", write_npz)
        written["npz"] = str(outdir / "samples.npz")
    if grid:
        save_grid(arr[:grid_max], outdir / "grid.png", nrow=grid_nrow, scale=2)
        written["grid"] = str(outdir / "grid.png")
    if images:
        written["images"] = str(png_dir)
    _remove_staging(outdir)  # this run's staged PNGs (images=false), never images/
    manifest = {"format": MANIFEST_FORMAT, "id": key, **identity, "complete": True,
                "seeds": compact_seeds(seeds), "images": images, "npz": npz, "grid": grid}
    atomic_write(outdir / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2)))
    return written


def file_key(identity: Mapping[str, Any]) -> str:
    """The hash of a sample set's identity (everything but the snapshot's path, which may move)."""
    import hashlib

    fields = {k: v for k, v in identity.items() if k != "snapshot"}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def run(cfg: DictConfig) -> dict[str, Any]:
    """Check every setting (before loading anything heavy), then sample."""
    try:
        c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        key = getattr(e, "full_key", None) or "snapshot"
        raise ConfigError(f"{key} is not set; give {key}=... (e.g. snapshot=runs/quickstart)") from e
    except OmegaConfBaseException as e:
        raise ConfigError(f"config does not resolve: {' '.join(str(e).split())}") from e
    assert isinstance(c, dict)
    spec = SamplerSpec.from_config(c.pop("sampler"))
    c.pop("paths", None)
    settings = from_mapping(SampleConfig, c, "")
    seeds = parse_seeds(settings.seeds)
    snap = resolve_snapshot(settings.snapshot)
    outdir = Path(settings.outdir) if settings.outdir else snap.parent / "samples" / snap.stem
    return sample(
        str(snap), seeds, spec, outdir=outdir, batch_size=settings.batch_size, class_label=settings.class_label,
        device=settings.device, grid=settings.grid, grid_max=settings.grid_max, grid_nrow=settings.grid_nrow,
        images=settings.images, npz=settings.npz, npz_rgb=settings.npz_rgb, overwrite=settings.overwrite,
        tokenizer_weights=settings.tokenizer_weights,
        sampler_chosen=_sampler_overridden(),
    )


def main_checked(cfg: DictConfig) -> int:
    """Sample with expected errors as one line: exit 0 done, 2 bad setting or file, 3 non-finite values."""

    def go() -> int:
        result = run(cfg)
        if dist.is_main():
            for k, v in result.items():
                print(f"{k:>12}: {v}")
        return 0

    return run_main(go, PROG)


@hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent / "configs"), config_name="sample")
def main(cfg: DictConfig) -> None:
    code = main_checked(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    # Run through the importable module: Hydra's submitit launcher pickles the task with cloudpickle, which copies
    # functions of __main__ by value and loses their module's names (dataclass annotations then fail to resolve).
    import sample

    run_hydra_entry(sample.main)
