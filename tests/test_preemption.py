"""Preemption of train.py: a signal stops training after the current step, on every process, with the state of that
step written and exit status 75; re-running the same command resumes and gives the uninterrupted run's weights.
Also train.py under submitit's local executor (Hydra's submitit launcher): 2 tasks equal torchrun, and SIGUSR2
(SLURM's warning) goes on to submitit's handler, which requeues the job; the requeued job resumes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from gen.utils.ckpt import list_training_states, load_training_state
from gen.utils.cli import EXIT_PREEMPTED
from tests.conftest import ROOT, SMALL, Background, run_train, subprocess_env, torchrun, train_command

LONGER = ["trainer.total_kimg=1.024"]  # 32 steps of 32 images; a state every 4 steps


def _registry(run_dir: Path) -> dict:
    states = list_training_states(run_dir)
    assert states, f"no training state in {run_dir}"
    return load_training_state(states[-1][1])["registry"]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a), default=0.0)


def _assert_equal_runs(a_dir: Path, b_dir: Path) -> None:
    a, b = _registry(a_dir), _registry(b_dir)
    modules = [k for k in a if k.startswith(("module.", "ema."))]
    assert "module.net" in modules and "ema.net" in modules
    for k in modules:
        diff = _max_diff(a[k], b[k])
        assert diff <= 1e-6, f"{k}: {b_dir.name} differs from {a_dir.name} by {diff}"
    assert a["counters"] == b["counters"]


def _children(pid: int) -> dict[int, int]:
    """rank -> pid of the processes that ``pid`` started (torchrun's workers), read from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0") if ppid == pid else []
        except (OSError, IndexError, ValueError):
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


def _signal_mid_run(cmd: Sequence[str], run: Path, pick: int | None = None, sig: signal.Signals = signal.SIGTERM,
                    again_every: float | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """Start ``cmd``; once its first training state exists, send ``sig`` to it (or to its worker of rank ``pick``),
    and again every ``again_every`` seconds until it exits (while it finishes its step, writes its state and shuts
    down: a scheduler may repeat its signal at any of those moments).
    Returns the finished process and the newest state's image count at the moment of the signal."""
    proc = subprocess.Popen(list(cmd), cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list_training_states(run):
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be signalled"
    at = list_training_states(run)[-1][0]
    target = proc.pid
    if pick is not None:
        workers = _children(proc.pid)
        assert pick in workers, f"no worker of rank {pick} among {workers}"
        target = workers[pick]
    os.kill(target, sig)
    while again_every is not None and proc.poll() is None:
        time.sleep(again_every)
        try:
            os.kill(target, sig)
        except ProcessLookupError:  # exited (and reaped) between the poll and the signal
            break
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), at


def _preempted_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "preempted by" in line]


def _check_stopped_state(run: Path, at: int, step: int) -> None:
    """The newest state is the step the run stopped at (after the signal), complete, and there is no result."""
    nimg, path = list_training_states(run)[-1]
    assert at < nimg < 1024 and nimg == step * 32, (at, nimg, step)
    state = load_training_state(path)  # complete (atomic write)
    assert state["registry"]["counters"] == {"nimg": nimg, "step": step}
    assert not (run / "results.json").exists(), "a preempted run wrote results.json"
    assert not list(run.glob(".tmp-*")), "a half-written temp file was left behind"


def _stopped_step(line: str) -> int:
    return int(line.split("stopped at step ")[1].split()[0])


def test_sigterm_stops_at_a_step_with_its_state_and_rerun_resumes(tmp_path: Path) -> None:
    straight = Background(train_command(tmp_path, "straight", LONGER), tmp_path / "straight.log")
    run = tmp_path / "stopped"
    # SIGTERM repeated every 50 ms until the exit (while the step ends, the state is written, the process shuts down)
    # changes nothing.
    proc, at = _signal_mid_run(train_command(tmp_path, "stopped", LONGER), run, again_every=0.05)
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    lines = _preempted_lines(proc.stderr)
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "resumes" in lines[0], proc.stderr[-3000:]
    _check_stopped_state(run, at, _stopped_step(lines[0]))
    straight.wait()

    resumed = run_train(tmp_path, "stopped", LONGER)
    assert "Resuming from" in resumed.stdout + resumed.stderr
    assert (run / "results.json").is_file()
    _assert_equal_runs(tmp_path / "straight", run)


def test_signal_to_one_rank_stops_both_at_the_same_step(tmp_path: Path) -> None:
    """SIGUSR2 (SLURM's warning under submitit) to rank 1 only: the flag is all-reduced at the step boundary, so
    rank 0 stops after the same step; the resumed run equals an uninterrupted run on 2 processes."""
    straight = Background([*torchrun(2), *train_command(tmp_path, "straight", LONGER)[1:]], tmp_path / "straight.log")
    run = tmp_path / "stopped"
    cmd = [*torchrun(2), *train_command(tmp_path, "stopped", LONGER)[1:]]
    proc, at = _signal_mid_run(cmd, run, pick=1, sig=signal.SIGUSR2)
    assert proc.returncode != 0
    # rank -> (signal, step) from each process's line
    got = {int(r): (s, int(n)) for r, s, n in re.findall(r"rank (\d) of 2: preempted by ([\w ]+): stopped at step (\d+)",
                                                         proc.stderr)}
    assert sorted(got) == [0, 1], proc.stderr[-3000:]
    assert got[1][0] == "SIGUSR2" and got[0][0] == "a signal to another process", got  # rank 0 had no signal: it stopped on the agreed flag
    assert got[0][1] == got[1][1], f"the ranks stopped at different steps: {got}"
    _check_stopped_state(run, at, got[0][1])
    straight.wait()

    run_train(tmp_path, "stopped", LONGER, launcher=torchrun(2))
    _assert_equal_runs(tmp_path / "straight", run)


def test_handlers_only_record_and_are_restored() -> None:
    from gen.utils.preempt import PreemptionSignals

    seen: list[int] = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with PreemptionSignals(["SIGUSR1", "USR2"]) as p:
            assert not p.requested()
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR2)  # a second signal: counted, the first one is kept
            assert p.requested() and p.name == "SIGUSR1" and p.count == 2 and seen == []
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
        p.pass_on()  # the handler that was there before (submitit's, under submitit) gets the signal
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_hold_after_stop_keeps_recording_a_repeated_signal() -> None:
    """A process that exits right after a stop must not die of a second SIGTERM in between (exit 75, not -15)."""
    from gen.utils.preempt import PreemptionSignals

    before = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        with PreemptionSignals(["SIGUSR2"], hold_after_stop=True) as p:
            os.kill(os.getpid(), signal.SIGUSR2)
        # Ignored, not a Python handler: the interpreter's shutdown resets those to the default action.
        assert p.name == "SIGUSR2" and signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR2)  # the default action would end pytest here
        with PreemptionSignals(["SIGUSR2"], hold_after_stop=True):
            pass  # nothing received: the previous action comes back
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        with PreemptionSignals(["SIGUSR2"], hold_after_stop=False) as q:
            os.kill(os.getpid(), signal.SIGUSR2)
        assert q.requested() and signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL  # without it: restored
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_preempt_signals_setting_is_checked(tmp_path: Path) -> None:
    proc = run_train(tmp_path, "bad", ["trainer.preempt_signals=[SIGKILL]"], check=False)
    assert proc.returncode == 2 and "preempt_signals" in proc.stderr, proc.stderr[-2000:]


def test_two_tasks_under_submitit_local_equal_torchrun(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    reference = Background([*torchrun(2), *train_command(tmp_path, "torchrun")[1:]], tmp_path / "torchrun.log")
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
           "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.runs={tmp_path}",
           "name=submitit", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    logs = sorted((tmp_path / "sweep" / ".submitit").rglob("*_log.*"))
    text = "\n".join(f"{p.name}:\n{p.read_text()[-2000:]}" for p in logs)
    assert proc.returncode == 0, proc.stderr[-3000:] + text
    outs = [p.read_text() for p in logs if p.name.endswith("_log.out")]
    assert len(outs) == 2, "submitit did not run 2 tasks"
    # One job of 2 processes: only rank 0 prints status lines (two 1-process runs would both print, and the
    # second would find the run folder locked).
    assert ["step      16" in out for out in outs] == [True, False], text
    assert (tmp_path / "submitit" / "results.json").is_file(), text
    reference.wait()
    _assert_equal_runs(tmp_path / "torchrun", tmp_path / "submitit")


def _submitit_task(rank: int) -> int | None:
    """The pid of submitit's local task of global rank ``rank`` (its environment names it), if it runs."""
    for entry in Path("/proc").iterdir():
        try:
            env = (entry / "environ").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if f"SUBMITIT_LOCAL_GLOBALID={rank}".encode() in env and b"SUBMITIT_EXECUTOR=local" in env:
            return int(entry.name)
    return None


def test_sigusr2_under_submitit_requeues_and_resumes(tmp_path: Path) -> None:
    """SLURM's warning (SIGUSR2) to a job of Hydra's submitit launcher: the state is written at the step, then
    submitit's handler requeues the job (the local executor reruns it), and the requeued job resumes and finishes
    with the uninterrupted run's weights."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    straight = Background(train_command(tmp_path, "straight"), tmp_path / "straight.log")
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.runs={tmp_path}", "name=requeued", *SMALL]
    run = tmp_path / "requeued"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list_training_states(run):
        time.sleep(0.05)
    task = _submitit_task(0)
    assert proc.poll() is None and task is not None, "the job ended before it could be signalled"
    at = list_training_states(run)[-1][0]
    os.kill(task, signal.SIGUSR2)
    out, err = proc.communicate(timeout=300)
    logs = sorted((tmp_path / "sweep" / ".submitit").rglob("*_log.*"))
    text = "\n".join(f"{p.name}:\n{p.read_text()[-3000:]}" for p in logs)
    assert proc.returncode == 0, err[-3000:] + text
    stopped = re.findall(r"preempted by SIGUSR2: stopped at step (\d+)", text)
    # submitit ran the job twice: the requeued run resumed from the state written at the signal
    assert len(stopped) == 1 and text.count("Starting with JobEnvironment") == 2, text
    assert f"Resuming from {run / f'state-{int(stopped[0]) * 32:09d}.pt'}" in text, text
    assert at < int(stopped[0]) * 32 < 512
    assert (run / "results.json").is_file(), text
    straight.wait()
    _assert_equal_runs(tmp_path / "straight", run)
