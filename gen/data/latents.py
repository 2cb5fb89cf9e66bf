"""Pre-extracted tokenizer latents: extraction into shards, per-channel statistics, the memory-mapped dataset.

Layout of an extraction folder (LightningDiT's extract_features.py and EDM2's dataset_tool.py ``encode`` store
latents once instead of encoding every step; hustvl/LightningDiT, NVlabs/edm2)::

    manifest.json            what is extracted: dataset, image size, tokenizer identity and config, seed, sharding
    shard-00000.safetensors  images [0, S): "latent" and "latent_flip" float32 (n, C, h, w), "label" int64 (n,),
                             optionally "image" uint8 (n, C_img, H, W)
    shard-00001.safetensors  images [S, 2S) ...
    stats.json               per-channel mean/std of all stored latents (both flips); written last, so its
                             presence marks a complete extraction

Every shard is checked before it is trusted, by whoever reads it (``LatentShards`` on opening the folder,
``extract_latents`` before counting a shard as done and before the statistics): its metadata names the extraction
it belongs to (``plan``: the SHA-256 of the manifest's settings, tokenizer identity included) and the SHA-256 of
its tensors (names, dtypes, shapes and bytes, ``content_sha256``). A damaged shard, or one copied from another
extraction (another tokenizer, seed or dataset), is refused on reading with a message naming the file, and
rewritten by re-running the extraction. The statistics are computed from checked shards only and must be finite
with std > 0 in every channel, so ``stats.json`` never holds NaN or statistics over mixed latents. Checking reads
every shard once (about a second per GB).

Raw latents are stored (before any normalisation), so one extraction serves 0.18215 scaling and per-channel
statistics alike (EDM2's chain: pixels -> stored raw latents -> normalised latents, training/encoders.py).

Extraction is split across processes by shard (shard k on rank k mod world), every posterior sample is drawn
from a generator seeded by (seed, image index, flip), and each shard is written atomically, so a killed run
re-run with the same command writes exactly the missing shards, and the shards are byte-identical to those of
an uninterrupted run or of a run on another number of processes (on the same machine and thread count:
convolution rounding may depend on both). The statistics are float64 sums per shard, added in shard order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from gen.utils import dist
from gen.utils.ckpt import atomic_write
from gen.utils.seed import per_image_generators

FORMAT = "gen-latents-v1"
MANIFEST = "manifest.json"
STATS = "stats.json"

log = logging.getLogger(__name__)


class NonFiniteLatentError(ValueError):
    """The tokenizer produced NaN or infinite latents for an image (named by its dataset index)."""


class TokenizerMismatchError(ValueError):
    """Latents or statistics were made by another tokenizer than the one configured."""


def shard_name(k: int) -> str:
    """File name of shard ``k``."""
    return f"shard-{k:05d}.safetensors"


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def _write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(_json_text(obj)))


# ----------------------------------------------------------------------------------------------
# Extraction.


def extraction_plan(
    dataset: Any,
    tokenizer: Any,
    *,
    shard_size: int = 1000,
    seed: int = 0,
    store_images: bool = False,
) -> dict[str, Any]:
    """The manifest of an extraction: everything that determines the shards' bytes, and nothing else.

    Raises:
        ValueError: the tokenizer cannot take the dataset's images (channels, or a size its factor does not
            divide), or a bad shard size.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if int(dataset.channels) != int(tokenizer.image_channels):
        raise ValueError(
            f"the tokenizer takes {tokenizer.image_channels}-channel images but dataset {dataset.name!r} has "
            f"{dataset.channels} channels"
        )
    tokenizer.check_image_size(int(dataset.resolution), int(dataset.resolution))
    n = len(dataset)
    if n == 0:
        raise ValueError(f"dataset {dataset.name!r} is empty")
    return {
        "format": FORMAT,
        "dataset": {"name": str(dataset.name), "num_images": n, "resolution": int(dataset.resolution),
                    "channels": int(dataset.channels), "num_classes": int(dataset.num_classes)},
        "latent_shape": list(tokenizer.latent_shape(int(dataset.resolution))),
        "tokenizer": tokenizer.identity(),
        "tokenizer_config": dict(tokenizer.config),
        "seed": int(seed),
        "shard_size": int(shard_size),
        "num_shards": (n + shard_size - 1) // shard_size,
        "store_images": bool(store_images),
    }


def _comparable(plan: Mapping[str, Any]) -> dict[str, Any]:
    # Where the weights were read from does not change the shards (their hash is in the identity).
    config = {k: v for k, v in plan.get("tokenizer_config", {}).items() if k not in ("weights", "download")}
    return {**plan, "tokenizer_config": config}


def read_manifest(path: Path) -> dict[str, Any]:
    """``manifest.json`` of an extraction, refused with its path unless it is this toolkit's JSON manifest."""
    try:
        plan = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON manifest ({e}); delete {path.parent} and extract again") from e
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        found = plan.get("format") if isinstance(plan, dict) else type(plan).__name__
        raise ValueError(f"{path} is not a latent extraction of this toolkit (format {found!r})")
    return plan


def _check_same_plan(found: Mapping[str, Any], plan: Mapping[str, Any], out: Path) -> None:
    found, plan = _comparable(found), _comparable(plan)
    if found == plan:
        return
    keys = sorted(k for k in set(found) | set(plan) if found.get(k) != plan.get(k))
    detail = "; ".join(f"{k}: folder has {json.dumps(found.get(k))[:160]}, this run {json.dumps(plan.get(k))[:160]}"
                       for k in keys)
    raise ValueError(
        f"{out} already holds an extraction with other settings ({detail}). Use another output folder (out=...), "
        f"or delete {out} to start over."
    )


def plan_digest(plan: Mapping[str, Any]) -> str:
    """SHA-256 of an extraction's settings (the manifest less where the weights were read from): the ``plan``
    every shard of that extraction records, so a shard of another extraction is recognised."""
    return hashlib.sha256(_json_text(_comparable(plan)).encode()).hexdigest()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors: names, dtypes, shapes and bytes, in name order (a shard's ``content_sha256``)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def shard_problem(path: Path, start: int, count: int, digest: str) -> str | None:
    """Why the shard at ``path`` cannot be trusted as images [start, start + count) of the extraction whose
    :func:`plan_digest` is ``digest`` (None: it can). Reads the whole file."""
    from safetensors import safe_open

    if not path.is_file():
        return "it is missing"
    try:
        with safe_open(str(path), "pt") as f:
            info = json.loads((f.metadata() or {}).get("shard", "{}"))
            if not isinstance(info, dict):
                return "its metadata is not a shard record"
            if "content_sha256" not in info or "plan" not in info:
                return "it carries no checksum (written by an older version of the toolkit, or by another tool)"
            if info["plan"] != digest:
                return ("it belongs to another extraction (another tokenizer, seed or dataset) than the manifest "
                        "describes")
            if info.get("start") != start or info.get("count") != count:
                return f"it holds images {info.get('start')}+{info.get('count')}, the manifest says {start}+{count}"
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged headers and data
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        return f"it cannot be read as a safetensors file ({reason})"
    if tensors_sha256(tensors) != info["content_sha256"]:
        return "its contents do not match the checksum it was written with (the file is damaged)"
    return None


@torch.no_grad()
def _encode_shard(
    dataset: Any, tokenizer: Any, start: int, stop: int, plan: Mapping[str, Any], batch_size: int, workers: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    from torch.utils.data import DataLoader, Subset

    loader = DataLoader(Subset(dataset, range(start, stop)), batch_size=batch_size, num_workers=workers, shuffle=False)
    parts: dict[str, list[torch.Tensor]] = {"latent": [], "latent_flip": [], "label": [], "image": []}
    index = start
    for images, labels in loader:
        idx = list(range(index, index + images.shape[0]))
        index += images.shape[0]
        if images.dtype != torch.uint8:
            raise TypeError(f"dataset {plan['dataset']['name']!r} yields {images.dtype} images; extraction needs uint8")
        for key, batch, flip in (("latent", images, False), ("latent_flip", images.flip(-1), True)):
            gens = per_image_generators(idx, "latent", plan["seed"], "flip" if flip else "plain")
            z = tokenizer.raw_latents(batch.to(device), gens).float().cpu()
            bad = ~torch.isfinite(z.flatten(1)).all(1)
            if bool(bad.any()):
                first = idx[int(bad.nonzero()[0])]
                raise NonFiniteLatentError(
                    f"the tokenizer gave non-finite latents for image {first} of dataset {plan['dataset']['name']!r}"
                    f"{' (flipped)' if flip else ''}; {int(bad.sum())} image(s) of this batch are affected. Check "
                    f"that image and the tokenizer weights; nothing was written for this shard."
                )
            parts[key].append(z)
        parts["label"].append(torch.as_tensor(labels, dtype=torch.int64))
        if plan["store_images"]:
            parts["image"].append(images.contiguous())
    out = {k: torch.cat(v).contiguous() for k, v in parts.items() if v}
    expect = [stop - start, *plan["latent_shape"]]
    if list(out["latent"].shape) != expect:
        raise ValueError(f"tokenizer latents have shape {list(out['latent'].shape[1:])}, the plan says {expect[1:]}")
    return out


def _shard_sums(path: Path) -> torch.Tensor:
    """(3, C) float64: count, sum and sum of squares per channel over both flips of one shard."""
    from safetensors import safe_open

    rows = []
    with safe_open(str(path), "pt") as f:
        for key in ("latent", "latent_flip"):
            z = f.get_tensor(key).double().transpose(0, 1).flatten(1)  # (C, n*h*w)
            rows.append(torch.stack([torch.full((z.shape[0],), float(z.shape[1]), dtype=torch.float64),
                                     z.sum(1), z.square().sum(1)]))
    return rows[0] + rows[1]


def extract_latents(
    dataset: Any,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    shard_size: int = 1000,
    batch_size: int = 32,
    seed: int = 0,
    store_images: bool = False,
    workers: int = 0,
    device: torch.device | str | None = None,
    on_shard: Callable[[int, int], None] | None = None,
) -> Path:
    """Encode every image of ``dataset`` (and its mirror image) into shards under ``out``; resumable.

    Call it on every process of a group (torchrun; gloo on CPU): shard k is written by rank k mod world.

    Args:
        dataset: items ``(uint8 (C, H, W), label)``; attributes ``name``, ``channels``, ``resolution``,
            ``num_classes`` (the datasets of ``gen.data``).
        tokenizer: a ``tokenizers.Tokenizer`` (``raw_latents``, ``identity``, ``config``, ``latent_shape``).
        out: the extraction folder.
        shard_size: images per shard (the unit of resuming and of work split).
        batch_size: images per tokenizer call (does not change the result beyond convolution rounding).
        seed: seeds the posterior samples: image i uses ``derive_seed("latent", seed, "plain" | "flip", i)``.
        store_images: also store the uint8 images (for methods that need pixels next to latents).
        workers: DataLoader workers decoding images.
        device: where the tokenizer runs (default: this process's CUDA device, else CPU).
        on_shard: called as ``on_shard(done_shards_of_this_rank, shards_of_this_rank)`` after each shard.

    Returns:
        ``out`` as a Path; ``stats.json`` there marks the extraction complete.

    Raises:
        ValueError: the folder holds an extraction with other settings, or the tokenizer does not fit the data.
        NonFiniteLatentError: non-finite latents for some image (named by index).
    """
    out = Path(out)
    device = torch.device(device) if device is not None else dist.default_device()
    tokenizer = tokenizer.to(device).eval()
    plan = extraction_plan(dataset, tokenizer, shard_size=shard_size, seed=seed, store_images=store_images)
    manifest = out / MANIFEST
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        if manifest.is_file():
            _check_same_plan(read_manifest(manifest), plan, out)
        else:
            _write_json(manifest, plan)
        for stale in out.glob(".tmp-*"):  # temp files of a killed run: never renamed, never valid
            stale.unlink()
    dist.barrier()
    _check_same_plan(read_manifest(manifest), plan, out)

    mine = list(range(dist.rank(), plan["num_shards"], dist.world_size()))
    for done, k in enumerate(mine, 1):
        _write_shard(dataset, tokenizer, out, k, plan, batch_size, workers, device)
        if on_shard is not None:
            on_shard(done, len(mine))
    dist.barrier()
    _write_statistics(out, plan, mine)
    return out


def _shard_range(k: int, plan: Mapping[str, Any]) -> tuple[int, int]:
    """Images ``[start, stop)`` of shard ``k``."""
    size, n = plan["shard_size"], plan["dataset"]["num_images"]
    return k * size, min((k + 1) * size, n)


def _write_shard(
    dataset: Any, tokenizer: Any, out: Path, k: int, plan: Mapping[str, Any], batch_size: int, workers: int,
    device: torch.device,
) -> None:
    """Encode shard ``k`` unless a sound copy of it is there (a damaged or foreign one is rewritten)."""
    start, stop = _shard_range(k, plan)
    path, digest = out / shard_name(k), plan_digest(plan)
    problem = shard_problem(path, start, stop - start, digest)
    if problem is None:
        return
    if path.exists():  # a damaged or foreign shard is never counted as done: say so, and rewrite it
        log.warning("rewriting %s: %s", path, problem)
    tensors = _encode_shard(dataset, tokenizer, start, stop, plan, batch_size, workers, device)
    # One metadata entry holding sorted JSON, so the file's bytes are a function of its content.
    meta = {"shard": json.dumps({"start": start, "count": stop - start, "format": FORMAT, "plan": digest,
                                 "content_sha256": tensors_sha256(tensors)}, sort_keys=True)}
    from safetensors.torch import save

    data = save(tensors, metadata=meta)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    log.info("wrote %s (images %d-%d)", path.name, start, stop - 1)


def _write_statistics(out: Path, plan: Mapping[str, Any], mine: list[int]) -> None:
    """``stats.json`` (per-channel mean and std) from the shard files, so a resumed run gets them too.

    Per-shard float64 sums, each shard's row filled by the rank that owns it, reduced (adding zeros is exact), then
    added in shard order. Every shard is checked again here (a shard written by another process or run, or damaged
    since), and a bad one turns its row to NaN, so every rank learns of it through the reduction and none writes
    statistics.
    """
    num_shards, digest = plan["num_shards"], plan_digest(plan)
    sums = torch.zeros(num_shards, 3, plan["latent_shape"][0], dtype=torch.float64)
    problems: dict[int, str] = {}
    for k in mine:
        start, stop = _shard_range(k, plan)
        problem = shard_problem(out / shard_name(k), start, stop - start, digest)
        if problem is None:
            sums[k] = _shard_sums(out / shard_name(k))
        else:
            problems[k], sums[k] = problem, float("nan")
    dist.all_reduce_sum(sums)
    bad = [k for k in range(num_shards) if not bool(torch.isfinite(sums[k]).all())]
    if bad:
        k = bad[0]
        why = problems.get(k, "checked by another process")
        raise ValueError(
            f"{out / shard_name(k)} cannot be trusted: {why}; {len(bad)} shard(s) affected, stats.json not written. "
            f"Re-run the extraction command to rewrite them (or delete {out} to start over)."
        )
    if dist.is_main():
        total = torch.zeros_like(sums[0])
        for k in range(num_shards):
            total += sums[k]
        count, s1, s2 = total
        mean = s1 / count
        std = (s2 / count - mean.square()).clamp_min(0).sqrt()
        stats = {"format": FORMAT, "mean": mean.tolist(), "std": std.tolist(),
                 "num_values_per_channel": int(count[0]), "tokenizer": plan["tokenizer"]}
        check_statistics(stats, out / STATS, int(plan["latent_shape"][0]))  # before anything is written
        _write_json(out / STATS, stats)
    dist.barrier()


def check_statistics(stats: Mapping[str, Any], where: str | os.PathLike, channels: int | None = None) -> None:
    """Refuse per-channel statistics that cannot normalise latents: not ``channels`` numbers each, a mean that is
    not finite, or a std that is not finite and > 0 (a constant channel, or NaN from damaged latents).

    Raises:
        ValueError: naming ``where``, the channel and its value.
    """
    mean, std = stats.get("mean"), stats.get("std")
    for key, values in (("mean", mean), ("std", std)):
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ValueError(f"{where}: {key} must be a list of numbers, one per latent channel, got {values!r:.80}")
    if len(mean) != len(std) or (channels is not None and len(mean) != channels):
        raise ValueError(f"{where}: {len(mean)} means and {len(std)} stds for "
                         f"{channels if channels is not None else len(mean)} latent channels")
    for c, (m, s) in enumerate(zip(mean, std)):
        if not math.isfinite(m):
            raise ValueError(f"{where}: the mean of latent channel {c} is {m}; the latents are damaged or the "
                             "tokenizer diverged. Re-run the extraction (damaged shards are rewritten).")
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"{where}: the std of latent channel {c} is {s}; per-channel normalisation needs a "
                             "finite std > 0 (a constant channel cannot be normalised). Check the tokenizer, or "
                             "normalise with a scaling factor instead of per-channel statistics.")


# ----------------------------------------------------------------------------------------------
# Reading.


def load_latent_statistics(path: str | os.PathLike) -> dict[str, Any]:
    """``stats.json`` of an extraction: ``mean``, ``std`` (lists), ``tokenizer`` (identity) and counts."""
    path = Path(path)
    if path.is_dir():
        path = path / STATS
    if not path.is_file():
        raise FileNotFoundError(f"no latent statistics at {path}")
    try:
        stats = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a JSON statistics file ({e}); re-run the extraction to rewrite it") from e
    if not isinstance(stats, dict) or stats.get("format") != FORMAT:
        found = stats.get("format") if isinstance(stats, dict) else type(stats).__name__
        raise ValueError(f"{path} is not a latent statistics file of this toolkit (format {found!r})")
    check_statistics(stats, path)
    return stats


class LatentShards(Dataset):
    """An extraction folder read memory-mapped: one dict per image.

    Items: ``{"label": int, "latent": float32 (C, h, w), "latent_flip": float32 (C, h, w)}`` plus
    ``"image": uint8 (C_img, H, W)`` when the extraction stored images. Latents are raw tokenizer outputs:
    normalise them with the tokenizer (whose statistics come from ``latent_mean``/``latent_std``).

    Args:
        root: the extraction folder.
        resolution, channels, num_classes: optional expectations (from the data config), checked against the
            manifest so a config that describes other data fails before training.
        name: optional name (default: the extracted dataset's name).

    Attributes:
        num_classes, resolution, channels (of the images), name, latent_shape (C, h, w), latent_mean and
        latent_std (float32 (C,)), tokenizer (identity: ``_target_``, architecture config, weights SHA-256),
        tokenizer_config (the full spec it was built from), has_images, labels (int64 (N,)).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int | None = None,
        channels: int | None = None,
        num_classes: int | None = None,
        name: str | None = None,
    ) -> None:
        from safetensors import safe_open

        self.root = Path(root)
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{self.root} holds no latent extraction ({MANIFEST} missing); create it with "
                f"`python -m scripts.extract_latents data=<images> tokenizer=<preset> out={self.root}`"
            )
        plan = read_manifest(manifest)
        missing = [shard_name(k) for k in range(plan["num_shards"]) if not (self.root / shard_name(k)).is_file()]
        if missing or not (self.root / STATS).is_file():
            raise FileNotFoundError(
                f"the extraction in {self.root} is incomplete ({len(missing)} of {plan['num_shards']} shards missing"
                f"{', e.g. ' + missing[0] if missing else ''}{'' if (self.root / STATS).is_file() else ', no ' + STATS}); "
                f"re-run the extraction command to finish it"
            )
        stats = load_latent_statistics(self.root / STATS)
        if stats["tokenizer"] != plan["tokenizer"]:
            raise TokenizerMismatchError(
                f"{self.root / STATS} belongs to the latents of another tokenizer ({_name(stats['tokenizer'])}) than "
                f"the shards ({_name(plan['tokenizer'])}); re-run the extraction to recompute it"
            )
        data = plan["dataset"]
        for key, want in (("resolution", resolution), ("channels", channels), ("num_classes", num_classes)):
            if want is not None and int(want) != int(data[key]):
                raise ValueError(
                    f"data.{key} is {want} but the latents in {self.root} were extracted from images with "
                    f"{key} {data[key]}; set data.{key}={data[key]}"
                )
        self.plan = plan
        self.name = name or data["name"]
        self.num_classes = int(data["num_classes"])
        self.resolution = int(data["resolution"])
        self.channels = int(data["channels"])
        self.latent_shape = tuple(plan["latent_shape"])
        self.latent_mean = torch.tensor(stats["mean"], dtype=torch.float32)
        self.latent_std = torch.tensor(stats["std"], dtype=torch.float32)
        self.tokenizer: dict[str, Any] = plan["tokenizer"]
        self.tokenizer_config: dict[str, Any] = plan["tokenizer_config"]
        self.has_images = bool(plan["store_images"])
        self._n = int(data["num_images"])
        self._shard_size = int(plan["shard_size"])
        # Every shard is checked against its checksum and the manifest before anything of it is used.
        digest, labels, self._shard_sha256 = plan_digest(plan), [], []
        for k in range(plan["num_shards"]):
            path = self.root / shard_name(k)
            start = k * self._shard_size
            problem = shard_problem(path, start, min(self._shard_size, self._n - start), digest)
            if problem is not None:
                raise ValueError(
                    f"{path} cannot be trusted: {problem}. Re-run the extraction command that made {self.root} "
                    f"(`python -m scripts.extract_latents ... out={self.root}`); it rewrites such shards."
                )
            with safe_open(str(path), "pt") as f:
                labels.append(f.get_tensor("label"))
                self._shard_sha256.append(json.loads(f.metadata()["shard"])["content_sha256"])
        self.labels = torch.cat(labels)
        if self.labels.shape != (self._n,):
            raise ValueError(f"the shards in {self.root} hold {self.labels.shape[0]} labels for {self._n} images")
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._n

    def content_identity(self) -> dict[str, Any]:
        """A fingerprint of the extraction's content (its manifest, statistics and every shard's checked content
        checksum), so a training run resumes on the same latents after the folder moved."""
        h = hashlib.sha256()
        for name in (MANIFEST, STATS):
            h.update((self.root / name).read_bytes())
        for k, sha in enumerate(self._shard_sha256):
            h.update(f"{shard_name(k)}|{sha}\n".encode())
        return {"kind": "latents", "count": self._n, "sha256": h.hexdigest()}

    def _shard(self, k: int) -> Any:
        from safetensors import safe_open

        if self._pid != os.getpid():  # a DataLoader worker: open its own memory maps
            self._handles, self._pid = {}, os.getpid()
        if k not in self._handles:
            self._handles[k] = safe_open(str(self.root / shard_name(k)), "pt")
        return self._handles[k]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self._n <= index < self._n:
            raise IndexError(f"index {index} out of range for {self._n} images")
        index %= self._n
        k, i = divmod(index, self._shard_size)
        f = self._shard(k)
        item: dict[str, Any] = {
            "label": int(self.labels[index]),
            "latent": f.get_slice("latent")[i],
            "latent_flip": f.get_slice("latent_flip")[i],
        }
        if self.has_images:
            item["image"] = f.get_slice("image")[i]
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # memory maps do not pickle; workers reopen them
        return state

    def __repr__(self) -> str:
        return (
            f"LatentShards(root={str(self.root)!r}, n={self._n}, latent_shape={self.latent_shape}, "
            f"resolution={self.resolution}, num_classes={self.num_classes}, tokenizer={_name(self.tokenizer)})"
        )


# ----------------------------------------------------------------------------------------------
# Tokenizer checks.


def _name(identity: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in identity.get("config", {}).items())
    return f"{identity.get('_target_')}({args}) with weights SHA-256 {str(identity.get('weights_sha256'))[:12]}"


def check_tokenizer(tokenizer: Any, dataset: LatentShards) -> None:
    """Refuse a tokenizer that is not the one the dataset's latents were extracted with, or foreign statistics.

    The identity (class, architecture, weights hash) must be equal. If the tokenizer already carries
    per-channel statistics (a snapshot's tokenizer, or statistics set by hand), they must be the dataset's.

    Raises:
        TokenizerMismatchError: naming both tokenizers, or both sets of statistics.
    """
    ident = tokenizer.identity()
    if ident != dataset.tokenizer:
        what = [k for k in ("_target_", "config", "weights_sha256") if ident.get(k) != dataset.tokenizer.get(k)]
        raise TokenizerMismatchError(
            f"the latents in {dataset.root} were extracted with {_name(dataset.tokenizer)}, but the configured "
            f"tokenizer is {_name(ident)} (they differ in: {', '.join(what)}). Use the tokenizer that extracted "
            f"them, or extract the data again with this one."
        )
    if tokenizer.has_statistics():
        mean, std = tokenizer.latent_mean.detach().cpu().float(), tokenizer.latent_std.detach().cpu().float()
        if not (torch.allclose(mean, dataset.latent_mean, rtol=1e-6, atol=1e-7)
                and torch.allclose(std, dataset.latent_std, rtol=1e-6, atol=1e-7)):
            raise TokenizerMismatchError(
                f"the tokenizer carries per-channel statistics (mean {mean[:3].tolist()}..., std {std[:3].tolist()}...) "
                f"that are not those of the latents in {dataset.root} (mean {dataset.latent_mean[:3].tolist()}..., "
                f"std {dataset.latent_std[:3].tolist()}...); drop the tokenizer's mean/std to take the dataset's"
            )


def apply_statistics(tokenizer: Any, dataset: LatentShards) -> None:
    """Check the tokenizer against the dataset, then normalise with the dataset's per-channel statistics.

    For per-channel normalisation (LightningDiT: ``(z - mean) / std``, scaling factor 1); the statistics then
    ride in the tokenizer's config, hence in every snapshot.
    """
    check_tokenizer(tokenizer, dataset)
    tokenizer.set_statistics(dataset.latent_mean, dataset.latent_std)
