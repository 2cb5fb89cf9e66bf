"""SD-VAE and VA-VAE tokenizers on random weights of the published architectures.

SD-VAE must equal a direct diffusers ``AutoencoderKL`` call bit for bit. VA-VAE is checked against the
official module (hustvl/LightningDiT, tokenizer/autoencoder.py, commit 2725fed), which was run once outside
this repository: ``tests/data/vavae_f16d32_official.json`` holds its key list with shapes, its parameter counts
and its outputs on the random weights that ``make_random_vavae_checkpoint(seed=0)`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from gen.utils.build import build
from gen.utils.weights import WeightsNotFoundError, file_sha256
from tokenizers.base import per_image_generators

DATA = Path(__file__).resolve().parent / "data"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tokenizer"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Bit-for-bit comparisons within one process; one thread keeps the shared CI machine responsive.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_vae_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers.sdvae import make_random_sd_vae

    return make_random_sd_vae(tmp_path_factory.mktemp("sd-vae"), seed=0)


@pytest.fixture(scope="module")
def official() -> dict:
    return json.loads((DATA / "vavae_f16d32_official.json").read_text())


@pytest.fixture(scope="module")
def vavae_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers.vavae import make_random_vavae_checkpoint

    return make_random_vavae_checkpoint(tmp_path_factory.mktemp("vavae") / "ldm.safetensors", seed=0)


def _images(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# SD-VAE


@pytest.mark.parametrize("variant", ["ema", "mse"])
def test_sd_vae_equals_diffusers_bit_for_bit(sd_vae_folder: Path, variant: str) -> None:
    from diffusers import AutoencoderKL

    from tokenizers.sdvae import SDVAE

    tok = SDVAE(variant=variant, weights=sd_vae_folder)
    ref = AutoencoderKL.from_pretrained(sd_vae_folder)
    u = _images(3, 32)
    x = u.float() / 127.5 - 1.0
    with torch.no_grad():
        z = tok.encode(u, per_image_generators(range(3), "test"))
        z_ref = ref.encode(x).latent_dist.sample(generator=per_image_generators(range(3), "test")) * 0.18215
        assert z.shape == (3, 4, 4, 4) and torch.equal(z, z_ref)
        assert torch.equal(tok.decode(z), ref.decode(z_ref / 0.18215).sample)
        mean = SDVAE(variant=variant, weights=sd_vae_folder, posterior="mean").encode(u)
        assert torch.equal(mean, ref.encode(x).latent_dist.mean * 0.18215)
        assert not torch.equal(mean, z)  # sampling did add noise


def test_sd_vae_posterior_noise_is_per_image(sd_vae_folder: Path) -> None:
    from tokenizers.sdvae import SDVAE

    tok = SDVAE(weights=sd_vae_folder)
    u = _images(4, 16)
    with torch.no_grad():
        whole = tok.raw_latents(u, per_image_generators([10, 11, 12, 13], "seed"))
        alone = tok.raw_latents(u[2:3], per_image_generators([12], "seed"))
        other = tok.raw_latents(u[2:3], per_image_generators([99], "seed"))
    # Same seed: the same noise whatever the batch (up to convolution rounding); another seed: other noise.
    assert torch.allclose(whole[2:3], alone, atol=1e-5)
    assert (other - alone).abs().max() > 1e-3
    with pytest.raises(ValueError, match="2 per-image generators for a batch of 4"):
        tok.raw_latents(u, per_image_generators([0, 1], "seed"))


def test_sd_vae_reads_the_old_attention_key_names(sd_vae_folder: Path, tmp_path: Path) -> None:
    """The hub uploads of 2022 name the attention weights query/key/value/proj_attn; they must load the same."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tokenizers.sdvae import SDVAE

    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(str(sd_vae_folder / "diffusion_pytorch_model.safetensors"))
    renamed = {}
    for k, v in state.items():
        for new, legacy in old.items():
            k = k.replace(f".{new}.", f".{legacy}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    shutil.copy(sd_vae_folder / "config.json", tmp_path / "config.json")
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    u = _images(2, 16)
    with torch.no_grad():
        a = SDVAE(weights=sd_vae_folder, posterior="mean").encode(u)
        b = SDVAE(weights=tmp_path, posterior="mean").encode(u)
    assert torch.equal(a, b)


def test_sd_vae_missing_weights_name_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from tokenizers.sdvae import SDVAE

    with pytest.raises(WeightsNotFoundError, match="config.json, diffusion_pytorch_model.safetensors") as info:
        SDVAE(weights=tmp_path)
    assert "stabilityai/sd-vae-ft-ema" in str(info.value) and "huggingface-cli download" in str(info.value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsNotFoundError) as info:
        SDVAE(variant="mse")
    msg = str(info.value)
    assert "stabilityai/sd-vae-ft-mse" in msg and "tokenizer.weights=" in msg and "download=true" in msg
    assert "diffusion_pytorch_model.safetensors" in msg and str(tmp_path / "empty-cache") in msg


def test_sd_vae_refuses_another_architecture(sd_vae_folder: Path, tmp_path: Path) -> None:
    import shutil

    from tokenizers.sdvae import SDVAE

    shutil.copy(sd_vae_folder / "diffusion_pytorch_model.safetensors", tmp_path)
    config = json.loads((sd_vae_folder / "config.json").read_text())
    config["latent_channels"] = 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="latent_channels: 16 .SD-VAE: 4."):
        SDVAE(weights=tmp_path)


def test_image_size_not_divisible_is_refused(sd_vae_folder: Path) -> None:
    from tokenizers.sdvae import SDVAE

    tok = SDVAE(weights=sd_vae_folder)
    with pytest.raises(ValueError, match=r"image size 20x20 is not divisible by the downsampling factor 8 .*16x16"):
        tok.encode(_images(1, 20))
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 8"):
        tok.latent_shape(100)
    assert tok.latent_shape(256) == (4, 32, 32)


def test_identity_ignores_runtime_options_only(sd_vae_folder: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from tokenizers.sdvae import SDVAE

    a = SDVAE(weights=sd_vae_folder)
    copy = tmp_path / "copy"
    shutil.copytree(sd_vae_folder, copy)
    b = SDVAE(weights=copy, posterior="mean", scaling_factor=1.0)
    b.set_statistics([0.1, 0.2, 0.3, 0.4], [1.0, 2.0, 3.0, 4.0])
    assert a.identity() == b.identity()
    assert b.config["mean"] == pytest.approx([0.1, 0.2, 0.3, 0.4]) and b.has_statistics() and not a.has_statistics()
    # One changed weight is another tokenizer.
    state = load_file(str(copy / "diffusion_pytorch_model.safetensors"))
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 1e-3
    save_file(state, str(copy / "diffusion_pytorch_model.safetensors"))
    other = SDVAE(weights=copy)
    assert other.identity()["weights_sha256"] != a.identity()["weights_sha256"]
    assert SDVAE(variant="mse", weights=sd_vae_folder).identity() != a.identity()
    # Statistics rebuild from the config (what a snapshot stores).
    rebuilt = build(b.config)
    assert torch.equal(rebuilt.latent_mean, b.latent_mean) and torch.equal(rebuilt.latent_std, b.latent_std)


def test_presets_build_with_local_weights(sd_vae_folder: Path, vavae_file: Path) -> None:
    for name, weights, channels, factor in (
        ("sd_vae_ema", sd_vae_folder, 4, 8),
        ("sd_vae_mse", sd_vae_folder, 4, 8),
        ("vavae_f16d32", vavae_file, 32, 16),
    ):
        spec = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert spec["latent_channels"] == channels and spec["downsample"] == factor
        tok = build({**spec, "weights": str(weights)})
        assert (tok.latent_channels, tok.downsample, tok.image_channels) == (channels, factor, 3)
        assert tok.latent_shape(256) == (channels, 256 // factor, 256 // factor)
        assert build(tok.config).identity() == tok.identity()


# ----------------------------------------------------------------------------------------------
# VA-VAE


def test_vavae_key_layout_and_parameter_counts_equal_the_official_module(official: dict) -> None:
    from tokenizers.kl import build_autoencoder_kl
    from tokenizers.vavae import VAVAE_ARCHITECTURE, diffusers_to_ldm, ldm_to_diffusers

    keys = {k: tuple(v) for k, v in official["keys"].items()}
    assert len(keys) == 342
    with torch.device("meta"):
        vae = build_autoencoder_kl(VAVAE_ARCHITECTURE, meta=True)
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    converted = ldm_to_diffusers({k: torch.empty(s, device="meta") for k, s in keys.items()})
    assert {k: tuple(v.shape) for k, v in converted.items()} == ours
    back = diffusers_to_ldm({k: torch.empty(s, device="meta") for k, s in ours.items()})
    assert {k: tuple(v.shape) for k, v in back.items()} == keys
    counts = {name: sum(p.numel() for p in getattr(vae, name).parameters()) for name in official["parameters"]}
    assert counts == official["parameters"] == {
        "encoder": 28_413_248, "decoder": 41_417_603, "quant_conv": 4_160, "post_quant_conv": 1_056,
    }


def test_vavae_matches_the_official_module_on_random_weights(official: dict, vavae_file: Path) -> None:
    from tokenizers.vavae import VAVAE

    assert file_sha256(vavae_file) == official["random_weights"]["file_sha256"], "random weights changed"
    u = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(123), dtype=torch.uint8)
    assert int(u.long().sum()) == official["input_sum"]
    tok = VAVAE(weights=vavae_file, posterior="mean")
    with torch.no_grad():
        dist = tok.vae.encode(u.float() / 127.5 - 1.0).latent_dist
        mean = tok.raw_latents(u)
        decoded = tok.decode_raw(torch.tensor(official["posterior_mean"]).view(2, 32, 2, 2))
    assert mean.shape == (2, 32, 2, 2) and torch.equal(mean, dist.mean)
    assert (mean.flatten() - torch.tensor(official["posterior_mean"])).abs().max() < 1e-5
    assert (dist.logvar.flatten() - torch.tensor(official["posterior_logvar"])).abs().max() < 1e-5
    assert (decoded.flatten()[::16] - torch.tensor(official["decode_of_mean_every_16th"])).abs().max() < 1e-5


def test_vavae_reads_the_published_checkpoint_layout(vavae_file: Path, tmp_path: Path) -> None:
    """A Lightning-style .pt with training-only modules loads (weights_only); foreign keys and pickles are refused."""
    from safetensors.torch import load_file, save_file

    from tokenizers.vavae import VAVAE

    state = load_file(str(vavae_file))
    extras = {"loss.discriminator.main.0.weight": torch.zeros(2), "foundation_model.model.cls_token": torch.zeros(3),
              "linear_proj.weight": torch.zeros(1024, 32, 1, 1)}
    ckpt = tmp_path / "vavae.pt"
    torch.save({"state_dict": {**state, **extras}, "global_step": 7}, ckpt)
    u = _images(1, 32)
    with torch.no_grad():
        a = VAVAE(weights=ckpt, posterior="mean").encode(u)
        b = VAVAE(weights=vavae_file, posterior="mean").encode(u)
    assert torch.equal(a, b)

    save_file({**state, "encoder.down.9.block.0.conv1.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"encoder.down.9.block.0.conv1.weight"):
        VAVAE(weights=tmp_path / "bad.safetensors")
    torch.save({"state_dict": {}, "hyper_parameters": Path("x")}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        VAVAE(weights=tmp_path / "pickled.pt")
    missing = dict(state)
    missing.pop("decoder.conv_out.weight")
    save_file(missing, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing .e.g. \['decoder.conv_out.weight'\]"):
        VAVAE(weights=tmp_path / "short.safetensors")


def test_vavae_missing_weights_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from tokenizers.vavae import VAVAE

    with pytest.raises(WeightsNotFoundError, match="vavae-imagenet256-f16d32-dinov2.pt"):
        VAVAE(weights=tmp_path / "nope.pt")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("GEN_CACHE", str(tmp_path / "gen"))
    with pytest.raises(WeightsNotFoundError) as info:
        VAVAE()
    msg = str(info.value)
    assert "hustvl/vavae-imagenet256-f16d32-dinov2" in msg and str(tmp_path / "gen" / "weights") in msg
    assert "download=true" in msg


def test_small_kl_tokenizer_round_trips_its_config(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tokenizers.kl import AutoencoderKLTokenizer

    tok = AutoencoderKLTokenizer(block_out_channels=(32, 32, 64), latent_channels=8, attention_levels=(2,), seed=3)
    assert tok.downsample == 4 and tok.latent_shape(32) == (8, 8, 8)
    assert build(tok.config).identity() == tok.identity()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tok.vae.state_dict().items()}, str(path))
    loaded = AutoencoderKLTokenizer(block_out_channels=(32, 32, 64), latent_channels=8, attention_levels=(2,), weights=path)
    assert loaded.weights_sha256() == tok.weights_sha256()
    with pytest.raises(ValueError, match="downsample is 8 but this architecture reduces images by 4"):
        AutoencoderKLTokenizer(block_out_channels=(32, 32, 64), downsample=8)
    with pytest.raises(ValueError, match="do not fit"):
        AutoencoderKLTokenizer(block_out_channels=(32, 64, 64), latent_channels=8, weights=path)
