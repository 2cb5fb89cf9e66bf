"""Denoising-task-difficulty curriculum over training times (Kim, Go, Kwon, Kim, ICLR 2025, "Denoising Task
Difficulty-based Curriculum for Training Diffusion Models", arXiv 2403.10348).

The training times are split into ``N`` clusters of *equal probability* under the objective's time sampler (its
quantiles at k/N), C_1 the lowest times (least noise: hardest) to C_N the highest (most noise: easiest). Stage n
(1..N) draws from ``C_{N-n+1} ∪ ... ∪ C_N`` with the base distribution restricted there: the quantile
``q = 1 - (n/N) u``, ``u ~ U[0, 1)`` per sample, mapped through the sampler's inverse CDF. Pacing: the step's mean
loss is smoothed (``s <- beta s + (1 - beta) loss``); when the smoothed loss has not set a new best for ``patience``
consecutive steps (tau = 200), the next stage starts and the best and the smoother restart. After stage N the base
sampler is used as it is (ordinary training). The stage, best, smoother and wait counter are training state
(``state_dict`` / ``load_state_dict``), so a resumed run continues exactly.

Our times put noise at high t for every sampler (t = 1 on [0, 1] paths, large sigma on the EDM path), so "easy"
is always the upper quantiles.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from gen.paths import LogitNormalTime, LogNormalSigma, TimeSampler, UniformTime, shift_time
from gen.utils.seed import Randomness


def time_quantile(sampler: TimeSampler, q: Tensor) -> Tensor:
    """The inverse CDF of a time sampler at probabilities ``q`` (float64 in and out, any shape).

    Supported: ``UniformTime``, ``LogitNormalTime``, ``LogNormalSigma`` (with their ``shift``, which is monotone).

    Raises:
        ValueError: for samplers without a closed-form quantile (e.g. ``UShapedTime``).
    """
    q = q.double()
    if isinstance(sampler, UniformTime):
        t = sampler.t_min + (sampler.t_max - sampler.t_min) * q
    elif isinstance(sampler, LogitNormalTime):
        t = torch.sigmoid(sampler.mean + sampler.std * torch.special.ndtri(q))
    elif isinstance(sampler, LogNormalSigma):
        return torch.exp(sampler.p_mean + sampler.p_std * torch.special.ndtri(q))
    else:
        raise ValueError(
            f"curriculum=difficulty needs a time sampler with a closed-form quantile (UniformTime, LogitNormalTime, "
            f"LogNormalSigma); the objective's is {type(sampler).__name__}"
        )
    return shift_time(t, sampler.shift)


class DifficultyCurriculum(TimeSampler):
    """Wraps the objective's time sampler with the easy-to-hard stages (module docstring).

    Args:
        base: the objective's time sampler.
        clusters: N, the number of equal-probability clusters (20).
        patience: tau, steps without a new best smoothed loss before the next stage (200).
        smoothing: beta of the loss smoother (0.99); 0 uses the raw step loss.
    """

    def __init__(self, base: TimeSampler, clusters: int = 20, patience: int = 200, smoothing: float = 0.99) -> None:
        super().__init__(1.0)
        if not isinstance(clusters, int) or isinstance(clusters, bool) or clusters < 1:
            raise ValueError(f"curriculum.clusters must be a positive integer, got {clusters!r}")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ValueError(f"curriculum.patience must be a positive integer, got {patience!r}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"curriculum.smoothing must be in [0, 1), got {smoothing!r}")
        self.base = base
        self.clusters, self.patience, self.smoothing = clusters, patience, float(smoothing)
        edges = self.boundaries()
        # Times are float32 in training: equal float32 edges mean a cluster that no draw can reach.
        empty = [k + 1 for k in range(clusters) if not float(edges[k + 1].float()) > float(edges[k].float())]
        if empty:
            raise ValueError(
                f"curriculum.clusters={clusters} leaves cluster(s) {empty[:5]} empty under the time sampler "
                f"{base!r} (their time interval has zero width in float32); use fewer clusters or another sampler"
            )
        self.stage = 1
        self.best: float | None = None
        self.smoothed: float | None = None
        self.wait = 0

    @property
    def config(self) -> dict[str, Any]:
        return dict(getattr(self.base, "config", {}))

    def boundaries(self) -> Tensor:
        """The N + 1 cluster edges in time, ascending (quantiles k/N of the base sampler), float64."""
        return time_quantile(self.base, torch.arange(self.clusters + 1, dtype=torch.float64) / self.clusters)

    @property
    def done(self) -> bool:
        return self.stage > self.clusters

    def _draw(self, rng: Randomness) -> Tensor:
        raise NotImplementedError  # __call__ is overridden

    def __call__(self, rng: Randomness) -> Tensor:
        if self.done:
            return self.base(rng)
        u = rng.rand(dtype=torch.float64)
        q = 1.0 - (self.stage / self.clusters) * u  # in (1 - n/N, 1]: the n easiest clusters
        return time_quantile(self.base, q.clamp(max=math.nextafter(1.0, 0.0))).float()

    def observe(self, loss: float) -> bool:
        """Feed one step's mean loss; returns True when this step starts the next stage."""
        if self.done or not math.isfinite(loss):
            return False
        b = self.smoothing
        self.smoothed = loss if self.smoothed is None else b * self.smoothed + (1.0 - b) * loss
        if self.best is None or self.smoothed < self.best:
            self.best, self.wait = self.smoothed, 0
            return False
        self.wait += 1
        if self.wait < self.patience:
            return False
        self.stage += 1
        self.best, self.smoothed, self.wait = None, None, 0
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "best": self.best, "smoothed": self.smoothed, "wait": self.wait}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stage, self.wait = int(state["stage"]), int(state["wait"])
        self.best = None if state["best"] is None else float(state["best"])
        self.smoothed = None if state["smoothed"] is None else float(state["smoothed"])
