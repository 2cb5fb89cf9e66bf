"""From a trained network to images: seeded generation and the generator of a snapshot.

``network + prediction spec -> velocity model_fn -> guidance -> sampler -> decode -> uint8``, used by ``train.py``
(preview grids, evaluation), ``sample.py`` and the evaluation jobs (``--generator
pipeline:snapshot_generate_fn``). Noise and labels of image ``k`` come from its own seed, so a sample set is the same
at any batch size and on any number of processes. Generation runs under ``torch.no_grad``.

Nothing is trusted or silent: a snapshot is read by the one loader (``gen.snapshot``: metadata checked against the
tensors before anything is built, non-finite weights refused), its data section must agree with the network, and a
batch whose values stop being finite is refused before it becomes (black) images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from gen.data import to_uint8
from gen.models.prediction import prediction_path, velocity_model
from gen.models.rows import MinRows
from gen.snapshot import load_network, read_snapshot
from gen.utils.ckpt import CheckpointError, build_snapshot_tokenizer, check_config_ints, snapshot_int_bound
from gen.utils.ckpt import tokenizer_weights as weights_from
from gen.utils.dist import resolve_device
from gen.utils.finite import NonFiniteError, shorten
from gen.utils.seed import PerImageRandom
from samplers import Streams, sharing
from samplers.spec import DEFAULT_SAMPLER, SamplerSpec, check_solver_fits, guided_model_fn, run_sampler

__all__ = ["Generator", "MinRows", "generator_from_snapshot", "snapshot_generate_fn"]


@dataclass
class Generator:
    """Everything needed to turn seeds into images.

    Attributes:
        net: the (EMA) network, in eval mode.
        prediction: the objective's prediction spec (path, prediction kind, preconditioning).
        tokenizer: decodes model outputs to images in [-1, 1].
        input_shape: model input shape (C, H, W).
        num_classes: number of real classes; label ``num_classes`` is the null label.
        min_rows: network calls are padded to at least this many rows (see ``MinRows``).
    """

    net: nn.Module
    prediction: Mapping[str, Any]
    tokenizer: Any
    input_shape: tuple[int, int, int]
    num_classes: int
    min_rows: int = 16

    @torch.no_grad()
    def generate(
        self,
        seeds: Sequence[int],
        sampler: SamplerSpec,
        labels: Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[Tensor, Tensor]:
        """Images for ``seeds`` (one batch): uint8 (N, C, H, W) and labels (N,).

        Each seed draws its label (unless ``labels`` are given) and then its noise from its own
        generator, so the result for a seed does not depend on the other seeds in the batch.
        """
        check_solver_fits(sampler, self.prediction)
        rnd = PerImageRandom(seeds)
        drawn = rnd.randint(self.num_classes)
        y = drawn if labels is None else labels.to(torch.long).cpu()
        noise: Any = rnd.randn(self.input_shape).to(device)
        extra = int(getattr(self.net, "extra_token_dim", 0) or 0)
        if extra > 0:  # REG: the class token is generated with the image, from the same seed, then dropped
            noise = Streams((noise, rnd.randn((extra,)).to(device)))
        path = prediction_path(self.prediction)
        ts = sampler.time_grid(path)
        net: Any = MinRows(self.net) if self.min_rows > 1 else self.net
        recompute = sampler.recompute_steps()
        if recompute is not None:
            net = sharing.EncoderSharing(net, ts, recompute)
        model_fn = guided_model_fn(velocity_model(net, self.prediction), sampler, self.num_classes)
        x = run_sampler(model_fn, noise, y.to(device), path, sampler, rnd.randn_like, ts)
        x = x[0] if isinstance(x, tuple) else x
        decoded = self.tokenizer.decode(x).float()
        bad = ~torch.isfinite(decoded.flatten(1)).all(1)
        if bool(bad.any()):
            # clamp() would turn NaN into black pixels and inf into white ones: refuse instead.
            seeds_bad = [int(s) for s, b in zip(seeds, bad.tolist()) if b]
            raise NonFiniteError(
                f"sampling produced non-finite values for {len(seeds_bad)} of {len(seeds)} images (seeds "
                f"{shorten([str(s) for s in seeds_bad])}); no image was written from them. The weights are finite, "
                "so the sampler diverged: check the sampler settings (guidance scale, steps, solver and grid options)"
            )
        images = to_uint8(decoded.clamp(-1, 1))
        return images.cpu(), y


def generator_from_snapshot(path: str, device: torch.device | str = "cpu") -> tuple[Generator, dict[str, Any]]:
    """Rebuild the network, prediction spec and tokenizer from a snapshot's metadata.

    The metadata is untrusted: the network is built only after its config has been checked against the tensors
    in the file (``build_from_snapshot``), the weights must be finite, and the data section must agree with the
    network (its class count: a mismatch would draw the null label as a class; its resolution: the noise size).

    Raises:
        CheckpointError / ValueError: naming the file and what is wrong. NonFiniteError: non-finite weights.
    """
    snap = read_snapshot(path, need=("model", "prediction", "data", "tokenizer"))
    config = snap.config
    bound = snapshot_int_bound(snap.tensors)
    for key in ("data", "tokenizer"):
        check_config_ints(config[key], bound, str(path), key)
    net, _ = load_network(snap, device)
    tokenizer = build_snapshot_tokenizer(config["tokenizer"], str(path)).to(device)
    data = config["data"]
    try:
        num_classes, resolution = int(data["num_classes"]), int(data["resolution"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"snapshot {path}: its data metadata {data!r} lacks an integer num_classes/resolution") from e
    net_classes = getattr(net, "num_classes", num_classes)
    if num_classes < 1 or num_classes != net_classes:
        raise CheckpointError(
            f"snapshot {path}: its data metadata says num_classes={num_classes} but the network has {net_classes} "
            f"classes (label {net_classes} is its null class); the metadata is damaged or edited"
        )
    shape = tuple(tokenizer.latent_shape(resolution))
    want = (getattr(net, "in_channels", shape[0]), getattr(net, "input_size", shape[1]), getattr(net, "input_size", shape[2]))
    if shape != want:
        raise CheckpointError(
            f"snapshot {path}: data resolution {resolution} gives model inputs of shape {shape} but the network takes "
            f"{want}; the metadata is damaged or edited"
        )
    gen = Generator(net, config["prediction"], tokenizer, shape, num_classes)  # type: ignore[arg-type]
    return gen, config


def snapshot_generate_fn(
    snapshot: str,
    kind: str | None = None,
    steps: int | str | None = None,
    cfg: float | str | None = None,
    batch_device: str = "auto",
    tokenizer_weights: str | None = None,
) -> Callable[[list[int]], tuple[Tensor, Tensor]]:
    """A ``generate_fn(seeds) -> (uint8 images, labels)`` for a snapshot, for the evaluation CLI.

    The sampler is the one stored in the snapshot (the training run's), with ``kind``, ``steps`` and
    the guidance scale ``cfg`` overridable (strings are accepted, as the CLI passes them)::

        python -m eval fid10k runs/x/snapshot-000100000.safetensors --ref refs/x.npz \\
            --generator pipeline:snapshot_generate_fn --option steps=50 --option cfg=1.5

    ``tokenizer_weights``: the tokenizer's weights file or folder, named by the user as with ``sample.py
    tokenizer_weights=`` (``--option tokenizer_weights=<path>``); a path in the snapshot's metadata is never read.
    """
    device = resolve_device(batch_device, "batch_device")
    with weights_from(tokenizer_weights):
        gen, config = generator_from_snapshot(snapshot, device)
    sampler_cfg = dict(config.get("sampler") or DEFAULT_SAMPLER)
    if kind is not None:  # a solver by its short name, e.g. "heun" -> samplers.sample_heun
        sampler_cfg["solver"] = {"_target_": f"samplers.sample_{kind}"}
    if steps is not None:
        sampler_cfg["steps"] = int(steps)
    if cfg is not None:
        sampler_cfg["guidance"] = {**dict(sampler_cfg.get("guidance") or {}), "scale": float(cfg)}
    spec = SamplerSpec.from_config(sampler_cfg)

    def generate_fn(seeds: list[int]) -> tuple[Tensor, Tensor]:
        return gen.generate(seeds, spec, device=device)

    return generate_fn
