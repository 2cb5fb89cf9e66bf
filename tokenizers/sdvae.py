"""SD-VAE (``stabilityai/sd-vae-ft-ema`` / ``sd-vae-ft-mse``): the f8, 4-channel KL autoencoder of Stable Diffusion.

The latent space of DiT, SiT, REPA, REG and DDT. Architecture: diffusers ``AutoencoderKL`` with the published
config (``SD_VAE_ARCHITECTURE``, the ``config.json`` of both Hugging Face repos: levels 128, 256, 512, 512, two
ResNet blocks per level, no attention outside the middle block). The two variants share the encoder and differ
in the fine-tuned decoder (model card of stabilityai/sd-vae-ft-mse).

Normalisation: DiT multiplies the posterior sample by 0.18215 (facebookresearch/DiT, train.py and
sample.py: ``vae.encode(x).latent_dist.sample().mul_(0.18215)``, ``vae.decode(z / 0.18215)``), the default
here; per-channel statistics from pre-extracted latents are the alternative (``scaling_factor: 1.0`` and
``mean``/``std``).

Weights are never downloaded silently: ``weights`` names a local folder in diffusers' layout (``config.json``
and ``diffusion_pytorch_model.safetensors``), else the Hugging Face cache is searched, and only
``download=True`` fetches the two files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from gen.utils.build import capture_config
from gen.utils.weights import WeightsNotFoundError
from tokenizers.kl import AutoencoderKLTokenizer, Posterior

SD_VAE_REPOS: dict[str, str] = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
SD_VAE_FILES: tuple[str, str] = ("config.json", "diffusion_pytorch_model.safetensors")
SD_VAE_SCALING = 0.18215

# The architecture keys of the published config.json (stabilityai/sd-vae-ft-mse on the Hugging Face hub).
SD_VAE_ARCHITECTURE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}


def _hf_cached(repo: str, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def find_sd_vae(variant: str, weights: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The folder holding ``config.json`` and ``diffusion_pytorch_model.safetensors`` of an SD-VAE variant.

    Order: the explicit folder ``weights``; the Hugging Face cache (``$HF_HOME``, default
    ``~/.cache/huggingface``); with ``download=True``, a download from the hub into that cache.

    Raises:
        WeightsNotFoundError: the files are not on this machine (the message names them and where to put them).
    """
    repo = SD_VAE_REPOS[variant]
    if weights is not None:
        folder = Path(weights).expanduser()
        missing = [f for f in SD_VAE_FILES if not (folder / f).is_file()]
        if missing:
            raise WeightsNotFoundError(
                f"SD-VAE folder {folder} lacks {', '.join(missing)}; it needs {' and '.join(SD_VAE_FILES)} of "
                f"{repo} (https://huggingface.co/{repo}), e.g. `huggingface-cli download {repo} "
                f"{' '.join(SD_VAE_FILES)} --local-dir {folder}` on a machine with internet"
            )
        return folder
    cached = [_hf_cached(repo, f) for f in SD_VAE_FILES]
    if all(p is not None for p in cached):
        return cached[0].parent  # type: ignore[union-attr]
    if download:
        from huggingface_hub import hf_hub_download

        paths = [Path(hf_hub_download(repo, f)) for f in SD_VAE_FILES]
        return paths[0].parent
    from huggingface_hub.constants import HF_HUB_CACHE

    raise WeightsNotFoundError(
        f"SD-VAE weights {' and '.join(SD_VAE_FILES)} of {repo} not found: no `weights` folder was given and the "
        f"Hugging Face cache ({HF_HUB_CACHE}) does not hold them. Either put both files in a folder and set "
        f"tokenizer.weights=<folder>, or fill the cache with `huggingface-cli download {repo} "
        f"{' '.join(SD_VAE_FILES)}`, or allow downloading (tokenizer.download=true) on a machine with internet."
    )


def _check_architecture(folder: Path) -> None:
    with open(folder / "config.json") as f:
        config = json.load(f)
    # Compare only what the file states (old configs omit keys that have defaults); sample_size is a hint.
    wrong = {}
    for key, want in SD_VAE_ARCHITECTURE.items():
        if key == "sample_size" or key not in config:
            continue
        got = list(config[key]) if isinstance(want, list) else config[key]
        if got != want:
            wrong[key] = (config[key], want)
    if wrong:
        detail = ", ".join(f"{k}: {got} (SD-VAE: {want})" for k, (got, want) in wrong.items())
        raise ValueError(f"{folder / 'config.json'} is not the SD-VAE f8d4 architecture: {detail}")


@capture_config
class SDVAE(AutoencoderKLTokenizer):
    """SD-VAE f8d4 through diffusers' ``AutoencoderKL``.

    Args:
        variant: ``ema`` (stabilityai/sd-vae-ft-ema) or ``mse`` (stabilityai/sd-vae-ft-mse).
        weights: local folder with the variant's ``config.json`` and ``diffusion_pytorch_model.safetensors``;
            None: the Hugging Face cache.
        download: fetch the two files from the hub when they are not on this machine.
        posterior: ``sample`` (DiT, SiT) or ``mean``.
        scaling_factor: 0.18215 (DiT); 1.0 with per-channel ``mean``/``std``.
        mean, std: per-channel statistics of the raw latents (None: not used).
        latent_channels, downsample: 4 and 8; accepted so configs can carry them, and checked.
    """

    snapshot_meta_build = False  # a fixed architecture, or the one of its (user-named) weights

    def __init__(
        self,
        variant: Literal["ema", "mse"] = "ema",
        weights: str | os.PathLike | None = None,
        download: bool = False,
        posterior: Posterior = "sample",
        scaling_factor: float = SD_VAE_SCALING,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        latent_channels: int = 4,
        downsample: int = 8,
    ) -> None:
        from diffusers import AutoencoderKL

        if variant not in SD_VAE_REPOS:
            raise ValueError(f"SD-VAE variant must be one of {sorted(SD_VAE_REPOS)}, got {variant!r}")
        folder = find_sd_vae(variant, weights, download)
        _check_architecture(folder)
        # use_safetensors: never unpickle; diffusers also renames the attention keys of older uploads.
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, local_files_only=True)
        self._init_kl(vae, 3, latent_channels, downsample, posterior, scaling_factor, mean, std)


def make_random_sd_vae(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write an SD-VAE folder (``config.json`` + safetensors) with random weights of the published architecture.

    For tests and benchmarks: the loading path is the one used for the real weights.
    """
    from tokenizers.kl import build_autoencoder_kl

    folder = Path(folder)
    vae = build_autoencoder_kl({**SD_VAE_ARCHITECTURE, "scaling_factor": SD_VAE_SCALING}, seed)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder
