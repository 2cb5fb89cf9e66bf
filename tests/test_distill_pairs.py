"""Teachers and noise-image pairs (distill/teacher.py, distill/pairs.py).

Covers: the teacher's refusals (missing, non-finite, another data set, resolution or prediction kind); pair shards
identical for batch sizes 4 and 16 and for 1 and 2 processes (torchrun, gloo), and equal to the teacher's own sample
from the same seed; a pair run SIGKILLed mid-way and re-run equals the uninterrupted one; the manifest's teacher
identity; the dataset's refusal of pairs made by another teacher, and of an incomplete folder; the command's one-line
errors.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.pairs import PairsConfig, PairShards, make_pairs, shard_name
from distill.teacher import TeacherError, check_teacher, load_teacher, open_teacher
from gen.utils.ckpt import file_sha256, load_snapshot, save_snapshot
from gen.utils.finite import NonFiniteError
from gen.utils.seed import PerImageRandom
from tests.conftest import ROOT, subprocess_env, torchrun


def edited_teacher(src: Path, dst: Path, tensors_fn=None, config_fn=None) -> Path:  # noqa: ANN001
    """A copy of a snapshot with its tensors and/or metadata edited."""
    tensors, config = load_snapshot(src)
    if tensors_fn is not None:
        tensors = tensors_fn(tensors)
    if config_fn is not None:
        config = config_fn(config)
    save_snapshot(dst, tensors, config)
    return dst


def _pairs(teacher: Path, out: Path, **kw) -> Path:  # noqa: ANN003
    make_pairs(PairsConfig(teacher=str(teacher), out=str(out), **{"num": 20, "shard_size": 8, "steps": 3,
                                                                 "device": "cpu", **kw}))
    return out


def _shards(out: Path) -> dict[str, torch.Tensor]:
    files = sorted(out.glob("pairs-*.safetensors"))
    parts = [load_file(str(f)) for f in files]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_teacher_refusals(tmp_path: Path, teacher_snapshot: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_teacher(tmp_path / "missing.safetensors")
    nan = edited_teacher(teacher_snapshot, tmp_path / "nan.safetensors",
                         tensors_fn=lambda t: {k: v.fill_(float("nan")) if i == 0 else v for i, (k, v) in enumerate(t.items())})
    with pytest.raises(NonFiniteError, match="non-finite"):
        open_teacher(nan)
    cfg = open_teacher(teacher_snapshot).config
    ok = dict(data_name="mnist5k", resolution=32, channels=1, kinds=("flow",), method="reflow")
    assert check_teacher(cfg, "t", **ok) == "flow"
    for key, value in (("data_name", "shapes"), ("resolution", 64), ("channels", 3)):
        with pytest.raises(TeacherError, match=f"data {key.replace('data_', '')}="):
            check_teacher(cfg, "t", **{**ok, key: value})
    with pytest.raises(TeacherError, match="needs a x0 model on gen.paths.EDMPath"):
        check_teacher(cfg, "t", **{**ok, "kinds": ("edm",)})
    consistency = {**cfg, "prediction": {**cfg["prediction"], "prediction": "consistency"}}
    with pytest.raises(TeacherError, match="is a consistency on"):
        check_teacher(consistency, "t", **{**ok, "kinds": ("flow", "edm")})


def test_pairs_equal_teacher_samples_for_any_batch_size(tmp_path: Path, teacher_snapshot: Path) -> None:
    a = _shards(_pairs(teacher_snapshot, tmp_path / "b4", batch_size=4))
    b = _shards(_pairs(teacher_snapshot, tmp_path / "b16", batch_size=16))
    for k in ("noise", "x", "label", "seed"):
        assert torch.equal(a[k], b[k]), k
    assert a["seed"].tolist() == list(range(20)) and a["x"].std() > 0
    # Pair k is the teacher's sample from seed k: label, then noise, from seed k's own generator (as sample.py).
    rnd = PerImageRandom([3, 11])
    label = rnd.randint(10)
    noise = rnd.randn((1, 32, 32))
    assert torch.equal(label, a["label"][[3, 11]]) and torch.equal(noise, a["noise"][[3, 11]])
    manifest = json.loads((tmp_path / "b4" / "pairs.json").read_text())
    assert manifest["complete"] and manifest["teacher"]["sha256"] == file_sha256(teacher_snapshot)
    assert manifest["sampler"]["steps"] == 3 and manifest["data"]["name"] == "mnist5k"
    teacher = load_teacher(teacher_snapshot, manifest["sampler"])
    x = teacher.sample(noise, label)
    assert torch.allclose(x, a["x"][[3, 11]], atol=1e-5)


def test_pairs_on_two_processes_equal_one(tmp_path: Path, teacher_snapshot: Path) -> None:
    one = _shards(_pairs(teacher_snapshot, tmp_path / "one", batch_size=5))
    cmd = [*torchrun(2), "-m", "distill.pairs", f"teacher={teacher_snapshot}", f"out={tmp_path / 'two'}", "num=20",
           "shard_size=8", "steps=3", "batch_size=3", "device=cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = _shards(tmp_path / "two")
    for k in one:
        assert torch.equal(one[k], two[k]), k


def test_killed_pair_run_resumes_to_the_same_shards(tmp_path: Path, teacher_snapshot: Path) -> None:
    args = [f"teacher={teacher_snapshot}", "num=48", "shard_size=6", "steps=40", "batch_size=6", "device=cpu"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "distill.pairs", f"out={out}", *args], cwd=ROOT,
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (out / shard_name(1)).is_file():
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, "the pair run ended before it could be killed; make it longer"
    done = sorted(out.glob("pairs-*.safetensors"))
    assert 0 < len(done) < 8 and not json.loads((out / "pairs.json").read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        PairShards(str(out))
    before = {f.name: f.stat().st_mtime_ns for f in done}
    rerun = subprocess.run([sys.executable, "-m", "distill.pairs", f"out={out}", *args], cwd=ROOT,
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items()), "complete shards were redrawn"
    assert not list(out.glob(".tmp-*"))
    straight = _pairs(teacher_snapshot, tmp_path / "straight", num=48, shard_size=6, steps=40, batch_size=6)
    a, b = _shards(out), _shards(straight)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dataset_refuses_pairs_of_another_teacher(tmp_path: Path, teacher_snapshot: Path) -> None:
    out = _pairs(teacher_snapshot, tmp_path / "pairs")
    data = PairShards(str(out), teacher=str(teacher_snapshot), data_name="mnist5k")
    assert len(data) == 20 and (data.channels, data.resolution, data.num_classes, data.name) == (1, 32, 10, "mnist5k")
    item = data[0]
    assert item["x"].shape == item["noise"].shape == (1, 32, 32)
    other = edited_teacher(teacher_snapshot, tmp_path / "other.safetensors",
                           tensors_fn=lambda t: {k: v * 1.01 if v.is_floating_point() else v for k, v in t.items()})
    with pytest.raises(ValueError, match="were made by teacher .* not by this run's teacher"):
        PairShards(str(out), teacher=str(other))
    with pytest.raises(ValueError, match="data.name='shapes'"):
        PairShards(str(out), teacher=str(teacher_snapshot), data_name="shapes")
    with pytest.raises(FileNotFoundError, match="nothing: no such folder; draw pairs there with python -m distill"):
        PairShards(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no pairs"):
        PairShards(str(tmp_path / "empty"))
    # A sibling named through a run folder not made yet (the distill bench's lr row did this): the system cannot
    # resolve 'missing/..', so the error says so and gives the plain path, which loads.
    through = tmp_path / "missing" / ".." / "pairs"
    with pytest.raises(FileNotFoundError, match=f"needs every folder before the '..' to exist, so give {out}"):
        PairShards(str(through), teacher=str(teacher_snapshot))
    (tmp_path / "missing").mkdir()
    assert len(PairShards(str(through), teacher=str(teacher_snapshot))) == 20


def test_pairs_command_errors_are_one_line(tmp_path: Path, teacher_snapshot: Path) -> None:
    def run(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "distill.pairs", *args], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("distill.pairs: error: "), proc.stderr
        return lines[0]

    assert "does not exist" in run(f"teacher={tmp_path / 'no.safetensors'}", f"out={tmp_path / 'o'}", "num=4")
    assert "num=0 must be >= 1" in run(f"teacher={teacher_snapshot}", f"out={tmp_path / 'o'}", "num=0")
    assert "not key=value" in run("teacher")
    _pairs(teacher_snapshot, tmp_path / "p")
    assert "holds other pairs" in run(f"teacher={teacher_snapshot}", f"out={tmp_path / 'p'}", "num=21",
                                      "shard_size=8", "steps=3")


def test_real_data_pairs_invert_the_teacher(tmp_path: Path, teacher_snapshot: Path) -> None:
    real = _pairs(teacher_snapshot, tmp_path / "real", num=6, shard_size=4, steps=32, real="mnist5k")
    got = _shards(real)
    from gen.data.builtin import MNIST5k

    data = MNIST5k(split="train")
    assert torch.equal(got["x"], data.images[:6].float() / 127.5 - 1) and torch.equal(got["label"], data.labels[:6])
    # The teacher's sample from the inverted noise comes back near the real image (Euler both ways, 32 steps).
    manifest = json.loads((real / "pairs.json").read_text())
    assert manifest["real"] == "mnist5k"
    teacher = load_teacher(teacher_snapshot, manifest["sampler"])
    back = teacher.sample(got["noise"], got["label"])
    err = (back - got["x"]).pow(2).mean().sqrt() / got["x"].pow(2).mean().sqrt()
    assert float(err) < 0.1, float(err)
    assert 0.5 < float(got["noise"].std()) < 2.0
    synth = _pairs(teacher_snapshot, tmp_path / "synth")
    both = PairShards(str(synth), teacher=str(teacher_snapshot), real_root=str(real))
    assert len(both) == 26 and torch.equal(both.tensors()["x"][20:], got["x"])
    with pytest.raises(ValueError, match="must hold real-data pairs"):
        PairShards(str(synth), real_root=str(synth))
    with pytest.raises(ValueError, match="teacher was trained on 'mnist5k'"):
        _pairs(teacher_snapshot, tmp_path / "shapes", real="shapes")
    # A teacher trained on a subset inverts that subset; one written before snapshots carried data.dataset, the
    # whole training split (what it trained on).
    def with_data(dataset: dict | None):  # noqa: ANN202
        def edit(config: dict) -> dict:
            data = {k: v for k, v in config["data"].items() if k != "dataset"}
            return {**config, "data": data if dataset is None else {**data, "dataset": dataset}}
        return edit

    sub = edited_teacher(teacher_snapshot, tmp_path / "sub.safetensors", config_fn=with_data(
        {"_target_": "gen.data.builtin.MNIST5k", "split": "train", "subset": 20}))
    assert torch.equal(_shards(_pairs(sub, tmp_path / "sub", num=3, steps=2, real="mnist5k"))["x"],
                       MNIST5k(subset=20).images[:3].float() / 127.5 - 1)
    old = edited_teacher(teacher_snapshot, tmp_path / "old.safetensors", config_fn=with_data(None))
    assert torch.equal(_shards(_pairs(old, tmp_path / "old", num=3, steps=2, real="mnist5k"))["x"], got["x"][:3])
