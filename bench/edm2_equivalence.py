"""EDM2 U-Net (``gen/models/edm2.py`` inside ``EDMPrecond``) against the official ``Precond`` on the same weights.

The official code (NVlabs/edm2 ``training/networks_edm2.py``) is not part of this repository: it is run outside it
(bench/README.md, "EDM2 U-Net against the official code", gives the repository, commit and steps). This script

1. (``--dir D``) writes, per config, ``D/edm2_<config>.safetensors``: seeded random weights under the official
   ``Precond`` state-dict names (``unet.*``, ``logvar_*``; MPConv weights N(0, 1), the learned gains
   0.5 + U(0, 1) so that no branch is switched off, Fourier buffers as the official init draws them), the inputs
   ``x`` (B, 3, R, R), ``sigma`` (B,) and ``labels`` (B,) with the null class ``num_classes``, and
   ``D/edm2_<config>.json`` with the official constructor arguments;
2. (``--compare``) reads ``D/official_<config>.safetensors``, which the outside run wrote, and reports the largest
   absolute and relative (``max |ours - official| / max |official|``) differences of

   - ``eval``: ``D(x, sigma, y)`` in evaluation mode, the labels as one-hot vectors there (null: a zero row);
   - ``eval_uncond``: the same with no labels (official ``class_labels=None``, ours ``y=None``);
   - ``train``: ``D`` in training mode with gradients on (forced weight normalisation, and dropout where the
     config has it, with the global RNG seeded to 7 before the call on both sides);
   - ``train_weights``: every MPConv weight after that call (the forced-normalisation step, EDM2 Eq. 66);
   - ``nograd_weights``: ours after a training-mode call under ``torch.no_grad``: must equal the loaded weights
     (the official module would normalise them; we do not, module docstring of gen/models/edm2.py).

Examples::

    python bench/edm2_equivalence.py --dir /tmp/edm2eq
    python bench/edm2_equivalence.py --dir /tmp/edm2eq --compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from gen.models.edm2 import EDM2UNet  # noqa: E402
from gen.models.precond import EDMPrecond  # noqa: E402
from gen.utils.ckpt import load_state_dict_checked  # noqa: E402

# Ours: EDM2UNet keyword arguments; the official ones are derived in ``official_kwargs``.
CONFIGS: dict[str, dict[str, Any]] = {
    # Three levels, two blocks each, attention at 8 and in the innermost decoder block, 16-channel heads,
    # dropout 0.1 everywhere (the official module has no dropout_res).
    "small": dict(input_size=16, in_channels=3, num_classes=10, model_channels=32, channel_mult=(1, 2, 2),
                  num_blocks=2, attn_resolutions=(8,), channels_per_head=16, dropout=0.1),
    # configs/model/edm2_img64_s.yaml with ImageNet-64's interface arguments.
    "img64s": dict(input_size=64, in_channels=3, num_classes=1000, model_channels=192, channel_mult=(1, 2, 3, 4),
                   num_blocks=3, attn_resolutions=(16, 8), channels_per_head=64, dropout=0.0),
}
BATCH = {"small": 6, "img64s": 4}
SIGMAS = [0.002, 0.05, 0.5, 1.526, 10.0, 80.0]
LOGVAR_CHANNELS = 128  # official Precond default


def official_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The official ``Precond(**kwargs)`` arguments of one of our configs."""
    return dict(img_resolution=cfg["input_size"], img_channels=cfg["in_channels"], label_dim=cfg["num_classes"],
                use_fp16=False, model_channels=cfg["model_channels"], channel_mult=list(cfg["channel_mult"]),
                num_blocks=cfg["num_blocks"], attn_resolutions=list(cfg["attn_resolutions"]),
                channels_per_head=cfg["channels_per_head"], dropout=cfg["dropout"])


def write(folder: Path, name: str) -> None:
    """Random official-layout weights and inputs for config ``name`` (module docstring, step 1)."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    net = EDM2UNet(**cfg)
    g = torch.Generator().manual_seed(1)
    state = {}
    for key, value in net.state_dict().items():
        if value.ndim == 0:  # emb_gain, out_gain: zero at init would switch the branch off
            value = 0.5 + torch.rand([], generator=g)
        state[f"unet.{key}"] = value.contiguous()
    state["logvar_fourier.freqs"] = 2 * torch.pi * torch.randn(LOGVAR_CHANNELS, generator=g)
    state["logvar_fourier.phases"] = 2 * torch.pi * torch.rand(LOGVAR_CHANNELS, generator=g)
    state["logvar_linear.weight"] = torch.randn(1, LOGVAR_CHANNELS, generator=g)
    b, r, k = BATCH[name], cfg["input_size"], cfg["num_classes"]
    sigma = torch.tensor(SIGMAS[:b])
    x = torch.randn(b, cfg["in_channels"], r, r, generator=g) * (sigma**2 + 0.25).sqrt().reshape(-1, 1, 1, 1)
    labels = torch.tensor([0, k - 1, k, 3, k, 5][:b])  # k = the null class
    state.update({"input.x": x, "input.sigma": sigma, "input.labels": labels})
    save_file(state, str(folder / f"edm2_{name}.safetensors"))
    (folder / f"edm2_{name}.json").write_text(json.dumps({"precond": official_kwargs(cfg), "null_class": k}, indent=1))


def _ours(folder: Path, name: str) -> tuple[EDM2UNet, dict[str, Tensor]]:
    tensors = load_file(str(folder / f"edm2_{name}.safetensors"))
    net = EDM2UNet(**CONFIGS[name])
    unet = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    load_state_dict_checked(net, unet, f"edm2_{name}.safetensors")
    return net, tensors


def _diff(ours: Tensor, theirs: Tensor) -> dict[str, float]:
    err = (ours.double() - theirs.double()).abs().max().item()
    return {"max_abs": err, "max_rel": err / max(theirs.double().abs().max().item(), 1e-30)}


def compare(folder: Path, name: str) -> dict[str, dict[str, float]]:
    """Our outputs against ``official_<name>.safetensors`` (module docstring, step 2)."""
    official = load_file(str(folder / f"official_{name}.safetensors"))
    net, tensors = _ours(folder, name)
    x, sigma, labels = tensors["input.x"], tensors["input.sigma"], tensors["input.labels"]
    d = EDMPrecond(net, 0.5)
    rows: dict[str, dict[str, float]] = {}
    net.eval()
    with torch.no_grad():
        rows["eval"] = _diff(d(x, sigma, labels).out, official["eval"])
        rows["eval_uncond"] = _diff(d(x, sigma, None).out, official["eval_uncond"])
    net.train()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        d(x, sigma, labels)
    after = net.state_dict()
    rows["nograd_weights"] = {"max_abs": max((after[k] - before[k]).abs().max().item() for k in before),
                              "max_rel": 0.0}
    torch.manual_seed(7)
    rows["train"] = _diff(d(x, sigma, labels).out.detach(), official["train"])
    worst = {"max_abs": 0.0, "max_rel": 0.0}
    for key, value in net.state_dict().items():
        if key.endswith(".weight"):
            r = _diff(value, official[f"weights.unet.{key}"])
            worst = {k: max(worst[k], r[k]) for k in worst}
    rows["train_weights"] = worst
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, required=True, help="folder for the weights, inputs and official outputs")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    p.add_argument("--compare", action="store_true", help="compare with the official outputs instead of writing")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    args.dir.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    results = {}
    for name in names:
        if args.compare:
            results[name] = compare(args.dir, name)
            for row, r in results[name].items():
                print(f"{name:7s} {row:15s} max_abs {r['max_abs']:.3e}  max_rel {r['max_rel']:.3e}")
        else:
            write(args.dir, name)
            print(f"wrote {args.dir / f'edm2_{name}.safetensors'}")
    if args.compare:
        (args.dir / "edm2_equivalence.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
