"""KL autoencoders (LDM / Stable Diffusion VAEs) as tokenizers, through diffusers' ``AutoencoderKL``.

The network is the KL-regularised autoencoder of "High-Resolution Image Synthesis with Latent Diffusion
Models" (Rombach et al., 2022; CompVis/latent-diffusion, ldm/models/autoencoder.py): a convolutional encoder
whose last layer gives the mean and log-variance of a diagonal Gaussian posterior (``double_z``), 1x1
``quant_conv`` / ``post_quant_conv`` around the latent, and a mirrored decoder. diffusers' ``AutoencoderKL``
implements it; self-attention at chosen levels is expressed with its ``AttnDownEncoderBlock2D`` /
``AttnUpDecoderBlock2D`` blocks (one single-head attention after every ResNet block of that level, GroupNorm
eps 1e-6, as in the LDM code).

``AutoencoderKLTokenizer`` holds one such network. Encoding returns either a posterior sample (``posterior:
sample``; the randomness comes from the generators passed in, one per image for results that do not depend
on the batch) or the posterior mean (``posterior: mean``). ``SDVAE`` and ``VAVAE`` (``tokenizers.sdvae``,
``tokenizers.vavae``) fix the published architectures and load the published weights.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gen.utils.build import capture_config
from tokenizers.base import Generators, Tokenizer

Posterior = Literal["sample", "mean"]


def autoencoder_kl_kwargs(
    block_out_channels: Sequence[int],
    layers_per_block: int,
    latent_channels: int,
    attention_levels: Sequence[int] = (),
    image_channels: int = 3,
    norm_num_groups: int = 32,
    mid_attention: bool = True,
) -> dict[str, Any]:
    """Constructor arguments of diffusers' ``AutoencoderKL`` for an LDM-style KL autoencoder.

    Args:
        block_out_channels: channels of each resolution level, e.g. ``(128, 128, 256, 256, 512)`` (LDM's
            ``ch * ch_mult``); one downsampling between consecutive levels, so f = 2 ** (levels - 1).
        layers_per_block: ResNet blocks per encoder level (the decoder has one more, as in LDM).
        latent_channels: latent channels (LDM's ``z_channels`` = ``embed_dim``).
        attention_levels: indices of the levels (0 = full resolution) with self-attention after each ResNet
            block, in the encoder and the mirrored decoder levels (LDM's ``attn_resolutions`` expressed as
            levels: resolution 16 at 256 px input and f16 is level 4).
        image_channels: image channels in and out.
        norm_num_groups: GroupNorm groups.
        mid_attention: attention between the two middle ResNet blocks.
    """
    levels = len(block_out_channels)
    bad = [i for i in attention_levels if not 0 <= i < levels]
    if bad:
        raise ValueError(f"attention_levels {list(bad)} outside the {levels} levels 0..{levels - 1}")
    attn = set(attention_levels)
    down = ["AttnDownEncoderBlock2D" if i in attn else "DownEncoderBlock2D" for i in range(levels)]
    # Decoder up block j works at encoder level (levels - 1 - j).
    up = ["AttnUpDecoderBlock2D" if levels - 1 - j in attn else "UpDecoderBlock2D" for j in range(levels)]
    return {
        "in_channels": int(image_channels),
        "out_channels": int(image_channels),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": [int(c) for c in block_out_channels],
        "layers_per_block": int(layers_per_block),
        "latent_channels": int(latent_channels),
        "norm_num_groups": int(norm_num_groups),
        "mid_block_add_attention": bool(mid_attention),
    }


def build_autoencoder_kl(kwargs: Mapping[str, Any], seed: int | None = 0, meta: bool = False) -> nn.Module:
    """A diffusers ``AutoencoderKL`` with PyTorch's default initialisation drawn from ``seed``.

    ``meta=True`` builds it without memory (weights to be loaded with ``load_state_dict(..., assign=True)``).
    """
    from diffusers import AutoencoderKL

    if meta:
        with torch.device("meta"):
            return AutoencoderKL(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0 if seed is None else seed)
        return AutoencoderKL(**kwargs)


def _refuse_generator_snapshot(path: Path) -> None:
    """A generator's snapshot given as tokenizer weights: say so, instead of listing every key that does not fit."""
    if path.suffix != ".safetensors":
        return
    from gen.utils.ckpt import CheckpointError, load_snapshot_config

    try:
        config = load_snapshot_config(path)
    except CheckpointError:
        return  # not a snapshot of this toolkit (a plain state dict): the loader decides
    if isinstance(config.get("model"), Mapping) and config.get("kind") != "tokenizer":
        raise ValueError(f"tokenizer weights file {path} is a generator snapshot (model "
                         f"{config['model'].get('_target_')}), not a tokenizer's; give the tokenizer's snapshot "
                         "(train.py method=kl_autoencoder) or its weights file")


def load_state_dict_checked(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict ``load_state_dict`` whose error names the file and the first missing / unexpected / misshaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with other shapes (e.g. {k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)})")
        raise ValueError(f"weights in {source} do not fit the {type(module).__name__} architecture: " + "; ".join(parts))
    module.load_state_dict(dict(state), strict=True, assign=True)


def _contiguous_output(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


@capture_config
class AutoencoderKLTokenizer(Tokenizer):
    """A KL autoencoder of any LDM-style shape: random (seeded) or weights from a safetensors file.

    For yardstick-sized tokenizers and tests; ``SDVAE`` and ``VAVAE`` are the published models.

    Args:
        block_out_channels, layers_per_block, latent_channels, attention_levels, image_channels,
            norm_num_groups, mid_attention: the architecture (``autoencoder_kl_kwargs``).
        weights: a ``.safetensors`` state dict in diffusers' layout; None: random initialisation from ``seed``.
        seed: seed of the random initialisation.
        posterior: ``sample`` (posterior sample) or ``mean`` (posterior mean) when encoding.
        scaling_factor, mean, std: latent normalisation (``tokenizers.base.Tokenizer``).
        latent_channels / downsample: ``downsample`` is optional and checked against the architecture.
    """

    # diffusers' attention returns a channels-last-strided tensor, so the convolutions after it run in
    # another memory layout and round differently. Subclasses that must match the LDM code (whose 1x1-conv
    # projection returns a contiguous tensor) set this; SD-VAE keeps diffusers' behaviour bit for bit.
    contiguous_attention: bool = False

    # Its architecture is its settings: a snapshot's copy is sized on the meta device first
    # (gen.utils.ckpt.build_snapshot_tokenizer).
    snapshot_meta_build = True

    @staticmethod
    def snapshot_numel_estimate(spec: Mapping[str, Any]) -> int:
        """A lower bound of the weights an architecture spec describes, without building anything: the 3x3
        convolutions of its residual blocks, ``(2 * layers_per_block + 1) * 2 * 9 * c^2`` per level of width c."""
        try:
            layers = int(spec.get("layers_per_block", 1))
            return sum((2 * layers + 1) * 18 * int(c) ** 2 for c in spec.get("block_out_channels", (32, 64)))
        except (TypeError, ValueError):
            return 0  # the constructor refuses malformed settings itself

    @staticmethod
    def snapshot_skeleton(spec: Mapping[str, Any]) -> nn.Module:
        """The network ``spec`` describes, on the meta device (no memory): what a snapshot's settings would build."""
        keys = ("block_out_channels", "layers_per_block", "latent_channels", "attention_levels", "image_channels",
                "norm_num_groups", "mid_attention")
        return build_autoencoder_kl(autoencoder_kl_kwargs(**{k: spec[k] for k in keys if k in spec}), meta=True)

    def __init__(
        self,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        latent_channels: int = 4,
        attention_levels: Sequence[int] = (),
        image_channels: int = 3,
        norm_num_groups: int = 32,
        mid_attention: bool = True,
        weights: str | os.PathLike | None = None,
        seed: int = 0,
        posterior: Posterior = "sample",
        scaling_factor: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        downsample: int | None = None,
    ) -> None:
        kwargs = autoencoder_kl_kwargs(
            block_out_channels, layers_per_block, latent_channels, attention_levels, image_channels,
            norm_num_groups, mid_attention,
        )
        if weights is None:
            vae = build_autoencoder_kl(kwargs, seed)
        else:
            from gen.utils.weights import load_weights_file

            path = Path(weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"tokenizer weights file {path} does not exist (a .safetensors state dict of AutoencoderKL)")
            _refuse_generator_snapshot(path)
            state = load_weights_file(path, "an AutoencoderKL state dict (a tokenizer snapshot of train.py "
                                            "method=kl_autoencoder)")
            vae = build_autoencoder_kl(kwargs, meta=True)
            load_state_dict_checked(vae, state, str(path))
        self._init_kl(vae, image_channels, latent_channels, downsample, posterior, scaling_factor, mean, std)

    # Shared by the subclasses, which build their network differently.
    def _init_kl(
        self,
        vae: nn.Module,
        image_channels: int,
        latent_channels: int,
        downsample: int | None,
        posterior: Posterior,
        scaling_factor: float,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        if posterior not in ("sample", "mean"):
            raise ValueError(f"posterior must be 'sample' or 'mean', got {posterior!r}")
        cfg = vae.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if downsample is not None and int(downsample) != factor:
            raise ValueError(f"downsample is {downsample} but this architecture reduces images by {factor}")
        if int(cfg.latent_channels) != int(latent_channels):
            raise ValueError(f"latent_channels is {latent_channels} but the network has {cfg.latent_channels}")
        Tokenizer.__init__(
            self, image_channels=image_channels, latent_channels=latent_channels, downsample=factor,
            mean=mean, std=std, scaling_factor=scaling_factor,
        )
        self.vae = vae.eval()
        self.posterior = posterior
        if self.contiguous_attention:
            from diffusers.models.attention_processor import Attention

            for m in self.vae.modules():
                if isinstance(m, Attention):
                    m.register_forward_hook(_contiguous_output)

    def _like_weights(self, x: torch.Tensor) -> torch.Tensor:
        # diffusers' ModelMixin.device / .dtype walk every submodule (about 1 ms a call); one weight tells the same.
        w = self.vae.decoder.conv_in.weight
        return x.to(device=w.device, dtype=w.dtype)

    def encode_raw(self, x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
        """[-1, 1] images (B, C, H, W) -> posterior sample or mean (B, latent_channels, H / f, W / f)."""
        x = self._like_weights(x)
        dist = self.vae.encode(x).latent_dist
        if self.posterior == "mean":
            return dist.mean
        # diffusers' randn_tensor draws row k from generator k when given a list (and from the one
        # generator otherwise), so this is exactly `AutoencoderKL.encode(x).latent_dist.sample(generator)`.
        return dist.sample(generator=list(generator) if isinstance(generator, Sequence) else generator)

    def decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (B, latent_channels, h, w) -> images (B, C, h * f, w * f), nominally in [-1, 1]."""
        return self.vae.decode(self._like_weights(raw)).sample
