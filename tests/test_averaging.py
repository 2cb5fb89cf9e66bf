"""Checkpoint averaging: the combiner (streamed float64 sum of saved checkpoints, written as a snapshot)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gen.averaging import combine, read_weights
from gen.utils.ckpt import CheckpointError, file_sha256, load_snapshot, save_snapshot, save_training_state
from gen.utils.finite import NonFiniteError

SHAPES = {"w": (4, 3), "b": (3,), "norm.scale": (5,)}
META = {"model": {"_target_": "gen.models.dit.DiT", "depth": 1}, "data": {"name": "digits"}, "ema": "d0.9"}


def _weights(seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    out["step_count"] = torch.tensor([seed], dtype=torch.int64)  # an integer buffer: copied, never averaged
    return out


def _snapshots(folder: Path, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        p = folder / f"snap{i}.safetensors"
        save_snapshot(p, _weights(i), {**META, "nimg": i})
        paths.append(p)
    return paths


def test_streamed_sum_equals_in_memory_sum_and_records_sources(tmp_path: Path) -> None:
    paths = _snapshots(tmp_path, 4)
    alphas = [0.7, -0.4, 1.5, -0.8]
    out = tmp_path / "avg.safetensors"
    got = combine(paths, alphas, paths[-1], out, averaging={"method": "test", "name": "lincomb"},
                  buffers=["norm.scale"])
    every = [_weights(i) for i in range(4)]
    for k in ("w", "b"):
        want = sum(a * w[k].double() for a, w in zip(alphas, every)).float()  # all n models at once, same order
        assert torch.equal(got[k], want), k
    assert torch.equal(got["norm.scale"], every[-1]["norm.scale"])  # buffers from the reference
    assert torch.equal(got["step_count"], every[-1]["step_count"])
    tensors, meta = load_snapshot(out)
    assert all(torch.equal(tensors[k], got[k]) for k in got)
    assert meta["model"] == META["model"] and meta["ema"] == "lincomb"
    rec = meta["averaging"]
    assert [s["coefficient"] for s in rec["sources"]] == alphas
    assert [s["name"] for s in rec["sources"]] == [p.name for p in paths]
    assert [s["sha256"] for s in rec["sources"]] == [file_sha256(p) for p in paths]
    assert rec["reference"]["sha256"] == file_sha256(paths[-1]) and rec["method"] == "test"
    assert not list(tmp_path.glob(".tmp-*"))


def test_training_states_are_sources_too(tmp_path: Path) -> None:
    snaps = _snapshots(tmp_path, 2)
    states = []
    for i in range(2):
        p = tmp_path / f"state-{i:09d}.pt"
        save_training_state(p, {"registry": {"module.net": _weights(i), "counters": {"nimg": i}}})
        states.append(p)
    got = combine(states, [0.25, 0.75], snaps[0], None)
    want = combine(snaps, [0.25, 0.75], snaps[0], None)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(CheckpointError, match=r"state-000000000.pt holds no 'ema.x'.*--state-key"):
        read_weights(states[0], "ema.x")


def test_refuses_another_model_naming_the_file(tmp_path: Path) -> None:
    paths = _snapshots(tmp_path, 2)
    other = tmp_path / "other.safetensors"
    save_snapshot(other, _weights(5, {**SHAPES, "w": (4, 4)}), META)
    with pytest.raises(CheckpointError, match=r"other.safetensors is a checkpoint of another model .*shapes.*one run"):
        combine([paths[0], other], [0.5, 0.5], paths[0], tmp_path / "x.safetensors")
    fewer = tmp_path / "fewer.safetensors"
    save_snapshot(fewer, {k: v for k, v in _weights(6).items() if k != "b"}, META)
    with pytest.raises(CheckpointError, match=r"fewer.safetensors .* lacks b"):
        combine([paths[0], fewer], [0.5, 0.5], paths[0], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_refuses_non_finite_coefficients_and_weights(tmp_path: Path) -> None:
    paths = _snapshots(tmp_path, 2)
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"coefficient of .*snap1.safetensors is nan; .*finite"):
        combine(paths, [1.0, float("nan")], paths[0], out)
    with pytest.raises(ValueError, match=r"1 coefficients for 2 checkpoints"):
        combine(paths, [1.0], paths[0], out)
    bad = _weights(3)
    bad["w"][0, 0] = float("inf")
    save_snapshot(tmp_path / "inf.safetensors", bad, META)
    with pytest.raises(NonFiniteError, match=r"inf.safetensors holds non-finite weights \(w"):
        combine([paths[0], tmp_path / "inf.safetensors"], [0.5, 0.5], paths[0], out)
    with pytest.raises(NonFiniteError, match="the combination of 2 checkpoints has non-finite weights"):
        combine(paths, [1e300, -1e300 / 3], paths[0], out)
    assert not out.exists()
