"""Command line: reference statistics, evaluation of sample files, generate-and-evaluate presets.

Run from the repository root (single process, or under ``torchrun --nproc_per_node=N``; the images are
split across processes by index/seed and the statistics reduced, so results do not depend on N):

    # reference statistics of a built-in dataset with its yardstick network
    python -m eval ref --dataset mnist5k --extractor yardstick --out refs/mnist5k_train.npz
    # ... of an ADM-style batch or an image folder with the FID Inception (local weights file), with sFID
    python -m eval ref --npz VIRTUAL_imagenet256_labeled.npz --extractor inception \\
        --weights weights-inception-2015-12-05-6726825d.pth --sfid --out refs/in256.npz
    # evaluate samples (``arr_0`` uint8 NHWC, optional ``arr_1`` labels) or a folder of PNGs
    python -m eval npz samples.npz --ref refs/mnist5k_train.npz --out metrics.json
    python -m eval folder samples/ --ref refs/in256.npz --weights ... --ref-batch VIRTUAL_imagenet256_labeled.npz
    # generate N images from a snapshot (seeds 0..N-1) and evaluate them
    python -m eval fid10k runs/x/snapshot-000100000.safetensors --ref refs/in256.npz \\
        --generator pipeline:snapshot_generate_fn --option steps=50 --option cfg=1.5
    # tokenizer reconstruction: rFID, PSNR, SSIM, LPIPS (a tokenizer preset or a snapshot's tokenizer)
    python -m eval recon --tokenizer configs/tokenizer/sd_vae_ema.yaml --set weights=/models/sd-vae-ft-ema \\
        --folder /data/imagenet/val --resolution 256 --weights weights-inception-2015-12-05-6726825d.pth

The extractor is rebuilt from the reference file's manifest unless ``--extractor`` is given. Metrics are
printed as JSON (rank 0) and written to ``--out``. Progress goes to stderr (rank 0): a bar on a terminal,
else a status line every ``GEN_STATUS_INTERVAL`` seconds (default 30). A bad argument or input file, an
unwritable output or a full disk ends with one ``error:`` line naming the file or argument and exit status 2
(``GEN_DEBUG=1`` adds the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gen.utils.cli import (
    CommandError,
    check_writable_dir,
    check_writable_file,
    printable,
    run_main,
    write_output,
)

PROG = "python -m eval"
DEFAULT_DINOV2 = "vit_large_patch14_dinov2"
PRESETS = {"fid5k": 5000, "fid10k": 10000, "fid50k": 50000}


def _say(message: str) -> None:
    """A phase line on stderr (rank 0), so that a long silent phase is never mistaken for a hang."""
    from gen.utils import dist

    if dist.is_main():
        print(message, file=sys.stderr, flush=True)


def _progress(total: int, desc: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(update, close) of a progress report over this process's ``total`` images."""
    from gen.utils.progress import Progress

    bar = Progress(total, desc)
    return bar.update, bar.close


def _load_folder(folder: Path) -> torch.Tensor:
    """uint8 (N, C, H, W) from the image files directly in a folder (sorted by name; all of one size and mode).

    Every unreadable file is named on stderr before the one-line error; links are followed, each real
    file is read once, and a second link to the same file is refused (it would count an image twice).
    """
    import numpy as np

    from gen.data.folder import CorruptImageError, decode_image, scan_images
    from gen.utils.progress import Progress

    if not folder.exists():
        raise CommandError(f"image folder {printable(folder)} does not exist")
    if not folder.is_dir():
        raise CommandError(f"{printable(folder)} is a file, not a folder of images")
    scan = scan_images(folder, recursive=False)
    scan.raise_problems()
    if not scan.files:
        subdirs = [e for e in folder.iterdir() if e.is_dir() and not e.name.startswith(".")]
        hint = f" (it has {len(subdirs)} sub-folder(s); only the images directly in the folder are read)" if subdirs else ""
        raise CommandError(f"no image files in {printable(folder)}{hint}")
    arrays: list[np.ndarray] = []
    bad: list[CorruptImageError] = []
    with Progress(len(scan.files), f"decode {printable(folder)}", unit="file") as progress:
        for path in scan.files:
            try:
                arrays.append(decode_image(path))
            except CorruptImageError as e:
                bad.append(e)
            progress.advance()
    if bad:
        for e in bad:
            _say(f"unreadable image: {printable(e.path)}: {e.reason}")
        raise CommandError(
            f"{len(bad)} of {len(scan.files)} image files in {printable(folder)} cannot be read (listed above); "
            f"remove or replace them"
        )
    first: dict[tuple[int, ...], tuple[Path, int]] = {}
    for path, arr in zip(scan.files, arrays, strict=True):
        example, count = first.get(arr.shape, (path, 0))
        first[arr.shape] = (example, count + 1)
    if len(first) != 1:
        kinds = "; ".join(
            f"{count} of {h}x{w}x{c} (e.g. {printable(p.name)})" for (h, w, c), (p, count) in sorted(first.items())
        )
        raise CommandError(
            f"images in {printable(folder)} differ in size or channels: {kinds}. All must have one size and "
            f"channel count (grey: 1, colour: 3)"
        )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _load_images(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    from eval.stats import load_image_npz

    if getattr(args, "dataset", None):
        from eval.classifier import load_dataset_tensors

        images, labels = load_dataset_tensors(args.dataset, args.split)
        return images, labels, f"{args.dataset}/{args.split}"
    if getattr(args, "folder", None):
        return _load_folder(Path(args.folder)), None, str(args.folder)
    images, labels = load_image_npz(args.npz)
    return images, labels, str(args.npz)


def _extractor(args: argparse.Namespace, manifest: dict[str, Any] | None, dataset: str | None = None) -> Any:
    from eval.features import build_extractor

    name = args.extractor or (manifest or {}).get("extractor")
    if name is None:
        raise CommandError(
            f"--ref {printable(args.ref)} has no manifest naming its feature extractor; say which it is with "
            f"--assume-ref-extractor (e.g. inception-v3-pool3:tf1-bilinear for ADM files) or --extractor"
        )
    inception, dinov2 = name.startswith("inception"), name.startswith("dinov2")
    if args.weights and not (inception or dinov2):
        raise CommandError(f"--weights applies to the Inception and DINOv2 extractors, not {name}; drop it")
    if args.resize and not (inception or dinov2):
        raise CommandError(f"--resize applies to the Inception and DINOv2 extractors only, not {name}; drop it")
    if args.resize and (args.resize in ("torch", "pil")) != dinov2:
        raise CommandError(
            f"--resize {args.resize} does not apply to {name}: Inception takes tf1-bilinear or bilinear-antialias, "
            "DINOv2 takes torch (EDM2) or pil (dgm-eval)"
        )
    resize = args.resize or (manifest or {}).get("resize")
    if name == "dinov2":
        name = f"dinov2-{args.dinov2_arch}-cls"
    if name.startswith(("yardstick", "lenet-", "foundation-")):
        _say(f"loading the {name} feature network (a yardstick network is trained on first use, about 25 s on 2 cores)")
    if manifest and not (args.extractor or args.resize or (dinov2 and args.dinov2_arch != DEFAULT_DINOV2)):
        # A statistics file says how its features are rebuilt (the same rule as the averaging commands' --ref).
        from eval.features import extractor_from_manifest

        return extractor_from_manifest(manifest, dataset=dataset, weights_path=args.weights, cache_dir=args.cache_dir,
                                       download=args.download, device=args.device)
    return build_extractor(
        name, weights_path=args.weights, resize=resize if (inception or dinov2) else None,
        dataset=dataset, cache_dir=args.cache_dir, download=args.download, device=args.device,
    )


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from gen.utils import dist

    if not dist.is_main():
        return
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        from gen.utils.ckpt import atomic_write

        write_output(args.out, "--out", lambda: atomic_write(args.out, lambda tmp: Path(tmp).write_text(text + "\n")))
    print(text)


def cmd_ref(args: argparse.Namespace) -> None:
    from eval.features import InceptionFeatures
    from eval.generate import image_stats, share
    from eval.stats import save_stats
    from gen.utils import dist

    images, _, source = _load_images(args)
    ext = _extractor(args, None, dataset=args.dataset)
    spatial = bool(args.sfid)
    if spatial and not isinstance(ext, InceptionFeatures):
        raise CommandError("--sfid needs the Inception extractor (--extractor inception)")
    update, close = _progress(share(images.shape[0], args.batch_size), f"reference statistics of {source}")
    got = image_stats(images, ext, args.batch_size, spatial=spatial, progress=update)
    close()
    stats = got.stats.gaussian({**ext.manifest(), "dataset": source})
    if got.spatial is not None:
        stats.extra = {"mu_s": got.spatial.mu(), "sigma_s": got.spatial.sigma()}
    if dist.is_main():
        write_output(args.out, "--out", lambda: save_stats(args.out, stats))
    _emit(argparse.Namespace(out=None), {"written": str(args.out), **stats.manifest, "num_images": stats.n})


def _reference(args: argparse.Namespace) -> tuple[Any, Any]:
    from eval.stats import load_stats

    assume = None
    if args.assume_ref_extractor:
        name, _, resize = args.assume_ref_extractor.partition(":")
        assume = {"extractor": name, "resize": resize or "tf1-bilinear"}
    ref = load_stats(args.ref, assume_manifest=assume)
    ext = _extractor(args, ref.manifest)
    if ref.manifest.get("assumed"):
        # A manifest-less file (ADM / pytorch-fid) is taken to match the weights in use.
        ref.manifest.setdefault("weights_sha256", ext.weights_sha256)
    return ref, ext


def _is_note(args: argparse.Namespace, metrics: dict[str, Any]) -> dict[str, str]:
    # The split convention changes the Inception Score a lot below 50k images; say which one was used.
    return {"inception_score_convention": args.is_convention} if "inception_score" in metrics else {}


def _evaluate(args: argparse.Namespace, generate_fn: Any, seeds: range, what: str, **kwargs: Any) -> dict[str, Any]:
    from eval.generate import evaluate, share
    from eval.stats import load_image_npz

    if len(seeds) < 2:  # else the covariance refuses, naming no input
        raise CommandError(f"{what}: {len(seeds)} image; a covariance (FID and the other statistics) needs at least 2")
    ref, ext = _reference(args)
    real = load_image_npz(args.ref_batch)[0] if args.ref_batch else None
    update, close = _progress(share(len(seeds), args.batch_size), f"features of {what}")
    real_update, real_close = (None, None)
    if real is not None:
        real_update, real_close = _progress(share(len(real), args.batch_size), f"features of {args.ref_batch}")
    metrics = evaluate(
        generate_fn, seeds, ext, ref, batch_size=args.batch_size, real_images=real,
        allow_singular=args.allow_singular, is_convention=args.is_convention, progress=update,
        real_progress=real_update, **kwargs,
    )
    close()
    if real_close is not None:
        real_close()
    return {**ext.manifest(), **metrics, **_is_note(args, metrics)}


def cmd_samples(args: argparse.Namespace) -> None:
    from eval.generate import images_fn

    images, labels, source = _load_images(args)
    metrics = _evaluate(args, images_fn(images, labels), range(images.shape[0]), source)
    _emit(args, {"samples": source, "ref": str(args.ref), **metrics})


def _generator_factory(spec: str) -> Callable[..., Any]:
    module, sep, fn = spec.partition(":")
    if not sep or not module or not fn:
        raise CommandError(f"--generator {spec!r}: expected module:function, e.g. pipeline:snapshot_generate_fn")
    try:
        factory = getattr(importlib.import_module(module), fn)
    except ImportError as e:
        raise CommandError(f"--generator {spec!r}: cannot import module {module!r} ({e}); run from the repository root") from e
    except AttributeError:
        raise CommandError(f"--generator {spec!r}: module {module!r} has no {fn!r}") from None
    if not callable(factory):
        raise CommandError(f"--generator {spec!r}: {fn!r} is not callable")
    return factory


def cmd_preset(args: argparse.Namespace) -> None:
    if not args.generator:
        raise CommandError(
            "no snapshot sampler given; pass --generator module:function, a factory "
            "(snapshot_path, **options) -> generate_fn(seeds) -> (uint8 images, labels)"
        )
    factory = _generator_factory(args.generator)
    options = dict(args.option)
    num = args.num_images or PRESETS[args.command]
    try:
        generate_fn = factory(args.snapshot, **options)
    except (CommandError, OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        # Building a sampler from a snapshot is reading that file: any failure here is about it or the options.
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CommandError(
            f"snapshot {printable(args.snapshot)} could not be loaded by --generator {args.generator}"
            f"{' with --option ' + ' '.join(f'{k}={v}' for k, v in options.items()) if options else ''}: {msg}"
        ) from e
    seeds = range(args.seed_start, args.seed_start + num)
    metrics = _evaluate(args, generate_fn, seeds, f"{num} samples of {args.snapshot}", png_dir=args.png_dir)
    _emit(args, {"snapshot": str(args.snapshot), "ref": str(args.ref), "seeds": f"{seeds.start}-{seeds.stop - 1}",
                 **metrics, **{f"option.{k}": v for k, v in options.items()}})


# ----------------------------------------------------------------------------------------------
# Arguments: checked before any work, so a typo never costs a long computation.


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. steps=50), got {text!r}")
    return key, value


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {device!r} is not a device; use cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {device}: no CUDA device is available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CommandError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise CommandError(f"--device {device}: only cpu and cuda[:N] are supported")


def _check_input(path: str, what: str, folder: bool = False) -> None:
    p = Path(path)
    if not p.exists():
        raise CommandError(f"{what} {printable(p)}: no such {'folder' if folder else 'file'}")
    if folder and not p.is_dir():
        raise CommandError(f"{what} {printable(p)} is a file, not a folder")
    if not folder and p.is_dir():
        raise CommandError(f"{what} {printable(p)} is a folder, not a file")
    if not os.access(p, os.R_OK | (os.X_OK if folder else 0)):
        raise CommandError(f"{what} {printable(p)}: permission denied; fix its permissions")


def _check_args(args: argparse.Namespace) -> None:
    """Every argument that can be checked without doing the work, with the argument's name in the message."""
    if args.command == "ref" and not (args.out and args.extractor):
        raise CommandError("ref needs --extractor (inception | dinov2 | yardstick) and --out FILE.npz")
    if args.extractor == "yardstick" and args.command not in ("ref", "recon"):
        raise CommandError("with npz/folder the yardstick network comes from --ref's manifest; drop --extractor")
    if args.command == "ref" and args.extractor == "yardstick" and not args.dataset:
        raise CommandError("--extractor yardstick needs --dataset (mnist5k or shapes): it is trained on that dataset")
    if getattr(args, "sfid", False) and not (args.extractor or "").startswith("inception"):
        raise CommandError("--sfid needs the Inception extractor (--extractor inception)")
    _check_device(args.device)
    # The snapshot argument is left to the --generator factory: it may take a run folder or another spec.
    for key, what, folder in (("npz", "npz file", False), ("folder", "folder", True), ("ref", "--ref", False),
                              ("ref_batch", "--ref-batch", False), ("weights", "--weights", False)):
        value = getattr(args, key, None)
        if value:
            _check_input(value, what if args.command != "ref" or key not in ("npz", "folder") else f"--{key}", folder)
    if args.out:
        check_writable_file(args.out, "--out", {f"--{k.replace('_', '-')}" if k != "npz" or args.command == "ref"
                                                else "npz file": getattr(args, k, None)
                                                for k in ("npz", "ref", "ref_batch", "weights", "snapshot", "tokenizer")})
    if getattr(args, "png_dir", None):
        check_writable_dir(args.png_dir, "--png-dir")
        # <seed>.png of this run would replace some and keep others of an earlier one: a folder of two sample sets.
        earlier = sorted(p.name for p in Path(args.png_dir).glob("[0-9][0-9][0-9][0-9][0-9][0-9]*.png"))
        if earlier:
            raise CommandError(f"--png-dir {printable(args.png_dir)} already holds {len(earlier)} <seed>.png file(s) "
                               f"({earlier[0]}, ...); this run would mix its images with them. Give an empty or new "
                               "folder")


def _tokenizer_spec(source: str, overrides: list[str]) -> dict[str, Any]:
    """A tokenizer ``_target_`` spec from a YAML/JSON file or a snapshot's metadata, with ``key=value`` overrides."""
    return _tokenizer_source(source, overrides)[0]


def _tokenizer_source(source: str, overrides: list[str]) -> tuple[dict[str, Any], Path | None]:
    """``_tokenizer_spec`` and the snapshot it came from (None for a YAML/JSON spec, which the user wrote)."""
    import yaml

    path = Path(source)
    snapshot = None
    if not path.exists():
        raise FileNotFoundError(f"tokenizer spec {path} does not exist (a configs/tokenizer/*.yaml file or a snapshot)")
    if path.suffix == ".safetensors" or path.is_dir():
        from gen.utils.ckpt import load_snapshot_config

        # The shared reader: a damaged file or a folder is one line naming it (safe_open's own error was a traceback).
        config = load_snapshot_config(path)
        spec = config.get("tokenizer")
        if not isinstance(spec, dict):
            raise ValueError(f"{path} has no tokenizer in its metadata; was it written by train.py?")
        snapshot = path
        if config.get("tokenizer_weights") == "snapshot":  # a tokenizer-training snapshot: its tensors are the weights
            spec = {**spec, "weights": str(path)}
    else:
        spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ValueError(f"{path} is not a tokenizer spec (a mapping with '_target_')")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        spec[key] = yaml.safe_load(value)
    for key, value in spec.items():
        if isinstance(value, str) and "${" in value:
            raise ValueError(f"{path}: tokenizer.{key} = {value!r} is a config interpolation; give the value with --set {key}=...")
    return spec, snapshot


def _build_tokenizer(source: str, overrides: list[str]) -> Any:
    """The tokenizer to evaluate. A snapshot's metadata is untrusted: its settings are bounded and checked, and
    its weights are the snapshot itself or what ``--set weights=...`` names (``build_snapshot_tokenizer``)."""
    from gen.utils.build import build
    from gen.utils.ckpt import build_snapshot_tokenizer, tokenizer_weights

    spec, snapshot = _tokenizer_source(source, overrides)
    if snapshot is None:
        return build(spec)
    named = [item.partition("=")[2] for item in overrides if item.partition("=")[0] == "weights"]
    with tokenizer_weights(spec["weights"] if named else None):
        return build_snapshot_tokenizer(spec, str(snapshot), snapshot)


def cmd_recon(args: argparse.Namespace) -> None:
    from eval.recon import reconstruction_metrics, tokenizer_roundtrip

    spec = _tokenizer_spec(args.tokenizer, args.set)
    tokenizer = _build_tokenizer(args.tokenizer, args.set)  # refused before any image is read
    if args.folder and args.resolution:
        from gen.data.folder import ImageFolder

        images: Any = ImageFolder(args.folder, args.resolution, labels="none")
        source = f"{args.folder} (centre-cropped to {args.resolution})"
    else:
        images, _, source = _load_images(args)
    if args.num_images is not None:
        if args.num_images < 1 or args.num_images > len(images):
            raise ValueError(f"--num-images must lie in [1, {len(images)}], got {args.num_images}")
        images = images[: args.num_images] if isinstance(images, torch.Tensor) else torch.utils.data.Subset(
            images, range(args.num_images))
    tokenizer = tokenizer.to(args.device).eval().requires_grad_(False)
    ext = _extractor(args, {"extractor": "inception-v3-pool3"}, dataset=args.dataset)
    lpips = None
    if not args.no_lpips:
        from gen.nn.lpips import LPIPS

        lpips = LPIPS(args.lpips_weights, cache_dir=args.cache_dir, download=args.download).to(args.device)
    metrics = reconstruction_metrics(
        tokenizer_roundtrip(tokenizer, seed=args.seed), images, ext, batch_size=args.batch_size,
        allow_singular=args.allow_singular, lpips=lpips, with_ssim=not args.no_ssim, device=args.device,
    )
    extra = {"lpips_network": lpips.identity()} if lpips is not None else {}
    _emit(args, {"tokenizer": tokenizer.describe(), "tokenizer_spec": spec, "images": source, "seed": args.seed,
                 **ext.manifest(), **extra, **metrics})


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--extractor", help="inception | dinov2 | yardstick | a manifest name (default: from --ref)")
    p.add_argument("--weights", help="pretrained weights file (Inception / DINOv2)")
    p.add_argument(
        "--resize", choices=["tf1-bilinear", "bilinear-antialias", "torch", "pil"],
        help="Inception: tf1-bilinear (torch-fidelity/ADM) | bilinear-antialias; DINOv2: torch (EDM2) | pil (dgm-eval)",
    )
    p.add_argument("--dinov2-arch", default=DEFAULT_DINOV2)
    p.add_argument("--cache-dir", help="weights / yardstick cache (default ${GEN_CACHE:-~/.cache/gen}/...)")
    p.add_argument("--download", action="store_true", help="download missing pretrained weights")
    p.add_argument("--batch-size", type=_count(1), default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the JSON here (ref: the statistics .npz)")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", required=True, help="reference statistics .npz")
    p.add_argument("--ref-batch", help="ADM reference batch (arr_0 real images) for precision/recall")
    p.add_argument("--assume-ref-extractor", help="for --ref files without manifest, e.g. inception-v3-pool3:tf1-bilinear")
    p.add_argument("--allow-singular", action="store_true", help="accept fewer images than feature dims (biased)")
    p.add_argument(
        "--is-convention", choices=["adm", "torch-fidelity"], default="adm",
        help="Inception Score splits: adm = consecutive groups of 5000 (papers), torch-fidelity = 10 shuffled splits",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ref = sub.add_parser("ref", help="compute reference statistics")
    src = ref.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["mnist5k", "shapes"], help="built-in dataset")
    src.add_argument("--folder", help="folder of images")
    src.add_argument("--npz", help="ADM-style .npz (arr_0)")
    ref.add_argument("--split", default="train", choices=["train", "heldout"])
    ref.add_argument("--sfid", action="store_true", help="also store mu_s/sigma_s (Inception only)")
    _common(ref)
    ref.set_defaults(func=cmd_ref)

    for name, key in (("npz", "npz"), ("folder", "folder")):
        p = sub.add_parser(name, help=f"evaluate a {name} of samples against reference statistics")
        p.add_argument(key)
        _eval_options(p)
        _common(p)
        p.set_defaults(func=cmd_samples)

    rec = sub.add_parser("recon", help="tokenizer reconstruction metrics: rFID, PSNR, SSIM, LPIPS")
    rec.add_argument("--tokenizer", required=True,
                     help="tokenizer spec: a YAML/JSON file with _target_ (configs/tokenizer/*.yaml) or a snapshot")
    rec.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a tokenizer argument (YAML value), e.g. --set weights=/models/sd-vae-ft-ema")
    src = rec.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="built-in dataset (shapes; mnist5k for 1-channel tokenizers)")
    src.add_argument("--folder", help="folder of images (one size, or any sizes with --resolution)")
    src.add_argument("--npz", help="ADM-style .npz (arr_0)")
    rec.add_argument("--split", default="heldout", choices=["train", "heldout"], help="split of a built-in dataset")
    rec.add_argument("--resolution", type=int, help="with --folder: ADM centre crop of every image to this side")
    rec.add_argument("--num-images", type=int, help="only the first N images")
    rec.add_argument("--seed", type=int, default=0, help="posterior samples: image i draws from a generator seeded by (seed, i)")
    rec.add_argument("--lpips-weights", help="torchvision's vgg16-397923af.pth for LPIPS (default: the weights cache)")
    rec.add_argument("--no-lpips", action="store_true", help="skip LPIPS")
    rec.add_argument("--no-ssim", action="store_true", help="skip SSIM")
    rec.add_argument("--allow-singular", action="store_true", help="accept fewer images than feature dims (biased)")
    _common(rec)
    rec.set_defaults(func=cmd_recon)

    for name, n in PRESETS.items():
        p = sub.add_parser(name, help=f"generate {n} images from a snapshot and evaluate them")
        p.add_argument("snapshot")
        p.add_argument("--generator", help="module:function building generate_fn from a snapshot")
        p.add_argument("--option", type=_key_value, action="append", default=[],
                       help="key=value passed to the generator factory")
        p.add_argument("--num-images", type=_count(1), help=f"override the preset's {n}")
        p.add_argument("--seed-start", type=_count(0), default=0)
        p.add_argument("--png-dir", help="also write one PNG per image")
        _eval_options(p)
        _common(p)
        p.set_defaults(func=cmd_preset)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 done, 2 bad argument or input; argparse exits 2 itself)."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        from gen.utils import dist

        _check_args(args)
        dist.init_distributed()
        args.func(args)
        return 0

    return run_main(run, PROG)


if __name__ == "__main__":
    sys.exit(main())
