"""One registry for training state: everything stateful is registered once by name; saving and resuming derive from it.

Items are objects with ``state_dict()`` / ``load_state_dict()`` (modules, optimizers, EMAs, gradient scalers)
or :class:`Value` holders for method state and counters. A training state file is the registry's dict plus
the run's config and the identities of its frozen networks; it is written atomically and read with
``weights_only=True`` (``gen.utils.ckpt``). Loading checks that the file holds exactly the registered names and
that every module's tensors have the right names and shapes, so a state of another model or method is refused
with a message that lists the differences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from torch import nn

from gen.utils.ckpt import load_state_dict_checked
from gen.utils.finite import finite_number, non_finite_tensors

__all__ = ["StateRegistry", "Value", "finite_number"]


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

    def non_finite(self) -> list[str]:
        """Names of floating-point tensors anywhere in the state (weights, EMAs, optimizer moments) with NaN/inf.

        Optimizer state counts too: resuming from a non-finite Adam moment poisons the next update.
        """
        return non_finite_tensors(self.state_dict())
