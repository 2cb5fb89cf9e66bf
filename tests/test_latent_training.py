"""Latent training end to end on a small image folder: extract -> train (1 and 2 processes) -> sample.py -> eval.

The tokenizer is a tiny seeded KL autoencoder (tests/configs/tokenizer/kl_tiny.yaml) standing in for SD-VAE /
VA-VAE: extraction stores its posterior samples and the images, training reads the shards (per-channel
statistics applied and carried into the snapshot), sampling decodes with the snapshot's own tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gen.data.shapes import Shapes
from gen.utils.ckpt import list_training_states, load_snapshot, load_training_state
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
SEARCH = f"hydra.searchpath=[file://{ROOT / 'tests' / 'configs'}]"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def _run(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run((launcher or [sys.executable]) + args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{args[:2]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _folder(root: Path, per_class: int = 12) -> Path:
    shapes = Shapes(count=2 * per_class, seed=5, resolution=32)
    images, labels = shapes.tensors()
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / f"class{int(y) % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:03d}.png")
    return root


def test_extract_train_sample_eval_on_latents(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "images")
    shards = tmp_path / "latents"
    data = ["data=imagefolder", f"data.dataset.root={folder}", "data.resolution=32", "data.name=tiny",
            "data.num_classes=2"]
    _run(["-m", "scripts.extract_latents", SEARCH, *data, "tokenizer=kl_tiny", f"out={shards}", "shard_size=8",
          "images=true", "device=cpu"])
    assert (shards / "stats.json").is_file() and len(list(shards.glob("shard-*.safetensors"))) == 3

    train = ["train.py", SEARCH, "data=latents", f"data.dataset.root={shards}", "data.name=tiny", "data.resolution=32",
             "data.channels=3", "data.num_classes=2", "tokenizer=kl_tiny", f"paths.runs={tmp_path / 'runs'}",
             "model.depth=2", "model.hidden_size=64", "model.num_heads=2", "model.patch_size=4", "optim=sgd",
             "trainer.batch_size=8", "trainer.total_kimg=0.008", "trainer.lr_warmup_kimg=0", "trainer.grad_clip=null",
             "trainer.status_kimg=0.008", "trainer.checkpoint_kimg=0.008", "trainer.snapshot_kimg=0.008",
             "trainer.progress=false", "trainer.tensorboard=false", "preview.images=0", "eval=none"]
    _run([*train, "name=one"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    _run([*train, "name=two"], launcher=torchrun)
    one, two = (load_training_state(list_training_states(tmp_path / "runs" / n)[-1][1])["registry"] for n in
                ("one", "two"))
    diff = max(float((one["module.net"][k] - two["module.net"][k]).abs().max()) for k in one["module.net"])
    assert diff <= 1e-6, f"2 processes differ from 1 by {diff} after one step on latents"

    snap = sorted((tmp_path / "runs" / "one").glob("snapshot-*.safetensors"))[-1]
    _, meta = load_snapshot(snap)
    stats = json.loads((shards / "stats.json").read_text())
    # The extraction's per-channel statistics ride in the snapshot (float32 in the tokenizer).
    np.testing.assert_allclose(meta["tokenizer"]["mean"], stats["mean"], rtol=1e-6)
    np.testing.assert_allclose(meta["tokenizer"]["std"], stats["std"], rtol=1e-6)
    out = tmp_path / "samples"
    _run(["sample.py", f"snapshot={snap}", f"outdir={out}", "seeds=0-7", "sampler.steps=4"])
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (8, 32, 32, 3) and f["arr_0"].dtype == np.uint8

    ref = tmp_path / "ref.npz"
    _run(["-m", "eval", "ref", "--dataset", "shapes", "--extractor", "yardstick",
          "--cache-dir", str(ROOT / ".cache" / "yardstick"), "--out", str(ref)])
    proc = _run(["-m", "eval", "npz", str(out / "samples.npz"), "--ref", str(ref), "--allow-singular",
                 "--cache-dir", str(ROOT / ".cache" / "yardstick")])
    metrics = json.loads(proc.stdout)
    assert metrics["num_images"] == 8 and np.isfinite(metrics["fid"])
    assert torch.isfinite(torch.tensor(metrics["fid"]))
