"""Frozen image encoders for representation alignment (REPA, REG): one interface for DINOv2 and the yardstick.

    encoder(uint8 images (B, C, H, W)) -> (patch tokens (B, N, D), class token (B, D)),   N = grid(H)²

Every encoder is an :class:`AlignmentEncoder`; its name picks the backbone behind the same ``forward``:

- ``dinov2_vit{s,b,l,g}14`` and ``dinov2_vit{s,b,l,g}14_reg`` (4 registers): DINOv2 on timm's modules from a
  local weights file, run as the official hub model. Exactly as REPA and REG prepare it
  (sihyun-yu/REPA utils.py ``load_encoders`` and train.py ``preprocess_raw_image``; Martinser/REG, the
  same files): the position table is resampled once to the token grid of ``resolution`` (timm's
  ``resample_abs_pos_embed``, bicubic with antialias), and images go x/255 -> ImageNet mean/std ->
  bicubic resize (no antialias) to 224·H/256, so 256 px images give 16x16 tokens. Patch tokens are
  ``x_norm_patchtokens`` and the class token ``x_norm_clstoken``, both after the final norm; registers
  are dropped. ``preprocess="vavae"`` feeds DINOv2 as VA-VAE's VF loss does instead (hustvl/LightningDiT,
  vavae/ldm/models/foundation_models.py ``forward_dinov2``, with the [-1, 1] images of vavae/ldm/data/imagenet.py):
  x/127.5 - 1, no ImageNet mean/std, bilinear resize (``align_corners=False``, no antialias) to 224·H/256, which
  is VA-VAE's fixed 224 at its 256 px (the only side its ``reshape`` to H/16 tokens admits); the timm model it runs
  resamples the position table to the 16x16 grid at forward time, as the table resampled once here.
- ``foundation-<dataset>`` (``mnist5k``, ``shapes``): the yardstick's separately trained residual network
  (``eval.classifier.FoundationNet``, another architecture and seed than the FID LeNet),
  trained and cached on first use. Images go to [-1, 1] without resizing; the 4x4 grid of a 32 px image
  gives the patch tokens and their mean the class token. Kept so that records of old runs rebuild.
- ``foundation2-<dataset>``: the stronger second version (``eval.classifier.FoundationNet2``: stride 4, one
  self-attention block, 24 epochs with affine augmentation), whose 8x8 grid at 32 px is the token grid of a
  patch-4 backbone, so REPA aligns token to token with no pooling, as on ImageNet. Same preprocessing.

Encoders are frozen: parameters without gradients, always in eval mode, ``forward`` under ``no_grad``
(in whatever autocast the caller runs). A method holds one with ``gen.utils.frozen.hold_frozen`` so it
stays out of optimizers, training states and snapshots, and records ``identity()`` (name, class and
weights hash) to refuse resuming with another encoder. ``config`` is a ``_target_`` spec that
``gen.utils.build.build`` turns back into the same encoder.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eval.features import (
    DINOV2_FILES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WeightsNotFoundError,
    check_uint8_images,
    dinov2_forward_tokens,
    load_dinov2_timm,
    to_rgb,
)
from gen.utils.build import capture_config
from gen.utils.frozen import freeze, frozen_identity

# Hub names (facebookresearch/dinov2 hubconf.py, REPA's ``--enc-type dinov2-vit-b`` etc.) -> timm archs.
DINOV2_ENCODERS: dict[str, str] = {
    f"dinov2_vit{s}14{'_reg' if reg else ''}": f"vit_{size}_patch14{'_reg4' if reg else ''}_dinov2"
    for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for reg in (False, True)
}
PREPROCESSING = ("repa", "vavae")  # how DINOv2 reads the images (module docstring)
YARDSTICK_DATASETS: dict[str, tuple[int, int]] = {"mnist5k": (1, 10), "shapes": (3, 6)}  # channels, classes


def encoder_names() -> list[str]:
    """Every name :class:`AlignmentEncoder` accepts."""
    return sorted(DINOV2_ENCODERS) + [f"{k}-{d}" for k in FOUNDATION_KINDS for d in sorted(YARDSTICK_DATASETS)]


FOUNDATION_KINDS: tuple[str, ...] = ("foundation", "foundation2")  # eval.classifier recipes behind the names


def _foundation_name(name: str) -> tuple[str, str] | None:
    """``"foundation2-mnist5k"`` -> ``("foundation2", "mnist5k")``; None for any other name."""
    kind, _, dataset = name.partition("-")
    return (kind, dataset) if kind in FOUNDATION_KINDS and dataset in YARDSTICK_DATASETS else None


class _DINOv2(nn.Module):
    """DINOv2 backbone with REPA's position table and preprocessing (see the module docstring)."""

    PATCH = 14
    STRIDE = 16  # image pixels per token after the 224/256 resize

    def __init__(self, arch: str, resolution: int, net: nn.Module, preprocess: str = "repa") -> None:
        from timm.layers import resample_abs_pos_embed

        super().__init__()
        self.net = net
        self.vavae = preprocess == "vavae"
        grid = self.grid(resolution)
        # REPA resamples the hub model's table (class position first) once to the training grid; timm's
        # register models keep the class position in cls_token, so only patch rows are resampled there.
        prefix = 0 if net.no_embed_class else 1
        table = resample_abs_pos_embed(net.pos_embed.data, [grid, grid], num_prefix_tokens=prefix)
        net.pos_embed = nn.Parameter(table, requires_grad=False)
        self.num_prefix = 1 + int(getattr(net, "num_reg_tokens", 0))
        self.dim = int(net.num_features)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def grid(self, resolution: int) -> int:
        if resolution % self.STRIDE:
            raise ValueError(
                f"DINOv2 encoders resize images to 224·H/256 and need H to be a multiple of {self.STRIDE} "
                f"(H/16 tokens per side), got H={resolution}; resize or pad the images first"
            )
        return resolution // self.STRIDE

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        side = self.grid(images.shape[-1]) * self.PATCH  # 224·H/256
        if self.vavae:  # VA-VAE's VF loss: raw [-1, 1] pixels, bilinear, no ImageNet normalisation
            x = to_rgb(images).float() / 127.5 - 1.0
            return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
        x = to_rgb(images).float() / 255.0
        x = (x - self.mean) / self.std
        return F.interpolate(x, size=(side, side), mode="bicubic")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = dinov2_forward_tokens(self.net, x)  # (B, 1 + registers + N, D)
        return tokens[:, self.num_prefix :], tokens[:, 0]


class _Foundation(nn.Module):
    """The yardstick's FoundationNet (8 pixels per token) or FoundationNet2 (4): [-1, 1] input, no resize."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.STRIDE = int(getattr(net, "STRIDE", 8))  # FoundationNet: stem and two residual stages with stride 2
        self.in_channels = int(net.config["in_channels"])
        self.dim = int(net.feature_dim)

    def grid(self, resolution: int) -> int:
        if resolution % self.STRIDE:
            raise ValueError(f"the foundation encoder needs a side that is a multiple of {self.STRIDE}, got {resolution}")
        return resolution // self.STRIDE

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        from eval.classifier import to_unit_range

        if images.shape[1] != self.in_channels:
            if images.shape[1] == 1:
                images = images.expand(-1, self.in_channels, -1, -1)
            else:
                raise ValueError(f"this foundation encoder takes {self.in_channels}-channel images, got shape {tuple(images.shape)}")
        return to_unit_range(images)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.net.tokens(x)  # (B, N, D)
        return tokens, tokens.mean(dim=1)  # the class token is the global embedding (FoundationNet.features)


@capture_config
class AlignmentEncoder(nn.Module):
    """A frozen encoder: uint8 images (B, C, H, W) -> (patch tokens (B, N, D), class token (B, D)).

    Args:
        name: ``dinov2_vit{s,b,l,g}14[_reg]``, ``foundation-{mnist5k,shapes}`` or ``foundation2-{mnist5k,shapes}``
            (``encoder_names()``).
        resolution: side of the training images; DINOv2's position table is resampled for it once, as
            REPA does (other sides still work: the table is then interpolated at forward time as in
            the official model). Must be a multiple of 16 (DINOv2), 8 (foundation) or 4 (foundation2).
        weights_path: DINOv2 weights file (Meta's ``dinov2_vit*14[_reg4]_pretrain.pth`` or timm's
            safetensors); by default looked up in ``${GEN_CACHE:-~/.cache/gen}/weights``.
        cache_dir: DINOv2 weights folder, or the yardstick cache for ``foundation*-*``.
        download: fetch Meta's DINOv2 file when missing (needs internet).
        random_init: random weights of the identical architecture (tests only), seeded by ``seed``.
        preprocess: how DINOv2 reads the images: ``"repa"`` (REPA and REG: ImageNet mean/std, bicubic) or
            ``"vavae"`` (VA-VAE's VF loss: [-1, 1], bilinear); see the module docstring. The ``foundation-*``
            encoders have one preprocessing ([-1, 1], no resize) and accept either name.

    Attributes:
        dim: token width D.
        num_prefix: tokens before the patches in the backbone's sequence (DINOv2: 1 + registers).
        config: the ``_target_`` spec of this encoder.
    """

    def __init__(
        self,
        name: str,
        resolution: int = 256,
        weights_path: str | None = None,
        cache_dir: str | None = None,
        download: bool = False,
        random_init: bool = False,
        seed: int = 0,
        preprocess: str = "repa",
    ) -> None:
        super().__init__()
        if preprocess not in PREPROCESSING:
            raise ValueError(f"alignment encoder preprocess={preprocess!r} is not one of {list(PREPROCESSING)}")
        self.name = name
        self.resolution = resolution
        self.preprocess = preprocess
        if name in DINOV2_ENCODERS:
            arch = DINOV2_ENCODERS[name]
            try:
                net, self.weights_file_sha256 = load_dinov2_timm(arch, weights_path, cache_dir, download, random_init, seed)
            except WeightsNotFoundError as e:
                raise WeightsNotFoundError(
                    f"alignment encoder {name!r} needs {DINOV2_FILES[arch]}: {e} In a config, set the encoder's "
                    "weights_path to the file."
                ) from e
            self.backbone: nn.Module = _DINOv2(arch, resolution, net, preprocess)
            self.num_prefix = self.backbone.num_prefix
        elif (found := _foundation_name(name)) is not None:
            self.backbone = _Foundation(self._foundation_net(*found, cache_dir, random_init, seed))
            self.num_prefix = 0
        else:
            raise ValueError(f"unknown alignment encoder {name!r}; choose from {encoder_names()}")
        self.grid(resolution)  # refuse a resolution the encoder cannot tile
        self.dim = self.backbone.dim
        self._identity: dict[str, str] | None = None
        freeze(self)

    def _foundation_net(self, kind: str, dataset: str, cache_dir: str | None, random_init: bool, seed: int) -> nn.Module:
        from eval.classifier import RECIPES, build_network, load_or_train_classifier

        if not random_init:
            ys = load_or_train_classifier(dataset, cache_dir, kind=kind)  # type: ignore[arg-type]  # trained on first use
            self.weights_file_sha256 = ys.weights_sha256
            return ys.net
        channels, classes = YARDSTICK_DATASETS[dataset]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_network(RECIPES[kind], channels, classes)  # type: ignore[index]
        self.weights_file_sha256 = f"random-init-{seed}"
        return net

    def grid(self, resolution: int) -> int:
        """Token grid side for images of side ``resolution`` (DINOv2: resolution/16; foundation: /8; foundation2: /4)."""
        return self.backbone.grid(resolution)

    def train(self, mode: bool = True) -> AlignmentEncoder:
        """Stays in eval mode: a frozen encoder never trains."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B, C, H, W), H == W -> (patch tokens (B, grid(H)², D), class token (B, D))."""
        check_uint8_images(images)
        if images.shape[-1] != images.shape[-2]:
            raise ValueError(f"alignment encoders take square images, got shape {tuple(images.shape)}")
        self.grid(images.shape[-1])
        device = next(self.parameters()).device
        return self.backbone(self.backbone.preprocess(images.to(device)))

    def identity(self) -> dict[str, Any]:
        """``{"name", "class", "sha256"}``: what a training state records and resuming checks (computed once)."""
        if self._identity is None:
            # Another preprocessing gives other targets from the same weights; the default stays unrecorded so
            # that states written before the option existed still resume.
            extra = {"preprocess": self.preprocess} if self.preprocess != "repa" else {}
            self._identity = {"name": self.name, **extra, **frozen_identity(self)}
        return dict(self._identity)

