"""SLURM through Hydra's submitit launcher: the preset composes, and sample.py runs under submitit's local executor.

Needs ``hydra-submitit-launcher`` (requirements.txt); skipped where it is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

from tests.test_convert import run_cli, write_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_slurm_preset_composes() -> None:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=["hydra/launcher=slurm", "snapshot=x"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.signal_delay_s, launcher.max_num_timeout) == (8, 8, 120, 20)


def test_sample_py_under_submitit_local(tmp_path: Path) -> None:
    from tokenizers.kl import AutoencoderKLTokenizer

    tok = AutoencoderKLTokenizer(block_out_channels=(32, 32), latent_channels=4, seed=3)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tok.vae.state_dict().items()}, str(tmp_path / "tok.safetensors"))
    spec = tmp_path / "tok.json"
    spec.write_text('{"_target_": "tokenizers.kl.AutoencoderKLTokenizer", "block_out_channels": [32, 32], '
                    f'"latent_channels": 4, "weights": "{tmp_path / "tok.safetensors"}"}}')
    snap = tmp_path / "snap.safetensors"
    assert run_cli("sit", write_checkpoint("sit", tmp_path / "sit.pt"), snap, spec) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "sample.py", "-m", "hydra/launcher=submitit_local", f"snapshot={snap}", "seeds=0-2",
           f"tokenizer_weights={tmp_path / 'tok.safetensors'}",
           f"outdir={tmp_path / 'out'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.launcher.timeout_min=10"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(tmp_path / "out" / "samples.npz")["arr_0"].shape == (3, 16, 16, 3)
    logs = list((tmp_path / "sweep" / ".submitit").rglob("*_log.out"))
    assert logs, "submitit wrote no job log: the job did not run through the launcher"
