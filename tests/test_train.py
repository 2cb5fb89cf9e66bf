"""End-to-end tests of train.py and sample.py as subprocesses on a tiny DiT and the built-in digits.

Covers: a short run leaves every artefact; re-running resumes; SIGKILL mid-run then re-running gives the same
final weights as an uninterrupted run (also for a method with two alternating optimizers and a frozen network,
which never enters a training state); one optimizer step on 2 gloo processes or with gradient accumulation equals
one process (gradients and weights); sampling is identical at any batch size and process count; fp16 skips an
overflowing step; bad input is refused before work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gen.utils.ckpt import list_training_states, load_snapshot, load_training_state
from gen.utils.log import read_stats
from tests.conftest import (
    ROOT,
    Background,
    example,
    kill_mid_run,
    run_train,
    subprocess_env,
    torchrun,
    train_command,
)

_train, _env = run_train, subprocess_env
EXAMPLE = example("adversarial_flow")


def _final_state(run_dir: Path) -> dict:
    states = list_training_states(run_dir)
    assert states, f"no training state in {run_dir}"
    return load_training_state(states[-1][1])


def _final_net(run_dir: Path) -> dict[str, torch.Tensor]:
    return _final_state(run_dir)["registry"]["module.net"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


def test_short_run_leaves_artefacts_and_resumes(tmp_path: Path) -> None:
    _train(tmp_path, "a", ["preview.images=20", "preview.nrow=10", "preview.interval_kimg=0.256",
                           "trainer.tensorboard=true", "eval=yardstick_quick", "eval.num_images=160",
                           "eval.batch_size=80", "eval.interval_kimg=0.256", "sampler.steps=4"])
    run = tmp_path / "a"
    for f in ("config.yaml", "stats.jsonl", "loss.png", "results.json"):
        assert (run / f).is_file(), f
    assert list((run / "tensorboard").glob("events.*")), "no TensorBoard events"
    grids = sorted((run / "samples").glob("grid-*.png"))
    assert [g.name for g in grids] == ["grid-000000256.png", "grid-000000512.png"]
    states = list_training_states(run)
    assert states[-1][0] == 512 and len(states) <= 2  # keep_states=2
    snaps = sorted(run.glob("snapshot-*.safetensors"))
    assert [s.name for s in snaps] == ["snapshot-000000256.safetensors", "snapshot-000000512.safetensors"]
    tensors, meta = load_snapshot(snaps[-1])
    assert meta["model"]["hidden_size"] == 64 and meta["data"]["name"] == "mnist5k" and meta["nimg"] == 512
    stats = [r for r in read_stats(run / "stats.jsonl") if "loss" in r]
    assert [r["nimg"] for r in stats] == list(range(64, 513, 64))
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in stats)
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["class_accuracy"] <= 1.0 and results["yardstick_fid"] > 0
    logged = [r for r in read_stats(run / "stats.jsonl") if "yardstick_fid" in r]
    assert [r["nimg"] for r in logged] == [256, 512]  # every eval.interval_kimg, beside the loss

    # Same command again: resumes at the end, trains nothing, keeps the weights.
    before = _final_net(run)
    proc = _train(tmp_path, "a")
    assert "Resuming from" in proc.stdout + proc.stderr
    after = _final_net(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len([r for r in read_stats(run / "stats.jsonl") if "loss" in r]) == len(stats)


def _method_overrides(method: str, teacher: Path | None) -> list[str]:
    """The overrides of each method the SIGKILL test trains (the students start from the session's teacher)."""
    init = f"trainer.init={{net:'{teacher}'}}"
    return {
        "diffusion": [],
        "adversarial_flow": EXAMPLE,
        "paired_flow": example("paired_flow", "data=noise_pairs"),  # data.hflip=true: pairs mirrored together
        "consistency_student": example("consistency_student", init),
        "datafree_student": example("datafree_student", f"method.teacher='{teacher}'", init),
    }[method]


SIGKILL_MODULES = {
    "diffusion": ["module.net", "module.objective", "ema.net"],
    "adversarial_flow": ["module.net", "module.critic", "ema.net"],
    "paired_flow": ["module.net", "ema.net"],
    "consistency_student": ["module.net", "ema.net"],
    "datafree_student": ["module.net", "ema.net"],
}


@pytest.mark.parametrize("method", list(SIGKILL_MODULES))
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path: Path, method: str, request: pytest.FixtureRequest) -> None:
    teacher = request.getfixturevalue("teacher_snapshot") if method.endswith("_student") else None
    longer = ["trainer.total_kimg=1.024", *_method_overrides(method, teacher)]
    straight = Background(train_command(tmp_path, "straight", longer), tmp_path / "straight.log")
    run = tmp_path / "killed"
    # Killed as soon as the second training state exists (mid-run, possibly mid-write of the next file).
    assert kill_mid_run(train_command(tmp_path, "killed", longer), run, 256) < 1024
    straight.wait()

    resumed = _train(tmp_path, "killed", longer)
    assert "Resuming from" in resumed.stdout + resumed.stderr
    a, b = _final_state(tmp_path / "straight")["registry"], _final_state(run)["registry"]
    modules = [k for k in a if k.startswith(("module.", "ema."))]
    assert modules == SIGKILL_MODULES[method]
    for k in modules:
        diff = _max_diff(a[k], b[k])
        assert diff <= 1e-6, f"{k}: the resumed run differs from the uninterrupted one by {diff}"
    state = _final_state(run)
    if method == "adversarial_flow":
        # Two optimizers stepped in turn; the frozen network is identified in the state but never stored in it.
        assert {"optim.net", "optim.critic"} <= set(a)
        assert set(state["frozen"]) == {"features"} and len(state["frozen"]["features"]["sha256"]) == 64
        assert not any("features" in k for item in state["registry"].values() if isinstance(item, dict)
                       for k in item), "the frozen network leaked into the training state"
        stats = [r for r in read_stats(run / "stats.jsonl") if "net/loss" in r]
        assert stats and all("critic/loss" in r and "critic/grad_norm" in r for r in stats)
    if teacher is not None:  # started from the teacher's weights, whose file hash the state records
        from gen.utils.ckpt import file_sha256

        assert state["init"] == {"net": {"path": str(teacher), "sha256": file_sha256(teacher)}}
        assert set(state["frozen"]) == ({"teacher"} if method == "datafree_student" else set())
    if method == "consistency_student":
        _, meta = load_snapshot(sorted(run.glob("snapshot-*.safetensors"))[-1])
        assert meta["ema"] == "d0.95" and meta["ema_spec"]["decays"] == [0.95]  # the method's own target EMA
    assert not list(run.glob(".tmp-*")), "a half-written temp file was left behind"
    for _, p in list_training_states(run):
        load_training_state(p)  # every state on disk is complete
    # The log holds one record per status interval, with no duplicates from the killed attempt.
    loss_key = "net/loss" if method == "adversarial_flow" else "loss"
    nimgs = [r["nimg"] for r in read_stats(run / "stats.jsonl") if loss_key in r]
    assert nimgs == sorted(set(nimgs)) and nimgs[-1] == 1024
    losses = [r[loss_key] for r in read_stats(run / "stats.jsonl") if loss_key in r]
    assert all(np.isfinite(losses))


def test_one_step_on_two_processes_equals_one_process(tmp_path: Path) -> None:
    """After one optimizer step, 2 gloo processes (and 2 accumulation rounds on 1 process) hold the same gradients
    and weights as 1 process with the same global batch: every sample's noise, time, label drop and flip come
    from its own stream, so only the summation order differs."""
    one_step = ["trainer.total_kimg=0.032", "trainer.lr_warmup_kimg=0", "trainer.grad_clip=null", "optim=sgd",
                "trainer.hflip=true", "objective.label_dropout=0.5"]
    _train(tmp_path, "one", one_step)
    _train(tmp_path, "two", one_step, launcher=torchrun(2))
    _train(tmp_path, "accum", [*one_step, "trainer.batch_per_gpu=8"])  # 4 rounds of 8
    ref = _final_state(tmp_path / "one")["registry"]
    # SGD with momentum: after one step the momentum buffer is the gradient.
    grads = [v["momentum_buffer"] for v in ref["optim.main"]["state"].values()]
    assert max(float(g.abs().max()) for g in grads) > 1e-3, "no gradient to compare"
    for other in ("two", "accum"):
        reg = _final_state(tmp_path / other)["registry"]
        assert _max_diff(reg["module.net"], ref["module.net"]) <= 1e-6
        other_grads = [v["momentum_buffer"] for v in reg["optim.main"]["state"].values()]
        assert max(float((g - h).abs().max()) for g, h in zip(grads, other_grads)) <= 1e-6, other


def _sample(snapshot: Path, outdir: Path, extra: list[str] = (), launcher: list[str] | None = None) -> np.ndarray:
    cmd = (launcher or [sys.executable]) + ["sample.py", f"snapshot={snapshot}", f"outdir={outdir}", "seeds=0-15",
                                            "sampler.steps=8", "sampler.guidance.scale=2.0", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with np.load(outdir / "samples.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (16, 32, 32, 1)  # grey stays grey
        assert f["arr_1"].shape == (16,)
        return np.concatenate([f["arr_0"].reshape(16, -1), f["arr_1"][:, None]], axis=1)


def test_sampling_is_identical_across_batch_sizes_and_processes(tmp_path: Path) -> None:
    _train(tmp_path, "s")
    snap = tmp_path / "s"
    b4 = _sample(snap, tmp_path / "b4", ["batch_size=4"])
    b16 = _sample(snap, tmp_path / "b16", ["batch_size=16"])
    p2 = _sample(snap, tmp_path / "p2", ["batch_size=4"], launcher=torchrun(2))
    assert np.array_equal(b4, b16)
    assert np.array_equal(b4, p2)
    assert len(list((tmp_path / "b4" / "images").glob("*.png"))) == 16 and (tmp_path / "b4" / "grid.png").is_file()
    assert b4[:, :-1].std() > 0  # not blank images


@pytest.mark.parametrize(
    "override, message",
    [
        (["trainer.batchsize=3"], "trainer.batchsize"),
        (["+trainer.batchsize=3"], "did you mean 'trainer.batch_size'"),
        (["trainer.precision=fp8"], "trainer.precision"),
        (["+model.in_channels=3"], "model.in_channels is set by the data and tokenizer"),
        (["+model.input_size=64"], "model.input_size is set by the data and tokenizer"),
        (["data.channels=3"], "data.channels=3 but the dataset has channels=1"),
        (["sampler.solver._target_=samplers.sample_rk4"], "has no attribute 'sample_rk4'"),
        (["sampler.solver._target_=os.system"], "outside the allowed packages"),
        (["+method.critic=1"], "unknown argument(s) 'critic'"),
        (["eval=recon_yardstick"], "measures reconstructions, but method Diffusion makes samples"),
    ],
)
def test_bad_config_is_refused_before_work(tmp_path: Path, override: list[str], message: str) -> None:
    proc = _train(tmp_path, "bad", override, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert not list_training_states(tmp_path / "bad")


def test_bf16_mixed_precision_trains(tmp_path: Path) -> None:
    _train(tmp_path, "bf16", ["trainer.precision=bf16", "trainer.total_kimg=0.256"])
    stats = [r for r in read_stats(tmp_path / "bf16" / "stats.jsonl") if "loss" in r]
    assert stats[-1]["loss"] < stats[0]["loss"] and all(np.isfinite(r["loss"]) for r in stats)
    _, meta = load_snapshot(sorted((tmp_path / "bf16").glob("snapshot-*.safetensors"))[-1])
    assert meta["nimg"] == 256


def test_nan_loss_stops_and_keeps_last_good_state(tmp_path: Path) -> None:
    # A huge learning rate without clipping diverges within a few steps; without the magnitude bound (which would
    # stop it a step earlier, tests/test_bad_inputs.py) the loss stops being finite.
    proc = _train(tmp_path, "nan", ["optim.lr=1e12", "trainer.grad_clip=null", "trainer.lr_warmup_kimg=0",
                                    "trainer.checkpoint_kimg=0.032", "trainer.max_weight_rms=null"], check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "non-finite loss/gradient at step" in proc.stderr
    run = tmp_path / "nan"
    for _, p in list_training_states(run):
        state = load_training_state(p)
        assert all(torch.isfinite(v).all() for v in state["registry"]["module.net"].values())
    assert not list(run.glob(".tmp-*"))
    assert not list(run.glob("snapshot-*")) or all(
        torch.isfinite(t).all() for s in run.glob("snapshot-*") for t in load_snapshot(s)[0].values()
    )


def test_snapshot_of_another_model_is_refused(tmp_path: Path) -> None:
    from gen.utils.ckpt import save_snapshot
    from pipeline import generator_from_snapshot

    _train(tmp_path, "m")
    snap = sorted((tmp_path / "m").glob("snapshot-*.safetensors"))[-1]
    tensors, meta = load_snapshot(snap)
    meta["model"]["hidden_size"] = 96  # the metadata now describes another model than the weights
    bad = tmp_path / "bad.safetensors"
    save_snapshot(bad, tensors, meta)
    with pytest.raises(ValueError, match="shape mismatches"):
        generator_from_snapshot(str(bad))
    meta["model"]["hidden_size"] = 64
    meta["model"]["depth"] = 3
    save_snapshot(bad, tensors, meta)
    with pytest.raises(ValueError, match="missing keys"):
        generator_from_snapshot(str(bad))


def test_documented_sample_then_eval_path(tmp_path: Path) -> None:
    """README "Evaluation": sample.py on the quick start's run folder, then `python -m eval ref` and `eval npz`,
    the same commands (fewer seeds and steps); the grey digits reach the yardstick as they are."""
    _train(tmp_path, "quickstart")
    env = {**_env(), "GEN_CACHE": str(ROOT / ".cache")}  # the yardstick cache the other tests share

    def run(*argv: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc

    run(str(ROOT / "sample.py"), f"snapshot={tmp_path / 'quickstart'}", "seeds=0-159", "sampler=euler_cfg",
        "sampler.steps=4")
    run("-m", "eval", "ref", "--dataset", "mnist5k", "--extractor", "yardstick", "--out", "refs/mnist5k.npz")
    proc = run("-m", "eval", "npz", "quickstart/samples/snapshot-000000512/samples.npz", "--ref", "refs/mnist5k.npz")
    metrics = json.loads(proc.stdout)
    assert metrics["num_images"] == 160 and metrics["fid"] > 0 and 0 <= metrics["class_accuracy"] <= 1


def test_eval_cli_generates_from_a_snapshot(tmp_path: Path) -> None:
    """`python -m eval fid5k SNAPSHOT --generator pipeline:snapshot_generate_fn` end to end."""
    _train(tmp_path, "e")
    snap = sorted((tmp_path / "e").glob("snapshot-*.safetensors"))[-1]
    ref = tmp_path / "ref.npz"
    run = lambda *a: subprocess.run([sys.executable, "-m", "eval", *a], cwd=ROOT, env=_env(), capture_output=True,  # noqa: E731
                                    text=True, timeout=300)
    proc = run("ref", "--dataset", "mnist5k", "--extractor", "yardstick", "--cache-dir", str(ROOT / ".cache" / "yardstick"),
               "--out", str(ref))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "m.json"
    proc = run("fid5k", str(snap), "--ref", str(ref), "--generator", "pipeline:snapshot_generate_fn",
               "--option", "steps=4", "--option", "cfg=2", "--num-images", "160", "--batch-size", "80",
               "--cache-dir", str(ROOT / ".cache" / "yardstick"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics["num_images"] == 160 and metrics["fid"] > 0 and 0 <= metrics["class_accuracy"] <= 1
    assert metrics["option.steps"] == "4"
