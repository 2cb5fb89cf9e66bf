"""Memorisation rate: the share of generated samples that sit closer to a training image than held-out images do.

A generator that copies its training set puts samples at (near) zero distance from training images, closer than
images it never saw; a generator that generalises places its samples about as far from the training set as fresh
data lies. In a feature space (the yardstick network's, for the built-in data) the rate is

    rate = mean_s [ min_i ||f(s) - f(x_i)|| < median_h min_i ||f(h) - f(x_i)|| ]

over samples s, training images x_i and held-out images h: about 0.5 for samples distributed like fresh data, towards
1 as samples approach copies of training images, below 0.5 for samples farther from the data than fresh digits
(poor samples). It is the nearest-neighbour test of memorisation studies (e.g. Carlini et al. 2023, "Extracting
Training Data from Diffusion Models", which thresholds nearest-neighbour distances), calibrated by held-out data.
"""

from __future__ import annotations

import torch
from torch import Tensor


def nearest_distances(query: Tensor, ref: Tensor, chunk: int = 1024) -> Tensor:
    """Euclidean distance from each query row to its nearest reference row: (M, D), (N, D) -> (M,) float64."""
    if query.ndim != 2 or ref.ndim != 2 or query.shape[1] != ref.shape[1]:
        raise ValueError(f"need (M, D) and (N, D) features, got {tuple(query.shape)} and {tuple(ref.shape)}")
    if ref.shape[0] == 0:
        raise ValueError("no reference features to measure distances to")
    ref = ref.double()
    return torch.cat([torch.cdist(q.double(), ref).min(dim=1).values for q in query.split(chunk)])


def memorisation_rate(samples: Tensor, train: Tensor, heldout: Tensor) -> dict[str, float]:
    """The rate above, with the two medians it compares (features (M, D), (N, D), (H, D)).

    Returns:
        ``memorisation_rate`` in [0, 1], ``sample_nn_median`` and ``heldout_nn_median`` (feature distances).
    """
    d_held = nearest_distances(heldout, train)
    d_samp = nearest_distances(samples, train)
    threshold = d_held.median()
    return {
        "memorisation_rate": float((d_samp < threshold).double().mean()),
        "sample_nn_median": float(d_samp.median()),
        "heldout_nn_median": float(threshold),
    }
