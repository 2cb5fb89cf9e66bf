"""Frozen networks (teachers, foundation encoders, LPIPS): held, never optimised, never saved, identified by hash.

A method or objective holds a frozen network with :func:`hold_frozen` instead of assigning it as a child
module. It is then outside ``parameters()``, ``state_dict()`` and DDP, so it never reaches an optimizer, a
training state or a snapshot, and ``.train()`` on the owner cannot switch it out of eval mode. The training
loop finds every frozen network with :func:`frozen_modules` (to move it to the device) and records
:func:`frozen_identity` (class and SHA-256 of the weights) in the run's config, so that resuming with
another teacher or encoder is refused by name.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

_SLOT = "_frozen_modules"


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients; returns the module."""
    return module.eval().requires_grad_(False)


def hold_frozen(owner: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Attach ``module`` to ``owner`` as ``owner.<name>`` without registering it as a submodule; freezes it."""
    if name in owner._modules or name in owner._parameters or name in owner._buffers:
        raise ValueError(f"{type(owner).__name__} already has a registered member {name!r}")
    slots = owner.__dict__.setdefault(_SLOT, {})
    slots[name] = freeze(module)
    object.__setattr__(owner, name, module)
    return module


def frozen_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Every frozen network held anywhere inside ``root``, by dotted name (``"objective.encoder"``)."""
    found: dict[str, nn.Module] = {}
    for prefix, m in root.named_modules():
        for name, f in m.__dict__.get(_SLOT, {}).items():
            found[f"{prefix}.{name}" if prefix else name] = f
    return found


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``module.state_dict()`` (sorted by name)."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def frozen_identity(module: nn.Module) -> dict[str, str]:
    """``{"class": <qualified class name>, "sha256": <weights hash>}``: what resuming checks."""
    cls = type(module)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "sha256": weights_sha256(module)}
