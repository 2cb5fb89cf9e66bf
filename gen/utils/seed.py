"""Deterministic seeding: per-step training seeds and per-image sampling generators."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a stable hash of its parts (same on every machine and Python run)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def per_image_generators(
    seeds: Sequence[int], *parts: int | str, device: torch.device | str = "cpu"
) -> list[torch.Generator]:
    """One generator per image, seeded from ``(*parts, seed_k)`` alone, for per-image randomness in a batch.

    Args:
        seeds: one integer per image, e.g. dataset indices.
        parts: what the randomness is for (e.g. ``"latent", run_seed, "flip"``), so streams never collide.
        device: generator device.
    """
    out = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(*parts, int(s)))
        out.append(g)
    return out


def step_generator(seed: int, rank: int, nimg: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Generator for one training step, reseeded from (seed, rank, nimg) so a resumed run repeats exactly."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed("step", seed, rank, nimg))
    return gen


class PerImageRandom:
    """Stacked per-image generators (one per seed) so image k is identical at any batch size or world size.

    Example:
        rnd = PerImageRandom([0, 1, 2, 3])
        noise = rnd.randn((4, 32, 32))   # -> (4, 4, 32, 32), row k drawn from seed k alone
        labels = rnd.randint(10)         # -> (4,), label k drawn from seed k alone
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = []
        for s in seeds:
            g = torch.Generator(device=self.device)
            g.manual_seed(derive_seed("image", int(s)))
            self.generators.append(g)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Gaussian noise, shape (len(seeds), *shape)."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped like a batch x whose leading dimension equals the number of seeds."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} rows but {len(self.generators)} per-image generators")
        return self.randn(x.shape[1:], dtype=x.dtype).to(x.device)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per image, shape (len(seeds),)."""
        return torch.cat([torch.randint(high, (1,), generator=g, device=self.device) for g in self.generators])


def shard_seeds(seeds: Sequence[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Split seeds into batches and deal them round-robin to ranks (EDM2's scheme).

    Every rank gets the same number of batches (possibly some empty) so collective calls stay matched.
    Returns this rank's list of seed batches.
    """
    seeds = list(seeds)
    num_batches = max((len(seeds) - 1) // (batch_size * world) + 1, 1) * world
    # Contiguous, near-equal chunks (numpy.array_split semantics).
    q, r = divmod(len(seeds), num_batches)
    bounds = [i * q + min(i, r) for i in range(num_batches + 1)]
    batches = [seeds[bounds[i] : bounds[i + 1]] for i in range(num_batches)]
    return batches[rank::world]
