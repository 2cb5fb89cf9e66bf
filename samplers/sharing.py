"""DDT encoder sharing: reuse a cached condition-encoder output across sampling steps (backbones.md Sec. 4.4).

A two-stage network (DDT: condition encoder + velocity decoder) is driven through a *shared model function*

    shared_fn(x (B, C, H, W), t (B,), y, *, state=None) -> (velocity, new_state)

``state=None`` runs the encoder; otherwise ``state`` (the encoder output of an earlier step) is fed to the decoder
and the encoder is skipped. ``shared_model_fn(net)`` builds one from any network with
``forward(x, t, y, *, encoder_out=None, return_encoder_out=False)`` returning the velocity in *our* path time (for
DDT checkpoints, the time/velocity adapter of ``gen/models/adapters.py`` must pass ``encoder_out`` and
``return_encoder_out`` through). ``cfg_shared`` adds classifier-free guidance with a guidance interval.

Which steps recompute the encoder comes from a schedule: every step (no sharing), a uniform one, or DDT's
statistical dynamic programme (``dp_schedule``) on the cosine similarity of encoder outputs recorded on template
samples. Step 0 always recomputes. Schedules are saved as JSON next to the checkpoint that produced them.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from gen.paths import Path
from gen.utils.ckpt import atomic_write
from samplers._common import Callback, RandnLike, check_inputs, denoised, prior, tvec
from samplers.guidance import _combine, in_interval

__all__ = [
    "SharedModelFn",
    "shared_model_fn",
    "cfg_shared",
    "sample_euler_shared",
    "collect_encoder_outputs",
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


class SharedModelFn(Protocol):
    """``(x, t, y, *, state=None) -> (velocity, state)``; ``state=None`` recomputes the encoder."""

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None, *, state: Any = None) -> tuple[Tensor, Any]: ...


def shared_model_fn(
    net: Callable[..., tuple[Tensor, Tensor]],
    *,
    path: Path | None = None,
    prediction: Literal["velocity", "x0", "eps"] = "velocity",
) -> SharedModelFn:
    """Adapt a two-stage network to the ``SharedModelFn`` protocol.

    Args:
        net: ``net(x, t, y, *, encoder_out=None, return_encoder_out=True) -> (output, encoder_out)``.
        path: needed only when ``prediction`` is not the velocity (converted with ``path.to_velocity``).
        prediction: what the network outputs.
    """
    if prediction != "velocity" and path is None:
        raise ValueError("a path is needed to convert a non-velocity prediction")

    def fn(x: Tensor, t: Tensor, y: Tensor | None, *, state: Any = None) -> tuple[Tensor, Any]:
        out, enc = net(x, t, y, encoder_out=state, return_encoder_out=True)
        if prediction != "velocity":
            out = path.to_velocity(prediction, x, out, t)  # type: ignore[union-attr]
        return out, enc

    return fn


def cfg_shared(
    shared_fn: SharedModelFn,
    scale: float,
    null_label: int,
    *,
    interval: tuple[float, float] | None = None,
    dit_legacy_channels: int | None = None,
) -> SharedModelFn:
    """Classifier-free guidance for a shared model function (same maths as ``samplers.guidance.cfg``).

    The state is ``{"cond": enc_c, "uncond": enc_u | None}``. Inside the interval both branches run in one batched
    call; outside only the conditional one, and a recompute there drops the unconditional cache. A reuse step whose
    unconditional cache is missing (first guided step after an unguided recompute) recomputes both branches, so
    both halves always come from the same step.
    """
    scale = float(scale)

    def fn(x: Tensor, t: Tensor, y: Tensor | None, *, state: Any = None) -> tuple[Tensor, Any]:
        if y is None:
            raise ValueError("classifier-free guidance needs labels y")
        mask = in_interval(t, interval)
        if not bool(mask.any()):
            v, enc = shared_fn(x, t, y, state=None if state is None else state["cond"])
            return v, state if state is not None else {"cond": enc, "uncond": None}
        reuse = state is not None and state["uncond"] is not None
        enc_in = torch.cat([state["cond"], state["uncond"]]) if reuse else None
        y_null = torch.full_like(y, null_label)
        out, enc = shared_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]), state=enc_in)
        v_c, v_u = out.chunk(2)
        v = _combine(v_c, v_u, scale, dit_legacy_channels)
        if not bool(mask.all()):
            v = torch.where(mask.reshape(-1, *([1] * (x.ndim - 1))), v, v_c)
        if reuse:
            return v, state
        enc_c, enc_u = enc.chunk(2)
        return v, {"cond": enc_c, "uncond": enc_u}

    return fn


def _state_tensor(state: Any) -> Tensor:
    """The conditional encoder output inside a state (a tensor, or ``cfg_shared``'s dict)."""
    return state["cond"] if isinstance(state, Mapping) else state


# ----------------------------------------------------------------------------------------------------------
# Sampler


@torch.no_grad()
def sample_euler_shared(
    model_fn: SharedModelFn,
    noise: Tensor,
    ts: Tensor,
    *,
    path: Path,
    y: Tensor | None = None,
    recompute: Sequence[int] | None = None,
    callback: Callback | None = None,
    randn_like: RandnLike = torch.randn_like,
) -> Tensor:
    """Euler ODE sampler that recomputes the encoder only at the steps in ``recompute``.

    Args:
        model_fn: a ``SharedModelFn``.
        noise: unit Gaussian noise; the state starts at ``sigma(ts[0]) * noise``.
        ts: descending grid ending at 0 (``len(ts) - 1`` steps).
        path: the path the model was trained on.
        y: labels ``(B,)`` or None.
        recompute: step indices where the encoder runs (step 0 always does); None = every step (no sharing, the
            result equals ``sample_euler`` on the same network).
        callback: per step ``{"x", "i", "t", "t_next", "denoised", "state", "recomputed"}``.
        randn_like: unused (deterministic sampler).

    Returns:
        Samples at ``t = 0``.
    """
    check_inputs(noise, ts)
    grid = [float(t) for t in ts]
    n = len(grid) - 1
    todo = set(range(n)) if recompute is None else {int(i) for i in recompute} | {0}
    bad = [i for i in todo if not 0 <= i < n]
    if bad:
        raise ValueError(f"recompute steps {sorted(bad)} outside [0, {n})")
    x = prior(noise, grid[0], path)
    state: Any = None
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        fresh = i in todo
        v, state = model_fn(x, tvec(t, x), y, state=None if fresh else state)
        v = v.to(x.dtype)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "t_next": t_next, "denoised": denoised(path, x, v, t),
                      "state": state, "recomputed": fresh})
        x = x + (t_next - t) * v
    return x


@torch.no_grad()
def collect_encoder_outputs(
    model_fn: SharedModelFn, noise: Tensor, ts: Tensor, *, path: Path, y: Tensor | None = None
) -> list[Tensor]:
    """Run the unshared sampler on template samples and return the encoder output of every step (DDT Sec. 4.4)."""
    outs: list[Tensor] = []
    sample_euler_shared(model_fn, noise, ts, path=path, y=y,
                        callback=lambda d: outs.append(_state_tensor(d["state"]).detach()))
    return outs


# ----------------------------------------------------------------------------------------------------------
# Statistical dynamic-programming schedule


def encoder_similarity(encoder_outputs: Sequence[Tensor]) -> Tensor:
    """``sim[i, j]`` = mean over samples and tokens of ``cos(z_i, z_j)`` along the feature dim. Shape ``(S, S)``, float64.

    Args:
        encoder_outputs: one tensor per step, each ``(B, N, D)`` (any leading shape; the last dim is the feature).
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


def uniform_steps(n: int, k: int) -> list[int]:
    """``k`` evenly spaced recompute steps out of ``n``: ``floor(m n / k)``, m = 0..k-1 (DDT's refresh rate)."""
    _check_k(k, n)
    return [(m * n) // k for m in range(k)]


def uniform_schedule_error(sim: Tensor, k: int) -> float:
    """Reuse error of the uniform schedule with ``k`` recomputations."""
    sim = _check_sim(sim)
    return schedule_error(sim, uniform_steps(sim.shape[0], k))


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
