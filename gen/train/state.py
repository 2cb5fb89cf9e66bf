"""One registry for training state: everything stateful is registered once by name; saving and resuming derive from it.

Items are objects with ``state_dict()`` / ``load_state_dict()`` (modules, optimizers, EMAs, gradient scalers)
or :class:`Value` holders for method state and counters. A training state file is the registry's dict plus
the run's config, the identities of its frozen networks and data and the snapshots it started from; it is written atomically and read with
``weights_only=True`` (``gen.utils.ckpt``). Loading checks that the file holds exactly the registered names and
that every module's tensors have the right names and shapes, so a state of another model or method is refused
with a message that lists the differences.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from gen.utils import ckpt
from gen.utils.ckpt import load_state_dict_checked
from gen.utils.config import ConfigError
from gen.utils.dist import print0
from gen.utils.finite import finite_number, non_finite_tensors

__all__ = ["StateRegistry", "Value", "finite_number", "check_resume", "check_init_sources", "STATE_FORMAT"]

STATE_FORMAT = "gen-train-state-v2"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


class Value:
    """A registry item backed by a getter and a setter (counters, a method's extra state)."""

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None]) -> None:
        self._get, self._set = get, set

    def state_dict(self) -> Any:
        return self._get()

    def load_state_dict(self, state: Any) -> None:
        self._set(state)


class StateRegistry:
    """Named stateful items; ``state_dict()`` / ``load_state_dict()`` of the whole training state."""

    def __init__(self) -> None:
        self._items: dict[str, Stateful] = {}

    def register(self, name: str, item: Stateful) -> None:
        """Add an item under a unique name (``"module.net"``, ``"optim.main"``, ``"ema.net"``, ...)."""
        if name in self._items:
            raise ValueError(f"state item {name!r} is registered twice")
        self._items[name] = item

    @property
    def names(self) -> list[str]:
        return list(self._items)

    def modules(self) -> dict[str, nn.Module]:
        """The registered items that are modules (checked for finite weights before every save)."""
        return {k: v for k, v in self._items.items() if isinstance(v, nn.Module)}

    def state_dict(self) -> dict[str, Any]:
        return {name: item.state_dict() for name, item in self._items.items()}

    def load_state_dict(self, state: Mapping[str, Any], source: str) -> None:
        """Restore every item; the file must hold exactly the registered names (the message lists the rest)."""
        missing = [n for n in self._items if n not in state]
        unexpected = [n for n in state if n not in self._items]
        if (missing or unexpected) and all(n.startswith("scaler.") for n in missing + unexpected):
            # Only fp16 keeps a gradient scaler: the precision changed, not the method.
            was = "fp16" if unexpected else "bf16 or fp32 (trainer.precision=bf16 or no)"
            raise ConfigError(
                f"{source} was trained with precision {was}, and this run's trainer.precision differs (fp16 keeps a "
                "gradient scaler in the state, the others do not). Resume with the run's own precision, or use "
                "another name=... for a new run."
            )
        if missing or unexpected:
            raise ValueError(
                f"{source} does not hold this run's training state: missing {missing or 'nothing'}, unexpected "
                f"{unexpected or 'nothing'}. Is it a state of another method? Use another name=... for a new run."
            )
        for name, item in self._items.items():
            if isinstance(item, nn.Module):
                load_state_dict_checked(item, state[name], f"{source} [{name}]")
            else:
                item.load_state_dict(state[name])

    def weight_rms(self) -> dict[str, float]:
        """Root mean square of each registered module's floating-point weights (trainable modules and EMAs): a
        size-free magnitude, so one divergence bound (``trainer.max_weight_rms``) fits every model."""
        out = {}
        for name, module in self.modules().items():
            tensors = [t.detach() for t in module.state_dict().values() if t.is_floating_point() and t.numel()]
            if tensors:
                total = sum(float(t.double().square().sum()) for t in tensors)
                out[name] = math.sqrt(total / sum(t.numel() for t in tensors))
        return out

    def non_finite(self) -> list[str]:
        """Names of floating-point tensors anywhere in the state (weights, EMAs, optimizer moments) with NaN/inf.

        Optimizer state counts too: resuming from a non-finite Adam moment poisons the next update.
        """
        return non_finite_tensors(self.state_dict())


def check_init_sources(recorded: Mapping[str, Mapping[str, str]], init: Mapping[str, str], path: Path) -> dict:
    """Resuming: the snapshots named by ``trainer.init`` must be the ones the run started from (by SHA-256)."""
    if set(recorded) != set(init):
        raise ConfigError(
            f"{path} started from snapshots for {sorted(recorded) or 'no module'}, but trainer.init names "
            f"{sorted(init) or 'none'}; restore trainer.init to resume, or start a new run with another name=..."
        )
    for name, file in sorted(init.items()):
        if not Path(file).is_file():
            print0(f"trainer.init.{name}: {file} no longer exists; the weights come from {path}")
            continue
        sha = ckpt.file_sha256(file)
        if sha != recorded[name]["sha256"]:
            raise ConfigError(
                f"trainer.init.{name}={file} has sha256 {sha[:12]}..., but {path} started from a file with sha256 "
                f"{recorded[name]['sha256'][:12]}... ({recorded[name]['path']}); it changed since. Restore it, or "
                "start a new run with another name=..."
            )
    return dict(recorded)


def _differences(a: Any, b: Any, key: str) -> list[tuple[str, Any, Any]]:
    """The leaves where two plain config values differ, as (dotted key, old, new)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{key}.{k}")]
    return [] if a == b else [(key, a, b)]


def check_resume(
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    frozen: Mapping[str, Mapping[str, str]],
    keys: Sequence[str],
    path: Path,
    identity: Mapping[str, Any] | None = None,
    ignore: Sequence[str] = (),
) -> None:
    """Refuse to resume a state written by another setup or with other frozen networks.

    The data is told by its content: when the state's data fingerprint (``data_identity``) equals this run's, text
    settings of the ``data`` section (a moved folder) may differ. Sections in ``ignore`` may differ at all. Every
    accepted difference is printed.
    """
    if state.get("format") != STATE_FORMAT:
        raise ConfigError(
            f"{path} is not a training state of this version of the toolkit (format {state.get('format')!r}, "
            f"expected {STATE_FORMAT!r}); start a new run with another name=..."
        )
    try:
        old = json.loads(state.get("config", "{}"))
    except json.JSONDecodeError:
        old = {}
    old_identity = state.get("data_identity")
    for key in keys:
        a, b = old.get(key), json.loads(json.dumps(config.get(key), default=str))
        if a is None or b is None or a == b:
            continue
        diffs = _differences(a, b, key)
        listed = "; ".join(f"{k}: {x!r} -> {y!r}" for k, x, y in diffs[:6]) + (" ..." if len(diffs) > 6 else "")
        if key in ignore:
            print0(f"Resuming although '{key}' changed (trainer.resume_ignore): {listed}")
            continue
        same_data = key == "data" and old_identity is not None and old_identity == identity
        if same_data and all(isinstance(x, str) and isinstance(y, str) for _, x, y in diffs):
            print0(f"Resuming with the same data ({identity['count']} items, content {identity['sha256'][:12]}) "
                   f"at another location: {listed}")
            continue
        hint = "Use another experiment name (name=...) for a new run, or restore the old setting to resume."
        if key == "data":
            hint += (
                " If the data only moved or was renamed, resuming is allowed when its content is the same (it differs "
                "here, or the dataset has no content fingerprint); to resume anyway, set trainer.resume_ignore=[data]."
            )
        raise ConfigError(f"{path} was written with a different '{key}' config than this run ({listed}). {hint}")
    old_frozen = state.get("frozen", {})
    for name in sorted(set(old_frozen) | set(frozen)):
        a, b = old_frozen.get(name), frozen.get(name)
        if a != b:
            raise ConfigError(
                f"{path} was trained with frozen network '{name}' = {a}, but this run has {b}. A frozen teacher, "
                "encoder or loss network must stay the same to resume; restore its weights file, or start a new run "
                "with another name=..."
            )
