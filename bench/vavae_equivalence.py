"""VA-VAE: our converted diffusers model against outputs of the official module on the same random weights.

The official module (hustvl/LightningDiT, tokenizer/autoencoder.py: ``AutoencoderKL(embed_dim=32,
ch_mult=(1, 1, 2, 2, 4))``) is not part of this repository and is run outside it (bench/README.md gives the
steps): it loads the LDM-layout weights this script writes (``--weights``, strict), encodes the stored uint8
inputs and decodes the posterior means, in float32 and float64, and saves everything in one safetensors file
(keys ``u<side>``, ``mean<side>``, ``logvar<side>``, ``dec<side>``, each also with ``_fp64``). This script loads
the same weights through ``tokenizers.vavae.VAVAE`` (converter + diffusers) and reports the largest absolute
differences:

- ``encoder_mean`` / ``encoder_logvar``: posterior moments of the same images;
- ``decoder``: our decoder on the official posterior mean, against the official decoding;
- ``roundtrip``: our decode(our encode) against the official decode(encode);
- ``*_fp64``: the same in float64 (shows the two networks compute the same function);
- ``ours_vs_fp64`` / ``official_vs_fp64``: each float32 decoding against the float64 one (rounding of each).

Examples::

    python bench/vavae_equivalence.py --weights /tmp/vavae_random.safetensors        # writes the weights
    python bench/vavae_equivalence.py --weights /tmp/vavae_random.safetensors --official /tmp/official.safetensors
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from tokenizers.vavae import VAVAE, make_random_vavae_checkpoint  # noqa: E402


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@torch.no_grad()
def compare(weights: str, official: str) -> dict:
    from safetensors.torch import load_file

    ref = load_file(official)
    tok = VAVAE(weights=weights, posterior="mean")
    vae64 = copy.deepcopy(tok.vae).double()
    out = {}
    for side in sorted({int(k[1:]) for k in ref if k.startswith("u")}):
        u = ref[f"u{side}"]
        row = {}
        for net, tag, dtype in ((tok.vae, "", torch.float32), (vae64, "_fp64", torch.float64)):
            dist = net.encode(u.to(dtype) / 127.5 - 1.0).latent_dist
            row[f"encoder_mean{tag}"] = _diff(dist.mean, ref[f"mean{side}{tag}"])
            row[f"encoder_logvar{tag}"] = _diff(dist.logvar, ref[f"logvar{side}{tag}"])
            row[f"decoder{tag}"] = _diff(net.decode(ref[f"mean{side}{tag}"]).sample, ref[f"dec{side}{tag}"])
            row[f"roundtrip{tag}"] = _diff(net.decode(dist.mean).sample, ref[f"dec{side}{tag}"])
        ours32 = tok.vae.decode(ref[f"mean{side}"]).sample
        row["ours_vs_fp64"] = _diff(ours32, ref[f"dec{side}_fp64"])
        row["official_vs_fp64"] = _diff(ref[f"dec{side}"], ref[f"dec{side}_fp64"])
        row["output_max_abs"] = float(ref[f"dec{side}"].abs().max())
        out[f"{side}px"] = {k: float(f"{v:.3g}") for k, v in row.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="LDM-layout random weights (written when missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--official", help="outputs of the official module on these weights")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.weights).is_file():
        make_random_vavae_checkpoint(args.weights, seed=args.seed)
        print(f"wrote random VA-VAE weights (LDM layout) to {args.weights}")
    if args.official:
        print(json.dumps(compare(args.weights, args.official), indent=1))


if __name__ == "__main__":
    main()
