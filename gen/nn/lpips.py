"""LPIPS (VGG), the perceptual distance of "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric" (Zhang et al., 2018; richzhang/PerceptualSimilarity, lpips/lpips.py, version 0.1).

The network is torchmetrics' port of the reference implementation (``torchmetrics.functional.image.lpips``):
VGG16 features at relu1_2 .. relu5_3, unit-normalised over channels, squared differences weighted by the
learned 1x1 "linear" heads, averaged over space and summed over layers. The linear heads ship inside the
torchmetrics package (``lpips_models/vgg.pth``, the v0.1 weights). The VGG16 backbone is torchvision's ImageNet
file ``vgg16-397923af.pth``; it is never downloaded silently (``gen.utils.weights.resolve_weights``), and both
files are read with ``weights_only=True``.

Used frozen: as a reconstruction metric (``eval.recon``) and as a loss term of tokenizer training.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from gen.utils.weights import file_sha256, load_weights_file, resolve_weights

VGG16_FILE = "vgg16-397923af.pth"
VGG16_SHA256_PREFIX = "397923af"  # torch.hub names files by the first digits of their SHA-256
VGG16_URL = "https://download.pytorch.org/models/" + VGG16_FILE


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


class LPIPS(nn.Module):
    """LPIPS-VGG distance between two image batches; frozen, in eval mode.

    Args:
        vgg_weights: torchvision's ``vgg16-397923af.pth`` (or any state dict with its ``features.*`` keys);
            None: looked up as ``vgg16-397923af.pth`` in ``${GEN_CACHE:-~/.cache/gen}/weights`` and torch.hub's
            ``checkpoints`` folder.
        cache_dir: weights folder instead of the default.
        download: fetch the VGG16 file from download.pytorch.org when missing.

    Attributes:
        weights_sha256: SHA-256 of the VGG16 file; ``heads_sha256``: of the linear heads.
    """

    def __init__(
        self,
        vgg_weights: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        download: bool = False,
    ) -> None:
        super().__init__()
        from torchmetrics.functional.image.lpips import _LPIPS

        path, sha = resolve_weights(VGG16_FILE, VGG16_SHA256_PREFIX, VGG16_URL, vgg_weights, cache_dir, download)
        # Built on the meta device (no torchvision download, no unpickling inside torchmetrics, no 138M-parameter
        # random init of the full VGG16); every parameter is assigned below. The input scaling constants are
        # non-persistent buffers made on the CPU either way.
        with torch.device("meta"):
            net = _LPIPS(pretrained=False, net="vgg", pnet_rand=True)
        vgg = load_weights_file(path, f"torchvision's VGG16 weights ({VGG16_FILE})")
        heads_path = _lin_heads_path()
        heads = torch.load(heads_path, map_location="cpu", weights_only=True)
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
                state[key] = heads["lin" + key[len("lins."):]]
            elif key.startswith("lin"):
                state[key] = heads[key]
        if missing:
            raise ValueError(f"{path} is not a torchvision VGG16 state dict: it lacks {missing[:3]} ({len(missing)} keys)")
        net.load_state_dict(state, strict=True, assign=True)
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
        return self.net(x.float(), y.float()).flatten()

    def identity(self) -> dict[str, str]:
        """Name and weight hashes, recorded next to every LPIPS number."""
        return {"name": "lpips-vgg-v0.1", "vgg_sha256": self.weights_sha256, "heads_sha256": self.heads_sha256}
