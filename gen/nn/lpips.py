"""LPIPS (VGG), the perceptual distance of "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric" (Zhang et al., 2018; richzhang/PerceptualSimilarity, lpips/lpips.py, version 0.1), in two variants.

* ``variant="lpips"`` (default): torchmetrics' port of the reference implementation
  (``torchmetrics.functional.image.lpips``): inputs in [-1, 1] through LPIPS' ScalingLayer, VGG16 features at relu1_2 ..
  relu5_3 (max pooling), unit-normalised over channels (``f / sqrt(|f|^2 + 1e-8)``, torchmetrics' form), squared
  differences weighted by the learned 1x1 "linear" heads, averaged over space and summed over layers.
* ``variant="piq"``: ``piq.LPIPS(replace_pooling=True)`` (photosynthesis-team/piq, piq/perceptual.py, ``LPIPS`` and its
  base ``ContentLoss``; piq 0.8.0), the distance that 2-rectified flow++ (sangyun884/rfpp, train.py,
  ``loss_lpips(x * 0.5 + 0.5, y * 0.5 + 0.5)``) and consistency distillation (openai/consistency_models,
  cm/karras_diffusion.py) train with. Against the reference: VGG16's max-pooling layers become 2x2 average
  pooling; images mapped to [0, 1] are standardised with ImageNet's mean and std (the same affine map as the
  ScalingLayer on [-1, 1]: its constants are ``2 mean - 1`` and ``2 std``, so only rounding differs); features are
  normalised as ``f / (|f| + 1e-10)``; the heads multiply the squared differences channel by channel, and all
  layers' and channels' spatial means are summed at once (the same sum as the 1x1 convolutions, in another order).

The linear heads are richzhang's v0.1 VGG heads, shipped inside the torchmetrics package (``lpips_models/vgg.pth``);
piq downloads its own heads file (``lpips_weights.pt`` of its photosynthesis.metrics v0.4.0 release: a list of five
per-channel weight tensors, which its code multiplies into (B, C, h, w) maps), which ``heads=<path>`` loads instead;
that it holds the same v0.1 values is likely (piq reports the reference's correlations) but was not checked offline. The VGG16 backbone is torchvision's
ImageNet file ``vgg16-397923af.pth`` for both (piq: ``vgg16(pretrained=True)``); it is never downloaded silently
(``gen.utils.weights.resolve_weights``), and every file is read with ``weights_only=True``.

Used frozen: as a reconstruction metric (``eval.recon``), as a loss term of tokenizer training, and as the perceptual
term of the distillation losses (``distill.perceptual``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from gen.utils.ckpt import unreadable_reason
from gen.utils.weights import WeightsNotFoundError, file_sha256, load_weights_file, resolve_weights

VGG16_FILE = "vgg16-397923af.pth"
VGG16_SHA256_PREFIX = "397923af"  # torch.hub names files by the first digits of their SHA-256
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILE
PIQ_HEADS_URL = "https://github.com/photosynthesis-team/photosynthesis.metrics/releases/download/v0.4.0/lpips_weights.pt"

Variant = Literal["lpips", "piq"]
VARIANTS: tuple[str, ...] = get_args(Variant)
HEAD_CHANNELS = (64, 128, 256, 512, 512)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# piq/perceptual.py IMAGENET_MEAN, IMAGENET_STD and EPS (its feature normalisation's constant).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIQ_EPS = 1e-10


def _lin_heads_path() -> Path:
    import torchmetrics.functional.image.lpips as tm_lpips

    return Path(tm_lpips.__file__).resolve().parent / "lpips_models" / "vgg.pth"


def make_random_vgg16_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write randomly initialised VGG16 convolution weights in torchvision's key layout (``features.*``), for tests."""
    from torchvision.models import vgg16

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = vgg16(weights=None).features
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def load_lpips_heads(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The five linear heads as ``{"lin<i>.model.1.weight": (1, C_i, 1, 1)}`` (torchmetrics' key layout).

    Reads richzhang's / torchmetrics' ``vgg.pth`` (a state dict with those keys) or piq's ``lpips_weights.pt`` (a list
    of five tensors of C_i values each, C = 64, 128, 256, 512, 512).

    Raises:
        WeightsNotFoundError: no such file (the message names piq's download address).
        ValueError: a file that holds neither layout.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"LPIPS heads file {path} does not exist (expected torchmetrics' lpips_models/vgg.pth "
                                   f"or piq's lpips_weights.pt, from {PIQ_HEADS_URL})")
    try:
        heads = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch signals foreign or truncated files with many exception types
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise ValueError(f"LPIPS heads file {path} is not readable ({unreadable_reason(e)})") from e
    keys = [f"lin{i}.model.1.weight" for i in range(len(HEAD_CHANNELS))]
    if isinstance(heads, dict) and all(k in heads for k in keys):
        heads = [heads[k] for k in keys]
    if (not isinstance(heads, (list, tuple)) or len(heads) != len(HEAD_CHANNELS)
            or not all(isinstance(w, torch.Tensor) and w.numel() == c for w, c in zip(heads, HEAD_CHANNELS))):
        raise ValueError(f"LPIPS heads file {path} holds neither richzhang's / torchmetrics' VGG heads "
                         f"(lin0..lin4.model.1.weight) nor piq's list of five tensors of {list(HEAD_CHANNELS)} values")
    return {k: w.detach().float().reshape(1, c, 1, 1) for k, w, c in zip(keys, heads, HEAD_CHANNELS)}


class LPIPS(nn.Module):
    """LPIPS-VGG distance between two image batches; frozen, in eval mode.

    Args:
        vgg_weights: torchvision's ``vgg16-397923af.pth`` (or any state dict with its ``features.*`` keys);
            None: looked up as ``vgg16-397923af.pth`` in ``${GEN_CACHE:-~/.cache/gen}/weights`` and torch.hub's
            ``checkpoints`` folder.
        cache_dir: weights folder instead of the default.
        download: fetch the VGG16 file from download.pytorch.org when missing.
        variant: ``"lpips"``: the reference LPIPS; ``"piq"``: piq's ``LPIPS(replace_pooling=True)``, as 2-rectified
            flow++ and consistency distillation use it (module docstring: the differences).
        heads: the linear heads' file (richzhang's ``vgg.pth`` or piq's ``lpips_weights.pt``); None: the v0.1 heads
            that torchmetrics ships.

    Attributes:
        weights_sha256: SHA-256 of the VGG16 file; ``heads_sha256``: of the linear heads.
    """

    def __init__(
        self,
        vgg_weights: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        download: bool = False,
        variant: Variant = "lpips",
        heads: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        from torchmetrics.functional.image.lpips import _LPIPS

        if variant not in VARIANTS:
            raise ValueError(f"LPIPS variant must be one of {list(VARIANTS)} (the reference LPIPS or piq's, as "
                             f"2-rectified flow++ uses it), got {variant!r}")
        self.variant = variant
        path, sha = resolve_weights(VGG16_FILE, VGG16_SHA256_PREFIX, VGG16_URL, vgg_weights, cache_dir, download)
        # Built on the meta device (no torchvision download, no unpickling inside torchmetrics, no 138M-parameter
        # random init of the full VGG16); every parameter is assigned below. The input scaling constants are
        # non-persistent buffers made on the CPU either way.
        with torch.device("meta"):
            net = _LPIPS(pretrained=False, net="vgg", pnet_rand=True)
        vgg = load_weights_file(path, f"torchvision's VGG16 weights ({VGG16_FILE})")
        heads_path = Path(heads).expanduser() if heads is not None else _lin_heads_path()
        lins = load_lpips_heads(heads_path)
        state = net.state_dict()
        missing = []
        for key in state:
            if key.startswith("net.slice"):
                _, _, index, param = key.split(".")  # net.slice<k>.<features index>.<weight|bias>
                source = f"features.{index}.{param}"
                if source not in vgg:
                    missing.append(source)
                else:
                    state[key] = vgg[source]
            elif key.startswith("lins."):  # torchmetrics registers each head twice: lin<i> and lins.<i>
                state[key] = lins["lin" + key[len("lins."):]]
            elif key.startswith("lin"):
                state[key] = lins[key]
        if missing:
            raise ValueError(f"{path} is not a torchvision VGG16 state dict: it lacks {missing[:3]} ({len(missing)} keys)")
        net.load_state_dict(state, strict=True, assign=True)
        if variant == "piq":
            # piq's ContentLoss.replace_pooling: every MaxPool2d of VGG16 becomes AvgPool2d(2, 2, padding 0). The
            # slices hold pool1..pool4; pool5 comes after relu5_3, which piq computes but never reads.
            for k in range(1, 6):
                block = getattr(net.net, f"slice{k}")
                for name, child in block.named_children():
                    if isinstance(child, nn.MaxPool2d):
                        setattr(block, name, nn.AvgPool2d(kernel_size=2, stride=2, padding=0))
            # Persistent, so that the state-dict hash of a frozen LPIPS (gen.utils.frozen, checked on resume) tells
            # the variants apart: their weights are the same files.
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.net = net.eval().requires_grad_(False)
        self.weights_sha256 = sha
        self.heads_sha256 = file_sha256(heads_path)
        self.weights_path = path

    def train(self, mode: bool = True) -> LPIPS:
        # A metric / frozen loss network: dropout in the heads must stay off.
        super().train(False)
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3 or 1, H, W) each -> distances (B,)."""
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes two (B, 3|1, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if self.variant == "piq":
            return self._piq(x.float(), y.float())
        return self.net(x.float(), y.float()).flatten()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """piq's ``get_features`` with ``normalize_features=True``: (B, 3, H, W) in [-1, 1] -> 5 x (B, C_i, h_i, w_i)."""
        h = (x * 0.5 + 0.5 - self.mean) / self.std  # rfpp's map to [0, 1], then piq's ImageNet standardisation
        feats = []
        for k in range(1, 6):
            h = getattr(self.net.net, f"slice{k}")(h)
            feats.append(h / (torch.sqrt(torch.sum(h**2, dim=1, keepdim=True)) + PIQ_EPS))
        return feats

    def _piq(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """piq's ContentLoss.forward with the MSE distance and ``reduction="none"``: (B,)."""
        heads = [lin.model[-1].weight for lin in self.net.lins]  # (1, C_i, 1, 1) each
        dists = [(fx - fy) ** 2 for fx, fy in zip(self._features(x), self._features(y))]
        # The same order of sums as piq: each layer's weighted spatial means, concatenated, then one sum.
        return torch.cat([(d * w).mean(dim=[2, 3]) for d, w in zip(dists, heads)], dim=1).sum(dim=1)

    def identity(self) -> dict[str, str]:
        """Name and weight hashes, recorded next to every LPIPS number."""
        name = "lpips-vgg-v0.1" if self.variant == "lpips" else "lpips-vgg-v0.1-piq-avgpool"
        return {"name": name, "vgg_sha256": self.weights_sha256, "heads_sha256": self.heads_sha256}
