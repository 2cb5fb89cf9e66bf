"""Deterministic seeding: stable derived seeds and per-sample random streams for training and sampling."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

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


class SampleRandom:
    """Per-sample random streams: row i of every draw comes from its own generator, seeded by ``(*key, keys[i])``.

    Training keys each sample by its position in the global data stream, so a sample's noise, time, label
    drop and flip are the same whatever the number of processes, the micro-batch size or the resume point
    (EDM2 reseeds per step and rank; per-sample streams also make 1 process equal N processes). Sampling keys
    each image by its seed (``PerImageRandom``), so image k is the same at any batch size or world size.
    Within a sample, draws come from one stream in call order: the order of a method's draws is part of it.

    Args:
        keys: one integer per sample (B of them).
        namespace: prefix of every derived seed (streams of different purposes never coincide).
        device: where the generators live and the draws are made.

    Example:
        rng = SampleRandom([10, 11, 12], namespace="train/0")
        t = rng.rand()              # (3,): one uniform per sample
        eps = rng.randn(4, 32, 32)  # (3, 4, 32, 32): row i from sample i's stream alone
    """

    def __init__(self, keys: Sequence[int], namespace: str = "image", device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generators = []
        for k in keys:
            g = torch.Generator(device=self.device)
            g.manual_seed(derive_seed(namespace, int(k)))
            self.generators.append(g)

    def __len__(self) -> int:
        return len(self.generators)

    def _stack(self, fn: Any, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.stack([fn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators])

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal draws, shape (B, *shape)."""
        return self._stack(torch.randn, shape, dtype)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Uniform [0, 1) draws, shape (B, *shape)."""
        return self._stack(torch.rand, shape, dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped like a batch x whose leading dimension equals the number of samples, on x's device."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} rows but {len(self.generators)} per-sample generators")
        return self.randn(*x.shape[1:], dtype=x.dtype).to(x.device)

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per sample, shape (B,)."""
        return torch.cat([torch.randint(high, (1,), generator=g, device=self.device) for g in self.generators])


class PerImageRandom(SampleRandom):
    """Per-image generators for sampling: image k's label and noise come from seed k alone (CPU generators,
    so a seed gives the same image on any device)."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        super().__init__(seeds, namespace="image", device=device)

    def randn(self, shape: Sequence[int] | int = (), *more: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # type: ignore[override]
        """Gaussian noise, shape (len(seeds), *shape); accepts a shape tuple or its sizes."""
        shape = (shape, *more) if isinstance(shape, int) else (*shape, *more)
        return super().randn(*shape, dtype=dtype)


class BatchRandom:
    """The ``SampleRandom`` interface over one generator (batched draws): for tests and standalone use.

    Args:
        n: batch size B.
        generator: the source (None: torch's global generator).
        device: where draws are made (default: the generator's device, else CPU).
    """

    def __init__(self, n: int, generator: torch.Generator | None = None, device: torch.device | str | None = None) -> None:
        self.n = int(n)
        self.generator = generator
        self.device = torch.device(device if device is not None else (generator.device if generator is not None else "cpu"))

    def __len__(self) -> int:
        return self.n

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn((self.n, *shape), generator=self.generator, device=self.device, dtype=dtype)

    def rand(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.rand((self.n, *shape), generator=self.generator, device=self.device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(*x.shape[1:], dtype=x.dtype).to(x.device)

    def randint(self, high: int) -> torch.Tensor:
        return torch.randint(high, (self.n,), generator=self.generator, device=self.device)


Randomness = SampleRandom | BatchRandom


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
