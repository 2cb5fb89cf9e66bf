"""VA-VAE f16d32: the LDM KL autoencoder of LightningDiT, and a converter from its checkpoint layout.

"Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models" (Yao et al., 2025;
hustvl/LightningDiT). The network is exactly the LDM / VQGAN-KL autoencoder (hustvl/LightningDiT,
tokenizer/autoencoder.py and tokenizer/configs/vavae_f16d32.yaml): ``ch`` 128, ``ch_mult`` (1, 1, 2, 2, 4),
2 ResNet blocks per encoder level (3 per decoder level), self-attention at resolution 16 of a 256 px input
(the last level, after every ResNet block, in the encoder and the first decoder level), a middle
ResNet-attention-ResNet block, GroupNorm(32, eps 1e-6), ``z_channels`` = ``embed_dim`` = 32 with
``double_z`` (mean and log-variance), 1x1 ``quant_conv`` (64 -> 64) and ``post_quant_conv`` (32 -> 32).

diffusers' ``AutoencoderKL`` represents it exactly (``VAVAE_ARCHITECTURE``): ``AttnDownEncoderBlock2D`` /
``AttnUpDecoderBlock2D`` put one single-head attention (GroupNorm eps 1e-6, scale C^-1/2) after every ResNet
block of the level, the down-sampling pads (0, 1, 0, 1) before a stride-2 3x3 convolution as LDM does, and the
parameter counts are equal: encoder 28,413,248, decoder 41,417,603, quant_conv 4,160, post_quant_conv 1,056
(69,836,067 in all; counted on the official module of hustvl/LightningDiT, tokenizer/autoencoder.py,
commit 2725fed42a14898744433809949834e26957bcdd).

The published checkpoint (``hustvl/vavae-imagenet256-f16d32-dinov2`` on the Hugging Face hub,
``vavae-imagenet256-f16d32-dinov2.pt``) stores the LDM key layout (``encoder.down.4.attn.1.q.weight``...),
plus training-only modules (``loss.*``: LPIPS and discriminator; ``foundation_model.*``; ``linear_proj.*``: the
VF-loss projection) that inference does not use. ``ldm_to_diffusers`` maps every autoencoder key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from gen.utils.build import capture_config
from gen.utils.ckpt import unreadable_reason
from gen.utils.weights import WeightsNotFoundError, weights_cache_dir
from tokenizers.kl import (
    AutoencoderKLTokenizer,
    Posterior,
    autoencoder_kl_kwargs,
    build_autoencoder_kl,
    load_state_dict_checked,
)

VAVAE_REPO = "hustvl/vavae-imagenet256-f16d32-dinov2"
VAVAE_FILE = "vavae-imagenet256-f16d32-dinov2.pt"
VAVAE_ARCHITECTURE: dict[str, Any] = autoencoder_kl_kwargs(
    block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2, latent_channels=32, attention_levels=(4,)
)
# Modules of the training checkpoint that the autoencoder does not use.
TRAINING_ONLY_PREFIXES: tuple[str, ...] = ("loss.", "foundation_model.", "linear_proj.", "model_ema.")

# ----------------------------------------------------------------------------------------------
# Key layout: LDM (CompVis/latent-diffusion, ldm/modules/diffusionmodules/model.py) <-> diffusers.

_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_BACK = {v: k for k, v in _ATTN.items()}
_RESNET = {"nin_shortcut": "conv_shortcut"}  # norm1, conv1, norm2, conv2 keep their names
_RESNET_BACK = {v: k for k, v in _RESNET.items()}


def _rename(parts: list[str], table: Mapping[str, str]) -> str:
    """Rename the module path before the final parameter name (``to_out.0`` spans two parts)."""
    *module, param = parts
    name = ".".join(module)
    return f"{table.get(name, name)}.{param}"


def ldm_key_to_diffusers(key: str, levels: int) -> str:
    """One LDM autoencoder key -> diffusers ``AutoencoderKL`` key (decoder levels are reversed).

    Raises:
        KeyError: the key is not part of an LDM KL autoencoder with ``levels`` resolution levels.
    """
    parts = key.split(".")
    net, rest = parts[0], parts[1:]
    if net in ("quant_conv", "post_quant_conv") and len(rest) == 1:
        return key
    if net not in ("encoder", "decoder") or len(rest) < 2:
        raise KeyError(key)
    head = rest[0]
    if head in ("conv_in", "conv_out") and len(rest) == 2:
        return key
    if head == "norm_out" and len(rest) == 2:
        return f"{net}.conv_norm_out.{rest[1]}"
    if head == "mid" and len(rest) >= 4:
        if rest[1] in ("block_1", "block_2"):
            return f"{net}.mid_block.resnets.{int(rest[1][-1]) - 1}.{_rename(rest[2:], _RESNET)}"
        if rest[1] == "attn_1":
            return f"{net}.mid_block.attentions.0.{_rename(rest[2:], _ATTN)}"
    if (net, head) in (("encoder", "down"), ("decoder", "up")) and len(rest) >= 4:
        level = int(rest[1])
        if not 0 <= level < levels:
            raise KeyError(key)
        blocks, index = ("down_blocks", level) if head == "down" else ("up_blocks", levels - 1 - level)
        kind = rest[2]
        if kind == "block" and len(rest) >= 5:
            return f"{net}.{blocks}.{index}.resnets.{rest[3]}.{_rename(rest[4:], _RESNET)}"
        if kind == "attn" and len(rest) >= 5:
            return f"{net}.{blocks}.{index}.attentions.{rest[3]}.{_rename(rest[4:], _ATTN)}"
        if kind in ("downsample", "upsample") and rest[3] == "conv" and len(rest) == 5:
            return f"{net}.{blocks}.{index}.{kind}rs.0.conv.{rest[4]}"
    raise KeyError(key)


def diffusers_key_to_ldm(key: str, levels: int) -> str:
    """Inverse of ``ldm_key_to_diffusers``."""
    parts = key.split(".")
    net, rest = parts[0], parts[1:]
    if net in ("quant_conv", "post_quant_conv") or (len(rest) == 2 and rest[0] in ("conv_in", "conv_out")):
        return key
    if rest[0] == "conv_norm_out":
        return f"{net}.norm_out.{rest[1]}"
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return f"{net}.mid.block_{int(rest[2]) + 1}.{_rename(rest[3:], _RESNET_BACK)}"
        return f"{net}.mid.attn_1.{_rename(rest[3:], _ATTN_BACK)}"
    index = int(rest[1])
    head, level = ("down", index) if rest[0] == "down_blocks" else ("up", levels - 1 - index)
    kind = rest[2]
    if kind == "resnets":
        return f"{net}.{head}.{level}.block.{rest[3]}.{_rename(rest[4:], _RESNET_BACK)}"
    if kind == "attentions":
        return f"{net}.{head}.{level}.attn.{rest[3]}.{_rename(rest[4:], _ATTN_BACK)}"
    return f"{net}.{head}.{level}.{kind[:-2]}.conv.{rest[-1]}"  # downsamplers.0.conv.weight -> downsample.conv.weight


def _is_attention_weight(diffusers_key: str) -> bool:
    return ".attentions." in diffusers_key and diffusers_key.endswith(".weight") and "group_norm" not in diffusers_key


def ldm_to_diffusers(state: Mapping[str, torch.Tensor], levels: int = 5, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Convert an LDM KL-autoencoder state dict to diffusers' ``AutoencoderKL`` layout.

    Training-only modules (``TRAINING_ONLY_PREFIXES``) are dropped; LDM's 1x1 attention convolutions
    (C, C, 1, 1) become linear weights (C, C).

    Raises:
        ValueError: keys that belong to neither (named, with the source).
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key.startswith(TRAINING_ONLY_PREFIXES):
            continue
        try:
            new = ldm_key_to_diffusers(key, levels)
        except (KeyError, ValueError):
            unknown.append(key)
            continue
        if _is_attention_weight(new) and value.ndim == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    if unknown:
        raise ValueError(
            f"{source}: {len(unknown)} key(s) are not part of an LDM KL autoencoder with {levels} levels "
            f"(e.g. {unknown[:4]}); is this a VA-VAE / LDM checkpoint?"
        )
    return out


def diffusers_to_ldm(state: Mapping[str, torch.Tensor], levels: int = 5) -> dict[str, torch.Tensor]:
    """Convert a diffusers ``AutoencoderKL`` state dict to the LDM layout (attention weights back to 1x1 convs)."""
    out = {}
    for key, value in state.items():
        if _is_attention_weight(key) and value.ndim == 2:
            value = value[:, :, None, None]
        out[diffusers_key_to_ldm(key, levels)] = value
    return out


# ----------------------------------------------------------------------------------------------
# Loading.


def find_vavae_checkpoint(weights: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The VA-VAE checkpoint file: explicit path, else the Hugging Face cache, else the toolkit's weights cache.

    Raises:
        WeightsNotFoundError: naming the file, the hub repository and the folders searched.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"VA-VAE checkpoint {path} does not exist; download {VAVAE_FILE} from "
                f"https://huggingface.co/{VAVAE_REPO} and set tokenizer.weights to its path"
            )
        return path
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    cached = try_to_load_from_cache(VAVAE_REPO, VAVAE_FILE)
    if isinstance(cached, str):
        return Path(cached)
    local = weights_cache_dir() / VAVAE_FILE
    if local.is_file():
        return local
    if download:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(VAVAE_REPO, VAVAE_FILE))
    raise WeightsNotFoundError(
        f"VA-VAE weights {VAVAE_FILE} (https://huggingface.co/{VAVAE_REPO}) not found in the Hugging Face cache "
        f"({HF_HUB_CACHE}) or at {local}. Put the file in {local.parent} (or set GEN_CACHE), or set "
        f"tokenizer.weights=<path>, or allow downloading it (tokenizer.download=true) on a machine with internet."
    )


def load_checkpoint_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file: safetensors, or a torch file read with ``weights_only=True``.

    A Lightning-style ``{"state_dict": ...}`` (or ``{"model": ...}``) wrapper is unwrapped.

    Raises:
        ValueError: the torch file holds pickled objects besides tensors (never unpickled here).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors signal damaged or foreign bytes with many exception types
        if isinstance(e, OSError) and e.errno is not None:  # unreadable (permissions, I/O), not damaged
            raise
        reason = unreadable_reason(e)
        if "pickled Python objects" in reason:
            raise ValueError(
                f"{path}: {reason} (torch.load with weights_only=True). If you trust the file, save its 'state_dict' "
                "as safetensors once (safetensors.torch.save_file) and point tokenizer.weights at that file."
            ) from e
        raise ValueError(f"VA-VAE weights file {path} cannot be read ({reason}); it is damaged or not a checkpoint: "
                         "download it again") from e
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors (nor a {{'state_dict': ...}} checkpoint)")
    return dict(state)


def load_vavae_network(path: str | os.PathLike, architecture: Mapping[str, Any] = VAVAE_ARCHITECTURE) -> torch.nn.Module:
    """diffusers ``AutoencoderKL`` with weights from an LDM-layout checkpoint or a diffusers-layout state dict."""
    state = load_checkpoint_state(path)
    levels = len(architecture["block_out_channels"])
    if not any(k.startswith("encoder.down_blocks.") for k in state):
        state = ldm_to_diffusers(state, levels, source=str(path))
    vae = build_autoencoder_kl(architecture, meta=True)
    load_state_dict_checked(vae, state, str(path))
    return vae


@capture_config
class VAVAE(AutoencoderKLTokenizer):
    """VA-VAE f16d32 (32-channel latents at 1/16 of the image side) through diffusers' ``AutoencoderKL``.

    Args:
        weights: checkpoint file: the published ``.pt`` (LDM layout, read with weights_only=True), or a
            ``.safetensors`` state dict in the LDM or diffusers layout. None: the Hugging Face cache of
            ``hustvl/vavae-imagenet256-f16d32-dinov2``, then ``${GEN_CACHE:-~/.cache/gen}/weights/``.
        download: fetch the published checkpoint when it is not on this machine.
        posterior: ``sample`` (LightningDiT's extraction, hustvl/LightningDiT tokenizer/vavae.py) or ``mean``.
        scaling_factor, mean, std: normalisation; LightningDiT uses per-channel statistics of the latents.
        latent_channels, downsample: 32 and 16; accepted so configs can carry them, and checked.
    """

    # Against the official module on random weights (256 px, float32, CPU) the decoder output differs by
    # 3.8e-5 with diffusers' channels-last attention outputs and by 9.9e-6 with contiguous ones, which are
    # also 4x closer to a float64 run; the two agree to 1e-13 in float64 (bench/README.md).
    contiguous_attention = True

    snapshot_meta_build = False  # a fixed architecture, or the one of its (user-named) weights

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        download: bool = False,
        posterior: Posterior = "sample",
        scaling_factor: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        latent_channels: int = 32,
        downsample: int = 16,
    ) -> None:
        vae = load_vavae_network(find_vavae_checkpoint(weights, download))
        self._init_kl(vae, 3, latent_channels, downsample, posterior, scaling_factor, mean, std)


def make_random_vavae_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write random weights of the VA-VAE architecture in the LDM key layout (safetensors), for tests.

    PyTorch's default initialisation from ``seed``, then the GroupNorm affine parameters and all biases are
    perturbed, so that a converter swapping two norms or biases would change the outputs.
    """
    from safetensors.torch import save_file

    vae = build_autoencoder_kl(VAVAE_ARCHITECTURE, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    state = {}
    for key, value in vae.state_dict().items():
        if value.ndim == 1:
            base = torch.ones_like(value) if ("norm" in key and key.endswith(".weight")) else value
            value = base + 0.1 * torch.randn(value.shape, generator=gen)
        state[key] = value.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in diffusers_to_ldm(state).items()}, str(path))
    return path
