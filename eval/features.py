"""Feature extractors behind one small interface, and the loading of their weights.

Every extractor maps uint8 images (B, 3 or 1, H, W) to float features (B, D) and describes itself in a
``manifest()`` (extractor name, weights SHA-256, resize mode, feature dim). Statistics files carry that
manifest, and loading them checks it (``eval.stats``), so features from different networks or resize
modes are never compared.

- ``InceptionFeatures``: the FID network (TF "inception-2015-12-05" ported by torch-fidelity; the same
  module class that torchmetrics' ``FrechetInceptionDistance`` builds), bitwise equal to torch-fidelity's
  features by default: pool3 (2048-d) for FID and precision/recall, the 1008 bias-free logits for the
  Inception Score, and the first 7 channels of the ``mixed_6/conv`` map (2023-d) for sFID.
- ``DINOv2Features``: DINOv2 ViTs on timm's modules, run as the official hub model (position table
  interpolated at forward time), with the FD-DINOv2 preprocessing of dgm-eval / EDM2; class token after
  the final norm (FD-DINOv2). Alignment encoders built on the same loading live in ``eval.encoders``.
- ``YardstickFeatures``: the penultimate layer of the small classifier trained on the built-in data
  (``eval.classifier``; the small benchmark of bench/README.md).

Pretrained weights are never fetched silently: a file is looked up at an explicit path, then in the
cache directories, and downloaded only with ``download=True``. A missing file raises
``WeightsNotFoundError`` naming the file, its expected SHA-256 and where to put it. Tests use randomly
initialised networks of the identical architecture (``make_random_inception_weights``,
``make_random_dinov2_weights``).
"""

from __future__ import annotations

import math
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
from gen.utils.weights import first_line, load_weights_file, resolve_weights, state_dict_misfit
from gen.utils.weights import weights_cache_dir as weights_cache_dir

InceptionResize = Literal["tf1-bilinear", "bilinear-antialias"]

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE

# DINOv2 backbones by timm name -> Meta's weights file (facebookresearch/dinov2, dinov2/hub/backbones.py).
# Meta's ``dinov2_vit*14[_reg4]_pretrain.pth`` or timm's ``model.safetensors`` (Hugging Face repo
# ``timm/<arch>.lvd142m``, passed as an explicit path) both load: timm's checkpoint filter converts Meta's.
# Their hashes are not pinned here: the file's SHA-256 is recorded in the manifest.
DINOV2_FILES: dict[str, str] = {
    "vit_small_patch14_dinov2": "dinov2_vits14_pretrain.pth",
    "vit_base_patch14_dinov2": "dinov2_vitb14_pretrain.pth",
    "vit_large_patch14_dinov2": "dinov2_vitl14_pretrain.pth",
    "vit_giant_patch14_dinov2": "dinov2_vitg14_pretrain.pth",
    "vit_small_patch14_reg4_dinov2": "dinov2_vits14_reg4_pretrain.pth",
    "vit_base_patch14_reg4_dinov2": "dinov2_vitb14_reg4_pretrain.pth",
    "vit_large_patch14_reg4_dinov2": "dinov2_vitl14_reg4_pretrain.pth",
    "vit_giant_patch14_reg4_dinov2": "dinov2_vitg14_reg4_pretrain.pth",
}
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/{short}/{file}"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
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

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """The ``_target_`` spec of these features: the arguments that define them, without where the weights live
        or where the network runs (``build(spec, weights_path=..., device=...)`` rebuilds the extractor)."""

    def manifest(self) -> dict[str, Any]:
        """The identity of these features, stored with every statistics file (with the spec that rebuilds them)."""
        return {"extractor": self.name, "weights_sha256": self.weights_sha256, "resize": self.resize, "dim": self.dim,
                "spec": self.spec()}


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
        channels_last: run the convolutions in NHWC layout: about 1.4x faster on CPU with oneDNN (also
            faster with cuDNN), but the convolutions then sum in another order and features differ from
            torch-fidelity's by float32 rounding (1e-6 to 1e-4 of the largest feature on random weights).
            Off by default, so that the features are bitwise those of torch-fidelity's
            ``FeatureExtractorInceptionV3`` (toshas/torch-fidelity,
            torch_fidelity/feature_extractor_inceptionv3.py) and of torchmetrics' FID with
            ``antialias=False`` run in the same process (same device, thread count and, on GPUs, the
            same cuDNN algorithm and TF32 settings); turn it on for speed when 1e-4 does not matter.
    """

    SPATIAL_CHANNELS = 7  # sFID: first 7 channels of mixed_6/conv, 7 * 17 * 17 = 2023 features

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        resize: InceptionResize = "tf1-bilinear",
        cache_dir: str | os.PathLike | None = None,
        download: bool = False,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> None:
        path, sha = resolve_weights(INCEPTION_FILE, INCEPTION_SHA256, INCEPTION_URL, weights_path, cache_dir, download)
        state = load_weights_file(path, f"the FID Inception network ({INCEPTION_FILE})")
        net = build_inception(None, resize)
        misfit = state_dict_misfit(net, state)
        if misfit:
            raise ValueError(
                f"weights file {path} does not fit the FID Inception network ({misfit}); expected "
                f"{INCEPTION_FILE} (SHA-256 {INCEPTION_SHA256})"
            )
        nn.Module.load_state_dict(net, state, strict=True)
        self.net = net.to(device)
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.device = torch.device(device)
        self.name = "inception-v3-pool3"
        self.dim = 2048
        self.resize = resize
        self.weights_sha256 = sha
        self.weights_path = path

    def spec(self) -> dict[str, Any]:
        return {"_target_": "eval.features.InceptionFeatures", "resize": self.resize}

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


DINOv2Resize = Literal["torch", "pil"]


def dinov2_resize(images: torch.Tensor, size: int, mode: DINOv2Resize = "torch") -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, size, size) on the [0, 255] scale, as the FD-DINOv2 references.

    - ``torch``: ``F.interpolate(bicubic, antialias=True)`` on float values, no clamp and no rounding
      (EDM2's default "torch" mode; NVlabs/edm2, calculate_metrics.py, ``DINOv2Detector``).
    - ``pil``: PIL's bicubic resize of the uint8 RGB image, rounded to uint8 (dgm-eval's default
      transform, layer6ai-labs/dgm-eval, dgm_eval/models/dinov2.py, and EDM2's "pil" mode). Runs on CPU.
    """
    if mode == "torch":
        return F.interpolate(images.float(), size=(size, size), mode="bicubic", antialias=True)
    if mode == "pil":
        import numpy as np
        from PIL import Image

        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        out = np.stack([np.asarray(Image.fromarray(a, "RGB").resize((size, size), Image.BICUBIC)) for a in arr])
        return torch.from_numpy(out).to(images.device).permute(0, 3, 1, 2).float()
    raise ValueError(f"unknown DINOv2 resize mode {mode!r}; use 'torch' (EDM2) or 'pil' (dgm-eval)")


def dinov2_pos_embed(
    patch_pos: torch.Tensor, grid: tuple[int, int], image_hw: tuple[int, int], offset: float, antialias: bool
) -> torch.Tensor:
    """Patch position embeddings (1, M*M, D) brought to a token grid (h, w) at forward time, as DINOv2 does.

    The official model interpolates its 37x37 table (518 px) with bicubic, without antialias, through
    ``scale_factor = (h + 0.1) / M`` rather than an output size (a historical offset that shifts the
    sampling points); the register models use the output size with antialias instead
    (facebookresearch/dinov2, dinov2/models/vision_transformer.py ``interpolate_pos_encoding``, and
    dinov2/hub/backbones.py for the per-model settings). No interpolation when the grid already matches
    and the image is square, as there.
    """
    n, dim = patch_pos.shape[1], patch_pos.shape[2]
    m = math.isqrt(n)
    h, w = grid
    if h * w == n and image_hw[0] == image_hw[1]:
        return patch_pos
    table = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    if offset:
        table = F.interpolate(
            table, scale_factor=((h + offset) / m, (w + offset) / m), mode="bicubic", antialias=antialias
        )
    else:
        table = F.interpolate(table, size=(h, w), mode="bicubic", antialias=antialias)
    if tuple(table.shape[-2:]) != (h, w):
        raise RuntimeError(f"position embedding came out {tuple(table.shape[-2:])}, expected {(h, w)}")
    return table.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos.dtype)


def _dinov2_meta_state(net: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    # A timm DINOv2 state dict in Meta's layout (the inverse of timm's _convert_dinov2), for test weights.
    out: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        if k == "reg_token":
            out["register_tokens"] = v
        elif k == "pos_embed" and "reg4" in arch:  # timm folds the class position into cls_token
            out[k] = torch.cat([torch.zeros_like(v[:, :1]), v], dim=1)
        elif "giant" in arch and ".mlp.fc1." in k:
            out[k.replace("fc1", "w12")] = v
        elif "giant" in arch and ".mlp.fc2." in k:
            out[k.replace("fc2", "w3")] = v
        else:
            out[k] = v
    out["mask_token"] = torch.zeros(1, int(net.num_features))
    return out


def make_random_dinov2_weights(path: str | os.PathLike, arch: str = "vit_small_patch14_dinov2", seed: int = 0) -> Path:
    """Write random weights of a DINOv2 backbone in Meta's ``dinov2_*_pretrain.pth`` layout (tests, benches).

    Every tensor is drawn from one seeded generator in sorted-name order, scaled so that activations keep
    their size through the blocks (linear and conv weights 1/sqrt(fan-in), layer-scale 0.3, norms near
    1) and the position table is unit-scale noise, so the position interpolation visibly matters. The
    official hub model loads the file with ``load_state_dict(strict=True)``.
    """
    import timm

    if arch not in DINOV2_FILES:
        raise ValueError(f"unknown DINOv2 arch {arch!r}; choose from {sorted(DINOV2_FILES)}")
    net = timm.create_model(arch, pretrained=False, num_classes=0, img_size=518)
    shapes = {k: v.shape for k, v in _dinov2_meta_state(net, arch).items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k in sorted(shapes):
        x = torch.randn(shapes[k], generator=g)
        if k.endswith(".gamma"):
            x = 0.3 + 0.05 * x
        elif k.endswith("norm.weight") or (".norm" in k and k.endswith(".weight")):
            x = 1.0 + 0.1 * x
        elif k.endswith(".bias"):
            x = 0.1 * x
        elif k.endswith(".weight"):
            x = x * (x[0].numel() ** -0.5)
        state[k] = x
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def load_dinov2_timm(
    arch: str,
    weights_path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    random_init: bool = False,
    seed: int = 0,
) -> tuple[nn.Module, str]:
    """A timm DINOv2 backbone at 518 px (the checkpoint's 37x37 position table unresampled) and its weights hash.

    Weights: Meta's ``dinov2_vit*14[_reg4]_pretrain.pth`` or timm's safetensors, found by
    ``resolve_weights`` (explicit path, then the cache) before any network is built, so a missing file
    fails at once with its name and the folder to put it in. ``random_init`` uses timm's seeded init
    (tests); the hash is then ``random-init-<seed>``. Returns the network in eval mode without gradients.
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if arch not in DINOV2_FILES:
        raise ValueError(f"unknown DINOv2 arch {arch!r}; choose from {sorted(DINOV2_FILES)}")
    path = None
    if random_init:
        sha = f"random-init-{seed}"
    else:
        file = DINOV2_FILES[arch]
        short = "_".join(file.split("_")[:2])  # e.g. dinov2_vitl14
        path, sha = resolve_weights(file, None, DINOV2_URL.format(short=short, file=file), weights_path, cache_dir, download)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = timm.create_model(arch, pretrained=False, num_classes=0, img_size=518)
    if path is not None:
        state = load_weights_file(path, f"DINOv2 {arch}")
        try:
            state = checkpoint_filter_fn(state, net)
        except Exception as e:  # timm's converter indexes keys of the expected layout
            raise ValueError(f"weights file {path} is not a DINOv2 checkpoint ({first_line(e)}); expected {file}") from e
        misfit = state_dict_misfit(net, state)
        if misfit:
            raise ValueError(f"weights file {path} does not fit DINOv2 {arch} ({misfit}); pick the matching --dinov2-arch")
        net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False), sha


def dinov2_pos_settings(net: nn.Module) -> tuple[float, bool]:
    """(offset, antialias) of the official forward-time position interpolation for this backbone.

    Register models interpolate by size with antialias, the others with the 0.1 offset and without
    (facebookresearch/dinov2, dinov2/hub/backbones.py).
    """
    return (0.0, True) if int(getattr(net, "num_reg_tokens", 0)) else (0.1, False)


def dinov2_forward_tokens(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Normalised images (B, 3, H, W) -> all tokens after the final norm, (B, 1 + registers + h*w, D).

    The official ``prepare_tokens_with_masks`` + blocks + norm (facebookresearch/dinov2,
    dinov2/models/vision_transformer.py) on timm's modules: patch embedding, position table brought to
    the token grid at forward time (``dinov2_pos_embed``), class token (+ its position) and registers in
    front. Token order is that of ``x_norm_clstoken``, ``x_norm_regtokens``, ``x_norm_patchtokens``.
    """
    b, _, hh, ww = x.shape
    p = net.patch_embed.patch_size[0]
    if hh % p or ww % p:
        raise ValueError(f"DINOv2 input {hh}x{ww} is not a multiple of the patch size {p}")
    tokens = net.patch_embed.norm(net.patch_embed.proj(x).flatten(2).transpose(1, 2))  # (B, h*w, D)
    pos = net.pos_embed
    cls_pos = 0 if net.no_embed_class else 1  # timm folds the class position into reg models' cls_token
    offset, antialias = dinov2_pos_settings(net)
    patch_pos = dinov2_pos_embed(pos[:, cls_pos:], (hh // p, ww // p), (hh, ww), offset, antialias)
    prefix = [net.cls_token.expand(b, -1, -1) + (pos[:, :1] if cls_pos else 0)]
    if net.reg_token is not None:
        prefix.append(net.reg_token.expand(b, -1, -1))
    x = torch.cat(prefix + [tokens + patch_pos], dim=1)
    return net.norm(net.blocks(net.norm_pre(x)))


class DINOv2Features(FeatureExtractor):
    """DINOv2 class-token features through timm, as the FD-DINOv2 reference evaluators compute them.

    The reference (dgm-eval, Stein et al. 2023, "Exposing flaws of generative model evaluation metrics",
    layer6ai-labs/dgm-eval dgm_eval/models/dinov2.py; EDM2's re-implementation, NVlabs/edm2
    calculate_metrics.py ``DINOv2Detector``) feeds the official torch.hub model ``dinov2_vitl14``:
    resize to 224x224 bicubic (``dinov2_resize``), x/255, ImageNet mean/std, and takes the class token
    after the final norm. The hub model keeps its 518 px position table and interpolates it at forward
    time (``dinov2_pos_embed``); so does this class, running timm's modules with the table unresampled,
    rather than timm's own load-time antialiased resampling. On random weights at 224 px the class
    tokens match the official model to float32 rounding (tests/test_eval_metrics.py).

    Args:
        arch: timm name, e.g. ``vit_large_patch14_dinov2`` (FD-DINOv2) or ``vit_base_patch14_reg4_dinov2``.
        weights_path: explicit weights file (Meta's ``.pth`` or timm's safetensors); else the cache.
        random_init: use random weights (tests only); the manifest records ``random-init-<seed>``.
        seed: seed of the random init.
        image_size: side fed to the ViT (224 for FD-DINOv2; a multiple of 14).
        resize: ``torch`` (EDM2's default, fast, on the device) or ``pil`` (dgm-eval exactly, on CPU).
        download: fetch Meta's file when missing (needs internet).
    """

    PATCH = 14

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
        resize: DINOv2Resize = "torch",
    ) -> None:
        if image_size % self.PATCH:
            raise ValueError(f"image_size must be a multiple of the patch size {self.PATCH}, got {image_size}")
        if resize not in ("torch", "pil"):
            raise ValueError(f"unknown DINOv2 resize mode {resize!r}; use 'torch' (EDM2) or 'pil' (dgm-eval)")
        net, sha = load_dinov2_timm(arch, weights_path, cache_dir, download, random_init, seed)
        self.net = net.to(device)
        registers = int(getattr(self.net, "num_reg_tokens", 0))
        self.device = torch.device(device)
        self.arch = arch
        self.image_size = image_size
        self.resize_mode = resize
        self.num_prefix_tokens = 1 + registers
        self.name = f"dinov2-{arch}-cls"
        self.dim = int(self.net.num_features)
        self.resize = f"{'edm2-torch' if resize == 'torch' else 'pil'}-bicubic-{image_size}"
        self.weights_sha256 = sha

    def spec(self) -> dict[str, Any]:
        return {"_target_": "eval.features.DINOv2Features", "arch": self.arch, "image_size": self.image_size,
                "resize": self.resize_mode}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3|1, H, W) -> normalised float (B, 3, S, S), operation for operation as EDM2."""
        x = dinov2_resize(to_rgb(images).to(self.device), self.image_size, self.resize_mode)
        x = x / 255
        x = x - torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        return x / torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, H, W) -> all tokens after the final norm (``dinov2_forward_tokens``)."""
        return dinov2_forward_tokens(self.net, x)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm, (B, 1 + registers + patches, dim).

        For REPA/REG targets use ``eval.encoders.AlignmentEncoder``, which prepares DINOv2 as REPA does.
        """
        check_uint8_images(images)
        return self.forward_tokens(self.preprocess(images))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.tokens(images)[:, 0].float()  # class token (B, dim)


# ----------------------------------------------------------------------------------------------
# Yardstick classifier.


class YardstickFeatures(FeatureExtractor):
    """Penultimate features of the small classifier trained on a built-in dataset (the yardstick).

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
        self._spec = {"_target_": "eval.features.YardstickFeatures", "dataset_name": dataset_name, "kind": kind}

    def spec(self) -> dict[str, Any]:
        return dict(self._spec)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        check_uint8_images(images)
        if images.shape[-2:] != (32, 32):
            raise ValueError(f"{self.name} takes 32x32 images (no resizing), got shape {tuple(images.shape)}")
        takes = self.yardstick.net.config["in_channels"]
        if takes == 1 and images.shape[1] == 3 and bool((images[:, 1:] == images[:, :1]).all()):
            images = images[:, :1]  # grey repeated to RGB (sample.py npz_rgb=true): the same images, exactly
        if images.shape[1] != takes:
            extra = (" whose channels differ (colour images, not grey repeated to RGB)"
                     if takes == 1 and images.shape[1] == 3 else "")
            raise ValueError(f"{self.name} takes {takes}-channel images, got shape {tuple(images.shape)}{extra}")
        return self.yardstick.features(images.cpu())


# ----------------------------------------------------------------------------------------------
# Construction by name.


def _dinov2_resize_spec(resize: str | None) -> tuple[DINOv2Resize, int]:
    # "torch" / "pil", or the manifest form written by DINOv2Features ("edm2-torch-bicubic-224").
    if resize is None or resize in ("torch", "pil"):
        return (resize or "torch"), 224  # type: ignore[return-value]
    for prefix, mode in (("edm2-torch-bicubic-", "torch"), ("pil-bicubic-", "pil")):
        if resize.startswith(prefix) and resize[len(prefix) :].isdigit():
            return mode, int(resize[len(prefix) :])  # type: ignore[return-value]
    raise ValueError(
        f"DINOv2 resize {resize!r} is not one of 'torch', 'pil', 'edm2-torch-bicubic-<size>', 'pil-bicubic-<size>'; "
        "statistics written before the FD-DINOv2 features followed EDM2/dgm-eval ('bicubic-antialias-224') "
        "must be recomputed"
    )


RUNTIME_ARGS = ("weights_path", "cache_dir", "download", "device")


def extractor_from_spec(spec: dict[str, Any], **runtime: Any) -> FeatureExtractor:
    """Rebuild an extractor from the ``spec`` a manifest stores, with where its weights live and where it runs.

    ``runtime`` may hold ``weights_path``, ``cache_dir``, ``download`` and ``device``; the ones the extractor's
    constructor does not take are dropped (the yardstick networks find their weights in their cache).
    """
    import inspect

    from gen.utils.build import build, resolve

    params = inspect.signature(resolve(str(spec.get("_target_")), ("eval.features",))).parameters
    return build(spec, allow=("eval.features",), **{k: v for k, v in runtime.items() if k in params and k in RUNTIME_ARGS})


def extractor_from_manifest(manifest: dict[str, Any], dataset: str | None = None, **runtime: Any) -> FeatureExtractor:
    """The extractor a statistics file's manifest names: its ``spec`` when it stores one, else its ``extractor``
    name with its ``resize`` (``build_extractor``).

    ``runtime`` as in ``extractor_from_spec``. A manifest marked ``assumed`` (a file without one, e.g. ADM's
    reference batches, taken to be of a stated extractor) gets the weights' SHA-256 in use, so the later
    compatibility check compares like with like.

    Raises:
        ValueError: the manifest names no extractor.
    """
    if isinstance(manifest.get("spec"), dict):
        return extractor_from_spec(manifest["spec"], **runtime)
    if not manifest.get("extractor"):
        raise ValueError("the statistics have no manifest naming their feature extractor")
    ext = build_extractor(str(manifest["extractor"]), resize=manifest.get("resize"), dataset=dataset, **runtime)
    if manifest.get("assumed"):
        manifest.setdefault("weights_sha256", ext.weights_sha256)
    return ext


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
        resize: Inception resize mode (default ``tf1-bilinear``); for DINOv2 ``torch`` (default) or
            ``pil``, or a manifest's ``edm2-torch-bicubic-<S>`` / ``pil-bicubic-<S>`` (which also sets S).
        dataset: built-in dataset of a yardstick network when ``name`` is ``yardstick``.
        cache_dir: weights cache (Inception, DINOv2) or yardstick cache.
    """
    if name == "inception-v3-pool3" or name == "inception":
        return InceptionFeatures(weights_path, resize or "tf1-bilinear", cache_dir, download, device)  # type: ignore[arg-type]
    if name.startswith("dinov2-") and name.endswith("-cls"):
        mode, size = _dinov2_resize_spec(resize)
        return DINOv2Features(
            name[len("dinov2-") : -len("-cls")], weights_path, cache_dir, download,
            image_size=size, device=device, resize=mode,
        )
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
