"""Train a class-conditional generator from a Hydra config.

Examples:
    python train.py                                   # quick start: tiny DiT on mnist5k (CPU, minutes)
    python train.py trainer.total_kimg=100 name=longer
    python train.py --cfg job                         # dry run: print the composed config
    torchrun --nproc_per_node=2 train.py              # several processes (gloo on CPU, NCCL on GPU)
    torchrun --nnodes=2 --node_rank=0 --master_addr=H --master_port=P --nproc_per_node=8 \
        train.py experiment=<preset>                  # several nodes

The run folder is ``${paths.runs}/${name}``; re-running the same command resumes from the latest
training state there. The folder receives the resolved ``config.yaml``, ``stats.jsonl``,
TensorBoard events, sample grids by kimg (``samples/``), training states, safetensors snapshots,
``loss.png`` and ``results.json``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gen.ema import make_profiles
from gen.train.loop import HookContext, NonFiniteError, TrainConfig, train
from gen.utils import dist
from gen.utils.build import TRAINING_PACKAGES, BuildError, build, resolve
from gen.utils.ckpt import atomic_write
from gen.utils.config import ConfigError, from_mapping
from gen.utils.images import save_grid
from gen.utils.seed import derive_seed
from pipeline import Generator, SamplerSpec

TOP_LEVEL_KEYS = {
    "name", "seed", "run_dir", "paths", "data", "tokenizer", "model", "method", "objective", "sampler", "ema",
    "optim", "trainer", "preview", "eval", "experiment", "packages",
}


def _build(spec: Any, group: str, packages: tuple[str, ...], **kwargs: Any) -> Any:
    """Build one config group with the project-restricted constructor; errors name the group."""
    if not isinstance(spec, dict) or "_target_" not in spec:
        raise ConfigError(f"config group '{group}' needs a '_target_'; got {spec!r}")
    try:
        return build(spec, allow=packages, **kwargs)
    except BuildError as e:
        raise ConfigError(f"cannot build '{group}': {e}") from e


def _container(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"config does not resolve: {e}") from e


class PreviewHook:
    """A grid of samples every ``interval_kimg`` (fixed seeds, one row per class) into ``samples/``."""

    def __init__(self, make_generator: Any, sampler: SamplerSpec, num_images: int, interval_kimg: float, nrow: int):
        self.make_generator, self.sampler = make_generator, sampler
        self.num_images, self.interval_kimg, self.nrow = num_images, interval_kimg, nrow

    def __call__(self, ctx: HookContext) -> Mapping[str, float]:
        if dist.is_main():
            gen: Generator = self.make_generator(ctx.ema_net)
            labels = torch.arange(self.num_images) // max(self.num_images // gen.num_classes, 1) % gen.num_classes
            images, _ = gen.generate(list(range(self.num_images)), self.sampler, labels=labels, device=ctx.device)
            save_grid(images, ctx.run_dir / "samples" / f"grid-{ctx.nimg:09d}.png", nrow=self.nrow, scale=2)
        dist.barrier()
        return {}


class EvalHook:
    """The ``eval`` group during training: yardstick or Inception metrics of generated samples.

    Runs at the end (and every ``interval_kimg`` if set) on every process: seeds are split across
    processes and the statistics reduced with sums, so the numbers do not depend on the world size.
    Metric ``yardstick``: FID with the built-in data's yardstick network against its training images,
    plus the class accuracy of the samples. Metric ``inception``: FID (and IS, sFID when the reference
    has them) with the Inception network against ``ref_stats``.
    """

    KEYS = {
        "yardstick": {"enabled", "metric", "num_images", "dataset_name", "cache_dir", "batch_size", "seed_offset",
                      "interval_kimg"},
        "inception": {"enabled", "metric", "num_images", "ref_stats", "ref_batch", "weights", "resize", "batch_size",
                      "seed_offset", "interval_kimg", "at_end_only"},
    }

    def __init__(self, make_generator: Any, sampler: SamplerSpec, cfg: Mapping[str, Any]):
        metric = cfg.get("metric")
        if metric not in self.KEYS:
            raise ConfigError(f"eval.metric={metric!r} cannot run during training; use one of {sorted(self.KEYS)}")
        unknown = set(cfg) - self.KEYS[metric]
        if unknown:
            raise ConfigError(f"unknown eval key(s) {sorted(unknown)} for metric {metric!r}")
        self.make_generator, self.sampler, self.cfg = make_generator, sampler, dict(cfg)
        self.interval_kimg = math.inf if cfg.get("at_end_only") or not cfg.get("interval_kimg") else cfg["interval_kimg"]

    def __call__(self, ctx: HookContext) -> Mapping[str, float]:
        from eval import generate as evgen

        gen: Generator = self.make_generator(ctx.ema_net)
        c = self.cfg

        def generate_fn(seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            return gen.generate(seeds, self.sampler, device=ctx.device)

        if c["metric"] == "yardstick":
            out = evgen.yardstick_metrics(generate_fn, c["num_images"], c["dataset_name"], c["cache_dir"],
                                          c["batch_size"], c["seed_offset"])
            return {f"yardstick_{k}" if k == "fid" else k: float(v) for k, v in out.items()}
        from eval.features import InceptionFeatures
        from eval.stats import load_stats

        ext = InceptionFeatures(c["weights"], resize=c["resize"], device=ctx.device)
        ref = load_stats(c["ref_stats"], expect=ext.manifest())
        seeds = range(c["seed_offset"], c["seed_offset"] + c["num_images"])
        out = evgen.evaluate(generate_fn, seeds, ext, ref, batch_size=c["batch_size"])
        return {f"{k}{c['num_images'] // 1000}k" if k in ("fid", "sfid") else k: float(v) for k, v in out.items()}


class ReconstructionPreviewHook:
    """Tokenizer training: a grid of fixed training images (odd rows) above their reconstructions by the EMA
    autoencoder (even rows) every ``interval_kimg``, into ``samples/``."""

    def __init__(self, method: Any, dataset: Any, num_images: int, interval_kimg: float, nrow: int):
        self.method, self.interval_kimg, self.nrow = method, interval_kimg, nrow
        step = max(len(dataset) // max(num_images, 1), 1)  # spread over the data (class-sorted sets show every class)
        self.images = torch.stack([_image_of(dataset[i]) for i in range(0, len(dataset), step)][:num_images])

    def __call__(self, ctx: HookContext) -> Mapping[str, float]:
        if dist.is_main():
            from gen.data.transforms import to_uint8
            from gen.utils.seed import per_image_generators

            n = self.images.shape[0]
            gens = per_image_generators(range(n), "preview", 0)
            recon = to_uint8(self.method.reconstruct(ctx.ema_net, self.images, gens)).cpu()
            rows = [t for k in range(0, n, self.nrow) for t in (self.images[k:k + self.nrow], recon[k:k + self.nrow])]
            save_grid(torch.cat(rows), ctx.run_dir / "samples" / f"grid-{ctx.nimg:09d}.png", nrow=self.nrow, scale=2)
        dist.barrier()
        return {}


class ReconstructionEvalHook:
    """Tokenizer training, ``eval.metric=recon_yardstick``: rFID (yardstick features) and PSNR of the EMA autoencoder's
    reconstructions of the built-in dataset's training images (``eval.recon.reconstruction_metrics``; posterior samples
    seeded per image index, images split across processes)."""

    KEYS = {"enabled", "metric", "num_images", "dataset_name", "cache_dir", "batch_size", "interval_kimg"}

    def __init__(self, method: Any, dataset: Any, cfg: Mapping[str, Any]):
        unknown = set(cfg) - self.KEYS
        if unknown:
            raise ConfigError(f"unknown eval key(s) {sorted(unknown)} for metric 'recon_yardstick'")
        self.method, self.dataset, self.cfg = method, dataset, dict(cfg)
        self.interval_kimg = cfg.get("interval_kimg") or math.inf

    def __call__(self, ctx: HookContext) -> Mapping[str, float]:
        from eval.features import YardstickFeatures
        from eval.recon import reconstruction_metrics
        from gen.data.transforms import to_uint8
        from gen.utils.seed import per_image_generators

        c = self.cfg
        ext = YardstickFeatures(c["dataset_name"], c["cache_dir"])
        n = min(int(c["num_images"]), len(self.dataset))
        images = torch.utils.data.Subset(self.dataset, range(n))

        def roundtrip(x: torch.Tensor, indices: Any) -> torch.Tensor:
            gens = per_image_generators(indices, "recon", 0)
            return to_uint8(self.method.reconstruct(ctx.ema_net, x, gens)).cpu()

        out = reconstruction_metrics(roundtrip, images, ext, batch_size=c["batch_size"], with_ssim=True)
        return {"rfid": float(out["rfid"]), "psnr": float(out["psnr"]), "ssim": float(out["ssim"])}


def _image_of(item: Any) -> torch.Tensor:
    return item["image"] if isinstance(item, dict) else item[0]


def _interface(target: str, packages: tuple[str, ...], available: Mapping[str, Any]) -> dict[str, Any]:
    """The objects built here (network, objective, optimizer) that the method's constructor takes by name."""
    import inspect

    params = inspect.signature(resolve(target, packages)).parameters
    return {k: v() for k, v in available.items() if k in params}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg`` (failing on bad config before any work), train, evaluate."""
    unknown = set(cfg.keys()) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {sorted(unknown)}; known: {sorted(TOP_LEVEL_KEYS)}")
    c = _container(cfg)
    # Training configs are written by the user: they may name optimizers and, through `packages`, their own code.
    packages = TRAINING_PACKAGES + tuple(c.get("packages") or ())
    trainer = from_mapping(TrainConfig, c["trainer"], "trainer")
    ema_profiles = _ema_profiles(c["ema"])
    sampler = SamplerSpec.from_config(c["sampler"])
    dataset = _build(c["data"]["dataset"], "data.dataset", packages)
    for key in ("channels", "resolution", "num_classes"):
        if getattr(dataset, key) != c["data"][key]:
            raise ConfigError(
                f"data.{key}={c['data'][key]} but the dataset has {key}={getattr(dataset, key)}; fix data.{key}"
            )
    tokenizer = _build(c["tokenizer"], "tokenizer", packages)
    if hasattr(dataset, "latent_mean"):  # pre-extracted latents: only the tokenizer that made them may read them
        _bind_latents(tokenizer, dataset)
    channels, size, _ = tokenizer.latent_shape(dataset.resolution)
    # The model's input shape comes from the tokenizer and its classes from the data ("interface" arguments).
    shape_args = {"in_channels": channels, "input_size": size, "num_classes": dataset.num_classes}
    clash = sorted(k for k in shape_args if k in c["model"])
    if clash:
        raise ConfigError(
            f"model.{clash[0]} is set by the data and tokenizer ({clash[0]}={shape_args[clash[0]]} here); remove it "
            "from the model config"
        )
    # Same initial weights on every process and every re-run (DDP also broadcasts rank 0's).
    torch.manual_seed(derive_seed("init", c["seed"]))
    interface = {
        "net": lambda: _build(c["model"], "model", packages, **shape_args),
        "objective": lambda: _build(c["objective"], "objective", packages),
        "optimizer": lambda: _build({**c["optim"], "_partial_": True}, "optim", packages),
        "image_resolution": lambda: dataset.resolution,
        "image_channels": lambda: dataset.channels,
    }
    method_spec = c["method"]
    method = _build(method_spec, "method", packages, **_interface(str(method_spec.get("_target_")), packages, interface))

    run_dir = Path(c["run_dir"])
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        text = OmegaConf.to_yaml(OmegaConf.create(c))
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    snapshot_meta = {
        "data": {k: c["data"][k] for k in ("name", "channels", "resolution", "num_classes")},
        "tokenizer": tokenizer.config,
        "sampler": c["sampler"],
    }
    input_shape = tokenizer.latent_shape(dataset.resolution)

    def make_generator(ema_net: torch.nn.Module) -> Generator:
        return Generator(ema_net, method.snapshot_config()["prediction"], tokenizer, input_shape, dataset.num_classes)

    pv = c["preview"]
    unknown_pv = set(pv) - {"images", "nrow", "interval_kimg"}
    if unknown_pv:
        raise ConfigError(f"unknown preview key(s) {sorted(unknown_pv)}; known: images, nrow, interval_kimg")
    hooks: list[Any] = []
    # A method that reconstructs images (tokenizer training) previews and evaluates reconstructions, not samples.
    recon = hasattr(method, "reconstruct")
    if pv["images"] > 0:
        hooks.append(ReconstructionPreviewHook(method, dataset, pv["images"], pv["interval_kimg"], pv["nrow"]) if recon
                     else PreviewHook(make_generator, sampler, pv["images"], pv["interval_kimg"], pv["nrow"]))
    if c["eval"].get("enabled", False):
        if recon != (c["eval"].get("metric") == "recon_yardstick"):
            raise ConfigError(
                f"eval.metric={c['eval'].get('metric')!r} does not fit method {method_spec.get('_target_')}: tokenizer "
                "training takes eval=recon_yardstick (or eval=none), generators take the sample metrics"
            )
        hooks.append(ReconstructionEvalHook(method, dataset, c["eval"]) if recon
                     else EvalHook(make_generator, sampler, c["eval"]))
    result = train(
        method=method, dataset=dataset, tokenizer=tokenizer, ema_profiles=ema_profiles, cfg=trainer, run_dir=run_dir,
        config=c, snapshot_meta=snapshot_meta, hooks=hooks,
    )
    summary = {
        "run_dir": str(run_dir), "kimg": result.nimg / 1000, "steps": result.step,
        "training_state": str(result.state_path), "snapshot": str(result.snapshot_path), **result.metrics,
    }
    if dist.is_main():
        atomic_write(run_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        dist.print0("\n" + "\n".join(f"{k:>28}: {v}" for k, v in summary.items()))
    return summary


def _bind_latents(tokenizer: Any, dataset: Any) -> None:
    """Check the tokenizer against the latents' extraction; a tokenizer that normalises per channel (scaling
    factor 1, no statistics of its own: VA-VAE, LightningDiT) takes the dataset's statistics, which then ride in
    every snapshot. A scaled tokenizer (SD-VAE x 0.18215, as DiT) keeps its scale."""
    from gen.data.latents import apply_statistics, check_tokenizer

    try:
        if tokenizer.scaling_factor == 1.0 and not tokenizer.has_statistics():
            apply_statistics(tokenizer, dataset)
        else:
            check_tokenizer(tokenizer, dataset)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _ema_profiles(c: Mapping[str, Any]) -> list:
    unknown = set(c) - {"decays", "halflife_kimg", "rampup_ratio"}
    if unknown:
        raise ConfigError(f"unknown ema key(s) {sorted(unknown)}; known: decays, halflife_kimg, rampup_ratio")
    try:
        return make_profiles(c.get("decays") or (), c.get("halflife_kimg") or (), c.get("rampup_ratio"))
    except ValueError as e:
        raise ConfigError(str(e)) from e


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"training stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
