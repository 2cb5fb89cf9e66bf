"""Export a DiT snapshot as a diffusers ``DiTPipeline`` folder (transformer, scheduler, VAE).

    python -m scripts.export_diffusers --snapshot in256_dit_xl2.safetensors --out dit_xl2_diffusers \\
        --vae /models/sd-vae-ft-ema
    # then, in Python:  DiTPipeline.from_pretrained("dit_xl2_diffusers")(class_labels=[207], num_inference_steps=50)

The folder holds ``transformer/`` (``DiTTransformer2DModel``), ``scheduler/`` and ``vae/`` plus ``model_index.json``,
so ``DiTPipeline.from_pretrained(folder)`` loads it (``--vae`` copies a local diffusers ``AutoencoderKL`` folder;
without it the folder has no VAE and is loaded with ``from_pretrained(folder, vae=AutoencoderKL.from_pretrained(...))``,
e.g. ``stabilityai/sd-vae-ft-ema``).

What diffusers can represent: a DDPM epsilon DiT (``scripts.convert --from dit``: ``DDPMEpsilon`` adapter, integer
steps, learned sigma), written with a ``DDIMScheduler`` of DiT's linear betas (1e-4 .. 0.02, 1000 steps).

Refused, with the reason: LightningDiT (RMSNorm, SwiGLU, RoPE, qk-norm, adaLN without shift), DDT (separate encoder
and decoder embedders, per-token conditioning), REG's extra token, other time conventions (SiT's data at t = 1, EDM
preconditioning), rectified-flow DiTs trained here (the network would fit diffusers' flow-matching scheduler, but
``DiTPipeline`` calls ``scheduler.scale_model_input``, which ``FlowMatchEulerDiscreteScheduler`` lacks) and
tokenizers with per-channel latent statistics (DiTPipeline divides by one scaling factor).

One known difference remains: diffusers' DiT computes its timestep sinusoid with frequencies ``10000^(-i / 127)``
(``Timesteps(downscale_freq_shift=1)`` in diffusers models/embeddings.py ``CombinedTimestepLabelEmbeddings``), the
official DiT and this toolkit with ``10000^(-i / 128)``; the weights map one to one, but diffusers' module evaluates
a slightly different time embedding for t > 0 (the facebook/DiT-XL-2-256 hub weights carry the same difference).
At t = 0 the two are equal, and with the same frequencies the outputs agree to float precision (tests).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from gen.models.adapters import ddpm_alphas_cumprod
from gen.snapshot import read_snapshot
from gen.utils.ckpt import atomic_write, build_from_snapshot
from gen.utils.cli import run_main

PROG = "python -m scripts.export_diffusers"


class ExportError(ValueError):
    """The snapshot cannot be written as a diffusers DiT; the message says why."""


def check_representable(config: dict[str, Any], path: str) -> str:
    """The scheduler kind (``"ddpm"``) for a snapshot diffusers can represent, else ExportError."""
    model = config.get("model") or {}
    target = model.get("_target_")
    if target == "gen.models.ddt.DDT":
        raise ExportError(f"{path} is a DDT: diffusers has no DDT transformer (separate condition encoder and velocity "
                          "decoder, per-token conditioning); it cannot be exported")
    if target != "gen.models.dit.DiT":
        raise ExportError(f"{path}: model {target} is not a DiT; only DiT snapshots export to DiTTransformer2DModel")
    lightning = [f"{k}={model.get(k)!r}" for k, ok in (
        ("norm", "layer"), ("ffn", "gelu"), ("rope", None), ("qk_norm", False), ("wo_shift", False)) if model.get(k, ok) != ok]
    if lightning:
        raise ExportError(f"{path} is a LightningDiT-style model ({', '.join(lightning)}): diffusers' "
                          "DiTTransformer2DModel has LayerNorm, a GELU MLP, no RoPE, no qk-norm and six-vector adaLN; "
                          "it cannot represent it")
    if int(model.get("extra_token_dim") or 0) > 0:
        raise ExportError(f"{path} has REG's extra token, which DiTTransformer2DModel cannot take")
    if float(model.get("mlp_ratio", 4.0)) != 4.0 or float(model.get("max_period", 1e4)) != 1e4:
        raise ExportError(f"{path}: mlp_ratio {model.get('mlp_ratio')} / max_period {model.get('max_period')} differ "
                          "from diffusers' DiT (4, 10000)")
    pred = config.get("prediction") or {}
    precond = pred.get("precond") or {}
    if precond.get("_target_") == "gen.models.adapters.DDPMEpsilon":
        if (precond.get("num_steps"), precond.get("beta_start"), precond.get("beta_end")) != (1000, 1e-4, 0.02) or \
                float(model.get("time_scale", 0)) != 1.0:
            raise ExportError(f"{path}: only DiT's DDPM schedule (1000 steps, betas 1e-4..0.02, integer steps) exports")
        return "ddpm"
    if not precond and pred.get("prediction") == "velocity" and (pred.get("path") or {}).get("_target_") == \
            "gen.paths.LinearPath":
        raise ExportError(f"{path} is a rectified-flow model: DiTPipeline calls scheduler.scale_model_input, which "
                          "diffusers' FlowMatchEulerDiscreteScheduler lacks, so its pipeline cannot sample it")
    raise ExportError(
        f"{path}: its prediction spec {json.dumps(pred)} with time_scale {model.get('time_scale')} has no diffusers "
        "scheduler (DiTPipeline passes DDPM integer steps or flow-matching sigma * 1000, data at t = 0)"
    )


def diffusers_state(ours: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Our DiT state dict -> DiTTransformer2DModel's (diffusers keeps a copy of the t/y embedders in every block)."""
    out = {"pos_embed.proj.weight": ours["x_embedder.proj.weight"], "pos_embed.proj.bias": ours["x_embedder.proj.bias"],
           "proj_out_1.weight": ours["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": ours["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": ours["final_layer.linear.weight"], "proj_out_2.bias": ours["final_layer.linear.bias"]}
    for i in range(depth):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = d + "norm1.emb."
        for p in ("weight", "bias"):
            out[emb + f"timestep_embedder.linear_1.{p}"] = ours[f"t_embedder.mlp.0.{p}"]
            out[emb + f"timestep_embedder.linear_2.{p}"] = ours[f"t_embedder.mlp.2.{p}"]
            out[d + f"norm1.linear.{p}"] = ours[b + f"adaLN_modulation.1.{p}"]
            for name, chunk in zip(("to_q", "to_k", "to_v"), ours[b + f"attn.qkv.{p}"].chunk(3, 0)):
                out[d + f"attn1.{name}.{p}"] = chunk
            out[d + f"attn1.to_out.0.{p}"] = ours[b + f"attn.proj.{p}"]
            out[d + f"ff.net.0.proj.{p}"] = ours[b + f"mlp.fc1.{p}"]
            out[d + f"ff.net.2.{p}"] = ours[b + f"mlp.fc2.{p}"]
        out[emb + "class_embedder.embedding_table.weight"] = ours["y_embedder.embedding_table.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def export(snapshot: str | Path, out: str | Path, vae: str | Path | None = None) -> dict[str, Any]:
    """Write ``out`` (a DiTPipeline folder) from ``snapshot``; returns a summary."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    snapshot, out = Path(snapshot), Path(out)
    # The shared reader: a damaged file, a folder, a tokenizer snapshot and non-finite weights are refused by name.
    snap = read_snapshot(snapshot, need=("model",))
    tensors, config = snap.tensors, snap.config
    kind = check_representable(config, str(snapshot))
    tok = config.get("tokenizer") or {}
    if tok.get("mean") is not None or tok.get("std") is not None:
        raise ExportError(f"{snapshot}: its tokenizer normalises latents per channel (mean/std); DiTPipeline only "
                          "divides by the VAE's scaling_factor, so the export would decode wrongly")
    if out.exists():
        raise ExportError(f"--out {out} exists; give a new folder")
    if vae is not None and not (Path(vae) / "config.json").is_file():
        raise ExportError(f"--vae {vae} is not a diffusers AutoencoderKL folder (config.json + weights)")
    net = build_from_snapshot(config["model"], tensors, str(snapshot))  # checks the file before anything is written
    m = config["model"]
    hidden, heads, depth = int(m["hidden_size"]), int(m["num_heads"]), int(m["depth"])
    in_ch = int(m["in_channels"])
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_ch,
        out_channels=int(net.out_channels), num_layers=depth, sample_size=int(m["input_size"]),
        patch_size=int(m["patch_size"]), num_embeds_ada_norm=int(m["num_classes"]), norm_eps=1e-6,
    )
    state = diffusers_state({k: v.float() for k, v in net.state_dict().items()}, depth)
    transformer.load_state_dict(state, strict=True)
    # diffusers recomputes the sincos table; ours is DiT's frozen table: they must agree.
    theirs = transformer.pos_embed.pos_embed
    if not torch.allclose(theirs, net.pos_embed.detach().float(), atol=1e-5):
        raise ExportError(f"{snapshot}: its position table differs from diffusers' 2D sincos table")
    assert kind == "ddpm"
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=True, prediction_type="epsilon")
    # The same betas as the snapshot's DDPMEpsilon adapter.
    assert torch.allclose(scheduler.alphas_cumprod.double(), ddpm_alphas_cumprod(1000), rtol=1e-5)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        transformer.save_pretrained(tmp / "transformer")
        scheduler.save_pretrained(tmp / "scheduler")
        index: dict[str, Any] = {"_class_name": "DiTPipeline", "_diffusers_version": _diffusers_version(),
                                 "transformer": ["diffusers", "DiTTransformer2DModel"],
                                 "scheduler": ["diffusers", type(scheduler).__name__], "vae": [None, None]}
        if vae is not None:
            shutil.copytree(Path(vae), tmp / "vae")
            index["vae"] = ["diffusers", "AutoencoderKL"]
        source = {"snapshot": snapshot.name, "config": config.get("source"), "tokenizer": tok}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        atomic_write(tmp / "gen_source.json", lambda p: Path(p).write_text(json.dumps(source, indent=2) + "\n"))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "scheduler": type(scheduler).__name__, "vae": str(vae) if vae else None,
            "num_classes": int(m["num_classes"])}


def _diffusers_version() -> str:
    import diffusers

    return str(diffusers.__version__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--snapshot", required=True, help="a DiT snapshot (.safetensors)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist)")
    p.add_argument("--vae", default=None, help="a local diffusers AutoencoderKL folder to copy in as vae/")
    args = p.parse_args(argv)

    def go() -> int:
        res = export(args.snapshot, args.out, args.vae)
        print(f"wrote {res['out']} (DiTTransformer2DModel + {res['scheduler']}"
              f"{', vae ' + res['vae'] if res['vae'] else '; no vae: pass vae=AutoencoderKL.from_pretrained(...)'})")
        if res["num_classes"] != 1000:
            print(f"note: DiTPipeline's guidance uses the null label 1000; this model has {res['num_classes']} classes, "
                  "so sample it with guidance_scale=1 or call the transformer directly")
        return 0

    return run_main(go, PROG)


if __name__ == "__main__":
    sys.exit(main())
