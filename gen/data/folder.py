"""Image-folder datasets: ImageNet-style class folders or any flat/unlabelled folder of images.

Folders are walked by identity, not by name (``scan_images``): every real file and every real folder
is taken once, however many symbolic or hard links lead to it. Symbolic links are followed, also
when they leave the root, because datasets are often assembled from links into other disks; but a
link back into a folder that contains it (a loop), a second path to a file or folder already taken,
a broken link, a special file (pipe, device) with an image name, and a folder that cannot be listed
are all reported as problems, and ``ImageFolder`` refuses a folder that has any, since each of them
would silently duplicate, mislabel or drop images.

Files are decoded on access (use a DataLoader with workers), converted to RGB, and brought to a
square ``resolution`` with the ADM centre crop (``center_crop_resize``). Pixel formats are converted
by one rule (``decode_image``): 16-bit to 8-bit by scaling, transparency composited onto black, CMYK
and other colour spaces to RGB; floating-point pixels and animations (several frames) are refused.
Unreadable files raise ``CorruptImageError`` naming the file; ``verify_images`` /
``ImageFolder.verify`` list them all, and ``python -m gen.data.verify ROOT`` prints them.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError
from torch.utils.data import Dataset

from gen.data.transforms import center_crop_resize
from gen.utils.cli import printable

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")

# PIL modes holding one grey channel (decoded to (H, W, 1)); every other mode becomes RGB.
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


class CorruptImageError(OSError):
    """An image file that cannot be read or decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"image file '{printable(path)}': {reason}. Remove or replace it; "
            f"`python -m gen.data.verify <root>` lists every unreadable file in a folder."
        )


class FolderProblemError(ValueError):
    """An image folder that is not a clean tree (loops, duplicate links, broken links, unlistable folders)."""


@dataclass
class FolderScan:
    """What ``scan_images`` found.

    Attributes:
        root: the folder scanned.
        files: each real image file once, by the path it was reached through, sorted.
        problems: ``(path, reason)`` for loops, second paths to the same file or folder, broken links,
            special files with image names and folders that cannot be listed, sorted by path.
        outside: the files among ``files`` reached through links that leave ``root`` (followed).
    """

    root: Path
    files: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    outside: list[Path] = field(default_factory=list)

    def raise_problems(self) -> None:
        """Refuse the folder when it has problems, naming the first ones and the command that lists them all."""
        if not self.problems:
            return
        shown = "; ".join(f"{printable(p)}: {r}" for p, r in self.problems[:3])
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        raise FolderProblemError(
            f"image folder '{printable(self.root)}' has {len(self.problems)} problem(s) that would duplicate, "
            f"mislabel or drop images: {shown}{more}. Fix them; `python -m gen.data.verify "
            f"{printable(self.root)}` lists them all."
        )


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _check_root(root: Path) -> None:
    if not root.exists():
        raise FileNotFoundError(
            f"image folder '{printable(root)}' does not exist; check the path (a dataset's `root`, or the folder argument)"
        )
    if not root.is_dir():
        raise NotADirectoryError(f"image folder root '{printable(root)}' is a file, not a folder")


def _reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower() if e.errno is not None else str(e)


def _inside(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or lies under it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def scan_images(
    root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS, recursive: bool = True
) -> FolderScan:
    """Find the image files under ``root``, each real file and each real folder once.

    Plain files and folders are walked first, then symbolic links to folders (in path order), so a
    file is named by its own path rather than by a link to it. Hidden entries (``.name``) are skipped.

    Args:
        root: the folder.
        extensions: file name endings counted as images (case-insensitive).
        recursive: walk sub-folders (``False``: only the images directly in ``root``).

    Returns:
        The files, the problems found and the files reached from outside ``root`` (see ``FolderScan``).

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` is missing or not a folder.
    """
    root = Path(root)
    _check_root(root)
    walker = _Walker(root, tuple(e.lower() for e in extensions), recursive)
    walker.run()
    scan = walker.scan
    scan.files.sort()
    scan.outside.sort()
    scan.problems.sort()
    return scan


def _identity(path: Path, st: os.stat_result) -> object:
    # Some network / FUSE file systems report inode 0 for everything; fall back to the real path there.
    return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(path)


class _Walker:
    """One scan of ``scan_images``: real folders first, then the links to folders, then the links to files."""

    def __init__(self, root: Path, exts: tuple[str, ...], recursive: bool):
        self.root, self.exts, self.recursive = root, exts, recursive
        self.root_real = os.path.realpath(root)
        self.scan = FolderScan(root=root)
        self.seen_dirs: dict[object, Path] = {}
        self.seen_files: dict[object, Path] = {}
        self.dir_links: list[tuple[Path, tuple[object, ...]]] = []
        self.file_links: list[tuple[Path, os.stat_result, bool]] = []

    def problem(self, path: Path, why: str) -> None:
        self.scan.problems.append((str(path), why))

    def run(self) -> None:
        root_key = _identity(self.root, os.stat(self.root))
        self.seen_dirs[root_key] = self.root
        self.walk(self.root, (root_key,), False)
        while self.dir_links:  # links found inside linked folders are appended and handled in turn
            self.follow_dir_link(*self.dir_links.pop(0))
        for path, st, outside in self.file_links:
            self.add_file(path, st, outside or not _inside(os.path.realpath(path), self.root_real), linked=True)

    def add_file(self, path: Path, st: os.stat_result, outside: bool, linked: bool) -> None:
        if not stat.S_ISREG(st.st_mode):
            self.problem(path, "not a regular file (a pipe, socket or device); remove it")
            return
        key = _identity(path, st)
        if key in self.seen_files:
            how = "a link to" if linked else "a hard link to"
            self.problem(path, f"{how} {printable(self.seen_files[key])}, which is already included; "
                               f"each image must appear once, remove one of them")
            return
        self.seen_files[key] = path
        self.scan.files.append(path)
        if outside:
            self.scan.outside.append(path)

    def walk(self, folder: Path, chain: tuple[object, ...], outside: bool) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.problem(folder, f"cannot list this folder ({_reason(e)}); its images would be missing")
            return
        for entry in entries:
            if not _hidden(entry.name):
                self.entry(folder / entry.name, entry, chain, outside)

    def entry(self, path: Path, entry: os.DirEntry, chain: tuple[object, ...], outside: bool) -> None:
        imageish = entry.name.lower().endswith(self.exts)
        try:
            if entry.is_symlink():
                self.link(path, entry.name, imageish, chain, outside)
                return
            st = entry.stat(follow_symlinks=False)
        except OSError as e:
            self.problem(path, f"cannot read its file information ({_reason(e)})")
            return
        if stat.S_ISDIR(st.st_mode):
            if self.recursive:
                key = _identity(path, st)
                if key in self.seen_dirs:  # a bind mount of a folder already walked
                    self.problem(path, f"the same folder as {printable(self.seen_dirs[key])}")
                    return
                self.seen_dirs[key] = path
                self.walk(path, chain + (key,), outside)
        elif imageish:
            self.add_file(path, st, outside, linked=False)

    def link(self, path: Path, name: str, imageish: bool, chain: tuple[object, ...], outside: bool) -> None:
        """A symbolic link: folders are walked after the real folders, files added after every folder."""
        try:
            target = os.stat(path)
        except OSError as e:
            # A dangling link may have been an image or a class folder (no extension); report both.
            if imageish or "." not in name:
                what = "a symbolic link loop" if e.errno == errno.ELOOP else f"a broken link ({_reason(e)})"
                self.problem(path, f"{what} to {printable(os.readlink(path))}")
            return
        if stat.S_ISDIR(target.st_mode):
            if self.recursive:
                self.dir_links.append((path, chain))
        elif imageish:
            self.file_links.append((path, target, outside))

    def follow_dir_link(self, path: Path, chain: tuple[object, ...]) -> None:
        try:
            st = os.stat(path)
        except OSError as e:
            self.problem(path, f"cannot follow this link ({_reason(e)})")
            return
        key = _identity(path, st)
        real = os.path.realpath(path)
        here = os.path.realpath(path.parent)
        if key in chain or _inside(here, real) or _inside(self.root_real, real):
            self.problem(path, f"a symbolic link loop: it leads back to {printable(real)}, which contains it; "
                               f"remove the link")
        elif key in self.seen_dirs:
            self.problem(path, f"a link to the folder {printable(self.seen_dirs[key])}, which is already included; "
                               f"each image must appear once, remove the link")
        else:
            self.seen_dirs[key] = path
            self.walk(path, chain + (key,), not _inside(real, self.root_real))


def find_images(root: str | os.PathLike, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """All image files under ``root`` (recursive, each real file once, hidden entries skipped), sorted.

    Raises:
        FolderProblemError: the folder has loops, duplicate or broken links, or unlistable folders.
    """
    scan = scan_images(root, extensions)
    scan.raise_problems()
    return scan.files


# ----------------------------------------------------------------------------------------------
# Decoding.


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


def _composite_on_black(values: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    # out = value * alpha / 255, rounded: fully transparent pixels are black whatever colour they store.
    return ((values.astype(np.uint32) * alpha[..., None].astype(np.uint32) + 127) // 255).astype(np.uint8)


def _pixels(im: Image.Image, path: str | os.PathLike) -> np.ndarray:
    """uint8 (H, W, 1) for grey modes, (H, W, 3) for everything else (see the module docstring)."""
    mode = im.mode
    if mode == "F":
        raise CorruptImageError(path, "it has floating-point pixels, whose range is unknown; convert it to 8 bits per channel")
    alpha = mode in _ALPHA_MODES or "transparency" in im.info
    if mode in _WIDE_MODES:
        wide = np.asarray(im)
        if wide.size and (int(wide.min()) < 0 or int(wide.max()) > 65535):
            raise CorruptImageError(path, "it has 32-bit pixels outside 0..65535; convert it to 8 bits per channel")
        # 16 -> 8 bits by value (x * 255 / 65535, rounded); PIL's convert("L") would clip everything above 255.
        return ((wide.astype(np.uint64) * 255 + 32767) // 65535).astype(np.uint8)[..., None]
    if mode in GREY_MODES:
        if alpha:
            la = np.asarray(im.convert("LA"))
            return _composite_on_black(la[..., :1], la[..., 1])
        return np.asarray(im.convert("L"))[..., None]
    if alpha:
        rgba = np.asarray(im.convert("RGBA"))
        return _composite_on_black(rgba[..., :3], rgba[..., 3])
    return np.asarray(im.convert("RGB"))


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """Read and fully decode one image file into uint8 pixels (H, W, 1) for grey images or (H, W, 3).

    Conversions: 16-bit grey is scaled to 8 bits; transparency (alpha, palette or colour key) is
    composited onto black; CMYK, YCbCr and palettes become RGB. Refused: floating-point pixels,
    animations (more than one frame), empty files, folders and special files with image names.

    Raises:
        CorruptImageError: naming the file and the reason (unreadable, truncated, not an image, ...).
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise CorruptImageError(path, f"cannot read it ({_reason(e)})") from e
    if not stat.S_ISREG(st.st_mode):
        raise CorruptImageError(path, f"it is {_kind(st.st_mode)}, not an image file")
    if st.st_size == 0:
        raise CorruptImageError(path, "it is empty (0 bytes)")
    # Some libraries switch on PIL's global "load truncated images", which pads a cut-off file with grey
    # instead of failing; a dataset must never get such images, so it is switched off while decoding.
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            frames = int(getattr(im, "n_frames", 1) or 1)
            if frames > 1:
                raise CorruptImageError(path, f"it holds {frames} frames (an animation); save the frame you want as its own image")
            im.load()  # decode now: a lazy open would defer truncation errors to some later transform
            return _pixels(im, path)
    except CorruptImageError:
        raise
    except UnidentifiedImageError as e:
        raise CorruptImageError(path, "it is not an image in a format PIL can read (unknown or damaged header)") from e
    except OSError as e:
        if e.errno is not None:  # the file itself could not be read (permissions, I/O error), not decoded
            raise CorruptImageError(path, f"cannot read it ({_reason(e)})") from e
        raise CorruptImageError(path, f"cannot decode it ({type(e).__name__}: {e})") from e
    except Exception as e:  # PIL signals bad data with many exception types (SyntaxError, ValueError, ...)
        raise CorruptImageError(path, f"cannot decode it ({type(e).__name__}: {e})") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode one file fully into an RGB PIL image (grey images get three equal channels).

    Raises:
        CorruptImageError: naming the file, when it cannot be read or decoded (see ``decode_image``).
    """
    pixels = decode_image(path)
    return Image.fromarray(np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels)


def verify_images(
    root: str | os.PathLike | Sequence[str | os.PathLike],
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str, str]]:
    """Fully decode every image and list the ones that fail, with the folder's problems.

    Args:
        root: a folder (scanned recursively, see ``scan_images``) or an explicit list of files.
        extensions: file name endings counted as images when scanning a folder.
        progress: called with the number of files decoded so far.

    Returns:
        ``(path, reason)`` for each unreadable file and each folder problem, in path order; empty
        when the folder is clean and every file decodes.
    """
    problems: list[tuple[str, str]] = []
    if isinstance(root, (str, os.PathLike)):
        scan = scan_images(root, extensions)
        files: Sequence[str | os.PathLike] = scan.files
        problems = list(scan.problems)
    else:
        files = root
    for i, f in enumerate(files):
        try:
            decode_image(f)
        except CorruptImageError as e:
            problems.append((str(f), e.reason))
        if progress is not None:
            progress(i + 1)
    return sorted(problems)


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

    Raises:
        FolderProblemError: the folder has loops, duplicate or broken links, or unlistable folders
            (see ``scan_images``); the message names them.

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
        if labels not in ("auto", "folders", "none"):
            raise ValueError(f"labels must be 'auto', 'folders' or 'none', got {labels!r}")
        scan = scan_images(self.root, self.extensions)
        scan.raise_problems()
        exts = tuple(e.lower() for e in self.extensions)
        entries = [e for e in sorted(self.root.iterdir()) if not _hidden(e.name)]
        subdirs = [e for e in entries if e.is_dir()]
        top_images = [f for f in scan.files if f.parent == self.root]
        if labels == "auto":
            if subdirs and top_images:
                raise ValueError(
                    f"'{printable(self.root)}' holds both images and sub-folders; set labels='folders' (class "
                    f"folders, top-level files ignored) or labels='none' (all images, unlabelled)"
                )
            labels = "folders" if subdirs else "none"
        if labels == "folders":
            self.classes = [d.name for d in subdirs]
            index = {c: k for k, c in enumerate(self.classes)}
            # A file's class is the top-level folder it was reached through (links were checked above).
            files = [f for f in scan.files if f.parent != self.root]
            targets = [index[f.relative_to(self.root).parts[0]] for f in files]
            used = set(targets)
            for k, d in enumerate(subdirs):
                if k not in used:
                    # An empty class would silently shift every later label; refuse instead.
                    raise FileNotFoundError(f"class folder '{printable(d)}' holds no images with endings {exts}")
        else:
            self.classes = [self.root.name]
            files = scan.files
            targets = [0] * len(files)
        if not files:
            raise FileNotFoundError(f"no images with endings {exts} under '{printable(self.root)}'")
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
            f"ImageFolder(root='{printable(self.root)}', n={len(self)}, resolution={self.resolution}, "
            f"num_classes={self.num_classes}, labelled={self.labelled})"
        )
