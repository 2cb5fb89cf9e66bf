"""Yardstick of tokenizers: reconstruction against generation over a channel sweep (protocol v2, bench/README.md).

The dilemma of Yao et al. 2025 ("Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion
Models", hustvl/LightningDiT): more latent channels reconstruct better but are harder to generate in, and aligning the
latents with a vision foundation model (the VF loss of VA-VAE) recovers generation. Rows, on mnist5k at 32 x 32:

* ``pixels``: LightningDiT on pixels (patch 4: 8 x 8 tokens). This is the backbone table's ``lightningdit`` run
  (``<runs>/../backbones/lightningdit-s<seed>``, trained once for both tables) when the points are among the
  protocol's;
* ``kl_f4d{4,16,64}``: KL autoencoders f4 with 4, 16 and 64 channels (``experiment=yardstick_kl_f4d<C>``: L1, KL
  1e-6, PatchGAN; 64 x 8 x 8 is four numbers per pixel);
* ``vavae_f4d{4,16,64}``: the same plus VA-VAE's VF loss (``experiment=yardstick_vavae_f4d<C>``) against the
  foundation encoder ``--vf-encoder`` (default ``foundation2-mnist5k``, 8 x 8 tokens like the latents; another
  encoder gives rows named ``vavae_f4d<C>-<encoder>`` in their own folders, e.g. ``--vf-encoder foundation-mnist5k``).

A tokenizer row: train the tokenizer once (seed 0, ``--tokenizer-kimg``, default 64 kimg, where its reconstruction
has settled: see ``DEFAULT_TOKENIZER_KIMG``) through ``train.py``; measure rFID
(yardstick features of the first ``--recon-images`` training digits against their reconstructions), PSNR and SSIM of
its final EMA snapshot (``eval.recon.reconstruction_metrics``, the code of ``python -m eval recon``); extract its
latents (``python -m scripts.extract_latents``, per-channel statistics); then train the v2 LightningDiT
(``experiment=yardstick_lightningdit``, width 128, depth 6) with patch 1 on the 8 x 8 latents (64 tokens, as pixels
with patch 4, so every row has the same network cost) with 2 seeds, and evaluate it through the shared harness
(``bench/yardstick.py``'s ``run_worker``): yardstick FID and class accuracy of 1,000 samples (seeds 0-999) decoded by
the row's tokenizer, Euler 20 without guidance at 16, 32, 64 and 96 kimg and the quick start's sampler (Euler 20,
CFG 2) at 96 kimg.

Records: ``bench/results/yardstick_tokenizers.json``: the harness's evaluation records (one per row, seed, point and
sampler) plus one ``kind: "recon"`` record per tokenizer (rFID, PSNR, SSIM, channels, VF loss, encoder, tokenizer
training s/kimg and command). Everything resumes: trained runs, extractions and stored records are not repeated.
``--jobs N`` runs N workers as single-threaded processes: first each tokenizer (training, rFID, extraction), then
the (row, seed) generators, a row's only after its tokenizer finished.

    python bench/yardstick_tokenizers.py --estimate               # seconds of work left; does nothing
    python bench/yardstick_tokenizers.py --dry-run                # the commands it would run
    nice -n 10 python bench/yardstick_tokenizers.py --jobs 2      # the full sweep (or: bench/yardstick_all.py)
    python bench/yardstick_tokenizers.py --methods kl_f4d4 --seeds 0 --tokenizer-kimg 0.5 --kimg 0.5 \\
        --variants euler20 --num-images 200 --recon-images 200 --runs /tmp/tok --results /tmp/res   # smoke run

Run folders (``--runs``, default ``runs/yardstick/tokenizers``): ``tok-<row>-s0`` (tokenizer), ``latents-<row>``,
``<row>-s<seed>`` (generator).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH_DIR)):  # run from anywhere without installing; the harness lies beside this file
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tables import tokenizers as tokenizer_table  # noqa: E402  (the table bench/README.md shows)
from yardstick import (  # noqa: E402
    DEFAULT_KIMG,
    DEFAULT_NUM_IMAGES,
    EULER20,
    QUICKSTART,
    Bench,
    Row,
    Run,
    Store,
    Variant,
    _eval_key,
    code_version,
    machine,
    parser,
    rel_path,
    run_logged,
    run_worker,
    utc_now,
)

from gen.utils.ckpt import file_sha256, tokenizer_weights  # noqa: E402

BENCH = "yardstick_tokenizers"
SCRIPT = "bench/yardstick_tokenizers.py"
DATASET = "mnist5k"
CHANNELS = (4, 16, 64)
DEFAULT_VF_ENCODER = f"foundation2-{DATASET}"
# Tokenizer budget: the f4d16 KL run's EMA snapshots (rFID / PSNR / SSIM on 1,000 training digits) at 16, 32, 48, 64,
# 80 and 96 kimg: rFID 1.72 / 1.11 / 0.47 / 0.40 / 0.28 / 0.25, PSNR 23.87 / 24.66 / 26.11 / 26.64 / 26.89 / 27.60 dB,
# SSIM 0.919 / 0.945 / 0.957 / 0.961 / 0.959 / 0.968. rFID has settled by 64 kimg (below 0.5, far under the
# generators' FIDs; 0.15 lower at 96); PSNR keeps creeping up by about 0.5 dB per 16 kimg through 96 kimg, i.e. it
# does not flatten within any budget this machine affords, so the budget is set by rFID: 64 kimg
# (--tokenizer-kimg 96 costs about 35 min more with 2 jobs).
DEFAULT_TOKENIZER_KIMG = 64.0
# Tokenizer training s/kimg on one thread of the shared 2-core host at load ~3.5 (2026-12-05): 10 before the
# discriminator starts (4 kimg), 20 after it; the channel count changes only 1x1 convolutions and does not change the
# cost measurably (f4d4 / f4d16 / f4d64 side by side at load 6-10: 50-90 s/kimg each); the VF loss (foundation
# forward, second backward for its adaptive weight) costs 1.15-1.4x. Used by --estimate until a run folder has its
# own stats.jsonl.
TOKENIZER_SEC_PER_KIMG = {(c, vf): 26.0 if vf else 20.0 for c in CHANNELS for vf in (False, True)}
GENERATOR_SEC_PER_KIMG = 10.0  # the quick start's size on one thread (bench/yardstick_all.py's default)
SEC_PER_EVAL = 75.0  # 1,000 samples of Euler 20 and their features (bench/yardstick_all.py's default)
SEC_PER_RECON = 60.0  # rFID/PSNR/SSIM of 4,500 digits
DEFAULT_RUNS = ROOT / "runs" / "yardstick" / "tokenizers"
DEFAULT_RECON_IMAGES = 4500
SEC_PER_EXTRACT = 60.0  # 5,000 digits and their mirror images through the encoder
PIXEL_ROW = Row("lightningdit", ("experiment=yardstick_lightningdit",),
                "pixels (1 x 32 x 32, patch 4)", run_group="backbones")


@dataclass(frozen=True)
class Tokenizer:
    """One tokenizer row: f4, ``channels`` latent channels, with or without the VF loss against ``encoder``."""

    channels: int
    vf: bool
    encoder: str = DEFAULT_VF_ENCODER

    @property
    def base(self) -> str:
        return f"{'vavae' if self.vf else 'kl'}_f4d{self.channels}"

    @property
    def method(self) -> str:
        """Row name; a non-default VF encoder is part of it (its own folders and records)."""
        if not self.vf or self.encoder == DEFAULT_VF_ENCODER:
            return self.base
        return f"{self.base}-{self.encoder.removesuffix('-' + DATASET)}"

    @property
    def experiment(self) -> str:
        return f"yardstick_{self.base}"

    @property
    def preset(self) -> str:
        """The tokenizer preset the generator decodes with (the same network with or without the VF loss)."""
        return f"yardstick_kl_f4d{self.channels}"

    @property
    def label(self) -> str:
        vf = f", VF loss ({self.encoder})" if self.vf else ""
        return f"{'VA-VAE' if self.vf else 'KL'} f4d{self.channels}{vf} ({self.channels} x 8 x 8, patch 1)"


def tokenizers(vf_encoder: str = DEFAULT_VF_ENCODER) -> list[Tokenizer]:
    """The sweep in table order: every channel count without, then with the VF loss."""
    return [Tokenizer(c, vf, vf_encoder) for c in CHANNELS for vf in (False, True)]


def row_names(vf_encoder: str = DEFAULT_VF_ENCODER) -> list[str]:
    return ["pixels", *(t.method for t in tokenizers(vf_encoder))]


# ----------------------------------------------------------------------------------------------------------
# Runs and their paths


def _tok(args: argparse.Namespace, method: str) -> Tokenizer:
    return next(t for t in tokenizers(args.vf_encoder) if t.method == method)


def _root(args: argparse.Namespace) -> tuple[Path, str]:
    """The harness's (runs root, run group) for this bench's folders: ``--runs`` itself."""
    runs = args.runs.resolve()
    return runs.parent, runs.name


def tokenizer_run(args: argparse.Namespace, tok: Tokenizer) -> Run:
    """The tokenizer's ``train.py`` run (seed 0) through the harness (its command, lock, snapshots, s/kimg)."""
    overrides = [f"experiment={tok.experiment}"]
    if tok.vf:  # always explicit: a record never depends on the preset's default encoder
        overrides.append(f"method.foundation.name={tok.encoder}")
    root, group = _root(args)
    return Run(BENCH, Row(f"tok-{tok.method}", tuple(overrides), tok.label, run_group=group), 0,
               (float(args.tokenizer_kimg),), root)


def tokenizer_snapshot(args: argparse.Namespace, tok: Tokenizer) -> Path:
    """The final EMA snapshot of the tokenizer (the expected path while it is not trained yet)."""
    run = tokenizer_run(args, tok)
    snap = run.snapshot_at(args.tokenizer_kimg)
    return snap if snap is not None else run.run_dir / f"snapshot-{int(round(args.tokenizer_kimg * 1000)):09d}.safetensors"


def latents_dir(args: argparse.Namespace, tok: Tokenizer) -> Path:
    return args.runs.resolve() / f"latents-{tok.method}"


def generator_row(args: argparse.Namespace, method: str) -> Row:
    """The harness row of a generator: LightningDiT on pixels, or on a tokenizer's latents with patch 1."""
    if method == "pixels":
        if set(args.kimg) <= set(DEFAULT_KIMG):
            return PIXEL_ROW  # the backbone table's run (it has snapshots at every protocol point)
        return Row("pixels", PIXEL_ROW.overrides, PIXEL_ROW.label, run_group=_root(args)[1])
    tok = _tok(args, method)
    return Row(method, (
        "experiment=yardstick_lightningdit", "data=latents", f"data.dataset.root={rel_path(latents_dir(args, tok))}",
        f"data.name={DATASET}", "data.channels=1", "data.resolution=32", "data.num_classes=10", "data.hflip=false",
        f"tokenizer={tok.preset}", f"tokenizer.weights={rel_path(tokenizer_snapshot(args, tok))}",
        "model.patch_size=1"), tok.label, run_group=_root(args)[1])


def generator_run(args: argparse.Namespace, method: str, seed: int) -> Run:
    root = _root(args)[0]
    return Run(BENCH, generator_row(args, method), seed, tuple(args.kimg), root)


def make_bench(args: argparse.Namespace) -> Bench:
    """The harness's view of this bench (what ``run_worker`` needs: name, samplers, script)."""
    return Bench(name=BENCH, description=__doc__.split("\n\n")[0], rows=(), variants=(EULER20, QUICKSTART),
                 script=SCRIPT, kimg=DEFAULT_KIMG)


# ----------------------------------------------------------------------------------------------------------
# Preparation of a tokenizer row: train, measure, extract


def extract_command(args: argparse.Namespace, tok: Tokenizer) -> list[str]:
    return ["python", "-m", "scripts.extract_latents", f"data={DATASET}", f"tokenizer={tok.preset}",
            f"tokenizer.weights={rel_path(tokenizer_snapshot(args, tok))}", f"out={rel_path(latents_dir(args, tok))}"]


def recon_key(args: argparse.Namespace, tok: Tokenizer) -> str:
    return f"{BENCH}|recon|{tok.method}|k{args.tokenizer_kimg:g}|n{args.recon_images}"


def recon_command(args: argparse.Namespace, tok: Tokenizer) -> str:
    return shlex.join(["python", "-m", "eval", "recon", "--tokenizer", rel_path(tokenizer_snapshot(args, tok)),
                       "--dataset", DATASET, "--extractor", "yardstick", "--num-images", str(args.recon_images),
                       "--no-lpips"])


def stored_recon(args: argparse.Namespace, tok: Tokenizer, store: Store) -> dict[str, Any] | None:
    """The stored reconstruction record of the tokenizer, if it measured the snapshot on disk (its SHA-256; with no
    snapshot on disk yet, the record stands): a tokenizer trained again, in a checkout without ``runs/``, that came
    out different is measured again."""
    rec = store.get(recon_key(args, tok))
    if rec is None or args.refresh:
        return None
    snap = tokenizer_run(args, tok).snapshot_at(args.tokenizer_kimg)
    if snap is not None and rec.get("snapshot_sha256") != file_sha256(snap):
        print(f"[recon] {tok.method}: the stored record measured another snapshot than {rel_path(snap)}; measuring "
              "again", flush=True)
        return None
    return rec


def recon_record(args: argparse.Namespace, tok: Tokenizer, store: Store) -> dict[str, Any]:
    """rFID/PSNR/SSIM of the tokenizer's final EMA snapshot on the first ``--recon-images`` training digits."""
    key = recon_key(args, tok)
    rec = stored_recon(args, tok, store)
    if rec is not None:
        return rec
    from eval.__main__ import _tokenizer_spec
    from eval.classifier import load_dataset_tensors
    from eval.features import YardstickFeatures
    from eval.recon import reconstruction_metrics, tokenizer_roundtrip
    from gen.utils.build import build

    run = tokenizer_run(args, tok)
    snap = run.snapshot_at(args.tokenizer_kimg)
    assert snap is not None, f"no tokenizer snapshot in {run.run_dir}"
    net = build(_tokenizer_spec(str(snap), [])).eval().requires_grad_(False)
    images = load_dataset_tensors(DATASET, "train")[0][: args.recon_images]
    features = YardstickFeatures(DATASET, args.cache)
    t0 = time.time()
    m = reconstruction_metrics(tokenizer_roundtrip(net, seed=0), images, features, batch_size=args.batch_size,
                               allow_singular=len(images) <= features.dim)
    rec = {
        "kind": "recon", "key": key, "bench": BENCH, "method": tok.method, "label": tok.label, "seed": 0,
        "kimg": args.tokenizer_kimg, "channels": tok.channels, "vf": tok.vf, "vf_encoder": tok.encoder if tok.vf else None,
        "rfid": m["rfid"], "psnr": m["psnr"], "ssim": m["ssim"], "num_images": m["num_images"],
        "snapshot": rel_path(snap), "snapshot_sha256": file_sha256(snap), "seconds": time.time() - t0, "train": run.train_summary(args.tokenizer_kimg),
        "command": recon_command(args, tok), "train_command": shlex.join(run.train_command()).replace(str(ROOT) + "/", ""),
        "machine": machine(), "code": code_version(), "date": utc_now(),
    }
    store.put(rec)
    print(f"[recon] {tok.method}: rFID {m['rfid']:.2f}  PSNR {m['psnr']:.2f}  SSIM {m['ssim']:.3f}", flush=True)
    return rec


def prepare(args: argparse.Namespace, tok: Tokenizer, store: Store) -> None:
    """Train the tokenizer (or resume), store its reconstruction record, extract its latents; each step once."""
    run = tokenizer_run(args, tok)
    if not args.skip_train:
        run.train(args.threads)
    if run.snapshot_at(args.tokenizer_kimg) is None:
        raise RuntimeError(f"no tokenizer snapshot at {args.tokenizer_kimg:g} kimg in {run.run_dir} (--skip-train?)")
    recon_record(args, tok, store)
    if not (latents_dir(args, tok) / "stats.json").is_file():
        cmd = extract_command(args, tok)
        run_logged([sys.executable, *cmd[1:]], latents_dir(args, tok).with_suffix(".log"), args.threads, "extract")


def generate(args: argparse.Namespace, method: str, seed: int, store: Store) -> None:
    """One (row, seed) generator through the harness: train (or resume) and fill its missing records."""
    if method != "pixels":
        prepare(args, _tok(args, method), store)  # a no-op once the tokenizer worker finished
    hargs = copy.copy(args)
    hargs.runs = _root(args)[0]  # the harness puts a row's folder at <runs>/<run_group>/<method>-s<seed>
    hargs.kimg = ",".join(f"{k:g}" for k in args.kimg)  # the harness takes the command line's comma lists
    hargs.variants = ",".join(args.variants)
    hargs.seeds = ",".join(map(str, args.seeds))
    row = generator_row(args, method)
    # A snapshot's tokenizer weights path is never followed (gen.utils.ckpt.build_snapshot_tokenizer): the bench names
    # the tokenizer snapshot it trained, as a user does with sample.py tokenizer_weights=.
    tok_snap = None if method == "pixels" else tokenizer_run(args, _tok(args, method)).snapshot_at(args.tokenizer_kimg)
    before = {r.get("key"): r for r in store.records()}
    with tokenizer_weights(tok_snap):
        run_worker(make_bench(args), hargs, row, seed)
    # The harness writes the command of its own command line; a record here is recomputed by this script with the
    # tokenizer's settings and this bench's --runs. Records made now also name the tokenizer snapshot they decoded
    # with (a row's seeds must share one tokenizer: the table flags a row whose records name several).
    tok_sha = None if tok_snap is None else file_sha256(tok_snap)
    for rec in store.records():
        if (rec.get("kind", "eval") == "eval" and rec.get("method") == row.method and rec.get("seed") == seed
                and rec.get("key", "").startswith(f"{BENCH}|")):
            new = {**rec, "command": record_command(args, method, seed, rec["kimg"], rec["variant"])}
            if tok_sha is not None and before.get(rec["key"]) != rec:  # measured by this call
                new["tokenizer_sha256"] = tok_sha
            if new != rec:
                store.put(new)


def record_command(args: argparse.Namespace, method: str, seed: int, kimg: float, variant: str) -> str:
    """This script restricted to one record (add ``--refresh`` to recompute a stored one)."""
    parts = ["python", SCRIPT, f"--methods={method}", f"--seeds={seed}", f"--kimg={kimg:g}", f"--variants={variant}"]
    if method != "pixels":
        parts.append(f"--tokenizer-kimg={args.tokenizer_kimg:g}")
    if args.num_images != DEFAULT_NUM_IMAGES:
        parts.append(f"--num-images={args.num_images}")
    if args.recon_images != DEFAULT_RECON_IMAGES and method != "pixels":
        parts.append(f"--recon-images={args.recon_images}")
    if args.vf_encoder != DEFAULT_VF_ENCODER and method.startswith("vavae"):
        parts.append(f"--vf-encoder={args.vf_encoder}")
    if args.runs.resolve() != DEFAULT_RUNS:
        parts.append(f"--runs={rel_path(args.runs)}")
    return shlex.join(parts)


# ----------------------------------------------------------------------------------------------------------
# What is left: --estimate, --dry-run and the --jobs scheduler


@dataclass
class Task:
    """A worker: ``("tokenizer", method, None)`` or ``("generator", method, seed)``."""

    kind: str
    method: str
    seed: int | None
    seconds: float  # estimated work left
    commands: list[str]

    @property
    def name(self) -> str:
        return f"tok-{self.method}" if self.kind == "tokenizer" else f"{self.method}-s{self.seed}"


def _measured_sec_per_kimg(run: Run) -> float | None:
    """Median s/kimg in the run's stats.jsonl (this seed, else another seed of the same row)."""
    for d in [run.run_dir, *sorted(run.run_dir.parent.glob(f"{run.row.method}-s*"))]:
        stats = d / "stats.jsonl"
        if stats.is_file():
            vals = [json.loads(x).get("sec_per_kimg") for x in stats.read_text().splitlines() if x.strip()]
            vals = [v for v in vals if v]
            if vals:
                return float(statistics.median(vals))
    return None


def _sec_per_eval(store: Store) -> float:
    done = [r["eval_seconds"] for r in store.records() if r.get("kind", "eval") == "eval" and "eval_seconds" in r]
    return float(statistics.median(done)) if done else SEC_PER_EVAL


def eval_points(args: argparse.Namespace) -> list[tuple[float, Variant]]:
    """(kimg, sampler variant) of every evaluation a generator row gets: each chosen variant at its points."""
    return [(k, v) for v in make_bench(args).variants if v.name in args.variants
            for k in (args.kimg if v.at == "all" else (max(args.kimg),))]


def missing_evals(args: argparse.Namespace, method: str, seed: int, keys: set[str]) -> int:
    row = generator_row(args, method)
    return sum(_eval_key(BENCH, row, seed, k, v, args.num_images) not in keys for k, v in eval_points(args))


def backbone_records(args: argparse.Namespace, store: Store) -> list[dict[str, Any]]:
    """The pixels row's evaluations that the backbone table already holds, as records of this table.

    The pixels row is the backbone table's LightningDiT run (same overrides, snapshots, samplers, seeds and sample
    count, so the same record digest): a record stored there is this table's measurement too. Adopting it spares a
    checkout that kept ``bench/results`` but not ``runs/`` from training the run again only to measure it again.
    Each copy keeps its snapshot's SHA-256 and names its source in ``adopted_from``. None with ``--refresh``, or
    where the pixels row has its own folder (points outside the protocol's).
    """
    if args.refresh or "pixels" not in args.methods or generator_row(args, "pixels") is not PIXEL_ROW:
        return []
    source = Store(args.results / "backbones.json")
    out = []
    for seed in args.seeds:
        for k, v in eval_points(args):
            key = _eval_key(BENCH, PIXEL_ROW, seed, k, v, args.num_images)
            rec = source.get(_eval_key("backbones", PIXEL_ROW, seed, k, v, args.num_images))
            if rec is not None and store.get(key) is None:
                out.append({**rec, "key": key, "bench": BENCH, "adopted_from": rec["key"],
                            "command": record_command(args, "pixels", seed, k, v.name)})
    return out


def plan(args: argparse.Namespace, store: Store) -> list[Task]:
    """Every worker with work left, tokenizers first, then the generators seed-major, with its estimated seconds."""
    keys = {r.get("key") for r in store.records()} | {r["key"] for r in backbone_records(args, store)}
    per_eval = _sec_per_eval(store)
    tasks = []
    for m in args.methods:
        if m == "pixels":
            continue
        tok = _tok(args, m)
        run = tokenizer_run(args, tok)
        sec = run.remaining_kimg() * (_measured_sec_per_kimg(run) or TOKENIZER_SEC_PER_KIMG[(tok.channels, tok.vf)])
        cmds = [shlex.join(run.train_command()).replace(str(ROOT) + "/", "")] if run.remaining_kimg() else []
        if stored_recon(args, tok, store) is None:
            sec += SEC_PER_RECON
            cmds.append(recon_command(args, tok))
        if not (latents_dir(args, tok) / "stats.json").is_file():
            sec += SEC_PER_EXTRACT
            cmds.append(shlex.join(extract_command(args, tok)))
        if cmds:
            tasks.append(Task("tokenizer", m, None, sec, cmds))
    for s in args.seeds:
        for m in args.methods:
            run = generator_run(args, m, s)
            evals = missing_evals(args, m, s, keys) if not args.refresh else len(args.kimg) + 1
            if not evals:  # every record stored: the worker skips, trained or not
                continue
            kimg = run.remaining_kimg()
            spk = _measured_sec_per_kimg(run) or args.sec_per_kimg
            cmds = [shlex.join(run.train_command()).replace(str(ROOT) + "/", "")] if kimg else []
            cmds.append(f"# {evals} evaluations (Euler 20 at {','.join(f'{k:g}' for k in args.kimg)} kimg"
                        f"{', CFG 2 at the last' if 'qs' in args.variants else ''}) of {rel_path(run.run_dir)}")
            tasks.append(Task("generator", m, s, kimg * spk + evals * per_eval, cmds))
    return tasks


def estimate(tasks: Sequence[Task], jobs: int) -> float:
    """Seconds of wall time left: the work of every worker divided over the jobs (and never less than the longest
    tokenizer chain: a row's generators start after its tokenizer)."""
    total = sum(t.seconds for t in tasks)
    chain = max((t.seconds + max((g.seconds for g in tasks if g.kind == "generator" and g.method == t.method), default=0)
                 for t in tasks if t.kind == "tokenizer"), default=0.0)
    return max(total / max(jobs, 1), chain)


def _worker_argv(args: argparse.Namespace, task: Task) -> list[str]:
    out = [f"--methods={task.method}", f"--kimg={','.join(f'{k:g}' for k in args.kimg)}",
           f"--tokenizer-kimg={args.tokenizer_kimg:g}", f"--variants={','.join(args.variants)}",
           f"--num-images={args.num_images}", f"--recon-images={args.recon_images}", f"--runs={args.runs}",
           f"--results={args.results}", f"--threads={args.threads}", f"--batch-size={args.batch_size}",
           f"--cache={args.cache}", f"--vf-encoder={args.vf_encoder}", "--jobs=1", "--no-table"]
    out += [f"--seeds={task.seed}"] if task.kind == "generator" else ["--prepare-only"]
    return out + (["--skip-train"] if args.skip_train else []) + (["--refresh"] if args.refresh else [])


def worker_command(args: argparse.Namespace, task: Task) -> list[str]:
    """This script restricted to one worker (a tokenizer's preparation, or one (row, seed) generator)."""
    return [sys.executable, str(ROOT / SCRIPT), *_worker_argv(args, task)]


def run_jobs(tasks: Sequence[Task], args: argparse.Namespace) -> list[str]:
    """Run the workers ``--jobs`` at a time, each a single-threaded process; a generator waits for its tokenizer."""
    pending, running, done, failed = list(tasks), [], set(), []
    tokenizer_tasks = {t.method for t in tasks if t.kind == "tokenizer"}

    def ready(t: Task) -> bool:
        return t.kind == "tokenizer" or t.method not in tokenizer_tasks or f"tok-{t.method}" in done

    while pending or running:
        for t in [t for t in pending if t.kind == "generator" and f"tok-{t.method}" in failed]:
            pending.remove(t)
            failed.append(t.name)
            print(f"[worker] {t.name} skipped: its tokenizer failed", flush=True)
        while len(running) < args.jobs:
            nxt = next((t for t in pending if ready(t)), None)
            if nxt is None:
                break
            pending.remove(nxt)
            log = args.runs.resolve() / f"{nxt.name}.worker.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[worker] {nxt.name} started (log {rel_path(log)})", flush=True)
            fh = open(log, "a")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                       PYTHONPATH=str(ROOT))
            proc = subprocess.Popen(worker_command(args, nxt), cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
            running.append((nxt, proc, fh))
        if not running:
            break
        time.sleep(args.poll)
        for item in list(running):
            task, proc, fh = item
            if proc.poll() is None:
                continue
            fh.close()
            running.remove(item)
            print(f"[worker] {task.name} finished (exit {proc.returncode})", flush=True)
            (done.add(task.name) if proc.returncode == 0 else failed.append(task.name))
    return failed


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    ap = parser(make_bench(argparse.Namespace()))  # the harness's options (--seeds, --kimg, --jobs, --runs, ...)
    ap.description = __doc__.split("\n\n")[0]
    bench_seeds = ",".join(map(str, make_bench(argparse.Namespace()).seeds))  # every row has the bench's seeds
    ap.set_defaults(methods=",".join(row_names()), runs=DEFAULT_RUNS, timing="", seeds=bench_seeds)
    ap.add_argument("--tokenizer-kimg", type=float, default=DEFAULT_TOKENIZER_KIMG,
                    help="tokenizer training images (kimg; reconstruction has settled by then, bench/README.md)")
    ap.add_argument("--recon-images", type=int, default=DEFAULT_RECON_IMAGES, help="training digits for rFID/PSNR/SSIM")
    ap.add_argument("--vf-encoder", default=DEFAULT_VF_ENCODER,
                    help="foundation encoder of the VF loss (method.foundation.name), e.g. foundation2-mnist5k")
    ap.add_argument("--sec-per-kimg", type=float, default=GENERATOR_SEC_PER_KIMG,
                    help="generator s/kimg for --estimate where no run has measured it")
    ap.add_argument("--estimate", action="store_true", help="print the estimated seconds left and stop")
    ap.add_argument("--dry-run", action="store_true", help="print the commands left and stop")
    ap.add_argument("--prepare-only", action="store_true", help="(worker) train, measure and extract the tokenizers")
    ap.add_argument("--table-only", action="store_true", help="print the table from the stored records")
    ap.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    args.runs, args.results = args.runs.resolve(), args.results.resolve()
    args.cache = str(Path(args.cache).resolve())
    try:
        args.kimg = tuple(sorted(float(k) for k in args.kimg.split(",") if k.strip()))
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as e:
        ap.error(f"--kimg and --seeds take comma lists of numbers ({e})")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    known = row_names(args.vf_encoder)
    bad = [m for m in args.methods if m not in known]
    bad += [v for v in args.variants if v not in {x.name for x in make_bench(args).variants}]
    if bad:
        ap.error(f"unknown rows or variants {bad}; rows: {known}; variants: euler20, qs")
    os.chdir(ROOT)  # the commands and the records name paths relative to the repository root
    store = Store(args.results / f"{BENCH}.json")
    if args.table_only:
        print(tokenizer_table({BENCH: store.records()}, BENCH))
        return 0
    if args.estimate or args.dry_run:
        tasks = plan(args, store)
        seconds = estimate(tasks, args.jobs)
        for t in tasks:
            print(f"{t.name:36s} est. {t.seconds / 60:7.1f} min")
            if args.dry_run:
                print("\n".join("    " + c for c in t.commands))
        print(f"[estimate] {len(tasks)} workers, {sum(t.seconds for t in tasks) / 3600:.2f} h of work, "
              f"{seconds / 3600:.2f} h with {args.jobs} jobs")
        print(f"ESTIMATE_SECONDS={int(round(seconds))}", flush=True)
        return 0
    for rec in backbone_records(args, store):
        store.put(rec)
        print(f"[adopt] {rec['key']} from the backbone table's {rec['adopted_from']}", flush=True)
    import torch

    torch.set_num_threads(args.threads)
    failed: list[str] = []
    if args.jobs > 1:
        failed = run_jobs(plan(args, store), args)
    else:
        for m in args.methods:  # tokenizers first, then one seed of every row, then the next
            if m != "pixels":
                prepare(args, _tok(args, m), store)
        if not args.prepare_only:
            for s in args.seeds:
                for m in args.methods:
                    generate(args, m, s, store)
    if not args.no_table:
        print(tokenizer_table({BENCH: store.records()}, BENCH))
    if failed:
        print(f"[{BENCH}] failed: {failed} (see their worker logs in {rel_path(args.runs)}); re-run to retry")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
