"""The ECT-from-EDM2-S preset (configs/experiment/ect_in64_edm2s.yaml): it composes with the recipe's values, and on
a tiny EDM2 U-Net (configs/model/tiny_edm2.yaml) train.py trains an EDM teacher (objective=edm), tunes it with ECT
for a few steps through the preset, and sample.py draws 2-step samples from the result with no sampler flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open

from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]

TINY_RUN = [
    "model=tiny_edm2", "data.resolution=16", "data.num_classes=2", "trainer.batch_size=8",
    "trainer.total_kimg=0.032", "trainer.status_kimg=0.016", "trainer.checkpoint_kimg=0.032",
    "trainer.snapshot_kimg=0.032", "trainer.progress=false", "trainer.tensorboard=false", "preview.images=0",
    "eval=none", "trainer.grad_clip=null",
]


def test_preset_composes_with_the_recipe() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        c = OmegaConf.to_container(compose(config_name="train", overrides=["experiment=ect_in64_edm2s"]), resolve=True)
    assert c["model"]["_target_"] == "gen.models.edm2.EDM2UNet" and c["model"]["model_channels"] == 192
    assert (c["model"]["dropout"], c["model"]["dropout_res"]) == (0.4, 16)
    obj = c["objective"]
    assert (obj["teacher"], obj["weighting"], obj["p_mean"], obj["p_std"]) == ("edm", "edm", -0.8, 1.6)
    assert (obj["q"], obj["k"], obj["b"], obj["huber_c"], obj["stage_kimg"]) == (4.0, 8.0, 1.0, 0.06, 3200)
    assert c["sampler"]["steps"] == 2 and c["sampler"]["grid"]["sigmas"] == [1.526]
    t = c["trainer"]
    assert (t["batch_size"], t["total_kimg"], t["lr_decay"], t["lr_ref_kimg"], t["lr_warmup_kimg"]) == (
        128, 12800, "inv_sqrt", 256, 0)
    assert (c["optim"]["lr"], c["optim"]["betas"], c["optim"]["weight_decay"]) == (1e-3, [0.9, 0.99], 0.0)
    assert c["data"]["name"] == "imagenet64" and c["data"]["resolution"] == 64 and not c["data"]["hflip"]


def _image_folder(root: Path) -> Path:
    """Two class folders of eight 20x20 RGB images (cropped to 16 by the loader)."""
    rng = np.random.default_rng(0)
    for k in range(2):
        (root / f"class{k}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / f"class{k}" / f"{i}.png")
    return root


def _train(runs: Path, name: str, extra: list[str]) -> Path:
    cmd = [sys.executable, "train.py", f"paths.runs={runs}", f"name={name}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return sorted((runs / name).glob("snapshot-*.safetensors"))[-1]


def test_tiny_edm2_trains_edm_then_ect_through_the_preset_and_samples(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "imagenet64")
    data = ["data=imagefolder", f"data.dataset.root={folder}", "data.name=imagenet64", "data.hflip=false"]
    teacher = _train(tmp_path / "runs", "edm2_teacher",
                     [*data, "objective=edm", "sampler=heun_edm2_img64", "sampler.steps=2", *TINY_RUN])
    ect = _train(tmp_path / "runs", "ect_edm2", ["experiment=ect_in64_edm2s", f"data.dataset.root={folder}",
                                                   f"trainer.init={{net: {teacher}}}", *TINY_RUN])
    stats = [json.loads(line) for line in (tmp_path / "runs" / "ect_edm2" / "stats.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in stats if "loss" in s]
    assert losses and all(np.isfinite(losses))
    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, "sample.py", f"snapshot={ect}", f"outdir={out}", "seeds=0-3"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        arr = f["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.std() > 0
    with safe_open(str(ect), "pt") as f:  # the snapshot records the preset's 2-step sampler and an EDM2 network
        meta = json.loads(f.metadata()["config"])
    assert meta["sampler"]["grid"]["sigmas"] == [1.526] and meta["prediction"]["prediction"] == "consistency"
    assert meta["model"]["_target_"] == "gen.models.edm2.EDM2UNet" and meta["model"]["dropout_res"] == 16
