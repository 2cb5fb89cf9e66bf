"""Streaming statistics, statistics files and image-array validation (eval.stats)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eval.stats import (
    FeatureStats,
    GaussianStats,
    check_image_array,
    load_image_npz,
    load_stats,
    save_image_npz,
    save_stats,
)

MANIFEST = {"extractor": "lenet-mnist5k-v1", "weights_sha256": "ab" * 32, "resize": "none-32", "dim": 6}


def test_streaming_stats_equal_numpy_mean_and_unbiased_cov() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(301, 6, generator=g, dtype=torch.float64) * 2 + 5
    st = FeatureStats(6)
    for chunk in feats.split(64):
        st.update(chunk.float())
    ref = feats.float().double().numpy()
    np.testing.assert_allclose(st.mu(), ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma(), np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-12)
    assert st.n == 301 and st.reduce().n == 301  # one process: reduce is a copy


def test_stats_refuse_bad_features() -> None:
    st = FeatureStats(4)
    with pytest.raises(ValueError, match="expected features"):
        st.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="NaN"):
        st.update(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match="at least 2"):
        st.update(torch.zeros(1, 4))
        st.sigma()


def test_stats_file_round_trip_and_manifest_checks(tmp_path) -> None:
    st = FeatureStats(6)
    st.update(torch.randn(50, 6))
    gs = st.gaussian({**MANIFEST, "dataset": "mnist5k/train"})
    path = save_stats(tmp_path / "ref.npz", gs)
    back = load_stats(path, expect=MANIFEST)
    np.testing.assert_array_equal(back.mu, gs.mu)
    np.testing.assert_array_equal(back.sigma, gs.sigma)
    assert back.n == 50 and back.manifest["dataset"] == "mnist5k/train"
    with pytest.raises(ValueError, match=r"resize: 'none-32' in the reference statistics .* vs 'tf1-bilinear' in use"):
        load_stats(path, expect={**MANIFEST, "resize": "tf1-bilinear"})
    with pytest.raises(ValueError, match="extractor"):
        load_stats(path, expect={**MANIFEST, "extractor": "inception-v3-pool3"})
    with pytest.raises(ValueError, match="weights_sha256"):
        load_stats(path, expect={**MANIFEST, "weights_sha256": "cd" * 32})


def test_manifestless_files_need_an_assumption(tmp_path) -> None:
    path = tmp_path / "adm.npz"
    np.savez(path, mu=np.zeros(6), sigma=np.eye(6))
    with pytest.raises(ValueError, match="no manifest"):
        load_stats(path, expect=MANIFEST)
    got = load_stats(path, expect=MANIFEST, assume_manifest=MANIFEST)
    assert got.manifest["assumed"] is True
    assert json.loads(json.dumps(got.manifest))  # stays JSON-able


def test_image_npz_round_trip_adm_layout(tmp_path) -> None:
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(5)
    gs = GaussianStats(np.zeros(3), np.eye(3), 5, {"extractor": "x"})
    path = save_image_npz(tmp_path / "batch.npz", images, labels, stats=gs)
    with np.load(path) as d:
        assert d["arr_0"].shape == (5, 8, 8, 3) and d["arr_0"].dtype == np.uint8
        assert {"mu", "sigma", "arr_1"} <= set(d.files)
    back, back_labels = load_image_npz(path)
    assert torch.equal(back, images) and torch.equal(back_labels, labels)


@pytest.mark.parametrize(
    ("arr", "match"),
    [
        (np.random.rand(4, 8, 8, 3).astype(np.float32), "expected uint8 .* got dtype float32 with values in"),
        (np.zeros((4, 8, 8, 3), dtype=np.int64) + 7, "got dtype int64"),
        (np.full((4, 3, 8, 8), 9, dtype=np.uint8), "looks like NCHW"),
        (np.full((8, 8, 3), 9, dtype=np.uint8), "got shape"),
        (np.ones((4, 8, 8, 3), dtype=np.uint8), "scaled to \\[0, 1\\]"),
    ],
)
def test_bad_sample_arrays_refused(tmp_path, arr: np.ndarray, match: str) -> None:
    with pytest.raises((TypeError, ValueError), match=match):
        check_image_array(arr)
    np.savez(tmp_path / "s.npz", arr_0=arr)
    with pytest.raises((TypeError, ValueError), match=match):
        load_image_npz(tmp_path / "s.npz")
