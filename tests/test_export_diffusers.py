"""Export of DiT snapshots to diffusers (``scripts/export_diffusers.py``): load, equal outputs, pipeline, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gen.models.dit import DiT
from gen.utils.ckpt import build_from_snapshot, load_snapshot, save_snapshot
from scripts import convert as conv_cli
from scripts import export_diffusers as cli

SCALE = 0.18215


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A converted DiT (official layout, 1000 classes, learned sigma, random weights) and a tiny local VAE."""
    from tokenizers.kl import AutoencoderKLTokenizer

    root = tmp_path_factory.mktemp("export")
    tok = AutoencoderKLTokenizer(block_out_channels=(32, 32), latent_channels=4, seed=4)
    save_file({k: v.contiguous() for k, v in tok.vae.state_dict().items()}, str(root / "tok.safetensors"))
    tok.vae.register_to_config(scaling_factor=SCALE)
    tok.vae.save_pretrained(root / "vae")
    spec = {"_target_": "tokenizers.kl.AutoencoderKLTokenizer", "block_out_channels": [32, 32], "latent_channels": 4,
            "weights": str(root / "tok.safetensors"), "scaling_factor": SCALE}
    (root / "tok.yaml").write_text(json.dumps(spec))
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=1000,
              learn_sigma=True, time_scale=1.0)
    g = torch.Generator().manual_seed(1)
    state = {k: (v if k == "pos_embed" else v + 0.1 * torch.randn(v.shape, generator=g)) for k, v in net.state_dict().items()}
    torch.save(state, root / "dit.pt")
    snap = root / "dit.safetensors"
    assert conv_cli.main(["--from", "dit", "--ckpt", str(root / "dit.pt"), "--out", str(snap), "--tokenizer",
                          str(root / "tok.yaml"), "--num-heads", "4"]) == 0
    out = root / "diffusers"
    assert cli.main(["--snapshot", str(snap), "--out", str(out), "--vae", str(root / "vae")]) == 0
    return {"root": root, "snapshot": snap, "out": out}


def _ours(snapshot: Path) -> torch.nn.Module:
    tensors, config = load_snapshot(snapshot)
    return build_from_snapshot(config["model"], tensors, str(snapshot)).eval()


def _diffusers_frequencies(net: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Give our timestep embedder diffusers' frequencies 10000^(-i / (half - 1)) (see the exporter's docstring)."""
    import gen.nn.embed as embed

    def feats(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        f = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / (half - 1))
        args = t.float()[:, None] * f[None]
        return torch.cat([torch.cos(args), torch.sin(args)], -1)

    monkeypatch.setattr(embed, "timestep_features", feats)


def test_exported_transformer_equals_the_snapshot(folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import DiTTransformer2DModel

    theirs = DiTTransformer2DModel.from_pretrained(folders["out"] / "transformer").eval()
    ours = _ours(folders["snapshot"])
    g = torch.Generator().manual_seed(2)
    y = torch.tensor([0, 17, 999, 1000])  # 1000: the null class

    def rel(t: torch.Tensor) -> float:
        x = torch.randn(4, 4, 8, 8, generator=g)
        with torch.no_grad():
            a = theirs(x, timestep=t, class_labels=y).sample
            b = ours(x, t.float(), y).out
        return float((a - b).norm() / b.norm())

    # At t = 0 both sinusoids are [1, 0]: every other part of the network is compared.
    assert rel(torch.zeros(4, dtype=torch.long)) <= 1e-5
    # With the same frequencies, at several times and classes (null included), the outputs agree to 1e-5.
    _diffusers_frequencies(ours, monkeypatch)
    for t in (torch.tensor([1, 10, 500, 999]), torch.tensor([999, 250, 3, 0])):
        assert rel(t) <= 1e-5


def test_diffusers_pipeline_samples(folders: dict[str, Path]) -> None:
    from diffusers import DDIMScheduler, DiTPipeline

    pipe = DiTPipeline.from_pretrained(folders["out"])
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.vae.config.scaling_factor == SCALE
    images = pipe(class_labels=[3, 7], num_inference_steps=4, guidance_scale=1.5, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3)
    assert bool(torch.isfinite(torch.as_tensor(images)).all()) and images.std() > 0


def test_refuses_models_diffusers_cannot_represent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gen.models.ddt import DDT

    tok = {"_target_": "tokenizers.pixels.PixelTokenizer", "channels": 4}
    data = {"name": "x", "channels": 4, "resolution": 8, "num_classes": 10}
    linear = {"path": {"_target_": "gen.paths.LinearPath"}, "prediction": "velocity", "precond": None}
    cases = {
        "lightningdit": (DiT(input_size=8, patch_size=1, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                             num_classes=10, norm="rms", ffn="swiglu", rope="axial"), linear,
                         "LightningDiT-style model (norm='rms', ffn='swiglu', rope='axial')"),
        "ddt": (DDT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_encoder_blocks=1,
                    num_heads=2, num_classes=10), linear, "diffusers has no DDT transformer"),
        "sit": (DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                    learn_sigma=True, time_scale=1.0),
                {**linear, "precond": {"_target_": "gen.models.adapters.FlippedTimeVelocity", "out_channels": 4}},
                "has no diffusers scheduler"),
        "rectified_flow": (DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                               num_classes=10), linear, "lacks, so its pipeline cannot sample it"),
    }
    for name, (net, prediction, message) in cases.items():
        snap = tmp_path / f"{name}.safetensors"
        save_snapshot(snap, net.state_dict(), {"model": net.config, "prediction": prediction, "data": data,
                                               "tokenizer": tok})
        out = tmp_path / f"{name}_out"
        assert cli.main(["--snapshot", str(snap), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m scripts.export_diffusers: error: ") and message in err, err
        assert err.count("\n") == 1 and not out.exists()


def test_refuses_non_finite_weights(folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A snapshot with a NaN weight was exported as it is (the exporter read it without the finiteness check of the
    shared snapshot reader); now it is refused with the tensor's name, exit status 3, and nothing is written."""
    tensors, config = load_snapshot(folders["snapshot"])
    tensors["final_layer.linear.weight"][0, 0] = float("nan")
    bad = save_snapshot(tmp_path / "nan.safetensors", tensors, config)
    assert cli.main(["--snapshot", str(bad), "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err
    assert "non-finite weights" in err and "final_layer.linear.weight" in err and str(bad) in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
