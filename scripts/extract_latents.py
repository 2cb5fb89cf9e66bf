"""Encode a dataset into latent shards (``data=latents`` reads them), on one or several processes.

Examples (run from the repository root):
    python -m scripts.extract_latents data=shapes tokenizer=sd_vae_ema tokenizer.weights=/models/sd-vae-ft-ema
    python -m scripts.extract_latents data=imagefolder data.dataset.root=/data/imagenet/train \\
        tokenizer=vavae_f16d32 out=/data/latents/in256_vavae images=true
    torchrun --nproc_per_node=8 -m scripts.extract_latents ...   # gloo on CPU, NCCL on GPUs
    python -m scripts.extract_latents --cfg job                   # print the composed config

Each shard is written atomically by one process (shard k on rank k mod N); re-running the same command after
an interruption writes only the missing shards, and the result does not depend on N. The folder receives
``manifest.json``, ``shard-*.safetensors`` and, when complete, ``stats.json`` (per-channel mean/std).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gen.data.latents import extract_latents
from gen.utils import dist
from gen.utils.build import build
from gen.utils.cli import output_dir, run_hydra_entry, run_main
from gen.utils.config import ConfigError

KEYS = {"paths", "data", "tokenizer", "out", "seed", "shard_size", "batch_size", "images", "workers", "device"}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build the dataset and tokenizer from ``cfg`` and extract; returns a summary."""
    unknown = set(cfg.keys()) - KEYS
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {sorted(unknown)}; known: {sorted(KEYS)}")
    try:
        c = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config does not resolve: {e}") from e
    def progress(done: int, total: int) -> None:
        if done % 10 == 0 or done == total:
            dist.print0(f"[extract] rank 0: {done}/{total} of its shards done")

    # A file, a read-only folder or a full disk fails now, on every process (no one waits on a failed one); a
    # folder made here goes again when the data or tokenizer is refused before anything is written into it.
    with output_dir(c["out"], "out="):
        dataset = build(c["data"]["dataset"])
        tokenizer = build(c["tokenizer"])
        device = None if c["device"] == "auto" else c["device"]
        start = time.perf_counter()
        out = extract_latents(
            dataset, tokenizer, c["out"], shard_size=c["shard_size"], batch_size=c["batch_size"], seed=c["seed"],
            store_images=c["images"], workers=c["workers"], device=device, on_shard=progress,
        )
    seconds = time.perf_counter() - start
    summary = {"out": str(out), "images": len(dataset), "seconds": round(seconds, 2),
               "images_per_s": round(len(dataset) / max(seconds, 1e-9), 2)}
    dist.print0(f"[extract] {summary}")
    return summary


PROG = "extract_latents"


def main_checked(cfg: DictConfig) -> int:
    """Extract with expected errors as one line (``extract_latents: error: ...``, exit status 2): bad settings,
    untrusted shards or statistics, and a full disk or unwritable folder, named with the file."""
    return run_main(lambda: (run(cfg), 0)[1], PROG)


@hydra.main(config_path="../configs", config_name="extract", version_base="1.3")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    dist.init_distributed()
    code = main_checked(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    run_hydra_entry(main)
