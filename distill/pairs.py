"""Noise-image pairs from a teacher: the command that draws them into shards, and the dataset that reads them.

Reflow (Liu et al. 2023, "Flow Straight and Fast"; 2-rectified flow++, Lee et al. 2024, "Improving the Training of
Rectified Flows", official code sangyun884/rfpp ``generate_edm.py``) trains on fixed couplings: unit noise ``z``, the
teacher's deterministic ODE endpoint ``x`` from it, and the label. Pair ``k`` is drawn exactly as ``sample.py`` draws
image ``k``: seed ``seed_offset + k`` gives the label (first draw of its own generator) and then the noise, and the
teacher's network calls are padded to a fixed number of rows, so the shards are the same at any batch size and on
any number of processes (shards are dealt round-robin to processes).

Command (``key=value`` arguments; one ``distill.pairs: error:`` line on a bad one, exit 2)::

    python -m distill.pairs teacher=runs/quickstart/snapshot-000096000.safetensors out=pairs/quickstart num=50000
    torchrun --nproc_per_node=2 -m distill.pairs teacher=... out=... num=50000 batch_size=256
    python -m distill.pairs teacher=... out=... num=50000 steps=64      # the teacher's sampler with 64 steps

``out`` holds ``pairs.json`` (the manifest: teacher path and SHA-256, its data section, sampler, shapes, count, seeds,
``complete``) and ``pairs-<i>.safetensors`` shards of ``shard_size`` pairs (``noise``, ``x`` float32 (n, C, H, W) in
the teacher's model space, ``label`` and ``seed`` int64 (n,)), each written atomically. Re-running the same command
continues: complete shards are kept, the others drawn (a killed run resumes). A folder of other pairs (another
teacher, sampler, seeds or count) is refused unless ``overwrite=true``.

Real-data pairs (``real=mnist5k`` or ``real=shapes``, the teacher's own built-in training data; 2-rectified flow++'s
"incorporating real data", paper Sec. 4.4 / config F): pair ``k`` is training image ``seed_offset + k`` with its label,
and its noise is the teacher's ODE run backwards from it (Euler on the teacher's own time grid reversed, with its
guidance: :func:`invert`), so the coupling is the teacher's in both directions. The inversion recipe is ours; the
paper's is not restated in its text we could check.

The dataset (:class:`PairShards`, ``data=pairs``) reads a complete folder into memory (plus ``real_root``, a real-data
pair folder of the same teacher) and refuses pairs made by another teacher than the run's (``teacher=``, the method's
teacher by interpolation).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from distill.teacher import Teacher, check_not_student, load_teacher
from gen.utils import dist
from gen.utils.ckpt import atomic_write, file_sha256, remove_stale_temp_files, unreadable_reason
from gen.utils.cli import CommandError, check_writable_dir, printable, run_main
from gen.utils.config import ConfigError, from_mapping
from gen.utils.progress import Progress
from gen.utils.seed import PerImageRandom

PROG = "distill.pairs"
MANIFEST = "pairs.json"
FORMAT = "gen-pairs-v1"
KEYS = ("noise", "x", "label", "seed")


def shard_name(index: int) -> str:
    return f"pairs-{index:05d}.safetensors"


def draw_pairs(teacher: Teacher, seeds: Sequence[int], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Pairs for ``seeds`` (one batch): ``{"noise", "x", "label", "seed"}`` on the CPU.

    Each seed draws its label and then its noise from its own generator (as ``eval.generator.Generator`` does), so a
    pair depends on its seed alone. ``x`` is the teacher's sample in model space (float32, not decoded or rounded).
    """
    rnd = PerImageRandom(list(seeds))
    label = rnd.randint(teacher.num_classes)
    net = teacher.net
    shape = (int(net.in_channels), int(net.input_size), int(net.input_size))
    noise = rnd.randn(shape)
    x = teacher.sample(noise.to(device), label.to(device), rnd.randn_like).cpu()
    if not bool(torch.isfinite(x).all()):
        from gen.utils.finite import NonFiniteError

        raise NonFiniteError(f"the teacher's samples of seeds {seeds[0]}..{seeds[-1]} are not finite; nothing was "
                             "written from them. Check the teacher's sampler (steps, guidance)")
    return {"noise": noise, "x": x, "label": label.long(), "seed": torch.tensor(list(seeds), dtype=torch.long)}


@torch.no_grad()
def invert(teacher: Teacher, x: Tensor, y: Tensor) -> Tensor:
    """Unit noise ``z`` whose teacher sample is ``x``: Euler steps of the teacher's (guided) ODE from ``t = 0`` up its own
    time grid to ``t_max``, ``z = x(t_max) / sigma(t_max)``. Needs a velocity defined at t = 0 (a flow teacher).

    Shapes: x (B, C, H, W) in model space, y (B,) -> z (B, C, H, W) float32.
    """
    if teacher.kind != "flow":
        raise ValueError(f"real-data pairs invert the teacher's ODE from t = 0, which needs a flow-matching velocity "
                         f"teacher; {teacher.source} is a {teacher.prediction.get('prediction')} model")
    from samplers.spec import guided_model_fn

    ts = teacher.sampler.time_grid(teacher.path).flip(0).tolist()  # ascending: 0 -> t_max
    model_fn = guided_model_fn(teacher.velocity_fn(), teacher.sampler, teacher.num_classes)
    state = x.double()
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = model_fn(state.float(), torch.full((x.shape[0],), t, device=x.device), y).double()
        state = state + (t_next - t) * v
    sigma = float(teacher.path.sigma(torch.tensor(ts[-1], dtype=torch.float64)))
    return (state / sigma).float()


def draw_real_pairs(teacher: Teacher, images: Tensor, labels: Tensor, index: Sequence[int],
                    device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Real-data pairs for training items ``index``: ``{"noise": invert(x), "x", "label", "seed": index}`` on the CPU;
    ``x`` is the image in model space ([-1, 1] pixels)."""
    idx = torch.tensor(list(index), dtype=torch.long)
    x = images[idx].float() / 127.5 - 1.0
    y = labels[idx].long()
    z = invert(teacher, x.to(device), y.to(device)).cpu()
    return {"noise": z, "x": x, "label": y, "seed": idx}


def real_images(name: str, teacher: Teacher) -> tuple[Tensor, Tensor]:
    """The built-in training images ``name`` (uint8 images, labels) the teacher was trained on, rebuilt from its
    config (a teacher trained on a subset inverts that subset); refuses another data set."""
    from gen.data.base import run_training_tensors

    data = teacher.config.get("data") or {}
    if name != data.get("name"):
        raise ValueError(f"real={name}: the teacher was trained on {data.get('name')!r}; real-data pairs invert images "
                         "of the teacher's own data")
    if (teacher.config.get("tokenizer") or {}).get("_target_") != "tokenizers.pixels.PixelTokenizer":
        raise ValueError("real=...: real-data pairs are implemented for pixel-space teachers only")
    if name not in ("mnist5k", "shapes"):
        raise ValueError(f"real={name}: real-data pairs read the built-in data (mnist5k, shapes)")
    return run_training_tensors(data)


@dataclass
class PairsConfig:
    """The settings of ``python -m distill.pairs`` (module docstring)."""

    teacher: str
    out: str
    num: int
    batch_size: int = 64
    shard_size: int = 1024
    seed_offset: int = 0
    steps: int | None = None
    device: str = "auto"
    overwrite: bool = False
    real: str | None = None

    def __post_init__(self) -> None:
        if not self.teacher or not self.out:
            raise ValueError("teacher= and out= are required: teacher=<snapshot.safetensors> out=<folder> num=<pairs>")
        for key in ("num", "batch_size", "shard_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be >= 1")
        if self.seed_offset < 0:
            raise ValueError(f"seed_offset={self.seed_offset} must be >= 0")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps={self.steps} must be null or >= 1 (the teacher's sampler steps)")


def _identity(teacher: Teacher, cfg: PairsConfig) -> dict[str, Any]:
    net = teacher.net
    return {
        "teacher": teacher.identity(), "data": teacher.config.get("data"), "sampler": teacher.sampler.config,
        "prediction": teacher.prediction, "tokenizer": teacher.config.get("tokenizer"),
        "shape": [int(net.in_channels), int(net.input_size), int(net.input_size)],
        "num": cfg.num, "seed_offset": cfg.seed_offset, "shard_size": cfg.shard_size,
        **({"real": cfg.real} if cfg.real else {}),
    }


def _key(identity: Mapping[str, Any]) -> str:
    """Hash of a pair set's identity without the teacher's path (which may move)."""
    fields = {**identity, "teacher": identity["teacher"]["sha256"]}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _claim(out: Path, identity: dict[str, Any], key: str, overwrite: bool) -> None:
    """Every process: refuse a folder of other pairs; rank 0 then removes them (``overwrite``) and temp files."""
    check_writable_dir(out, "out")
    old = read_manifest(out)
    shards = sorted(out.glob("pairs-*.safetensors"))
    if old is not None and old.get("id") != key and (shards or old):
        if not overwrite:
            who = (old.get("teacher") or {}).get("path", "unknown")
            raise CommandError(f"out={printable(out)} holds other pairs (teacher {who}, see {MANIFEST}; another "
                               "teacher, sampler, count or seeds); give another out=..., or overwrite=true to replace them")
    elif old is None and shards:
        raise CommandError(f"out={printable(out)} holds pair shards without {MANIFEST}; give another out=... or remove them")
    dist.barrier()
    if dist.is_main():
        if old is not None and old.get("id") != key:
            for f in shards:
                f.unlink()
        remove_stale_temp_files(out)  # left by a killed run: never complete shards
        atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(
            json.dumps({"format": FORMAT, "id": key, **identity, "complete": False}, indent=2)))
    dist.barrier()


def _shard_seeds(path: Path) -> list[int] | None:
    """The seeds a shard file holds, or None when it cannot be read or lacks one of :data:`KEYS` (cut by a disk
    error or a partial copy): such a shard is not done, whatever its name says."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(KEYS):
                return None
            return f.get_tensor("seed").tolist()
    except Exception:  # safetensors signals damaged files with its own error type
        return None


def read_shard(path: Path) -> dict[str, Tensor]:
    """A pair shard's tensors, or one line naming the shard and the fix when it is damaged."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors signals damaged or missing files with its own error type
        if isinstance(e, OSError) and e.errno is not None and not isinstance(e, FileNotFoundError):
            raise
        reason = "it is missing" if isinstance(e, FileNotFoundError) else f"it is damaged: {unreadable_reason(e)}"
        raise ValueError(f"pair shard {printable(path)} cannot be read ({reason}); re-run the python -m distill.pairs "
                         "command that drew the folder (same arguments): it draws that shard again") from e
    if set(tensors) != set(KEYS):
        raise ValueError(f"pair shard {printable(path)} holds {sorted(tensors)}, not {list(KEYS)}; re-run the "
                         "python -m distill.pairs command that drew the folder to draw it again")
    return tensors


def _write_shard(path: Path, tensors: Mapping[str, Tensor]) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))


def make_pairs(cfg: PairsConfig) -> dict[str, Any]:
    """Draw ``cfg.num`` pairs into ``cfg.out`` on this process's shards (module docstring); returns a summary."""
    dist.init_distributed()
    device = dist.resolve_device(cfg.device, "device")
    sampler = None
    if cfg.steps is not None:
        from gen.snapshot import read_snapshot

        stored = read_snapshot(cfg.teacher).config.get("sampler") if Path(cfg.teacher).is_file() else None
        sampler = {**(stored or {"solver": {"_target_": "samplers.sample_euler"},
                                 "grid": {"_target_": "samplers.grids.uniform_grid"}}), "steps": cfg.steps}
    teacher = load_teacher(cfg.teacher, sampler, device)
    # Pairs are reflow's data: a student's couplings would be refused by reflow after an hour of drawing, so now.
    check_not_student(teacher.config, str(cfg.teacher), "distill.pairs")
    real = real_images(cfg.real, teacher) if cfg.real else None
    if real is not None and cfg.seed_offset + cfg.num > len(real[1]):
        raise ValueError(f"real={cfg.real} has {len(real[1])} training images; seed_offset + num = "
                         f"{cfg.seed_offset + cfg.num} exceeds it")
    out = Path(cfg.out)
    identity = _identity(teacher, cfg)
    key = _key(identity)
    _claim(out, identity, key, cfg.overwrite)
    num_shards = (cfg.num - 1) // cfg.shard_size + 1

    def done(i: int) -> bool:  # a shard that is there but cut or foreign is drawn again, said on the way
        path, lo = out / shard_name(i), cfg.seed_offset + i * cfg.shard_size
        if not path.is_file():
            return False
        if _shard_seeds(path) == list(range(lo, min(lo + cfg.shard_size, cfg.seed_offset + cfg.num))):
            return True
        print(f"warning: {printable(path)} is damaged or not this folder's shard; drawing it again", file=sys.stderr)
        return False

    mine = [i for i in range(dist.rank(), num_shards, dist.world_size()) if not done(i)]
    todo = sum(min(cfg.shard_size, cfg.num - i * cfg.shard_size) for i in mine)
    with Progress(todo, f"drawing {cfg.num} pairs from {printable(cfg.teacher)}") as bar:
        for i in mine:
            lo = cfg.seed_offset + i * cfg.shard_size
            seeds = list(range(lo, min(lo + cfg.shard_size, cfg.seed_offset + cfg.num)))
            parts = []
            for b in range(0, len(seeds), cfg.batch_size):
                chunk = seeds[b : b + cfg.batch_size]
                parts.append(draw_pairs(teacher, chunk, device) if real is None
                             else draw_real_pairs(teacher, *real, chunk, device))
                bar.advance(len(parts[-1]["seed"]))
            _write_shard(out / shard_name(i), {k: torch.cat([p[k] for p in parts]) for k in KEYS})
    dist.barrier()
    if dist.is_main():
        missing = [shard_name(i) for i in range(num_shards) if not (out / shard_name(i)).is_file()]
        if missing:
            raise CommandError(f"shards {missing[:3]} are missing in {printable(out)} after drawing; re-run to draw them")
        atomic_write(out / MANIFEST, lambda tmp: Path(tmp).write_text(
            json.dumps({"format": FORMAT, "id": key, **identity, "complete": True}, indent=2)))
    dist.barrier()
    return {"out": str(out), "pairs": cfg.num, "shards": num_shards, "teacher_sha256": teacher.sha256}


class PairShards:
    """A complete pair folder in memory: items ``{"x", "noise", "label"}`` (``x``, ``noise`` float32 (C, H, W)).

    Args:
        root: the folder written by ``python -m distill.pairs``.
        real_root: a folder of real-data pairs (``real=...``) of the same teacher, appended to ``root``'s.
        teacher: the run's teacher snapshot; pairs made by another teacher (by file SHA-256) are refused.
        data_name: the run's ``data.name``; pairs of a teacher of another data set are refused.
    """

    def __init__(self, root: str, teacher: str | None = None, data_name: str | None = None,
                 real_root: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            lexical = Path(os.path.normpath(root))
            hint = (f"; a path through '..' needs every folder before the '..' to exist, so give {lexical} itself"
                    if ".." in self.root.parts and lexical.is_dir() else
                    "; draw pairs there with python -m distill.pairs teacher=<snapshot> out=<folder> num=<pairs>")
            raise FileNotFoundError(f"data.dataset.root={root}: no such folder{hint}")
        manifest = read_manifest(self.root)
        if not manifest or manifest.get("format") != FORMAT:
            raise FileNotFoundError(f"data.dataset.root={root} holds no pairs ({MANIFEST} missing or unreadable); draw "
                                    "them with python -m distill.pairs teacher=<snapshot> out=<folder> num=<pairs>")
        if not manifest.get("complete"):
            raise ValueError(f"the pairs in {root} are incomplete (a drawing run was stopped); re-run the same "
                             "python -m distill.pairs command to finish them")
        made_by = manifest["teacher"]
        if teacher is not None:
            if not Path(teacher).is_file():
                raise FileNotFoundError(f"teacher snapshot {teacher} does not exist; give the teacher's snapshot file")
            sha = file_sha256(teacher)
            if sha != made_by["sha256"]:
                raise ValueError(f"the pairs in {root} were made by teacher {made_by['path']} (sha256 "
                                 f"{made_by['sha256'][:12]}), not by this run's teacher {teacher} ({sha[:12]}); draw "
                                 f"pairs with it: python -m distill.pairs teacher={teacher} out=<folder> num=<pairs>")
        self.manifest, self.real_id = manifest, None
        data = manifest.get("data") or {}
        if data_name is not None and data.get("name") != data_name:
            raise ValueError(f"the pairs in {root} are of data {data.get('name')!r}, not data.name={data_name!r}; "
                             f"set data.name={data.get('name')}")
        self.name = str(data.get("name"))
        self.channels, self.resolution = int(data["channels"]), int(data["resolution"])
        self.num_classes = int(data["num_classes"])
        self.teacher_sha256 = str(made_by["sha256"])
        num, size = int(manifest["num"]), int(manifest["shard_size"])
        parts = [read_shard(self.root / shard_name(i)) for i in range((num - 1) // size + 1)]
        self._tensors = {k: torch.cat([p[k] for p in parts]) for k in ("x", "noise", "label")}
        self._tensors["label"] = self._tensors["label"].long()
        if real_root is not None:  # real-data pairs of the same teacher, appended
            real = PairShards(real_root, teacher, data_name)
            if real.teacher_sha256 != self.teacher_sha256 or not real.manifest.get("real"):
                raise ValueError(f"data.dataset.real_root={real_root} must hold real-data pairs (real=...) of the teacher "
                                 f"of {root}")
            self._tensors = {k: torch.cat([v, real.tensors()[k]]) for k, v in self._tensors.items()}
            self.real_id = real.manifest["id"]

    def __len__(self) -> int:
        return int(self._tensors["label"].shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"x": self._tensors["x"][index], "noise": self._tensors["noise"][index],
                "label": int(self._tensors["label"][index])}

    def tensors(self) -> dict[str, Tensor]:
        """All pairs at once (shared, do not modify)."""
        return self._tensors

    def content_identity(self) -> dict[str, Any]:
        """What resuming checks: the pair set's id (teacher, sampler, seeds, count) and the teacher's hash."""
        return {"kind": "pairs", "sha256": self.manifest["id"], "real": self.real_id, "teacher_sha256": self.teacher_sha256,
                "count": len(self)}


def parse_args(argv: Sequence[str]) -> dict[str, Any]:
    """``key=value`` arguments as a mapping (values parsed as JSON where they parse, else kept as text)."""
    out: dict[str, Any] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"argument {arg!r} is not key=value; e.g. teacher=<snapshot> out=<folder> num=1000")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
        if key in ("teacher", "out", "device"):
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    def go() -> int:
        cfg = from_mapping(PairsConfig, parse_args(sys.argv[1:] if argv is None else argv), "")
        result = make_pairs(cfg)
        if dist.is_main():
            print("\n".join(f"{k:>14}: {v}" for k, v in result.items()))
        return 0

    return run_main(go, PROG)


if __name__ == "__main__":
    sys.exit(main())
