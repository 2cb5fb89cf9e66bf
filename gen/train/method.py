"""Training methods: what a method owns and the one interface through which the loop drives it.

A method is an ``nn.Module`` that owns its parts:

* **trainable modules**, children named in ``trainable`` (backbone, projector, discriminator, fake-score net).
  Each is saved in training states under its name; snapshots are taken of ``snapshot_module``'s EMA.
* **EMAs** (:meth:`Method.ema_specs`): which trainable modules are averaged and by which rule (default: the
  ``ema`` config spec for each name in ``ema_modules``; a method may build its own from a ``_target_`` spec in its
  config). The loop updates an EMA only after its module's optimizer stepped; the method reads an average (a
  consistency or distillation target network) with :meth:`Method.averaged`.
* **frozen modules** (teacher, foundation encoder, LPIPS), held with ``gen.utils.frozen.hold_frozen``: never
  optimised, never in training states or snapshots, identified by class and weights hash, checked on resume.
* **optimizers** (:class:`OptimizerSpec`): which trainable modules each one updates, built from a factory
  (Hydra's ``_partial_`` optimizer), with weight decay on matrices only, an optional own learning-rate
  schedule and clipping.
* **the update rhythm**: :meth:`Method.phases` lists the optimizers stepped at a training step, in order
  (one phase for plain diffusion; alternating phases for GAN-style or teacher-student methods). Every phase of
  a step sees the same micro-batches.
* **the loss**: :meth:`Method.loss` takes the phase name, a batch, the per-sample randomness and the training
  progress, and returns per-sample losses (``"loss"``, shape (B,), plus logged terms). The loop reduces,
  scales, backpropagates, synchronises gradients across processes, clips and steps.
* **what phases share**: :attr:`Method.shared` (:class:`StepShare`) carries what one phase of a step computed for a
  micro-batch (the generator phase's samples) to a later phase of the same step (the critic's); cleared after
  every step.
* **extra state** (a curriculum stage, a running loss): :meth:`Method.extra_state` and
  :meth:`Method.load_extra_state`, saved in the training state beside the modules.

The batch is the method's: :meth:`Method.prepare_batch` turns a collated micro-batch of the dataset into the
batch its loss reads (default: ``gen.train.batches.make_batch``, which mirrors the keys in ``flip_keys`` with
``trainer.hflip`` and adds ``"x0"``); ``data_keys`` are the dataset keys it reads, refused before the first step
when the dataset lacks one. With the default, a batch is a dict of tensors (:data:`Batch`): ``"image"`` uint8 (B, C, H, W) when the data has pixels,
``"x0"`` the model input (pixels in [-1, 1] or normalised latents), ``"label"`` int64 (B,), ``"position"``
int64 (B,) (the samples' positions in the global data stream), and whatever else the dataset stores
(pre-extracted latents, encoder features, noise-sample pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gen.ema import EMA, EMAFactory
from gen.train.batches import DEFAULT_FLIP_KEYS, make_batch
from gen.utils.frozen import frozen_identity, frozen_modules
from gen.utils.seed import Randomness, SampleRandom

Batch = dict[str, Tensor]
OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Progress:
    """Where training stands when a step starts; restored exactly on resume (it is a function of the counters).

    Attributes:
        nimg: training images consumed before this step (all processes, all accumulation rounds).
        total_nimg: images of the whole run.
        step: optimizer steps done before this one.
    """

    nimg: int
    total_nimg: int
    step: int

    @property
    def kimg(self) -> float:
        return self.nimg / 1000.0

    @property
    def fraction(self) -> float:
        """``nimg / total_nimg`` in [0, 1]."""
        return min(self.nimg / max(self.total_nimg, 1), 1.0)


@dataclass
class OptimizerSpec:
    """One optimizer of a method.

    Attributes:
        name: the phase name that steps it (and its key in training states).
        modules: names of the trainable modules whose parameters it updates (disjoint between optimizers).
        factory: builds the optimizer from parameter groups (e.g. ``functools.partial(torch.optim.AdamW, lr=1e-4)``).
        weight_decay: applied to parameters with two or more dimensions only (matrices, conv kernels); None takes
            the factory's own ``weight_decay`` keyword (a ``functools.partial``), else 0.
        lr_schedule: factor on the base learning rates as a function of progress; None: the trainer's schedule.
        grad_clip: maximum global gradient norm for these parameters; None: the trainer's setting.
    """

    name: str
    modules: tuple[str, ...]
    factory: OptimizerFactory
    weight_decay: float | None = None
    lr_schedule: Callable[[Progress], float] | None = None
    grad_clip: float | None = None


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay only on parameters with two or more dimensions (nanoGPT's rule); frozen ones are skipped."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


class StepShare:
    """What one phase of a training step hands to a later phase of the same step, per micro-batch.

    Every phase of a step sees the same micro-batches; the loop selects the current one (:meth:`at`) before each
    loss call, so ``put("fake", x)`` in the generator phase and ``get("fake")`` in the critic phase refer to the
    same micro-batch, on any number of processes (the key is the micro-batch's round, not an object identity that a
    device transfer would change). Values are detached: the later phase's graph starts there. The loop clears
    everything after each step, so nothing crosses a step boundary and resuming stays exact.
    """

    def __init__(self) -> None:
        self._items: dict[tuple[int, str], Tensor] = {}
        self._round = 0

    def at(self, round_: int) -> None:
        """Select the micro-batch (accumulation round) the next loss call works on (called by the loop)."""
        self._round = int(round_)

    def put(self, key: str, value: Tensor) -> None:
        """Keep ``value`` (detached) for the current micro-batch."""
        self._items[(self._round, key)] = value.detach()

    def get(self, key: str) -> Tensor:
        """What an earlier phase put for the current micro-batch; a clear error when nothing was put."""
        item = self._items.get((self._round, key))
        if item is None:
            raise KeyError(f"no {key!r} was shared for micro-batch {self._round} in this step; the phase that puts "
                           "it must run earlier in the same step (Method.phases)")
        return item

    def has(self, key: str) -> bool:
        return (self._round, key) in self._items

    def clear(self) -> None:
        """Forget everything (called by the loop after every step)."""
        self._items.clear()
        self._round = 0


class Method(nn.Module):
    """Base class of training methods (see the module docstring).

    Subclasses assign their trainable modules as children, list them in ``trainable``, hold frozen ones with
    ``hold_frozen``, and implement :meth:`optimizers` and :meth:`loss`.

    Attributes:
        trainable: names of the trainable child modules, saved in training states in this order.
        ema_modules: trainable modules that get the trainer's EMA (see :meth:`ema_specs`).
        snapshot_module: the module whose EMA (first profile) goes into inference snapshots (safetensors); it
            must have an EMA.
        data_keys: dataset keys the loss reads besides ``"label"`` (checked against the dataset before training).
        flip_keys: spatial keys mirrored together by ``trainer.hflip``; a spatial dataset key outside them is
            refused with ``hflip`` on (it would be left out of register).
        produces: what the snapshot module makes, ``"samples"`` (a generator) or ``"reconstructions"`` (a
            tokenizer, with ``reconstruct(autoencoder, uint8 images, generators)``): the entry point picks the
            preview and the evaluation metrics by it.
    """

    trainable: tuple[str, ...] = ("net",)
    ema_modules: tuple[str, ...] = ("net",)
    snapshot_module: str = "net"
    data_keys: tuple[str, ...] = ()
    flip_keys: tuple[str, ...] = DEFAULT_FLIP_KEYS
    produces: str = "samples"

    def prepare_batch(
        self, raw: Mapping[str, Tensor], tokenizer: Any, rng: SampleRandom, hflip: bool, device: torch.device
    ) -> Batch:
        """The batch the loss reads, from a collated micro-batch of CPU tensors (``"position"`` included).

        Default: :func:`gen.train.batches.make_batch` (flips on ``flip_keys``, ``"x0"`` from the latent or the
        pixels). Draws come from ``rng`` (per sample) so that the batch is the same on any number of processes.
        """
        return make_batch(raw, tokenizer, rng, hflip, device, self.flip_keys)

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Name -> module for every name in ``trainable``."""
        missing = [n for n in self.trainable if not isinstance(getattr(self, n, None), nn.Module)]
        if missing:
            raise TypeError(f"{type(self).__name__}.trainable names {missing}, which are not child modules")
        return {n: getattr(self, n) for n in self.trainable}

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Every frozen network held by the method or its children, by dotted name."""
        return frozen_modules(self)

    def frozen_identities(self) -> dict[str, dict[str, str]]:
        """Class and weights hash of each frozen network (recorded in training states and checked on resume)."""
        return {name: frozen_identity(m) for name, m in sorted(self.frozen_modules().items())}

    def ema_specs(self, default: EMAFactory) -> dict[str, EMAFactory]:
        """Module name -> EMA factory for every averaged module (default: ``default`` for each of ``ema_modules``).

        ``default`` is built from the trainer's ``ema`` config spec. A method that needs its own averaging rule
        (a consistency target with decay 0.95, say) takes a ``_partial_`` EMA spec in its config and returns it
        here; a name that is not a trainable module is refused before the first step.
        """
        return {name: default for name in self.ema_modules}

    @property
    def shared(self) -> StepShare:
        """What the phases of the current step share (see :class:`StepShare`)."""
        share = self.__dict__.get("_shared")
        if share is None:
            share = self.__dict__["_shared"] = StepShare()
        return share

    def attach_emas(self, emas: Mapping[str, EMA]) -> None:
        """Called by the loop once the EMAs exist (held unregistered: they are saved as ``ema.<name>``)."""
        self.__dict__["_emas"] = dict(emas)

    def averaged(self, module: str = "net", profile: str | None = None) -> nn.Module:
        """The EMA copy of a trainable module (its first profile by default): the method's target network.

        It is updated after the module's optimizer stepped, never inside a loss; read it under ``torch.no_grad``.
        """
        emas = self.__dict__.get("_emas")
        if emas is None:
            raise RuntimeError(f"{type(self).__name__}.averaged({module!r}): the EMAs exist only inside training")
        if module not in emas:
            raise KeyError(f"{type(self).__name__} has no EMA of {module!r} (EMAs: {sorted(emas)}); see ema_specs()")
        return emas[module].averaged(profile)

    def optimizers(self) -> list[OptimizerSpec]:
        """The method's optimizers, in the order their phases run by default."""
        raise NotImplementedError

    def phases(self, progress: Progress) -> Sequence[str]:
        """Names of the optimizers to step at this training step, in order (default: all, declared order)."""
        return [spec.name for spec in self.optimizers()]

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        """Per-sample losses of one phase: ``{"loss": (B,), <logged term>: (B,), ...}``."""
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Method state beyond module weights (tensors and plain values), saved in training states."""
        return {}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def after_step(self, progress: Progress, logged: Mapping[str, float]) -> None:
        """Called after every optimizer step on every process with the step's mean logged terms."""

    def status(self, progress: Progress) -> dict[str, float]:
        """Numbers the method reports on each status line and in ``stats.jsonl`` (a curriculum's stage, iCT's
        number of levels, ECT's stage), for ``progress``: where the record stands, i.e. the next step's values.

        Read on every process; they must be the same on all of them (state advanced from reduced values)."""
        return {}

    def snapshot_config(self) -> dict[str, Any]:
        """JSON-able metadata stored with inference snapshots (enough to rebuild and use the snapshot module)."""
        return {}


class PhaseModule(nn.Module):
    """The modules one optimizer updates, wrapped so that DDP sees exactly those parameters.

    Its forward runs the method's loss for the phase. The method itself is held without registration, so
    other modules the loss touches (a discriminator in the generator phase, a frozen teacher) are outside
    this phase's gradient synchronisation.
    """

    def __init__(self, method: Method, phase: str, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.phase = phase
        self.parts = nn.ModuleDict(dict(modules))
        object.__setattr__(self, "method", method)

    def forward(self, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        return self.method.loss(self.phase, batch, rng, progress)
