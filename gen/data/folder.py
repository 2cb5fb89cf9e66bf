"""Image-folder datasets: ImageNet-style class folders or any flat/unlabelled folder of images.

Files are decoded on access (use a DataLoader with workers), converted to RGB, and brought to a
square ``resolution`` with the ADM centre crop (``center_crop_resize``). Unreadable files raise
``CorruptImageError`` naming the file; ``verify_images`` / ``ImageFolder.verify`` list them all, and
``python -m gen.data.verify ROOT`` prints them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from gen.data.transforms import center_crop_resize

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


class CorruptImageError(OSError):
    """An image file that exists but cannot be decoded."""


def _hidden(name: str) -> bool:
    return name.startswith(".")


def find_images(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """All image files under ``root`` (recursive, hidden entries skipped), sorted by path."""
    exts = tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        found.extend(Path(dirpath) / f for f in filenames if not _hidden(f) and f.lower().endswith(exts))
    return sorted(found)


def _check_root(root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist; point the dataset's `root` at a folder of images")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder root {str(root)!r} is a file, not a folder")


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode one file fully into an RGB PIL image.

    Raises:
        CorruptImageError: naming the file, when it cannot be decoded (truncated, not an image...).
    """
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a lazy open would defer truncation errors to some later transform
            return im.convert("RGB")
    except Exception as e:  # PIL signals bad data with many exception types (OSError, SyntaxError, ...)
        raise CorruptImageError(
            f"cannot decode image file {str(path)!r} ({type(e).__name__}: {e}). Remove or replace it; "
            f"`python -m gen.data.verify <root>` lists every unreadable file in a folder."
        ) from e


def verify_images(
    root: str | os.PathLike | Sequence[str | os.PathLike], extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[tuple[str, str]]:
    """Fully decode every image and list the ones that fail.

    Args:
        root: a folder (scanned recursively) or an explicit list of files.
        extensions: file name endings counted as images when scanning a folder.

    Returns:
        ``(path, reason)`` for each unreadable file, in path order; empty when all decode.
    """
    if isinstance(root, (str, os.PathLike)):
        _check_root(Path(root))
        files: Sequence[str | os.PathLike] = find_images(root, extensions)
    else:
        files = root
    bad = []
    for f in files:
        try:
            load_image(f)
        except CorruptImageError as e:
            cause = e.__cause__
            bad.append((str(f), f"{type(cause).__name__}: {cause}" if cause else str(e)))
    return bad


class ImageFolder(Dataset):
    """Images from a folder, centre-cropped to ``resolution`` x ``resolution`` RGB.

    Layouts:
        - class folders (ImageNet style): ``root/<class>/**/*.jpg``; classes are the sorted sub-folder
          names and a label is a class's position in that order. Files directly in ``root`` are ignored.
        - unlabelled: every image under ``root`` (recursive); label 0, ``num_classes`` 1.

    Args:
        root: the folder.
        resolution: output side (ADM centre crop: box-halve, bicubic resize, centre crop).
        labels: "folders", "none", or "auto" (class folders when ``root`` holds sub-folders and no
            images directly, unlabelled when it holds images and no sub-folders; ambiguous -> error).
        extensions: file endings treated as images (case-insensitive).
        name: dataset name for logs and snapshot metadata (default: the folder's name).

    Items are ``(uint8 (3, resolution, resolution), label)``.
    """

    channels = 3

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int = 256,
        labels: Literal["auto", "folders", "none"] = "auto",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        name: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.resolution = int(resolution)
        self.extensions = tuple(extensions)
        self.name = name or self.root.name
        _check_root(self.root)
        exts = tuple(e.lower() for e in self.extensions)
        entries = [e for e in sorted(self.root.iterdir()) if not _hidden(e.name)]
        subdirs = [e for e in entries if e.is_dir()]
        top_images = [e for e in entries if e.is_file() and e.name.lower().endswith(exts)]
        if labels == "auto":
            if subdirs and top_images:
                raise ValueError(
                    f"{str(self.root)!r} holds both images and sub-folders; set labels='folders' (class "
                    f"folders, top-level files ignored) or labels='none' (all images, unlabelled)"
                )
            labels = "folders" if subdirs else "none"
        if labels == "folders":
            self.classes = [d.name for d in subdirs]
            files, targets = [], []
            for k, d in enumerate(subdirs):
                found = find_images(d, self.extensions)
                if not found:
                    # An empty class would silently shift every later label; refuse instead.
                    raise FileNotFoundError(f"class folder {str(d)!r} holds no images with endings {exts}")
                files.extend(found)
                targets.extend([k] * len(found))
        elif labels == "none":
            self.classes = [self.root.name]
            files = find_images(self.root, self.extensions)
            targets = [0] * len(files)
        else:
            raise ValueError(f"labels must be 'auto', 'folders' or 'none', got {labels!r}")
        if not files:
            raise FileNotFoundError(f"no images with endings {exts} under {str(self.root)!r}")
        self.labelled = labels == "folders"
        self.files = files
        self.targets = targets
        self.num_classes = len(self.classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = center_crop_resize(load_image(self.files[index]), self.resolution)
        return torch.from_numpy(np.asarray(image).transpose(2, 0, 1).copy()), self.targets[index]

    def verify(self) -> list[tuple[str, str]]:
        """Decode every file of the dataset; ``(path, reason)`` for each one that fails."""
        return verify_images(self.files)

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={str(self.root)!r}, n={len(self)}, resolution={self.resolution}, "
            f"num_classes={self.num_classes}, labelled={self.labelled})"
        )
