"""Checking plain config mappings against typed dataclasses, with errors that name the key.

Library code never sees Hydra: entry points convert their config to plain dicts and build typed
settings objects with :func:`from_mapping`, so a typo or a wrong type fails before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key is unknown or has a bad value; the message names the key and the fix."""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, typing.Sequence):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def from_mapping(cls: type[T], data: Mapping[str, Any], section: str) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and ill-typed values raise ConfigError.

    Args:
        cls: a dataclass type with type annotations.
        data: the config section as a plain mapping.
        section: its dotted name in the full config, used in messages (e.g. ``"trainer"``).
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        hints_txt = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(fields), n=1)
            hints_txt.append(f"'{section}.{k}'" + (f" (did you mean '{section}.{close[0]}'?)" if close else ""))
        raise ConfigError(
            f"unknown config key(s) {', '.join(hints_txt)}. Known keys of '{section}': {', '.join(sorted(fields))}"
        )
    for k, v in data.items():
        if not _type_ok(v, hints[k]):
            raise ConfigError(f"bad value for '{section}.{k}': {v!r} is not of type {hints[k]}")
    try:
        return cls(**dict(data))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad '{section}' config: {e}") from e
