"""Feature extractors behind one small interface, and the loading of their weights.

Every extractor maps uint8 images (B, 3 or 1, H, W) to float features (B, D) and describes itself in a
``manifest()`` (extractor name, weights SHA-256, resize mode, feature dim). Statistics files carry that
manifest, and loading them checks it (``eval.stats``), so features from different networks or resize
modes are never compared.

- ``InceptionFeatures``: the FID network (TF "inception-2015-12-05" ported by torch-fidelity; the same
  module class that torchmetrics' ``FrechetInceptionDistance`` builds). pool3 (2048-d) for FID and
  precision/recall, the 1008 bias-free logits for the Inception Score, and the first 7 channels of the
  ``mixed_6/conv`` map (2023-d) for sFID.
- ``DINOv2Features``: a timm DINOv2 ViT, class token after the final norm (FD-DINOv2).
- ``YardstickFeatures``: the penultimate layer of the small classifier trained on the built-in data
  (``eval.classifier``; DESIGN.md §5).

Pretrained weights are never fetched silently: a file is looked up at an explicit path, then in the
cache directories, and downloaded only with ``download=True``. A missing file raises
``WeightsNotFoundError`` naming the file, its expected SHA-256 and where to put it. Tests use randomly
initialised networks of the identical architecture (``make_random_inception_weights``).
"""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

# Weights lookup is shared with tokenizers and LPIPS; re-exported here, where it was first defined.
from gen.utils.weights import WeightsNotFoundError as WeightsNotFoundError
from gen.utils.weights import file_sha256 as file_sha256
from gen.utils.weights import resolve_weights
from gen.utils.weights import weights_cache_dir as weights_cache_dir

InceptionResize = Literal["tf1-bilinear", "bilinear-antialias"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE

# DINOv2 weights in timm's format (Hugging Face hub repo ``timm/<arch>.lvd142m``, file
# ``model.safetensors``) or Meta's original ``dinov2_vit*14_pretrain.pth``; the checkpoint filter of
# timm converts either. Their hashes are not pinned here: the file's SHA-256 is recorded in the manifest.
DINOV2_FILES: dict[str, str] = {
    "vit_small_patch14_dinov2": "dinov2_vits14_pretrain.pth",
    "vit_base_patch14_dinov2": "dinov2_vitb14_pretrain.pth",
    "vit_large_patch14_dinov2": "dinov2_vitl14_pretrain.pth",
    "vit_giant_patch14_dinov2": "dinov2_vitg14_pretrain.pth",
}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{short}/{file}"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Interface.


class FeatureExtractor(ABC):
    """uint8 images (B, C, H, W) -> float32 features (B, dim), with a manifest naming the network.

    Attributes:
        name: extractor name, e.g. ``inception-v3-pool3`` or ``lenet-mnist5k-v1``.
        dim: feature dimension D.
        resize: how images are brought to the network's input size.
        weights_sha256: SHA-256 of the weights that were loaded.
    """

    name: str
    dim: int
    resize: str
    weights_sha256: str

    @abstractmethod
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3|1, H, W) -> float32 (B, dim)."""

    def manifest(self) -> dict[str, Any]:
        """The identity of these features, stored with every statistics file."""
        return {"extractor": self.name, "weights_sha256": self.weights_sha256, "resize": self.resize, "dim": self.dim}


def check_uint8_images(images: torch.Tensor, channels: Sequence[int] = (1, 3)) -> None:
    """Refuse anything but uint8 (B, C, H, W) with C in ``channels``; the message says what was given."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor of uint8 images, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images in [0, 255], got dtype {images.dtype}; convert with gen.data.transforms.to_uint8")
    if images.ndim != 4 or images.shape[1] not in channels:
        raise ValueError(f"expected images (B, C, H, W) with C in {tuple(channels)}, got shape {tuple(images.shape)}")


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey images are repeated to 3 channels (the usual convention for Inception on MNIST)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# ----------------------------------------------------------------------------------------------
# Inception-v3.


def _inception_class() -> type[nn.Module]:
    # torchmetrics' subclass of torch-fidelity's module: identical weights and layers, plus the choice
    # between TF1-compatible bilinear resizing and torch's antialiased bilinear resizing.
    from torchmetrics.image.fid import NoTrainInceptionV3

    class _Inception(NoTrainInceptionV3):
        # torch-fidelity's constructor unpickles its weights file with weights_only=False; it is handed an
        # empty placeholder instead, and the real state dict is loaded afterwards with weights_only=True.
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            if isinstance(state_dict, dict) and not state_dict:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return _Inception


def build_inception(
    state_dict: dict[str, torch.Tensor] | None, resize: InceptionResize = "tf1-bilinear"
) -> nn.Module:
    """The torch-fidelity / torchmetrics Inception-v3 module, with given weights or PyTorch's default init."""
    if resize not in ("tf1-bilinear", "bilinear-antialias"):
        raise ValueError(f"resize must be 'tf1-bilinear' or 'bilinear-antialias', got {resize!r}")
    with tempfile.TemporaryDirectory(prefix="gen-inception-") as tmp:
        placeholder = os.path.join(tmp, "empty.pth")
        torch.save({}, placeholder)
        net = _inception_class()(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=placeholder,
            antialias=resize == "bilinear-antialias",
        )
    if state_dict is not None:
        nn.Module.load_state_dict(net, state_dict, strict=True)
    return net.eval().requires_grad_(False)


def make_random_inception_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write randomly initialised weights of the exact FID Inception architecture (for tests and benches).

    Convolutions get He-normal weights and the batch-norm statistics are set from one forward pass over
    noise images, so features keep a sensible scale through all 94 layers (PyTorch's default init
    shrinks them towards zero). The file is a plain state dict, loadable by torch-fidelity/torchmetrics.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_inception(None)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration pass
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features**-0.5)
                nn.init.zeros_(m.bias)
        noise = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
        nn.Module.train(net, True)  # NoTrainInceptionV3.train() refuses training mode
        with torch.no_grad():
            net._torch_fidelity_forward(noise)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.clone() for k, v in net.state_dict().items()}, path)
    return path


class InceptionFeatures(FeatureExtractor):
    """Inception-v3 pool3 features (2048-d), the FID network.

    Args:
        weights_path: explicit weights file; else looked up in the cache (see ``resolve_weights``).
        resize: ``tf1-bilinear`` (torch-fidelity, ADM-compatible; default) or ``bilinear-antialias``
            (torchmetrics' default). Images of any size are resized to 299x299 inside.
        cache_dir: folder for the weights file.
        download: fetch the weights when missing (needs internet).
        device: where the network runs.
        channels_last: run the convolutions in NHWC layout (about 1.4x faster on CPU with oneDNN, also
            faster with cuDNN); features differ from the NCHW run only by float32 rounding (~1e-4).
    """

    SPATIAL_CHANNELS = 7  # sFID: first 7 channels of mixed_6/conv, 7 * 17 * 17 = 2023 features

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        resize: InceptionResize = "tf1-bilinear",
        cache_dir: str | os.PathLike | None = None,
        download: bool = False,
        device: torch.device | str = "cpu",
        channels_last: bool = True,
    ) -> None:
        path, sha = resolve_weights(INCEPTION_FILE, INCEPTION_SHA256, INCEPTION_URL, weights_path, cache_dir, download)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.net = build_inception(state, resize).to(device)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.device = torch.device(device)
        self.name = "inception-v3-pool3"
        self.dim = 2048
        self.resize = resize
        self.weights_sha256 = sha
        self.weights_path = path

    @torch.no_grad()
    def extract(self, images: torch.Tensor, spatial: bool = False) -> dict[str, torch.Tensor]:
        """All Inception outputs of one forward pass.

        Returns:
            ``pool3`` (B, 2048), ``logits`` (B, 1008) without the bias (as ADM's Inception Score), and with
            ``spatial=True`` also ``spatial`` (B, 2023): the first 7 channels of the 17x17 output of the
            1x1 branch of Mixed_6d (the TF graph's ``mixed_6/conv``, after its ReLU), flattened in
            (H, W, C) order.
        """
        check_uint8_images(images)
        captured: list[torch.Tensor] = []
        hook = None
        if spatial:
            hook = self.net.Mixed_6d.branch1x1.register_forward_hook(
                # (B, 7, 17, 17) -> flattened in (H, W, C) order, as ADM's NHWC TF graph does, so our
                # mu_s/sigma_s are comparable with the ones in ADM reference batches.
                lambda _m, _i, out: captured.append(out[:, : self.SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1))
            )
        try:
            pool3, logits = self.net._torch_fidelity_forward(to_rgb(images).to(self.device))
        finally:
            if hook is not None:
                hook.remove()
        out = {"pool3": pool3.float(), "logits": logits.float()}
        if spatial:
            out["spatial"] = captured[0].float()
        return out

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_uint8_images(images)
        # Only pool3: stop before the logits by asking the network for the first feature only.
        self.net.features_list = ["2048"]
        try:
            (pool3,) = self.net._torch_fidelity_forward(to_rgb(images).to(self.device))
        finally:
            self.net.features_list = ["2048", "logits_unbiased"]
        return pool3.float()


# ----------------------------------------------------------------------------------------------
# DINOv2.


class DINOv2Features(FeatureExtractor):
    """DINOv2 class-token features through timm (FD-DINOv2, and the REPA/REG encoders).

    Images are resized to ``image_size`` with antialiased bicubic interpolation on float [0, 1] values
    (EDM2's "torch" mode, close to dgm-eval's PIL resize), then normalised with ImageNet mean/std.

    Args:
        arch: timm name, e.g. ``vit_large_patch14_dinov2`` (FD-DINOv2) or ``vit_base_patch14_dinov2``.
        weights_path: explicit weights file (timm safetensors or Meta's ``.pth``); else the cache.
        random_init: use random weights (tests only); the manifest records ``random-init-<seed>``.
        seed: seed of the random init.
        image_size: side fed to the ViT (multiple of 14).
        download: fetch Meta's file when missing (needs internet).
    """

    def __init__(
        self,
        arch: str = "vit_large_patch14_dinov2",
        weights_path: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        download: bool = False,
        random_init: bool = False,
        seed: int = 0,
        image_size: int = 224,
        device: torch.device | str = "cpu",
    ) -> None:
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        if arch not in DINOV2_FILES:
            raise ValueError(f"unknown DINOv2 arch {arch!r}; choose from {sorted(DINOV2_FILES)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = timm.create_model(arch, pretrained=False, num_classes=0, img_size=image_size)
        if random_init:
            sha = f"random-init-{seed}"
        else:
            file = DINOV2_FILES[arch]
            short = "_".join(file.split("_")[:2])  # e.g. dinov2_vitl14
            path, sha = resolve_weights(
                file, None, DINOV2_URL.format(short=short, file=file), weights_path, cache_dir, download
            )
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(checkpoint_filter_fn(state, self.net), strict=True)
        self.net = self.net.eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        self.image_size = image_size
        self.name = f"dinov2-{arch}-cls"
        self.dim = int(self.net.num_features)
        self.resize = f"bicubic-antialias-{image_size}"
        self.weights_sha256 = sha

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3|1, H, W) -> normalised float (B, 3, S, S)."""
        x = to_rgb(images).to(self.device).float() / 255.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x.clamp(0, 1) - mean) / std

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm, (B, prefix + patches, dim) (REPA aligns the patch tokens)."""
        check_uint8_images(images)
        return self.net.forward_features(self.preprocess(images))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images)[:, 0].float()  # class token (B, dim)


# ----------------------------------------------------------------------------------------------
# Yardstick classifier.


class YardstickFeatures(FeatureExtractor):
    """Penultimate features of the small classifier trained on a built-in dataset (DESIGN.md §5).

    Args:
        dataset_name: ``mnist5k`` or ``shapes``.
        cache_dir: the classifier cache (default ``${GEN_CACHE:-~/.cache/gen}/yardstick``).
        kind: ``lenet`` (the FID network) or ``foundation`` (the alignment encoder).
    """

    def __init__(self, dataset_name: str = "mnist5k", cache_dir: str | os.PathLike | None = None, kind: str = "lenet") -> None:
        from eval.classifier import load_or_train_classifier

        self.yardstick = load_or_train_classifier(dataset_name, cache_dir, kind=kind)  # type: ignore[arg-type]
        self.name = self.yardstick.name
        self.dim = int(self.yardstick.net.feature_dim)
        self.resize = "none-32"
        self.weights_sha256 = self.yardstick.weights_sha256

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_uint8_images(images)
        if images.shape[-2:] != (32, 32):
            raise ValueError(f"{self.name} takes 32x32 images (no resizing), got shape {tuple(images.shape)}")
        if images.shape[1] != self.yardstick.net.config["in_channels"]:
            raise ValueError(
                f"{self.name} takes {self.yardstick.net.config['in_channels']}-channel images, got shape {tuple(images.shape)}"
            )
        return self.yardstick.features(images.cpu())

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, 16, D) of the ``foundation`` encoder, the yardstick's stand-in for DINOv2's."""
        from eval.classifier import FoundationNet, to_unit_range

        if not isinstance(self.yardstick.net, FoundationNet):
            raise TypeError(f"{self.name} has no patch tokens; build the extractor with kind='foundation'")
        check_uint8_images(images)
        return self.yardstick.net.tokens(to_unit_range(images.cpu()))


# ----------------------------------------------------------------------------------------------
# Construction by name.


def build_extractor(
    name: str,
    *,
    weights_path: str | os.PathLike | None = None,
    resize: str | None = None,
    dataset: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    device: torch.device | str = "cpu",
) -> FeatureExtractor:
    """An extractor from its manifest name, so a statistics file says how to rebuild its features.

    Args:
        name: ``inception-v3-pool3``; ``dinov2-<timm arch>-cls``; ``lenet-<dataset>-v<k>`` or
            ``yardstick`` (with ``dataset``); ``foundation-<dataset>-v<k>``.
        weights_path: pretrained file (Inception, DINOv2).
        resize: Inception resize mode (default ``tf1-bilinear``).
        dataset: built-in dataset of a yardstick network when ``name`` is ``yardstick``.
        cache_dir: weights cache (Inception, DINOv2) or yardstick cache.
    """
    if name == "inception-v3-pool3" or name == "inception":
        return InceptionFeatures(weights_path, resize or "tf1-bilinear", cache_dir, download, device)  # type: ignore[arg-type]
    if name.startswith("dinov2-") and name.endswith("-cls"):
        return DINOv2Features(name[len("dinov2-") : -len("-cls")], weights_path, cache_dir, download, device=device)
    if name == "yardstick":
        if dataset is None:
            raise ValueError("the yardstick extractor needs a built-in dataset name (mnist5k or shapes)")
        return YardstickFeatures(dataset, cache_dir)
    for kind in ("lenet", "foundation"):
        if name.startswith(kind + "-"):
            ds = name[len(kind) + 1 :].rsplit("-v", 1)[0]
            ext = YardstickFeatures(ds, cache_dir, kind=kind)
            if ext.name != name:
                raise ValueError(f"{name} was requested but this toolkit's yardstick for {ds} is {ext.name}")
            return ext
    raise ValueError(
        f"unknown feature extractor {name!r}; use inception-v3-pool3, dinov2-<arch>-cls, yardstick, lenet-<dataset>-v1"
    )


# ----------------------------------------------------------------------------------------------
# Alignment encoders (REPA / REG): one code path for DINOv2 and the yardstick's foundation network.


class PatchEncoder:
    """Frozen image encoder giving patch tokens and a global embedding, for representation alignment.

    ``dinov2-<timm arch>`` wraps ``DINOv2Features`` (prefix tokens dropped from the patch tokens);
    ``foundation-<dataset>`` wraps the yardstick's separately trained residual network (DESIGN.md §5),
    so alignment on the small benchmark runs through the same calls as with DINOv2.

    Attributes:
        name: as given.
        dim: token width D.
        extractor: the underlying feature extractor (its manifest names the weights).
    """

    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        if name.startswith("dinov2-"):
            self.extractor: FeatureExtractor = DINOv2Features(name[len("dinov2-") :], **kwargs)
            self._prefix = 1 + int(getattr(self.extractor.net, "num_reg_tokens", 0))  # type: ignore[attr-defined]
        elif name.startswith("foundation-"):
            self.extractor = YardstickFeatures(name[len("foundation-") :], kwargs.get("cache_dir"), kind="foundation")
            self._prefix = 0
        else:
            raise ValueError(f"unknown encoder {name!r}; use dinov2-<timm arch> or foundation-<dataset>")
        self.dim = self.extractor.dim

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> patch tokens (B, N, D)."""
        return self.extractor.tokens(images)[:, self._prefix :]  # type: ignore[attr-defined]

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) -> global embedding (B, D) (class token / mean token)."""
        return self.extractor(images)
