"""The tokenizer half of a snapshot is checked before it is trusted (gen.utils.ckpt.build_snapshot_tokenizer):
bounded settings sized on the meta device, no weights path of the metadata followed, sane statistics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gen.utils.build import build
from gen.utils.ckpt import (
    MAX_TOKENIZER_NUMEL,
    CheckpointError,
    build_snapshot_tokenizer,
    save_snapshot,
    tokenizer_weights,
)

KL = {"_target_": "tokenizers.kl.AutoencoderKLTokenizer", "block_out_channels": [32, 32], "layers_per_block": 1,
      "latent_channels": 4, "image_channels": 3, "seed": 0}


def _weights(tmp_path: Path, seed: int = 5) -> Path:
    tok = build({**KL, "seed": seed})
    path = tmp_path / "kl.safetensors"
    save_file({k: v.contiguous() for k, v in tok.vae.state_dict().items()}, str(path))
    return path


def test_metadata_weights_are_used_only_when_the_user_names_them(tmp_path: Path) -> None:
    file = _weights(tmp_path)
    spec = {**KL, "weights": str(file)}  # a path as a training machine recorded it
    with pytest.raises(CheckpointError, match=rf"names weights at '{file}'; paths in a snapshot's metadata are not "
                                              r"followed.*sample.py tokenizer_weights=<path>"):
        build_snapshot_tokenizer(spec, "snap.safetensors")
    with tokenizer_weights(file):  # the user named it: that file is read, whatever the metadata says
        tok = build_snapshot_tokenizer({**KL, "weights": "/etc/passwd"}, "snap.safetensors")
    assert tok.weights_sha256() == build({**KL, "weights": str(file)}).weights_sha256()
    assert tok.weights_sha256() != build(KL).weights_sha256()
    # A tokenizer-training snapshot is its own tokenizer's weights: the snapshot itself may be read.
    own = save_snapshot(tmp_path / "own.safetensors", dict(build({**KL, "seed": 5}).vae.state_dict()), {})
    tok = build_snapshot_tokenizer({**KL, "weights": str(own)}, str(own), own)
    assert tok.weights_sha256() == build({**KL, "weights": str(file)}).weights_sha256()
    # No path at all: the class's own default (a seeded random initialisation here), as in training.
    assert build_snapshot_tokenizer(KL, "s").weights_sha256() == build(KL).weights_sha256()


def test_tokenizer_settings_are_sized_before_anything_is_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizers.kl import AutoencoderKLTokenizer

    huge = {**KL, "block_out_channels": [512, 512, 512], "layers_per_block": 40}
    assert AutoencoderKLTokenizer.snapshot_numel_estimate(huge) > MAX_TOKENIZER_NUMEL
    with pytest.raises(CheckpointError, match="tokenizer settings describe at least .* values"):
        build_snapshot_tokenizer(huge, "s")
    # Past the cheap estimate, the meta-device build counts exactly (estimate disabled here): still nothing real.
    monkeypatch.setattr(AutoencoderKLTokenizer, "snapshot_numel_estimate", staticmethod(lambda spec: 0))
    monkeypatch.setattr("gen.utils.ckpt.MAX_TOKENIZER_NUMEL", 100_000)
    with pytest.raises(CheckpointError, match=r"tokenizer settings describe [\d,]+ values \(more than 100,000"):
        build_snapshot_tokenizer(KL, "s")


@pytest.mark.parametrize("edit, words", [
    ({"std": [1.0, float("nan"), 1.0, 1.0], "mean": [0.0] * 4}, "tokenizer.std[1]=nan"),
    ({"std": [1.0, 1.0, -2.0, 1.0], "mean": [0.0] * 4}, "tokenizer.std[2]=-2.0"),
    ({"std": [1.0] * 4, "mean": [0.0, 0.0, 0.0, float("-inf")]}, "tokenizer.mean[3]=-inf"),
    ({"std": [1.0] * 4, "mean": ["a"] * 4}, "tokenizer.mean[0]='a'"),
    ({"std": 1.0}, "tokenizer.std must be a list"),
    ({"scaling_factor": 0.0}, "tokenizer.scaling_factor=0.0"),
    ({"scaling_factor": float("nan")}, "tokenizer.scaling_factor=nan"),
    ({"std": [1.0] * 3, "mean": [0.0] * 3}, "do not fit its channels"),
    ({"_target_": "torch.nn.Linear"}, "not a class of the tokenizers package"),
])
def test_absurd_tokenizer_statistics_are_named(edit: dict, words: str) -> None:
    with pytest.raises(CheckpointError, match="^s: .*" + words.replace("[", r"\[").replace("]", r"\]")
                       .replace("(", r"\(").replace(")", r"\)")):
        build_snapshot_tokenizer({**KL, **edit}, "s")


def test_eval_recon_follows_no_metadata_path(tmp_path: Path) -> None:
    from eval.__main__ import _build_tokenizer

    file = _weights(tmp_path)
    snap = save_snapshot(tmp_path / "diffusion.safetensors", {"w": torch.zeros(1)},
                         {"tokenizer": {**KL, "weights": str(file)}})
    with pytest.raises(CheckpointError, match="not followed.*--set weights=<path>"):
        _build_tokenizer(str(snap), [])
    tok = _build_tokenizer(str(snap), [f"weights={file}"])
    assert tok.weights_sha256() == build({**KL, "weights": str(file)}).weights_sha256()
