"""Bad inputs, faults and attacks on `python -m eval`, `python -m gen.data.verify`, the data loaders, `train.py`
and `sample.py`.

Each case is refused with one clear line (exit status 2 from the commands, 3 when values stopped being finite)
naming the file or argument, or, where the input is legitimate but unusual (16-bit, transparent, links leaving
the folder, a moved dataset, a killed run), it is handled correctly; nothing is silently duplicated, mislabelled,
dropped, mixed, executed or written from non-finite values.

Closing note for train.py / sample.py (issue 11): 78 cases tried here and in tests/test_train.py (the documented
sample -> eval path): 30 training settings and 26 sampling settings/files in the two tables, 10 training faults
(non-finite end and resume, damaged state, full disk for the state and for the log, fp16 on CPU, moved/changed
dataset and its override, evaluation progress), 9 output-folder cases of sample.py, 2 through the real commands,
1 end-to-end path. 66 are refused with one line naming the key or file and the fix, 12 are legitimate and handled
(resumed, honoured, kept, reported); none is silent. 65 of them failed on the code before this change (11
settings were already refused, and a non-finite end and fp16 on CPU were already handled; their tests verify it).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

ROOT = Path(__file__).resolve().parents[1]


def run_cli(main: Callable[[list[str]], int], argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of an in-process command; argparse's SystemExit counts as its status."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse, or a bare SystemExit("message") (which exits with status 1)
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(code: int, err: str, *names: str) -> str:
    """Status 2, no traceback, and an error line that names every one of ``names``."""
    assert "Traceback" not in err, err
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def png(path: Path, size: tuple[int, int] = (8, 8), value: int = 128, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)
    return path


# ----------------------------------------------------------------------------------------------
# A tiny feature extractor, so the commands run in milliseconds.


class TinyFeatures:
    """Mean of each image's rows: (B, C, H, W) uint8 -> (B, 4) float (FID needs more images than 4)."""

    name, dim, resize, weights_sha256 = "tiny-test", 4, "none", "0" * 64
    device = torch.device("cpu")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().mean(1)  # (B, H, W)
        return torch.stack([x.mean((1, 2)), x[:, 0].mean(1), x[:, -1].mean(1), x.std((1, 2))], dim=1)

    def manifest(self) -> dict[str, object]:
        return {"extractor": self.name, "weights_sha256": self.weights_sha256, "resize": self.resize, "dim": self.dim}


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--extractor tiny`` (and reference files made with it) use ``TinyFeatures``; other names are real."""
    import eval.features

    real = eval.features.build_extractor
    monkeypatch.setattr(eval.features, "build_extractor",
                        lambda name, **kw: TinyFeatures() if name in ("tiny", TinyFeatures.name) else real(name, **kw))


def write_ref(path: Path) -> Path:
    from eval.stats import GaussianStats, save_stats

    return save_stats(path, GaussianStats(np.zeros(4), np.eye(4), 100, TinyFeatures().manifest()))


def write_samples(path: Path, n: int = 20, **extra: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, arr_0=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8), **extra)
    return path


def write_folder(folder: Path, n: int = 12) -> Path:
    for i in range(n):
        png(folder / f"{i:03d}.png", value=10 * i)
    return folder


# ----------------------------------------------------------------------------------------------
# `python -m eval`: one table of bad arguments and bad files. Each builder writes what it needs under
# tmp and returns (argv, the words the error line must contain).


@dataclass
class Case:
    id: str
    build: Callable[[Path], tuple[list[str], tuple[str, ...]]]


def _npz_case(writer: Callable[[Path], object], *expect: str) -> Callable[[Path], tuple[list[str], tuple[str, ...]]]:
    def build(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
        bad = tmp / "bad.npz"
        writer(bad)
        return ["npz", str(bad), "--ref", str(write_ref(tmp / "ref.npz"))], (str(bad), *expect)

    return build


def _ref_case(writer: Callable[[Path], object], *expect: str) -> Callable[[Path], tuple[list[str], tuple[str, ...]]]:
    def build(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
        ref = tmp / "ref.npz"
        writer(ref)
        return ["npz", str(write_samples(tmp / "s.npz")), "--ref", str(ref)], (str(ref), *expect)

    return build


def _folder_case(writer: Callable[[Path], object], *expect: str) -> Callable[[Path], tuple[list[str], tuple[str, ...]]]:
    def build(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
        folder = write_folder(tmp / "pngs")
        writer(folder)
        return ["folder", str(folder), "--ref", str(write_ref(tmp / "ref.npz"))], expect

    return build


def _stats(path: Path, **arrays: np.ndarray) -> None:
    np.savez(path, **arrays)


def _truncated_zip(path: Path) -> None:
    write_samples(path, n=200)
    path.write_bytes(path.read_bytes()[:3000])


def _manifest(text: str) -> Callable[[Path], None]:
    return lambda p: np.savez(p, mu=np.zeros(4), sigma=np.eye(4), manifest=np.array(text))


def _truncated_png(folder: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "zz_cut.png")
    good = (folder / "zz_cut.png").read_bytes()
    (folder / "zz_cut.png").write_bytes(good[: len(good) - 40])  # the header survives, the pixel data is cut


def _image_link(folder: Path) -> None:
    os.symlink(folder / "003.png", folder / "zz_again.png")


def _other_size(folder: Path) -> None:
    png(folder / "zz_big.png", size=(16, 16))


def _only_dirs(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    (tmp / "pngs" / "a.png").mkdir(parents=True)  # a folder named like an image
    return ["folder", str(tmp / "pngs"), "--ref", str(write_ref(tmp / "ref.npz"))], ("no image files", "1 sub-folder")


def _png_dir_is_file(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    (tmp / "pngs").write_text("a file")
    snap = tmp / "s.safetensors"
    snap.write_bytes(b"x")
    argv = ["fid5k", str(snap), "--ref", str(write_ref(tmp / "ref.npz")), "--generator", "pipeline:snapshot_generate_fn",
            "--png-dir", str(tmp / "pngs")]
    return argv, ("--png-dir", str(tmp / "pngs"))


def _png_dir_holds_pngs(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    """An earlier evaluation's PNGs: this run would replace some and keep the others, one folder of two sets."""
    argv, _ = _png_dir_is_file(tmp)
    (tmp / "pngs").unlink()
    png(tmp / "pngs" / "000007.png")
    return argv, ("--png-dir", str(tmp / "pngs"), "already holds 1 <seed>.png", "000007.png")


def _corrupt_snapshot(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
    snap = tmp / "snapshot-000000100.safetensors"
    snap.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    argv = ["fid5k", str(snap), "--ref", str(write_ref(tmp / "ref.npz")), "--generator", "pipeline:snapshot_generate_fn"]
    return argv, (str(snap), "could not be loaded")


def _generator(spec: str, *expect: str) -> Callable[[Path], tuple[list[str], tuple[str, ...]]]:
    def build(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
        snap = tmp / "s.safetensors"
        snap.write_bytes(b"x")
        return ["fid5k", str(snap), "--ref", str(write_ref(tmp / "ref.npz")), "--generator", spec], ("--generator", *expect)

    return build


def _weights(writer: Callable[[Path], object], *expect: str) -> Callable[[Path], tuple[list[str], tuple[str, ...]]]:
    def build(tmp: Path) -> tuple[list[str], tuple[str, ...]]:
        w = tmp / "weights.pth"
        writer(w)
        argv = ["ref", "--npz", str(write_samples(tmp / "s.npz")), "--extractor", "inception", "--weights", str(w),
                "--out", str(tmp / "r.npz")]
        return argv, (str(w), *expect)

    return build


def _plain(argv: Callable[[Path], list[str]], *expect: str) -> Callable[[Path], tuple[list[str], tuple[str, ...]]]:
    return lambda tmp: (argv(tmp), expect)


def _samples_argv(tmp: Path, *more: str) -> list[str]:
    return ["npz", str(write_samples(tmp / "s.npz")), "--ref", str(write_ref(tmp / "ref.npz")), *more]


EVAL_CASES = [
    # sample batches (.npz)
    Case("npz-text-file", _npz_case(lambda p: p.write_text("hello"), "not an .npz")),
    Case("npz-empty-file", _npz_case(lambda p: p.write_bytes(b""), "empty")),
    Case("npz-truncated", _npz_case(_truncated_zip, "not a readable .npz")),
    Case("npz-is-npy", _npz_case(lambda p: np.save(open(p, "wb"), np.zeros((2, 8, 8, 1), np.uint8)), "single .npy")),
    Case("npz-pickled-objects", _npz_case(
        lambda p: np.savez(p, arr_0=np.array([{"a": 1}, None], dtype=object)), "'arr_0'", "unpickling")),
    Case("npz-labels-mismatch", _npz_case(lambda p: write_samples(p, arr_1=np.arange(7)), "arr_1", "20")),
    Case("npz-labels-float", _npz_case(lambda p: write_samples(p, arr_1=np.full(20, 0.5)), "arr_1", "integers")),
    Case("npz-one-image", _npz_case(lambda p: write_samples(p, n=1), "1 image", "at least 2")),
    Case("npz-is-a-folder", lambda tmp: (["npz", str(tmp), "--ref", str(write_ref(tmp / "ref.npz"))],
                                         (str(tmp), "is a folder"))),
    # reference statistics
    Case("ref-garbage", _ref_case(lambda p: p.write_bytes(os.urandom(300)), "not an .npz")),
    Case("ref-truncated", _ref_case(_truncated_zip, "not a readable .npz")),
    Case("ref-nan", _ref_case(lambda p: _stats(p, mu=np.full(4, np.nan), sigma=np.eye(4)), "NaN")),
    Case("ref-bad-manifest", _ref_case(_manifest("{not json"), "manifest")),
    Case("ref-manifest-not-object", _ref_case(_manifest("[1, 2]"), "manifest")),
    Case("ref-string-mu", _ref_case(lambda p: _stats(p, mu=np.array(["a"] * 4), sigma=np.eye(4)), "mu", "dtype")),
    Case("ref-half-sfid", _ref_case(lambda p: _stats(p, mu=np.zeros(4), sigma=np.eye(4), mu_s=np.zeros(3),
                                                     manifest=np.array(json.dumps(TinyFeatures().manifest()))),
                                    "mu_s", "sigma_s")),
    Case("ref-is-a-folder", lambda tmp: (["npz", str(write_samples(tmp / "s.npz")), "--ref", str(tmp)],
                                         ("--ref", "is a folder"))),
    # folders of images
    Case("folder-truncated-png", _folder_case(_truncated_png, "1 of 13", "cannot be read")),
    Case("folder-empty-png", _folder_case(lambda f: (f / "zz_empty.png").write_bytes(b""), "cannot be read")),
    Case("folder-not-an-image", _folder_case(lambda f: (f / "zz.png").write_text("text"), "cannot be read")),
    Case("folder-only-dirs-named-like-images", _only_dirs),
    Case("folder-duplicate-link", _folder_case(_image_link, "zz_again.png", "003.png", "already included")),
    Case("folder-mixed-sizes", _folder_case(_other_size, "zz_big.png", "16x16x1", "8x8x1")),
    Case("folder-animated-gif", _folder_case(
        lambda f: Image.new("L", (8, 8)).save(f / "zz.gif", save_all=True, append_images=[Image.new("L", (8, 8), 9)]),
        "cannot be read")),
    # arguments
    Case("ref-without-out", _plain(lambda tmp: ["ref", "--npz", str(write_samples(tmp / "s.npz")), "--extractor", "x"],
                                   "--out")),
    Case("sfid-without-inception", _plain(
        lambda tmp: ["ref", "--dataset", "mnist5k", "--extractor", "yardstick", "--sfid", "--out", str(tmp / "r.npz")],
        "--sfid", "Inception")),
    Case("batch-size-zero", _plain(lambda tmp: _samples_argv(tmp, "--batch-size", "0"), "--batch-size")),
    Case("unknown-dataset", _plain(lambda tmp: ["ref", "--dataset", "imagenet", "--extractor", "yardstick", "--out",
                                                str(tmp / "r.npz")], "--dataset")),
    Case("device-unknown", _plain(lambda tmp: _samples_argv(tmp, "--device", "tpu"), "--device")),
    Case("out-is-a-folder", _plain(lambda tmp: _samples_argv(tmp, "--out", str(tmp)), "--out", "is a folder")),
    Case("out-under-a-file", _plain(lambda tmp: _samples_argv(tmp, "--out", str(tmp / "s.npz" / "m.json")), "--out")),
    # The metrics JSON was written over the input (the samples, or the reference statistics): both were destroyed.
    Case("out-is-the-samples", _plain(lambda tmp: _samples_argv(tmp, "--out", str(tmp / "s.npz")),
                                      "--out", "is the input npz file", "destroy")),
    Case("out-is-the-ref", _plain(lambda tmp: _samples_argv(tmp, "--out", str(tmp / "ref.npz")), "is the input --ref")),
    Case("weights-for-yardstick", _plain(
        lambda tmp: ["ref", "--dataset", "mnist5k", "--extractor", "yardstick", "--weights", str(write_ref(tmp / "w")),
                     "--out", str(tmp / "r.npz")], "--weights")),
    Case("weights-garbage", _weights(lambda p: p.write_bytes(os.urandom(500)), "not a readable weights file")),
    Case("weights-wrong-network", _weights(lambda p: torch.save({"fc.weight": torch.zeros(2, 2)}, p), "does not fit")),
    Case("option-without-equals", _plain(lambda tmp: _generator("pipeline:snapshot_generate_fn")(tmp)[0]
                                         + ["--option", "steps"], "--option", "key=value")),
    Case("generator-no-colon", _generator("gen.pipeline", "module:function")),
    Case("generator-no-module", _generator("no_such_module:fn", "cannot import")),
    Case("generator-no-function", _generator("pipeline:no_such_fn", "has no")),
    Case("snapshot-corrupt", _corrupt_snapshot),
    Case("png-dir-is-a-file", _png_dir_is_file),
    Case("png-dir-holds-pngs", _png_dir_holds_pngs),
]
if not torch.cuda.is_available():
    EVAL_CASES.append(Case("device-cuda-missing", _plain(lambda tmp: _samples_argv(tmp, "--device", "cuda"), "--device", "cpu")))


@pytest.mark.parametrize("case", EVAL_CASES, ids=[c.id for c in EVAL_CASES])
def test_eval_cli_refuses_bad_input_in_one_line(case: Case, tmp_path: Path, tiny: None, capsys: pytest.CaptureFixture[str]) -> None:
    from eval.__main__ import main

    argv, expect = case.build(tmp_path)
    code, out, err = run_cli(main, argv, capsys)
    assert_refused(code, err, *expect)
    assert out == ""  # no metrics for a refused run


def test_eval_folder_names_every_unreadable_image(tmp_path: Path, tiny: None, capsys: pytest.CaptureFixture[str]) -> None:
    from eval.__main__ import main

    folder = write_folder(tmp_path / "pngs")
    _truncated_png(folder)
    (folder / "zz_empty.png").write_bytes(b"")
    code, _, err = run_cli(main, ["folder", str(folder), "--ref", str(write_ref(tmp_path / "ref.npz"))], capsys)
    assert_refused(code, err, "2 of 14")
    for name, why in (("zz_cut.png", "truncated"), ("zz_empty.png", "empty")):
        assert any(name in line and why in line for line in err.splitlines()), err


def test_eval_folder_reads_images_once_and_converts_modes(tmp_path: Path, tiny: None, capsys: pytest.CaptureFixture[str]) -> None:
    from eval.__main__ import _load_folder

    folder = write_folder(tmp_path / "pngs", n=2)
    (folder / "sub.png").mkdir()  # a folder named like an image is not an image
    wide = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(wide).save(folder / "wide.png")  # 16-bit grey
    images = _load_folder(folder)
    assert images.shape == (3, 1, 8, 8)
    expect = np.round(wide.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(images[2, 0].numpy(), expect)  # scaled, not clipped at 255


# ----------------------------------------------------------------------------------------------
# Writing: a full disk and an unwritable folder are named, and leave nothing behind.


def _savez_on_full_disk(f: object, *args: object, **kwargs: object) -> None:
    if hasattr(f, "write"):
        f.write(b"partial")  # a real full disk fails after writing part of the file
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_writing_reference_statistics(tmp_path: Path, tiny: None, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from eval.__main__ import main

    samples = write_samples(tmp_path / "s.npz")
    monkeypatch.setattr(np, "savez", _savez_on_full_disk)
    out = tmp_path / "refs" / "r.npz"
    code, stdout, err = run_cli(main, ["ref", "--npz", str(samples), "--extractor", "tiny", "--out", str(out)], capsys)
    assert_refused(code, err, "--out", str(out), "disk is full")
    assert stdout == "" and list(out.parent.iterdir()) == []  # no partial file, no temp file


def test_full_disk_writing_metrics(tmp_path: Path, tiny: None, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from eval.__main__ import main

    def fail(self: Path, text: str, *args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", fail)
    out = tmp_path / "m" / "metrics.json"
    code, stdout, err = run_cli(main, _samples_argv(tmp_path, "--out", str(out)), capsys)
    assert_refused(code, err, str(out), "disk is full")
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Progress of long phases: status lines on stderr when not on a terminal, on rank 0 only.


def test_eval_reports_progress_on_stderr_on_rank_0_only(tmp_path: Path, tiny: None, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from eval.__main__ import main

    monkeypatch.setenv("GEN_STATUS_INTERVAL", "0")
    samples = write_samples(tmp_path / "s.npz", n=40)
    argv = ["ref", "--npz", str(samples), "--extractor", "tiny", "--batch-size", "8", "--out", str(tmp_path / "r.npz")]
    code, out, err = run_cli(main, argv, capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith(f"reference statistics of {samples}")]
    assert len(lines) >= 5 and "40/40 img (100%)" in lines[-1], err  # a line per batch at interval 0, then the total
    assert json.loads(out)["num_images"] == 40  # stdout keeps only the result

    monkeypatch.setenv("RANK", "1")  # another process of the same launch says nothing (no process group here)
    from gen.utils.progress import Progress

    quiet = io.StringIO()
    with Progress(10, "x", stream=quiet) as p:
        p.update(10)
    assert quiet.getvalue() == ""


def test_progress_draws_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    from gen.utils.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        with Progress(100, "features", stream=stream, interval_s=0, enabled=True) as p:
            for done in (30, 60, 100):
                p.update(done)
    assert "\r" in tty.getvalue() and "it/s" not in tty.getvalue() and "img/s" in tty.getvalue()
    assert log.getvalue().splitlines()[0] == "features: 100 img to do"
    assert [line.split("  ")[0] for line in log.getvalue().splitlines()[1:]] == [
        "features: 30/100 img (30%)", "features: 60/100 img (60%)", "features: 100/100 img (100%)"
    ]


# ----------------------------------------------------------------------------------------------
# Image folders: walked by identity, problems reported, every mode decoded by one rule.


def _classes(root: Path) -> Path:
    for cls, value in (("cat", 50), ("dog", 150)):
        for j in range(3):
            png(root / cls / f"{j}.png", value=value, mode="RGB")
    return root


def _loop(root: Path) -> None:
    os.symlink("..", root / "cat" / "loop")  # cat/loop/dog/... would put dogs under "cat", again and again


def _cross_class_link(root: Path) -> None:
    os.symlink(root / "dog", root / "cat" / "more")  # dog images would also be labelled cat


def _hard_link(root: Path) -> None:
    os.link(root / "cat" / "0.png", root / "dog" / "9.png")


def _broken_link(root: Path) -> None:
    os.symlink(root / "gone.png", root / "cat" / "9.png")


def _self_link(root: Path) -> None:
    os.symlink("x", root / "dog" / "x")


def _fifo(root: Path) -> None:
    os.mkfifo(root / "dog" / "9.png")  # decoding it would block forever


def _ancestor_link(root: Path) -> None:
    os.symlink(root.parent, root / "dog" / "up")  # leads to the folder holding the dataset


FOLDER_CASES = [
    ("symlink-loop", _loop, "cat/loop", "loop"),
    ("link-into-another-class", _cross_class_link, "cat/more", "already included"),
    ("hard-link-in-two-classes", _hard_link, "dog/9.png", "already included"),
    ("broken-link", _broken_link, "cat/9.png", "broken link"),
    ("link-to-itself", _self_link, "dog/x", "loop"),
    ("fifo-named-like-an-image", _fifo, "dog/9.png", "not a regular file"),
    ("link-to-a-parent-of-the-root", _ancestor_link, "dog/up", "loop"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make, where, why", [c[1:] for c in FOLDER_CASES], ids=[c[0] for c in FOLDER_CASES])
def test_folder_problems_are_refused_and_listed(make: Callable[[Path], None], where: str, why: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from gen.data import ImageFolder
    from gen.data.folder import FolderProblemError
    from gen.data.verify import main

    root = _classes(tmp_path / "data")
    make(root)
    with pytest.raises(FolderProblemError, match="gen.data.verify") as info:
        ImageFolder(root, resolution=8)
    assert where in str(info.value) and why in str(info.value)
    code, out, err = run_cli(main, [str(root)], capsys)
    assert code == 1 and "Traceback" not in err
    listed = [line.split("\t") for line in out.splitlines()]
    assert [p for p, _ in listed] == [str(root / where)] and why in listed[0][1]


def test_folder_walk_takes_each_real_file_once_and_follows_links_out_of_the_root(tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from gen.data import ImageFolder
    from gen.data.verify import main

    root = _classes(tmp_path / "data")
    elsewhere = tmp_path / "other-disk" / "emu"
    for j in range(2):
        png(elsewhere / f"{j}.png", value=250, mode="RGB")
    os.symlink(elsewhere, root / "emu")  # a class folder on another disk: followed
    ds = ImageFolder(root, resolution=8)
    assert ds.classes == ["cat", "dog", "emu"] and ds.targets == [0, 0, 0, 1, 1, 1, 2, 2]
    code, _, err = run_cli(main, [str(root)], capsys)
    assert code == 0 and "2 file(s) were reached through links that leave the folder" in err


def test_unlistable_folder_is_reported_not_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from gen.data import ImageFolder
    from gen.data.folder import FolderProblemError
    from gen.data.verify import main

    root = _classes(tmp_path / "data")
    png(root / "dog" / "deep" / "0.png")
    real_scandir = os.scandir

    def scandir(path: object) -> object:  # tests run as root, so permissions are simulated
        if Path(os.fspath(path)).name == "deep":
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # os.walk looks scandir up in the os module too
    with pytest.raises(FolderProblemError, match="permission denied"):
        ImageFolder(root, resolution=8)
    code, out, _ = run_cli(main, [str(root)], capsys)
    assert code == 1 and out.startswith(f"{root / 'dog' / 'deep'}\tcannot list this folder (permission denied)")


def test_non_utf8_file_names_are_printed_escaped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    bad = os.path.join(os.fsencode(root), b"caf\xe9.png")  # Latin-1 name: not valid UTF-8
    with open(bad, "wb") as f:
        f.write(b"not a png")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LC_ALL": "C.UTF-8", "PYTHONUTF8": "0", "PYTHONIOENCODING": "utf-8"}
    got = subprocess.run([sys.executable, "-m", "gen.data.verify", str(root)], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert "Traceback" not in got.stderr and got.returncode == 1, got.stderr
    assert got.stdout.startswith(f"{root}/caf\\xe9.png\t"), got.stdout


def test_verify_usage_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gen.data.verify import main

    code, _, err = run_cli(main, [str(tmp_path / "nope")], capsys)
    assert_refused(code, err, str(tmp_path / "nope"), "does not exist")
    file = png(tmp_path / "a.png")
    code, _, err = run_cli(main, [str(file)], capsys)
    assert_refused(code, err, str(file), "not a folder")


def test_verify_reports_progress(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from gen.data.verify import main

    monkeypatch.setenv("GEN_STATUS_INTERVAL", "0")
    root = _classes(tmp_path / "data")
    code, _, err = run_cli(main, [str(root)], capsys)
    assert code == 0 and f"verify {root}: 6/6 file (100%)" in err


# ---- pixel formats: one table, decoded by ImageFolder (RGB) and eval folder (grey kept grey).


def _mode_file(tmp: Path, kind: str) -> Path:
    path = tmp / f"{kind}.png"
    if kind == "16-bit-grey":
        Image.fromarray(np.full((4, 4), 65535 // 3, dtype=np.uint16)).save(path)
    elif kind == "palette-transparent":
        im = Image.new("P", (4, 4), 0)
        im.putpalette([255, 255, 255] + [0, 0, 255] * 255)
        im.putpixel((0, 0), 1)
        im.save(path, transparency=0)  # index 0 (white) is fully transparent
    elif kind == "rgba-transparent":
        arr = np.zeros((4, 4, 4), np.uint8)
        arr[..., :3] = 255  # white colour stored under alpha 0
        arr[0, 0] = (0, 0, 255, 255)
        Image.fromarray(arr).save(path)
    elif kind == "grey-half-alpha":
        Image.fromarray(np.stack([np.full((4, 4), 200, np.uint8), np.full((4, 4), 128, np.uint8)], -1)).save(path)
    elif kind == "float-tiff":
        path = tmp / "f.tif"
        Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(path)
    elif kind == "animated-gif":
        path = tmp / "a.gif"
        Image.new("RGB", (4, 4)).save(path, save_all=True, append_images=[Image.new("RGB", (4, 4), (9, 9, 9))])
    return path


MODE_CASES = [
    # (kind, expected RGB pixel (0, 0), expected RGB pixel (1, 1)) or (kind, error words)
    ("16-bit-grey", (85, 85, 85), (85, 85, 85)),
    ("palette-transparent", (0, 0, 255), (0, 0, 0)),
    ("rgba-transparent", (0, 0, 255), (0, 0, 0)),
    ("grey-half-alpha", (100, 100, 100), (100, 100, 100)),
    ("float-tiff", "floating-point"),
    ("animated-gif", "2 frames"),
]


@pytest.mark.parametrize("case", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_pixel_formats_follow_one_rule(case: tuple, tmp_path: Path) -> None:
    from gen.data import CorruptImageError, load_image

    path = _mode_file(tmp_path, case[0])
    if len(case) == 2:
        with pytest.raises(CorruptImageError, match=case[1]) as info:
            load_image(path)
        assert path.name in str(info.value)
        return
    rgb = np.asarray(load_image(path))
    assert tuple(rgb[0, 0]) == case[1] and tuple(rgb[1, 1]) == case[2]


def test_truncated_image_is_refused_even_when_pil_is_told_to_accept_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gen.data import CorruptImageError, ImageFolder

    root = _classes(tmp_path / "data")
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "0.png").write_bytes(good[:-30])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as some libraries set it on import
    ds = ImageFolder(root, resolution=8)
    with pytest.raises(CorruptImageError, match="0.png"):
        ds[0]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is left as it was


# ----------------------------------------------------------------------------------------------
# CIFAR-10: batches are read without running code.


class _Python2Pickler(pickle._Pickler):  # type: ignore[misc, name-defined]
    """Writes what the official archive holds: Python 2 byte strings (BINSTRING) and numpy.core globals."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256 else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")  # type: ignore[attr-defined]
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())  # type: ignore[attr-defined]
        self.memoize(obj)

    dispatch[type] = save_global


def _official_batch(path: Path, labels: list[int]) -> np.ndarray:
    data = np.zeros((len(labels), 3072), np.uint8)
    for j, y in enumerate(labels):
        data[j, 1024 * (y % 3)] = 10 * y + 5  # first pixel of one channel encodes the label
    entry = {b"batch_label": b"training batch 1 of 5", b"labels": labels, b"data": data,
             b"filenames": [f"img_{j}.png".encode() for j in range(len(labels))]}
    buf = io.BytesIO()
    _Python2Pickler(buf, protocol=2).dump(entry)
    path.write_bytes(buf.getvalue())
    return data


def _cifar_folder(tmp: Path) -> Path:
    folder = tmp / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        _official_batch(folder / name, [(b + j) % 10 for j in range(4)])
    buf = io.BytesIO()
    _Python2Pickler(buf, protocol=2).dump({b"label_names": [f"class{k}".encode() for k in range(10)],
                                           b"num_cases_per_batch": 10000, b"num_vis": 3072})
    (folder / "batches.meta").write_bytes(buf.getvalue())
    return folder


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_cifar_reads_official_batches_and_never_runs_code(tmp_path: Path) -> None:
    from gen.data import CIFAR10
    from gen.data.cifar import CIFARFileError

    folder = _cifar_folder(tmp_path)
    ds = CIFAR10(tmp_path, split="test", check_md5=False)  # the Python 2 format of the archive, restricted reader
    assert ds.classes[3] == "class3" and ds.labels.tolist() == [5, 6, 7, 8]
    assert [int(ds.images[j].flatten()[1024 * (y % 3)]) for j, y in enumerate([5, 6, 7, 8])] == [55, 65, 75, 85]

    marker = tmp_path / "pwned"
    for payload in (
        {"data": _RunsCode(marker), "labels": [0]},  # a dict whose value runs code when built
        _RunsCode(marker),  # the whole file
    ):
        (folder / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
        with pytest.raises(CIFARFileError, match="test_batch") as info:
            CIFAR10(tmp_path, split="test", check_md5=False)
        assert "exec" in str(info.value) and not marker.exists()  # named (__builtin__.exec), never called


@pytest.mark.parametrize("damage, words", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "damaged"),
    (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]})), "uint8"),
    (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]})), "labels"),
    (lambda p: p.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]})), "labels"),
], ids=["truncated", "float-data", "label-10", "too-few-labels"])
def test_cifar_damaged_batches_name_the_file(damage: Callable[[Path], None], words: str, tmp_path: Path) -> None:
    from gen.data import CIFAR10
    from gen.data.cifar import CIFARFileError

    folder = _cifar_folder(tmp_path)
    damage(folder / "test_batch")
    with pytest.raises(CIFARFileError, match=words) as info:
        CIFAR10(tmp_path, split="test", check_md5=False)
    assert str(folder / "test_batch") in str(info.value)


# ----------------------------------------------------------------------------------------------
# The real entry point, as a user runs it: no traceback on stderr.


def test_python_m_eval_prints_one_line_without_traceback(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "pngs", n=3)
    _truncated_png(folder)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    got = subprocess.run([sys.executable, "-m", "eval", "folder", str(folder), "--ref", str(write_ref(tmp_path / "r.npz"))],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr
    assert f"unreadable image: {folder / 'zz_cut.png'}" in got.stderr
    assert got.stderr.strip().splitlines()[-1].startswith("python -m eval: error: 1 of 4 image files")


# ----------------------------------------------------------------------------------------------
# train.py and sample.py, run in-process through the same code as the commands (composed Hydra config ->
# main_checked -> one error line and an exit status). A tiny DiT on sklearn's 8x8 digits trains 2 steps in
# about a second, so every case runs the real entry point.

TRAIN_TINY = [
    "data=digits", "model.depth=2", "model.hidden_size=64", "model.num_heads=2", "model.patch_size=2",
    "trainer.batch_size=32", "trainer.total_kimg=0.064", "trainer.lr_warmup_kimg=0", "trainer.status_kimg=0.032",
    "trainer.checkpoint_kimg=0.032", "trainer.snapshot_kimg=0.064", "trainer.progress=false",
    "trainer.tensorboard=false", "preview.images=0", "eval=none", "sampler.steps=4",
]


def _compose(config: str, overrides: list[str]) -> object:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name=config, overrides=overrides)


def train_cli(tmp: Path, overrides: list[str], capsys: pytest.CaptureFixture[str] | None = None,
              name: str = "r") -> tuple[int, str, str]:
    """``python train.py paths.runs=tmp/runs name=... <tiny> <overrides>``, in-process."""
    import train

    cfg = _compose("train", [f"paths.runs={tmp / 'runs'}", f"paths.cache={tmp / 'cache'}", f"name={name}",
                             *TRAIN_TINY, *overrides])
    code = train.main_checked(cfg)
    if capsys is None:
        return code, "", ""
    out = capsys.readouterr()
    return code, out.out, out.err


def sample_cli(overrides: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``python sample.py <overrides>``, in-process."""
    import sample

    code = sample.main_checked(_compose("sample", ["sampler.steps=4", *overrides]))
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused_by(code: int, err: str, status: int, *names: str) -> str:
    """Like ``assert_refused`` for another exit status (3: non-finite values)."""
    assert "Traceback" not in err, err
    assert code == status, (code, err)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained snapshot (digits, 2 steps)."""
    tmp = tmp_path_factory.mktemp("snap")
    code, _, _ = train_cli(tmp, [])
    assert code == 0
    return sorted((tmp / "runs" / "r").glob("snapshot-*.safetensors"))[-1]


class NullLabelData(torch.utils.data.Dataset):
    """Digits whose metadata gives some images label ``num_classes``, the backbones' null class (no ``tensors()``,
    so the loop reads it through a DataLoader, as it reads image folders and latent shards)."""

    channels, resolution, num_classes = 1, 8, 10

    def __init__(self) -> None:
        from gen.data.builtin import Digits

        self.images, labels = Digits(resolution=8).tensors()
        self.labels = labels.clone()
        self.labels[::7] = self.num_classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, object]:
        return {"image": self.images[i], "label": int(self.labels[i])}


class PoisonSGD(torch.optim.SGD):
    """SGD whose steps leave NaN in the first parameter: weights that stop being finite at the last step."""

    def step(self, closure: object = None) -> None:  # type: ignore[override]
        super().step()
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("nan"))


def _file(tmp: Path) -> Path:
    (tmp / "a-file").write_text("x")
    return tmp / "a-file"


# (id, overrides (may use {tmp}), words of the error line). Every case is refused before the first step.
# REPA on the tiny run, with the yardstick's foundation encoder at random weights (no file needed).
ALIGN_TINY = ["align=repa", "objective.align.encoder.name=foundation-mnist5k", "+objective.align.encoder.random_init=true"]
TRAIN_CASES: list[tuple[str, list[str], tuple[str, ...]]] = [
    ("grad-clip-zero", ["trainer.grad_clip=0"], ("trainer.grad_clip",)),
    ("grad-clip-negative", ["trainer.grad_clip=-1"], ("trainer.grad_clip",)),
    ("batch-per-gpu-zero", ["trainer.batch_per_gpu=0"], ("trainer.batch_per_gpu",)),
    ("total-kimg-inf", ["trainer.total_kimg=inf"], ("trainer.total_kimg",)),
    ("precision-unknown", ["trainer.precision=fp8"], ("trainer.precision",)),
    ("name-empty", ["name="], ("name=''",)),
    ("name-leaves-runs", ["name=../elsewhere"], ("name='../elsewhere'",)),
    ("seed-not-a-number", ["seed=abc"], ("seed",)),
    ("lr-nan", ["optim.lr=nan"], ("optim.lr", "NaN")),
    ("weight-decay-inf", ["optim.weight_decay=inf"], ("optim.weight_decay",)),
    ("ema-halflife-nan", ["ema.halflife_kimg=[nan]"], ("ema.halflife_kimg", "NaN")),
    ("preview-nrow-zero", ["preview.images=4", "preview.nrow=0"], ("preview.nrow",)),
    ("preview-images-negative", ["preview.images=-1"], ("preview.images",)),
    ("preview-interval-negative", ["preview.images=4", "preview.interval_kimg=-2"], ("preview.interval_kimg",)),
    ("sampler-scale-nan", ["sampler.guidance.scale=nan"], ("sampler.guidance.scale",)),
    ("sampler-unknown-key", ["+sampler.stepz=4"], ("'sampler.stepz'", "did you mean 'sampler.steps'")),
    ("top-level-unknown-key", ["+seeed=3"], ("'seeed'", "did you mean 'seed'")),
    ("seed-text", ["seed=abc"], ("'seed'", "an integer")),
    ("packages-not-names", ["packages=[1]"], ("packages=[1]", "list of package names")),
    ("sampler-interval-reversed", ["sampler.guidance.interval=[0.9,0.1]"], ("sampler.guidance.interval",)),
    ("sampler-churn-negative", ["sampler=heun_edm_in64", "sampler.steps=4", "sampler.solver.s_churn=-1"], ("s_churn",)),
    ("sampler-grid-negative-t-max", ["+sampler.grid.t_max=-1.0"], ("sampler.grid", "t_max")),
    ("sampler-sharing-no-file", ["sampler.sharing={{schedule: {tmp}/none.json}}"], ("sampler.sharing", "none.json")),
    ("eval-fid-without-weights", ["eval=fid5k"], ("eval", "weights-inception-2015-12-05-6726825d.pth")),
    ("eval-singular-fid", ["eval=yardstick_quick", "eval.dataset_name=mnist5k", "eval.num_images=100"],
     ("eval.num_images=100", "128")),
    ("eval-yardstick-other-data", ["eval=yardstick_quick"], ("eval.dataset_name='digits'",)),
    ("eval-batch-size-zero", ["eval=yardstick_quick", "eval.dataset_name=mnist5k", "eval.batch_size=0"],
     ("eval.batch_size",)),
    ("eval-interval-negative", ["eval=yardstick_quick", "eval.dataset_name=mnist5k", "eval.interval_kimg=-1"],
     ("eval.interval_kimg",)),
    ("eval-unknown-key", ["eval=yardstick_quick", "+eval.num_image=300"], ("eval.num_image",)),
    ("eval-enabled-not-bool", ["eval.enabled=maybe"], ("eval.enabled",)),
    ("eval-recon-during-training", ["eval=recon"], ("eval.metric",)),
    ("run-dir-under-a-file", ["paths.runs={file}/runs"], ("run_dir", "a-file", "not a folder")),
    *[(f"align-{key}-{value}", [*ALIGN_TINY, f"objective.align.{key}={value}"], (f"align.{key}={shown}", "integer >= 1"))
      for key, value, shown in (("depth", "2.5", "2.5"), ("depth", "0", "0"), ("depth", "true", "True"),
                                ("projector_dim", "64.5", "64.5"))],
    ("null-class-labels", ["data.dataset._target_=tests.test_bad_inputs.NullLabelData", "~data.dataset.split",
                           "~data.dataset.resolution", "~data.dataset.mode", "~data.dataset.heldout", "packages=[tests]"],
     ("label 10", "null class", "data.num_classes")),
]
if not torch.cuda.is_available():
    TRAIN_CASES.append(("device-cuda-missing", ["trainer.device=cuda"], ("trainer.device=cuda", "CUDA")))


@pytest.mark.parametrize("overrides, words", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_bad_settings_before_the_first_step(overrides: list[str], words: tuple[str, ...], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    fill = {"tmp": str(tmp_path), "file": str(_file(tmp_path))}
    code, out, err = train_cli(tmp_path, [o.format(**fill) for o in overrides], capsys)
    line = assert_refused_by(code, err, 2, *words)
    assert line.startswith("train.py: error: ")
    runs = tmp_path / "runs"
    assert not list(runs.rglob("state-*.pt")) and not list(runs.rglob("results.json")), "trained before refusing"
    assert "kimg" not in out
    # No run folder is left: the settings train.py checks are refused before it is made; the ones the training loop
    # checks, after config.yaml and the lock are written, and the folder this command made goes again.
    assert not (runs / "r").exists(), sorted(p.name for p in (runs / "r").iterdir())


def test_a_refusal_never_removes_a_run_folder_that_was_there_before(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("an earlier run's\n")
    null_labels = next(c for c in TRAIN_CASES if c[0] == "null-class-labels")
    code, _, err = train_cli(tmp_path, null_labels[1], capsys)  # refused by the training loop, after config.yaml
    assert_refused_by(code, err, 2, *null_labels[2])
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml"]


def test_run_that_ends_with_non_finite_weights_writes_no_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = train_cli(tmp_path, ["optim=sgd", "optim._target_=tests.test_bad_inputs.PoisonSGD", "packages=[tests]",
                                        "trainer.total_kimg=0.032"], capsys)
    assert_refused_by(code, err, 3, "non-finite", "module.net[", "no result")
    run = tmp_path / "runs" / "r"
    assert not (run / "results.json").exists() and not list(run.glob("state-*")) and not list(run.glob("snapshot-*"))


def _poison_state(path: Path, item: str) -> None:
    from gen.utils.ckpt import load_training_state, save_training_state

    state = load_training_state(path)
    for v in state["registry"][item]["state"][0].values():
        if torch.is_tensor(v) and v.is_floating_point() and v.ndim:
            v.view(-1)[0] = float("inf")
    save_training_state(path, state)


def test_resume_refuses_a_non_finite_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli(tmp_path, ["trainer.total_kimg=0.032"])[0] == 0
    state = tmp_path / "runs" / "r" / "state-000000032.pt"
    _poison_state(state, "optim.main")  # the weights are finite, an Adam moment is not: the next update would be
    code, _, err = train_cli(tmp_path, [], capsys)
    assert_refused_by(code, err, 3, str(state), "optim.main[state]", "cannot resume")
    assert not (tmp_path / "runs" / "r" / "state-000000064.pt").exists()


def test_damaged_training_state_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli(tmp_path, ["trainer.total_kimg=0.032"])[0] == 0
    state = tmp_path / "runs" / "r" / "state-000000032.pt"
    state.write_bytes(state.read_bytes()[:1000])  # cut, as by a disk error or a partial copy
    code, _, err = train_cli(tmp_path, [], capsys)
    assert_refused_by(code, err, 2, str(state), "cannot be read", "Delete it")


def test_damaged_newest_state_falls_back_to_the_newest_good_one(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from gen.utils.ckpt import load_training_state

    assert train_cli(tmp_path, [])[0] == 0  # states at 32 and 64 images
    run = tmp_path / "runs" / "r"
    newest = run / "state-000000064.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # cut, as by a disk error
    code, out, err = train_cli(tmp_path, ["trainer.total_kimg=0.096"], capsys)
    assert code == 0, err
    warning = next(line for line in out.splitlines() if line.startswith("warning:"))
    assert str(newest) in warning and "cannot be read" in warning and "state-000000032.pt" in warning
    assert f"Resuming from {run / 'state-000000032.pt'}" in out
    assert load_training_state(newest)["registry"]["counters"] == {"nimg": 64, "step": 2}  # written again, whole
    assert load_training_state(run / "state-000000096.pt")["registry"]["counters"]["nimg"] == 96


def test_diverged_run_is_stopped_by_magnitude_and_writes_nothing(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # lr=1e30 leaves the weights finite (around 1e30): only a magnitude bound tells the run has diverged.
    code, _, err = train_cli(tmp_path, ["optim.lr=1e30"], capsys)
    assert_refused_by(code, err, 3, "diverged past trainer.max_weight_rms=1000.0", "module.net (RMS", "no result")
    run = tmp_path / "runs" / "r"
    assert not (run / "results.json").exists() and not list(run.glob("state-*")) and not list(run.glob("snapshot-*"))
    code, _, err = train_cli(tmp_path, ["trainer.max_weight_rms=0"], capsys)
    assert_refused_by(code, err, 2, "trainer.max_weight_rms=0", "positive number")


def test_resuming_with_another_precision_names_the_precision(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli(tmp_path, ["trainer.precision=fp16", "trainer.total_kimg=0.032"])[0] == 0
    code, _, err = train_cli(tmp_path, ["trainer.precision=bf16"], capsys)
    line = assert_refused_by(code, err, 2, "state-000000032.pt", "precision fp16", "trainer.precision")
    assert "another method" not in line


def test_second_writer_of_a_run_folder_is_refused_and_a_killed_one_blocks_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gen.utils.runlock import RunFolderBusy, RunFolderLock

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    held = RunFolderLock(run, "another train.py")
    try:
        code, _, err = train_cli(tmp_path, [], capsys)
        assert_refused_by(code, err, 2, str(run), "another train.py, pid", "name=")
        assert not list(run.glob("state-*")) and not (run / "stats.jsonl").exists()
    finally:
        held.release()
    assert train_cli(tmp_path, ["trainer.total_kimg=0.032"])[0] == 0  # released: the folder is free again
    # A holder killed with SIGKILL leaves the file but not the lock.
    code = f"from gen.utils.runlock import RunFolderLock; lock = RunFolderLock({str(run)!r}, 'child'); print('held', flush=True); import time; time.sleep(120)"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=f"child, pid {child.pid}"):
            RunFolderLock(run)
    finally:
        child.kill()
        child.wait()
    RunFolderLock(run).release()


def test_an_image_that_fails_to_read_mid_training_is_named_as_a_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import gen.data.folder

    root = _folder(tmp_path / "imgs")
    bad = root / "c1" / "3.png"
    real = gen.data.folder.load_image

    def flaky(path: str | os.PathLike) -> object:  # a disk error after the folder was scanned and verified
        if Path(path) == bad:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(gen.data.folder, "load_image", flaky)
    code, _, err = train_cli(tmp_path, ["data=imagefolder", f"data.dataset.root={root}", "data.resolution=8",
                                        "data.num_classes=2", "trainer.batch_size=16", "trainer.total_kimg=0.032"],
                             capsys)
    line = assert_refused_by(code, err, 2, f"cannot read {bad}", "Input/output error")
    assert "write" not in line.split("resumes")[0]


def _enospc_torch_save(obj: object, f: object, *args: object, **kwargs: object) -> None:
    f.write(b"partial")  # type: ignore[attr-defined]
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_during_training_is_one_line_and_leaves_no_partial_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch, "save", _enospc_torch_save)
    code, _, err = train_cli(tmp_path, [], capsys)
    line = assert_refused_by(code, err, 2, str(tmp_path / "runs" / "r" / "state-000000032.pt"), "disk is full")
    assert "resumes" in line
    run = tmp_path / "runs" / "r"
    assert not list(run.glob(".tmp-*")) and not list(run.glob("state-*")) and not (run / "results.json").exists()


def test_full_disk_writing_the_training_log_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import gen.utils.log

    class FullDisk(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gen.utils.log, "open", lambda *a, **k: FullDisk(), raising=False)
    code, _, err = train_cli(tmp_path, [], capsys)
    assert_refused_by(code, err, 2, str(tmp_path / "runs" / "r" / "stats.jsonl"), "disk is full")
    assert not (tmp_path / "runs" / "r" / "results.json").exists()


def test_fp16_on_cpu_is_honoured_and_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gen.train.loop import autocast_context
    from gen.utils.ckpt import load_training_state

    with autocast_context("fp16", torch.device("cpu"))():
        assert torch.nn.Linear(4, 4)(torch.ones(2, 4)).dtype == torch.float16
    nets = {}
    for precision in ("no", "fp16"):
        code, out, _ = train_cli(tmp_path, [f"trainer.precision={precision}", "trainer.total_kimg=0.032"], capsys,
                                 name=precision)
        assert code == 0
        nets[precision] = load_training_state(tmp_path / "runs" / precision / "state-000000032.pt")["registry"]
    assert "precision: fp16 (autocast to float16 on cpu with a gradient scaler" in out
    a, b = nets["no"]["module.net"], nets["fp16"]["module.net"]
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert 0 < diff < 1e-2  # the fp16 forward changed the update (it did not silently train in fp32), a little
    assert "scaler.main" in nets["fp16"]


def _folder(root: Path, extra: int = 0) -> Path:
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for j in range(8 + (extra if c == 0 else 0)):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{j}.png")
    return root


def test_moved_dataset_resumes_by_content(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def data(root: Path) -> list[str]:
        return ["data=imagefolder", f"data.dataset.root={root}", "data.resolution=8", "data.num_classes=2",
                "data.hflip=false", "trainer.batch_size=8", "trainer.checkpoint_kimg=0.008", "trainer.status_kimg=0.008"]

    first = _folder(tmp_path / "a")
    assert train_cli(tmp_path, [*data(first), "trainer.total_kimg=0.008"])[0] == 0
    moved = tmp_path / "b"
    first.rename(moved)  # the same images at another path
    code, out, err = train_cli(tmp_path, [*data(moved), "trainer.total_kimg=0.016"], capsys)
    assert code == 0, err
    assert "Resuming with the same data (16 items" in out and str(moved) in out
    other = _folder(tmp_path / "c", extra=1)  # different content
    code, _, err = train_cli(tmp_path, [*data(other), "trainer.total_kimg=0.024"], capsys)
    assert_refused_by(code, err, 2, "data.dataset.root", "trainer.resume_ignore=[data]")
    code, out, _ = train_cli(tmp_path, [*data(other), "trainer.total_kimg=0.024", "trainer.resume_ignore=[data]"], capsys)
    assert code == 0 and "Resuming although 'data' changed" in out


def test_evaluation_at_the_end_reports_progress(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import eval.generate as evgen
    import train
    from gen.train.loop import HookContext

    monkeypatch.setenv("GEN_STATUS_INTERVAL", "0")
    monkeypatch.setattr(train.EvalHook, "_load_yardstick", lambda self: setattr(self, "ext", TinyFeatures()))

    def metrics(generate_fn: Callable, num_images: int, dataset: str, cache: str, batch: int, offset: int) -> dict:
        for b in evgen.fixed_batches(range(offset, offset + num_images), batch, 0, 1):
            generate_fn(b)
        return {"fid": 1.0, "class_accuracy": 0.5}

    monkeypatch.setattr(evgen, "yardstick_metrics", metrics)

    class Gen:
        def generate(self, seeds: list[int], sampler: object, device: object) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.zeros(len(seeds), 1, 8, 8, dtype=torch.uint8), torch.zeros(len(seeds), dtype=torch.long)

    hook = train.EvalHook(lambda net: Gen(), None, {"enabled": True, "metric": "yardstick", "num_images": 300,
                                                     "dataset_name": "mnist5k", "batch_size": 100}, torch.device("cpu"))
    ctx = HookContext(300, 1, None, {}, Path("."), torch.device("cpu"), True)  # type: ignore[arg-type]
    monkeypatch.setattr(HookContext, "ema_net", property(lambda self: None))
    assert hook(ctx) == {"yardstick_fid": 1.0, "class_accuracy": 0.5}
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluation (yardstick, 300")]
    assert len(lines) >= 4 and "300/300 img (100%)" in lines[-1]


# ---- sample.py ----------------------------------------------------------------------------------


def _edited_snapshot(src: Path, dst: Path, weights: Callable[[dict], None] | None = None,
                     meta: Callable[[dict], None] | None = None) -> Path:
    from gen.utils.ckpt import load_snapshot, save_snapshot

    tensors, config = load_snapshot(src)
    if weights is not None:
        weights(tensors)
    if meta is not None:
        meta(config)
    return save_snapshot(dst, tensors, config)


def _nan_weight(t: dict) -> None:
    t["final_layer.linear.weight"][0, 0] = float("nan")


def _huge_weights(t: dict) -> None:
    for k, v in t.items():
        if v.is_floating_point():
            t[k] = torch.full_like(v, 1e30)  # finite, but every product overflows


def _set(section: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda c: c[section].__setitem__(key, value)


def _tokenizer(settings: dict) -> Callable[[dict], None]:
    """Replace the snapshot's tokenizer by a small KL autoencoder with ``settings``."""
    kl = {"_target_": "tokenizers.kl.AutoencoderKLTokenizer", "block_out_channels": [32], "layers_per_block": 1,
          "latent_channels": 1, "image_channels": 1, "weights": None, "seed": 0}
    return lambda c: c.__setitem__("tokenizer", {**kl, **settings})


# (id, overrides (with {snap}, {tmp}, {file}), exit status, words of the error line, how the snapshot is edited)
SAMPLE_CASES: list[tuple[str, list[str], int, tuple[str, ...], dict[str, Callable] | None]] = [
    ("snapshot-missing", ["~snapshot"], 2, ("snapshot", "is not set"), None),
    ("snapshot-does-not-exist", ["snapshot={tmp}/none.safetensors"], 2, ("none.safetensors", "does not exist"), None),
    ("snapshot-garbage", ["snapshot={file}"], 2, ("a-file", "not a readable safetensors snapshot"), None),
    ("seeds-not-numbers", ["seeds=a-b"], 2, ("seeds='a-b'",), None),
    ("seeds-negative", ["seeds=-5"], 2, ("seeds", ">= 0"), None),
    ("seeds-reversed", ["seeds=5-3"], 2, ("seeds='5-3'", "ends before"), None),
    ("seeds-repeated", ["seeds='0-3,2'"], 2, ("seeds", "seed 2 twice"), None),
    ("batch-size-zero", ["batch_size=0"], 2, ("batch_size=0",), None),
    ("grid-max-zero", ["grid_max=0"], 2, ("grid_max=0",), None),
    ("grid-nrow-zero", ["grid_nrow=0"], 2, ("grid_nrow=0",), None),
    ("images-not-bool", ["images=maybe"], 2, ("images",), None),
    ("nothing-to-write", ["images=false", "npz=false", "grid=false"], 2, ("write nothing",), None),
    ("class-label-null-class", ["class_label=10"], 2, ("class_label=10", "null class"), None),
    ("class-label-text", ["class_label=three"], 2, ("class_label",), None),
    ("device-unknown", ["device=tpu"], 2, ("device='tpu'",), None),
    ("sampler-scale-nan", ["sampler.guidance.scale=nan"], 2, ("sampler.guidance.scale",), None),
    ("sampler-steps-absurd", ["sampler.steps=1000000000"], 2, ("sampler.steps",), None),
    # The sampler section is checked like every section (gen.utils.config.from_mapping): keys, types, ranges.
    ("sampler-unknown-key", ["+sampler.stepz=4"], 2, ("'sampler.stepz'", "did you mean 'sampler.steps'"), None),
    ("sampler-steps-text", ["sampler.steps=many"], 2, ("'sampler.steps'", "an integer"), None),
    ("sampler-guidance-unknown-key", ["+sampler.guidance.scal=2"], 2,
     ("'sampler.guidance.scal'", "did you mean 'sampler.guidance.scale'"), None),
    ("sampler-sharing-rate-zero", ["+sampler.sharing.rate=0"], 2, ("sampler.sharing.rate",), None),
    ("sampler-churn-negative", ["sampler=heun_edm_in64", "sampler.steps=4", "sampler.solver.s_churn=-1"], 2,
     ("s_churn",), None),
    ("outdir-under-a-file", ["outdir={file}/out"], 2, ("outdir", "a-file"), None),
    ("outdir-is-a-file", ["outdir={file}"], 2, ("outdir", "a-file", "not a folder"), None),
    ("sampler-interval-bad-ends", ["sampler.guidance.scale=2", "sampler.guidance.interval=[0,0.7,open]"], 2,
     ("sampler.guidance.interval", "ends one of"), None),
    ("sampler-interval-four-items", ["sampler.guidance.scale=2", "sampler.guidance.interval=[0,0.7,'()',1]"], 2,
     ("sampler.guidance.interval",), None),
    ("snapshot-nan-weights", [], 3, ("non-finite weights", "final_layer.linear.weight"), {"weights": _nan_weight}),
    ("snapshot-overflowing-weights", [], 3, ("non-finite values", "seeds 0, 1, 2, 3"), {"weights": _huge_weights}),
    ("snapshot-null-class-metadata", [], 2, ("num_classes=11", "null class"), {"meta": _set("data", "num_classes", 11)}),
    ("snapshot-huge-model-metadata", [], 2, ("model.hidden_size=10000000", "Refusing"),
     {"meta": _set("model", "hidden_size", 10_000_000)}),
    ("snapshot-resolution-metadata", [], 2, ("data resolution 64",), {"meta": _set("data", "resolution", 64)}),
    ("snapshot-config-not-json", [], 2, ("metadata is not valid JSON",), {"raw": True}),
    # The tokenizer half of a snapshot (issue 17): bounded, built on the meta device, no paths followed, statistics
    # finite and positive.
    ("snapshot-huge-tokenizer-metadata", [], 2, ("tokenizer settings describe at least", "Refusing"),
     {"meta": _tokenizer({"block_out_channels": [1024] * 6, "layers_per_block": 1000})}),
    ("snapshot-tokenizer-weights-path", [], 2, ("/etc/passwd", "not followed", "tokenizer_weights="),
     {"meta": _tokenizer({"weights": "/etc/passwd"})}),
    ("snapshot-tokenizer-not-a-tokenizer", [], 2, ("'gen.models.dit.DiT'", "not a class of the tokenizers package"),
     {"meta": _set("tokenizer", "_target_", "gen.models.dit.DiT")}),
    ("snapshot-tokenizer-std-nan", [], 2, ("tokenizer.std[0]=nan", "finite number > 0"),
     {"meta": _tokenizer({"mean": [0.0], "std": [float("nan")]})}),
    ("snapshot-tokenizer-std-zero", [], 2, ("tokenizer.std[0]=0.0",), {"meta": _tokenizer({"mean": [0.0], "std": [0.0]})}),
    ("snapshot-tokenizer-mean-inf", [], 2, ("tokenizer.mean[0]=inf",),
     {"meta": _tokenizer({"mean": [float("inf")], "std": [1.0]})}),
    ("snapshot-tokenizer-scaling-negative", [], 2, ("tokenizer.scaling_factor=-0.18215",),
     {"meta": _tokenizer({"scaling_factor": -0.18215})}),
    ("snapshot-tokenizer-stats-length", [], 2, ("do not fit its channels", "std: 3", "latent_channels: 1"),
     {"meta": _tokenizer({"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]})}),
    ("tokenizer-weights-missing", ["tokenizer_weights={tmp}/none.safetensors"], 2,
     ("tokenizer_weights=", "none.safetensors", "does not exist"), None),
    # was "unknown argument(s) 'weights' for tokenizers.pixels.PixelTokenizer", which named no setting to drop
    ("tokenizer-weights-for-pixels", ["tokenizer_weights={file}"], 2,
     ("PixelTokenizer has no weights", "a-file", "drop tokenizer_weights"), None),
    # a tokenizer snapshot's weights that are damaged (was a traceback from safetensors)
    ("tokenizer-weights-damaged", ["tokenizer_weights={file}"], 2, ("a-file", "not a readable weights file"),
     {"meta": _tokenizer({})}),
]
if not torch.cuda.is_available():
    SAMPLE_CASES.append(("device-cuda-missing", ["device=cuda"], 2, ("device=cuda", "CUDA"), None))


def _raw_metadata(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(src)), str(dst), metadata={"config": "{not json", "format": "gen-snapshot-v1"})
    return dst


@pytest.mark.parametrize("overrides, status, words, edit", [c[1:] for c in SAMPLE_CASES], ids=[c[0] for c in SAMPLE_CASES])
def test_sample_refuses_bad_settings_and_files(overrides: list[str], status: int, words: tuple[str, ...],
                                               edit: dict | None, snapshot: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    snap = snapshot
    if edit is not None:
        dst = tmp_path / "edited.safetensors"
        snap = _raw_metadata(snapshot, dst) if edit.get("raw") else _edited_snapshot(snapshot, dst, **edit)
    fill = {"tmp": str(tmp_path), "file": str(_file(tmp_path))}
    given = [o.format(**fill) for o in overrides]
    if "~snapshot" in given:  # the argument is missing altogether
        given.remove("~snapshot")
    elif not any(o.startswith("snapshot=") for o in given):
        given.insert(0, f"snapshot={snap}")
    code, out, err = sample_cli([f"outdir={tmp_path / 'out'}", "seeds=0-3", *given], capsys)
    line = assert_refused_by(code, err, status, *words)
    assert line.startswith("sample.py: error: ")
    out_dir = tmp_path / "out"
    assert not list(out_dir.rglob("*.png")) and not (out_dir / "samples.npz").exists(), "wrote images before refusing"


# ---- sample.py output folders: one sample set per folder, never mixed, resumed after a kill ------------------


def _npz(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "samples.npz") as f:
        return {k: f[k] for k in f.files}


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "images").glob("*.png"))


def test_another_sample_set_is_refused_never_mixed(snapshot: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=0-3"], capsys)[0] == 0
    png(out / "images" / "notes.png")  # a file sample.py did not write
    first = _pngs(out)
    code, _, err = sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=0-3", "class_label=3"], capsys)
    assert_refused(code, err, str(out), "class_label", "overwrite=true")
    assert _pngs(out) == first  # nothing replaced, nothing added
    code, _, err = sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=0-3", "class_label=3", "overwrite=true"],
                              capsys)
    assert code == 0, err
    got = _npz(out)
    assert got["arr_1"].tolist() == [3, 3, 3, 3] and got["seeds"].tolist() == [0, 1, 2, 3]
    assert _pngs(out) == ["000000-class3.png", "000001-class3.png", "000002-class3.png", "000003-class3.png",
                          "notes.png"]  # the foreign PNG is neither read (no crash) nor deleted
    assert json.loads((out / "sample.json").read_text())["class_label"] == 3


def test_same_set_is_extended_and_npz_holds_this_runs_seeds(snapshot: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=0-3"], capsys)[0] == 0
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    code, stdout, _ = sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=2-5"], capsys)
    assert code == 0 and "2 of 4 images are already in" in stdout
    assert _npz(out)["seeds"].tolist() == [2, 3, 4, 5] and len(_pngs(out)) == 6
    assert all((out / "images" / n).stat().st_mtime_ns == t for n, t in kept.items())  # reused, not rewritten
    assert sample_cli([f"snapshot={snapshot}", f"outdir={ref}", "seeds=2-5"], capsys)[0] == 0
    assert np.array_equal(_npz(out)["arr_0"], _npz(ref)["arr_0"])  # the same images as one fresh run


def test_images_false_deletes_only_this_runs_pngs(snapshot: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=0-3"], capsys)[0] == 0
    before = _pngs(out)
    code, _, err = sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=2-5", "images=false"], capsys)
    assert code == 0, err
    assert _pngs(out) == before  # seeds 0-3 of the earlier run stay; 4-5 of this run were never left behind
    assert _npz(out)["seeds"].tolist() == [2, 3, 4, 5]
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images", "sample.json", "samples.npz"]


def test_killed_sampling_resumes_and_its_temp_files_are_removed(snapshot: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import sample

    out, ref = tmp_path / "out", tmp_path / "ref"
    real_save, written = sample.save_png, []

    class Killed(BaseException):
        """Stands in for SIGKILL: no handler of the program runs."""

    def save_then_die(img: torch.Tensor, path: Path) -> Path:
        if len(written) == 3:
            (path.parent / f".tmp-{path.name}.abc").write_bytes(b"half")  # what a kill mid-write leaves
            raise Killed
        written.append(path.name)
        return real_save(img, path)

    monkeypatch.setattr(sample, "save_png", save_then_die)
    with pytest.raises(Killed):
        sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=0-7", "batch_size=2"], capsys)
    monkeypatch.setattr(sample, "save_png", real_save)
    assert len(_pngs(out)) == 3 and list((out / "images").glob(".tmp-*")) and not (out / "samples.npz").exists()
    kept = {n: (out / "images" / n).stat().st_mtime_ns for n in _pngs(out)}
    code, stdout, _ = sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=0-7", "batch_size=2"], capsys)
    assert code == 0 and "3 of 8 images are already in" in stdout
    assert not list(out.rglob(".tmp-*")) and len(_pngs(out)) == 8
    assert all((out / "images" / n).stat().st_mtime_ns == t for n, t in kept.items())
    assert sample_cli([f"snapshot={snapshot}", f"outdir={ref}", "seeds=0-7"], capsys)[0] == 0
    assert np.array_equal(_npz(out)["arr_0"], _npz(ref)["arr_0"]) and json.loads((out / "sample.json").read_text())[
        "complete"]


def test_full_disk_writing_samples_is_one_line(snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(np, "savez", _savez_on_full_disk)
    code, _, err = sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=0-3"], capsys)
    assert_refused(code, err, str(out / "samples.npz"), "disk is full")
    assert not list(out.rglob(".tmp-*")) and not (out / "samples.npz").exists()
    monkeypatch.undo()
    assert sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=0-3"], capsys)[0] == 0  # then it completes


def test_sampling_reports_progress_and_keeps_grey_as_one_channel(snapshot: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GEN_STATUS_INTERVAL", "0")
    out = tmp_path / "out"
    code, _, err = sample_cli([f"snapshot={snapshot}", f"outdir={out}", "seeds=0-5", "batch_size=2"], capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if line.startswith("sampling 6 images from")]
    assert len(lines) >= 4 and "6/6 img (100%)" in lines[-1]
    assert _npz(out)["arr_0"].shape == (6, 8, 8, 1)  # what the yardstick (and eval's Inception) read
    code, _, _ = sample_cli([f"snapshot={snapshot}", f"outdir={tmp_path / 'rgb'}", "seeds=0-5", "npz_rgb=true"], capsys)
    rgb = _npz(tmp_path / "rgb")["arr_0"]
    assert code == 0 and rgb.shape == (6, 8, 8, 3) and np.array_equal(rgb[..., :1], _npz(out)["arr_0"])


def test_entry_points_print_one_line_without_traceback(tmp_path: Path) -> None:
    """The real commands (Hydra wrapper included): a missing argument and a run folder that cannot be created. The
    run folder is refused before any work: the quick start's evaluation network (trained on first use, ~25 s) is not
    built for a run that cannot be written."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "GEN_CACHE": str(cache)}
    blocker = _file(tmp_path)
    for argv, words in (
        (["sample.py"], ("sample.py: error: snapshot is not set",)),
        (["train.py", f"paths.runs={blocker}/runs", "trainer.total_kimg=0.032"], ("train.py: error: run_dir", "a-file")),
    ):
        got = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert got.returncode == 2 and "Traceback" not in got.stderr, got.stderr
        assert all(w in got.stderr.strip().splitlines()[-1] for w in words), got.stderr
        assert "loading the yardstick" not in got.stdout + got.stderr and not cache.exists()


def test_eval_reads_sample_py_rgb_npz_of_grey_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``sample.py npz_rgb=true`` repeats grey to 3 channels; the yardstick network of grey data (1 channel) reads
    that file as the grey one, exactly, and refuses real colour images by name (issue 17)."""
    import types

    from eval.classifier import LeNet
    from eval.features import YardstickFeatures

    torch.manual_seed(0)
    net = LeNet(1, 10).eval()
    stub = types.SimpleNamespace(name="yardstick-mnist5k", net=net, weights_sha256="stub",
                                 features=lambda x: net.features(x.float() / 127.5 - 1))
    monkeypatch.setattr("eval.classifier.load_or_train_classifier", lambda *a, **k: stub)
    ext = YardstickFeatures("mnist5k")
    grey = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    assert torch.equal(ext(grey.expand(-1, 3, -1, -1).contiguous()), ext(grey))
    colour = grey.repeat(1, 3, 1, 1)
    colour[:, 2] = 255 - colour[:, 2]
    with pytest.raises(ValueError, match=r"takes 1-channel images, got shape \(4, 3, 32, 32\) whose channels differ"):
        ext(colour)


def _read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``folder`` behave as on a read-only file system (tests run as root, which ignores permissions)."""
    import tempfile

    real_mkstemp, real_mkdir = tempfile.mkstemp, Path.mkdir

    def mkstemp(*args: object, **kwargs: object) -> tuple[int, str]:
        if str(kwargs.get("dir", "")).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system", str(kwargs["dir"]))
        return real_mkstemp(*args, **kwargs)  # type: ignore[arg-type]

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if str(self).startswith(str(folder)) and self != folder:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    folder.mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(Path, "mkdir", mkdir)


def test_read_only_outputs_are_one_line(snapshot: Path, tmp_path: Path, tiny: None, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """sample.py outdir= and eval --out in a read-only folder: refused before any work, naming it."""
    from eval.__main__ import main

    ro = tmp_path / "ro"
    argv = _samples_argv(tmp_path)
    _read_only(monkeypatch, ro)
    code, _, err = sample_cli([f"snapshot={snapshot}", f"outdir={ro}", "seeds=0-3"], capsys)
    assert_refused(code, err, "outdir", str(ro), "read-only")
    code, _, err = sample_cli([f"snapshot={snapshot}", f"outdir={ro / 'sub'}", "seeds=0-3"], capsys)
    assert_refused(code, err, "outdir", str(ro / "sub"), "read-only")
    code, out, err = run_cli(main, [*argv, "--out", str(ro / "m.json")], capsys)
    assert_refused(code, err, "--out", str(ro), "read-only")
    assert not any(ro.iterdir())


# ----------------------------------------------------------------------------------------------
# Snapshots of the wrong kind and paths of the wrong type, across the commands that read one (the shared loaders
# gen.utils.ckpt.load_snapshot and gen.snapshot.read_snapshot): each names the file, what it is and what to give.


def _tokenizer_snapshot(path: Path) -> Path:
    """A file shaped like a tokenizer snapshot of ``train.py method=kl_autoencoder`` (its kind and tokenizer spec)."""
    from gen.utils.ckpt import save_snapshot

    spec = {"_target_": "tokenizers.kl.AutoencoderKLTokenizer", "block_out_channels": [32], "layers_per_block": 1,
            "latent_channels": 1, "image_channels": 1, "weights": None, "seed": 0}
    return save_snapshot(path, {"decoder.conv_in.weight": torch.zeros(2, 2)},
                         {"tokenizer": spec, "tokenizer_weights": "snapshot", "kind": "tokenizer"})


def _snapshot_reader(command: str, path: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run ``command`` in-process with ``path`` where it expects a generator snapshot; (exit status, stderr)."""
    if command == "sample.py":
        code, _, err = sample_cli([f"snapshot={path}", f"outdir={tmp / 'out'}", "seeds=0-3"], capsys)
    elif command == "distill.pairs":
        from distill.pairs import main as pairs_main

        code, _, err = run_cli(pairs_main, [f"teacher={path}", f"out={tmp / 'out'}", "num=4", "steps=2"], capsys)
    elif command == "export_diffusers":
        from scripts.export_diffusers import main as export_main

        code, _, err = run_cli(export_main, ["--snapshot", str(path), "--out", str(tmp / "out")], capsys)
    else:  # train.py trainer.init
        code, _, err = train_cli(tmp, [f"trainer.init={{net: {path}}}"], capsys)
    return code, err


SNAPSHOT_READERS = ["sample.py", "distill.pairs", "export_diffusers", "train.py-init"]


@pytest.mark.parametrize("command", SNAPSHOT_READERS)
def test_tokenizer_snapshot_where_a_generator_is_expected_is_named(command: str, snapshot: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    tok = _tokenizer_snapshot(tmp_path / "snapshot-000000032.safetensors")
    code, err = _snapshot_reader(command, tok, tmp_path, capsys)
    line = assert_refused(code, err, str(tok), "is a tokenizer snapshot")
    assert "was it written by train.py" not in line  # it was: the old message sent the user the wrong way
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))


@pytest.mark.parametrize("command", [c for c in SNAPSHOT_READERS if c != "sample.py"])  # sample.py takes run folders
def test_folder_where_a_snapshot_file_is_expected_is_named(command: str, snapshot: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run = snapshot.parent
    code, err = _snapshot_reader(command, run, tmp_path, capsys)
    line = assert_refused(code, err, str(run), "is a folder, not a snapshot file", str(snapshot))
    assert "does not exist" not in line
    if command == "train.py-init":
        assert "trainer.init.net" in line


# ----------------------------------------------------------------------------------------------
# Damaged weights files behind every loader (tokenizer weights, VA-VAE checkpoints, training states, published
# checkpoints): one line naming the file, and never torch's advice to retry with weights_only=False.


def _bad_weights(kind: str, tmp: Path, snapshot: Path) -> Path:
    path = tmp / f"bad-{kind}.safetensors"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(3).bytes(4000))
    elif kind == "text":
        path.write_text("hello, I am a text file renamed")
    elif kind == "truncated":
        path.write_bytes(snapshot.read_bytes()[:3000])
    elif kind == "random-pt":
        path = path.with_suffix(".pt")
        path.write_bytes(np.random.default_rng(4).bytes(4000))
    else:  # a generator's snapshot where the tokenizer's is expected
        path = snapshot
    return path


@pytest.mark.parametrize("kind, words", [
    ("empty", "not a readable weights file"), ("random", "not a readable weights file"),
    ("text", "not a readable weights file"), ("truncated", "not a readable weights file"),
    ("random-pt", "not a PyTorch file of tensors"), ("generator", "is a generator snapshot"),
])
def test_extract_latents_names_a_damaged_tokenizer_weights_file(kind: str, words: str, snapshot: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.extract_latents import main_checked

    bad = _bad_weights(kind, tmp_path, snapshot)
    cfg = _compose("extract", ["data=digits", "data.resolution=32", "tokenizer=yardstick_kl_f4d4",
                               f"tokenizer.weights={bad}", f"out={tmp_path / 'latents'}"])
    code = main_checked(cfg)
    err = capsys.readouterr().err
    line = assert_refused(code, err, str(bad), words)
    assert "weights_only` set to `False" not in line
    assert not (tmp_path / "latents").exists()  # the folder this command made goes again


@pytest.mark.parametrize("kind", ["empty", "random", "truncated", "random-pt", "text"])
def test_vavae_checkpoint_reader_names_a_damaged_file(kind: str, snapshot: Path, tmp_path: Path) -> None:
    from tokenizers.vavae import load_checkpoint_state

    bad = _bad_weights(kind, tmp_path, snapshot)
    if kind == "text":
        bad = bad.rename(bad.with_suffix(".pt"))  # the legacy unpickler's KeyError path
    with pytest.raises(ValueError, match="cannot be read") as info:
        load_checkpoint_state(bad)
    assert str(bad) in str(info.value) and "weights_only` set to `False" not in str(info.value)


def test_random_bytes_never_bring_torchs_weights_only_advice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """torch's message for foreign bytes opens with 'Re-running torch.load with weights_only set to False will likely
    succeed': running the file's code. The training-state reader and scripts.convert give the cause instead."""
    from gen.utils.ckpt import CheckpointError, load_training_state
    from scripts.convert import main as convert_main

    junk = tmp_path / "state-000000064.pt"
    junk.write_bytes(np.random.default_rng(5).bytes(4000))
    with pytest.raises(CheckpointError) as info:
        load_training_state(junk)
    assert "not a PyTorch file of tensors" in str(info.value) and "weights_only" not in str(info.value)
    code, _, err = run_cli(convert_main, ["--from", "dit", "--ckpt", str(junk), "--out", str(tmp_path / "o.safetensors")],
                           capsys)
    line = assert_refused(code, err, str(junk), "not a PyTorch file of tensors")
    assert "weights_only" not in line and not (tmp_path / "o.safetensors").exists()


def test_posthoc_ema_refuses_a_foreign_file_among_the_runs_snapshots(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A file named like one of the run's power-function EMA snapshots but holding something else (here a tokenizer
    snapshot) was skipped, and the profiles silently fitted to fewer snapshots than the run stored."""
    from scripts.posthoc_ema import main as posthoc_main

    assert train_cli(tmp_path, ["ema=phema", "trainer.snapshot_kimg=0.032"])[0] == 0
    run = tmp_path / "runs" / "r"
    foreign = _tokenizer_snapshot(run / "snapshot-000000032.safetensors")
    out = tmp_path / "posthoc"
    code, _, err = run_cli(posthoc_main, [str(run), "--sigma-rel", "0.08", "--out-dir", str(out)], capsys)
    assert_refused(code, err, str(foreign), "is not one (a tokenizer snapshot)", "Move it out")
    assert not list(out.glob("*.safetensors"))


# (flags, the words of argparse's line). Each was accepted by argparse and then refused under an internal name
# (sampler.steps, samplers.sample_bogus, 'cannot convert float NaN to integer', 'expected non-negative integer'), or,
# for a huge image count, ran until memory ran out.
AVERAGING_FLAG_CASES = [
    (["--steps", "0"], ("argument --steps", "got 0")),
    (["--kind", "bogus"], ("argument --kind", "'bogus'", "euler")),
    (["--cfg", "nan"], ("argument --cfg", "finite")),
    (["--batch-size", "0"], ("argument --batch-size", "at least 1")),
    (["--at-kimg", "nan"], ("argument --at-kimg", "finite")),
    (["--seed", "-1"], ("argument --seed", "at least 0")),
    (["--fitness-images", "1000000000000"], ("argument --fitness-images", "100,000,000")),
    (["--mutation-std", "inf"], ("argument --mutation-std", "finite")),
]


@pytest.mark.parametrize("flags, words", AVERAGING_FLAG_CASES, ids=[c[0][0] for c in AVERAGING_FLAG_CASES])
def test_averaging_commands_name_a_bad_flag(flags: list[str], words: tuple[str, ...], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.lcsc import main as lcsc_main
    from scripts.posthoc_ema import main as posthoc_main

    code, _, err = run_cli(lcsc_main, [str(tmp_path), "--last", "2", *flags], capsys)
    assert_refused(code, err, *words)
    if flags[0] in ("--steps", "--kind", "--cfg", "--batch-size"):  # the scoring flags both commands share
        code, _, err = run_cli(posthoc_main, [str(tmp_path), "--sigma-rel", "0.05", "--score", "10", *flags], capsys)
        assert_refused(code, err, *words)
    assert list(tmp_path.iterdir()) == []


def test_damaged_pair_shard_is_named_and_drawn_again(snapshot: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A cut pair shard: training on the folder was a safetensors traceback, and re-running the drawing command kept
    the shard (its name was there) and marked the folder complete."""
    from distill.pairs import PairShards
    from distill.pairs import main as pairs_main

    out, ref = tmp_path / "pairs", tmp_path / "ref"
    args = [f"teacher={snapshot}", "num=8", "shard_size=4", "steps=2"]
    assert run_cli(pairs_main, [*args, f"out={out}"], capsys)[0] == 0
    assert run_cli(pairs_main, [*args, f"out={ref}"], capsys)[0] == 0
    shard = out / "pairs-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(ValueError, match="pair shard .* cannot be read .* re-run the python -m distill.pairs") as info:
        PairShards(str(out))
    assert str(shard) in str(info.value)
    code, _, err = run_cli(pairs_main, [*args, f"out={out}"], capsys)
    assert code == 0 and f"{shard} is damaged" in err, err
    assert shard.read_bytes() == (ref / shard.name).read_bytes()  # drawn again, the same bytes as a clean run
    assert len(PairShards(str(out))) == 8


@pytest.mark.parametrize("make, words", [
    (lambda tmp, snap: tmp / "none.safetensors", ("none.safetensors", "does not exist")),
    (lambda tmp, snap: _bad_weights("truncated", tmp, snap), ("bad-truncated.safetensors", "not a readable safetensors")),
    (lambda tmp, snap: _bad_weights("empty", tmp, snap), ("bad-empty.safetensors", "not a readable safetensors")),
    (lambda tmp, snap: snap.parent, ("is a folder, not a snapshot file", "snapshot-")),
], ids=["missing", "truncated", "empty", "folder"])
def test_eval_recon_names_a_bad_tokenizer_snapshot(make: Callable[[Path, Path], Path], words: tuple[str, ...],
                                                   snapshot: Path, tmp_path: Path, tiny: None,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m eval recon --tokenizer``: a cut snapshot was a safetensors traceback; a folder 'did not exist'."""
    from eval.__main__ import main

    bad = make(tmp_path, snapshot)
    argv = ["recon", "--tokenizer", str(bad), "--npz", str(write_samples(tmp_path / "s.npz")), "--extractor", "tiny",
            "--no-lpips"]
    code, out, err = run_cli(main, argv, capsys)
    assert_refused(code, err, *words)
    assert out == ""


def test_hydra_refusals_of_the_command_line_exit_with_the_usage_status(tmp_path: Path) -> None:
    """Hydra's refusals of a command line (an unknown key without '+', an unknown preset, bad override syntax) end as
    every bad input does: one ``prog: error:`` line naming the key and the fix, exit status 2 (was Hydra's status 1,
    a failed run, and its advice "use +seedz=0-3", which the command then refuses as an unknown key too)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "GEN_DEBUG")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cases = ((["sample.py", "snapshot=x", "seedz=0-3"], "sample.py: error: unknown config key 'seedz' (did you mean "
              "'seeds'?). Known keys: batch_size, "),
             (["sample.py", "snapshot=x", "sampler.stepz=3"], "sample.py: error: unknown config key 'sampler.stepz' "
              "(did you mean 'sampler.steps'?). Known keys of 'sampler': "),
             (["sample.py", "snapshot=x", "trainer.total_kimg=3"], "sample.py: error: unknown config key "
              "'trainer.total_kimg': the config has no 'trainer'"),
             (["train.py", "sampler=no_such_preset"], "train.py: error: unknown preset sampler=no_such_preset. Known "
              "presets of 'sampler': consistency, "),
             (["train.py", "experiment=yardstick_dt"], "(did you mean experiment=yardstick_dit?)"),
             (["sample.py", "seeds=[1"], "sample.py: error: no viable alternative at input '[1'"))
    import sample
    import train
    from gen.utils.cli import run_hydra_entry

    for i, (argv, words) in enumerate(cases):
        if i in (0, 3):  # the real commands, in their own process
            got = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], capture_output=True, text=True,
                                 env=env, cwd=tmp_path, timeout=300)
            code, err = got.returncode, got.stderr
        else:  # the same entry (Hydra's wrapper included) in this process: a subprocess costs ~5 s of imports
            old_argv, old_env = sys.argv, {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", "GEN_DEBUG")}
            sys.argv = [argv[0], *argv[1:], f"hydra.run.dir={tmp_path / 'hydra'}"]
            for k in old_env:
                os.environ.pop(k, None)
            buf = io.StringIO()
            try:
                with contextlib.redirect_stderr(buf), pytest.raises(SystemExit) as exc:
                    run_hydra_entry({"sample.py": sample.main, "train.py": train.main}[argv[0]])
            finally:
                sys.argv = old_argv
                os.environ.update({k: v for k, v in old_env.items() if v is not None})
            code, err = exc.value.code, buf.getvalue()
            assert "HYDRA_FULL_ERROR" not in os.environ or old_env["HYDRA_FULL_ERROR"]  # restored
        assert code == 2 and "Traceback" not in err, err
        assert words in err and "+seedz" not in err and "search path" not in err, err
        assert err.startswith(argv[0] + ": error: "), err
    # HYDRA_FULL_ERROR=1, Hydra's own switch, still gives Hydra's exception with its traceback.
    got = subprocess.run([sys.executable, str(ROOT / "sample.py"), "seedz=0-3"], capture_output=True, text=True,
                         env={**env, "HYDRA_FULL_ERROR": "1"}, cwd=tmp_path, timeout=300)
    assert got.returncode == 1 and "ConfigCompositionException" in got.stderr, got.stderr


def test_consistency_steps_without_their_sigmas_name_the_fix() -> None:
    """``sampler=consistency sampler.steps=4`` (train.py method=cd, sample.py): the error said what was missing but
    not which setting gives it."""
    from samplers import consistency_grid

    with pytest.raises(ValueError, match=r"steps=4 needs 3 intermediate sigmas.*sampler.grid.sigmas with 3 descending "
                                         r"values.*consistency_2step"):
        consistency_grid(4, [])


def test_output_that_is_an_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """scripts.lcsc --out <one of the run's snapshots> replaced that source with the combination; scripts.convert
    --out <the --ckpt file> replaced the checkpoint. Both are refused before anything is read."""
    from gen.utils.ckpt import save_snapshot
    from scripts.convert import main as convert_main
    from scripts.lcsc import main as lcsc_main

    run = tmp_path / "run"
    for nimg in (128, 256):
        save_snapshot(run / f"snapshot-{nimg:09d}.safetensors", {"w": torch.ones(2)}, {"model": {}})
    source = run / "snapshot-000000128.safetensors"
    before = source.read_bytes()
    code, _, err = run_cli(lcsc_main, [str(run), "--last", "2", "--out", str(source)], capsys)
    assert_refused(code, err, "--out", str(source), "is the input checkpoint snapshot-000000128.safetensors")
    code, _, err = run_cli(convert_main, ["--from", "dit", "--ckpt", str(source), "--out", str(source)], capsys)
    assert_refused(code, err, "--out", "is the input --ckpt")
    assert source.read_bytes() == before


def test_a_few_step_student_is_refused_as_a_teacher(snapshot: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A TDM student's snapshot holds a velocity model on the linear path, so the prediction-kind check let it teach
    (CD, TDM, SLAM, reflow); its network is trained for its 4-step sampler only. A reflow student may teach (k-reflow)."""
    from distill.teacher import check_teacher

    def student(method: str) -> Callable[[dict], None]:
        return lambda c: c.__setitem__("distill", {"method": method, "teacher": {"path": str(snapshot), "sha256": "0"}})

    tdm = _edited_snapshot(snapshot, tmp_path / "tdm-student.safetensors", meta=student("tdm"))
    code, _, err = train_cli(tmp_path, ["method=cd", "sampler=consistency", "sampler.steps=1", "trainer.grad_clip=null",
                                        f"method.teacher={tdm}"], capsys)
    assert_refused(code, err, str(tdm), "is a tdm student", str(snapshot), "give its teacher")
    # Pairs are reflow's data: refused when drawing starts, not by reflow after the drawing.
    from distill.pairs import main as pairs_main

    code, _, err = run_cli(pairs_main, [f"teacher={tdm}", f"out={tmp_path / 'pairs'}", "num=4", "steps=2"], capsys)
    assert_refused(code, err, str(tdm), "distill.pairs", "is a tdm student", "give its teacher")
    assert not list((tmp_path / "pairs").glob("pairs-*"))
    from gen.utils.ckpt import load_snapshot_config

    config = load_snapshot_config(_edited_snapshot(snapshot, tmp_path / "rf.safetensors", meta=student("reflow")))
    assert check_teacher(config, "rf", data_name=None, resolution=None, channels=None, kinds=["flow"], method="cd") == "flow"


def test_posthoc_ema_never_replaces_another_runs_reconstruction(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Two runs reconstructed into one --out-dir: the second silently replaced the first's posthoc-<nimg>-sigma<w>
    file (the names carry no run). Now refused before anything is written; the same run's is recomputed."""
    from scripts.posthoc_ema import main as posthoc_main

    for name, seed in (("a", 0), ("b", 1)):
        assert train_cli(tmp_path, ["ema=phema", "trainer.snapshot_kimg=0.032", f"seed={seed}"], name=name)[0] == 0
    out = tmp_path / "posthoc"
    argv = ["--sigma-rel", "0.08,0.05", "--out-dir", str(out)]
    assert run_cli(posthoc_main, [str(tmp_path / "runs" / "a"), *argv], capsys)[0] == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(posthoc_main, [str(tmp_path / "runs" / "b"), *argv], capsys)
    assert_refused(code, err, "--out-dir", str(out / "posthoc-000000064-sigma0.08.safetensors"), "of another run")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert run_cli(posthoc_main, [str(tmp_path / "runs" / "a"), *argv], capsys)[0] == 0  # the same run: recomputed
    # Refused after --out-dir was made (no snapshot at that time): the new folder goes again.
    code, _, err = run_cli(posthoc_main, [str(tmp_path / "runs" / "a"), "--sigma-rel", "0.08", "--at-kimg", "5",
                                          "--out-dir", str(tmp_path / "fresh")], capsys)
    assert code == 2 and not (tmp_path / "fresh").exists(), err


def test_a_run_folder_that_cannot_be_made_is_refused_without_touching_the_disk(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """gen.utils.cli.check_dir_can_be_made: the early half of check_writable_dir, which creates nothing."""
    from gen.utils.cli import CommandError, check_dir_can_be_made

    blocker = _file(tmp_path)
    with pytest.raises(CommandError, match="a-file is a file, not a folder; check the path"):
        check_dir_can_be_made(blocker / "runs" / "x", "run_dir")
    with pytest.raises(CommandError, match="run_dir .*a-file is a file, not a folder; give a folder"):
        check_dir_can_be_made(blocker, "run_dir")
    deep = tmp_path / "runs" / "a" / "b"
    check_dir_can_be_made(deep, "run_dir")  # writable: passes, and makes nothing
    assert not (tmp_path / "runs").exists()
    # An unwritable nearest parent (tests run as root, which ignores permissions: os.access answers as for a user).
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path)
    with pytest.raises(CommandError, match="run_dir: cannot write into .*permission denied"):
        check_dir_can_be_made(deep, "run_dir")
