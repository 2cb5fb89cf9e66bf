"""CIFAR-10 from a local copy in torchvision's layout (``cifar-10-batches-py``), held in memory.

Nothing is downloaded. The batch files of the official archive are Python pickles, and a plain
``pickle.load`` of a file from elsewhere can run any code. They are read here by a restricted
unpickler (``read_batch``) that rebuilds only what those files hold (dicts, lists, strings, numbers
and numpy arrays) and refuses any other object before it is created, so even a copy that skips the
checksums (``check_md5=False``) cannot run code; the contents are then checked (uint8 data of
N x 3072, N labels in [0, 10)).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gen.data.base import TensorImageDataset
from gen.utils.cli import printable

BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# MD5 of each file of the official archive (the same table as torchvision.datasets.CIFAR10).
MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    META_FILE: "5ff9c542aee3614f3951f8cda6e48888",
}


class CIFARFileError(ValueError):
    """A CIFAR-10 batch file that is damaged, has unexpected contents, or asks to build foreign objects."""


def _latin1_only(text: str, encoding: str) -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(text, "latin1"); nothing else is allowed.
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array reconstructor, wherever this version keeps it
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5's buffer-based reconstructor
    allowed: dict[tuple[str, str], Any] = {("_codecs", "encode"): _latin1_only}
    for core in ("numpy.core", "numpy._core"):  # numpy 1 pickles name numpy.core, numpy 2 numpy._core
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    allowed[("numpy", "ndarray")] = np.ndarray
    allowed[("numpy", "dtype")] = np.dtype
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Rebuilds only builtin containers and numpy arrays: every other global is refused unresolved."""

    ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it asks to build {module}.{name}") from None


def read_batch(path: str | os.PathLike) -> dict[str, Any]:
    """Read one CIFAR batch or meta file without running code; keys are returned as ``str``.

    Raises:
        CIFARFileError: naming the file, when it is not a pickle, is truncated, or holds anything
            but dicts, lists, strings, numbers and numpy arrays (a file that would run code).
    """
    raw = Path(path).read_bytes()
    try:
        # latin1 turns Python 2 byte strings (the official files were written by Python 2) into str.
        obj = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise CIFARFileError(
            f"CIFAR-10 file '{printable(path)}' is not an official batch file ({e}); it was not loaded, since "
            f"such a file can run code. Re-extract {ARCHIVE_URL}."
        ) from e
    except Exception as e:  # truncated or not a pickle at all: EOFError, ValueError, ...
        raise CIFARFileError(
            f"CIFAR-10 file '{printable(path)}' is damaged ({type(e).__name__}: {e}). Re-extract {ARCHIVE_URL}."
        ) from e
    if not isinstance(obj, dict):
        raise CIFARFileError(f"CIFAR-10 file '{printable(path)}' holds a {type(obj).__name__}, not a dict. Re-extract {ARCHIVE_URL}.")
    # Files re-pickled after a load with encoding="bytes" have bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, 32, 32) and int64 labels (N,) of one batch file, checked."""
    entry = read_batch(path)

    def bad(what: str) -> CIFARFileError:
        return CIFARFileError(f"CIFAR-10 file '{printable(path)}': {what}. Re-extract {ARCHIVE_URL}.")

    if "data" not in entry or "labels" not in entry:
        raise bad(f"no 'data' and 'labels' entries (keys: {sorted(map(str, entry))})")
    data, labels = entry["data"], entry["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise bad(f"'data' must be uint8 (N, 3072), got {got}")
    try:
        labels = np.asarray(labels)
    except Exception as e:
        raise bad(f"'labels' is not a list of integers ({e})") from e
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise bad(f"'labels' must be {data.shape[0]} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise bad(f"labels must lie in [0, 9], found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _resolve_root(root: str | os.PathLike) -> Path:
    """Accept the folder that contains ``cifar-10-batches-py`` or that folder itself; return the parent."""
    root = Path(root)
    if root.name == BASE_FOLDER and not (root / BASE_FOLDER).exists():
        return root.parent
    return root


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class CIFAR10(TensorImageDataset):
    """CIFAR-10: 32x32 RGB, 10 classes; 50,000 training and 10,000 test images.

    Args:
        root: the folder holding ``cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta),
            or that folder itself.
        split: "train" or "test".
        check_md5: verify the files against the official checksums (about a second; turn off only
            for hand-made test copies, which are still read without running code).

    Raises:
        FileNotFoundError: files are missing (the message says where to get and put them).
        CIFARFileError: checksums differ, or a file is damaged or holds anything but the expected arrays.
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
                f"CIFAR-10 files missing in '{printable(folder)}': {', '.join(missing)}. Nothing is downloaded at run "
                f"time: fetch {ARCHIVE_URL} elsewhere and extract it into '{printable(parent)}' so that "
                f"'{printable(folder / 'data_batch_1')}' exists."
            )
        if check_md5:
            self._check_checksums(folder, needed)
        arrays = [_batch_arrays(folder / name) for name in needed[:-1]]
        meta = read_batch(folder / META_FILE)
        classes = meta.get("label_names")
        if not (isinstance(classes, list) and len(classes) == 10 and all(isinstance(c, str) for c in classes)):
            raise CIFARFileError(
                f"CIFAR-10 file '{printable(folder / META_FILE)}': 'label_names' must be 10 strings. Re-extract {ARCHIVE_URL}."
            )
        images = torch.from_numpy(np.ascontiguousarray(np.concatenate([a for a, _ in arrays])))
        labels = torch.from_numpy(np.concatenate([y for _, y in arrays]))
        super().__init__(images, labels, num_classes=10, name="cifar10", classes=classes)
        self.split = split

    @staticmethod
    def _check_checksums(folder: Path, needed: tuple[str, ...]) -> None:
        # All six batches are checked even for one split, as torchvision does; the error names each bad file.
        wanted = set(needed) | set(TRAIN_FILES) | set(TEST_FILES)
        bad = [n for n in sorted(wanted) if not (folder / n).is_file() or _md5(folder / n) != MD5[n]]
        if bad:
            raise CIFARFileError(
                f"CIFAR-10 files in '{printable(folder)}' are missing or do not match the official checksums: "
                f"{', '.join(bad)}. Re-extract {ARCHIVE_URL} (or pass check_md5=False for a hand-made copy)."
            )
