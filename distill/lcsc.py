"""LCSC: an evolutionary search for the coefficients of a linear combination of saved checkpoints.

"Linear Combination of Saved Checkpoints Makes Consistency and Diffusion Models Better" (Liu et al., ICLR 2025;
imagination-research/LCSC, which releases the searched weights but not the search) combines the last n checkpoints
of a run, ``theta(alpha) = sum_i alpha_i theta_i``, with ``alpha`` found by a gradient-free search on a sample-quality
metric (FID on a small fixed seed set). The paper leaves the search's settings open; the ones here are ours:

* a population of ``population`` vectors, seeded with the last checkpoint, the uniform average and EMA-like vectors
  (``ema_coefficients``), filled with random perturbations of those;
* each generation keeps the ``elite`` best (elitism), draws parents from the best ``parents`` fraction, makes
  children by uniform crossover of two parents and Gaussian mutation;
* every vector is constrained to ``sum(alpha) = 1`` and ``||alpha||_2 <= max_norm`` (``constrain``), so the search
  cannot blow up the weights (large coefficients extrapolate far outside the checkpoints' hull and overfit the
  small fitness set);
* a cache of evaluated vectors: a vector is never scored twice (elites, duplicates).

Determinism and resuming: generation g draws from ``numpy.random.default_rng([seed, g])`` only, and after every
generation the whole search (population, fitness, cache, history) is written atomically as JSON. A search killed at
any point and run again continues from the last written generation and ends with the same result as one that ran
through (the fitness must be deterministic, as FID on fixed seeds is).

The fitness is injected (``fitness(alpha) -> float``, lower is better): ``scripts.lcsc`` wires the yardstick FID of
the combined snapshot; tests use a closed-form one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gen.utils.ckpt import atomic_write

__all__ = ["SearchSettings", "SearchResult", "ema_coefficients", "constrain", "initial_population", "search"]

STATE_FORMAT = "gen-lcsc-search-v1"
Fitness = Callable[[np.ndarray], float]


@dataclass(frozen=True)
class SearchSettings:
    """Settings of the search (all recorded in its state file; a resume must use the same)."""

    population: int = 12
    generations: int = 8
    elite: int = 2
    parents: float = 0.3
    crossover: float = 0.5
    mutation_std: float = 0.1
    max_norm: float = 5.0
    ema_decays: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95)
    seed: int = 0

    def check(self, n: int, names: Mapping[str, str] | None = None) -> None:
        """Refuse settings that cannot run on ``n`` checkpoints (a ValueError naming the setting, by ``names`` where
        given: a command passes its flags, e.g. ``{"population": "--population"}``)."""

        def nm(key: str) -> str:
            return (names or {}).get(key, key)

        if n < 2:
            raise ValueError(f"LCSC needs at least 2 checkpoints to combine, got {n}")
        if self.population < 2 or not 1 <= self.elite < self.population:
            raise ValueError(f"{nm('population')} {self.population}, {nm('elite')} {self.elite}: need "
                             f"{nm('population')} >= 2 and 1 <= {nm('elite')} < {nm('population')}")
        if self.generations < 0 or not 0 < self.parents <= 1 or not 0 <= self.crossover <= 1:
            raise ValueError(f"{nm('generations')} must be >= 0, {nm('parents')} in (0, 1] and {nm('crossover')} in "
                             "[0, 1]")
        if not self.mutation_std >= 0 or not math.isfinite(self.mutation_std):
            raise ValueError(f"{nm('mutation_std')} {self.mutation_std} must be a finite number >= 0")
        if not self.max_norm >= 1.0 / math.sqrt(n) or not math.isfinite(self.max_norm):
            raise ValueError(f"{nm('max_norm')} {self.max_norm} must be finite and at least 1/sqrt(n) = "
                             f"{1 / math.sqrt(n):.3g} for n = {n} checkpoints (the norm of their uniform average)")
        if any(not 0 < d < 1 for d in self.ema_decays):
            raise ValueError(f"{nm('ema_decays')} {list(self.ema_decays)} must lie in (0, 1)")


@dataclass
class SearchResult:
    """The best vector found, its fitness and the search's cost and trace."""

    alpha: np.ndarray
    fitness: float
    evaluations: int
    history: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float | None = None  # wall time of the generations (None: resumed from a state that did not time them)

    def score_of(self, alpha: np.ndarray) -> float | None:
        """The fitness of a vector the search evaluated (e.g. the last checkpoint alone), else None."""
        return self.scores.get(_key(np.asarray(alpha, dtype=np.float64)))


def ema_coefficients(n: int, decay: float) -> np.ndarray:
    """The weights an EMA with per-checkpoint ``decay`` started at checkpoint 0 gives checkpoints 0..n-1 (sum 1).

    ``alpha_i = (1 - d) d^(n-1-i)`` for i >= 1 and ``alpha_0 = d^(n-1)`` (the average's initial value).
    """
    i = np.arange(n, dtype=np.float64)
    alpha = (1.0 - decay) * decay ** (n - 1 - i)
    alpha[0] = decay ** (n - 1)
    return alpha


def constrain(alpha: np.ndarray, max_norm: float) -> np.ndarray:
    """The vector with ``sum = 1`` and ``||.||_2 <= max_norm`` nearest in direction to ``alpha``.

    First shift every entry by the same amount (the sum becomes 1), then shrink the part orthogonal to the uniform
    vector ``u = 1/n``: since ``alpha - u`` sums to 0 it is orthogonal to u, so ``||u + s (alpha - u)||^2 =
    1/n + s^2 ||alpha - u||^2`` reaches ``max_norm`` exactly at one s (float64 throughout).
    """
    a = np.asarray(alpha, dtype=np.float64)
    n = a.size
    a = a + (1.0 - a.sum()) / n
    u = np.full(n, 1.0 / n)
    d = a - u
    dn2 = float(d @ d)
    room = max_norm**2 - 1.0 / n
    if dn2 > room:
        a = u + d * math.sqrt(max(room, 0.0) / dn2)
    return a


def initial_population(n: int, s: SearchSettings) -> list[np.ndarray]:
    """Last checkpoint, uniform average and EMA-like vectors first, then random perturbations of them."""
    seeds = [np.eye(n)[-1], np.full(n, 1.0 / n)] + [ema_coefficients(n, d) for d in s.ema_decays]
    seeds = [constrain(v, s.max_norm) for v in seeds]
    rng = np.random.default_rng([s.seed, 0])
    out = seeds[: s.population]
    while len(out) < s.population:
        base = seeds[int(rng.integers(len(seeds)))]
        out.append(constrain(base + rng.normal(0.0, s.mutation_std, n), s.max_norm))
    return out


def _key(alpha: np.ndarray) -> str:
    return json.dumps([float(v) for v in alpha])  # repr of a float64 round-trips exactly


def _children(pop: list[np.ndarray], fit: list[float], s: SearchSettings, generation: int) -> list[np.ndarray]:
    """Elites, then children of parents drawn from the best fraction: uniform crossover and Gaussian mutation."""
    order = np.argsort(np.asarray(fit), kind="stable")
    elites = [pop[i] for i in order[: s.elite]]
    n_parents = max(2, int(math.ceil(s.parents * len(pop))))
    parents = [pop[i] for i in order[:n_parents]]
    rng = np.random.default_rng([s.seed, generation])
    kids = []
    while len(elites) + len(kids) < s.population:
        i, j = rng.choice(len(parents), size=2, replace=False)
        mask = rng.random(parents[i].size) < s.crossover
        child = np.where(mask, parents[j], parents[i]) + rng.normal(0.0, s.mutation_std, parents[i].size)
        kids.append(constrain(child, s.max_norm))
    return elites + kids


class _Cache:
    """Fitness of every vector evaluated so far (NaN counts as the worst value)."""

    def __init__(self, fitness: Fitness, items: dict[str, float] | None = None) -> None:
        self.fitness, self.items = fitness, dict(items or {})

    def __call__(self, alpha: np.ndarray) -> float:
        key = _key(alpha)
        if key not in self.items:
            value = float(self.fitness(alpha))
            self.items[key] = value if math.isfinite(value) else math.inf
        return self.items[key]


def _save(path: Path, s: SearchSettings, n: int, context: dict[str, Any], g: int, pop: list[np.ndarray],
          fit: list[float], cache: _Cache, history: list[dict[str, Any]], seconds: float | None) -> None:
    state = {"format": STATE_FORMAT, "settings": dataclasses.asdict(s), "n": n, "context": context, "generation": g,
             "population": [p.tolist() for p in pop], "fitness": fit, "cache": cache.items, "history": history,
             "seconds": seconds}
    text = json.dumps(state, allow_nan=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _load(path: Path, s: SearchSettings, n: int, context: dict[str, Any]) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"LCSC state {path} cannot be read ({e}); delete it to start the search again") from e
    want = json.loads(json.dumps({"settings": dataclasses.asdict(s), "context": context}))
    if (state.get("format") != STATE_FORMAT or state.get("settings") != want["settings"] or state.get("n") != n
            or state.get("context") != want["context"]):
        raise ValueError(f"LCSC state {path} belongs to another search (other settings or checkpoints); give the same "
                         "settings, another --out, or delete it to start again")
    return state


def search(n: int, fitness: Fitness, settings: SearchSettings = SearchSettings(),
           state_path: str | os.PathLike | None = None, log: Callable[[dict[str, Any]], None] | None = None,
           context: dict[str, Any] | None = None, write: bool = True) -> SearchResult:
    """Minimise ``fitness(alpha)`` over coefficient vectors of n checkpoints (module docstring).

    Args:
        n: number of checkpoints (the length of alpha).
        fitness: lower is better; must be deterministic for exact resuming.
        settings: population, generations, operators, bounds and seed.
        state_path: JSON file written after every generation; an existing one is resumed from.
        log: called with each generation's record (generation, best, mean fitness, evaluations).
        context: what else defines the fitness (checkpoints, sampler, seed set), JSON; a resume must match it.
        write: whether this process writes the state (False on all processes but one when a fitness evaluation is
            spread over several; each runs the same search, which the reduced fitness keeps identical).

    Returns:
        The best vector of the last population (sum 1, norm <= max_norm), its fitness and the cost.
    """
    s = settings
    s.check(n)
    path = Path(state_path) if state_path is not None else None
    if path is not None and path.is_file():
        state = _load(path, s, n, context or {})
        start = int(state["generation"]) + 1
        pop = [np.asarray(p, dtype=np.float64) for p in state["population"]]
        fit, history = [float(f) for f in state["fitness"]], list(state["history"])
        cache = _Cache(fitness, {k: float(v) for k, v in state["cache"].items()})
        seconds = state.get("seconds")  # None where an earlier version wrote the state without timing it
    else:
        start, history, cache, seconds = 0, [], _Cache(fitness), 0.0
        pop, fit = [], []
    for g in range(start, s.generations + 1):
        # Timed per finished generation (the state's): a killed generation's evaluations are lost, and so is its time,
        # so the cost is that of the search run straight.
        t0 = time.perf_counter()
        pop = initial_population(n, s) if g == 0 else _children(pop, fit, s, g)
        fit = [cache(a) for a in pop]
        seconds = None if seconds is None else seconds + time.perf_counter() - t0
        record = {"generation": g, "best": min(fit), "mean": float(np.mean([f for f in fit if math.isfinite(f)] or
                                                                         [math.inf])), "evaluations": len(cache.items)}
        history.append(record)
        if path is not None and write:
            _save(path, s, n, context or {}, g, pop, fit, cache, history, seconds)
        if log is not None:
            log(record)
    best = int(np.argmin(np.asarray(fit)))
    return SearchResult(pop[best], fit[best], len(cache.items), history, dict(cache.items), seconds)
