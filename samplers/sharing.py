"""DDT encoder sharing: reuse a cached condition-encoder output across sampling steps (Wang et al. 2025, "DDT:
Decoupled Diffusion Transformer", Sec. 4.4; MCG-NJU/DDT src/diffusion/stateful_flow_matching/sharing_sampling.py).

A two-stage network (DDT: condition encoder + velocity decoder) returns its encoder output (``result.encoder_out``)
and accepts it back (``net(x, t, y, encoder_out=z)`` skips the encoder). :class:`EncoderSharing` wraps such a
network so that the encoder runs only at the planned steps of a time grid and every other call reuses the last
output. The wrapper sits below the velocity conversion and the guidance, so *every* sampler (Euler, Heun,
DPM-Solver++, Euler-Maruyama) and the CFG wrapper serve shared sampling unchanged: nothing here integrates or
guides. A call is matched to its step by its time (all rows of a sampler call share one time); calls at times
off the grid (a churned Heun time) reuse the cache.

With classifier-free guidance the cached output belongs to the doubled batch (conditional and unconditional
rows), so guidance must evaluate both branches at every step (``samplers.guidance.cfg(..., always_both=True)``,
what the reference sampler does): otherwise a step outside the guidance interval would hold half a batch and the
next guided step would need an encoder pass the schedule did not plan.

Which steps recompute comes from a schedule: every step (no sharing), upstream's even spacing
(``i % rate == 0``, :func:`uniform_steps`), or DDT's statistical dynamic programme (:func:`dp_schedule`) on the
cosine similarity of encoder outputs recorded on template samples under the production sampler and guidance
(both branches). Step 0 always recomputes. Schedules are saved as JSON next to the checkpoint that produced them.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from gen.utils.ckpt import atomic_write

__all__ = [
    "EncoderSharing",
    "encoder_similarity",
    "reuse_error_matrix",
    "schedule_error",
    "dp_schedule",
    "uniform_steps",
    "uniform_schedule_error",
    "brute_force_schedule",
    "save_schedule",
    "load_schedule",
]


class EncoderSharing:
    """A network call whose encoder runs only at the steps in ``recompute`` of the grid ``ts``.

    Args:
        net: ``net(x, t, y, *, encoder_out=None, **kw)`` returning an object with ``.encoder_out``.
        ts: the sampler's time grid (descending; the step of a call is the index of its time).
        recompute: step indices where the encoder runs (step 0 always does): the first call at a planned step's
            time recomputes, every other call reuses the last output (with Heun, the corrector's call at t_{i+1}
            is that first call). None = every call recomputes (no sharing; the samples equal the plain sampler's
            bit for bit).
        record: keep every computed encoder output in ``history`` (for the DP schedule's template statistics).

    Attributes:
        encoder_passes: how many times the encoder ran.
        recomputed_steps: the step index of each encoder pass (-1 for a call off the grid without a cache).
        history: ``(step, encoder_out)`` of every pass when ``record``.
    """

    def __init__(
        self, net: Callable[..., Any], ts: Tensor, recompute: Sequence[int] | None = None, record: bool = False
    ) -> None:
        grid = [float(t) for t in ts]
        n = len(grid) - 1
        todo = set(range(n)) if recompute is None else {int(i) for i in recompute} | {0}
        bad = sorted(i for i in todo if not 0 <= i < n)
        if bad:
            raise ValueError(f"recompute steps {bad} outside [0, {n})")
        self.net = net
        self.every_call = recompute is None
        self.todo = todo
        # A sampler calls the network at float32 (or float64) times; match either rounding of the grid.
        self.step_of = {}
        for i, t in enumerate(grid[:-1]):
            self.step_of[t] = i
            self.step_of[float(torch.tensor(t, dtype=torch.float32))] = i
        self.record = record
        self.history: list[tuple[int, Tensor]] = []
        self.encoder_passes = 0
        self.recomputed_steps: list[int] = []
        self._cache: Tensor | None = None
        self._cache_step: int | None = None

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None, **kwargs: Any) -> Any:
        step = self.step_of.get(float(t.reshape(-1)[0]))
        fresh = self.every_call or self._cache is None or (
            step is not None and step in self.todo and step != self._cache_step
        )
        if fresh:
            result = self.net(x, t, y, **kwargs)
            self._cache, self._cache_step = result.encoder_out, step
            self.encoder_passes += 1
            self.recomputed_steps.append(-1 if step is None else step)
            if self.record:
                self.history.append((-1 if step is None else step, result.encoder_out.detach()))
            return result
        if self._cache.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"the cached encoder output holds {self._cache.shape[0]} rows but the call has {x.shape[0]}: with "
                "guidance, use samplers.guidance.cfg(..., always_both=True) so every step runs both branches"
            )
        return self.net(x, t, y, encoder_out=self._cache, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Statistical dynamic-programming schedule


def encoder_similarity(encoder_outputs: Sequence[Tensor]) -> Tensor:
    """``sim[i, j]`` = mean over samples and tokens of ``cos(z_i, z_j)`` along the feature dim. Shape ``(S, S)``, float64.

    Args:
        encoder_outputs: one tensor per step, each ``(B, N, D)`` (any leading shape; the last dim is the feature).
            Under guidance these are the doubled batch's outputs, conditional and unconditional rows alike, as the
            reference computes them.
    """
    if len(encoder_outputs) == 0:
        raise ValueError("need at least one encoder output")
    shape = encoder_outputs[0].shape
    if any(z.shape != shape for z in encoder_outputs):
        raise ValueError("all encoder outputs must have the same shape")
    zs = [torch.nn.functional.normalize(z.reshape(-1, shape[-1]).float(), dim=-1) for z in encoder_outputs]
    s = len(zs)
    sim = torch.empty(s, s, dtype=torch.float64)
    for i in range(s):
        for j in range(i, s):
            sim[i, j] = sim[j, i] = (zs[i] * zs[j]).sum(-1).double().mean()
    return sim


def reuse_error_matrix(sim: Tensor) -> Tensor:
    """``E[i, j] = sum_{k=j..i} (1 - sim[k, j])`` for ``i >= j`` (+inf above the diagonal): the cost of computing
    the encoder at step j and reusing it up to step i. Shape ``(N, N)``, float64."""
    sim = _check_sim(sim)
    n = sim.shape[0]
    cost = torch.tril(1.0 - sim)  # keep k >= j
    e = torch.cumsum(cost, dim=0)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return e.masked_fill(upper, float("inf"))


def _check_sim(sim: Tensor) -> Tensor:
    sim = torch.as_tensor(sim, dtype=torch.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] < 1:
        raise ValueError(f"sim must be a square (N, N) matrix, got shape {tuple(sim.shape)}")
    return sim


def _check_k(k: int, n: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"the number of recomputations K must be in [1, {n}], got {k}")


def schedule_error(sim: Tensor, steps: Sequence[int]) -> float:
    """Total reuse error of a recompute schedule: ``sum_m E[s_{m+1} - 1, s_m]`` with ``s_K = N``."""
    e = reuse_error_matrix(sim)
    n = e.shape[0]
    s = sorted({int(i) for i in steps})
    if not s or s[0] != 0 or s[-1] >= n:
        raise ValueError(f"a schedule must start at step 0 and stay below {n}, got {list(steps)}")
    bounds = s + [n]
    return float(sum(e[bounds[m + 1] - 1, bounds[m]] for m in range(len(s))))


def dp_schedule(sim: Tensor, k: int) -> tuple[list[int], float]:
    """Choose the ``k`` recompute steps minimising the total reuse error (DDT's statistical DP).

    ``C[1, i] = E[i-1, 0]``; ``C[k, i] = min_j C[k-1, j] + E[i-1, j]`` (the k-th recompute at step j covers steps
    j..i-1); the answer is ``C[K, N]``, and the steps come from backtracking the argmins. Step 0 is always in.

    Args:
        sim: ``(N, N)`` similarity of encoder outputs (``encoder_similarity``).
        k: number of encoder evaluations, ``1 <= k <= N``.

    Returns:
        ``(steps, estimated_error)``: sorted step indices (``len == k``) and ``C[K, N]``.
    """
    e = reuse_error_matrix(sim)
    n = e.shape[0]
    _check_k(k, n)
    # shifted[i, j] = E[i-1, j] for j <= i-1, +inf otherwise; row 0 (no steps covered) is infeasible.
    shifted = torch.full((n + 1, n), float("inf"), dtype=torch.float64)
    shifted[1:] = e
    cost = shifted[:, 0].clone()  # C[1, i]
    parents: list[Tensor] = []
    for _ in range(2, k + 1):
        cand = cost[:n].unsqueeze(0) + shifted  # (n + 1, n): C[k-1, j] + E[i-1, j]
        cost, arg = cand.min(dim=1)
        parents.append(arg)
    steps, i = [], n
    for arg in reversed(parents):
        j = int(arg[i])
        steps.append(j)
        i = j
    steps.append(0)
    return sorted(steps), float(cost[n])


def uniform_steps(n: int, rate: int) -> list[int]:
    """Upstream's even spacing: recompute at steps ``i`` with ``i % rate == 0`` (``state_refresh_rate``), i.e.
    ``ceil(n / rate)`` encoder passes (MCG-NJU/DDT src/diffusion/stateful_flow_matching/sampling.py)."""
    if not 1 <= rate <= n:
        raise ValueError(f"the refresh rate must be in [1, {n}], got {rate}")
    return list(range(0, n, rate))


def uniform_schedule_error(sim: Tensor, rate: int) -> float:
    """Reuse error of upstream's even spacing with refresh ``rate`` (``ceil(N / rate)`` recomputations)."""
    sim = _check_sim(sim)
    return schedule_error(sim, uniform_steps(sim.shape[0], rate))


def brute_force_schedule(sim: Tensor, k: int) -> tuple[list[int], float]:
    """Exhaustive search over all schedules with ``k`` recomputations (step 0 included); for checks on small N."""
    sim = _check_sim(sim)
    n = sim.shape[0]
    _check_k(k, n)
    best: tuple[list[int], float] = ([], float("inf"))
    for rest in itertools.combinations(range(1, n), k - 1):
        steps = [0, *rest]
        err = schedule_error(sim, steps)
        if err < best[1]:
            best = (steps, err)
    return best


def save_schedule(
    file: str | os.PathLike,
    steps: Sequence[int],
    *,
    num_steps: int,
    estimated_error: float | None = None,
    meta: Mapping[str, Any] | None = None,
) -> None:
    """Write a schedule as JSON (atomically): ``{"num_steps", "recompute", "estimated_error", "meta"}``.

    ``meta`` should describe the sampler the schedule was computed for (grid, guidance, checkpoint), since a
    schedule is only valid for that grid.
    """
    s = sorted({int(i) for i in steps})
    if not s or s[0] != 0 or s[-1] >= num_steps:
        raise ValueError(f"a schedule must start at step 0 and stay below num_steps={num_steps}")
    data = {"num_steps": int(num_steps), "recompute": s, "estimated_error": estimated_error,
            "meta": dict(meta or {})}
    text = json.dumps(data, indent=2, sort_keys=True)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(file, write)


def load_schedule(file: str | os.PathLike, num_steps: int | None = None) -> dict[str, Any]:
    """Read a schedule written by ``save_schedule``; with ``num_steps`` given, check it matches the grid."""
    with open(file) as f:
        data = json.load(f)
    for key in ("num_steps", "recompute"):
        if key not in data:
            raise ValueError(f"{file}: not a sharing schedule (missing {key!r})")
    steps = [int(i) for i in data["recompute"]]
    if not steps or steps[0] != 0 or steps != sorted(set(steps)) or steps[-1] >= data["num_steps"]:
        raise ValueError(f"{file}: invalid recompute steps {steps}")
    if num_steps is not None and int(data["num_steps"]) != num_steps:
        raise ValueError(f"{file}: schedule is for {data['num_steps']} steps, the sampler has {num_steps}")
    data["recompute"] = steps
    return data
