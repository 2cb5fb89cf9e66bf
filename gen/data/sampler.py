"""Endless, resumable, per-rank index stream for training.

The global stream is the concatenation of per-epoch permutations of ``range(size)``, epoch e
being seeded by (seed, e) alone. Rank r of ``world`` reads global positions ``start + r``,
``start + r + world``, ... . Because every position maps to a fixed index, a run resumed with
``start = images consumed so far`` continues exactly where an uninterrupted run would be, at any
world size that divides the per-step global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from gen.utils.seed import derive_seed


class InfiniteSampler(Sampler[int]):
    """Per-rank view of an endless stream of per-epoch permutations.

    Args:
        size: number of items in the dataset (> 0).
        rank: this process's rank, 0 <= rank < world.
        world: number of processes sharing the stream.
        seed: base seed; epoch e uses the permutation seeded by (seed, e).
        shuffle: when False every epoch is ``0, 1, ..., size - 1`` (useful for evaluation passes).
        start: global position to start from, i.e. images already consumed by all ranks together.
    """

    def __init__(
        self, size: int, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True, start: int = 0
    ) -> None:
        if size <= 0:
            raise ValueError(f"InfiniteSampler needs a non-empty dataset, got size={size}")
        if world <= 0 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size = int(size)
        self.rank = int(rank)
        self.world = int(world)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.start = int(start)
        self._cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The dataset order of one epoch, shape (size,), int64."""
        perm = self._cache.get(epoch)
        if perm is None:
            if self.shuffle:
                rng = np.random.Generator(np.random.PCG64(derive_seed("sampler", self.seed, epoch)))
                perm = rng.permutation(self.size)
            else:
                perm = np.arange(self.size)
            # Keep only the current and the next epoch: iteration never goes back.
            self._cache = {e: p for e, p in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = perm
        return perm

    def index_at(self, position: int) -> int:
        """Dataset index at one global stream position (the same on every rank)."""
        epoch, offset = divmod(int(position), self.size)
        return int(self.permutation(epoch)[offset])

    def __iter__(self) -> Iterator[int]:
        pos = self.start + self.rank
        while True:
            epoch, offset = divmod(pos, self.size)
            chunk = self.permutation(epoch)[offset :: self.world]
            yield from (int(i) for i in chunk)
            pos += len(chunk) * self.world

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Endless batches of this rank's indices for in-memory datasets.

        Args:
            batch_size: per-rank batch size.

        Yields:
            int64 tensors of shape (batch_size,) to index ``dataset.tensors()`` with.
        """
        it = iter(self)
        while True:
            yield torch.tensor([next(it) for _ in range(batch_size)], dtype=torch.long)
