"""Checking plain config mappings against typed dataclasses, with errors that name the key.

Library code never sees Hydra: entry points convert their config to plain dicts and build typed
settings objects with :func:`from_mapping`, so a typo or a wrong type fails before any work.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
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


def type_name(tp: Any) -> str:
    """A type annotation as a user reads it in a config message ("an integer", "true or false", ...)."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if origin in (list, tuple, typing.Sequence):
        return "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def did_you_mean(key: str, known: Sequence[str], prefix: str = "") -> str:
    """`` (did you mean '<prefix><closest>'?)`` for the known key closest to ``key``, or ``""`` when none is close."""
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def from_mapping(cls: type[T], data: Mapping[str, Any], section: str) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and ill-typed values raise ConfigError.

    Args:
        cls: a dataclass type with type annotations.
        data: the config section as a plain mapping.
        section: its dotted name in the full config, used in messages (e.g. ``"trainer"``); ``""`` for the
            top level of an entry point's config.
    """

    def name(key: str) -> str:
        return f"{section}.{key}" if section else key

    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        hints_txt = []
        for k in unknown:
            hints_txt.append(f"'{name(k)}'" + did_you_mean(k, sorted(fields), f"{section}." if section else ""))
        raise ConfigError(
            f"unknown config key(s) {', '.join(hints_txt)}. Known keys{f' of {section!r}' if section else ''}: "
            f"{', '.join(sorted(fields))}"
        )
    for k, v in data.items():
        if not _type_ok(v, hints[k]):
            raise ConfigError(f"bad value for '{name(k)}': {v!r}; expected {type_name(hints[k])}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data  # type: ignore[arg-type]
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing config key(s) {', '.join(repr(name(k)) for k in missing)}")
    try:
        return cls(**dict(data))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad '{section}' config: {e}" if section else str(e)) from e
