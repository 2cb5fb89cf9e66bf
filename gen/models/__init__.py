"""Backbone networks (DiT, LightningDiT, DDT) and :func:`build_model`, which rebuilds one from its ``.config``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from torch import nn

# arch name -> (module, class). Modules are imported on demand so one backbone's import cost is paid only
# when it is used.
ARCHS: dict[str, tuple[str, str]] = {
    "dit": ("gen.models.dit", "DiT"),
    "lightningdit": ("gen.models.lightningdit", "LightningDiT"),
    "ddt": ("gen.models.ddt", "DDT"),
}


def model_class(arch: str) -> type[nn.Module]:
    """The backbone class registered under ``arch``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; known: {sorted(ARCHS)}")
    module, cls = ARCHS[arch]
    return getattr(importlib.import_module(module), cls)


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build a backbone from a config dict (``{"arch": ..., **constructor_args}``), e.g. a model's ``.config``.

    Raises:
        ValueError: missing or unknown ``arch``, or keys the constructor does not accept.
    """
    if "arch" not in config:
        raise ValueError(f"model config needs an 'arch' key (one of {sorted(ARCHS)}); got keys {sorted(config)}")
    kwargs = {k: v for k, v in config.items() if k != "arch"}
    cls = model_class(config["arch"])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"unknown keys {unknown} for arch {config['arch']!r} ({cls.__name__}); accepted: {sorted(accepted)}"
        )
    return cls(**kwargs)


def __getattr__(name: str) -> Any:
    """``from gen.models import DiT`` etc. without importing every backbone up front."""
    for arch, (_, cls) in ARCHS.items():
        if name == cls:
            return model_class(arch)
    raise AttributeError(f"module 'gen.models' has no attribute {name!r}")


__all__ = ["ARCHS", "DDT", "DiT", "LightningDiT", "build_model", "model_class"]
