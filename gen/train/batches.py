"""Training batches: the per-process stream of micro-batches, positioned by the global image count.

The data order is a function of ``(seed, images seen)`` (``gen.data.InfiniteSampler``): the global batch of a
step is stream positions ``[nimg, nimg + batch_size)``, and process ``r`` of ``W`` reads positions
``nimg + r + W k``. Every sample carries its position, which keys its random stream (``SampleRandom``), so a
run gives the same samples, noise and flips at any number of processes or accumulation rounds.

A raw item is a dict (``"image"`` uint8 (C, H, W), ``"label"``, optional ``"latent"``/``"latent_flip"``
pre-extracted latents, ...) or an ``(image, label)`` pair. :func:`make_batch` moves a collated micro-batch to
the device, applies the random horizontal flip and adds the model input ``"x0"`` (the tokenizer's encoding
of the pixels, or its normalisation of stored latents).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gen.data import InfiniteSampler
from gen.utils.seed import SampleRandom


def _as_dict(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return dict(item)
    image, label = item
    return {"image": image, "label": label}


class Batches:
    """Endless micro-batches for one process (dicts of CPU tensors, plus ``"position"``).

    In-memory datasets (``.tensors()``, a tuple ``(images, labels)`` or a dict of stacked tensors) are indexed
    directly; others go through a DataLoader with ``num_workers`` workers.
    """

    def __init__(self, dataset: Any, batch: int, rank: int, world: int, seed: int, start_nimg: int, num_workers: int):
        self.sampler = InfiniteSampler(len(dataset), rank=rank, world=world, seed=seed, start=start_nimg)
        self.batch, self.rank, self.world = batch, rank, world
        self.next_position = start_nimg + rank  # stream position of this process's next item
        tensors = dataset.tensors() if hasattr(dataset, "tensors") else None
        self.tensors = None if tensors is None else _as_dict(tensors)
        if self.tensors is None:
            self.loader: Iterator[Any] = iter(
                torch.utils.data.DataLoader(
                    dataset, batch_size=batch, sampler=self.sampler, num_workers=num_workers,
                    pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=num_workers > 0,
                )
            )
        else:
            self.indices = iter(self.sampler)

    def next(self) -> dict[str, Tensor]:
        """The next micro-batch: ``{"image", "label", ..., "position"}``, each with a leading batch dimension."""
        if self.tensors is None:
            raw = _as_dict(next(self.loader))
        else:
            idx = torch.tensor([next(self.indices) for _ in range(self.batch)])
            raw = {k: v[idx] for k, v in self.tensors.items()}
        raw["label"] = torch.as_tensor(raw["label"]).long()
        raw["position"] = self.next_position + self.world * torch.arange(self.batch, dtype=torch.long)
        self.next_position += self.world * self.batch
        return raw


DEFAULT_FLIP_KEYS: tuple[str, ...] = ("image", "latent")


@torch.no_grad()
def make_batch(
    raw: Mapping[str, Tensor], tokenizer: Any, rng: SampleRandom, hflip: bool, device: torch.device,
    flip_keys: Sequence[str] = DEFAULT_FLIP_KEYS,
) -> dict[str, Tensor]:
    """Device batch with the model input ``"x0"`` (the default ``Method.prepare_batch``).

    With ``hflip`` each sample is mirrored with probability 1/2, decided by one uniform from its own stream, and
    every key of ``flip_keys`` present in the batch is mirrored alike (the stored flipped latent ``latent_flip`` is
    taken instead of mirroring ``latent``), so pixel-reading objectives (representation alignment) and paired data
    see the same image. ``"x0"`` is the normalised latent, else the tokenizer's encoding of the pixels.
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
    flip = (rng.rand().to(device) < 0.5) if hflip else None  # (B,)

    def mirror(x: Tensor, flipped: Tensor | None = None) -> Tensor:
        if flip is None:
            return x
        other = x.flip(-1) if flipped is None else flipped
        return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), other, x)

    for key in flip_keys:
        if key in batch:
            batch[key] = mirror(batch[key], batch.get("latent_flip") if key == "latent" else None)
    if "latent" in batch:
        batch["x0"] = tokenizer.normalize(batch["latent"].float())
    elif "image" in batch:  # a stochastic encoder (VAE posterior) draws from each sample's own stream, after the flip
        batch["x0"] = tokenizer.encode(batch["image"], generator=rng.generators)
    else:
        raise KeyError(f"the batch has neither 'image' nor 'latent' (keys {sorted(batch)}); a method that needs no "
                       "images (a data-free student) overrides Method.prepare_batch")
    return batch


def dataset_keys(dataset: Any) -> dict[str, tuple[int, ...]]:
    """The keys of one item of ``dataset`` and the shape of each (``(image, label)`` pairs read as such)."""
    if hasattr(dataset, "tensors"):
        tensors = _as_dict(dataset.tensors())
        return {k: tuple(torch.as_tensor(v).shape[1:]) for k, v in tensors.items()}
    return {k: tuple(torch.as_tensor(v).shape) for k, v in _as_dict(dataset[0]).items()}


def check_batch_keys(
    keys: Mapping[str, tuple[int, ...]], reads: Sequence[str], flip_keys: Sequence[str], hflip: bool, who: str
) -> None:
    """Refuse, before the first step, a key the method reads that the dataset lacks, and (with ``hflip``) a spatial
    key the flip would leave unmirrored while its partners are mirrored (a noise-image pair out of register).

    Raises:
        ValueError naming the key and the fix.
    """
    missing = [k for k in reads if k not in keys]
    if missing:
        raise ValueError(f"{who} reads dataset key(s) {missing}, which the dataset lacks (its items hold "
                         f"{sorted(keys)}); use a dataset that stores them, or another method")
    if not hflip:
        return
    companions = {"latent_flip"} if "latent" in flip_keys else set()
    loose = [k for k, shape in keys.items() if len(shape) >= 2 and k not in flip_keys and k not in companions]
    if loose:
        raise ValueError(
            f"trainer.hflip=true mirrors {[k for k in flip_keys if k in keys]} but would leave the dataset's "
            f"{loose} unmirrored, out of register with them; {who} must list them in flip_keys (mirrored together), "
            "or set trainer.hflip=false"
        )


def label_range_error(labels: torch.Tensor, num_classes: int, where: str) -> str | None:
    """A message when ``labels`` leave [0, num_classes); label ``num_classes`` is the backbones' null class."""
    if labels.numel() == 0:
        return None
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < num_classes:
        return None
    bad = lo if lo < 0 else hi
    what = "the null class (unconditional)" if bad == num_classes else "outside the label table"
    return (
        f"{where} holds label {bad}, but the data has num_classes={num_classes}: labels must be in "
        f"[0, {num_classes - 1}]; label {bad} is {what}. Fix the dataset's labels or data.num_classes"
    )


def all_labels(dataset: Any) -> torch.Tensor | None:
    """Every label of the dataset when it is known without decoding (in-memory tensors, a list of targets)."""
    if hasattr(dataset, "tensors"):
        tensors = dataset.tensors()
        labels = tensors["label"] if isinstance(tensors, Mapping) else tensors[1]
        return torch.as_tensor(labels).long()
    targets = getattr(dataset, "targets", None)
    return torch.as_tensor(list(targets)).long() if targets is not None else None


_HASHED_BYTES = 1 << 28  # in-memory data up to 256 MB is hashed whole, larger data by a fixed stride


def _tensor_digest(h: Any, name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.zeros(0, dtype=torch.uint8)
    if flat.numel() > _HASHED_BYTES:
        flat = flat[:: flat.numel() // _HASHED_BYTES + 1]
    h.update(flat.numpy().tobytes())


def data_identity(dataset: Any) -> dict[str, Any] | None:
    """A fingerprint of the training data's content, so that a moved dataset is recognised on resume.

    In-memory datasets (``tensors()``): SHA-256 of the image and label tensors (by a fixed stride beyond 256 MB).
    File datasets (``files`` + ``targets`` + ``root``, e.g. image folders): SHA-256 of every file's path relative to
    the root, its size and its label (one ``stat`` per file; the bytes are not read). Datasets that know their own
    content (``content_identity()``, e.g. latent shards): theirs. Others: None.
    """
    import hashlib
    import os

    if hasattr(dataset, "content_identity"):
        return dataset.content_identity()
    h = hashlib.sha256()
    if hasattr(dataset, "tensors"):
        tensors = dataset.tensors()
        items = dict(tensors) if isinstance(tensors, Mapping) else {"image": tensors[0], "label": tensors[1]}
        for name in sorted(items):
            _tensor_digest(h, name, torch.as_tensor(items[name]))
        return {"kind": "tensors", "count": len(dataset), "sha256": h.hexdigest()}
    files, targets, root = getattr(dataset, "files", None), getattr(dataset, "targets", None), getattr(dataset, "root", None)
    if files is None or targets is None or root is None:
        return None
    for f, y in zip(files, targets, strict=True):
        rel = os.path.relpath(os.fspath(f), os.fspath(root))
        h.update(f"{rel}|{os.stat(f).st_size}|{int(y)}\n".encode("utf-8", "surrogateescape"))
    return {"kind": "files", "count": len(files), "sha256": h.hexdigest()}




def check_training_data(dataset: Any, reads: Sequence[str], flip_keys: Sequence[str], hflip: bool, who: str) -> None:
    """Before the first step: every known label in range, the keys the method reads present, no key out of register
    under flips (:func:`check_batch_keys`). Raises ValueError naming the problem and the fix."""
    num_classes = getattr(dataset, "num_classes", None)
    labels = all_labels(dataset) if num_classes is not None else None
    problem = None if labels is None else label_range_error(labels, int(num_classes), "the training data")
    if problem:
        raise ValueError(problem)
    check_batch_keys(dataset_keys(dataset), reads, flip_keys, hflip, who)
