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

from collections.abc import Iterator, Mapping
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


@torch.no_grad()
def make_batch(raw: Mapping[str, Tensor], tokenizer: Any, rng: SampleRandom, hflip: bool, device: torch.device) -> dict[str, Tensor]:
    """Device batch with the model input ``"x0"``.

    With ``hflip`` each sample is mirrored with probability 1/2, decided by one uniform from its own stream (the
    stored flipped latent is taken instead of the plain one when the data holds latents); the pixels, when
    present, are flipped alike so that pixel-reading objectives (representation alignment) see the same image.
    """
    batch = {k: v.to(device, non_blocking=True) for k, v in raw.items()}
    flip = (rng.rand().to(device) < 0.5) if hflip else None  # (B,)

    def mirror(x: Tensor, flipped: Tensor | None = None) -> Tensor:
        if flip is None:
            return x
        other = x.flip(-1) if flipped is None else flipped
        return torch.where(flip.view(-1, *([1] * (x.ndim - 1))), other, x)

    if "image" in batch:
        batch["image"] = mirror(batch["image"])
    if "latent" in batch:
        latent = mirror(batch["latent"], batch.get("latent_flip")) if "latent_flip" in batch else mirror(batch["latent"])
        batch["x0"] = tokenizer.normalize(latent.float())
    else:  # a stochastic encoder (VAE posterior) draws from each sample's own stream, after the flip
        batch["x0"] = tokenizer.encode(batch["image"], generator=rng.generators)
    return batch
