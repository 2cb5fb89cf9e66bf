"""In-memory image dataset and the deterministic stratified split shared by the built-in datasets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from gen.utils.build import BuildError, build
from gen.utils.seed import derive_seed

Split = Literal["train", "heldout", "all"]


class TensorImageDataset(Dataset):
    """Images and labels held as two tensors.

    Items are ``(image, label)`` with image uint8 (C, H, W) and label an int. The training loop can
    skip the DataLoader and index ``tensors()`` directly with indices from an ``InfiniteSampler``.

    Args:
        images: uint8 (N, C, H, W), square.
        labels: int64 (N,) in [0, num_classes).
        num_classes: number of classes (1 for unlabelled data).
        name: short dataset name used in logs and snapshot metadata.
        classes: optional class names, one per class.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        name: str,
        classes: Sequence[str] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"images must be uint8 (N, C, H, H), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
        self.images = images
        self.labels = labels.to(torch.long)
        self.num_classes = int(num_classes)
        self.name = name
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All data at once: uint8 images (N, C, H, W) and int64 labels (N,). Shared, do not modify."""
        return self.images, self.labels

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, channels={self.channels}, "
            f"resolution={self.resolution}, num_classes={self.num_classes})"
        )


def stratified_split(labels: np.ndarray, heldout: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic class-stratified split into (train, held-out) index arrays.

    Each class gives ``heldout // K`` items (the first ``heldout % K`` classes one more), drawn
    with a generator seeded by ``key`` alone, so the split never changes between runs or machines.

    Args:
        labels: int (N,) class labels.
        heldout: total held-out size.
        key: names the split (e.g. the dataset name); different keys give independent splits.

    Returns:
        Sorted int64 index arrays (train, heldout) partitioning ``range(N)``.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    q, r = divmod(int(heldout), len(classes))
    rng = np.random.Generator(np.random.PCG64(derive_seed("split", key)))
    picked = []
    for j, c in enumerate(classes):
        members = np.flatnonzero(labels == c)
        quota = q + (1 if j < r else 0)
        if quota > len(members):
            raise ValueError(f"class {c} has {len(members)} items, fewer than its held-out quota {quota}")
        picked.append(rng.permutation(members)[:quota])
    held = np.sort(np.concatenate(picked)).astype(np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), held


def select_split(labels: np.ndarray, split: Split, heldout: int, key: str) -> np.ndarray:
    """Indices of one split ("train", "heldout" or "all") of a labelled array; see ``stratified_split``."""
    if split == "all":
        return np.arange(len(labels), dtype=np.int64)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    train, held = stratified_split(labels, heldout, key)
    return train if split == "train" else held


def stratified_subset(idx: np.ndarray, labels: np.ndarray, size: int, split: str, key: str) -> np.ndarray:
    """A fixed class-stratified choice of ``size`` of the training indices ``idx`` (sorted int64).

    Each class keeps ``size // K`` items (the first ``size % K`` classes one more), drawn as ``stratified_split``
    draws its held-out items, with its own ``key``, so the subset never changes between runs or machines.
    """
    if split != "train":
        raise ValueError(f"subset={size} takes part of the training split; it cannot apply to split={split!r} "
                         "(set split=train, or subset=null)")
    num_classes = len(np.unique(labels[idx]))
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not num_classes <= size <= len(idx):
        raise ValueError(f"subset={size!r}: give a whole number of training items from {num_classes} (one per "
                         f"class) to {len(idx)} (all), or subset=null for all of them")
    _, kept = stratified_split(labels[idx], int(size), key)
    return idx[kept]


# The training split of each built-in data set as a run built it before snapshots carried ``data.dataset``: such a
# run trained on the whole split (the subset option came with that key), so rebuilding it this way is exact.
_BUILTIN_TRAIN = {"mnist5k": {"_target_": "gen.data.builtin.MNIST5k", "split": "train"},
                  "shapes": {"_target_": "gen.data.shapes.Shapes"}}


def run_training_tensors(data: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The uint8 images (N, C, H, W) and labels (N,) a run trained on, rebuilt from the ``data`` section of its
    config (a snapshot's metadata): ``data.dataset`` as the run built it, subset included (a snapshot written before
    it carried ``data.dataset``: the built-in data set's whole training split at its resolution).

    Only in-memory datasets (the built-in ones) are rebuilt; the spec may name the project's packages only, since a
    snapshot may come from anywhere.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"need the config's data section (a mapping), got {type(data).__name__}")
    spec = data.get("dataset")
    if spec is None and data.get("name") in _BUILTIN_TRAIN and "resolution" in data:
        spec = {**_BUILTIN_TRAIN[str(data["name"])], "resolution": data["resolution"]}
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ValueError(f"the config's data section has no dataset spec (data.dataset with a _target_) and names no "
                         f"built-in data set ({sorted(_BUILTIN_TRAIN)}); got {dict(data)!r}")
    try:
        dataset = build(spec)
    except BuildError as e:
        raise ValueError(f"cannot rebuild the run's training data from data.dataset: {e}") from e
    if not hasattr(dataset, "tensors"):
        raise ValueError(f"the run trained on {type(dataset).__name__}, which is not held in memory; the training "
                         "images are rebuilt for the built-in data sets only")
    return dataset.tensors()
