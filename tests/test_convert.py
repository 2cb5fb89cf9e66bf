"""Converters from published checkpoints (``scripts/convert.py``, ``gen/models/convert.py``).

The fixtures ``tests/fixtures/convert/<source>_keys.json`` hold the key names and shapes of each official module at
a small size (width 64, 3 blocks, 4 heads, 10 classes, 4 latent channels, 8x8 latents; DDT: 4 blocks, 3 in the
encoder), listed from the official code. ``write_checkpoint`` fills them with seeded random values and wraps them in
the source's container (published state dict, train.py checkpoint, or DDT's Lightning checkpoint). The converted
snapshot must map every key (or list it as dropped), rebuild, and sample through ``sample.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gen.models.convert import ConvertError, convert_state, read_checkpoint, select_weights
from gen.nn import rope_2d_axial
from gen.utils.ckpt import file_sha256
from scripts import convert as cli

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "convert"
SOURCES = ("dit", "sit", "repa", "reg", "lightningdit", "ddt")
HEADS = ["--num-heads", "4"]
EXTRA = {"ddt": ["--encoder-blocks", "3", "--resolution", "16"]}


def official_keys(source: str) -> dict[str, list[int]]:
    return json.loads((FIXTURES / f"{source}_keys.json").read_text())["keys"]


def random_state(source: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random tensors with the official names and shapes (norm weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_keys(source).items():
        v = 0.2 * torch.randn(shape, generator=g)
        if key.endswith("norm.weight") or key.endswith(("norm1.weight", "norm2.weight", "norm_final.weight")):
            v = 1.0 + 0.1 * v
        state[key] = v
    if source == "reg":  # the class token's position: the official table prepends a zero row
        state["pos_embed"][:, 0] = 0.0
    if source == "lightningdit":  # buffers of the official module: its RoPE tables (checked equal to ours)
        cos, sin = rope_2d_axial(64 // 4, 8, 8, 10000.0)
        state["feat_rope.freqs_cos"], state["feat_rope.freqs_sin"] = cos, sin
    return state


def write_checkpoint(source: str, path: Path, seed: int = 0) -> Path:
    """The source's container around ``random_state``."""
    state = random_state(source, seed)
    if source == "dit":  # the published DiT-XL-2-256x256.pt is a bare EMA state dict
        obj: object = state
    elif source == "ddt":  # Lightning: {"state_dict": {denoiser., ema_denoiser., ...}, counters}
        inner = {f"ema_denoiser.{k}": v for k, v in state.items()}
        inner.update({f"denoiser.{k}": v + 1 for k, v in state.items()})
        obj = {"state_dict": inner, "epoch": 3, "global_step": 100}
    else:  # SiT / REPA / REG / LightningDiT train.py: model, ema, opt, args
        obj = {"model": {k: v + 1 for k, v in state.items()}, "ema": state,
               "opt": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
               "args": argparse.Namespace(model="SiT-XL/2", lr=1e-4), "steps": 100}
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny KL autoencoder (4 latent channels, factor 2) with its weights in a file, as a tokenizer spec."""
    from tokenizers.kl import AutoencoderKLTokenizer

    folder = tmp_path_factory.mktemp("tok")
    tok = AutoencoderKLTokenizer(block_out_channels=(32, 32), latent_channels=4, seed=3)
    save_file({k: v.contiguous() for k, v in tok.vae.state_dict().items()}, str(folder / "tok.safetensors"))
    spec = {"_target_": "tokenizers.kl.AutoencoderKLTokenizer", "block_out_channels": [32, 32], "latent_channels": 4,
            "weights": str(folder / "tok.safetensors"), "scaling_factor": 0.5}
    (folder / "tok.yaml").write_text(json.dumps(spec))
    return folder / "tok.yaml"


def run_cli(source: str, ckpt: Path, out: Path, tokenizer: Path, *extra: str) -> int:
    args = ["--from", source, "--ckpt", str(ckpt), "--out", str(out), "--tokenizer", str(tokenizer), *HEADS,
            *EXTRA.get(source, []), *extra]
    if source == "lightningdit":
        stats = out.parent / "stats.json"
        stats.write_text(json.dumps({"mean": [0.1, -0.2, 0.0, 0.3], "std": [1.5, 0.5, 1.0, 2.0]}))
        args += ["--latent-stats", str(stats)]
    return cli.main(args)


# ---------------------------------------------------------------------------------------------------------
# Key maps


def _expected_keys(source: str) -> tuple[set[str], set[str]]:
    """(our keys, dropped official keys) derived from the official key list by the documented rules."""
    keys = set(official_keys(source))
    dropped = {k for k in keys if k.startswith(("projectors.", "feat_rope."))}
    ours = keys - dropped
    if source == "reg":
        ren = {"cls_projectors2": "extra_embed", "wg_norm": "extra_norm", "final_layer.linear_cls": "extra_head"}
        ours = {next((k.replace(a, b, 1) for a, b in ren.items() if k.startswith(a + ".")), k) for k in ours}
    if source == "ddt":
        ours = {k.replace("_embedder.proj.", "_embedder.") for k in ours if not k.endswith(("mlp.w1.weight", "mlp.w2.weight"))}
        ours = {k.replace("mlp.w3.weight", "mlp.w12.weight") for k in ours} | {
            k.replace("mlp.w2.weight", "mlp.w3.weight") for k in keys if k.endswith("mlp.w2.weight")}
    return ours, dropped


@pytest.mark.parametrize("source", SOURCES)
def test_every_official_key_is_mapped_or_dropped(source: str) -> None:
    state = random_state(source)
    conv = convert_state(source, state, "fixture", num_heads=4, encoder_blocks=3, input_size=8)
    ours, dropped = _expected_keys(source)
    assert set(conv.tensors) == ours
    assert {d.split(" ")[0] for d in conv.dropped} == dropped
    # Values move, not only names.
    if source == "ddt":
        w12 = conv.tensors["blocks.1.mlp.w12.weight"]
        assert torch.equal(w12, torch.cat([state["blocks.1.mlp.w1.weight"], state["blocks.1.mlp.w3.weight"]]))
        assert torch.equal(conv.tensors["blocks.1.mlp.w3.weight"], state["blocks.1.mlp.w2.weight"])
        assert conv.model["num_encoder_blocks"] == 3 and conv.model["max_period"] == 10.0
    elif source == "reg":
        assert torch.equal(conv.tensors["pos_embed"], state["pos_embed"][:, 1:])
        assert torch.equal(conv.tensors["extra_head.weight"], state["final_layer.linear_cls.weight"])
        assert conv.model["extra_token_dim"] == 48
    else:
        assert torch.equal(conv.tensors["blocks.2.attn.qkv.weight"], state["blocks.2.attn.qkv.weight"])
    assert conv.model["time_scale"] == 1.0
    assert conv.model.get("learn_sigma", False) == (source in ("dit", "sit"))
    precond = conv.prediction["precond"]
    expected = {"dit": "gen.models.adapters.DDPMEpsilon", "repa": None, "reg": None}.get(
        source, "gen.models.adapters.FlippedTimeVelocity")
    assert (precond or {}).get("_target_") == expected
    assert conv.prediction["prediction"] == ("eps" if source == "dit" else "velocity")


def test_published_sizes_are_recognised_from_shapes() -> None:
    """A DiT-XL/2-shaped state dict (meta tensors: no memory) is named and gets 16 heads without --num-heads."""
    with torch.device("meta"):
        from gen.models.dit import DiT

        net = DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, learn_sigma=True)
    state = {k: v for k, v in net.state_dict().items()}
    conv = convert_state("dit", state, "xl.pt")
    assert conv.preset == "DiT-XL/2" and conv.model["num_heads"] == 16 and conv.model["input_size"] == 32
    with pytest.raises(ConvertError, match="not the B that --size asks for"):
        convert_state("dit", state, "xl.pt", expect_size="B")


def test_select_weights_prefers_the_ema_and_lists_the_rest(tmp_path: Path) -> None:
    obj = read_checkpoint(write_checkpoint("sit", tmp_path / "sit.pt"))
    state, dropped = select_weights(obj, "sit", "sit.pt")
    assert torch.equal(state["pos_embed"], random_state("sit")["pos_embed"])  # ema, not model (= ema + 1)
    assert {d.split(" ")[0] for d in dropped} == {"model", "opt", "args", "steps"}
    obj = read_checkpoint(write_checkpoint("ddt", tmp_path / "ddt.pt"))
    state, dropped = select_weights(obj, "ddt", "ddt.pt")
    assert torch.equal(state["y_embedder.embedding_table.weight"], random_state("ddt")["y_embedder.embedding_table.weight"])
    assert any(d.startswith("denoiser.*") for d in dropped) and any(d.startswith("epoch") for d in dropped)


# ---------------------------------------------------------------------------------------------------------
# The command, the snapshot and sample.py


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("source", SOURCES)
def test_converted_checkpoint_samples_through_sample_py(source: str, tmp_path: Path, tokenizer_file: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(source, tmp_path / f"{source}.pt")
    out = tmp_path / "snap.safetensors"
    assert run_cli(source, ckpt, out, tokenizer_file) == 0
    printed = capsys.readouterr().out
    assert f"converted {ckpt.name}" in printed
    if source in ("repa", "reg"):
        assert "dropped: projectors.0.0.weight" in printed
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["config"])
    assert meta["source"]["sha256"] == file_sha256(ckpt) and meta["source"]["from"] == source
    assert meta["data"]["resolution"] == 16 and meta["data"]["num_classes"] == 10
    assert meta["tokenizer"]["weights"] == json.loads(tokenizer_file.read_text())["weights"]
    if source == "lightningdit":
        assert meta["tokenizer"]["mean"] == pytest.approx([0.1, -0.2, 0.0, 0.3])
    # The paper's sampler stored in the snapshot runs with this prediction spec (grid, guidance streams, solver).
    from pipeline import SamplerSpec, check_sampler

    check_sampler(SamplerSpec.from_config(meta["sampler"]), meta["prediction"], 10,
                  int(meta["model"].get("extra_token_dim") or 0))
    assert meta["sampler"] == cli._yaml("sampler", cli.DEFAULT_SAMPLER[source])
    # sample.py with nothing but the snapshot (dit), or a few seeds (the others, to keep the suite short).
    seeds = [] if source == "dit" else ["seeds=0-3"]
    # The tokenizer's weights are named by the user (a path in the snapshot's metadata is never followed).
    weights = f"tokenizer_weights={meta['tokenizer']['weights']}"
    proc = subprocess.run([sys.executable, "sample.py", f"snapshot={out}", weights, *seeds], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    samples = tmp_path / "samples" / "snap"
    assert json.loads((samples / "sample.json").read_text())["snapshot_sha256"] == file_sha256(out)
    import numpy as np

    arr = np.load(samples / "samples.npz")["arr_0"]
    assert arr.shape == ((64 if source == "dit" else 4), 16, 16, 3) and arr.std() > 0


@pytest.mark.parametrize("source", ["dit", "reg"])
def test_eval_generator_runs_the_stored_sampler(source: str, tmp_path: Path, tokenizer_file: Path) -> None:
    """``python -m eval ... --generator pipeline:snapshot_generate_fn`` on a converted snapshot, no options: the
    paper's sampler stored at conversion (DiT: 128 Heun steps with 3-channel CFG; REG: 250 SDE steps, two streams)."""
    from pipeline import snapshot_generate_fn

    out = tmp_path / "snap.safetensors"
    assert run_cli(source, write_checkpoint(source, tmp_path / "c.pt"), out, tokenizer_file) == 0
    weights = json.loads(tokenizer_file.read_text())["weights"]
    images, labels = snapshot_generate_fn(str(out), batch_device="cpu", tokenizer_weights=weights)([0, 1])
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8 and labels.shape == (2,)
    again, _ = snapshot_generate_fn(str(out), batch_device="cpu", tokenizer_weights=weights)([1])
    assert torch.equal(again[0], images[1])  # image k depends on seed k only


def test_vavae_converts_to_a_tokenizer_snapshot(tmp_path: Path) -> None:
    from tokenizers.vavae import VAVAE, make_random_vavae_checkpoint

    ldm = make_random_vavae_checkpoint(tmp_path / "ldm.safetensors", seed=0)
    out = tmp_path / "vavae.safetensors"
    assert cli.main(["--from", "vavae", "--ckpt", str(ldm), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["config"])
    assert meta["tokenizer_weights"] == "snapshot" and meta["source"]["sha256"] == file_sha256(ldm)
    z = torch.randn(1, 32, 2, 2, generator=torch.Generator().manual_seed(0))
    a, b = VAVAE(weights=str(ldm)).decode(z), VAVAE(weights=str(out)).decode(z)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# Refusals: one line, exit status 2, nothing written


def _refused(capsys: pytest.CaptureFixture[str], code: int, out: Path, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("python -m scripts.convert: error: ") and err.count("\n") == 1, err
    for n in needles:
        assert n in err, err
    assert not out.exists()


def test_refuses_unknown_and_truncated_files(tmp_path: Path, tokenizer_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.safetensors"
    junk = tmp_path / "notes.pt"
    junk.write_bytes(b"these are not weights\n" * 10)
    _refused(capsys, run_cli("dit", junk, out, tokenizer_file), out, "not a PyTorch or safetensors checkpoint")
    good = write_checkpoint("dit", tmp_path / "dit.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _refused(capsys, run_cli("dit", cut, out, tokenizer_file), out, "truncated or damaged")
    st = tmp_path / "cut.safetensors"
    save_file(random_state("dit"), str(st))
    st.write_bytes(st.read_bytes()[:1000])
    _refused(capsys, run_cli("dit", st, out, tokenizer_file), out, "truncated or damaged")
    _refused(capsys, run_cli("dit", tmp_path / "absent.pt", out, tokenizer_file), out, "does not exist")


def test_refuses_another_architecture_or_size(tmp_path: Path, tokenizer_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.safetensors"
    dit = write_checkpoint("dit", tmp_path / "dit.pt")
    _refused(capsys, run_cli("ddt", dit, out, tokenizer_file), out, "is not a DDT checkpoint", "looks like dit or sit")
    ldit = write_checkpoint("lightningdit", tmp_path / "ldit.pt")
    _refused(capsys, run_cli("sit", ldit, out, tokenizer_file), out, "use --from lightningdit")
    ddt = write_checkpoint("ddt", tmp_path / "ddt.pt")
    _refused(capsys, run_cli("reg", ddt, out, tokenizer_file), out, "is not a REG (SiT) checkpoint", "looks like ddt")
    _refused(capsys, run_cli("dit", dit, out, tokenizer_file, "--size", "XL"), out, "not the XL that --size asks for")
    # No published size has width 64: without --num-heads the command says what to give.
    code = cli.main(["--from", "dit", "--ckpt", str(dit), "--out", str(out), "--tokenizer", str(tokenizer_file)])
    _refused(capsys, code, out, "give --num-heads")


def test_refuses_a_pickle_that_would_run_code(tmp_path: Path, tokenizer_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"ema": random_state("dit"), "hook": Payload()}, evil)
    out = tmp_path / "o.safetensors"
    _refused(capsys, run_cli("dit", evil, out, tokenizer_file), out, "would import and run Python objects", "system")
    assert not marker.exists()


def test_refuses_a_missing_tokenizer_file(tmp_path: Path, tokenizer_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.safetensors"
    dit = write_checkpoint("dit", tmp_path / "dit.pt")
    _refused(capsys, run_cli("dit", dit, out, tokenizer_file, "--tokenizer-weights", str(tmp_path / "vae")), out,
             "tokenizer weights", "do not exist")
    spec = json.loads(tokenizer_file.read_text())
    (tmp_path / "gone.yaml").write_text(json.dumps({**spec, "weights": str(tmp_path / "gone.safetensors")}))
    _refused(capsys, run_cli("dit", dit, out, tmp_path / "gone.yaml"), out, "gone.safetensors", "does not exist")
    ldit = write_checkpoint("lightningdit", tmp_path / "ldit.pt")
    code = cli.main(["--from", "lightningdit", "--ckpt", str(ldit), "--out", str(out), "--tokenizer",
                     str(tokenizer_file), *HEADS])
    _refused(capsys, code, out, "give --latent-stats")


def test_refuses_non_finite_weights_and_writes_nothing(tmp_path: Path, tokenizer_file: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint with a NaN weight was converted and written, then refused by the rebuild check ('Use an earlier
    snapshot of the run'), leaving the non-finite snapshot behind."""
    state = random_state("dit")
    name = next(k for k, v in state.items() if k.endswith("weight") and v.ndim == 2)
    state[name][0, 0] = float("nan")
    ckpt = tmp_path / "nan.pt"
    torch.save(state, ckpt)
    out = tmp_path / "o.safetensors"
    code = run_cli("dit", ckpt, out, tokenizer_file)
    err = capsys.readouterr().err
    assert code == 3 and err.count("\n") == 1, err
    assert str(ckpt) in err and name in err and "download it again" in err and "earlier snapshot" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_refuses_a_preset_with_interpolations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--tokenizer pixels``: its preset interpolates ${data.channels}; the text reached int() ('invalid literal for
    int() with base 10: '${data.channels}'')."""
    out = tmp_path / "o.safetensors"
    code = run_cli("dit", write_checkpoint("dit", tmp_path / "dit.pt"), out, Path("pixels"))
    _refused(capsys, code, out, "--tokenizer pixels", "channels: '${data.channels}'", "interpolation")
