"""The one constructor: build objects from ``_target_`` specs, restricted to an allow-list of packages.

Everything that a config or a snapshot rebuilds (backbones, paths, time samplers, samplers, grids,
preconditioning, tokenizers, feature extractors, methods) is described by one kind of spec::

    {"_target_": "gen.paths.LinearPath"}
    {"_target_": "samplers.grids.uniform_grid", "_partial_": true, "steps": 30}
    {"_target_": "gen.objectives.FlowMatching", "time_sampler": {"_target_": "gen.paths.LogitNormalTime"}}

and built by :func:`build`. Nested specs are built first; ``_partial_: true`` returns a
``functools.partial``. The spec's ``_target_`` *and* the module that defines the resolved object must lie in
one of the allowed packages (by default the project's own: ``gen``, ``samplers``, ``tokenizers``, ``eval``,
``distill``), so a snapshot from an untrusted source can name nothing else: a name such as
``gen.x.run`` that a project module imported from ``subprocess`` is refused, and nothing outside the
allow-list is even imported. Training configs, which the user writes, also allow ``torch.optim``.

This is Hydra's ``instantiate`` without Hydra (library code never imports Hydra), in the spirit of EDM2's
``dnnlib.util.construct_class_by_name`` (NVlabs/edm2, dnnlib/util.py).

Classes decorated with :func:`capture_config` record their constructor arguments as ``self.config``, a spec
that :func:`build` turns back into an equal object.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from gen.utils.config import ConfigError

PROJECT_PACKAGES: tuple[str, ...] = ("gen", "samplers", "tokenizers", "eval", "distill")
TRAINING_PACKAGES: tuple[str, ...] = PROJECT_PACKAGES + ("torch.optim",)
_SPECIAL = {"_target_", "_partial_"}

T = TypeVar("T")


class BuildError(ConfigError):
    """A spec names something outside the allow-list, something that does not exist, or bad arguments."""


def is_spec(value: Any) -> bool:
    """True for a mapping with a ``_target_`` key."""
    return isinstance(value, Mapping) and "_target_" in value


def _within(name: str, allow: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in allow)


def resolve(target: str, allow: Iterable[str] = PROJECT_PACKAGES) -> Any:
    """The object a dotted ``module.name`` path names, checked against ``allow`` before and after import."""
    allow = tuple(allow)
    if not isinstance(target, str) or "." not in target:
        raise BuildError(f"_target_ must be a dotted path 'package.module.Name', got {target!r}")
    if not _within(target, allow):
        raise BuildError(f"_target_ {target!r} is outside the allowed packages {list(allow)}; refusing to import it")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise BuildError(f"_target_ {target!r}: module {module_name!r} cannot be imported ({e})") from e
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, public, n=1)
        hint = f" (did you mean '{module_name}.{close[0]}'?)" if close else ""
        raise BuildError(f"_target_ {target!r}: {module_name} has no attribute {attr!r}{hint}")
    obj = getattr(module, attr)
    origin = getattr(obj, "__module__", None) or ""
    if inspect.ismodule(obj) or not callable(obj) or not _within(origin, allow):
        raise BuildError(
            f"_target_ {target!r} resolves to {obj!r}, defined in {origin or 'an unknown module'}, which is not a "
            f"class or function of the allowed packages {list(allow)}"
        )
    return obj


def _check_arguments(fn: Callable[..., Any], names: Iterable[str], target: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters.values()
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    unknown = [n for n in names if n not in accepted]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, accepted, n=1)
            hints.append(repr(n) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise BuildError(f"unknown argument(s) {', '.join(hints)} for {target}; accepted: {', '.join(accepted)}")


def _build_value(value: Any, allow: tuple[str, ...]) -> Any:
    if is_spec(value):
        return build(value, allow=allow)
    if isinstance(value, Mapping):
        return {k: _build_value(v, allow) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_build_value(v, allow) for v in value)
    return value


def build(spec: Mapping[str, Any], /, *, allow: Iterable[str] = PROJECT_PACKAGES, **kwargs: Any) -> Any:
    """Build the object described by ``spec``.

    Args:
        spec: ``{"_target_": "pkg.module.Name", "_partial_": bool (optional), **arguments}``; argument values
            that are specs themselves (or lists / mappings holding specs) are built first.
        allow: package prefixes that targets may name (default: the project's own packages).
        **kwargs: extra keyword arguments for the top-level call ("interface" arguments such as a network that
            the caller built); giving a key both here and in ``spec`` is an error.

    Returns:
        The constructed object, or a ``functools.partial`` when ``_partial_`` is true.

    Raises:
        BuildError: a target outside ``allow``, a missing target, unknown or clashing arguments, or an error
            raised by the constructor itself (with the target named).
    """
    if not is_spec(spec):
        raise BuildError(f"expected a spec with a '_target_' key, got {spec!r}")
    allow = tuple(allow)
    extra = sorted(k for k in spec if k.startswith("_") and k.endswith("_") and k not in _SPECIAL)
    if extra:
        raise BuildError(f"unsupported special key(s) {extra} in the spec of {spec['_target_']!r}")
    target = str(spec["_target_"])
    fn = resolve(target, allow)
    args = {k: _build_value(v, allow) for k, v in spec.items() if k not in _SPECIAL}
    clash = sorted(set(args) & set(kwargs))
    if clash:
        raise BuildError(f"{target}: argument(s) {clash} are set by the caller and must not be in the config")
    args.update(kwargs)
    _check_arguments(fn, args, target)
    if spec.get("_partial_", False):
        return functools.partial(fn, **args)
    try:
        return fn(**args)
    except (TypeError, ValueError, FileNotFoundError) as e:  # bad arguments, or a file the object needs is missing
        raise BuildError(f"cannot build {target}: {e}") from e


def capture_config(cls: type[T]) -> type[T]:
    """Class decorator: after ``__init__``, ``self.config`` holds ``{"_target_": <class path>, **arguments}``.

    The arguments are the bound constructor arguments with defaults filled in, so ``build(obj.config)``
    rebuilds an equal object and the config is never written out by hand. A subclass that is decorated too
    records its own path and arguments (its wrapper runs last).
    """
    init = cls.__init__
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        values.pop(next(iter(sig.parameters)))  # self
        for p in sig.parameters.values():
            if p.kind == p.VAR_KEYWORD:
                values.update(values.pop(p.name, {}))
            elif p.kind == p.VAR_POSITIONAL and values.pop(p.name, ()):
                raise TypeError(f"capture_config cannot record *{p.name} of {cls.__qualname__}")
        if type(self) is cls:
            config = {"_target_": f"{cls.__module__}.{cls.__qualname__}"}
            config.update({k: _plain(v) for k, v in values.items()})
            object.__setattr__(self, "config", config)

    cls.__init__ = wrapped  # type: ignore[method-assign]
    return cls


def _plain(value: Any) -> Any:
    """A JSON-able copy of a constructor argument (objects with a ``config`` spec are replaced by it)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    config = getattr(value, "config", None)
    if is_spec(config):
        return dict(config)
    raise TypeError(f"cannot record constructor argument {value!r} in a config (not JSON-able and no .config spec)")
