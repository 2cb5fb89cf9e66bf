"""Perceptual distances for the distillation losses: ``distance(a, b) -> (B,)`` on images in [-1, 1], differentiable
in ``a`` (the student's estimate), the network frozen.

* LPIPS-VGG is ``gen.nn.lpips.LPIPS`` (Zhang et al. 2018; local torchvision VGG16 weights, a clear error naming the
  file when they are missing). 2-rectified flow++ (sangyun884/rfpp ``train.py``) and consistency distillation
  (openai/consistency_models ``cm/karras_diffusion.py``) both upsample images below 224 px bilinearly to 224 before
  LPIPS, and both compute it with ``piq.LPIPS(replace_pooling=True, reduction="none")`` on images mapped to [0, 1]
  (photosynthesis-team/piq ``piq/perceptual.py``: VGG16 with average pooling, ImageNet standardisation), not with the
  reference LPIPS: that is ``gen.nn.lpips.LPIPS(variant="piq")``, equal to piq 0.8.0 to float32 rounding on random
  weights (bench/README.md, "piq's LPIPS against the official code"). :class:`Resized` does the upsampling around
  any distance.
* :class:`TokenDistance` is the yardstick's stand-in, since LPIPS' VGG weights cannot be fetched on this machine: the
  LPIPS recipe (features unit-normalised over channels, squared differences averaged over positions) on the patch
  tokens of the yardstick's *foundation* encoder (``eval.encoders.AlignmentEncoder``, ``foundation2-<data>``). That
  network is trained separately from the FID network (another architecture and seed), so the loss does not optimise
  the yardstick's own FID features, as LPIPS is not Inception; it has no learned per-channel heads (uniform weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Resized(nn.Module):
    """``distance(up(a), up(b))`` with both batches resized bilinearly to ``size`` x ``size`` (when smaller).

    Args:
        distance: a module ``(a, b) -> (B,)`` on images in [-1, 1] (e.g. ``gen.nn.lpips.LPIPS``).
        size: the side fed to it (224 in rfpp and consistency_models).
    """

    def __init__(self, distance: nn.Module, size: int = 224) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"perceptual.size must be >= 1, got {size}")
        self.distance, self.size = distance, int(size)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape[-1] < self.size:
            a = F.interpolate(a.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
            b = F.interpolate(b.float(), size=(self.size, self.size), mode="bilinear", align_corners=False)
        return self.distance(a, b)


class TokenDistance(nn.Module):
    """LPIPS' recipe on an encoder's patch tokens (the yardstick's stand-in; module docstring).

    ``d(a, b) = mean_n || t_n(a) / |t_n(a)| - t_n(b) / |t_n(b)| ||^2`` over the N tokens, (B,). Gradients reach ``a``
    through the frozen network (the encoder's own ``forward`` runs without gradients and takes uint8 images, so the
    network's ``tokens`` is called directly on the [-1, 1] images, which is the foundation encoders' preprocessing).

    Args:
        encoder: an ``eval.encoders.AlignmentEncoder`` with a ``foundation*`` network (built from its config spec).
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        net = getattr(getattr(encoder, "backbone", None), "net", None)
        if net is None or not hasattr(net, "tokens"):
            raise ValueError("perceptual.encoder must be a foundation encoder (eval.encoders.AlignmentEncoder with "
                             "name foundation2-<data>): the stand-in reads its network's patch tokens")
        self.net = net
        self.in_channels = int(net.config["in_channels"])
        self.encoder_name = str(getattr(encoder, "name", type(net).__name__))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        if a.shape[1] != self.in_channels:
            a, b = a.expand(-1, self.in_channels, -1, -1), b.expand(-1, self.in_channels, -1, -1)
        ta = F.normalize(self.net.tokens(a.float()), dim=-1, eps=1e-10)  # (B, N, D)
        with torch.no_grad():
            tb = F.normalize(self.net.tokens(b.float()), dim=-1, eps=1e-10)
        return (ta - tb).pow(2).sum(-1).mean(-1)
