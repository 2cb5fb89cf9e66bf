"""One combiner of saved checkpoints: ``theta = sum_i alpha_i theta_i``, written as an ordinary snapshot.

Classic EMA, EDM2's post-hoc EMA and LCSC all produce weights of this form and differ only in how the
coefficients ``alpha`` are chosen ("Analyzing and Improving the Training Dynamics of Diffusion Models", Karras
et al. 2024, NVlabs/edm2 ``reconstruct_phema.py``; "Linear Combination of Saved Checkpoints Makes Consistency and
Diffusion Models Better", Liu et al. 2024). The sources are read one file at a time and accumulated in float64,
so combining n checkpoints holds two models in memory, not n; a search that combines the same sources many times
(LCSC) holds them instead (:class:`CheckpointSet`), with the same result. Buffers (non-float tensors and module buffers such
as normalisation statistics) are not averaged: they are copied from a reference snapshot, whose metadata (model,
prediction, data, tokenizer, sampler) the result also takes, so ``sample.py`` and the evaluation jobs load it with
no flags. The result's metadata records every source (name, SHA-256) and its coefficient.

Sources are inference snapshots (``.safetensors``) or training states (``.pt``, read with ``weights_only=True``;
the raw weights ``module.<name>`` or an EMA copy, ``state_key``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gen.ema import phema_name
from gen.utils.ckpt import (
    CheckpointError,
    file_sha256,
    load_snapshot,
    load_snapshot_config,
    load_training_state,
    save_snapshot,
)
from gen.utils.finite import NonFiniteError, non_finite_tensors, shorten

__all__ = ["combine", "CheckpointSet", "read_weights", "snapshot_metadata", "averaged_keys", "buffer_names",
           "StoredAverage", "phema_snapshots"]


def buffer_names(reference: str | os.PathLike) -> list[str]:
    """Names of the module buffers a snapshot stores (built with the checks of ``gen.snapshot``): copied, not averaged."""
    from gen.snapshot import load_network

    net, _ = load_network(reference)
    stored = net.state_dict()
    return sorted(name for name, _ in net.named_buffers() if name in stored)


def snapshot_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a snapshot without reading its tensors (cheap: for listing a run's snapshots)."""
    return load_snapshot_config(path)


def read_weights(path: str | os.PathLike, state_key: str = "module.net") -> dict[str, Tensor]:
    """The tensors of one source: a snapshot's, or ``registry[state_key]`` of a training state (``.pt``)."""
    path = Path(path)
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"training state {path} does not exist")
        registry = load_training_state(path).get("registry")
        if not isinstance(registry, Mapping) or not isinstance(registry.get(state_key), Mapping):
            have = sorted(registry) if isinstance(registry, Mapping) else []
            raise CheckpointError(f"training state {path} holds no '{state_key}' (it holds {have}); give "
                                  "--state-key module.<name> or ema.<name> of a module it saved")
        sd = registry[state_key]
        if any(not isinstance(v, Tensor) for v in sd.values()) or all(k.startswith("copies.") for k in sd):
            # An EMA holds one copy per profile; its averages are in the run's snapshots.
            raise CheckpointError(f"training state {path}: '{state_key}' is not one module's weights (an EMA holds a "
                                  "copy per profile); give module.<name> for raw weights, or combine the snapshots")
        return dict(sd)
    return load_snapshot(path)[0]


def averaged_keys(tensors: Mapping[str, Tensor], buffers: Sequence[str] = ()) -> list[str]:
    """Keys that are averaged: floating-point tensors that are not in ``buffers`` (buffers come from the reference)."""
    skip = set(buffers)
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and k not in skip)


def _check_same_model(ref: Mapping[str, Tensor], got: Mapping[str, Tensor], path: Path, ref_path: Path) -> None:
    missing, extra = sorted(set(ref) - set(got)), sorted(set(got) - set(ref))
    shapes = [k for k in sorted(set(ref) & set(got)) if tuple(ref[k].shape) != tuple(got[k].shape)]
    if missing or extra or shapes:
        what = (f"lacks {shorten(missing)}" if missing else f"has extra tensors {shorten(extra)}" if extra else
                f"has other shapes ({shapes[0]}: {tuple(got[shapes[0]].shape)} vs {tuple(ref[shapes[0]].shape)})")
        raise CheckpointError(f"{path} is a checkpoint of another model than the reference {ref_path}: it {what}; "
                              "combine only checkpoints of one run (one model and preset)")


def _check_coefficients(coefficients: Sequence[float], paths: Sequence[Path]) -> list[float]:
    if len(coefficients) != len(paths) or not paths:
        raise ValueError(f"combine: {len(coefficients)} coefficients for {len(paths)} checkpoints; give one "
                         "coefficient per checkpoint (at least one)")
    out = [float(a) for a in coefficients]
    for a, p in zip(out, paths):
        if not math.isfinite(a):
            raise ValueError(f"combine: the coefficient of {p} is {a}; coefficients must be finite numbers")
    return out


class CheckpointSet:
    """n checkpoints of one model, each checked against a reference snapshot (same tensors and shapes, finite).

    Streamed (the default) a combination reads the sources one file at a time: memory of two models, not n. Held
    (``in_memory=True``) each source is read and checked once and its averaged tensors kept (n models of memory):
    for many combinations of the same sources (LCSC's ~100 fitness evaluations), where reading n training states per
    combination would cost more than the combination. Both give the same tensors, bit for bit (one code path).
    """

    def __init__(self, sources: Sequence[str | os.PathLike], reference: str | os.PathLike,
                 state_key: str = "module.net", buffers: Sequence[str] = (), in_memory: bool = False) -> None:
        self.paths = [Path(s) for s in sources]
        if not self.paths:
            raise ValueError("combine: no checkpoints given; give at least one")
        self.reference = Path(reference)
        self.state_key = state_key
        self.ref_tensors, self.ref_config = load_snapshot(self.reference)
        self.keys = averaged_keys(self.ref_tensors, buffers)
        self._held: list[tuple[dict[str, Tensor], str]] | None = None
        if in_memory:
            self.hold()

    @property
    def nbytes(self) -> int:
        """Bytes of one source's averaged tensors (in the reference's dtypes): what holding costs per source."""
        return sum(self.ref_tensors[k].numel() * self.ref_tensors[k].element_size() for k in self.keys)

    def hold(self) -> None:
        """Read and check every source now and keep its averaged tensors: later combinations read no file."""
        if self._held is None:
            self._held = [self._read(p) for p in self.paths]

    def digests(self) -> list[str]:
        """The SHA-256 of every source, in order (held: those taken when read)."""
        return [sha for _, sha in self._held] if self._held is not None else [file_sha256(p) for p in self.paths]

    def _read(self, path: Path) -> tuple[dict[str, Tensor], str]:
        """The averaged tensors of one source, checked, and the file's SHA-256."""
        weights = read_weights(path, self.state_key)
        _check_same_model(self.ref_tensors, weights, path, self.reference)
        kept = {k: weights[k] for k in self.keys}
        bad = non_finite_tensors(kept)
        if bad:
            raise NonFiniteError(f"{path} holds non-finite weights ({shorten(bad)}); leave it out of the combination")
        return kept, file_sha256(path)

    def _sources(self) -> Iterator[tuple[Path, dict[str, Tensor], str]]:
        if self._held is not None:
            yield from ((p, w, sha) for p, (w, sha) in zip(self.paths, self._held))
        else:
            for p in self.paths:
                yield p, *self._read(p)

    @torch.no_grad()
    def combine(self, coefficients: Sequence[float], out: str | os.PathLike | None = None,
                averaging: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
        """``sum_i coefficients[i] * weights_i`` in float64, cast to the reference's dtypes (see :func:`combine`)."""
        alphas = _check_coefficients(coefficients, self.paths)
        acc = {k: torch.zeros(self.ref_tensors[k].shape, dtype=torch.float64) for k in self.keys}
        records = []
        for alpha, (path, weights, sha) in zip(alphas, self._sources()):
            for k in self.keys:
                acc[k].add_(weights[k].to(torch.float64), alpha=alpha)
            records.append({"name": path.name, "sha256": sha, "coefficient": alpha})
            del weights  # streamed: one source in memory at a time
        result = {k: acc.pop(k).to(v.dtype) if k in self.keys else v for k, v in list(self.ref_tensors.items())}
        bad = non_finite_tensors({k: result[k] for k in self.keys})
        if bad:
            raise NonFiniteError(f"the combination of {len(self.paths)} checkpoints has non-finite weights "
                                 f"({shorten(bad)}); the coefficients are too large for float32. Bound them (smaller "
                                 "--max-norm)")
        if out is not None:
            meta = {k: v for k, v in self.ref_config.items() if k not in ("ema", "ema_spec", "averaging")}
            meta["ema"] = str((averaging or {}).get("name", "combined"))
            meta["averaging"] = {**dict(averaging or {}), "sources": records, "state_key": self.state_key,
                                 "reference": {"name": self.reference.name, "sha256": file_sha256(self.reference)}}
            save_snapshot(out, result, meta)
        return result


def combine(
    sources: Sequence[str | os.PathLike],
    coefficients: Sequence[float],
    reference: str | os.PathLike,
    out: str | os.PathLike | None,
    averaging: Mapping[str, Any] | None = None,
    state_key: str = "module.net",
    buffers: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Write ``sum_i coefficients[i] * weights(sources[i])`` as a snapshot (atomically) and return its tensors.

    Args:
        sources: n snapshots or training states of one model; read one at a time.
        coefficients: n finite numbers (not required to sum to 1; the callers normalise).
        reference: a snapshot of the same model: its metadata, dtypes and buffers go into the result.
        out: the snapshot to write; None only returns the tensors (a fitness evaluation in memory).
        averaging: what produced the coefficients (method, its settings), stored in the metadata.
        state_key: which weights of a training state (``module.net``, the raw weights; an EMA is refused).
        buffers: tensor names copied from the reference instead of averaged (module buffers).

    Returns:
        name -> tensor in the reference's dtypes.

    Raises:
        CheckpointError (a ValueError) naming the file: another model or shapes. ValueError: a non-finite or
        missing coefficient. NonFiniteError: a source or the result holds NaN/inf.
    """
    paths = [Path(s) for s in sources]
    _check_coefficients(coefficients, paths)  # before any file is read
    return CheckpointSet(paths, reference, state_key, buffers).combine(coefficients, out, averaging)


@dataclass(frozen=True)
class StoredAverage:
    """One power-function EMA snapshot of a run: file, images and optimizer steps when written, width."""

    path: Path
    nimg: int
    step: int
    sigma_rel: float


# The names PowerFunctionEMA's snapshots take (gen.train.loop): the first width's plain name, the others' -phema<w>.
_PHEMA_NAME = re.compile(r"^snapshot-\d+(-phema[0-9.e+-]+)?\.safetensors$")


def phema_snapshots(run_dir: str | os.PathLike) -> list[StoredAverage]:
    """Every snapshot of ``run_dir`` written by a :class:`gen.ema.PowerFunctionEMA`, sorted by (step, sigma_rel).

    Only the metadata is read; the width comes from the profile name (``ema``) and the averaging spec (``ema_spec``).
    """
    found, foreign = [], []
    for path in sorted(Path(run_dir).glob("snapshot-*.safetensors")):
        meta = snapshot_metadata(path)
        spec = meta.get("ema_spec")
        if not isinstance(spec, Mapping) or spec.get("_target_") != "gen.ema.PowerFunctionEMA":
            # Named as a power-function profile's snapshot (the first width's plain name, or -phema<w>) but not one:
            # skipping it would silently fit the profiles to fewer snapshots than the run stored.
            if _PHEMA_NAME.match(path.name):
                foreign.append((path, meta))
            continue
        widths = {phema_name(float(s)): float(s) for s in spec.get("sigma_rels", [])}
        name, nimg, step = meta.get("ema"), meta.get("nimg"), meta.get("step")
        if name not in widths or not isinstance(nimg, int) or not isinstance(step, int) or step < 1:
            raise CheckpointError(f"{path}: its metadata (ema={name!r}, nimg={nimg!r}, step={step!r}) does not "
                                  "describe a power-function EMA snapshot; the file is damaged or edited")
        found.append(StoredAverage(path, nimg, step, widths[name]))
    if found and foreign:
        path, meta = foreign[0]
        what = "a tokenizer snapshot" if meta.get("kind") == "tokenizer" else \
            f"averaged by {(meta.get('ema_spec') or {}).get('_target_', 'no recorded EMA')}"
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise CheckpointError(f"{path}{more} lies among the run's power-function EMA snapshots but is not one ({what}); "
                              "it is not this run's file. Move it out of the run folder")
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))
