"""Command line: reference statistics, evaluation of sample files, generate-and-evaluate presets.

Run from the repository root (single process, or under ``torchrun --nproc_per_node=N``; the images are
split across processes by index/seed and the statistics reduced, so results do not depend on N):

    # reference statistics of a built-in dataset with its yardstick network (DESIGN.md §5)
    python -m eval ref --dataset mnist5k --extractor yardstick --out refs/mnist5k_train.npz
    # ... of an ADM-style batch or an image folder with the FID Inception (local weights file), with sFID
    python -m eval ref --npz VIRTUAL_imagenet256_labeled.npz --extractor inception \\
        --weights weights-inception-2015-12-05-6726825d.pth --sfid --out refs/in256.npz
    # evaluate samples (``arr_0`` uint8 NHWC, optional ``arr_1`` labels) or a folder of PNGs
    python -m eval npz samples.npz --ref refs/mnist5k_train.npz --out metrics.json
    python -m eval folder samples/ --ref refs/in256.npz --weights ... --ref-batch VIRTUAL_imagenet256_labeled.npz
    # generate N images from a snapshot (seeds 0..N-1) and evaluate them
    python -m eval fid10k runs/x/snapshot-000100000.safetensors --ref refs/in256.npz \\
        --generator gen.pipeline:snapshot_generate_fn --option steps=50 --option cfg=1.5
    # tokenizer reconstruction: rFID, PSNR, SSIM, LPIPS (a tokenizer preset or a snapshot's tokenizer)
    python -m eval recon --tokenizer configs/tokenizer/sd_vae_ema.yaml --set weights=/models/sd-vae-ft-ema \\
        --folder /data/imagenet/val --resolution 256 --weights weights-inception-2015-12-05-6726825d.pth

The extractor is rebuilt from the reference file's manifest unless ``--extractor`` is given. Metrics are
printed as JSON (rank 0) and written to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

PRESETS = {"fid5k": 5000, "fid10k": 10000, "fid50k": 50000}


def _load_folder(folder: Path) -> torch.Tensor:
    """uint8 (N, C, H, W) from the PNG/JPEG files of a folder (sorted by name; all of one size and mode)."""
    import numpy as np
    from PIL import Image

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise ValueError(f"no image files in {folder}")
    arrays = []
    for p in files:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("L" if im.mode in ("L", "I", "I;16", "1") else "RGB"))
        arrays.append(arr[..., None] if arr.ndim == 2 else arr)
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images in {folder} differ in size or channels: {sorted(shapes)[:4]}")
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
        raise SystemExit("error: the reference file has no manifest; say which features to use with --extractor")
    resize = args.resize or (manifest or {}).get("resize")
    if name == "dinov2":
        name = f"dinov2-{args.dinov2_arch}-cls"
    return build_extractor(
        name, weights_path=args.weights, resize=resize if name.startswith("inception") else None,
        dataset=dataset, cache_dir=args.cache_dir, download=args.download, device=args.device,
    )


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from gen.utils import dist

    if not dist.is_main():
        return
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.out:
        from gen.utils.ckpt import atomic_write

        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text + "\n"))


def cmd_ref(args: argparse.Namespace) -> None:
    from eval.generate import image_stats
    from eval.features import InceptionFeatures
    from eval.stats import save_stats
    from gen.utils import dist

    images, _, source = _load_images(args)
    ext = _extractor(args, None, dataset=args.dataset)
    spatial = bool(args.sfid)
    if spatial and not isinstance(ext, InceptionFeatures):
        raise SystemExit("error: --sfid needs the Inception extractor")
    got = image_stats(images, ext, args.batch_size, spatial=spatial)
    stats = got.stats.gaussian({**ext.manifest(), "dataset": source})
    if got.spatial is not None:
        stats.extra = {"mu_s": got.spatial.mu(), "sigma_s": got.spatial.sigma()}
    if dist.is_main():
        save_stats(args.out, stats)
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


def cmd_samples(args: argparse.Namespace) -> None:
    from eval.generate import evaluate, images_fn
    from eval.stats import load_image_npz

    images, labels, source = _load_images(args)
    ref, ext = _reference(args)
    real = load_image_npz(args.ref_batch)[0] if args.ref_batch else None
    metrics = evaluate(
        images_fn(images, labels), range(images.shape[0]), ext, ref,
        batch_size=args.batch_size, real_images=real, allow_singular=args.allow_singular,
    )
    _emit(args, {"samples": source, "ref": str(args.ref), **ext.manifest(), **metrics})


def cmd_preset(args: argparse.Namespace) -> None:
    from eval.generate import evaluate
    from eval.stats import load_image_npz

    if not args.generator:
        raise SystemExit(
            "error: no snapshot sampler given; pass --generator module:function, a factory "
            "(snapshot_path, **options) -> generate_fn(seeds) -> (uint8 images, labels)"
        )
    module, _, fn = args.generator.partition(":")
    factory = getattr(importlib.import_module(module), fn)
    options = dict(kv.split("=", 1) for kv in args.option)
    generate_fn = factory(args.snapshot, **options)
    num = args.num_images or PRESETS[args.command]
    ref, ext = _reference(args)
    real = load_image_npz(args.ref_batch)[0] if args.ref_batch else None
    seeds = range(args.seed_start, args.seed_start + num)
    metrics = evaluate(
        generate_fn, seeds, ext, ref, batch_size=args.batch_size, real_images=real,
        allow_singular=args.allow_singular, png_dir=args.png_dir,
    )
    _emit(args, {"snapshot": str(args.snapshot), "ref": str(args.ref), "seeds": f"{seeds.start}-{seeds.stop - 1}",
                 **ext.manifest(), **metrics, **{f"option.{k}": v for k, v in options.items()}})


def _tokenizer_spec(source: str, overrides: list[str]) -> dict[str, Any]:
    """A tokenizer ``_target_`` spec from a YAML/JSON file or a snapshot's metadata, with ``key=value`` overrides."""
    import yaml

    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer spec {path} does not exist (a configs/tokenizer/*.yaml file or a snapshot)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        spec = json.loads(meta.get("config", "{}")).get("tokenizer")
        if spec is None:
            raise ValueError(f"{path} has no tokenizer in its metadata; was it written by train.py?")
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
    return spec


def cmd_recon(args: argparse.Namespace) -> None:
    from eval.recon import reconstruction_metrics, tokenizer_roundtrip
    from gen.utils.build import build

    spec = _tokenizer_spec(args.tokenizer, args.set)
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
    tokenizer = build(spec).to(args.device).eval().requires_grad_(False)
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
    p.add_argument("--resize", choices=["tf1-bilinear", "bilinear-antialias"], help="Inception resize mode")
    p.add_argument("--dinov2-arch", default="vit_large_patch14_dinov2")
    p.add_argument("--cache-dir", help="weights / yardstick cache (default ${GEN_CACHE:-~/.cache/gen}/...)")
    p.add_argument("--download", action="store_true", help="download missing pretrained weights")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the JSON here (ref: the statistics .npz)")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", required=True, help="reference statistics .npz")
    p.add_argument("--ref-batch", help="ADM reference batch (arr_0 real images) for precision/recall")
    p.add_argument("--assume-ref-extractor", help="for --ref files without manifest, e.g. inception-v3-pool3:tf1-bilinear")
    p.add_argument("--allow-singular", action="store_true", help="accept fewer images than feature dims (biased)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    ref = sub.add_parser("ref", help="compute reference statistics")
    src = ref.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="built-in dataset (mnist5k, shapes)")
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
        p.add_argument("--option", action="append", default=[], help="key=value passed to the generator factory")
        p.add_argument("--num-images", type=int, help=f"override the preset's {n}")
        p.add_argument("--seed-start", type=int, default=0)
        p.add_argument("--png-dir", help="also write one PNG per image")
        _eval_options(p)
        _common(p)
        p.set_defaults(func=cmd_preset)
    return parser


def main(argv: list[str] | None = None) -> int:
    from gen.utils import dist

    args = build_parser().parse_args(argv)
    if args.command == "ref" and not (args.out and args.extractor):
        raise SystemExit("error: ref needs --extractor (inception | dinov2 | yardstick) and --out FILE.npz")
    if args.extractor == "yardstick" and args.command not in ("ref", "recon"):
        raise SystemExit("error: with npz/folder the yardstick network comes from --ref's manifest; drop --extractor")
    dist.init_distributed()
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
