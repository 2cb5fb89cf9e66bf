"""piq's LPIPS, as 2-rectified flow++ uses it, against ``gen.nn.lpips.LPIPS(variant="piq")`` (bench/README.md, "piq's
LPIPS against the official code").

The official side runs outside this repository (README: piq's version and the steps): ``piq.LPIPS(replace_pooling=True,
reduction="none")`` with randomly initialised VGG16 and head weights, on random image pairs in [0, 1] at 32 and 224 px.
It saves the weights, the images and piq's per-sample distances in one safetensors file. This script is our side: it
writes the same weights as torchvision's VGG16 file and as piq's heads file (a list of five tensors, the layout of
piq's ``lpips_weights.pt``), builds our LPIPS from them, feeds the images mapped to [-1, 1] (our input range; rfpp feeds
piq ``x * 0.5 + 0.5``) and prints, per set of pairs, the largest relative difference ``max |ours - piq| / max |piq|``,
and the same for the reference variant (max pooling, LPIPS' input scaling), to show the size of the deviation removed.

    python bench/lpips_equivalence.py --official /tmp/piqeq/off32.safetensors
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing

from gen.nn.lpips import LPIPS  # noqa: E402


def max_rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |ours - ref| / max |ref|``."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Print and return ``{pairs: {"piq": rel. diff. of the piq variant, "lpips": of the reference variant}}``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", required=True, help="the official side's safetensors file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    saved = load_file(args.official)
    with safe_open(args.official, "pt") as f:
        meta = f.metadata() or {}
    with tempfile.TemporaryDirectory() as tmp:
        vgg = Path(tmp) / "vgg16-random.pth"
        torch.save({k[len("vgg."):]: v for k, v in saved.items() if k.startswith("vgg.")}, vgg)
        heads = Path(tmp) / "lpips_weights.pt"
        torch.save([saved[f"heads.{i}"] for i in range(5)], heads)  # piq's file layout
        nets = {v: LPIPS(vgg, variant=v, heads=heads) for v in ("piq", "lpips")}
    print(f"official side: piq {meta.get('piq', '?')}, torch {meta.get('torch', '?')}; ours: torch {torch.__version__}")
    results: dict[str, dict[str, float]] = {}
    for key in sorted(k for k in saved if k.startswith("d.")):
        pairs = key[len("d."):]
        x, y, ref = saved[f"x.{pairs}"], saved[f"y.{pairs}"], saved[key]
        with torch.no_grad():
            got = {v: net(x * 2 - 1, y * 2 - 1) for v, net in nets.items()}
        results[pairs] = {v: max_rel(d, ref) for v, d in got.items()}
        print(f"{pairs:>9} (B = {len(ref)}, piq mean {float(ref.mean()):.4g}): variant piq {results[pairs]['piq']:.1e}, "
              f"reference variant {results[pairs]['lpips']:.1e}")
    return results


if __name__ == "__main__":
    main()
