"""The yardstick networks for the built-in data (the small benchmark of bench/README.md).

A small LeNet-style CNN is trained deterministically (fixed seed, fixed data order, one thread) on the
training split of a built-in dataset and cached as safetensors under
``${GEN_CACHE:-~/.cache/gen}/yardstick/<name>-<recipe hash>.safetensors``. Its penultimate
activations are the FID features of the small benchmark; its logits give the class accuracy of
class-conditional samples. A second, differently built and seeded network plays the part of DINOv2 for
alignment experiments on the same data: ``foundation`` (v1: a 4x4 token grid at 32 px, 6 epochs, kept so that
records of old runs rebuild) and ``foundation2`` (an 8x8 grid at 32 px, the token grid of a patch-4 backbone, so
REPA aligns token to token as on ImageNet; a residual stem, one self-attention block, 24 epochs with random
affine augmentation).

Every file name and every statistics manifest carries ``<name>`` (e.g. ``lenet-mnist5k-v1``) and the
SHA-256 of the trained weights, so statistics from another network are never mixed up.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from gen.utils import dist
from gen.utils.ckpt import atomic_write, path_lock

Kind = Literal["lenet", "foundation", "foundation2"]


# ----------------------------------------------------------------------------------------------
# Networks.


class LeNet(nn.Module):
    """LeNet-style CNN for 32x32 images: three conv/pool stages, a 128-d penultimate layer, logits.

    Args:
        in_channels: 1 (digits) or 3 (RGB).
        num_classes: number of classes.
        width: channels of the first stage (doubled at each later stage).
        feature_dim: size of the penultimate layer, the FID feature dimension.
    """

    def __init__(
        self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = 128, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.config = dict(
            in_channels=in_channels, num_classes=num_classes, width=width, feature_dim=feature_dim, dropout=dropout
        )
        self.dropout = nn.Dropout(dropout)
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1)
        self.fc1 = nn.Linear(4 * w * 4 * 4, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features before the ReLU, (B, C, 32, 32) in [-1, 1] -> (B, feature_dim).

        The pre-activation is used (not the ReLU output) so that no unit is identically zero over a
        data set, which would make the feature covariance singular.
        """
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, w, 16, 16)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2w, 8, 8)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # (B, 4w, 4, 4)
        return self.fc1(x.flatten(1))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.features(x))))  # (B, num_classes)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1, stride=stride) if (stride != 1 or c_in != c_out) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + self.skip(x))


class FoundationNet(nn.Module):
    """Small residual encoder, the stand-in for DINOv2 on the yardstick (different architecture and seed).

    ``tokens(x)`` returns patch tokens (B, 16, D) of the 4x4 grid and ``embed(x)`` a global embedding
    (B, D), mirroring a ViT's patch tokens and class token.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, embed_dim: int = 64) -> None:
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, embed_dim=embed_dim)
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)  # 16x16
        self.block1 = _ResBlock(width, width, 1)
        self.block2 = _ResBlock(width, embed_dim, 2)  # 8x8
        self.block3 = _ResBlock(embed_dim, embed_dim, 2)  # 4x4
        self.head = nn.Linear(embed_dim, num_classes)
        self.feature_dim = embed_dim

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens, (B, C, 32, 32) in [-1, 1] -> (B, 16, embed_dim)."""
        h = self.block3(self.block2(self.block1(F.silu(self.stem(x)))))  # (B, D, 4, 4)
        return h.flatten(2).transpose(1, 2)  # (B, 16, D)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global embedding (mean of the patch tokens), (B, embed_dim)."""
        return self.tokens(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


class _AttentionBlock(nn.Module):
    """Pre-norm transformer block over tokens (B, N, D): multi-head self-attention and a 2x MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.norm2(x))


class FoundationNet2(nn.Module):
    """The yardstick's second DINOv2 stand-in: stride 4, so a 32 px image gives an 8x8 token grid.

    A convolutional stem (stride 2, then a residual stage with stride 2) makes an 8x8 grid of ``embed_dim``
    channels; a residual block and one self-attention block over the 64 tokens give every token the whole
    image as context (as a ViT's patch tokens have), and a final LayerNorm plays DINOv2's ``x_norm_patchtokens``.
    The class token is the mean patch token; the classification head reads it (training only).
    """

    STRIDE = 4

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, embed_dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.config = dict(in_channels=in_channels, num_classes=num_classes, width=width, embed_dim=embed_dim, heads=heads)
        self.stem = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)  # 16x16
        self.block1 = _ResBlock(width, width, 1)
        self.block2 = _ResBlock(width, embed_dim, 2)  # 8x8
        self.block3 = _ResBlock(embed_dim, embed_dim, 1)
        self.pos = nn.Parameter(torch.zeros(1, 64, embed_dim))  # learned, for the 8x8 grid of 32 px images
        self.attn = _AttentionBlock(embed_dim, heads)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)
        self.feature_dim = embed_dim

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens, (B, C, H, W) in [-1, 1] -> (B, (H/4)(W/4), embed_dim)."""
        h = self.block3(self.block2(self.block1(F.silu(self.stem(x)))))  # (B, D, H/4, W/4)
        t = h.flatten(2).transpose(1, 2)  # (B, N, D)
        pos = self.pos
        if t.shape[1] != pos.shape[1]:  # another resolution: the table is resampled bilinearly, as ViTs do
            g = round(pos.shape[1] ** 0.5)
            grid = pos.transpose(1, 2).reshape(1, -1, g, g)
            pos = F.interpolate(grid, size=(h.shape[2], h.shape[3]), mode="bilinear", align_corners=False)
            pos = pos.flatten(2).transpose(1, 2)
        return self.norm(self.attn(t + pos))  # (B, N, D)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Global embedding (mean of the patch tokens), (B, embed_dim)."""
        return self.tokens(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


# ----------------------------------------------------------------------------------------------
# Training recipe.


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights; its hash names the cache file."""

    kind: Kind = "lenet"
    version: int = 1
    seed: int = 0
    epochs: int = 16
    batch_size: int = 128
    lr: float = 4e-3
    weight_decay: float = 1e-4
    max_shift: int = 2  # random translation augmentation, pixels
    dropout: float = 0.3
    label_smoothing: float = 0.1
    width: int = 16
    feature_dim: int = 128
    rotate: float = 0.0  # random affine augmentation: rotation up to +-rotate degrees ...
    scale: float = 0.0  # ... and zoom by a factor in [1 - scale, 1 + scale]; both 0: integer shifts only

    def hash(self, data_sha256: str) -> str:
        """Short hash of the recipe and the training data, 12 hex digits.

        Fields added after v1 (``ADDED_FIELDS``) enter the hash only when they differ from their defaults, so the
        cache files of the older recipes keep their names.
        """
        recipe = {k: v for k, v in asdict(self).items() if not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}
        blob = json.dumps({"recipe": recipe, "data": data_sha256}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


ADDED_FIELDS: dict[str, float] = {"rotate": 0.0, "scale": 0.0}


RECIPES: dict[Kind, Recipe] = {
    "lenet": Recipe(),
    "foundation": Recipe(kind="foundation", seed=1234, epochs=6, lr=2e-3, dropout=0.0, width=32, feature_dim=64),
    "foundation2": Recipe(
        kind="foundation2", seed=4321, epochs=24, lr=2e-3, weight_decay=0.05, dropout=0.0, width=32, feature_dim=64,
        max_shift=3, rotate=12.0, scale=0.1,
    ),
}


def build_network(recipe: Recipe, in_channels: int, num_classes: int) -> nn.Module:
    """The untrained network of a recipe (random init from the global generator)."""
    if recipe.kind == "lenet":
        return LeNet(in_channels, num_classes, recipe.width, recipe.feature_dim, recipe.dropout)
    if recipe.kind == "foundation2":
        return FoundationNet2(in_channels, num_classes, width=recipe.width, embed_dim=recipe.feature_dim)
    return FoundationNet(in_channels, num_classes, width=recipe.width, embed_dim=recipe.feature_dim)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float32 in [-1, 1], the networks' input convention."""
    return images.float().div(127.5).sub(1.0)


def _shift(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by integer (dx, dy) with zero fill (background is -1 after scaling)."""
    b, _, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    rows = (torch.arange(h).view(1, h) + p - dy.view(b, 1)).clamp(0, h + 2 * p - 1)  # (B, H)
    cols = (torch.arange(w).view(1, w) + p - dx.view(b, 1)).clamp(0, w + 2 * p - 1)  # (B, W)
    idx_b = torch.arange(b).view(b, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_b, rows.view(b, h, 1), cols.view(b, 1, w)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _affine(x: torch.Tensor, gen: torch.Generator, recipe: Recipe) -> torch.Tensor:
    """Random rotation, zoom and translation per image (bilinear, background -1), drawn from ``gen``.

    Translation is up to ``recipe.max_shift`` pixels on each axis, rotation up to ``recipe.rotate`` degrees and
    the zoom factor in ``[1 - recipe.scale, 1 + recipe.scale]``.
    """
    b, _, h, w = x.shape
    u = torch.rand(4, b, generator=gen, dtype=torch.float64) * 2 - 1  # (4, B) in [-1, 1]
    angle = u[0] * recipe.rotate * torch.pi / 180
    zoom = 1 + u[1] * recipe.scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output -> input coordinates
    # affine_grid works in [-1, 1] coordinates: a pixel shift of s moves 2 s / side there.
    tx, ty = u[2] * recipe.max_shift * 2 / w, u[3] * recipe.max_shift * 2 / h
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).float()  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe = RECIPES["lenet"],
    num_classes: int | None = None,
) -> nn.Module:
    """Train a yardstick network deterministically on uint8 images.

    The data order and augmentation come from one ``torch.Generator(recipe.seed)`` and training runs on
    one thread (restored afterwards), so the same data and recipe give the same weights on a machine.

    Args:
        images: uint8 (N, C, 32, 32).
        labels: int (N,).
        recipe: hyperparameters and seed.
        num_classes: defaults to ``labels.max() + 1``.

    Returns:
        The trained network in eval mode, on CPU.
    """
    _check_images(images)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            # The global generator (parameter init, dropout masks) is seeded inside a fork, so training
            # is reproducible and leaves the caller's random state untouched.
            torch.manual_seed(recipe.seed)
            return _train(images, labels, recipe, num_classes)
    finally:
        torch.set_num_threads(threads)


def _train(images: torch.Tensor, labels: torch.Tensor, recipe: Recipe, num_classes: int) -> nn.Module:
    gen = torch.Generator().manual_seed(recipe.seed)  # data order and augmentation
    net = build_network(recipe, images.shape[1], num_classes)
    x_all = to_unit_range(images)
    y_all = labels.long()
    n = x_all.shape[0]
    steps_per_epoch = (n + recipe.batch_size - 1) // recipe.batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.15
    )
    net.train()
    for _ in range(recipe.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            x = x_all[idx]
            if recipe.rotate or recipe.scale:
                x = _affine(x, gen, recipe)
            else:  # the v1 recipes' integer shifts (their draws are part of their weights)
                shifts = torch.randint(-recipe.max_shift, recipe.max_shift + 1, (2, len(idx)), generator=gen)
                x = _shift(x, shifts[0], shifts[1], recipe.max_shift)
            loss = F.cross_entropy(net(x), y_all[idx], label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Cache.


def default_cache_dir() -> Path:
    """``${GEN_CACHE:-~/.cache/gen}/yardstick``."""
    return Path(os.environ.get("GEN_CACHE", Path.home() / ".cache" / "gen")).expanduser() / "yardstick"


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over tensors in sorted name order (name, dtype, shape, bytes): independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_dataset_tensors(dataset_name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, 32, 32) and labels (N,) of a built-in dataset split ("train" or "heldout").

    ``shapes`` has no stored split: its images are a pure function of (seed, index), so the training
    split is indices [0, 5000) and the held-out split [5000, 5500) of seed 0.
    """
    from gen.data import builtin, shapes  # imported lazily so eval imports stay light

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if dataset_name == "mnist5k":
        ds = builtin.MNIST5k(split=split)
    elif dataset_name == "shapes":
        ds = shapes.Shapes(count=5000, start=0) if split == "train" else shapes.Shapes(count=500, start=5000)
    else:
        raise ValueError(f"no yardstick for dataset {dataset_name!r}; built-in datasets: ['mnist5k', 'shapes']")
    return ds.tensors()


@dataclass
class Yardstick:
    """A trained yardstick network with its identity.

    Attributes:
        net: the network (eval mode, CPU).
        name: ``<kind>-<dataset>-v<version>``, e.g. ``lenet-mnist5k-v1``.
        weights_sha256: SHA-256 of the weights (``tensors_sha256``).
        path: the cache file.
    """

    net: nn.Module
    name: str
    weights_sha256: str
    path: Path

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """uint8 (B, C, 32, 32) -> float32 penultimate features (B, D)."""
        _check_images(images)
        outs = [self.net.features(to_unit_range(b)) for b in images.cpu().split(batch_size)]
        return torch.cat(outs) if outs else torch.zeros(0, self.net.feature_dim)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """uint8 (B, C, 32, 32) -> predicted labels (B,)."""
        _check_images(images)
        return torch.cat([self.net(to_unit_range(b)).argmax(1) for b in images.cpu().split(batch_size)])

    def class_accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images whose predicted class equals the given label (conditioning label for samples)."""
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        if len(images) == 0:
            raise ValueError("class_accuracy needs at least one image")
        return float((self.predict(images) == labels.long().cpu()).double().mean())


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[-2:] != (32, 32):
        raise ValueError(f"yardstick networks take (B, C, 32, 32) images, got shape {tuple(images.shape)}")


def load_or_train_classifier(
    dataset_name: str = "mnist5k",
    cache_dir: str | os.PathLike | None = None,
    kind: Kind = "lenet",
    data_fn: Callable[[str, str], tuple[torch.Tensor, torch.Tensor]] = load_dataset_tensors,
) -> Yardstick:
    """Load the cached yardstick network for a built-in dataset, training and caching it if absent.

    Under several processes rank 0 trains and writes the file while the others wait at a barrier.

    Args:
        dataset_name: ``mnist5k`` or ``shapes``.
        cache_dir: defaults to ``default_cache_dir()``.
        kind: ``lenet`` (FID features, class accuracy), ``foundation`` or ``foundation2`` (alignment encoders).
        data_fn: ``(dataset_name, split) -> (uint8 images, labels)``; the training split is used.

    Returns:
        The ``Yardstick`` (network, name, weights hash, file path).
    """
    recipe = RECIPES[kind]
    images, labels = data_fn(dataset_name, "train")
    data_sha = tensors_sha256({"images": images, "labels": labels.long()})
    name = f"{kind}-{dataset_name}-v{recipe.version}"
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / f"{name}-{recipe.hash(data_sha)}.safetensors"
    if not path.exists() and dist.rank() == 0:
        with path_lock(path):  # another process building the same file: wait for it, then load it
            if not path.exists():
                net = train_classifier(images, labels, recipe)
                tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
                meta = {"name": name, "recipe": json.dumps(asdict(recipe)), "config": json.dumps(net.config)}
                meta["data_sha256"] = data_sha
                atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    dist.barrier()
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
        net = build_network(recipe, config["in_channels"], config["num_classes"])
        net.load_state_dict(tensors)
    except Exception as e:  # a damaged or foreign cache file; it is derived data, so retraining fixes it
        if isinstance(e, OSError) and e.errno is not None:
            raise
        raise ValueError(
            f"yardstick cache file {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"delete it and it will be retrained"
        ) from e
    # NHWC convolutions run about 2x faster with oneDNN; outputs change only by float32 rounding (~1e-7).
    net = net.eval().requires_grad_(False).to(memory_format=torch.channels_last)
    return Yardstick(net=net, name=name, weights_sha256=tensors_sha256(tensors), path=path)


def class_accuracy(
    images: torch.Tensor, labels: torch.Tensor, dataset_name: str = "mnist5k", cache_dir: str | None = None
) -> float:
    """Class accuracy of images under the dataset's yardstick classifier (trained and cached on first use).

    Args:
        images: uint8 (B, C, 32, 32).
        labels: (B,) intended classes (for samples, the conditioning labels).
    """
    return load_or_train_classifier(dataset_name, cache_dir).class_accuracy(images, labels)
