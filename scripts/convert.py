"""Convert a published checkpoint into an inference snapshot of this toolkit.

    python -m scripts.convert --from dit --ckpt DiT-XL-2-256x256.pt --out in256_dit_xl2.safetensors \\
        --tokenizer-weights /models/sd-vae-ft-ema
    python -m scripts.convert --from lightningdit --ckpt lightningdit-xl-imagenet256-800ep.pt --out ldit.safetensors \\
        --tokenizer-weights vavae.safetensors --latent-stats latents_stats.pt
    python -m scripts.convert --from vavae --ckpt vavae-imagenet256-f16d32-dinov2.pt --out vavae.safetensors
    python -m scripts.convert --from edm2 --ckpt edm2-img64-s-1073741-0.075.pkl --out edm2_img64_s.safetensors
    python sample.py snapshot=in256_dit_xl2.safetensors sampler=heun_dit_xl2

Sources: dit, sit, repa, reg, lightningdit, ddt (``gen/models/convert.py`` maps their keys), edm2 (EDM2's
ImageNet-64 pixel networks, pickles of persistent classes read by the restricted unpickler of
``gen/models/convert_edm2.py``, which never runs their embedded code) and vavae (the tokenizer;
``tokenizers/vavae.py`` maps its keys). The file is read safely (safetensors, or ``torch.load`` with
``weights_only=True``; a pickle that would import objects is refused), the EMA weights are taken where the file
holds both, training-only parts are dropped and listed, the size is inferred from the shapes (``--size`` refuses
another one), and the snapshot's metadata holds the model spec, the prediction spec with the time adapter, the
tokenizer (built once here, so a missing weights file fails now), the paper's sampler and the source file's
SHA-256. ``sample.py snapshot=OUT``, ``python -m eval`` and fine-tuning then need no further flags.
Exit status: 0 written, 2 refused (one line on stderr, nothing written).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from gen.models.convert import (
    SOURCES,
    ConvertError,
    convert_state,
    looks_like,
    read_checkpoint,
    select_weights,
)
from gen.models.convert_edm2 import EDM2PickleError, edm2_state, read_edm2_pickle
from gen.utils.build import build
from gen.utils.ckpt import file_sha256, save_snapshot
from gen.utils.cli import check_writable_file, run_main
from gen.utils.finite import NonFiniteError, non_finite_tensors, shorten

PROG = "python -m scripts.convert"
ROOT = Path(__file__).resolve().parent.parent
# The tokenizer each source was trained with (DiT, SiT, REPA, REG, DDT: SD-VAE f8d4; LightningDiT: VA-VAE f16d32)
# and the sampler preset with the paper's settings (configs/sampler/, FID cited there).
DEFAULT_TOKENIZER = {"dit": "sd_vae_ema", "sit": "sd_vae_ema", "repa": "sd_vae_ema", "reg": "sd_vae_ema",
                     "ddt": "sd_vae_ema", "lightningdit": "vavae_f16d32"}
DEFAULT_SAMPLER = {"dit": "heun_dit_xl2", "sit": "sde_sit_xl2", "repa": "sde_repa_sit_xl2",
                   "reg": "sde_reg_sit_xl2", "lightningdit": "euler_lightningdit_800ep", "ddt": "euler_ddt_xl",
                   "edm2": "heun_edm2_img64"}
# The data name each source's snapshot records (ECT's check_start compares it with the tuning run's data.name).
DEFAULT_DATASET = {"edm2": "imagenet64"}


def _yaml(group: str, name_or_file: str) -> dict[str, Any]:
    path = Path(name_or_file)
    if not path.is_file():
        path = ROOT / "configs" / group / f"{name_or_file}.yaml"
    if not path.is_file():
        raise ConvertError(f"--{group} {name_or_file}: neither a file nor a preset in configs/{group}/")
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ConvertError(f"{path} is not a mapping")
    if "defaults" in spec:
        raise ConvertError(f"{path} uses a Hydra defaults list; give a self-contained {group} file")
    for key, value in spec.items():  # resolved by Hydra in train.py, never here: it would reach the constructor as text
        if isinstance(value, str) and "${" in value:
            raise ConvertError(f"--{group} {name_or_file}: {path} sets {key}: {value!r}, a config interpolation this "
                               f"command does not resolve; give a {group} YAML file with the value (e.g. {key}: 3)")
    return spec


def latent_statistics(path: str | Path) -> tuple[list[float], list[float]]:
    """Per-channel ``mean``/``std`` from LightningDiT's ``latents_stats.pt`` (tensors (1, C, 1, 1)) or a JSON/YAML file."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"latent statistics file {path} does not exist (LightningDiT: latents_stats.pt)")
    obj = yaml.safe_load(path.read_text()) if path.suffix in (".json", ".yaml", ".yml") else read_checkpoint(path)
    try:
        mean = torch.as_tensor(obj["mean"], dtype=torch.float64).flatten().tolist()
        std = torch.as_tensor(obj["std"], dtype=torch.float64).flatten().tolist()
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"{path} has no per-channel 'mean' and 'std' ({e})") from e
    return mean, std


def tokenizer_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The tokenizer spec: preset or file, with the weights file and latent statistics of the command line."""
    spec = _yaml("tokenizer", args.tokenizer or DEFAULT_TOKENIZER[args.source])
    if args.tokenizer_weights is not None:
        weights = Path(args.tokenizer_weights).expanduser()
        if not weights.exists():
            raise ConvertError(f"tokenizer weights {weights} do not exist; give the downloaded tokenizer file or folder")
        spec["weights"] = str(weights.resolve())
    if args.latent_stats is not None:
        spec["mean"], spec["std"] = latent_statistics(args.latent_stats)
        spec["scaling_factor"] = 1.0
    elif args.source == "lightningdit" and spec.get("mean") is None:
        raise ConvertError("LightningDiT normalises latents with per-channel statistics: give --latent-stats "
                           "latents_stats.pt (hustvl/LightningDiT) or a JSON file with mean and std")
    return spec


def build_tokenizer(spec: dict[str, Any]) -> Any:
    try:
        return build(spec)
    except (OSError, ValueError) as e:
        raise ConvertError(f"tokenizer {spec.get('_target_')}: {' '.join(str(e).split())}") from e


def refuse_non_finite(tensors: dict[str, torch.Tensor], ckpt: str | Path) -> None:
    """Refuse NaN or inf weights before anything is written (a converted snapshot of them would sample NaN)."""
    bad = non_finite_tensors(tensors)
    if bad:
        raise NonFiniteError(f"{ckpt} holds non-finite weights ({shorten(bad)}); the checkpoint is damaged: download it "
                             "again. Nothing was written")


def convert_vavae(args: argparse.Namespace, sha: str) -> dict[str, Any]:
    """VA-VAE: the LDM-layout autoencoder to a tokenizer snapshot (its tensors are the weights; tokenizers/vavae.py)."""
    from tokenizers.vavae import TRAINING_ONLY_PREFIXES, VAVAE, ldm_to_diffusers

    obj = read_checkpoint(args.ckpt)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConvertError(f"{args.ckpt} holds no VA-VAE state dict")
    if not any(k.startswith("encoder.") for k in obj):
        raise ConvertError(f"{args.ckpt} is not a VA-VAE checkpoint (no encoder.* keys; its layout looks like "
                           f"{looks_like(obj)}). Pick the matching --from")
    dropped = sorted({k.split(".")[0] + ".*" for k in obj if k.startswith(TRAINING_ONLY_PREFIXES)})
    try:
        tensors = ldm_to_diffusers(obj, source=str(args.ckpt))
    except ValueError as e:
        raise ConvertError(str(e)) from e
    out = Path(args.out)
    refuse_non_finite(tensors, args.ckpt)
    mean, std = latent_statistics(args.latent_stats) if args.latent_stats else (None, None)
    # The tokenizer preset's settings; weights: null because the snapshot's tensors are the weights.
    spec = {**_yaml("tokenizer", "vavae_f16d32"), "weights": None, "mean": mean, "std": std}
    source = {"from": "vavae", "file": Path(args.ckpt).name, "sha256": sha, "preset": "VA-VAE f16d32",
              "dropped": dropped, "checked": ["LDM keys -> diffusers AutoencoderKL (tokenizers.vavae.ldm_to_diffusers)"]}
    save_snapshot(out, tensors, {"tokenizer": spec, "tokenizer_weights": "snapshot", "kind": "tokenizer",
                                 "source": source})
    try:  # the snapshot must load as the tokenizer's weights
        VAVAE(weights=str(out))
    except (OSError, ValueError) as e:
        out.unlink(missing_ok=True)
        raise ConvertError(f"the written tokenizer snapshot does not load ({e}); nothing was kept") from e
    return source


def convert_edm2(args: argparse.Namespace, sha: str) -> dict[str, Any]:
    """EDM2 (ImageNet-64 pixels): the ``ema`` Precond of the pickle to an EDM-preconditioned x0 snapshot."""
    from gen.objectives.edm import EDMLoss

    try:
        conv = edm2_state(read_edm2_pickle(args.ckpt), args.ckpt, expect_size=args.size)
    except EDM2PickleError as e:
        raise ConvertError(str(e)) from e
    channels = int(conv.model["in_channels"])
    tok = build_tokenizer({"_target_": "tokenizers.pixels.PixelTokenizer", "channels": channels,
                           "latent_channels": channels, "downsample": 1})
    source = {"from": "edm2", "file": Path(args.ckpt).name, "sha256": sha, "preset": conv.preset,
              "dropped": conv.dropped, "checked": conv.checked}
    meta = {
        "model": conv.model,
        # EDM2's Precond is EDM's (c_in, c_skip, c_out, c_noise = ln(sigma) / 4 with its sigma_data): an x0 model on
        # the EDM path, exactly what objective=edm records (and what ECT's teacher=edm expects).
        "prediction": EDMLoss(sigma_data=conv.sigma_data).prediction_spec(),
        "data": {"name": args.dataset or DEFAULT_DATASET["edm2"], "channels": channels,
                 "resolution": int(conv.model["input_size"]), "num_classes": int(conv.model["num_classes"])},
        "tokenizer": tok.config,
        "sampler": _yaml("sampler", args.sampler or DEFAULT_SAMPLER["edm2"]),
        "source": source,
    }
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in conv.tensors.items()}  # the file is fp16
    refuse_non_finite(tensors, args.ckpt)
    out = Path(args.out)
    save_snapshot(out, tensors, meta)
    from pipeline import generator_from_snapshot

    try:
        generator_from_snapshot(str(out))
    except (OSError, ValueError, NonFiniteError) as e:
        out.unlink(missing_ok=True)
        raise ConvertError(f"the written snapshot does not rebuild ({e}); nothing was kept") from e
    return source


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Convert ``args.ckpt`` into ``args.out``; returns the ``source`` record of the snapshot's metadata."""
    ckpt = Path(args.ckpt)
    if not ckpt.is_file():
        raise ConvertError(f"checkpoint {ckpt} does not exist; give the downloaded checkpoint file")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ConvertError(f"--out {out}: a snapshot is a .safetensors file")
    check_writable_file(out, "--out", {"--ckpt": ckpt, "--tokenizer-weights": args.tokenizer_weights,
                                       "--latent-stats": args.latent_stats})
    sha = file_sha256(ckpt)
    if args.source == "vavae":
        return convert_vavae(args, sha)
    if args.source == "edm2":
        return convert_edm2(args, sha)
    spec = tokenizer_spec(args)  # before the (large) checkpoint is read: a missing file fails fast
    obj = read_checkpoint(ckpt)
    state, dropped = select_weights(obj, args.source, ckpt)
    tok = build_tokenizer(spec)
    input_size = None
    if args.resolution is not None or args.source == "ddt":
        res = args.resolution or 256
        if res % tok.downsample:
            raise ConvertError(f"--resolution {res} is not divisible by the tokenizer's factor {tok.downsample}")
        input_size = res // tok.downsample
    conv = convert_state(args.source, state, ckpt, num_heads=args.num_heads, encoder_blocks=args.encoder_blocks,
                         input_size=input_size, expect_size=args.size)
    in_ch = int(conv.model["in_channels"])
    if in_ch != tok.latent_channels:
        raise ConvertError(f"{ckpt} takes {in_ch}-channel latents but the tokenizer {spec['_target_']} makes "
                           f"{tok.latent_channels}; pick the tokenizer it was trained with (--tokenizer)")
    sampler = _yaml("sampler", args.sampler or DEFAULT_SAMPLER[args.source])
    source = {"from": args.source, "file": ckpt.name, "sha256": sha, "preset": conv.preset,
              "dropped": dropped + conv.dropped, "checked": conv.checked}
    meta = {
        "model": conv.model,
        "prediction": conv.prediction,
        "data": {"name": args.dataset or "imagenet", "channels": tok.image_channels,
                 "resolution": int(conv.model["input_size"]) * tok.downsample,
                 "num_classes": int(conv.model["num_classes"])},
        "tokenizer": tok.config,
        "sampler": sampler,
        "source": source,
    }
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in conv.tensors.items()}
    refuse_non_finite(tensors, ckpt)
    save_snapshot(out, tensors, meta)
    from gen.utils.ckpt import tokenizer_weights
    from pipeline import generator_from_snapshot

    # What sample.py does with tokenizer_weights=<the file named here>: a weights path in a snapshot's metadata is a
    # record of where the tokenizer came from, never followed (gen.utils.ckpt.build_snapshot_tokenizer).
    weights = tok.config.get("weights") if isinstance(tok.config, dict) else None
    try:
        with tokenizer_weights(weights):
            generator_from_snapshot(str(out))
    except (OSError, ValueError, NonFiniteError) as e:
        out.unlink(missing_ok=True)
        raise ConvertError(f"the written snapshot does not rebuild ({e}); nothing was kept") from e
    return source


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--from", dest="source", required=True, choices=[*SOURCES, "edm2", "vavae"], help="the checkpoint's code base")
    p.add_argument("--ckpt", required=True, help="the published (or trained) checkpoint file")
    p.add_argument("--out", required=True, help="the snapshot to write (.safetensors)")
    p.add_argument("--size", default=None, help="refuse another size: XL, L, B, S, 1p0B, ... or DiT-XL/2 (edm2: XS..XXL)")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of a custom (unpublished) size")
    p.add_argument("--encoder-blocks", type=int, default=None, help="DDT encoder blocks of a custom size")
    p.add_argument("--tokenizer", default=None, help="configs/tokenizer preset or YAML file (default: the source's)")
    p.add_argument("--tokenizer-weights", default=None, help="the tokenizer's weights file or folder")
    p.add_argument("--latent-stats", default=None, help="per-channel latent mean/std (LightningDiT latents_stats.pt)")
    p.add_argument("--resolution", type=int, default=None, help="image size (DDT files do not record it; default 256)")
    p.add_argument("--sampler", default=None, help="configs/sampler preset stored as the snapshot's sampler")
    p.add_argument("--dataset", default=None, help="data name recorded in the snapshot (default imagenet; edm2: imagenet64)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def go() -> int:
        source = convert(args)
        print(f"converted {source['file']} ({args.source}, {source['preset']}, sha256 {source['sha256'][:12]}) -> {args.out}")
        for item in source["dropped"]:
            print(f"  dropped: {item}")
        for item in source["checked"]:
            print(f"  checked: {item}")
        return 0

    return run_main(go, PROG)


if __name__ == "__main__":
    sys.exit(main())
