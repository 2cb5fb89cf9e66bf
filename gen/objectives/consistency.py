"""Improved consistency training, iCT (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models").

One step (Sec. 3-5 of the paper; openai/consistency_models ``cm/karras_diffusion.py`` for the parameterisation):

1. ``N = N(k)``: the exponential discretisation curriculum ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` with
   ``K' = floor(K / (log2 floor(s1 / s0) + 1))`` (paper Eq. 12; s0 = 10, s1 = 1280). Here k and K count training
   *images* (``Progress.nimg`` / ``total_nimg``), the toolkit's unit of progress; with a constant batch this is the
   paper's iteration count times the batch size.
2. Karras levels ``sigma_1 < ... < sigma_N`` (rho = 7, sigma_min 0.002, sigma_max 80; EDM Eq. 5).
3. Index n in {1..N-1} drawn from the discretised lognormal ``p(n) ∝ erf((ln s_{n+1} - P_mean) / (sqrt2 P_std)) -
   erf((ln s_n - P_mean) / (sqrt2 P_std))`` (paper Eq. 11; P_mean -1.1, P_std 2.0).
4. One noise z per sample; student ``a = f(x + s_{n+1} z, s_{n+1})``, teacher ``b = stopgrad f(x + s_n z, s_n)`` with
   the *same* network (no EMA teacher, paper Sec. 3.2) and the same dropout mask (the RNG state is restored between
   the passes, as locuslab/ect training/loss.py does).
5. Per-sample loss ``lambda(s_n) d(a, b)`` with ``lambda = 1 / (s_{n+1} - s_n)`` (Sec. 3.4) and the pseudo-Huber
   metric on the whole-sample norm ``d = sqrt(||a - b||^2 + c^2) - c``, ``c = 0.00054 sqrt(D)``, D = C*H*W
   (Sec. 3.3). It is *not* the elementwise form (a known deviation of one community port).

The consistency function is ``gen.models.precond.ConsistencyPrecond`` (boundary ``f(x, sigma_min) = x``). The
snapshot's prediction spec says ``"prediction": "consistency"`` so that only the consistency sampler
(``samplers.sample_consistency``) is used with it. EMA is for evaluation only (the trainer's EMA).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from gen.models.precond import ConsistencyPrecond
from gen.objectives.base import Objective, check_label_dropout, drop_labels, mean_flat
from gen.paths import EDMPath, LogNormalSigma
from gen.utils.seed import Randomness


def ict_num_levels(k: int, total: int, s0: int = 10, s1: int = 1280) -> int:
    """``N(k) = min(s0 2^floor(k / K'), s1) + 1``, ``K' = floor(K / (log2 floor(s1 / s0) + 1))`` (iCT Eq. 12).

    Args:
        k: progress so far (iterations or images); K = ``total`` in the same unit.
        s0, s1: initial and final number of intervals.

    With K = 400k iterations: K' = 50k and N goes 11, 21, 41, ..., 1281.
    """
    if not (isinstance(s0, int) and isinstance(s1, int)) or not 1 <= s0 <= s1:
        raise ValueError(f"ict discretisation needs integers 1 <= s0 <= s1, got s0={s0!r}, s1={s1!r}")
    k_prime = max(math.floor(int(total) / (math.log2(s1 // s0) + 1)), 1)
    return min(s0 * 2 ** (int(k) // k_prime), s1) + 1


def karras_levels(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """Ascending Karras levels ``sigma_i = (smin^(1/rho) + (i-1)/(N-1) (smax^(1/rho) - smin^(1/rho)))^rho``, (n,) float64."""
    if n < 2:
        raise ValueError(f"a consistency grid needs at least 2 levels, got {n}")
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sig = (lo + ramp * (hi - lo)) ** rho
    sig[0], sig[-1] = sigma_min, sigma_max
    return sig


def lognormal_level_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """Probabilities of the N-1 intervals ``[sigma_n, sigma_{n+1}]`` under ``ln sigma ~ N(p_mean, p_std^2)``, (N-1,).

    ``p(n) ∝ erf((ln s_{n+1} - P_mean) / (sqrt2 P_std)) - erf((ln s_n - P_mean) / (sqrt2 P_std))`` (iCT Eq. 11).
    """
    e = torch.erf((sigmas.double().log() - p_mean) / (math.sqrt(2.0) * p_std))
    w = e[1:] - e[:-1]
    return w / w.sum()


def pseudo_huber_c(numel: int) -> float:
    """iCT's pseudo-Huber constant ``c = 0.00054 sqrt(D)`` for D elements per sample (CIFAR-10: ~0.0299)."""
    return 0.00054 * math.sqrt(numel)


def pseudo_huber(a: Tensor, b: Tensor, c: float) -> Tensor:
    """``sqrt(||a - b||^2 + c^2) - c`` with the norm over each whole sample: (B, ...) x2 -> (B,)."""
    sq = (a - b).reshape(a.shape[0], -1).pow(2).sum(dim=1)
    return (sq + c * c).sqrt() - c


def rng_states(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """torch's global CPU (and ``device``'s CUDA) RNG states: restored before a second pass so that dropout draws
    the same mask in the online and the target pass (iCT, ECT)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_rng_states(states: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    """Restore what :func:`rng_states` saved."""
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


class ImprovedConsistencyTraining(Objective):
    """iCT loss from scratch (module docstring for the step); the network is the bare backbone F.

    Args:
        sigma_min, sigma_max, rho: the Karras grid (0.002, 80, 7).
        sigma_data: data standard deviation of the parameterisation (0.5).
        s0, s1: the discretisation curriculum (10, 1280).
        p_mean, p_std: the lognormal level distribution (-1.1, 2.0).
        huber_c: pseudo-Huber constant; None: ``0.00054 sqrt(D)`` from the sample size.
        label_dropout: null-label rate (classifier-free guidance; 0 in the paper).
        align: must be None (the ``align`` config group sets it; iCT has no alignment term).
    """

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        rho: float = 7.0,
        sigma_data: float = 0.5,
        s0: int = 10,
        s1: int = 1280,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        huber_c: float | None = None,
        label_dropout: float = 0.0,
        align: Any = None,
    ) -> None:
        super().__init__()
        if align is not None:
            raise ValueError("objective=ict does not take representation alignment; use align=none")
        if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
            raise ValueError(f"objective: need 0 < sigma_min < sigma_max (finite), got {sigma_min}, {sigma_max}")
        if not sigma_data > 0 or not rho > 0 or not p_std > 0:
            raise ValueError(f"objective: sigma_data, rho and p_std must be > 0, got {sigma_data}, {rho}, {p_std}")
        if huber_c is not None and not huber_c >= 0:
            raise ValueError(f"objective.huber_c must be null or >= 0, got {huber_c}")
        ict_num_levels(0, 1, s0, s1)  # validates s0, s1
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.sigma_data = float(sigma_data)
        self.s0, self.s1 = int(s0), int(s1)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.huber_c = None if huber_c is None else float(huber_c)
        self.label_dropout = check_label_dropout(label_dropout)
        self.path = EDMPath(sigma_max)
        # What the levels follow in the limit N -> infinity (informational; the draw is discrete, see level_index).
        self.time_sampler = LogNormalSigma(p_mean, p_std)

    def status(self, progress: Any) -> dict[str, float]:
        """The training log's view of the schedule: N(k), the discretisation's number of levels, at ``progress``."""
        return {"ict_levels": float(self.num_levels(progress))}

    def num_levels(self, progress: Any) -> int:
        """N(k) at this progress (images); the first stage when ``progress`` is None."""
        if progress is None:
            return self.s0 + 1
        return ict_num_levels(progress.nimg, progress.total_nimg, self.s0, self.s1)

    def levels(self, n: int) -> Tensor:
        return karras_levels(n, self.sigma_min, self.sigma_max, self.rho)

    def level_index(self, sigmas: Tensor, u: Tensor) -> Tensor:
        """Interval index n in [0, N-2] (0-based) per sample by inverting the level CDF at uniforms ``u`` (B,)."""
        cdf = lognormal_level_probs(sigmas, self.p_mean, self.p_std).cumsum(0)
        idx = torch.searchsorted(cdf, u.double().cpu(), right=True)
        return idx.clamp_(max=len(sigmas) - 2)

    def consistency_fn(self, net: nn.Module) -> ConsistencyPrecond:
        return ConsistencyPrecond(net, self.sigma_data, self.sigma_min)

    def forward(self, net: nn.Module, batch: dict[str, Tensor], rng: Randomness, progress: Any = None) -> dict[str, Tensor]:
        """Per-sample ``{"loss", "huber", "sigma", "levels"}``, each ``(B,)``.

        Draws per sample, in order: the level uniform, the noise z, the label drop.
        """
        x0 = batch["x0"].float()
        dev = x0.device
        sigmas = self.levels(self.num_levels(progress))
        u = rng.rand()
        z = rng.randn(*x0.shape[1:]).to(dev)
        y = batch.get("label")
        if y is not None:
            y = drop_labels(y, self.label_dropout, net.num_classes, rng)
        n = self.level_index(sigmas, u)
        s_lo, s_hi = sigmas[n], sigmas[n + 1]  # (B,) float64
        bshape = (-1,) + (1,) * (x0.ndim - 1)
        f = self.consistency_fn(net)
        x_hi = (x0.double() + s_hi.to(dev).reshape(bshape) * z.double()).float()
        x_lo = (x0.double() + s_lo.to(dev).reshape(bshape) * z.double()).float()
        hi_f, lo_f = s_hi.float().to(dev), s_lo.float().to(dev)
        states = rng_states(dev)
        student = f(x_hi, hi_f, y).out
        after = rng_states(dev)
        set_rng_states(states, dev)  # the same dropout mask in the teacher pass
        with torch.no_grad():
            teacher = f(x_lo, lo_f, y).out.detach()
        set_rng_states(after, dev)
        c = pseudo_huber_c(x0[0].numel()) if self.huber_c is None else self.huber_c
        d = pseudo_huber(student.float(), teacher.float(), c)
        weight = (1.0 / (s_hi - s_lo)).float().to(dev)
        return {
            "loss": weight * d,
            "huber": d.detach(),
            "sigma": hi_f,
            "levels": torch.full_like(d, float(len(sigmas))).detach(),
            "mse": mean_flat((student - teacher) ** 2).detach(),
        }

    def prediction_spec(self) -> dict[str, Any]:
        return {
            "path": dict(self.path.config),
            "prediction": "consistency",
            "precond": {
                "_target_": "gen.models.precond.ConsistencyPrecond",
                "sigma_data": self.sigma_data,
                "sigma_min": self.sigma_min,
            },
        }
