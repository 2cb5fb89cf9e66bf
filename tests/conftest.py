"""Shared test helpers and fixtures: a free TCP port for torchrun, running ``train.py`` as a subprocess on a very
small model, and a teacher snapshot trained once per session (for the student examples)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs"
# A very small model and run: 2 blocks of width 64 on 32x32 digits, 16 steps of 32 images.
SMALL = [
    "model.depth=2", "model.hidden_size=64", "model.num_heads=2",
    "trainer.batch_size=32", "trainer.total_kimg=0.512", "trainer.lr_warmup_kimg=0.064",
    "trainer.status_kimg=0.064", "trainer.checkpoint_kimg=0.128", "trainer.snapshot_kimg=0.256",
    "trainer.progress=false", "trainer.tensorboard=false",
    "preview.images=0", "eval=none",
]


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``-n 2``: one test process per core), each test process computes on one thread, so the
    processes do not fight over the cores (torch would start one thread per core in each)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


def free_port() -> int:
    """A TCP port that is free now (bound by the OS, then released), for ``torchrun --master_port``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(procs: int = 2) -> list[str]:
    """The launcher prefix for ``procs`` local processes on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", f"--master_port={free_port()}"]


def subprocess_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    return env


def train_command(runs: Path, name: str, extra: Sequence[str] = (), small: Sequence[str] | None = None) -> list[str]:
    """``python train.py`` into ``runs/name`` on the SMALL setup (or ``small``) plus ``extra``."""
    return [sys.executable, "train.py", f"paths.runs={runs}", f"name={name}", *(SMALL if small is None else small), *extra]


class Background:
    """A command running beside the test (output in ``<log>``); ``wait()`` returns the output, failing on an error.

    The SIGKILL tests train their uninterrupted reference this way while the killed run runs, so the two share the
    machine's cores instead of running one after the other."""

    def __init__(self, cmd: Sequence[str], log: Path, threads: int = 1) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log, self.cmd = log, list(cmd)
        with open(log, "w") as out:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=subprocess_env(threads), stdout=out,
                                         stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 600) -> str:
        code = self.proc.wait(timeout=timeout)
        text = self.log.read_text()
        if code != 0:
            raise AssertionError(f"{' '.join(self.cmd[1:3])} failed ({code}):\n{text[-5000:]}")
        return text


def kill_mid_run(cmd: Sequence[str], run: Path, at_nimg: int, timeout: float = 300) -> int:
    """Start ``cmd`` (training into ``run``) and SIGKILL it as soon as a training state of at least ``at_nimg`` images
    exists: mid-run, possibly mid-write of the next file. Returns the newest state's image count after the kill.

    Fails when the run ended (or never got there) before it could be killed: make the run longer."""
    from gen.utils.ckpt import list_training_states

    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        states = list_training_states(run)
        if states and states[-1][0] >= at_nimg:
            break
        time.sleep(0.05)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, "training finished (or failed) before it could be killed; make the run longer"
    return list_training_states(run)[-1][0]



def run_train(runs: Path, name: str, extra: Sequence[str] = (), check: bool = True,
              launcher: list[str] | None = None, threads: int = 1) -> subprocess.CompletedProcess:
    """``train.py`` on the SMALL setup (plus ``extra``) into ``runs/name``; raises with its output on failure."""
    cmd = (launcher or [sys.executable]) + ["train.py", f"paths.runs={runs}", f"name={name}", *SMALL, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(threads), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def example(method: str, *extra: str) -> list[str]:
    """Overrides that train an example method of tests/ (its config in tests/configs)."""
    return [f"hydra.searchpath=[file://{CONFIGS}]", f"method={method}", "packages=[tests]", *extra]


@pytest.fixture(scope="session")
def teacher_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the diffusion method on the SMALL setup (0.256 kimg), the teacher of the student examples."""
    runs = tmp_path_factory.mktemp("teacher")
    run_train(runs, "teacher", ["trainer.total_kimg=0.256"])
    return sorted((runs / "teacher").glob("snapshot-*.safetensors"))[-1]


def sample_four(run: Path, out: Path) -> Any:
    """``python sample.py snapshot=<run> outdir=<out> seeds=0-3`` with no sampler flag (the snapshot's own); asserts
    exit 0 and returns the samples (4, H, W, C) uint8 from ``samples.npz``."""
    import numpy as np

    proc = subprocess.run([sys.executable, "sample.py", f"snapshot={run}", f"outdir={out}", "seeds=0-3"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        return f["arr_0"]

