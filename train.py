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
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gen.ema import make_profiles
from gen.pipeline import Generator, SamplerSpec
from gen.train.loop import HookContext, NonFiniteLossError, TrainConfig, train
from gen.utils import dist
from gen.utils.ckpt import atomic_write
from gen.utils.config import ConfigError, from_mapping
from gen.utils.images import save_grid
from gen.utils.seed import derive_seed, shard_seeds

TOP_LEVEL_KEYS = {
    "name", "seed", "run_dir", "paths", "data", "tokenizer", "model", "objective", "sampler", "ema", "optim",
    "trainer", "preview", "eval", "experiment",
}


def _instantiate(node: DictConfig, group: str) -> Any:
    try:
        return hydra.utils.instantiate(node)
    except InstantiationException as e:
        raise ConfigError(f"cannot build '{group}' from its config: {e}") from e


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


def run(cfg: DictConfig) -> dict[str, Any]:
    """Build everything from ``cfg`` (failing on bad config before any work), train, evaluate."""
    unknown = set(cfg.keys()) - TOP_LEVEL_KEYS
    if unknown:
        raise ConfigError(f"unknown top-level config key(s) {sorted(unknown)}; known: {sorted(TOP_LEVEL_KEYS)}")
    c = _container(cfg)
    trainer = from_mapping(TrainConfig, c["trainer"], "trainer")
    ema_profiles = _ema_profiles(c["ema"])
    sampler = SamplerSpec.from_config(c["sampler"])
    dataset = _instantiate(cfg.data.dataset, "data.dataset")
    for key in ("channels", "resolution", "num_classes"):
        if getattr(dataset, key) != c["data"][key]:
            raise ConfigError(
                f"data.{key}={c['data'][key]} but the dataset has {key}={getattr(dataset, key)}; fix data.{key}"
            )
    tokenizer = _instantiate(cfg.tokenizer, "tokenizer")
    # Same initial weights on every process and every re-run (DDP also broadcasts rank 0's).
    torch.manual_seed(derive_seed("init", c["seed"]))
    net = _instantiate(cfg.model, "model")
    objective = _instantiate(cfg.objective, "objective")
    optimizer = _instantiate(cfg.optim, "optim")
    input_shape = tokenizer.latent_shape(dataset.resolution)
    _check_model_fits(net.config, input_shape, dataset.num_classes)

    run_dir = Path(c["run_dir"])
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        text = OmegaConf.to_yaml(OmegaConf.create(c))
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
    snapshot_config = {
        "model": net.config,
        "prediction": objective.prediction_spec(),
        "data": {k: c["data"][k] for k in ("name", "channels", "resolution", "num_classes")},
        "tokenizer": tokenizer.config,
        "sampler": c["sampler"],
    }

    def make_generator(ema_net: torch.nn.Module) -> Generator:
        return Generator(ema_net, snapshot_config["prediction"], tokenizer, input_shape, dataset.num_classes)

    pv = c["preview"]
    unknown_pv = set(pv) - {"images", "nrow", "interval_kimg"}
    if unknown_pv:
        raise ConfigError(f"unknown preview key(s) {sorted(unknown_pv)}; known: images, nrow, interval_kimg")
    hooks: list[Any] = []
    if pv["images"] > 0:
        hooks.append(PreviewHook(make_generator, sampler, pv["images"], pv["interval_kimg"], pv["nrow"]))
    if c["eval"].get("enabled", False):
        hooks.append(EvalHook(make_generator, sampler, c["eval"]))
    result = train(
        net=net, objective=objective, dataset=dataset, tokenizer=tokenizer, optimizer=optimizer,
        ema_profiles=ema_profiles, cfg=trainer, run_dir=run_dir, config=c, snapshot_config=snapshot_config,
        hooks=hooks, weight_decay=float(c["optim"].get("weight_decay", 0.0)),
    )
    summary = {
        "run_dir": str(run_dir), "kimg": result.nimg / 1000, "steps": result.step,
        "training_state": str(result.state_path), "snapshot": str(result.snapshot_path), **result.metrics,
    }
    if dist.is_main():
        atomic_write(run_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        dist.print0("\n" + "\n".join(f"{k:>28}: {v}" for k, v in summary.items()))
    return summary


def _ema_profiles(c: Mapping[str, Any]) -> list:
    unknown = set(c) - {"decays", "halflife_kimg", "rampup_ratio"}
    if unknown:
        raise ConfigError(f"unknown ema key(s) {sorted(unknown)}; known: decays, halflife_kimg, rampup_ratio")
    try:
        return make_profiles(c.get("decays") or (), c.get("halflife_kimg") or (), c.get("rampup_ratio"))
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _check_model_fits(model_cfg: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> None:
    c, h, w = input_shape
    if model_cfg.get("in_channels") != c:
        raise ConfigError(
            f"the model takes {model_cfg.get('in_channels')} input channels but the data/tokenizer gives {c}; "
            f"set model.in_channels={c} (or leave it as ${{data.channels}})"
        )
    if model_cfg.get("input_size") != h or h != w:
        raise ConfigError(
            f"the model expects {model_cfg.get('input_size')}x{model_cfg.get('input_size')} inputs but the "
            f"data/tokenizer gives {h}x{w}; set model.input_size={h}"
        )
    if model_cfg.get("num_classes") != num_classes:
        raise ConfigError(
            f"the model has {model_cfg.get('num_classes')} classes but the data has {num_classes}; "
            f"set model.num_classes={num_classes}"
        )


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"training stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
