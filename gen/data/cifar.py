"""CIFAR-10 from a local copy in torchvision's layout (``cifar-10-batches-py``), held in memory.

Nothing is downloaded. The batch files are Python pickles; they are read by torchvision's
``CIFAR10`` class, which is that format's documented reader (the official archive ships pickles), so
point ``root`` only at a copy extracted from the official archive.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from gen.data.base import TensorImageDataset

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _torchvision_cifar10(check_md5: bool) -> Any:
    # Imported here so `import gen.data` stays light.
    import torchvision

    base = torchvision.datasets.CIFAR10
    if check_md5:
        return base

    class _ExistenceChecked(base):  # type: ignore[misc, valid-type]
        # torchvision skips the checksum when a file's md5 is None and only checks that it exists.
        train_list = [[name, None] for name, _ in base.train_list]
        test_list = [[name, None] for name, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    return _ExistenceChecked


def _resolve_root(root: str | os.PathLike) -> Path:
    """Accept the folder that contains ``cifar-10-batches-py`` or that folder itself; return the parent."""
    root = Path(root)
    if root.name == BASE_FOLDER and not (root / BASE_FOLDER).exists():
        return root.parent
    return root


class CIFAR10(TensorImageDataset):
    """CIFAR-10: 32x32 RGB, 10 classes; 50,000 training and 10,000 test images.

    Args:
        root: the folder holding ``cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta),
            or that folder itself.
        split: "train" or "test".
        check_md5: verify the files against the official checksums (about a second; turn off only
            for hand-made test copies).
    """

    def __init__(self, root: str | os.PathLike, split: Literal["train", "test"] = "train", check_md5: bool = True) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        parent = _resolve_root(root)
        folder = parent / BASE_FOLDER
        needed = (TRAIN_FILES if split == "train" else TEST_FILES) + (META_FILE,)
        missing = [name for name in needed if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 files missing in {str(folder)!r}: {', '.join(missing)}. Nothing is downloaded at run "
                f"time: fetch {ARCHIVE_URL} elsewhere and extract it into {str(parent)!r} so that "
                f"{str(folder / 'data_batch_1')!r} exists."
            )
        cls = _torchvision_cifar10(check_md5)
        if check_md5:
            self._check_checksums(cls, folder, needed)
        ds = cls(str(parent), train=split == "train", download=False)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        super().__init__(images, labels, num_classes=10, name="cifar10", classes=list(ds.classes))
        self.split = split

    @staticmethod
    def _check_checksums(cls: Any, folder: Path, needed: tuple[str, ...]) -> None:
        from torchvision.datasets.utils import check_integrity

        # torchvision checks all six batches even for one split, and its error does not say which file.
        md5 = {name: digest for name, digest in cls.train_list + cls.test_list}
        md5[META_FILE] = cls.meta["md5"]
        wanted = set(needed) | set(TRAIN_FILES) | set(TEST_FILES)
        bad = [n for n in sorted(wanted) if not check_integrity(str(folder / n), md5[n])]
        if bad:
            raise RuntimeError(
                f"CIFAR-10 files in {str(folder)!r} are missing or do not match the official checksums: "
                f"{', '.join(bad)}. Re-extract {ARCHIVE_URL} (or pass check_md5=False for a hand-made copy)."
            )
