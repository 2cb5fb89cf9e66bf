"""bench/gpu.py without a GPU: the tiny CPU smoke run (every code path), the no-CUDA refusal, the FLOP formula."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


gpu = _load()


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    proc = _run("--device", "cpu", "--tiny", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = json.loads(out.read_text())["records"]
    assert len(records) == 1
    return records[0], proc.stdout, out


def _positive(x: Any, where: str) -> None:
    assert isinstance(x, float | int) and math.isfinite(x) and x > 0, f"{where}: {x!r}"


def test_tiny_run_record_structure(tiny_record: tuple[dict[str, Any], str, Path]) -> None:
    rec, _, _ = tiny_record
    assert rec["kind"] == "gpu" and rec["tiny"] is True and rec["batch"] == 2
    assert {"torch", "diffusers", "gpu", "peak_bf16_tflops"} <= set(rec["machine"]) and rec["code"]
    assert rec["command"].startswith("python bench/gpu.py") and "--tiny" in rec["command"]
    assert [r["row"] for r in rec["train"]] == ["DiT-XL/2 4x32x32 (tiny)", "LightningDiT-XL/1 32x16x16 (tiny)"]
    for r in rec["train"]:
        for mode in ("eager", "compile"):
            cell = r[mode]
            _positive(cell["ratio"], f"{r['row']} {mode} ratio")
            assert len(cell["ratio_reps"]) >= 2
            for who in ("ours", "diffusers"):
                c = cell[who]
                for k in ("img_per_s", "warmup_s", "fwd_gflop_per_image", "train_tflop_per_s"):
                    _positive(c[k], f"{r['row']} {mode} {who} {k}")
                assert len(c["img_per_s_reps"]) >= 2 and all(v > 0 for v in c["img_per_s_reps"])
                assert c["mfu"] is None and c["peak_mem_gib"] is None  # CPU: no peak FLOP/s, no CUDA counters
    for s in rec["sampling"]:
        _positive(s["img_per_s"], s["row"])
        assert s["nfe"] == 2 * s["steps"] and s["cfg"] == 1.5
    _positive(rec["fid"]["img_per_s"], "fid")
    assert rec["fid"]["extractor"] == "inception-v3-pool3" and rec["fid"]["weights"].startswith("random")
    assert any("MFU omitted" in n for n in rec["notes"]) and any("random weights" in n for n in rec["notes"])


def test_tiny_run_prints_tables(tiny_record: tuple[dict[str, Any], str, Path]) -> None:
    rec, stdout, out = tiny_record
    assert "| backbone | mode | ours img/s |" in stdout and "| inception-v3-pool3 | random |" in stdout
    assert stdout.count("| eager |") == 2 and stdout.count("| compile |") == 2
    assert gpu.markdown(rec) in stdout
    assert gpu.main(["--print", str(out)]) == 0


def test_refuses_without_cuda_in_one_line() -> None:
    proc = _run(env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--device cpu --tiny" in lines[0]


def test_cpu_needs_tiny() -> None:
    assert gpu.refuse(gpu.parse(["--device", "cpu"])) is not None
    assert gpu.refuse(gpu.parse(["--device", "cpu", "--tiny"])) is None


@pytest.mark.parametrize("row", [0, 1])
@pytest.mark.parametrize("over", [{}, {"hidden_size": 96, "num_heads": 4, "depth": 3, "wo_shift": True},
                                  {"learn_sigma": True, "mlp_ratio": 2.0}])
def test_forward_flops_equal_a_counted_forward(row: int, over: dict[str, Any]) -> None:
    """The analytic count equals FlopCounterMode's (matmuls, convolutions, attention through the math kernel,
    which the counter sees as two batched matmuls) on small configs of both backbones."""
    cfg = {**gpu.backbones(True)[row].config, **over}
    net = gpu.build(cfg).eval()
    B, C, R = 2, cfg["in_channels"], cfg["input_size"]
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        net(torch.randn(B, C, R, R), torch.rand(B), torch.zeros(B, dtype=torch.long))
    counted = counter.get_total_flops() / B
    assert counted == pytest.approx(gpu.forward_flops(cfg), rel=0.01)


def test_forward_flops_of_dit_xl2_match_the_paper() -> None:
    """DiT-XL/2 on 4x32x32: 118.6 GFLOPs in the DiT paper (Table 4; one FLOP per multiply-add) = 237.2 GFLOP here."""
    dit, ldit = gpu.backbones(False)
    assert gpu.forward_flops(dit.config) / 2 == pytest.approx(118.6e9, rel=1e-3)
    assert gpu.forward_flops(ldit.config) == pytest.approx(gpu.forward_flops(dit.config), rel=1e-3)  # 256 tokens each


@pytest.mark.parametrize("name, table, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4), ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.0), ("NVIDIA H200", "H200", 989.4), ("NVIDIA GH200 480GB", "GH200", 989.4),
    ("NVIDIA A100-SXM4-80GB", "A100", 312.0), ("NVIDIA A100 80GB PCIe", "A100", 312.0),
])
def test_peak_table(name: str, table: str, tflops: float) -> None:
    assert gpu.peak_bf16(name) == (table, pytest.approx(tflops * 1e12))


def test_unknown_gpu_has_no_peak() -> None:
    assert gpu.peak_bf16("NVIDIA GeForce RTX 4090") == (None, None)


class _FakeCudaClock:
    """CUDA's memory counters, scripted: another model holds 1000 bytes, ours 400 of weights, 100 of optimizer state
    allocated by its first step, and each step needs ``transient`` more for a moment."""

    cuda = True

    def __init__(self) -> None:
        self.alloc, self.high, self.transient = 1000, 0, 50

    def now(self) -> float:
        return 0.0

    def allocated(self) -> int:
        return self.alloc

    def reset_peak(self) -> None:
        self.high = self.alloc

    def peak(self) -> int:
        return self.high


def test_peak_memory_is_the_models_own() -> None:
    """Peak = weights + optimizer state (not the other model's) + the largest transient of one step, per mode."""
    clock = _FakeCudaClock()
    first = [True]

    def step() -> None:
        if first[0]:
            clock.alloc += 100
            first[0] = False
        clock.high = max(clock.high, clock.alloc + clock.transient)

    tr = gpu.Trainee("ours", torch.nn.Linear(1, 1), step, 2, alloc_before=clock.alloc)
    clock.alloc += 400  # the model is built
    gpu.warm_up(tr, "eager", 3, clock)
    clock.transient = 70
    gpu.warm_up(tr, "compile", 3, clock)
    assert tr.static_bytes == 500 and tr.peak_bytes == {"eager": 550, "compile": 570}
    tr.mode = "compile"
    summary = gpu._summary(tr, [1.0, 3.0], 0.0, 1e9, 1e12, cuda=True)
    assert summary["peak_mem_gib"] == 570 / 2**30 and summary["img_per_s"] == 2.0 and summary["mfu"] == pytest.approx(2.0 * 3 * 1e9 / 1e12)
