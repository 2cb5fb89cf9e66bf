"""Yardstick comparison of tokenizers (issue 9, "What it must show" 4): reconstruction against generation.

Rows, on mnist5k at 32 x 32 (YARDSTICK.md; the yardstick FID network knows mnist5k and shapes):

* ``pixels``: LightningDiT on pixels (``experiment=yardstick_lightningdit``, patch 4: 8 x 8 tokens);
* ``kl_f4d4``: (a) a low-dimensional KL autoencoder, f4 with 4 channels (``experiment=yardstick_kl_f4d4``);
* ``kl_f4d16``: (b) a high-dimensional KL autoencoder, f4 with 16 channels (``experiment=yardstick_kl_f4d16``);
* ``vavae_f4d16``: (c) (b) plus VA-VAE's VF loss against the yardstick's foundation encoder
  (``experiment=yardstick_vavae_f4d16``).

For each tokenizer row: train the tokenizer once (seed 0) through ``train.py``; measure rFID (yardstick features of
the 4,500 training digits against their reconstructions), PSNR and SSIM of its final EMA snapshot
(``eval.recon.reconstruction_metrics``, the code of ``python -m eval recon``); extract its latents
(``python -m scripts.extract_latents``, per-channel statistics); train the same LightningDiT (``yardstick_lightningdit``,
patch 1 on the 8 x 8 latents, so every row has 64 tokens and the same network cost) on them for the same number of
images with 2 seeds; and measure the yardstick FID and class accuracy of 2,000 samples (seeds 0-1999, Euler 20 steps,
no guidance) at every ``--kimg`` point, decoded by the row's tokenizer.

Records: one JSON record per (method, seed, kimg) in ``bench/results/yardstick_tokenizers.json`` with the fields of
the shared yardstick harness (method, seed, kimg, nfe, fid, class_accuracy, sec_per_image, command) plus the
tokenizer's rFID/PSNR/SSIM; ``kind: "recon"`` records hold the tokenizers' own numbers. Re-running resumes: trained
runs, extractions and stored records are not repeated. The records, their store and the logged subprocesses are the
shared harness's (``bench/yardstick.py``); the rows are not its ``Row`` because a tokenizer row needs the two
preparation steps above before its ``train.py`` command.

Example (from the repository root)::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/yardstick_tokenizers.py --tokenizer-kimg 16 --kimg 8,16
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from gen.utils.ckpt import list_snapshots  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness beside this file
from tables import tokenizers as tokenizer_table  # noqa: E402  (the table bench/README.md shows)
from yardstick import Store, code_version, machine, rel_path, run_logged, utc_now  # noqa: E402

BENCH = "yardstick_tokenizers"
DATASET = "mnist5k"
# method -> (tokenizer-training experiment, tokenizer preset), None for pixels.
ROWS: dict[str, tuple[str, str] | None] = {
    "pixels": None,
    "kl_f4d4": ("yardstick_kl_f4d4", "yardstick_kl_f4d4"),
    "kl_f4d16": ("yardstick_kl_f4d16", "yardstick_kl_f4d16"),
    "vavae_f4d16": ("yardstick_vavae_f4d16", "yardstick_kl_f4d16"),
}
LABELS = {
    "pixels": "pixels (1 x 32 x 32, patch 4)",
    "kl_f4d4": "(a) KL-VAE f4d4 (4 x 8 x 8, patch 1)",
    "kl_f4d16": "(b) KL-VAE f4d16 (16 x 8 x 8, patch 1)",
    "vavae_f4d16": "(c) VA-VAE f4d16, VF loss (16 x 8 x 8, patch 1)",
}


def _last_snapshot(run_dir: Path, nimg: int) -> Path | None:
    for n, path in list_snapshots(run_dir):
        if n >= nimg:
            return path
    return None


# ----------------------------------------------------------------------------------------------------------
# Steps


def tokenizer_command(method: str, args: argparse.Namespace) -> list[str]:
    experiment, _ = ROWS[method]  # type: ignore[misc]
    return ["python", "train.py", f"experiment={experiment}", "seed=0", f"name={BENCH}-tok-{method}",
            f"run_dir={rel_path(args.runs / f'tok-{method}')}", f"trainer.total_kimg={args.tokenizer_kimg:g}",
            f"trainer.snapshot_kimg={args.tokenizer_kimg:g}", "eval=none", "trainer.progress=false",
            "trainer.tensorboard=false"]


def train_tokenizer(method: str, args: argparse.Namespace) -> Path:
    run_dir = args.runs / f"tok-{method}"
    nimg = int(round(args.tokenizer_kimg * 1000))
    snap = _last_snapshot(run_dir, nimg)
    if snap is None:
        cmd = tokenizer_command(method, args)
        run_logged([sys.executable, *cmd[1:]], run_dir.with_suffix(".log"), args.threads)
        snap = _last_snapshot(run_dir, nimg)
    assert snap is not None, f"no snapshot in {run_dir}"
    return snap.resolve()


def recon_record(method: str, snap: Path, args: argparse.Namespace, store: Store) -> dict[str, Any]:
    key = f"{BENCH}|recon|{method}|k{args.tokenizer_kimg:g}|n{args.recon_images}"
    rec = store.get(key)
    if rec is not None and not args.refresh:
        return rec
    from eval.__main__ import _tokenizer_spec
    from eval.classifier import load_dataset_tensors
    from eval.features import YardstickFeatures
    from eval.recon import reconstruction_metrics, tokenizer_roundtrip
    from gen.utils.build import build

    spec = _tokenizer_spec(str(snap), [])
    tok = build(spec).eval().requires_grad_(False)
    images, _ = load_dataset_tensors(DATASET, "train")
    images = images[: args.recon_images]
    t0 = time.time()
    m = reconstruction_metrics(tokenizer_roundtrip(tok, seed=0), images, YardstickFeatures(DATASET, args.cache),
                               batch_size=250)
    rec = {
        "kind": "recon", "key": key, "bench": BENCH, "method": method, "seed": 0, "kimg": args.tokenizer_kimg,
        "rfid": m["rfid"], "psnr": m["psnr"], "ssim": m["ssim"], "num_images": m["num_images"],
        "snapshot": rel_path(snap), "seconds": time.time() - t0,
        "command": shlex.join(["python", "-m", "eval", "recon", "--tokenizer", rel_path(snap), "--dataset", DATASET,
                               "--extractor", "yardstick", "--cache-dir", rel_path(Path(args.cache)), "--no-lpips"]),
        "train_command": shlex.join(tokenizer_command(method, args)), "machine": machine(), "code": code_version(),
        "date": utc_now(),
    }
    store.put(rec)
    print(f"[recon] {method}: rFID {m['rfid']:.2f}  PSNR {m['psnr']:.2f}  SSIM {m['ssim']:.3f}", flush=True)
    return rec


def extract_command(method: str, snap: Path, args: argparse.Namespace) -> list[str]:
    _, preset = ROWS[method]  # type: ignore[misc]
    return ["python", "-m", "scripts.extract_latents", f"data={DATASET}", f"tokenizer={preset}",
            f"tokenizer.weights={snap}", f"out={rel_path(args.runs / f'latents-{method}')}"]


def extract(method: str, snap: Path, args: argparse.Namespace) -> Path:
    out = args.runs / f"latents-{method}"
    if not (out / "stats.json").is_file():
        cmd = extract_command(method, snap, args)
        run_logged([sys.executable, *cmd[1:]], args.runs / f"latents-{method}.log", args.threads)
    return out


def generator_command(method: str, seed: int, args: argparse.Namespace, snap: Path | None) -> list[str]:
    common = ["experiment=yardstick_lightningdit", f"seed={seed}", f"name={BENCH}-{method}-s{seed}",
              f"run_dir={rel_path(args.runs / f'{method}-s{seed}')}", f"trainer.total_kimg={max(args.kimg):g}",
              f"trainer.snapshot_kimg={min(args.kimg):g}", f"trainer.checkpoint_kimg={min(args.kimg):g}", "eval=none",
              "preview.images=0", "trainer.progress=false", "trainer.tensorboard=false"]
    if ROWS[method] is None:
        return ["python", "train.py", *common]
    _, preset = ROWS[method]  # type: ignore[misc]
    latents = rel_path(args.runs / f"latents-{method}")
    return ["python", "train.py", *common, "data=latents", f"data.dataset.root={latents}", f"data.name={DATASET}",
            "data.channels=1", "data.resolution=32", "data.num_classes=10", "data.hflip=false",
            f"tokenizer={preset}", f"tokenizer.weights={snap}", "model.patch_size=1"]


def euler_sampler(steps: int) -> dict[str, Any]:
    return {"solver": {"_target_": "samplers.sample_euler"}, "steps": steps,
            "grid": {"_target_": "samplers.grids.uniform_grid"}, "guidance": {"scale": 1.0, "interval": None},
            "sharing": None}


def generation_records(method: str, seed: int, tok_snap: Path | None, recon: dict[str, Any] | None,
                       args: argparse.Namespace, store: Store) -> None:
    keys = {k: f"{BENCH}|{method}|s{seed}|k{k:g}|euler{args.steps}|n{args.num_images}" for k in args.kimg}
    if not args.refresh and all(store.get(key) is not None for key in keys.values()):
        print(f"[skip] {method}-s{seed}: every record is stored", flush=True)
        return
    run_dir = args.runs / f"{method}-s{seed}"
    cmd = generator_command(method, seed, args, tok_snap)
    if _last_snapshot(run_dir, int(round(max(args.kimg) * 1000))) is None:
        run_logged([sys.executable, *cmd[1:]], run_dir.with_suffix(".log"), args.threads)
    from eval.generate import yardstick_metrics
    from gen.utils.ckpt import tokenizer_weights
    from pipeline import SamplerSpec, generator_from_snapshot

    spec = SamplerSpec.from_config(euler_sampler(args.steps))
    for k, key in keys.items():
        if store.get(key) is not None and not args.refresh:
            continue
        snap = _last_snapshot(run_dir, int(round(k * 1000)))
        if snap is None:
            print(f"[miss] no snapshot at {k:g} kimg in {run_dir}", flush=True)
            continue
        with tokenizer_weights(tok_snap):  # the tokenizer this bench trained (the snapshot's path is not followed)
            gen, _ = generator_from_snapshot(str(snap))
        spent: dict[str, float] = {"seconds": 0.0, "images": 0}

        def generate(seeds: list[int], gen: Any = gen, spent: dict[str, float] = spent) -> tuple[torch.Tensor, torch.Tensor]:
            t0 = time.perf_counter()
            out = gen.generate(seeds, spec)
            spent["seconds"] += time.perf_counter() - t0
            spent["images"] += len(seeds)
            return out

        t0 = time.time()
        m = yardstick_metrics(generate, args.num_images, DATASET, args.cache, 250)
        rec = {
            "kind": "eval", "key": key, "bench": BENCH, "method": method, "label": LABELS[method], "seed": seed,
            "kimg": k, "nimg": int(snap.name.split("-")[1].split(".")[0]), "nfe": args.steps, "steps": args.steps,
            "guidance": 1.0, "fid": float(m["fid"]), "class_accuracy": float(m.get("class_accuracy", float("nan"))),
            "sec_per_image": spent["seconds"] / max(spent["images"], 1), "num_images": args.num_images,
            "eval_seconds": time.time() - t0, "snapshot": rel_path(snap), "latent_shape": list(gen.input_shape),
            "tokenizer_kimg": args.tokenizer_kimg if tok_snap is not None else None,
            "rfid": recon["rfid"] if recon else None, "psnr": recon["psnr"] if recon else None,
            "command": shlex.join(["python", f"bench/{BENCH}.py", f"--methods={method}", f"--seeds={seed}",
                                   f"--kimg={','.join(f'{x:g}' for x in args.kimg)}",
                                   f"--tokenizer-kimg={args.tokenizer_kimg:g}", f"--num-images={args.num_images}"]),
            "train_command": shlex.join(cmd).replace(str(ROOT) + "/", ""),
            "machine": machine(), "code": code_version(), "date": utc_now(),
        }
        store.put(rec)
        print(f"[eval] {method}-s{seed} {k:g} kimg: FID {rec['fid']:.2f}  acc {rec['class_accuracy']:.3f}  "
              f"{1000 * rec['sec_per_image']:.1f} ms/img", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(ROWS), help="rows (comma list)")
    ap.add_argument("--seeds", default="0,1", help="generator training seeds")
    ap.add_argument("--kimg", default="8,16", help="generator evaluation points (kimg)")
    ap.add_argument("--tokenizer-kimg", type=float, default=16.0, help="tokenizer training images (kimg)")
    ap.add_argument("--num-images", type=int, default=2000, help="samples per FID")
    ap.add_argument("--recon-images", type=int, default=4500, help="training digits for rFID/PSNR")
    ap.add_argument("--steps", type=int, default=20, help="Euler steps")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / BENCH)
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "yardstick"), help="yardstick network cache")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table-only", action="store_true", help="print the table from the stored records")
    ap.add_argument("--refresh", action="store_true", help="recompute stored records")
    args = ap.parse_args(argv)
    args.kimg = sorted(float(k) for k in args.kimg.split(","))
    args.runs = args.runs.resolve()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in ROWS]
    if bad:
        ap.error(f"unknown rows {bad}; known: {list(ROWS)}")
    torch.set_num_threads(args.threads)
    store = Store(args.results / f"{BENCH}.json")
    if not args.table_only:
        # Tokenizers first, then one seed of every row, then the next: a stopped run leaves whole seeds.
        prepared: dict[str, tuple[Path | None, dict[str, Any] | None]] = {}
        for m in methods:
            snap, recon = None, None
            if ROWS[m] is not None:
                snap = train_tokenizer(m, args)
                recon = recon_record(m, snap, args, store)
                extract(m, snap, args)
            prepared[m] = (snap, recon)
        for s in (int(x) for x in args.seeds.split(",")):
            for m in methods:
                generation_records(m, s, *prepared[m], args, store)
    print(tokenizer_table({BENCH: store.records()}, BENCH))


if __name__ == "__main__":
    main()
