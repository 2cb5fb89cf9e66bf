"""Checkpoint averaging: the combiner (streamed float64 sum of saved checkpoints, written as a snapshot), EDM2's
power-function EMA and its post-hoc reconstruction, and the LCSC search."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from distill.lcsc import SearchSettings, constrain, ema_coefficients, initial_population, search
from gen.averaging import CheckpointSet, combine, read_weights
from gen.ema import (
    PowerFunctionEMA,
    gamma_to_sigma_rel,
    posthoc_coefficients,
    power_inner_product,
    sigma_rel_to_gamma,
)
from gen.utils.ckpt import CheckpointError, file_sha256, load_snapshot, save_snapshot, save_training_state
from gen.utils.finite import NonFiniteError
from scripts.lcsc import main as lcsc_main
from scripts.posthoc_ema import main as posthoc_main
from tests.conftest import ROOT, Background, kill_mid_run, run_train, subprocess_env, torchrun, train_command
from tests.test_train import _final_state, _max_diff

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


def test_held_sources_combine_like_streamed_ones_reading_each_file_once(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import gen.averaging as averaging

    paths = _snapshots(tmp_path, 4)
    reads: list[str] = []
    real = averaging.read_weights
    monkeypatch.setattr(averaging, "read_weights", lambda p, key="module.net": reads.append(Path(p).name) or real(p, key))
    held = CheckpointSet(paths, paths[-1], buffers=["norm.scale"], in_memory=True)
    assert reads == [p.name for p in paths] and held.nbytes == 4 * (12 + 3)  # w and b, float32; buffers not held
    for i, alphas in enumerate(([0.7, -0.4, 1.5, -0.8], [0.25] * 4)):
        got = held.combine(alphas, tmp_path / f"held{i}.safetensors", {"method": "test"})
        want = combine(paths, alphas, paths[-1], tmp_path / f"streamed{i}.safetensors", {"method": "test"},
                       buffers=["norm.scale"])
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert load_snapshot(tmp_path / f"held{i}.safetensors")[1] == load_snapshot(tmp_path / f"streamed{i}.safetensors")[1]
    assert reads[4:] == [p.name for p in paths] * 2  # the held set read nothing more; combine() streamed each time
    other = tmp_path / "other.safetensors"
    save_snapshot(other, _weights(5, {**SHAPES, "w": (4, 4)}), META)
    with pytest.raises(CheckpointError, match=r"other.safetensors is a checkpoint of another model"):
        CheckpointSet([paths[0], other], paths[0], in_memory=True)  # checked when held


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
    ema_state = tmp_path / "state-000000002.pt"
    save_training_state(ema_state, {"registry": {"ema.net": {f"copies.d0_9.{k}": v for k, v in _weights(0).items()}}})
    with pytest.raises(CheckpointError, match=r"'ema.net' is not one module's weights .* give module.<name>"):
        read_weights(ema_state, "ema.net")


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


# ---- power-function EMA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_rel", [0.005, 0.05, 0.10, 0.2, 0.29])
def test_sigma_rel_gamma_round_trip(sigma_rel: float) -> None:
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma > (math.sqrt(5) - 3) / 2  # the branch where a wider profile has a smaller exponent
    assert abs(gamma_to_sigma_rel(gamma) - sigma_rel) < 1e-12
    # The definition: the profile's standard deviation relative to the training time t (numerical, on t = 1).
    mass = quad(lambda u: u**gamma, 0, 1)[0]
    mean = quad(lambda u: u ** (gamma + 1), 0, 1)[0] / mass
    var = quad(lambda u: (u - mean) ** 2 * u**gamma, 0, 1)[0] / mass
    assert abs(math.sqrt(var) - sigma_rel) < 1e-7
    for g in (0.0, 3.5, 16.97, 200.0):
        assert abs(sigma_rel_to_gamma(gamma_to_sigma_rel(g)) - g) < 1e-8 * max(1.0, g)
    with pytest.raises(ValueError, match=r"sigma_rel=0.31 must lie in \(0, 0.300"):
        sigma_rel_to_gamma(0.31)


def test_power_profile_weights_are_the_continuous_profile_mass() -> None:
    # A net whose weight is the step number: the EMA after t steps is sum_s w_s * s, with w_s the profile's mass on
    # [s - 1, s], i.e. (s^(g+1) - (s-1)^(g+1)) / t^(g+1).
    net = torch.nn.Linear(1, 1, bias=False).double()
    ema = PowerFunctionEMA(net, sigma_rels=[0.1])
    g = sigma_rel_to_gamma(0.1)
    for s in range(1, 41):
        net.weight.data.fill_(float(s))
        ema.update(net, nimg=(s - 1) * 8, batch_size=8)
    t = 40
    want = sum((s ** (g + 1) - (s - 1) ** (g + 1)) / t ** (g + 1) * s for s in range(1, t + 1))
    assert abs(float(ema.averaged().weight) - want) < 1e-10
    assert ema.names == ["phema0.1"] and ema.spec == {"_target_": "gen.ema.PowerFunctionEMA", "sigma_rels": [0.1]}


def test_inner_products_match_numerical_integration() -> None:
    def profile(t: float, g: float) -> Callable[[float], float]:
        return lambda u: (g + 1) * u**g / t ** (g + 1) if u <= t else 0.0

    for (ta, sa), (tb, sb) in [((100, 0.05), (300, 0.1)), ((300, 0.1), (100, 0.05)), ((250, 0.2), (250, 0.03)),
                               ((1000, 0.08), (700, 0.15))]:
        ga, gb = sigma_rel_to_gamma(sa), sigma_rel_to_gamma(sb)
        pa, pb = profile(ta, ga), profile(tb, gb)
        want = quad(lambda u, pa=pa, pb=pb: pa(u) * pb(u), 0, min(ta, tb), epsabs=0, epsrel=1e-12, limit=200)[0]
        got = float(power_inner_product(np.array(ta), np.array(sa), np.array(tb), np.array(sb)))
        assert abs(got - want) <= 1e-9 * want, (ta, sa, tb, sb)


def test_posthoc_solve_of_a_stored_profile_is_one_hot() -> None:
    t = [64, 128, 192, 256] * 2
    s = [0.05] * 4 + [0.10] * 4
    for k in range(len(t)):
        x = posthoc_coefficients(t, s, [t[k]], [s[k]])[:, 0]
        assert np.abs(x - np.eye(len(t))[k]).max() < 1e-6, (k, x)
    x = posthoc_coefficients(t, s, [256, 256], [0.03, 0.08])
    assert np.allclose(x.sum(axis=0), 1.0, rtol=0, atol=1e-12)


PHEMA = ["ema=phema", "trainer.snapshot_kimg=0.128"]


def _posthoc(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """``python -m scripts.posthoc_ema ARGS`` in this process: (exit status, stderr)."""
    code = posthoc_main(list(args))
    return code, capsys.readouterr().err


def test_phema_sigkill_rerun_equals_uninterrupted(tmp_path: Path) -> None:
    straight = Background(train_command(tmp_path, "straight", PHEMA), tmp_path / "straight.log")
    run = tmp_path / "killed"
    assert kill_mid_run(train_command(tmp_path, "killed", PHEMA), run, 256) < 512
    straight.wait()
    resumed = run_train(tmp_path, "killed", PHEMA)
    assert "Resuming from" in resumed.stdout + resumed.stderr
    a, b = _final_state(tmp_path / "straight")["registry"], _final_state(run)["registry"]
    assert set(a["ema.net"]) == {f"copies.phema0_05.{k}" for k in a["module.net"]} | {
        f"copies.phema0_1.{k}" for k in a["module.net"]}
    for k in ("module.net", "ema.net"):
        assert _max_diff(a[k], b[k]) <= 1e-6, k
    names = sorted(p.name for p in run.glob("snapshot-*.safetensors"))
    assert names == sorted(p.name for p in (tmp_path / "straight").glob("snapshot-*.safetensors"))
    assert "snapshot-000000512-phema0.1.safetensors" in names and len(names) == 8


def test_posthoc_of_a_run_whose_weights_never_changed_gives_those_weights(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_train(tmp_path, "still", PHEMA + ["optim.lr=0"])
    run = tmp_path / "still"
    raw = _final_state(run)["registry"]["module.net"]
    code, err = _posthoc(capsys, str(run), "--sigma-rel", "0.03,0.08", "--at-kimg", "0.256,0.512")
    assert code == 0, err
    outs = sorted(run.glob("posthoc-*.safetensors"))
    assert [p.name for p in outs] == [f"posthoc-000000{k}-sigma{s}.safetensors" for k in (256, 512)
                                      for s in ("0.03", "0.08")]
    for out in outs:
        tensors, meta = load_snapshot(out)
        assert _max_diff(tensors, raw) <= 1e-6, out.name
        rec = meta["averaging"]
        assert rec["method"] == "posthoc_ema" and abs(sum(s["coefficient"] for s in rec["sources"]) - 1) < 1e-9
        assert meta["ema"] == f"posthoc{rec['sigma_rel']:g}" and "ema_spec" not in meta
    assert len(load_snapshot(outs[-1])[1]["averaging"]["sources"]) == 8  # both widths at 4 times
    samples = subprocess.run([sys.executable, "sample.py", f"snapshot={outs[-1]}", f"outdir={tmp_path / 's'}",
                              "seeds=0-1"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert samples.returncode == 0, samples.stderr[-2000:]

    # Refusals: one line, naming the time or the run and the fix; nothing written.
    code, err = _posthoc(capsys, str(run), "--sigma-rel", "0.03", "--at-kimg", "0.3", "--out-dir", str(tmp_path / "o"))
    assert code == 2 and err.count("\n") == 1
    assert "no power-function EMA snapshot at kimg 0.3 (it has kimg 0.128, 0.256, 0.384, 0.512)" in err
    code, err = _posthoc(capsys, str(run), "--sigma-rel", "0.03", "--at-kimg", "0.128", "--out-dir", str(tmp_path / "o"))
    assert code == 2 and "at only 1 time(s) up to kimg 0.128" in err and "trainer.snapshot_kimg" in err
    code, err = _posthoc(capsys, str(run), "--sigma-rel", "0.4")
    assert code == 2 and "--sigma-rel: sigma_rel=0.4 must lie in (0, 0.3003)" in err
    classic = tmp_path / "classic"
    save_snapshot(classic / "snapshot-000000064.safetensors", _weights(0), {**META, "ema_spec": {"_target_": "gen.ema.EMA"}})
    code, err = _posthoc(capsys, str(classic), "--sigma-rel", "0.03")
    assert code == 2 and "holds no power-function EMA snapshots; train the run with ema=phema" in err
    assert not list((tmp_path / "o").glob("*.safetensors"))


# ---- LCSC search ------------------------------------------------------------------------------------------------

TARGET = np.array([-0.4, 0.3, 0.1, 1.2, -0.2])  # sums to 1, norm 1.37: inside the bounds


def _quadratic(calls: list[np.ndarray] | None = None, die_after: int | None = None) -> Callable[[np.ndarray], float]:
    """A closed-form fitness with its minimum at TARGET (a stand-in for FID); optionally 'killed' after some calls."""

    def fitness(alpha: np.ndarray) -> float:
        if calls is not None:
            calls.append(alpha.copy())
            if die_after is not None and len(calls) > die_after:
                raise KeyboardInterrupt("killed")
        return float(((alpha - TARGET) ** 2).sum())

    return fitness


def test_constraints_and_ema_vectors() -> None:
    for d in (0.5, 0.9):
        a = ema_coefficients(6, d)
        assert abs(a.sum() - 1) < 1e-15 and np.all(np.diff(a[1:]) > 0) and a[-1] == 1 - d
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = constrain(rng.normal(0, 10, 7), 2.0)
        assert abs(a.sum() - 1) < 1e-12 and np.linalg.norm(a) <= 2.0 + 1e-12
    inside = constrain(TARGET, 5.0)
    assert np.array_equal(inside, TARGET + (1 - TARGET.sum()) / 5)  # only the float64 sum correction
    with pytest.raises(ValueError, match=r"max_norm 0.1 must be finite and at least 1/sqrt\(n\)"):
        search(5, _quadratic(), SearchSettings(max_norm=0.1))
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        search(1, _quadratic())


def test_lcsc_same_seed_same_alpha_and_it_improves_on_the_initial_population() -> None:
    s = SearchSettings(population=10, generations=12, mutation_std=0.2, seed=3)
    calls: list[np.ndarray] = []
    a = search(5, _quadratic(calls), s)
    b = search(5, _quadratic(), s)
    assert np.array_equal(a.alpha, b.alpha) and a.fitness == b.fitness and a.history == b.history
    assert abs(a.alpha.sum() - 1) < 1e-12 and np.linalg.norm(a.alpha) <= s.max_norm
    first = min(_quadratic()(v) for v in initial_population(5, s))
    assert a.fitness < 0.5 * first  # the search beats every EMA-like start on this fitness
    assert a.evaluations == len({tuple(c) for c in calls}) == len(calls)  # the cache: nothing scored twice
    assert a.score_of(np.eye(5)[-1]) == _quadratic()(np.eye(5)[-1]) and a.score_of(np.full(5, 7.0)) is None
    assert [h["best"] for h in a.history] == sorted((h["best"] for h in a.history), reverse=True)  # elitism
    c = search(5, _quadratic(), dataclasses.replace(s, seed=4))
    assert not np.array_equal(a.alpha, c.alpha)


def test_lcsc_killed_and_resumed_equals_uninterrupted(tmp_path: Path) -> None:
    s = SearchSettings(population=8, generations=6, seed=1)
    straight = search(5, _quadratic(), s, tmp_path / "straight.json")
    state = tmp_path / "killed.json"
    for die_after in (13, 29):  # killed twice, mid-generation
        with pytest.raises(KeyboardInterrupt):
            search(5, _quadratic([], die_after), s, state)
    calls: list[np.ndarray] = []
    resumed = search(5, _quadratic(calls), s, state)
    assert np.array_equal(resumed.alpha, straight.alpha) and resumed.fitness == straight.fitness
    assert resumed.history == straight.history and resumed.evaluations == straight.evaluations
    assert len(calls) < straight.evaluations  # it continued; it did not start over
    assert not list(tmp_path.glob(".tmp-*"))
    # The cost: the finished generations' time summed over the resumes; a state written without it stays untimed.
    assert straight.seconds is not None and resumed.seconds is not None and 0 < resumed.seconds < 60
    untimed = json.loads(state.read_text())
    untimed.pop("seconds"), untimed.update(generation=3, history=untimed["history"][:4])
    state.write_text(json.dumps(untimed))
    assert search(5, _quadratic(), s, state).seconds is None
    with pytest.raises(ValueError, match=r"killed.json belongs to another search .* delete it"):
        search(5, _quadratic(), dataclasses.replace(s, population=9), state)


@pytest.fixture(scope="module")
def four_snapshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SMALL run with the default EMA and four snapshots (kimg 0.128 .. 0.512)."""
    runs = tmp_path_factory.mktemp("lcsc")
    run_train(runs, "run", ["trainer.snapshot_kimg=0.128"])
    return runs / "run"


def test_lcsc_command_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    four_snapshots = tmp_path / "run"  # refused before any weights are read: the files' names are enough
    for i, nimg in enumerate((128, 256, 384, 512)):
        save_snapshot(four_snapshots / f"snapshot-{nimg:09d}.safetensors", _weights(i), META)
    for nimg in (384, 512):
        save_training_state(four_snapshots / f"state-{nimg:09d}.pt", {"registry": {"module.net": _weights(0)}})
    assert lcsc_main([str(four_snapshots), "--last", "5", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--last 5:" in err and "holds 4 snapshots" in err and "trainer.snapshot_kimg" in err
    assert lcsc_main([str(four_snapshots), "--last", "3", "--source", "states", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "holds 2 states" in capsys.readouterr().err
    assert lcsc_main([str(four_snapshots), "--last", "3", "--at-kimg", "0.256", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "holds 2 snapshots up to kimg 0.256" in capsys.readouterr().err
    assert lcsc_main([str(tmp_path), "--last", "2"]) == 2
    assert "holds no snapshot-<nimg>.safetensors" in capsys.readouterr().err
    assert lcsc_main([str(four_snapshots), "--last", "4", "--max-norm", "0.1", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--max-norm 0.1 must be finite and at least 1/sqrt(n) = 0.5 for n = 4" in capsys.readouterr().err
    assert lcsc_main([str(four_snapshots), "--last", "4", "--population", "4", "--elite", "4", "--out",
                      str(tmp_path / "x.safetensors")]) == 2
    assert "--population 4, --elite 4: need --population >= 2 and 1 <= --elite < --population" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))


def test_scoring_flags_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--ref`` (FID against reference statistics) and its flags: each misuse is one line naming the flag and the fix,
    before any fitness evaluation."""
    from eval.stats import GaussianStats, save_stats

    run = tmp_path / "run"
    for i, nimg in enumerate((128, 256)):
        save_snapshot(run / f"snapshot-{nimg:09d}.safetensors", _weights(i), META)
    inception = tmp_path / "inception.npz"
    save_stats(inception, GaussianStats(np.zeros(2048), np.eye(2048), 50_000,
                                        {"extractor": "inception-v3-pool3", "resize": "tf1-bilinear", "dim": 2048}))
    bare = tmp_path / "adm.npz"
    np.savez(bare, mu=np.zeros(8), sigma=np.eye(8))
    out = ["--last", "2", "--out", str(tmp_path / "x.safetensors")]
    cases = [
        (["--ref", str(tmp_path / "none.npz")], "none.npz: no such file; write it with `python -m eval ref"),
        (["--ref", str(inception), "--dataset", "mnist5k"], "ask for two metrics; give one"),
        (["--weights", "w.pth"], "are for --ref's statistics and extractor; give --ref STATS.npz or drop them"),
        (["--ref", str(bare)], "has no manifest naming its feature extractor"),
        (["--ref", str(inception), "--fitness-images", "500"],
         "--fitness-images 500: the FID in --ref's 2048 features needs more than 2048 images"),
        (["--ref", str(inception), "--fitness-images", "5000", "--rescore-images", "2000"], "--rescore-images 2000:"),
    ]
    for flags, message in cases:
        assert lcsc_main([str(run), *out, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (flags, err)
    # Statistics of other Inception weights than the ones given: refused before any sample is drawn.
    from eval.features import make_random_inception_weights

    weights = make_random_inception_weights(tmp_path / "inception.pth")
    assert lcsc_main([str(run), *out, "--ref", str(inception), "--fitness-images", "5000", "--rescore-images", "5000",
                      "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "inception.npz: the reference statistics were made with a different feature extractor" in err, err
    assert "weights_sha256: None in the reference statistics vs" in err and "Traceback" not in err, err
    assert posthoc_main([str(run), "--sigma-rel", "0.05", "--score", "100", "--ref", str(inception)]) == 2
    assert "--score 100: the FID in --ref's 2048 features" in capsys.readouterr().err
    assert not list(tmp_path.glob("x*"))


@pytest.fixture(scope="module")
def yardstick_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The yardstick network's cache, trained once for this module's slow tests (about 30 s on 2 cores)."""
    from eval.classifier import load_or_train_classifier

    path = tmp_path_factory.mktemp("yardstick")
    load_or_train_classifier("mnist5k", path)
    return path


@pytest.mark.slow
def test_posthoc_sweep_scores_and_plots(tmp_path: Path, yardstick_cache: Path) -> None:
    run_train(tmp_path, "ph", PHEMA + ["trainer.total_kimg=0.256"])
    assert posthoc_main([str(tmp_path / "ph"), "--sigma-rel", "0.02,0.2", "--score", "160", "--steps", "2",
                         "--cache-dir", str(yardstick_cache), "--out-dir", str(tmp_path / "sweep")]) == 0
    record = json.loads((tmp_path / "sweep" / "posthoc_sweep.json").read_text())
    assert [(r["kimg"], r["sigma_rel"]) for r in record["rows"]] == [(0.256, 0.02), (0.256, 0.2)]
    assert all(math.isfinite(r["fid"]) and r["fid"] > 0 for r in record["rows"])
    assert (tmp_path / "sweep" / "posthoc_sweep.png").stat().st_size > 1000


@pytest.mark.slow
def test_scoring_against_reference_statistics_equals_the_yardstick_with_its_own_reference(
        four_snapshots: Path, yardstick_cache: Path) -> None:
    """``--ref`` with the yardstick's own reference file rebuilds the yardstick network from the file's manifest and
    gives the yardstick FID exactly: the same features, reference and seeds through the evaluator's general path."""
    from eval.generate import yardstick_reference
    from scripts.lcsc import parse_args
    from scripts.scoring import make_scorer

    yardstick_reference("mnist5k", "train", yardstick_cache)
    (ref,) = yardstick_cache.glob("ref-mnist5k-train-*.npz")
    snap = sorted(four_snapshots.glob("snapshot-*.safetensors"))[-1]
    common = [str(four_snapshots), "--steps", "2", "--cache-dir", str(yardstick_cache)]
    plain = make_scorer(snap, parse_args(common))(snap, 200, 7)
    by_ref = make_scorer(snap, parse_args([*common, "--ref", str(ref)]), {"--fitness-images": 200})(snap, 200, 7)
    assert math.isfinite(plain) and by_ref == plain


@pytest.mark.slow
def test_lcsc_command_on_the_yardstick_writes_a_loadable_winner_and_resumes(four_snapshots: Path, tmp_path: Path,
                                                                           yardstick_cache: Path) -> None:
    out = tmp_path / "lcsc.safetensors"
    args = [str(four_snapshots), "--last", "4", "--fitness-images", "160", "--rescore-images", "200", "--population",
            "4", "--generations", "1", "--steps", "2", "--cache-dir", str(yardstick_cache), "--out", str(out)]
    assert lcsc_main(args) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    alpha = np.array(record["alpha"])
    assert abs(alpha.sum() - 1) < 1e-12 and record["evaluations"] <= 8
    assert record["fitness_fid"] == min(h["best"] for h in record["history"])
    assert math.isfinite(record["rescore_fid"]) and math.isfinite(record["last_rescore_fid"])
    assert record["last_fitness_fid"] >= record["fitness_fid"]  # the last checkpoint alone was a candidate
    tensors, meta = load_snapshot(out)
    assert meta["averaging"]["method"] == "lcsc" and [s["coefficient"] for s in meta["averaging"]["sources"]] == list(alpha)
    want = combine(sorted(four_snapshots.glob("snapshot-*.safetensors")), alpha.tolist(),
                   sorted(four_snapshots.glob("snapshot-*.safetensors"))[-1], None)
    assert all(torch.equal(tensors[k], want[k]) for k in want)
    # Run again: the search state says it is done, so the same alpha comes back without a new fitness evaluation.
    assert lcsc_main(args) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["alpha"] == record["alpha"] and again["rescore_fid"] == record["rescore_fid"]


@pytest.mark.slow
def test_lcsc_command_sigkilled_and_rerun_equals_uninterrupted(four_snapshots: Path, tmp_path: Path,
                                                               yardstick_cache: Path) -> None:
    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "scripts.lcsc", str(four_snapshots), "--last", "3", "--fitness-images", "160",
                "--rescore-images", "160", "--population", "4", "--generations", "3", "--steps", "2",
                "--cache-dir", str(yardstick_cache), "--out", str(out)]

    straight = Background(command(tmp_path / "straight.safetensors"), tmp_path / "straight.log")
    killed = tmp_path / "killed.safetensors"
    proc = subprocess.Popen(command(killed), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = killed.with_suffix(".search.json")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not state.exists():
        time.sleep(0.05)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert alive, "the search ended before it could be killed"
    assert json.loads(state.read_text())["generation"] < 3 and not killed.exists()
    straight.wait()
    # The rerun streams its checkpoints (--stream) where the others hold them: the same numbers either way.
    rerun = subprocess.run([*command(killed), "--stream"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    a = json.loads((tmp_path / "straight.json").read_text())
    b = json.loads((tmp_path / "killed.json").read_text())
    for key in ("alpha", "fitness_fid", "rescore_fid", "history", "evaluations"):
        assert a[key] == b[key], key
    ta, tb = load_snapshot(tmp_path / "straight.safetensors")[0], load_snapshot(killed)[0]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_bench_summary_picks_the_best_rows_and_the_images_lcsc_saves() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import yardstick_averaging

    rows = [{"seed": 0, "method": "raw", "kimg": 96, "fid": 9.0},
            {"seed": 0, "method": "ema-hl2k", "kimg": 96, "fid": 6.0},
            {"seed": 0, "method": "ema-hl8k", "kimg": 96, "fid": 7.0},
            {"seed": 0, "method": "posthoc-0.05", "kimg": 96, "fid": 5.5},
            {"seed": 0, "method": "posthoc-0.1", "kimg": 96, "fid": 5.8},
            {"seed": 0, "method": "posthoc-0.05", "kimg": 48, "fid": 5.0}]  # a same-time baseline: not the end's
    rows += [{"seed": 0, "method": "lcsc", "kimg": k, "fid": f, "fitness_fid": f + 3.5, "last_alone_fid": 7.0,
              "last_alone_fitness_fid": 11.0} for k, f in [(24, 8.0), (48, 5.9), (72, 5.0), (96, 4.5)]]
    line = yardstick_averaging.summary(rows, 96)[-1]
    assert line == "| 0 | 9.00 | 6.00 (hl2k) | 5.50 (0.05) | 4.50 | -0.50 | 50% (48 of 96 kimg) |"
    rows[-3]["fid"] = 6.5  # 48k no longer reaches the best EMA; 72k does
    assert yardstick_averaging.summary(rows, 96)[-1].endswith("| 25% (72 of 96 kimg) |")
    # The 1-step part: raw, EMA at 1 and 2 steps, LCSC at 1 step with its overfitting gap.
    rows += [{"seed": 0, "method": m, "kimg": 32, "fid": f} for m, f in
             [("ect-raw", 60.0), ("ect-ema", 50.0), ("ect-ema-2step", 40.0)]]
    rows.append({"seed": 0, "method": "ect-lcsc", "kimg": 32, "fid": 45.0, "fitness_fid": 49.0,
                 "last_alone_fid": 60.0, "last_alone_fitness_fid": 63.0})
    lines = yardstick_averaging.summary(rows, 96)
    assert lines[-1] == "| 0 | 60.00 | 50.00 | 40.00 | 45.00 | +1.00 |"
    assert lines[-6].endswith("| 25% (72 of 96 kimg) |")  # the multi-step table is unchanged


def test_bench_estimate_and_stored_rows_follow_the_settings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import yardstick_averaging as ya

    out = tmp_path / "averaging.json"
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--jobs", "2", "--population", "4",
            "--generations", "2", "--fitness-images", "500", "--sec-per-kimg", "10", "--sec-per-eval", "60"]
    ya.main([*argv, "--estimate"])
    # raw, the EMAs, 11 post-hoc widths at the end and 5 at each of the 3 earlier LCSC times, LCSC at 4 times; ECT
    # raw, EMA (1 and 2 steps), LCSC
    rows_per_seed = 1 + len(ya.HALFLIVES) + 11 + 3 * 5 + 4 + 4
    train_s = 2 * (2 * 96 + 32) * 10 / 2  # 2 seeds x (2 runs of 96k + ECT's 32k) at 10 s/kimg, 2 at a time
    eval_s = 2 * (rows_per_seed * 60 + 5 * 4 * 2 * 30) / 2  # each row one FID; each search population x
    # generations; the 2 seeds evaluate in parallel (--jobs 2)
    assert f"ESTIMATE_SECONDS={train_s + eval_s:.0f}" in capsys.readouterr().out
    # A training state at 48k images halves that run's training left.
    run = tmp_path / "runs" / "phema-s1"
    run.mkdir(parents=True)
    (run / "state-000048000.pt").write_bytes(b"")
    ya.main([*argv, "--estimate"])
    assert f"ESTIMATE_SECONDS={train_s - 48 * 10 / 2 + eval_s:.0f}" in capsys.readouterr().out
    # Stored rows are read back only under the same settings.
    args = ya.parse_args(argv)
    settings = {k: getattr(args, k) for k in ya.SETTINGS}
    out.write_text(json.dumps({"records": [{"seed": 0, "method": "raw", "kimg": 96.0, "fid": 9.0}],
                               "settings": settings}))
    assert list(ya.stored_rows(out, args)) == [(0, "raw", 96.0)]
    assert ya.stored_rows(out, ya.parse_args([*argv, "--num-images", "2000"])) == {}
    # The grids only choose which rows exist: one extended keeps the rows made, one narrowed drops those outside it.
    out.write_text(json.dumps({"records": [{"seed": 0, "method": m, "kimg": 96.0, "fid": 9.0}
                                           for m in ("posthoc-0.02", "posthoc-0.2")], "settings": settings}))
    wider = ya.parse_args([*argv, "--sigma-rel", "0.01,0.02,0.2"])
    assert sorted(ya.stored_rows(out, wider)) == [(0, "posthoc-0.02", 96.0), (0, "posthoc-0.2", 96.0)]
    assert list(ya.stored_rows(out, ya.parse_args([*argv, "--sigma-rel", "0.02"]))) == [(0, "posthoc-0.02", 96.0)]


@pytest.mark.slow
def test_lcsc_fitness_spread_over_two_processes_finds_the_same_alpha(four_snapshots: Path, tmp_path: Path,
                                                                     yardstick_cache: Path) -> None:
    def args(out: Path) -> list[str]:
        return ["-m", "scripts.lcsc", str(four_snapshots), "--last", "3", "--fitness-images", "160",
                "--rescore-images", "160", "--population", "4", "--generations", "1", "--steps", "2",
                "--cache-dir", str(yardstick_cache), "--out", str(out)]

    one = Background([sys.executable, *args(tmp_path / "one.safetensors")], tmp_path / "one.log")
    two = subprocess.run([*torchrun(2), *args(tmp_path / "two.safetensors")], cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one.wait()
    assert two.stdout.count("LCSC over 3 snapshots") == 1  # one process reports and writes
    a = json.loads((tmp_path / "one.json").read_text())
    b = json.loads((tmp_path / "two.json").read_text())
    assert a["alpha"] == b["alpha"] and a["evaluations"] == b["evaluations"]
    for key in ("fitness_fid", "rescore_fid", "last_rescore_fid"):
        assert abs(a[key] - b[key]) <= 1e-6 * a[key], key


def test_bench_rows_are_stored_as_they_come_and_a_rerun_computes_only_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import yardstick_averaging as ya

    out = tmp_path / "averaging.json"
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(out), "--jobs", "1", "--seeds", "0,1"]
    monkeypatch.setattr(ya, "train_all", lambda args, seeds: None)
    monkeypatch.setattr(ya, "summary", lambda rows, kimg: [])  # the table needs every row kind
    calls: list[tuple[int, list[str]]] = []

    def rows(args, seed, done, on_row):  # two rows of each seed; seed 1 stops after its first, as a killed run
        calls.append((seed, sorted(m for s, m, _ in done if s == seed)))
        got = []
        for method in ("raw", "ema-hl2k"):
            row = done.get((seed, method, 96.0)) or {"method": method, "kimg": 96.0, "fid": 10.0 + seed}
            if (seed, method, 96.0) not in done:
                if seed == 1 and method == "ema-hl2k" and len(calls) == 2:
                    raise RuntimeError("killed")
                on_row({"seed": seed, **row})
            got.append(row)
        return got

    monkeypatch.setattr(ya, "rows_for_seed", rows)
    with pytest.raises(RuntimeError, match="killed"):
        ya.main(argv)
    # Every finished row is in the records file (the copy a checkout keeps), seed 1's killed row is not.
    stored = json.loads(out.read_text())["records"]
    assert [(r["seed"], r["method"]) for r in stored] == [(0, "raw"), (0, "ema-hl2k"), (1, "raw")]
    assert list((tmp_path / "runs").glob("*.json")) == []
    ya.main(argv)  # the re-run reads the rows back and computes only what is missing
    assert calls[2:] == [(0, ["ema-hl2k", "raw"]), (1, ["raw"])]
    merged = json.loads(out.read_text())["records"]
    assert sorted((r["seed"], r["method"]) for r in merged) == [(0, "ema-hl2k"), (0, "raw"), (1, "ema-hl2k"), (1, "raw")]
    # Rows stored under other settings are stale: the next row replaces them.
    ya.save_row(out, {"seed": 0, "method": "raw", "kimg": 96.0, "fid": 1.0}, ya.parse_args(argv + ["--kimg", "48"]),
                {"kimg": 48.0})
    assert json.loads(out.read_text())["records"] == [{"seed": 0, "method": "raw", "kimg": 96.0, "fid": 1.0}]


def test_bench_rows_are_read_back_only_for_the_training_they_were_made_from(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout without runs/ trains a seed again, and on another host the training differs in float rounding: a
    stored row is read back only when its run's last snapshot is the one on disk (``run_sha256``); rows of the other
    run of the seed stay. Seeds whose rows are all stored are not trained at all."""
    sys.path.insert(0, str(ROOT / "bench"))
    import yardstick_averaging as ya

    args = ya.parse_args(["--runs", str(tmp_path / "runs"), "--sigma-rel", "0.05", "--lcsc-kimg", "96",
                          "--ect-kimg", "0"])
    classic, phema = (ya.train_command(args, 0, kind)[0] for kind in ya.KINDS)
    for run in (classic, phema):
        run.mkdir(parents=True)
        (run / "snapshot-000096000.safetensors").write_bytes(b"first training of " + run.name.encode())
    made: list[str] = []
    monkeypatch.setattr(ya, "fid", lambda snap, args, sampler="euler20": made.append(Path(snap).name) or 10.0)
    monkeypatch.setattr(ya, "lcsc", lambda run, k, args, sampler: made.append(f"lcsc-{run.name}") or {"fid": 9.0})
    monkeypatch.setattr(ya, "raw_weights", lambda run: run / "raw.safetensors")
    monkeypatch.setattr(ya, "_run", lambda cmd, log: None)  # the post-hoc reconstruction command

    first = ya.rows_for_seed(args, 0, {})
    assert len(first) == len(ya.planned_rows(args)) == 8 and len(made) == 8
    sha = {r["method"]: r["run_sha256"] for r in first}
    assert sha["ema-hl2k"] == ya.run_identity(classic) != sha["raw"] == sha["posthoc-0.05"] == sha["lcsc"]
    done = {(0, r["method"], float(r["kimg"])): r for r in first}

    made.clear()  # one row missing: the rest are read back
    ya.rows_for_seed(args, 0, {k: v for k, v in done.items() if k[1] != "raw"})
    assert made == ["raw.safetensors"]
    made.clear()  # the phema run trained again, differently: its rows are made again, the classic run's are kept
    (phema / "snapshot-000096000.safetensors").write_bytes(b"second training")
    again = ya.rows_for_seed(args, 0, {k: v for k, v in done.items() if k[1] != "raw"})
    assert sorted(made) == sorted(["raw.safetensors", "posthoc-000096000-sigma0.05.safetensors", "lcsc-phema-s0"])
    assert {r["run_sha256"] for r in again if not r["method"].startswith("ema-")} == {ya.run_identity(phema)}
    # Seeds whose rows are all stored need no training.
    assert ya.seeds_left(args, [0, 1], done) == [1]


def test_bench_computes_lcsc_baseline_at_each_earlier_search_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the searches, each earlier LCSC time gets the post-hoc EMAs of that time (one reconstruction command
    for every time and width), read back like any row on a re-run."""
    sys.path.insert(0, str(ROOT / "bench"))
    import yardstick_averaging as ya

    args = ya.parse_args(["--runs", str(tmp_path / "runs"), "--sigma-rel", "0.05", "--lcsc-kimg", "48,72,96",
                          "--same-time-sigma-rel", "0.02,0.05", "--ect-kimg", "0"])
    for run in (ya.train_command(args, 0, kind)[0] for kind in ya.KINDS):
        run.mkdir(parents=True)
        (run / "snapshot-000096000.safetensors").write_bytes(run.name.encode())
    made: list[str] = []
    commands: list[list[str]] = []
    monkeypatch.setattr(ya, "fid", lambda snap, args, sampler="euler20": made.append(Path(snap).name) or 10.0)
    monkeypatch.setattr(ya, "lcsc", lambda run, k, args, sampler: made.append(f"lcsc@{k:g}") or {"fid": 9.0})
    monkeypatch.setattr(ya, "raw_weights", lambda run: run / "raw.safetensors")
    monkeypatch.setattr(ya, "_run", lambda cmd, log: commands.append(cmd[cmd.index("--sigma-rel"):]))

    rows = ya.rows_for_seed(args, 0, {})
    assert commands == [["--sigma-rel", "0.05"], ["--sigma-rel", "0.02,0.05", "--at-kimg", "48,72"]]
    assert made[-7:] == ["posthoc-000048000-sigma0.02.safetensors", "posthoc-000048000-sigma0.05.safetensors",
                         "posthoc-000072000-sigma0.02.safetensors", "posthoc-000072000-sigma0.05.safetensors",
                         "lcsc@48", "lcsc@72", "lcsc@96"]
    assert [(r["method"], r["kimg"]) for r in rows] == ya.planned_rows(args)
    done = {(0, r["method"], float(r["kimg"])): r for r in rows}
    made.clear(), commands.clear()
    ya.rows_for_seed(args, 0, {k: v for k, v in done.items() if k[1:] != ("posthoc-0.02", 72.0)})
    assert commands == [["--sigma-rel", "0.02,0.05", "--at-kimg", "48,72"]]
    assert made == ["posthoc-000072000-sigma0.02.safetensors"]
