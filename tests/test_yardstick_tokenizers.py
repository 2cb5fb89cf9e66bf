"""The tokenizer yardstick (bench/yardstick_tokenizers.py) on fake run folders: the rows and their commands, the
estimate of the work left (closed form), resumption (stored records, trained runs and extractions are not redone),
the --jobs scheduler (a row's generators start after its tokenizer finished) and the table (bench/tables.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import tables  # noqa: E402
import yardstick  # noqa: E402
import yardstick_tokenizers as yt  # noqa: E402


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return [f"--runs={tmp_path / 'runs' / 'tokenizers'}", f"--results={tmp_path / 'results'}", *extra]


def _parsed(tmp_path: Path, *extra: str):  # the namespace main() works on
    args = yt.build_parser().parse_args(_args(tmp_path, *extra))
    args.runs, args.results = args.runs.resolve(), args.results.resolve()
    args.kimg = tuple(sorted(float(k) for k in args.kimg.split(",")))
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.methods = args.methods.split(",")
    args.variants = args.variants.split(",")
    return args


def _estimate(capsys: pytest.CaptureFixture[str], argv: list[str]) -> int:
    assert yt.main(argv) == 0
    out = capsys.readouterr().out
    found = re.findall(r"^ESTIMATE_SECONDS=(\d+)$", out, re.MULTILINE)
    assert len(found) == 1 and out.rstrip().endswith(f"ESTIMATE_SECONDS={found[0]}")
    return int(found[0])


def test_rows_are_the_channel_sweep_with_and_without_the_vf_loss() -> None:
    assert yt.row_names() == ["pixels", "kl_f4d4", "vavae_f4d4", "kl_f4d16", "vavae_f4d16", "kl_f4d64", "vavae_f4d64"]
    toks = yt.tokenizers("foundation-mnist5k")
    assert [t.method for t in toks if t.vf] == ["vavae_f4d4-foundation", "vavae_f4d16-foundation",
                                                 "vavae_f4d64-foundation"]
    assert [t.method for t in toks if not t.vf] == ["kl_f4d4", "kl_f4d16", "kl_f4d64"]  # the encoder does not touch them
    vf = toks[1]
    assert (vf.experiment, vf.preset) == ("yardstick_vavae_f4d4", "yardstick_kl_f4d4")


def test_commands_name_the_presets_the_latents_and_the_shared_pixel_run(tmp_path: Path) -> None:
    args = _parsed(tmp_path, "--tokenizer-kimg=8", "--vf-encoder=foundation-mnist5k")
    runs = tmp_path / "runs"
    tok = yt._tok(args, "vavae_f4d64-foundation")
    cmd = yt.tokenizer_run(args, tok).train_command()
    for arg in ("experiment=yardstick_vavae_f4d64", "method.foundation.name=foundation-mnist5k", "seed=0",
                "trainer.total_kimg=8", "trainer.snapshot_kimg=8", f"run_dir={runs / 'tokenizers' / 'tok-vavae_f4d64-foundation-s0'}"):
        assert arg in cmd
    gen = yt.generator_run(args, "vavae_f4d64-foundation", 1)
    cmd = gen.train_command()
    assert gen.run_dir == runs / "tokenizers" / "vavae_f4d64-foundation-s1"
    for arg in ("experiment=yardstick_lightningdit", "model.patch_size=1", "tokenizer=yardstick_kl_f4d64",
                f"data.dataset.root={runs / 'tokenizers' / 'latents-vavae_f4d64-foundation'}",
                f"tokenizer.weights={runs / 'tokenizers' / 'tok-vavae_f4d64-foundation-s0' / 'snapshot-000008000.safetensors'}",
                "trainer.total_kimg=96", "trainer.snapshot_kimg=16", "seed=1"):
        assert arg in cmd
    # Pixels at the protocol's points is the backbone table's LightningDiT run; at other points its own.
    assert yt.generator_run(args, "pixels", 0).run_dir == runs / "backbones" / "lightningdit-s0"
    args.kimg = (0.5,)
    assert yt.generator_run(args, "pixels", 0).run_dir == runs / "tokenizers" / "pixels-s0"


def test_estimate_of_a_fresh_sweep_is_the_closed_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seconds = _estimate(capsys, _args(tmp_path, "--estimate", "--jobs=2", "--tokenizer-kimg=10", "--sec-per-kimg=7"))
    tok = sum(10 * s + yt.SEC_PER_RECON + yt.SEC_PER_EXTRACT for s in yt.TOKENIZER_SEC_PER_KIMG.values())
    gen = 2 * 7 * (96 * 7 + 5 * yt.SEC_PER_EVAL)  # 7 rows x 2 seeds: 96 kimg, 4 points + the CFG sampler at 96
    assert seconds == round((tok + gen) / 2)
    # One job, one row, one seed, only the Euler points.
    one = _estimate(capsys, _args(tmp_path, "--estimate", "--methods=kl_f4d64", "--seeds=0", "--variants=euler20",
                                  "--tokenizer-kimg=10", "--sec-per-kimg=7"))
    assert one == round(10 * yt.TOKENIZER_SEC_PER_KIMG[(64, False)] + yt.SEC_PER_RECON + yt.SEC_PER_EXTRACT
                        + 96 * 7 + 4 * yt.SEC_PER_EVAL)


def test_dry_run_prints_the_commands_and_does_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert yt.main(_args(tmp_path, "--dry-run", "--methods=pixels,kl_f4d16", "--seeds=1")) == 0
    out = capsys.readouterr().out
    assert "python train.py experiment=yardstick_kl_f4d16 method" not in out  # the plain KL row has no VF encoder
    assert "python train.py experiment=yardstick_kl_f4d16 seed=0" in out
    assert "python -m eval recon --tokenizer" in out and "python -m scripts.extract_latents" in out
    assert "experiment=yardstick_lightningdit seed=1" in out and "model.patch_size=1" in out
    assert "ESTIMATE_SECONDS=" in out
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def _fake_done(tmp_path: Path, method: str, seed: int, kimg: float = 0.5) -> None:
    """A finished row: tokenizer snapshot, latents, reconstruction and every evaluation record stored."""
    args = _parsed(tmp_path, f"--kimg={kimg:g}", f"--tokenizer-kimg={kimg:g}")
    store = yardstick.Store(args.results / f"{yt.BENCH}.json")
    if method != "pixels":
        tok = yt._tok(args, method)
        snap = yt.tokenizer_snapshot(args, tok)
        snap.parent.mkdir(parents=True, exist_ok=True)
        snap.write_bytes(b"")
        yt.latents_dir(args, tok).mkdir(parents=True)
        (yt.latents_dir(args, tok) / "stats.json").write_text("{}")
        store.put({"kind": "recon", "key": yt.recon_key(args, tok), "method": method, "rfid": 1.0, "psnr": 2.0,
                   "ssim": 0.5, "kimg": kimg, "channels": tok.channels, "vf": tok.vf, "vf_encoder": tok.encoder,
                   "snapshot_sha256": yt.file_sha256(snap)})
    row = yt.generator_row(args, method)
    for v in (yardstick.EULER20, yardstick.QUICKSTART):
        store.put({"kind": "eval", "key": yardstick._eval_key(yt.BENCH, row, seed, kimg, v, args.num_images),
                   "method": row.method, "variant": v.name, "seed": seed, "kimg": kimg, "fid": 50.0 + seed,
                   "class_accuracy": 0.5, "num_images": args.num_images, "eval_seconds": 40.0,
                   "command": yt.record_command(args, method, seed, kimg, v.name)})


def test_stored_records_and_finished_steps_are_not_redone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_done(tmp_path, "kl_f4d16", 0)
    _fake_done(tmp_path, "pixels", 0)
    common = ["--methods=pixels,kl_f4d16", "--seeds=0", "--kimg=0.5", "--tokenizer-kimg=0.5"]
    before = (tmp_path / "results" / f"{yt.BENCH}.json").read_text()
    assert _estimate(capsys, _args(tmp_path, "--estimate", *common)) == 0
    assert yt.main(_args(tmp_path, *common)) == 0  # nothing to train, measure, extract or evaluate
    out = capsys.readouterr().out
    assert "[skip] yardstick_tokenizers/kl_f4d16-s0: every record is stored" in out
    assert "[skip] yardstick_tokenizers/pixels-s0: every record is stored" in out
    assert "[train]" not in out and "[extract]" not in out and "[recon]" not in out
    assert (tmp_path / "results" / f"{yt.BENCH}.json").read_text() == before
    assert not (tmp_path / "runs" / "tokenizers" / "kl_f4d16-s0").exists()
    # Seed 1 of the same row: the tokenizer is done, only its generator is left (96 kimg? no: 0.5 kimg, 2 evals).
    one = _estimate(capsys, _args(tmp_path, "--estimate", "--methods=kl_f4d16", "--seeds=1", "--kimg=0.5",
                                  "--tokenizer-kimg=0.5", "--sec-per-kimg=8"))
    assert one == round(0.5 * 8 + 2 * 40.0)  # the stored evaluations' median time replaces the default


def test_jobs_start_a_rows_generators_after_its_tokenizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _parsed(tmp_path, "--methods=pixels,kl_f4d4,vavae_f4d4", "--seeds=0,1", "--jobs=2", "--poll=0.02")
    tasks = yt.plan(args, yardstick.Store(args.results / "none.json"))
    assert [t.name for t in tasks] == ["tok-kl_f4d4", "tok-vavae_f4d4", "pixels-s0", "kl_f4d4-s0", "vavae_f4d4-s0",
                                       "pixels-s1", "kl_f4d4-s1", "vavae_f4d4-s1"]
    journal = tmp_path / "journal.txt"
    # The first tokenizer finishes only once pixels (which needs none) has started beside it (or after 60 s).
    wait = (f"t = time.time()\nwhile 'start pixels-s0' not in open({str(journal)!r}).read() and time.time() - t < 60:"
            "\n    time.sleep(0.02)\n")

    def fake(args_: object, task: yt.Task) -> list[str]:
        code = (f"import time\nf = open({str(journal)!r}, 'a'); f.write('start {task.name}\\n'); f.flush()\n"
                + (wait if task.name == "tok-kl_f4d4" else "")
                + f"f.write('end {task.name}\\n'); f.close()\n")
        return [sys.executable, "-c", code]

    monkeypatch.setattr(yt, "worker_command", fake)
    assert yt.run_jobs(tasks, args) == []
    lines = journal.read_text().splitlines()
    assert sorted(x.split()[1] for x in lines if x.startswith("end")) == sorted(t.name for t in tasks)
    for m in ("kl_f4d4", "vavae_f4d4"):
        for s in (0, 1):
            assert lines.index(f"end tok-{m}") < lines.index(f"start {m}-s{s}")
    # pixels needs no tokenizer: it starts while the slow tokenizer still trains.
    assert lines.index("start pixels-s0") < lines.index("end tok-kl_f4d4")


def test_a_failed_tokenizer_skips_its_generators(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _parsed(tmp_path, "--methods=kl_f4d4", "--seeds=0", "--jobs=2", "--poll=0.02")
    tasks = yt.plan(args, yardstick.Store(args.results / "none.json"))
    monkeypatch.setattr(yt, "worker_command", lambda a, t: [sys.executable, "-c", "raise SystemExit(3)"])
    assert yt.run_jobs(tasks, args) == ["tok-kl_f4d4", "kl_f4d4-s0"]


def test_unknown_rows_are_refused_with_the_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        yt.main(_args(tmp_path, "--methods=kl_f4d8", "--estimate"))
    assert e.value.code == 2
    assert "unknown rows or variants ['kl_f4d8']" in capsys.readouterr().err


def test_table_shows_the_sweep_in_order_with_both_seeds() -> None:
    def ev(method: str, seed: int, kimg: float, fid: float, variant: str = "euler20") -> dict:
        return {"kind": "eval", "method": method, "seed": seed, "kimg": kimg, "variant": variant, "fid": fid,
                "class_accuracy": 0.9 + seed / 100, "num_images": 1000}

    recs = [
        {"kind": "recon", "method": "vavae_f4d4", "channels": 4, "vf": True, "vf_encoder": "foundation-mnist5k",
         "rfid": 3.0, "psnr": 20.0, "ssim": 0.8, "kimg": 48},
        {"kind": "recon", "method": "kl_f4d64", "channels": 64, "vf": False, "vf_encoder": None, "rfid": 1.0,
         "psnr": 30.0, "ssim": 0.95, "kimg": 48},
        {"kind": "recon", "method": "kl_f4d4", "channels": 4, "vf": False, "vf_encoder": None, "rfid": 2.5,
         "psnr": 21.0, "ssim": 0.81, "kimg": 48},
    ]
    for m in ("lightningdit", "kl_f4d4", "vavae_f4d4", "kl_f4d64"):
        for s in (0, 1):
            recs += [ev(m, s, 16, 40.0 + s), ev(m, s, 32, 20.0 + 2 * s), ev(m, s, 32, 10.0 + s, "qs")]
    out = tables.tokenizers({"yardstick_tokenizers": recs})
    lines = [x for x in out.splitlines() if x.startswith("| ")]
    assert lines[0] == ("| row | channels | VF loss | rFID | PSNR | SSIM | FID @ 16 kimg | FID @ 32 kimg | "
                        "FID, CFG 2 @ 32 kimg | class acc. (Euler 20 / CFG 2) |")
    assert [x.split(" | ")[0] for x in lines[1:]] == ["| pixels (patch 4)", "| kl_f4d4", "| vavae_f4d4", "| kl_f4d64"]
    assert lines[2] == ("| kl_f4d4 | 4 | no | 2.50 | 21.00 | 0.810 | **40.5** (40.0 / 41.0) | **21.0** (20.0 / 22.0) | "
                        "**10.5** (10.0 / 11.0) | 0.905 / 0.905 |")
    assert "| vavae_f4d4 | 4 | yes (foundation-mnist5k) | 3.00 |" in lines[3]
    assert out.startswith("Tokenizers trained 48 kimg (seed 0); generator FID of 1,000 samples")


def test_record_commands_rerun_one_record_with_the_bench_settings(tmp_path: Path) -> None:
    args = _parsed(tmp_path, "--tokenizer-kimg=32", "--vf-encoder=foundation-mnist5k")
    cmd = yt.record_command(args, "vavae_f4d64-foundation", 1, 96, "qs")
    assert cmd == ("python bench/yardstick_tokenizers.py --methods=vavae_f4d64-foundation --seeds=1 --kimg=96 "
                   f"--variants=qs --tokenizer-kimg=32 --vf-encoder=foundation-mnist5k --runs={tmp_path / 'runs' / 'tokenizers'}")
    args.runs = yt.DEFAULT_RUNS
    assert yt.record_command(args, "pixels", 0, 16, "euler20") == (
        "python bench/yardstick_tokenizers.py --methods=pixels --seeds=0 --kimg=16 --variants=euler20")
    # A single protocol point still names the backbone table's run, so the command re-evaluates that run.
    args.kimg = (96.0,)
    assert yt.generator_run(args, "pixels", 0).run_dir == yt.DEFAULT_RUNS.parent / "backbones" / "lightningdit-s0"


def test_pixel_records_of_the_backbone_table_are_adopted_not_remeasured(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The pixels row is the backbone table's LightningDiT run: its stored evaluations (same digest) are copied, so a
    checkout that kept the records but not the runs does not train that run again."""
    args = _parsed(tmp_path)
    backbones = yardstick.Store(args.results / "backbones.json")
    for k in args.kimg:
        for v in (yardstick.EULER20, yardstick.QUICKSTART):
            if v.at == "last" and k != max(args.kimg):
                continue
            key = yardstick._eval_key("backbones", yt.PIXEL_ROW, 0, k, v, args.num_images)
            backbones.put({"kind": "eval", "key": key, "bench": "backbones", "method": "lightningdit", "seed": 0,
                           "kimg": k, "variant": v.name, "fid": 100.0 / k, "num_images": args.num_images,
                           "eval_seconds": 40.0, "snapshot_sha256": "ab" * 32})
    backbones.put({"kind": "eval", "key": "backbones|lightningdit|s0|k96|euler20|n1000|000000000000", "fid": 1.0})
    seconds = _estimate(capsys, _args(tmp_path, "--estimate", "--methods=pixels", "--sec-per-kimg=7"))
    assert seconds == round(96 * 7 + 5 * yt.SEC_PER_EVAL)  # seed 1 only: seed 0's five records are the backbone's
    assert not (tmp_path / "results" / f"{yt.BENCH}.json").exists()  # the estimate writes nothing
    assert yt.main(_args(tmp_path, "--methods=pixels", "--seeds=0", "--no-table")) == 0
    out = capsys.readouterr().out
    assert out.count("[adopt]") == 5 and "[skip] yardstick_tokenizers/lightningdit-s0: every record is stored" in out
    assert "[train]" not in out and not (tmp_path / "runs").exists()
    recs = {r["key"]: r for r in yardstick.Store(args.results / f"{yt.BENCH}.json").records()}
    assert len(recs) == 5
    for k in args.kimg:
        rec = recs[yardstick._eval_key(yt.BENCH, yt.PIXEL_ROW, 0, k, yardstick.EULER20, args.num_images)]
        assert rec["fid"] == 100.0 / k and rec["adopted_from"].startswith("backbones|lightningdit|s0|")
        assert rec["bench"] == yt.BENCH and rec["command"] == yt.record_command(args, "pixels", 0, k, "euler20")
    # --refresh measures again instead of adopting; points outside the protocol's are the row's own run.
    assert yt.backbone_records(_parsed(tmp_path, "--refresh"), yardstick.Store(tmp_path / "empty.json")) == []
    assert yt.backbone_records(_parsed(tmp_path, "--kimg=0.5"), yardstick.Store(tmp_path / "empty.json")) == []


def test_a_tokenizer_trained_again_differently_is_measured_again_and_flagged(tmp_path: Path) -> None:
    """A checkout without runs/ trains a tokenizer again: if its snapshot differs from the one the stored rFID
    measured, the reconstruction is measured again, and the table flags a row whose records name two tokenizers."""
    _fake_done(tmp_path, "kl_f4d16", 0)
    args = _parsed(tmp_path, "--kimg=0.5", "--tokenizer-kimg=0.5", "--methods=kl_f4d16", "--seeds=0")
    store = yardstick.Store(args.results / f"{yt.BENCH}.json")
    tok = yt._tok(args, "kl_f4d16")
    assert yt.stored_recon(args, tok, store) is not None and yt.plan(args, store) == []
    yt.tokenizer_snapshot(args, tok).write_bytes(b"another training")
    assert yt.stored_recon(args, tok, store) is None
    (task,) = yt.plan(args, store)
    assert task.kind == "tokenizer" and any("python -m eval recon" in c for c in task.commands)
    # The table: the recon record measured one snapshot, a generator record decoded with another.
    recs = store.records()
    recon = next(r for r in recs if r["kind"] == "recon")
    ev = [r for r in recs if r["kind"] == "eval"]
    mixed = [recon, *[{**r, "tokenizer_sha256": "cd" * 32} for r in ev]]
    assert "kl_f4d16 (records from 2 tokenizer trainings)" in tables.tokenizers({yt.BENCH: mixed})
    same = [recon, *[{**r, "tokenizer_sha256": recon["snapshot_sha256"]} for r in ev]]
    assert "tokenizer trainings" not in tables.tokenizers({yt.BENCH: same})
