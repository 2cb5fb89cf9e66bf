"""Converters from published checkpoints (DiT, SiT, REPA, REG, LightningDiT, DDT) to our backbones and snapshots.

Each source's official module computes the same function as one of our backbones with a given config; what
differs is the file: its key names, a few tensor layouts, the parts only training needs, and the time and
prediction convention. This module maps the file (keys and shapes), drops the training-only parts (listed),
infers the size from the shapes, and gives the model spec and the prediction spec (with the time adapter of
``gen/models/adapters.py``) that a snapshot stores. Reading files is safe: safetensors, or ``torch.load`` with
``weights_only=True`` (``argparse.Namespace``, which the official training scripts store as ``args``, is the one
extra type allowed; it only holds plain values). A pickle that would import anything else is refused.

Sources and their official code (layouts read from these files; no code is taken from them):

========== ====================================================== ==================================================
source     official code                                          file layout -> ours
========== ====================================================== ==================================================
dit        facebookresearch/DiT models.py                         unchanged; DDPM epsilon, 1000 steps, learned sigma
sit        willisma/SiT models.py                                 unchanged; velocity, data at t=1, learned sigma
repa       sihyun-yu/REPA models/sit.py, loss.py                  ``projectors.*`` dropped; velocity, data at t=0
reg        Martinser/REG models/sit.py, loss.py                   ``projectors.*`` dropped; class token: pos_embed row
                                                                  0 (zeros) dropped, ``cls_projectors2`` ->
                                                                  ``extra_embed``, ``wg_norm`` -> ``extra_norm``,
                                                                  ``final_layer.linear_cls`` -> ``extra_head``
lightningdit hustvl/LightningDiT models/lightningdit.py           ``feat_rope.freqs_{cos,sin}`` checked equal to ours,
                                                                  then dropped; velocity, data at t=1
ddt        MCG-NJU/DDT src/models/denoiser/decoupled_improved_dit.py ``ema_denoiser.`` prefix, ``*_embedder.proj`` ->
                                                                  ``*_embedder``, SwiGLU ``w1, w3, w2`` ->
                                                                  ``w12 = [w1; w3]``, ``w3 = w2``; data at t=1
========== ====================================================== ==================================================

REPA and REG train with ``x_t = (1 - t) x0 + t eps`` and the target ``eps - x0`` (their loss.py ``interpolant``)
and sample from t = 1 to 0 (samplers.py): our convention already, so they need no adapter. SiT, LightningDiT and
DDT put data at t = 1 (``FlippedTimeVelocity``); DiT is a 1000-step DDPM epsilon model (``DDPMEpsilon``). Every
source feeds t unscaled to the sinusoid (``time_scale=1``): DiT its integer step, the others t in [0, 1].
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from gen.models.adapters import ddpm_alphas_cumprod
from gen.nn import rope_2d_axial
from gen.utils.ckpt import unreadable_reason

Source = Literal["dit", "sit", "repa", "reg", "lightningdit", "ddt"]
SOURCES: tuple[str, ...] = ("dit", "sit", "repa", "reg", "lightningdit", "ddt")
NAMES = {"dit": "DiT", "sit": "SiT", "repa": "REPA (SiT)", "reg": "REG (SiT)", "lightningdit": "LightningDiT",
         "ddt": "DDT"}

# Published sizes: name -> (hidden, depth, heads[, encoder blocks]). DiT paper Table 1 (SiT/REPA/REG reuse it);
# LightningDiT models/lightningdit.py; DDT configs/repa_improved_ddt_xlen22de6_256.yaml and the DDT paper.
DIT_SIZES: dict[str, tuple[int, ...]] = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
LIGHTNINGDIT_SIZES: dict[str, tuple[int, ...]] = {
    "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16), "1p0B": (1536, 24, 24), "1p6B": (1792, 28, 28),
}
DDT_SIZES: dict[str, tuple[int, ...]] = {"B": (768, 12, 12, 8), "L": (1024, 24, 16, 20), "XL": (1152, 28, 16, 22)}


class ConvertError(ValueError):
    """A checkpoint cannot be converted; the message names the file and what to do."""


# ----------------------------------------------------------------------------------------------
# Reading files safely.


def read_checkpoint(path: str | Path) -> Any:
    """The object stored in a checkpoint file, read without running code.

    safetensors files give their tensors; anything else goes through ``torch.load(weights_only=True)`` with
    ``argparse.Namespace`` allowed (the ``args`` entry of the official training checkpoints).

    Raises:
        ConvertError: a missing, truncated or unknown file, or a pickle that would import other objects.
    """
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"checkpoint {path} does not exist; give the downloaded .pt/.pth/.ckpt/.safetensors file")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for damaged headers and short files
            raise ConvertError(f"{path} is not a readable safetensors file ({_first_line(e)}); it is truncated or "
                               "damaged: download it again") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg or "GLOBAL" in msg or "not an allowed global" in msg:
            found = re.search(r"GLOBAL ([\w.]+)", msg)
            what = f" ({found.group(1)})" if found else ""
            raise ConvertError(
                f"{path} is a pickle that would import and run Python objects{what}; refusing to load it (torch.load "
                "weights_only=True). If you trust it, re-save its state dict as safetensors and convert that file"
            ) from e
        raise _not_a_checkpoint(path, head, e) from e
    except Exception as e:  # the unpickler and the zip reader raise many types for damaged or foreign bytes
        raise _not_a_checkpoint(path, head, e) from e


def _not_a_checkpoint(path: Path, head: bytes, e: BaseException) -> ConvertError:
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a zip (torch.save) or a pickle that ends too early
        return ConvertError(f"{path} cannot be read as a PyTorch checkpoint ({_first_line(e)}); it is truncated or "
                            "damaged: download it again")
    return ConvertError(f"{path} is not a PyTorch or safetensors checkpoint ({_first_line(e)}); it is damaged or "
                        "another format")


def _first_line(e: BaseException) -> str:
    return unreadable_reason(e)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def _count(obj: Any) -> str:
    if _is_state_dict(obj):
        return f"{len(obj)} tensors"
    if isinstance(obj, Mapping):
        return f"{len(obj)} entries"
    return type(obj).__name__


def select_weights(obj: Any, source: str, path: str | Path) -> tuple[dict[str, Tensor], list[str]]:
    """The inference weights (the EMA where the file holds one) and a list of what is left out.

    Containers: a plain state dict (published DiT/SiT/REPA/LightningDiT weights); ``{"model", "ema", "opt", "args",
    ...}`` (their train.py checkpoints: ``ema`` is used); DDT's Lightning checkpoint ``{"state_dict":
    {"denoiser.*", "ema_denoiser.*", "diffusion_trainer.*"}, ...}`` (``ema_denoiser.`` is used).
    """
    dropped: list[str] = []
    if source == "ddt":
        inner = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
        if isinstance(obj, Mapping) and inner is not obj:
            dropped += [f"{k} ({_count(v)}, training state)" for k, v in obj.items() if k != "state_dict"]
        if _is_state_dict(inner):
            for prefix in ("ema_denoiser.", "denoiser."):
                picked = {k[len(prefix):]: v for k, v in inner.items() if k.startswith(prefix)}
                if picked:
                    groups: dict[str, int] = {}
                    for k in inner:
                        if not k.startswith(prefix):
                            groups[k.split(".")[0] + "."] = groups.get(k.split(".")[0] + ".", 0) + 1
                    dropped += [f"{g}* ({n} tensors{', non-EMA weights' if g == 'denoiser.' else ''})"
                                for g, n in groups.items()]
                    return picked, dropped
            return dict(inner), dropped
    elif isinstance(obj, Mapping) and not _is_state_dict(obj):
        for key in ("ema", "model", "state_dict"):
            if _is_state_dict(obj.get(key)):
                notes = {"model": "non-EMA weights", "opt": "optimizer state", "args": "training arguments"}
                dropped += [f"{k} ({_count(v)}{', ' + notes[k] if k in notes else ''})" for k, v in obj.items() if k != key]
                return dict(obj[key]), dropped
    if _is_state_dict(obj):
        return dict(obj), dropped
    raise ConvertError(
        f"{path} holds no state dict of tensors ({type(obj).__name__}"
        f"{' with keys ' + ', '.join(map(str, list(obj)[:6])) if isinstance(obj, Mapping) else ''}); is it a "
        f"{NAMES[source]} checkpoint?"
    )


# ----------------------------------------------------------------------------------------------
# Key maps.


def looks_like(state: Mapping[str, Tensor]) -> str:
    """A guess of which source's layout ``state`` has (for error messages)."""
    keys = set(state)
    if any(k.startswith(("ema_denoiser.", "denoiser.")) for k in keys) or any(k.startswith("s_embedder.") for k in keys):
        return "ddt"
    if "cls_projectors2.weight" in keys:
        return "reg"
    if any(k.startswith("projectors.") for k in keys):
        return "repa"
    if any(k.startswith("feat_rope.") or ".mlp.w12." in k for k in keys):
        return "lightningdit"
    if "x_embedder.proj.weight" in keys and "pos_embed" in keys:
        return "dit or sit"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "an autoencoder (vavae?)"
    return "unknown"


def _block_count(state: Mapping[str, Tensor]) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not idx:
        return 0
    if idx != set(range(max(idx) + 1)):
        raise ConvertError(f"blocks {sorted(set(range(max(idx) + 1)) - idx)} are missing from the file")
    return max(idx) + 1


@dataclass
class Converted:
    """Result of :func:`convert_state`: our tensors, the specs for the snapshot and a report."""

    tensors: dict[str, Tensor]
    model: dict[str, Any]
    prediction: dict[str, Any]
    preset: str
    dropped: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


def _require(state: Mapping[str, Tensor], keys: list[str], source: str, path: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise ConvertError(
            f"{path} is not a {NAMES[source]} checkpoint: it lacks {', '.join(missing[:4])}; its layout looks like "
            f"{looks_like(state)}. Pick the matching --from"
        )


def _forbid(state: Mapping[str, Tensor], prefixes: tuple[str, ...], source: str, path: str) -> None:
    bad = sorted({k.split(".")[0] for k in state if k.startswith(prefixes) or any(f".{p}" in k for p in prefixes)})
    if bad:
        raise ConvertError(
            f"{path} is not a {NAMES[source]} checkpoint: it holds {', '.join(bad)} keys of another model; its layout "
            f"looks like {looks_like(state)}. Pick the matching --from"
        )


def _size(
    table: Mapping[str, tuple[int, ...]], family: str, hidden: int, depth: int, patch: int,
    num_heads: int | None, encoder_blocks: int | None, expect: str | None, path: str,
) -> tuple[str, int, int | None]:
    """(preset name, heads, encoder blocks) for a checkpoint's width and depth."""
    found = [(n, v) for n, v in table.items() if v[0] == hidden and v[1] == depth]
    if found:
        name, v = found[0]
        preset, heads, enc = f"{family}-{name}/{patch}", v[2], (v[3] if len(v) > 3 else None)
        if num_heads is not None and num_heads != heads:
            raise ConvertError(f"{path}: {preset} has {heads} heads; --num-heads {num_heads} contradicts it")
        enc = encoder_blocks if encoder_blocks is not None else enc
    else:
        if num_heads is None or (family == "DDT" and encoder_blocks is None):
            need = "--num-heads" + (" and --encoder-blocks" if family == "DDT" else "")
            raise ConvertError(
                f"{path}: width {hidden} and depth {depth} match no published {family} size "
                f"({', '.join(f'{n}: {v[0]}x{v[1]}' for n, v in table.items())}); give {need} for a custom size"
            )
        preset, heads, enc = f"{family}-custom(D{hidden},L{depth})/{patch}", num_heads, encoder_blocks
    if hidden % heads:
        raise ConvertError(f"{path}: width {hidden} is not divisible by {heads} heads")
    if expect is not None and expect not in (preset, preset.split("/")[0].split("-", 1)[1]):
        raise ConvertError(f"{path} holds a {preset} checkpoint (width {hidden}, depth {depth}, patch {patch}), not the "
                           f"{expect} that --size asks for")
    return preset, heads, enc


def _dit_family(
    state: dict[str, Tensor], source: str, path: str, num_heads: int | None, expect: str | None,
) -> tuple[dict[str, Tensor], dict[str, Any], str, list[str], list[str]]:
    """DiT / SiT / REPA / REG / LightningDiT share the DiT key layout; returns (tensors, model kwargs, preset, dropped, checked)."""
    _require(state, ["x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight",
                     "final_layer.linear.weight", "blocks.0.attn.qkv.weight"], source, path)
    _forbid(state, ("s_embedder.", "ema_denoiser.", "denoiser."), source, path)
    if source != "reg":
        _forbid(state, ("cls_projectors2.", "wg_norm."), source, path)
    if source not in ("repa", "reg"):
        _forbid(state, ("projectors.",), source, path)
    swiglu = "blocks.0.mlp.w12.weight" in state
    rms = "blocks.0.norm1.weight" in state
    if source != "lightningdit" and (swiglu or rms or any(k.startswith("feat_rope.") for k in state)):
        raise ConvertError(f"{path} is not a {NAMES[source]} checkpoint: it has RMSNorm/SwiGLU/RoPE parts of a "
                           "LightningDiT; use --from lightningdit")
    out = dict(state)
    dropped = [f"{k} {tuple(v.shape)}" for k, v in state.items() if k.startswith("projectors.")]
    checked: list[str] = []
    out = {k: v for k, v in out.items() if not k.startswith("projectors.")}
    w = state["x_embedder.proj.weight"]  # (D, C, p, p)
    hidden, in_ch, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = _block_count(state)
    n_tok = int(state["pos_embed"].shape[1])
    extra_dim = 0
    if source == "reg":
        _require(state, ["cls_projectors2.weight", "wg_norm.weight", "final_layer.linear_cls.weight"], source, path)
        row0 = state["pos_embed"][:, :1]
        if bool(row0.abs().max() > 0):
            raise ConvertError(f"{path}: pos_embed row 0 (the class token's position) is not zero; not a REG checkpoint")
        out["pos_embed"] = state["pos_embed"][:, 1:]
        n_tok -= 1
        for ours, theirs in (("extra_embed", "cls_projectors2"), ("extra_norm", "wg_norm"),
                             ("extra_head", "final_layer.linear_cls")):
            for p in ("weight", "bias"):
                out[f"{ours}.{p}"] = out.pop(f"{theirs}.{p}")
        extra_dim = int(state["cls_projectors2.weight"].shape[1])
        checked.append("pos_embed row 0 (class token position) is zero; dropped")
    grid = math.isqrt(n_tok)
    if grid * grid != n_tok:
        raise ConvertError(f"{path}: pos_embed has {n_tok} positions, not a square grid")
    out_dim = int(state["final_layer.linear.weight"].shape[0])
    out_ch = out_dim // (patch * patch)
    if out_ch not in (in_ch, 2 * in_ch):
        raise ConvertError(f"{path}: the output layer gives {out_ch} channels per pixel for {in_ch} input channels")
    table, family = (LIGHTNINGDIT_SIZES, "LightningDiT") if source == "lightningdit" else (DIT_SIZES, {
        "dit": "DiT", "sit": "SiT", "repa": "SiT", "reg": "SiT"}[source])
    preset, heads, _ = _size(table, family, hidden, depth, patch, num_heads, None, expect, path)
    mod_out = int(state["blocks.0.adaLN_modulation.1.weight"].shape[0])
    kwargs: dict[str, Any] = {
        "input_size": grid * patch, "patch_size": patch, "in_channels": in_ch, "hidden_size": hidden, "depth": depth,
        "num_heads": heads, "mlp_ratio": 4.0,
        "num_classes": int(state["y_embedder.embedding_table.weight"].shape[0]) - 1,
        "learn_sigma": out_ch == 2 * in_ch, "norm": "rms" if rms else "layer", "ffn": "swiglu" if swiglu else "gelu",
        "rope": None, "qk_norm": "blocks.0.attn.q_norm.weight" in state, "wo_shift": mod_out == 4 * hidden,
        "time_scale": 1.0, "max_period": 10000.0, "extra_token_dim": extra_dim,
    }
    if kwargs["qk_norm"] and not rms:
        # timm's qk LayerNorm (eps 1e-5) in a LayerNorm model: not one of our block options.
        raise ConvertError(f"{path}: qk-norm with LayerNorm blocks (timm Attention qk_norm=True) is not supported; "
                           "only LightningDiT's RMS qk-norm is")
    if source == "lightningdit" and "feat_rope.freqs_cos" in state:
        kwargs["rope"] = "axial"
        cos, sin = rope_2d_axial(hidden // heads, grid, grid, 10000.0)
        for name, ours in (("freqs_cos", cos), ("freqs_sin", sin)):
            theirs = out.pop(f"feat_rope.{name}")
            if tuple(theirs.shape) != tuple(ours.shape) or not torch.allclose(theirs.float(), ours.float(), atol=1e-5):
                raise ConvertError(
                    f"{path}: feat_rope.{name} {tuple(theirs.shape)} differs from this toolkit's 2D RoPE table "
                    f"{tuple(ours.shape)} (theta 10000, {grid}x{grid} grid); the checkpoint uses another RoPE"
                )
            dropped.append(f"feat_rope.{name} {tuple(theirs.shape)} (equal to our RoPE table, which is recomputed)")
        checked.append("feat_rope tables equal this toolkit's axial 2D RoPE (theta 10000) within 1e-5")
    return out, kwargs, preset, dropped, checked


def _ddt(
    state: dict[str, Tensor], path: str, num_heads: int | None, encoder_blocks: int | None, input_size: int | None,
    expect: str | None,
) -> tuple[dict[str, Tensor], dict[str, Any], str, list[str], list[str]]:
    _require(state, ["x_embedder.proj.weight", "s_embedder.proj.weight", "y_embedder.embedding_table.weight",
                     "final_layer.linear.weight", "blocks.0.mlp.w1.weight", "blocks.0.mlp.w2.weight",
                     "blocks.0.mlp.w3.weight"], "ddt", path)
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        m = re.match(r"(blocks\.\d+\.mlp\.)(w[123])\.weight$", k)
        if m:
            continue
        out[k.replace("x_embedder.proj.", "x_embedder.").replace("s_embedder.proj.", "s_embedder.")] = v
    depth = _block_count(state)
    for i in range(depth):
        p = f"blocks.{i}.mlp."
        # Official FFN: w2(silu(w1 x) * w3 x); ours: w3(silu(a) * b) with [a; b] = w12 x.
        out[p + "w12.weight"] = torch.cat([state[p + "w1.weight"], state[p + "w3.weight"]], 0)
        out[p + "w3.weight"] = state[p + "w2.weight"]
    hidden, patch_dim = (int(d) for d in state["x_embedder.proj.weight"].shape)
    out_dim = int(state["final_layer.linear.weight"].shape[0])
    if out_dim != patch_dim:
        raise ConvertError(f"{path}: DDT output width {out_dim} differs from its patch width {patch_dim}")
    # patch_dim = C p^2 does not say C and p apart: DDT's published models use p = 2 (all configs).
    patch = 2
    in_ch = patch_dim // (patch * patch)
    preset, heads, enc = _size(DDT_SIZES, "DDT", hidden, depth, patch, num_heads, encoder_blocks, expect, path)
    assert enc is not None
    if input_size is None:
        raise ConvertError(f"{path}: DDT checkpoints do not record the latent size; give --resolution")
    kwargs = {
        "input_size": input_size, "patch_size": patch, "in_channels": in_ch, "hidden_size": hidden, "depth": depth,
        "num_encoder_blocks": enc, "num_heads": heads, "mlp_ratio": 4.0,
        "num_classes": int(state["y_embedder.embedding_table.weight"].shape[0]) - 1,
        "rope_theta": 10000.0, "rope_extent": 16.0, "time_scale": 1.0, "max_period": 10.0, "extra_token_dim": 0,
    }
    checked = ["SwiGLU w1/w3/w2 -> w12 = [w1; w3], w3 = w2", "x_embedder.proj / s_embedder.proj -> x_embedder / s_embedder"]
    return out, kwargs, preset, [], checked


def prediction_spec(source: str, in_channels: int, learn_sigma: bool) -> dict[str, Any]:
    """The snapshot's prediction spec, with the time adapter as its ``precond`` (built around the bare network)."""
    linear = {"_target_": "gen.paths.LinearPath"}
    if source == "dit":
        abar = ddpm_alphas_cumprod(1000)
        sigma_max = float(torch.sqrt((1 - abar[-1]) / abar[-1]))
        path = {"_target_": "gen.paths.EDMPath", "sigma_max": sigma_max}
        return {"path": path, "prediction": "eps", "precond": {
            "_target_": "gen.models.adapters.DDPMEpsilon", "path": path, "num_steps": 1000, "beta_start": 1e-4,
            "beta_end": 0.02, "out_channels": in_channels if learn_sigma else None, "output": "eps"}}
    if source in ("repa", "reg"):
        return {"path": linear, "prediction": "velocity", "precond": None}
    return {"path": linear, "prediction": "velocity", "precond": {
        "_target_": "gen.models.adapters.FlippedTimeVelocity", "out_channels": in_channels if learn_sigma else None}}


def convert_state(
    source: str,
    state: Mapping[str, Tensor],
    path: str | Path = "checkpoint",
    *,
    num_heads: int | None = None,
    encoder_blocks: int | None = None,
    input_size: int | None = None,
    expect_size: str | None = None,
) -> Converted:
    """Map a source's state dict to our backbone: tensors, model spec, prediction spec, preset and report.

    Args:
        source: one of ``SOURCES``.
        state: the inference weights (see :func:`select_weights`).
        path: the file, for messages.
        num_heads, encoder_blocks: for sizes that are not published (the file's shapes do not hold them).
        input_size: the latent size (DDT files do not record it; the DiT family's ``pos_embed`` does).
        expect_size: refuse a file of another size (``"XL"``, or a preset name such as ``"DiT-XL/2"``).

    Raises:
        ConvertError: a file of another architecture or size, or a tensor that does not fit.
    """
    if source not in SOURCES:
        raise ConvertError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)} (or vavae)")
    path = str(path)
    state = {k: v for k, v in state.items()}
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ConvertError(f"{path}: entries {bad[:4]} are not tensors")
    if source == "ddt":
        _forbid(state, ("pos_embed", "cls_projectors2.", "projectors."), source, path)
        tensors, kwargs, preset, dropped, checked = _ddt(state, path, num_heads, encoder_blocks, input_size, expect_size)
        target = "gen.models.ddt.DDT"
        learn_sigma = False
    else:
        tensors, kwargs, preset, dropped, checked = _dit_family(state, source, path, num_heads, expect_size)
        if input_size is not None and input_size != kwargs["input_size"]:
            raise ConvertError(f"{path}: its position table is for {kwargs['input_size']}x{kwargs['input_size']} "
                               f"latents, not {input_size}x{input_size} (--resolution / tokenizer)")
        target = "gen.models.dit.DiT"
        learn_sigma = bool(kwargs["learn_sigma"])
    model = {"_target_": target, **kwargs, "compile": False}
    _check_fits(model, tensors, path)
    return Converted(tensors, model, prediction_spec(source, int(kwargs["in_channels"]), learn_sigma), preset,
                     dropped, checked)


def _check_fits(model: Mapping[str, Any], tensors: Mapping[str, Tensor], path: str) -> None:
    """Every mapped tensor must be a parameter of the model with its shape, and every parameter must be mapped."""
    from gen.utils.build import build
    from gen.utils.ckpt import load_state_dict_checked

    with torch.device("meta"):
        net = build(dict(model))
    try:
        load_state_dict_checked(net, {k: v.to("meta") for k, v in tensors.items()}, path, assign=True)
    except ValueError as e:
        raise ConvertError(f"{path}: the mapped weights do not fit {model['_target_']}:\n{e}") from e
