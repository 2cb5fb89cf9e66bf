"""Seed-sharded generation for evaluation, streamed into reducible statistics.

Image k of a sample set is made from seed k alone (``gen.utils.seed.PerImageRandom`` inside the
``generate_fn``), the seeds are cut into batches and dealt round-robin to the processes
(``fixed_batches``: EDM2's scheme, with batches that do not change with the world size), and each process adds its features to float64 sums that
are reduced with one all-reduce at the end. The metric therefore does not depend on the number of
processes or the batch size (as EDM2's generate_images.py seeds per image). No PNG is written unless ``png_dir`` is given.

The model side is one callable, ``generate_fn(seeds: list[int]) -> (uint8 images (B, C, H, W), labels (B,)
or None)``; the entry points build it from a snapshot and a sampler.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from eval.features import FeatureExtractor, InceptionFeatures, check_uint8_images
from eval.fid import InceptionScoreStats, ISConvention, fid_from_stats
from eval.stats import FeatureStats, GaussianStats, load_stats, save_stats
from gen.utils import dist

GenerateFn = Callable[[list[int]], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass
class Collected:
    """Reduced accumulators of one image set (identical on every process).

    Attributes:
        stats: features' Σf, Σffᵀ, n.
        spatial: sFID features' sums (Inception with ``spatial=True`` only).
        inception_score: IS sums (Inception with ``inception_score=True`` only).
        correct: images whose yardstick class equals their label (with ``classifier``), and
        labelled: how many had labels.
        features: this process's raw features, kept only with ``keep_features=True`` (precision/recall),
        indices: and their positions in the global seed list (``all_features`` puts them together).
    """

    stats: FeatureStats
    spatial: FeatureStats | None = None
    inception_score: InceptionScoreStats | None = None
    correct: int = 0
    labelled: int = 0
    features: list[torch.Tensor] = field(default_factory=list)
    indices: list[torch.Tensor] = field(default_factory=list)

    @property
    def class_accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None


def collect(
    generate_fn: GenerateFn,
    seeds: Sequence[int],
    extractor: FeatureExtractor,
    batch_size: int = 64,
    *,
    spatial: bool = False,
    inception_score: bool = False,
    is_convention: ISConvention = "adm",
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
    keep_features: bool = False,
    png_dir: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> Collected:
    """Generate images for ``seeds`` across processes and accumulate their features.

    Every process must call this with the same arguments; it contains the collective reduce.

    Args:
        generate_fn: ``seeds -> (uint8 images (B, C, H, W), labels (B,) or None)``.
        seeds: the global list of per-image seeds (image k <- seeds[k]).
        extractor: the feature network.
        batch_size: images per ``generate_fn`` call on one process.
        spatial, inception_score: also accumulate sFID / IS sums (``InceptionFeatures`` only).
        is_convention: how the Inception Score splits the images (``eval.fid.inception_score_splits``):
            ``adm`` (groups of 5,000, the number papers report) or ``torch-fidelity`` (10 shuffled splits).
        classifier: ``uint8 images -> predicted labels``, for class accuracy of labelled images.
        keep_features: keep this process's raw features (for precision/recall).
        png_dir: also write ``<seed>.png`` per image there.
        progress: called with the number of images this process finished so far.
    """
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be distinct: a repeated seed repeats an image")
    position = {s: i for i, s in enumerate(seeds)}
    needs_inception = spatial or inception_score
    if needs_inception and not isinstance(extractor, InceptionFeatures):
        raise ValueError("sFID and Inception Score need the Inception extractor")
    # Sums live where the extractor runs (float64 Gram updates on a GPU are far faster than on a CPU).
    device = getattr(extractor, "device", "cpu")
    stats = FeatureStats(extractor.dim, device=device)
    out = Collected(stats=stats)  # the sums of this process until the reduction below
    if spatial:
        out.spatial = FeatureStats(InceptionFeatures.SPATIAL_CHANNELS * 17 * 17, device=device)
    if inception_score:
        out.inception_score = InceptionScoreStats(len(seeds), convention=is_convention)
    done = 0
    for batch in fixed_batches(seeds, batch_size, dist.rank(), dist.world_size()):
        if not batch:
            continue
        images, labels = generate_fn(batch)
        check_uint8_images(images)
        if images.shape[0] != len(batch):
            raise ValueError(f"generate_fn returned {images.shape[0]} images for {len(batch)} seeds")
        index = torch.tensor([position[s] for s in batch])
        _add_batch(out, extractor, images, labels, index, spatial=spatial, needs_inception=needs_inception,
                   keep_features=keep_features, classifier=classifier)
        if png_dir is not None:
            _write_pngs(png_dir, images, batch)
        done += len(batch)
        if progress is not None:
            progress(done)
    out.stats = stats.reduce()
    if out.spatial is not None:
        out.spatial = out.spatial.reduce()
    if out.inception_score is not None:
        out.inception_score = out.inception_score.reduce()
    if classifier is not None:
        counts = torch.tensor([float(out.correct), float(out.labelled)], dtype=torch.float64)
        dist.all_reduce_sum(counts)
        out.correct, out.labelled = int(counts[0]), int(counts[1])
    return out


def _add_batch(
    out: Collected, extractor: FeatureExtractor, images: torch.Tensor, labels: torch.Tensor | None, index: torch.Tensor,
    *, spatial: bool, needs_inception: bool, keep_features: bool,
    classifier: Callable[[torch.Tensor], torch.Tensor] | None,
) -> None:
    """Add one batch of uint8 ``images`` (B, C, H, W) at global positions ``index`` (B,) to ``out``'s sums."""
    if needs_inception:
        feats = extractor.extract(images, spatial=spatial)  # type: ignore[attr-defined]
        f = feats["pool3"]
        if out.spatial is not None:
            out.spatial.update(feats["spatial"])
        if out.inception_score is not None:
            out.inception_score.update(feats["logits"], index)
    else:
        f = extractor(images)
    out.stats.update(f)
    if keep_features:
        out.features.append(f.cpu())
        out.indices.append(index)
    if classifier is not None and labels is not None:
        out.correct += int((classifier(images).cpu() == labels.long().cpu()).sum())
        out.labelled += len(index)


def fixed_batches(seeds: Sequence[int], batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Cut seeds into consecutive batches of ``batch_size`` and deal them round-robin to the processes.

    Unlike ``gen.utils.seed.shard_seeds`` (equal batch counts per process, sizes depending on the world
    size), every batch here is the same whatever the number of processes. Convolution kernels may round
    differently for different batch sizes, so this keeps each image's features bit-identical and the
    reduced statistics equal to float64 summation order. No collective runs per batch, so processes
    may get different numbers of batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    seeds = list(seeds)
    batches = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
    return batches[rank::world]


def all_features(collected: Collected, num_images: int) -> torch.Tensor:
    """Every process's kept features in global seed order, (N, D) float32, on every process.

    Assembled with one all-reduce of a zero-filled (N, D) buffer in which each process writes its own
    rows, so the result does not depend on the split. Only precision/recall needs raw features.
    """
    # float32 is exact here: every entry is one process's value plus zeros from all the others.
    buf = torch.zeros(num_images, collected.stats.dim, dtype=torch.float32)
    for f, idx in zip(collected.features, collected.indices, strict=True):
        buf[idx] = f.float()
    return dist.all_reduce_sum(buf)


def _write_pngs(folder: str | os.PathLike, images: torch.Tensor, seeds: Sequence[int]) -> None:
    from gen.utils.images import save_png

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for img, s in zip(images.cpu(), seeds, strict=True):
        path = folder / f"{s:06d}.png"
        try:
            save_png(img, path)  # atomic: a killed run leaves no half-written PNG
        except OSError as e:
            # Name the PNG: a write error on an open file (a full disk) carries no file name.
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def images_fn(images: torch.Tensor, labels: torch.Tensor | None = None) -> GenerateFn:
    """A ``generate_fn`` over stored images: "seed" k returns image k (for reference statistics, folders, npz)."""

    def fn(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = torch.tensor(indices, dtype=torch.long)
        return images[idx], (labels[idx] if labels is not None else None)

    return fn


def image_stats(
    images: torch.Tensor,
    extractor: FeatureExtractor,
    batch_size: int = 64,
    spatial: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Collected:
    """Statistics of a stored uint8 image set (N, C, H, W), split over processes by index.

    ``progress`` is called with the number of images this process has finished.
    """
    check_uint8_images(images)
    return collect(images_fn(images), range(images.shape[0]), extractor, batch_size, spatial=spatial, progress=progress)


def share(num_images: int, batch_size: int, rank: int | None = None, world: int | None = None) -> int:
    """How many of ``num_images`` images one process handles under ``fixed_batches`` (for progress totals)."""
    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    return sum(len(b) for b in fixed_batches(range(num_images), batch_size, rank, world))


def evaluate(
    generate_fn: GenerateFn,
    seeds: Sequence[int],
    extractor: FeatureExtractor,
    ref: GaussianStats,
    *,
    batch_size: int = 64,
    real_images: torch.Tensor | None = None,
    allow_singular: bool = False,
    is_convention: ISConvention = "adm",
    png_dir: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
    real_progress: Callable[[int], None] | None = None,
) -> dict[str, float | int]:
    """All metrics of a generated (or stored) image set against reference statistics.

    FID always; with the Inception extractor also the Inception Score (at least 10 images; split as
    ``is_convention`` says: ADM's consecutive groups of 5,000 by default, or torch-fidelity's 10
    shuffled splits) and, when ``ref`` holds ``mu_s``/``sigma_s``, sFID; with a yardstick extractor and labelled images the class accuracy; with
    ``real_images`` (an ADM reference batch) improved precision/recall (k=3). FD-DINOv2 is the FID
    entry with a DINOv2 extractor. ``progress`` / ``real_progress`` are called with the number of
    generated / real images this process has finished.

    Returns:
        ``{"fid" (or "fd_dinov2"), "num_images", ["sfid"], ["inception_score", "inception_score_std"],
        ["class_accuracy"], ["precision", "recall"]}``.
    """
    from eval.features import YardstickFeatures
    from eval.fid import precision_recall
    from eval.stats import check_compatible

    manifest = extractor.manifest()
    check_compatible(ref.manifest, manifest)
    inception = isinstance(extractor, InceptionFeatures)
    spatial = inception and "mu_s" in ref.extra
    # ADM scores consecutive groups of 5,000 images (one group below 5,000), torch-fidelity 10 shuffled
    # splits; below 10 images the score says nothing and is left out.
    with_is = inception and len(seeds) >= 10
    classifier = extractor.yardstick.predict if isinstance(extractor, YardstickFeatures) else None
    got = collect(
        generate_fn, seeds, extractor, batch_size, spatial=spatial, inception_score=with_is, is_convention=is_convention,
        classifier=classifier, keep_features=real_images is not None, png_dir=png_dir, progress=progress,
    )
    from eval.features import DINOv2Features

    # The same Fréchet distance; named FD-DINOv2 when the features are DINOv2's (Stein et al. 2023).
    key = "fd_dinov2" if isinstance(extractor, DINOv2Features) else "fid"
    out: dict[str, float | int] = {
        key: fid_from_stats(got.stats.gaussian(manifest), ref, allow_singular=allow_singular),
        "num_images": got.stats.n,
    }
    if got.spatial is not None:
        from eval.fid import check_enough_images, frechet_distance

        check_enough_images(got.spatial.n, got.spatial.dim, "sFID samples", allow_singular)
        out["sfid"] = frechet_distance(got.spatial.mu(), got.spatial.sigma(), ref.extra["mu_s"], ref.extra["sigma_s"])
    if got.inception_score is not None:
        out["inception_score"], out["inception_score_std"] = got.inception_score.score()
    if got.class_accuracy is not None:
        out["class_accuracy"] = got.class_accuracy
    if real_images is not None:
        real = collect(
            images_fn(real_images), range(len(real_images)), extractor, batch_size, keep_features=True,
            progress=real_progress,
        )
        out["precision"], out["recall"] = precision_recall(
            all_features(real, len(real_images)), all_features(got, len(seeds)), k=3
        )
    return out


# ----------------------------------------------------------------------------------------------
# The yardstick hook.


def yardstick_reference(
    dataset_name: str = "mnist5k",
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    extractor: FeatureExtractor | None = None,
) -> tuple[FeatureExtractor, GaussianStats]:
    """The yardstick extractor and the statistics of a built-in dataset split, cached next to the network."""
    from eval.classifier import default_cache_dir, load_dataset_tensors
    from eval.features import YardstickFeatures

    ext = extractor if extractor is not None else YardstickFeatures(dataset_name, cache_dir)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"ref-{dataset_name}-{split}-{ext.name}-{ext.weights_sha256[:12]}.npz"
    if path.exists():
        return ext, load_stats(path, expect=ext.manifest())
    images, _ = load_dataset_tensors(dataset_name, split)
    stats = image_stats(images, ext, batch_size=500).stats.gaussian({**ext.manifest(), "dataset": f"{dataset_name}/{split}"})
    if dist.rank() == 0:
        save_stats(path, stats)
    return ext, stats


def yardstick_metrics(
    generate_fn: GenerateFn,
    num_images: int = 5000,
    dataset_name: str = "mnist5k",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 250,
    seed_offset: int = 0,
    memorisation: bool = False,
    trained_on: torch.Tensor | None = None,
) -> dict[str, float]:
    """Yardstick FID (and class accuracy when labels are returned) of ``num_images`` generated images.

    Seeds are ``seed_offset .. seed_offset + num_images - 1``. Reference: the dataset's training split.
    ``memorisation``: also the memorisation rate of the samples against the images the generator trained on
    (``trained_on``, uint8 (N, C, H, W); default the training split, which a run on a subset of it must not use:
    ``gen.data.base.run_training_tensors`` rebuilds them from its config), calibrated by the held-out split
    (``eval.memorisation``), in the yardstick's features.

    Returns:
        ``{"fid": ..., "class_accuracy": ...}`` (the latter only for labelled samples), plus
        ``memorisation_rate``, ``sample_nn_median`` and ``heldout_nn_median`` with ``memorisation``.
    """
    ext, ref = yardstick_reference(dataset_name, "train", cache_dir)
    clf = ext.yardstick.predict  # type: ignore[attr-defined]
    seeds = range(seed_offset, seed_offset + num_images)
    got = collect(generate_fn, seeds, ext, batch_size, classifier=clf, keep_features=memorisation)
    out = {"fid": fid_from_stats(got.stats.gaussian(ext.manifest()), ref)}
    if got.class_accuracy is not None:
        out["class_accuracy"] = got.class_accuracy
    if memorisation:
        from eval.classifier import load_dataset_tensors
        from eval.memorisation import memorisation_rate

        def features(images: torch.Tensor) -> torch.Tensor:
            return torch.cat([ext(b) for b in images.split(500)]).float()

        train = trained_on if trained_on is not None else load_dataset_tensors(dataset_name, "train")[0]
        heldout = load_dataset_tensors(dataset_name, "heldout")[0]
        out.update(memorisation_rate(all_features(got, num_images), features(train), features(heldout)))
    return out


def yardstick_fid(
    generate_fn: GenerateFn,
    num_images: int = 5000,
    dataset_name: str = "mnist5k",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 250,
    seed_offset: int = 0,
) -> float:
    """Training hook: the yardstick FID of ``num_images`` samples against the training images (the yardstick).

    Call it on every process (it reduces across them) every N kimg and log the value beside the loss.
    """
    return yardstick_metrics(generate_fn, num_images, dataset_name, cache_dir, batch_size, seed_offset)["fid"]
