"""The benchmark harness (bench/yardstick.py, bench/tables.py, bench/redesign_throughput.py) on tiny inputs.

Records are stored once per key and survive concurrent writers; the README tables are in sync with the stored
records; the DDT sharing statistics come from the production sampler (the recorded images equal plain sampling,
and under guidance every recorded encoder output holds the conditional and the unconditional rows), and a DP
schedule read back through ``sampler.sharing`` runs exactly the planned encoder passes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import tables  # noqa: E402
import yardstick  # noqa: E402
from redesign_throughput import ping_pong  # noqa: E402


def test_snapshot_interval_covers_every_point() -> None:
    assert yardstick.snapshot_interval((8, 16, 32, 64)) == 8
    assert yardstick.snapshot_interval((8, 12)) == 4
    assert yardstick.snapshot_interval((0.064, 0.128)) == pytest.approx(0.064)


def test_train_summary_reads_generator_and_tokenizer_logs(tmp_path: Path) -> None:
    """Speed is the median over the training lines up to ``kimg``, whichever loss a trainer logs (a tokenizer's
    is ``autoencoder/loss``); lines past ``kimg`` and lines without a speed are left out."""
    for name, loss_key in (("gen", "loss"), ("tok", "autoencoder/loss")):
        run = yardstick.Run("b", yardstick.Row(name, ()), 0, (4.0,), tmp_path)
        run.run_dir.mkdir(parents=True)
        lines = [{"kimg": k, "sec_per_kimg": v, loss_key: 1.0 / k} for k, v in ((1.0, 3.0), (2.0, 5.0), (3.0, 4.0),
                                                                             (5.0, 100.0))]
        lines.insert(1, {"kimg": 1.5, "fid": 9.0})  # an evaluation line: no speed
        (run.run_dir / "stats.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        out = run.train_summary(4.0)
        assert out["sec_per_kimg"] == 4.0 and out[loss_key] == pytest.approx(1.0 / 3.0)


def test_train_command_resumes_in_its_own_folder(tmp_path: Path) -> None:
    row = yardstick.Row("dit", ("experiment=yardstick_dit",))
    run = yardstick.Run("b", row, 1, (8.0, 16.0, 32.0, 64.0), tmp_path)
    cmd = run.train_command()
    assert run.run_dir == tmp_path / "b" / "dit-s1"
    for arg in ("experiment=yardstick_dit", "seed=1", f"run_dir={run.run_dir}", "trainer.total_kimg=64",
                "trainer.snapshot_kimg=8", "eval=none"):
        assert arg in cmd
    assert run.snapshot_at(8) is None and not run.trained()
    for nimg in (8000, 16000):
        (run.run_dir / f"snapshot-{nimg:09d}.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (run.run_dir / f"snapshot-{nimg:09d}.safetensors").write_bytes(b"")
    assert run.snapshot_at(8).name == "snapshot-000008000.safetensors"
    assert run.snapshot_at(12).name == "snapshot-000016000.safetensors"
    assert run.snapshot_at(32) is None


def test_variant_counts() -> None:
    v = yardstick.Variant("x", 20, sharing=("rate", 3))
    assert v.nfe == 20 and v.encoder_passes() == 7  # i % 3 == 0 for i < 20
    g = yardstick.Variant("g", 20, scale=2.0, sharing=("dp", 10))
    assert g.nfe == 40 and g.encoder_passes() == 10


def _put(file: str, i: int) -> None:
    yardstick.Store(Path(file)).put({"key": f"k{i}", "method": "m", "seed": i})


def test_store_replaces_by_key_and_survives_concurrent_writers(tmp_path: Path) -> None:
    store = yardstick.Store(tmp_path / "b.json")
    store.put({"key": "a", "fid": 1.0})
    store.put({"key": "a", "fid": 2.0})
    assert [r["fid"] for r in store.records()] == [2.0]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_put, args=(str(store.file), i)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert sorted(r["key"] for r in store.records()) == ["a"] + [f"k{i}" for i in range(8)]


def _record(method: str, seed: int, kimg: float, fid: float, variant: str = "euler20") -> dict:
    return {"kind": "eval", "key": f"{method}{seed}{kimg}{variant}", "method": method, "seed": seed, "kimg": kimg,
            "variant": variant, "fid": fid, "class_accuracy": 0.5, "num_images": 2000, "params": 7.38e6,
            "train": {"sec_per_kimg": 30.0}}


def test_tables_render_between_markers_only() -> None:
    records = {"backbones": [_record("dit", 0, 8, 90.0), _record("dit", 1, 8, 80.0), _record("ddt", 0, 8, 40.0)]}
    text = "intro\n<!-- tables.py: backbones/fid_vs_kimg -->\nstale\n<!-- /tables.py -->\noutro\n"
    out = tables.render(text, records)
    assert out.startswith("intro\n<!-- tables.py: backbones/fid_vs_kimg -->\n| row |") and out.endswith(
        "<!-- /tables.py -->\noutro\n")
    assert "**85.0** (90.0 / 80.0)" in out and "40.0 (1 seed)" in out and "stale" not in out
    assert tables.render(out, records) == out
    with pytest.raises(KeyError, match="nope"):
        tables.render("<!-- tables.py: nope -->\n<!-- /tables.py -->", records)


def test_readme_tables_match_the_stored_records() -> None:
    assert tables.main(["--check"]) == 0, "bench/README.md is out of date: run python bench/tables.py"


class _FakeWorker:
    def __init__(self, wall: float) -> None:
        self.wall, self.calls = wall, []

    def burst(self, name: str) -> dict:
        self.calls.append(name)
        return {"wall": self.wall, "cpu": self.wall / 2, "work": 10}


def test_ping_pong_pairs_adjacent_bursts() -> None:
    workers = {"before": _FakeWorker(2.0), "after": _FakeWorker(1.0)}
    res = ping_pong(workers, ["ours", "diffusers"], 4)
    assert workers["before"].calls == ["ours", "diffusers"] * 4
    assert res["ours"]["pair_ratios"] == [2.0] * 4  # after is twice as fast
    assert res["ours"]["before"]["rates"] == [5.0] * 4 and res["ours"]["after"]["cpu_rates"] == [20.0] * 4


@pytest.fixture(scope="module")
def ddt_generator():
    from gen.models import DDT
    from pipeline import Generator
    from tests.presets import micro
    from tokenizers.pixels import PixelTokenizer

    torch.manual_seed(0)
    net = micro("ddt", input_size=16, in_channels=1, num_classes=4)
    assert isinstance(net, DDT)
    with torch.no_grad():  # away from the zero-output init, so the encoder output changes along the trajectory
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    spec = {"path": {"_target_": "gen.paths.LinearPath"}, "prediction": "velocity", "precond": None}
    return Generator(net.eval().requires_grad_(False), spec, PixelTokenizer(channels=1), (1, 16, 16), 4)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_sharing_statistics_come_from_the_production_sampler(ddt_generator, tmp_path: Path, scale: float) -> None:
    from pipeline import SamplerSpec

    snap = tmp_path / "snapshot-000000064.safetensors"
    variant = yardstick.Variant("v", 6, scale=scale, interval=(0.0, 0.7) if scale != 1.0 else None,
                                sharing=("dp", 3))
    sampler, facts = yardstick.sampler_config(variant, ddt_generator, tmp_path, snap)
    stats = yardstick.sharing_statistics(ddt_generator, yardstick.euler_config(6, scale, variant.interval),
                                         tmp_path, snap)
    n = len(yardstick.TEMPLATE_SEEDS)
    assert stats["rows_per_step"] == (2 * n if scale != 1.0 else n)  # guidance: conditional + unconditional rows
    assert len(stats["similarity"]) == 6 and len(facts["recompute"]) == 3 and facts["recompute"][0] == 0
    spec = SamplerSpec.from_config(sampler)
    assert spec.recompute_steps() == facts["recompute"]
    calls: list[int] = []
    hook = ddt_generator.net.s_embedder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        images, _ = ddt_generator.generate(list(range(4)), spec)
    finally:
        hook.remove()
    assert len(calls) == 3 and images.dtype == torch.uint8


def test_images_to_reach_interpolates_between_measured_points() -> None:
    curve = [(2.0, 100.0), (4.0, 60.0), (8.0, 20.0)]
    assert tables.images_to_reach(curve, 60.0) == 4.0
    assert tables.images_to_reach(curve, 40.0) == pytest.approx(6.0)  # halfway from 60 to 20 between 4 and 8 kimg
    assert tables.images_to_reach(curve, 150.0) == 2.0  # reached at the first point
    assert tables.images_to_reach(curve, 10.0) is None  # never within the measured points


def test_reach_table_counts_against_the_baselines_final_fid() -> None:
    def rec(method: str, seed: int, kimg: float, fid: float) -> dict:
        return {"kind": "eval", "variant": "euler20", "method": method, "seed": seed, "kimg": kimg, "fid": fid}

    recs = [rec("dit", s, k, f) for s in (0, 1) for k, f in ((4.0, 80.0), (8.0, 40.0))]
    recs += [rec("dit_repa", s, k, f) for s in (0, 1) for k, f in ((4.0, 40.0), (8.0, 30.0))]
    text = tables.reach({"alignment": recs}, "alignment", "dit")
    dit = next(line for line in text.splitlines() if line.startswith("| DiT |"))
    repa = next(line for line in text.splitlines() if line.startswith("| DiT + REPA"))
    assert "| 8.0 |" in dit and "1.00x" in dit
    assert "| 4.0 |" in repa and "0.50x" in repa
    # A third baseline seed (protocol v2 adds one where ranges overlap): a two-seed row is read over its own seeds,
    # and the seed it has no run for says so (not "-", which means "not reached").
    recs += [rec("dit", 2, k, f) for k, f in ((4.0, 80.0), (8.0, 40.0))]
    repa = next(x for x in tables.reach({"alignment": recs}, "alignment", "dit").splitlines() if x.startswith("| DiT + REPA"))
    assert repa.split(" | ")[1:4] == ["4.0", "4.0 / 4.0 / no run", "0.50x |"]


def test_yardstick_all_plans_what_is_left_and_never_runs_a_shared_folder_twice(tmp_path: Path) -> None:
    import argparse

    import yardstick_all

    args = argparse.Namespace(benches=["backbones", "alignment"], runs=tmp_path / "runs", results=tmp_path / "res",
                              num_images=1000, jobs=2, sec_per_kimg=10.0, sec_per_eval=60.0)
    tasks = yardstick_all.plan(args)
    by_name = {t.name: t for t in tasks}
    # Every row x seed of both benches; the alignment table's plain rows train in the backbone table's folders.
    assert by_name["alignment/dit-s0"].run.run_dir == by_name["backbones/dit-s0"].run.run_dir
    assert by_name["alignment/dit_repa-s0"].run.run_dir != by_name["backbones/dit-s0"].run.run_dir
    assert all(t.train_kimg == 96.0 for t in tasks)
    assert by_name["backbones/dit-s0"].evals == 4 + 1 + 3  # Euler 20 at 4 points, quick-start sampler, 3 NFE rows
    assert by_name["alignment/dit_repa-s1"].evals == 4 + 1
    # A third seed only for the rows whose seed ranges overlapped (protocol v2); it comes after both seeds' rows.
    third = [t.name for t in tasks if t.name.endswith("-s2")]
    assert third == [f"alignment/{m}-s2" for m in ("dit", "dit_repa", "dit_repa_enc1", "dit_reg", "lightningdit",
                                                      "lightningdit_reg")]
    assert [t.name for t in tasks].index(third[0]) > [t.name for t in tasks].index("alignment/lightningdit_reg-s1")
    assert by_name["alignment/dit-s2"].run.run_dir == tmp_path / "runs" / "backbones" / "dit-s2"
    # A training state at 32k images leaves 64k to train.
    run_dir = by_name["backbones/ddt-s1"].run.run_dir
    run_dir.mkdir(parents=True)
    (run_dir / "state-000032000.pt").write_bytes(b"")
    assert yardstick_all.plan(args)[[t.name for t in tasks].index("backbones/ddt-s1")].train_kimg == 64.0
    # The shared folder is trained once in the estimate and never picked while a worker holds it.
    shared = by_name["backbones/dit-s0"].run.run_dir
    pending = [by_name["alignment/dit-s0"], by_name["alignment/dit_repa-s0"]]
    assert yardstick_all.pick(pending, {shared}) is by_name["alignment/dit_repa-s0"]
    assert yardstick_all.pick(pending[:1], {shared}) is None
    assert yardstick_all.pick(pending, set()) is by_name["alignment/dit-s0"]
    seconds = yardstick_all.estimate([by_name["backbones/dit-s0"], by_name["alignment/dit-s0"]], args)
    assert seconds == pytest.approx((96 * 10.0 + 8 * 60.0 + 5 * 60.0) / 2)
    # A row's own speed hint stands in for --sec-per-kimg until one of its runs has logged a speed.
    import dataclasses

    task = by_name["alignment/dit_repa-s0"]
    slow = dataclasses.replace(task, run=dataclasses.replace(task.run, row=dataclasses.replace(task.run.row,
                                                                                                  sec_per_kimg=45.0)))
    assert yardstick_all.estimate([slow], args) == pytest.approx((96 * 45.0 + task.evals * 60.0) / 2)
    stats = task.run.run_dir / "stats.jsonl"
    stats.parent.mkdir(parents=True, exist_ok=True)
    stats.write_text('{"sec_per_kimg": 12.0}\n')
    assert yardstick_all.estimate([slow], args) == pytest.approx((96 * 12.0 + task.evals * 60.0) / 2)



def test_yardstick_all_starts_a_pending_teacher_before_independent_workers(tmp_path: Path) -> None:
    import argparse

    import yardstick_all

    args = argparse.Namespace(benches=["distill"], runs=tmp_path / "runs", results=tmp_path / "res",
                              num_images=1000, jobs=2, sec_per_kimg=10.0, sec_per_eval=60.0)
    by_name = {t.name: t for t in yardstick_all.plan(args)}
    teacher, student = by_name["distill/dit-s2"], by_name["distill/tdm-s2"]
    assert student.run.init is not None and student.run.init.parent == teacher.run.run_dir
    lr_row = by_name["distill/rfpp_lr5e-4-s1"]  # planned before the third seed (seed-major) and independent of it
    pending = [lr_row, teacher, student]
    assert yardstick_all.pick(pending, set()) is teacher
    assert yardstick_all.pick(pending, {teacher.run.run_dir}) is lr_row  # the student waits on its teacher
    assert yardstick_all.pick([lr_row, student], set()) is lr_row  # nobody waits on either: plan order


def test_yardstick_all_retrains_only_what_a_missing_record_needs(tmp_path: Path) -> None:
    """A new checkout keeps the records but not ``runs/``: a worker whose records are all stored is not retrained
    unless a worker that owes records starts from its snapshot."""
    import argparse
    import dataclasses

    import yardstick_all

    args = argparse.Namespace(benches=["distill", "scoreaug"], runs=tmp_path / "runs", results=tmp_path / "res",
                              num_images=1000, jobs=2, sec_per_kimg=10.0, sec_per_eval=60.0)
    owed = {"distill/tdm_unify-s2", "scoreaug/scoreaug-s1"}
    tasks = [t if t.name in owed else dataclasses.replace(t, evals=0) for t in yardstick_all.plan(args)]
    assert all(t.train_kimg > 0 for t in tasks)  # nothing trained yet: every worker would train again
    kept = [t.name for t in yardstick_all.needed(tasks)]
    assert kept == ["distill/dit-s2", "distill/tdm_unify-s2", "scoreaug/scoreaug-s1"]  # plan order kept
    assert yardstick_all.needed([dataclasses.replace(t, evals=0) for t in tasks]) == []


def test_a_run_folder_exists_before_its_prepare_and_train_commands(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The distill bench's lr row reads its pairs at ``${run_dir}/../rfpp-s<seed>/pairs``; the system resolves that
    only through an existing run folder, and train.py made it after building its data: both seeds failed."""
    import argparse

    import yardstick_all

    args = argparse.Namespace(benches=["distill"], runs=tmp_path / "runs", results=tmp_path / "res",
                              num_images=1000, jobs=2, sec_per_kimg=10.0, sec_per_eval=60.0)
    run = next(t for t in yardstick_all.plan(args) if t.name == "distill/rfpp_lr5e-4-s0").run
    assert any("${run_dir}/../rfpp-s${seed}/pairs" in o for o in run.row.overrides)
    seen = []
    monkeypatch.setattr(yardstick, "run_logged",
                        lambda cmd, log, threads, what: seen.append((what, run.run_dir.is_dir())))
    run.train(threads=1)
    assert seen == [("train", True)]

def test_claim_verdicts_follow_the_seed_ranges() -> None:
    recs = [_record("dit", s, k, f) for s, curve in ((0, (100, 50, 30, 20)), (1, (110, 52, 32, 22)))
            for k, f in zip((16, 32, 64, 96), curve)]
    recs += [_record("dit_repa", s, k, f) for s, curve in ((0, (60, 21, 15, 12)), (1, (70, 19, 14, 13)))
             for k, f in zip((16, 32, 64, 96), curve)]
    recs += [_record("dit_reg", s, 96, f) for s, f in ((0, 12.5), (1, 11.0))]
    records = {"alignment": recs}
    # REPA reaches DiT's final mean FID (21) at 32 + 32 * (20 - 21) / (20 - 15) ... between 16 and 32 kimg.
    k = tables.images_to_reach([(16, 65.0), (32, 20.0), (64, 14.5), (96, 12.5)], 21.0)
    assert tables.reach_ratio(records, "alignment", "dit_repa", "dit") == pytest.approx(k / 96)
    assert tables.compare({0: 12.0, 1: 13.0}, {0: 20.0, 1: 22.0})[1] == "yes"
    assert tables.compare({0: 12.5, 1: 11.0}, {0: 12.0, 1: 13.0})[1] == "within seed spread"
    # One seed on a side: the numbers, but no verdict yet (protocol v2 decides with 2 seeds; records land one by one).
    assert tables.compare({0: 30.0}, {0: 20.0, 1: 22.0}) == ("30.0 (30.0-30.0) vs 21.0 (20.0-22.0), +9.0", tables.PENDING)
    text = tables.claims(records)
    repa = next(line for line in text.splitlines() if line.startswith("| REPA |"))
    assert f"{k / 96:.2f}x the images of dit" in repa and "| yes |" in repa
    reg = next(line for line in text.splitlines() if line.startswith("| REG |"))
    assert "within seed spread" in reg
    assert "not measured yet" in next(line for line in text.splitlines() if line.startswith("| DDT |"))


def test_consistency_plan_starts_ect_from_the_teachers_last_snapshot(tmp_path: Path) -> None:
    import argparse

    import yardstick_all

    args = argparse.Namespace(benches=["consistency"], runs=tmp_path / "runs", results=tmp_path / "res",
                              num_images=1000, jobs=2, sec_per_kimg=10.0, sec_per_eval=60.0)
    by_name = {t.name: t for t in yardstick_all.plan(args)}
    teacher, ect, ict = (by_name[f"consistency/{m}-s1"] for m in ("dit", "ect", "ict"))
    # The teacher is the backbone table's run (its snapshots every 16k stay); ECT tunes its 96k snapshot of the seed.
    assert teacher.run.run_dir == tmp_path / "runs" / "backbones" / "dit-s1"
    assert ect.run.init == teacher.run.run_dir / "snapshot-000096000.safetensors"
    assert f"++trainer.init.net={ect.run.init}" in ect.run.train_command()
    assert "trainer.snapshot_kimg=16" in teacher.run.train_command() and ict.run.init is None
    assert (teacher.train_kimg, ect.train_kimg, ict.train_kimg) == (96.0, 32.0, 96.0)
    # Euler 1/2/4/8/20 on the teacher at its last point; 1 and 2 consistency steps at each of the students' points.
    assert (teacher.evals, ect.evals, ict.evals) == (5, 2 * 3, 2 * 4)
    # ECT waits while a worker holds the teacher's folder.
    assert yardstick_all.pick([ect, ict], {teacher.run.run_dir}) is ict
    assert yardstick_all.pick([ect], set()) is ect


def test_a_variant_with_its_own_sampler_is_used_as_given() -> None:
    import yardstick_consistency

    cm2 = next(v for v in yardstick_consistency.VARIANTS if v.name == "cm2")
    sampler, facts = yardstick.sampler_config(cm2, None, Path("."), Path("x.safetensors"))
    assert sampler["grid"] == {"_target_": "samplers.consistency_grid", "sigmas": [0.821]} and facts == {}
    assert cm2.nfe == 2 and cm2.definition()["sampler"] == sampler
    # Euler variants keep the definition (and so the record keys) they had before variants could carry a sampler.
    assert yardstick.EULER20.definition() == {"steps": 20, "scale": 1.0, "interval": None, "sharing": None}
    from pipeline import SamplerSpec

    assert SamplerSpec.from_config(sampler).steps == 2


def test_a_row_starting_from_an_unknown_row_is_refused(tmp_path: Path) -> None:
    bench = yardstick.Bench("b", "", (yardstick.Row("s", (), init_from="nope"),), (yardstick.EULER20,))
    with pytest.raises(ValueError, match="'nope', which is not a row of b"):
        yardstick.make_run(bench, bench.rows[0], 0, "96", tmp_path)


def test_cost_counts_each_training_run_once_at_its_last_point_and_every_evaluation() -> None:
    def rec(method: str, seed: int, kimg: float, run: str, eval_s: float) -> dict:
        return {**_record(method, seed, kimg, 10.0), "snapshot": f"runs/yardstick/{run}/snapshot-{kimg:g}.safetensors",
                "eval_seconds": eval_s}

    dit = [rec("dit", 0, k, "backbones/dit-s0", 360.0) for k in (16, 64, 96)]  # 96k images at 30 s/kimg: 0.8 h
    records = {"backbones": dit,
               # the curriculum table reads the same plain run (not trained again) and trains its own row
               # and evaluates its snapshot again (same FID, its own timing)
               "curriculum": [rec("dit", 0, 96, "backbones/dit-s0", 350.0), rec("curriculum", 0, 96, "curriculum/c-s0", 0)]}
    lines = tables.cost(records).splitlines()
    assert lines[2] == "| backbones | 1 | 96k | 0.8 | 3 | 0.3 | 1.1 |"
    assert lines[3] == "| curriculum | 1 | 96k | 0.8 | 2 | 0.1 | 0.9 |"
    assert lines[4].startswith("| **all** | 2 | 192k | 1.6 | 5 | 0.4 | **2.0** (wall at 2 jobs: about 1.0)")
    # The tokenizer table: a record adopted as it was is not counted again; its tokenizers' training and rFID are.
    tok = {"kind": "recon", "method": "kl", "kimg": 64.0, "snapshot": "runs/yardstick/tokenizers/tok-kl-s0/s.safetensors",
           "seconds": 36.0, "train": {"sec_per_kimg": 56.25}}  # 64k images at 56.25 s/kimg: 1.0 h
    lines = tables.cost({**records, "yardstick_tokenizers": [dit[-1], tok]}).splitlines()
    assert lines[4] == "| tokenizers | 1 | 64k | 1.0 | 1 | 0.0 | 1.0 |"
    assert lines[5].startswith("| **all** | 3 | 256k | 2.6 | 6 | 0.4 | **3.0**")


def test_faster_claim_reads_every_seed_against_its_own_target() -> None:
    # DiT reaches 20 / 24 at 96k (seeds 0 / 1). The method reaches 20 at 48k on seed 0 and 24 at 80k on seed 1
    # (linear between its points): 0.50x and 0.83x; its mean curve reaches the mean target (22) at 59.7k: 0.62x.
    recs = [_record("dit", s, k, f) for s, curve in ((0, (60, 40, 30, 20)), (1, (64, 44, 34, 24)))
            for k, f in zip((16, 32, 64, 96), curve)]
    recs += [_record("curriculum", s, k, f) for s, curve in ((0, (50, 30, 10, 8)), (1, (50, 40, 30, 18)))
             for k, f in zip((16, 32, 64, 96), curve)]
    records = {"curriculum": recs}
    assert tables.seed_reach_ratios(records, "curriculum", "curriculum", "dit") == pytest.approx([0.5, 80 / 96])
    line = next(x for x in tables.claims(records).splitlines() if x.startswith("| Curriculum |"))
    assert "0.62x the images of dit" in line and "per seed, to its own target: 0.50 / 0.83" in line
    assert "| yes on the mean, not every seed |" in line


def test_averaging_table_and_claims_read_the_averaging_records() -> None:
    import yardstick_averaging as ya

    def row(seed: int, method: str, kimg: float, fid: float, **extra: float) -> dict:
        return {"seed": seed, "method": method, "kimg": kimg, "fid": fid, **extra}

    def search(seed: int, method: str, kimg: float, fid: float, fitness: float) -> dict:
        return row(seed, method, kimg, fid, fitness_fid=fitness, last_alone_fid=fid + 2, last_alone_fitness_fid=fid + 1,
                   evaluations=60, search_seconds=600 if kimg < 96 else None)

    recs = []
    for s in (0, 1):
        recs += [row(s, "raw", 96, 30 + s), row(s, "ema-hl0.5k", 96, 25 + s), row(s, "ema-hl2k", 96, 20 - s),
                 row(s, "posthoc-0.05", 96, 21), row(s, "posthoc-0.1", 96, 19 + s)]
        # seed 0 reaches its best EMA (20) at 48k: 50% saved; seed 1 (best EMA 19) only at 96k: 0%
        recs += [search(s, "lcsc", k, f, f - 1) for k, f in ((24, 40), (48, 20 if s == 0 else 30), (72, 19.5), (96, 18.5))]
        recs += [row(s, "ect-raw", 32, 70), row(s, "ect-ema", 32, 65), row(s, "ect-ema-2step", 32, 40),
                 search(s, "ect-lcsc", 32, 50 + s, 48)]  # fitness 48: 2 / 3 better than its row FID
        # LCSC's baseline at 48k: the post-hoc EMAs of 48k, best at 0.02 (25 / 26); 0.05 only at the earlier times
        recs += [row(s, "posthoc-0.02", 48, 25 + s), row(s, "posthoc-0.05", 48, 27)]
    # The bench's other EMA half-lives and post-hoc widths, none of them the best.
    planned = [(m, k) for m, k in ya.planned_rows(ya.parse_args([])) if m.startswith(("ema-", "posthoc-"))]
    recs += [row(s, m, k, 99.0) for s in (0, 1) for m, k in planned
             if (m, k) not in {(r["method"], r["kimg"]) for r in recs}]
    records = {"averaging": recs}
    assert tables.lcsc_saved(records) == {0: 0.5, 1: 0.0}
    # Rows land one at a time: a seed without every search time, or without every EMA, takes no part in the bests
    # and the images saved, and one seed gives numbers without a verdict.
    partial = {"averaging": [r for r in recs if (r["seed"], r["method"], r["kimg"]) != (1, "lcsc", 96)]}
    assert tables.lcsc_saved(partial) == {0: 0.5}
    line = next(x for x in tables.claims(partial).splitlines() if x.startswith("| LCSC |"))
    assert "saves 50% of the images" in line and f"| {tables.PENDING} | the run is far from converged" in line
    partial = {"averaging": [r for r in recs if (r["seed"], r["method"]) != (1, "ema-hl8k")]}
    assert set(tables._averaging_best(partial, "ema-")) == {0} and tables.lcsc_saved(partial) == {0: 0.5}
    text = tables.averaging(records)
    assert "| best classic EMA, per seed | 96k | **19.50** (20.00 / 19.00) | hl2k / hl2k |" in text
    assert "| best post-hoc EMA, per seed | 96k | **19.50** (19.00 / 20.00) | sigma_rel 0.1 / sigma_rel 0.1 |" in text
    assert "| post-hoc EMA, sigma_rel 0.02 | 48k" not in text  # the earlier times' widths: only their best
    assert ("| best post-hoc EMA at 48k, per seed | 48k | **25.50** (25.00 / 26.00) | sigma_rel 0.02 / sigma_rel 0.02 |\n"
            "| LCSC over the last raw states | 48k | **25.00** (20.00 / 30.00) |") in text
    assert "| images LCSC saves to the best EMA's final FID |  | 50% / 0% | per seed; aim: 50% |" in text
    # winner: fitness - row = -1; last alone: -1 -> gap 0 on every search
    assert "| 96k | **18.50** (18.50 / 18.50) | last state alone 20.50 / 20.50; fitness FID 17.50; fitness gap +0.00 / +0.00; 60 evaluations, untimed / untimed min" in text
    assert "| 48k | **25.00** (20.00 / 30.00) | last state alone 22.00 / 32.00; fitness FID 24.00; fitness gap +0.00 / +0.00; 60 evaluations, 10 / 10 min" in text
    # ECT's winner is 2 / 3 better on its fitness seeds where the last state alone is 1 better: it fitted them
    assert "| ECT LCSC, 1 step | 96k + 32k | **50.50** (50.00 / 51.00) | fitness gap -1.00 / -2.00; 60 evaluations, 10 / 10 min |" in text
    claims = {line.split(" | ")[0][2:]: line for line in tables.claims(records).splitlines() if line.startswith("| ")}
    assert claims["Post-hoc EMA"].endswith("| yes |  |")  # level within the seeds: as good as
    assert "saves 50% / 0% of the images" in claims["LCSC"]
    assert "| direction only | the run is far from converged" in claims["LCSC"]
    # LCSC's FID at each time against the seed's best post-hoc curve (24k: 99, the planned rows' filler; 48k: 25 / 26;
    # 72k: 99; 96k: 19 / 20), linear in FID: seed 0's 40 at 24k is reached at 24 + 24 * (99 - 40) / (99 - 25) kimg.
    worth = tables.lcsc_equivalent(records)
    assert worth == {24: {0: pytest.approx(24 + 24 * 59 / 74), 1: pytest.approx(24 + 24 * 59 / 73)},
                     48: {0: pytest.approx(72 + 24 * 79 / 80), 1: pytest.approx(24 + 24 * 69 / 73)},
                     72: {0: pytest.approx(72 + 24 * 79.5 / 80), 1: math.inf}, 96: {0: math.inf, 1: math.inf}}
    assert "| 24k: 43.1k / 43.4k; 48k: 95.7k / 46.7k; 72k: " in text
    assert "96k: beyond the run / beyond the run | per seed, linear between its times |" in text
    assert "at equal FID the post-hoc EMA needs 43.1k / 43.4k where LCSC has 24k;" in claims["LCSC"]
    worse = {"averaging": [{**r, "fid": 120.0} if (r["seed"], r["method"], r["kimg"]) == (1, "lcsc", 24) else r
                           for r in recs]}  # worse than the curve's first point: not interpolated to it
    assert tables.lcsc_equivalent(worse)[24][1] == -math.inf
    assert "| 24k: 43.1k / under 24k; " in tables.averaging(worse)
    assert "| no | the step gap: " in claims["LCSC, 1 step"]  # 50.5 at 1 step against 40 at 2 steps; its reason


def test_scoreaug_memorisation_table_and_claim() -> None:
    def rec(method: str, seed: int, kimg: float, fid: float, rate: float) -> dict:
        return {"kind": "eval", "method": method, "variant": "euler20", "seed": seed, "kimg": kimg, "fid": fid,
                "memorisation_rate": rate, "num_images": 1000, "class_accuracy": 0.9, "train": {}}

    records = {"scoreaug": [rec("dit", s, k, 20.0 + k / 100 + s, 0.5 + k / 1000) for s in (0, 1) for k in (96, 384)]
               + [rec("scoreaug", s, k, 18.0 + s, 0.52 + s / 100) for s in (0, 1) for k in (96, 384)]}
    text = tables.memorisation(records, "scoreaug")
    assert "memorisation @ 384 kimg" in text and "**0.884** (0.884 / 0.884)" in text and "**0.525** (0.520 / 0.530)" in text
    line = next(x for x in tables.claims(records).splitlines() if x.startswith("| ScoreAug |"))
    assert "at 384k: memorisation 0.525 (0.520-0.530) vs 0.884 (0.884-0.884)" in line and line.split(" | ")[4] == "yes"
    # the same memorisation at a worse FID is not a "yes"
    worse = {"scoreaug": [r if r["method"] == "dit" else {**r, "fid": 30.0} for r in records["scoreaug"]]}
    line = next(x for x in tables.claims(worse).splitlines() if x.startswith("| ScoreAug |"))
    assert line.split(" | ")[4] == "no"
    # ...but the text says what the plain run's memorisation was when it had that FID (here it never had 30: none).
    assert "memorisation at matched FID" not in line.split(" | ")[3]
    # A ScoreAug run that learns slower: its final FID 20 is where the plain run was between 96k (30, rate 0.2)
    # and 384k (10, rate 0.4): the plain run's memorisation there, 0.3, beside ScoreAug's 0.25.
    slower = {"scoreaug": [rec("dit", s, 96, 30.0, 0.2) for s in (0, 1)] + [rec("dit", s, 384, 10.0, 0.4) for s in (0, 1)]
              + [rec("scoreaug", s, k, 20.0, 0.25) for s in (0, 1) for k in (96, 384)]}
    line = next(x for x in tables.claims(slower).splitlines() if x.startswith("| ScoreAug |"))
    assert "memorisation at matched FID (ScoreAug's final FID, the plain run interpolated to it): 0.250 vs 0.300 / " \
           "0.250 vs 0.300" in line and line.split(" | ")[4] == "no"  # lower memorisation, worse FID at 384k
    # The 500-digit rows have their own points and claim row; the 4,500-digit tables and claim do not mix them in.
    small = {"scoreaug": records["scoreaug"] + [rec("dit_500", s, k, 10.0 + k / 10, 0.4 + k / 400) for s in (0, 1)
                                                for k in (24, 192)]
             + [rec("scoreaug_500", s, k, 12.0, 0.45) for s in (0, 1) for k in (24, 192)]}
    assert tables.memorisation(small, "scoreaug", methods=("dit", "scoreaug")) == tables.memorisation(records, "scoreaug")
    assert "@ 24 kimg" not in tables.fid_vs_kimg(small, "scoreaug", methods=("dit", "scoreaug"))
    text = tables.memorisation(small, "scoreaug", methods=("dit_500", "scoreaug_500"))
    assert "memorisation @ 24 kimg | memorisation @ 192 kimg |" in text and "@ 384" not in text
    assert "**0.880** (0.880 / 0.880)" in text and "**0.450** (0.450 / 0.450)" in text
    claims = {x.split(" | ")[0][2:]: x for x in tables.claims(small).splitlines() if x.startswith("| ScoreAug")}
    assert "at 192k: memorisation 0.450 (0.450-0.450) vs 0.880 (0.880-0.880); FID" in claims["ScoreAug, 500 digits"]
    assert claims["ScoreAug, 500 digits"].split(" | ")[4] == "yes"  # 12 against 29.2: better FID, less memorised
    assert claims["ScoreAug"] == next(x for x in tables.claims(records).splitlines() if x.startswith("| ScoreAug |"))
    assert tables.rate_at_fid([(30.0, 0.1), (20.0, 0.3), (10.0, 0.5)], 15.0) == pytest.approx(0.4)
    assert tables.rate_at_fid([(30.0, 0.1), (20.0, 0.3)], 15.0) is None


def test_tokenizer_dilemma_claim_reads_reconstruction_and_generation() -> None:
    """The VA-VAE dilemma needs both halves: rFID better with 64 channels than with 4, generation FID worse."""
    def recon(method: str, channels: int, rfid: float) -> dict:
        return {"kind": "recon", "method": method, "channels": channels, "vf": False, "rfid": rfid}

    def gen(method: str, seed: int, fid: float) -> dict:
        return {"kind": "eval", "method": method, "variant": "euler20", "seed": seed, "kimg": 96.0, "fid": fid,
                "num_images": 1000, "class_accuracy": 0.9, "train": {}}

    recs = [recon("kl_f4d4", 4, 30.0), recon("kl_f4d16", 16, 12.0), recon("kl_f4d64", 64, 3.0)]
    recs += [gen("kl_f4d4", s, 10.0 + s) for s in (0, 1)] + [gen("kl_f4d16", s, 14.0 + s) for s in (0, 1)]
    recs += [gen("kl_f4d64", s, 20.0 + s) for s in (0, 1)]

    def claim(rs: list[dict]) -> str:
        return next(x for x in tables.claims({"yardstick_tokenizers": rs}).splitlines()
                    if x.startswith("| VA-VAE, dilemma |"))

    def verdict(rs: list[dict]) -> str:
        return claim(rs).split(" | ")[-2]  # the "agrees" column; the reason follows it

    line = claim(recs)
    assert "rFID 30.00 / 12.00 / 3.00, generation FID 10.5 / 14.5 / 20.5 at 4 / 16 / 64 channels" in line
    assert verdict(recs) == "yes"
    # Generation worse but reconstruction not better: only half of the dilemma is shown.
    flat = [recon("kl_f4d64", 64, 40.0) if r.get("method") == "kl_f4d64" and r["kind"] == "recon" else r for r in recs]
    assert verdict(flat) == "generation only; reconstruction not better"
    # Neither half (generation level within the spread, reconstruction not better): no.
    level = [r for r in flat if not (r.get("method") == "kl_f4d64" and r["kind"] == "eval")]
    level += [gen("kl_f4d64", 0, 9.0), gen("kl_f4d64", 1, 12.0)]
    assert verdict(level) == "no"
    # One generator seed of a row: numbers, no verdict.
    assert verdict([r for r in recs if not (r["kind"] == "eval" and r["seed"] == 1)]) == tables.PENDING
    assert "not measured yet" in claim([r for r in recs if r["method"] != "kl_f4d64"])


def test_a_student_of_another_training_of_its_teacher_is_named_in_its_claim() -> None:
    """A student's records name the snapshot it started from (``init_sha256``); where that is not a snapshot the
    teacher's records measured (the teacher trained again, on another host), the claim text says which seeds."""
    def rec(method: str, seed: int, variant: str, fid: float, **extra: str) -> dict:
        return {"kind": "eval", "method": method, "variant": variant, "seed": seed, "kimg": 96.0 if method == "dit"
                else 32.0, "fid": fid, "num_images": 1000, "class_accuracy": 0.9, "train": {}, **extra}

    teacher = [rec("dit", s, v, f, snapshot_sha256=f"t{s}") for s in (0, 1)
               for v, f in (("euler20", 20.0), ("qs", 8.0))]
    students = [rec("tdm", s, "tdm4", 8.5, init_sha256=f"t{s}") for s in (0, 1)]

    def line(recs: list[dict]) -> str:
        return next(x for x in tables.claims({"distill": recs}).splitlines() if x.startswith("| TDM |"))

    assert "another training" not in line(teacher + students)
    moved = teacher + [students[0], {**students[1], "init_sha256": "retrained"}]
    assert "; seed 1: the student started from another training of the teacher than its records measured" in line(moved)
    assert "another training" not in line(teacher + [{k: v for k, v in r.items() if k != "init_sha256"} for r in students])


def test_memorisation_reference_follows_a_run_on_a_subset(tmp_path: Path) -> None:
    """A run on ``data.dataset.subset`` writes its data spec into the snapshot, and the bench measures memorisation
    against exactly those training digits; a bad subset is refused before training, naming the key."""
    from gen.data import MNIST5k
    from tests.conftest import run_train

    run_train(tmp_path, "sub", ["data.dataset.subset=30", "trainer.total_kimg=0.064", "trainer.snapshot_kimg=0.064",
                                "trainer.checkpoint_kimg=0.064", "trainer.status_kimg=0.032"])
    snap = sorted((tmp_path / "sub").glob("snapshot-*.safetensors"))[-1]
    trained_on = yardstick._trained_on(snap)
    assert trained_on is not None and torch.equal(trained_on, MNIST5k(subset=30).tensors()[0])
    bad = run_train(tmp_path, "bad", ["data.dataset.subset=4501"], check=False)
    assert bad.returncode != 0 and "data.dataset" in bad.stderr and "subset=4501" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()


def test_lcsc_sources_bench_times_held_and_streamed_combinations_that_agree(tmp_path: Path) -> None:
    import lcsc_sources

    paths, ref = lcsc_sources.synthetic_sources(tmp_path, 3, 0.001)
    rec = lcsc_sources.measure(paths, ref, [], rounds=2, evals=1, work=tmp_path)
    assert rec["identical"] is True and len(rec["rounds"]["held"]) == len(rec["rounds"]["streamed"]) == 2
    assert rec["speedup_median"] > 0 and (tmp_path / "candidate.safetensors").is_file()
    out = tmp_path / "records.json"
    lcsc_sources.main(["--synthetic-mparams", "0.001", "--last", "2", "--rounds", "1", "--evals", "1", "--out", str(out)])
    lcsc_sources.main(["--synthetic-mparams", "0.001", "--last", "2", "--rounds", "1", "--evals", "1", "--out", str(out)])
    assert [r["n"] for r in json.loads(out.read_text())["records"]] == [2, 2]  # appended
    with pytest.raises(SystemExit):
        lcsc_sources.main(["--out", str(out)])  # neither --run nor --synthetic-mparams
