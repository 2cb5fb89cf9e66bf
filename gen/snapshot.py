"""The one snapshot loader: a network, or a trainable module's initial weights, from an inference snapshot.

Everything that starts from trained weights goes through here: the generator of ``sample.py`` and the evaluation
jobs (``eval.generator``), the trainer's ``trainer.init`` (fine-tuning, a distillation student, ECT), and a method
that holds a frozen teacher. It sits in ``gen`` just above ``gen.utils`` (it imports nothing else of the project),
so every consumer can reach it.

A snapshot's metadata is untrusted (``gen.utils.ckpt.build_from_snapshot``): every integer of its model spec is
bounded by the tensors in the file, the network is first built on the meta device and its state-dict names and
shapes compared with the file's, and its ``_target_`` must lie in the project's packages. Non-finite weights are
refused, and so is a module whose shapes differ from the file's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gen.utils.ckpt import (
    CheckpointError,
    build_from_snapshot,
    check_generator_snapshot,
    file_sha256,
    load_snapshot,
    load_state_dict_checked,
)
from gen.utils.finite import NonFiniteError, non_finite_tensors, shorten

__all__ = ["LoadedSnapshot", "load_network", "read_snapshot", "init_from_snapshot"]


@dataclass
class LoadedSnapshot:
    """A snapshot read and checked: its tensors and its (untrusted) metadata."""

    path: str
    tensors: dict[str, Tensor]
    config: dict[str, Any]

    @functools.cached_property
    def sha256(self) -> str:
        """SHA-256 of the file (read again; recorded by whoever starts from it)."""
        return file_sha256(self.path)


def read_snapshot(path: str | os.PathLike, need: tuple[str, ...] = ()) -> LoadedSnapshot:
    """Read a snapshot, refusing non-finite weights and metadata that lacks a section of ``need``.

    Raises:
        FileNotFoundError / CheckpointError: naming the file. NonFiniteError: NaN or inf in the weights.
    """
    tensors, config = load_snapshot(path)
    if "model" in need:
        check_generator_snapshot(config, path)
    for key in need:
        if not isinstance(config.get(key), Mapping):
            raise CheckpointError(f"snapshot {path} lacks '{key}' in its config metadata; was it written by train.py?")
    bad = non_finite_tensors(tensors)
    if bad:
        raise NonFiniteError(
            f"snapshot {path} holds non-finite weights ({shorten(bad)}); nothing can start from it. Use an earlier "
            "snapshot of the run"
        )
    return LoadedSnapshot(str(path), tensors, config)


def load_network(
    source: str | os.PathLike | LoadedSnapshot, device: torch.device | str = "cpu"
) -> tuple[nn.Module, LoadedSnapshot]:
    """The snapshot's network (its ``model`` spec built with the untrusted-metadata checks), frozen, in eval mode.

    Args:
        source: a snapshot file, or one already read with :func:`read_snapshot`.

    Returns:
        (network on ``device`` with ``requires_grad=False``, the snapshot read).
    """
    snap = source if isinstance(source, LoadedSnapshot) else read_snapshot(source, need=("model",))
    check_generator_snapshot(snap.config, snap.path)
    net = build_from_snapshot(snap.config["model"], snap.tensors, snap.path)
    return net.to(device).eval().requires_grad_(False), snap


def init_from_snapshot(module: nn.Module, path: str | os.PathLike, what: str) -> str:
    """Copy a snapshot's weights into ``module`` (a trainable module's initialisation); returns the file's SHA-256.

    The module keeps its own dtype and device; names and shapes must equal the file's.

    Raises:
        ValueError naming ``what`` and the file: another shape or set of names. NonFiniteError: NaN/inf weights.
    """
    snap = read_snapshot(path)
    own = module.state_dict()
    cast = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in snap.tensors.items()}
    # A zero extra-condition slot that the file lacks (a SLAM or TDM-unify student started from its teacher,
    # gen.models.student) keeps its zeros: the network then computes exactly the snapshot's function.
    cast.update({k: v for k, v in own.items() if k.startswith("aug_embedder.") and k not in cast and not v.any()})
    try:
        load_state_dict_checked(module, cast, f"snapshot {path}")
    except ValueError as e:
        if snap.config.get("kind") == "tokenizer":  # the key lists below would only restate this
            raise ValueError(f"{what}: {path} is a tokenizer snapshot (an autoencoder), not weights of this network; "
                             "give a snapshot of the same model (e.g. the teacher's)") from e
        raise ValueError(f"{what}: cannot start from {path}, which holds another network. {e}") from e
    return snap.sha256
