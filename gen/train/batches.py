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
