"""Known-answer tests of the generator-quality metrics (feda2v.evaluate.metrics)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from feda2v.errors import DataError
from feda2v.evaluate.metrics import (
    classifier_accuracy,
    frechet_distance,
    frechet_distance_from_stats,
    knn_precision_recall,
    median_bandwidth,
    mmd_rbf,
    reconstruction_error,
    tstr_trtr,
)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d


# ------------------------------------------------------------------ Fréchet distance


def test_frechet_identical_sets_is_zero():
    x = _rng().normal(size=(300, 16))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_translation_is_squared_shift():
    # same covariance, so the trace term vanishes and FD = ||shift||² exactly
    x = _rng().normal(size=(200, 8))
    shift = np.arange(8) / 4.0
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_frechet_closed_form_diagonal_gaussians():
    # commuting (diagonal) covariances: FD = ||m1-m2||² + Σ (σ1 - σ2)²
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = float(((m1 - m2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum())
    got = frechet_distance_from_stats(m1, np.diag(s1), m2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(5 + 4 + 1, rel=1e-12)  # 5 (means) + (1-3)² + (2-1)²


def test_frechet_matches_scipy_sqrtm_on_general_covariances():
    rng = _rng(1)
    d = 12
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float((m1 - m2) @ (m1 - m2) + np.trace(s1 + s2 - 2 * covmean))
    assert frechet_distance_from_stats(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_sampled_gaussians_approach_closed_form():
    rng = _rng(2)
    m1, m2 = np.zeros(4), np.array([2.0, 0.0, 0.0, 1.0])
    sd1, sd2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.0, 1.0, 0.5, 3.0])
    x = rng.normal(size=(20000, 4)) * sd1 + m1
    y = rng.normal(size=(20000, 4)) * sd2 + m2
    expected = float(((m1 - m2) ** 2).sum() + ((sd1 - sd2) ** 2).sum())  # 5 + 1 + 4 = 10
    assert frechet_distance(x, y) == pytest.approx(expected, rel=0.03)


def test_frechet_rank_deficient_covariances_are_finite_and_correct():
    rng = _rng(3)
    # 3 samples in 10-D (rank <= 2) and data on a 2-D subspace: singular covariances
    few = rng.normal(size=(3, 10))
    assert frechet_distance(few, few) == pytest.approx(0.0, abs=1e-8)
    basis = rng.normal(size=(2, 10))
    x = rng.normal(size=(100, 2)) @ basis
    shift = np.full(10, 0.5)
    fd = frechet_distance(x, x + shift)
    assert np.isfinite(fd) and fd == pytest.approx(float(shift @ shift), rel=1e-6)
    # a rank-1 vs a rank-1 covariance along orthogonal axes: FD = 1 + 1 (no shared direction)
    s1, s2 = np.diag([1.0, 0.0]), np.diag([0.0, 1.0])
    assert frechet_distance_from_stats([0, 0], s1, [0, 0], s2) == pytest.approx(2.0, abs=1e-12)


def test_frechet_same_distribution_small_shifted_large():
    rng = _rng(4)
    x, y = rng.normal(size=(500, 8)), rng.normal(size=(500, 8))
    far = rng.normal(size=(500, 8)) + 3.0
    same, shifted = frechet_distance(x, y), frechet_distance(x, far)
    assert same < 0.5
    assert shifted > 60  # ≈ 8 * 3² = 72
    assert shifted > 100 * same


# ------------------------------------------------------------------ MMD


def test_mmd_identical_and_same_distribution_near_zero_shifted_large():
    rng = _rng(5)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    assert abs(mmd_rbf(x, y)) < 0.01
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-2)  # unbiased: -1/(n-1)-ish, not exactly 0
    assert mmd_rbf(x, rng.normal(size=(400, 8)) + 3.0) > 0.5


def test_mmd_is_unbiased_not_clipped():
    # the biased (V-statistic) estimator is always > 0; the unbiased one straddles 0
    rng = _rng(6)
    vals = [mmd_rbf(rng.normal(size=(60, 3)), rng.normal(size=(60, 3))) for _ in range(30)]
    assert min(vals) < 0 < max(vals)
    assert abs(np.mean(vals)) < 0.01


def test_mmd_known_value_with_fixed_bandwidth():
    # two points per set, 1-D: x = {0, 0}, y = {1, 1}; σ = 1 -> k(0,1) = e^{-1/2}
    x, y = np.zeros((2, 1)), np.ones((2, 1))
    assert mmd_rbf(x, y, bandwidth=1.0) == pytest.approx(2 - 2 * np.exp(-0.5), rel=1e-12)


def test_median_bandwidth_is_median_pairwise_distance():
    x = np.array([[0.0], [1.0]])
    y = np.array([[3.0]])
    # pooled distances: 1, 3, 2 -> median 2
    assert median_bandwidth(x, y) == pytest.approx(2.0)


def test_mmd_accepts_torch_tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g)
    assert mmd_rbf(x, x + 5.0) == pytest.approx(mmd_rbf(x.numpy(), x.numpy() + 5.0))


# ------------------------------------------------------------------ k-NN precision / recall


def test_knn_precision_recall_identical_is_one():
    x = _rng(7).normal(size=(200, 6))
    assert knn_precision_recall(x, x, k=5) == (1.0, 1.0)


def test_knn_precision_recall_same_distribution_high_disjoint_low():
    rng = _rng(8)
    real, fake = rng.normal(size=(500, 4)), rng.normal(size=(500, 4))
    p, r = knn_precision_recall(real, fake, k=5)
    assert p > 0.9 and r > 0.9
    p, r = knn_precision_recall(real, rng.normal(size=(500, 4)) + 10.0, k=5)
    assert p == 0.0 and r == 0.0


def test_knn_mode_collapse_high_precision_low_recall():
    rng = _rng(9)
    real = rng.normal(size=(500, 2))
    fake = rng.normal(size=(500, 2)) * 0.05  # every sample near the mode: plausible but not diverse
    p, r = knn_precision_recall(real, fake, k=5)
    assert p > 0.95
    assert r < 0.2


def test_knn_matches_brute_force_definition():
    rng = _rng(10)
    real, fake, k = rng.normal(size=(30, 3)), rng.normal(size=(25, 3)) + 0.7, 3

    def radii(a):
        return np.array([np.sort(np.linalg.norm(a - p, axis=1))[k] for p in a])  # [0] is itself

    def cover(points, centers, rad):
        return np.mean([any(np.linalg.norm(q - c) <= rr for c, rr in zip(centers, rad)) for q in points])

    p, r = knn_precision_recall(real, fake, k=k)
    assert p == pytest.approx(cover(fake, real, radii(real)))
    assert r == pytest.approx(cover(real, fake, radii(fake)))


def test_knn_needs_more_samples_than_k():
    with pytest.raises(DataError, match="at least 6"):
        knn_precision_recall(np.zeros((5, 2)), np.zeros((10, 2)), k=5)
    with pytest.raises(DataError, match="knn_k"):
        knn_precision_recall(np.zeros((5, 2)), np.zeros((10, 2)), k=0)


# ------------------------------------------------------------------ TSTR / TRTR


def _blobs(rng, n_per_class, means, scale=1.0):
    xs, ys = [], []
    for c, m in enumerate(means):
        xs.append(rng.normal(size=(n_per_class, len(m))) * scale + m)
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs), np.concatenate(ys)


MEANS = np.array([[0, 0, 0, 0], [2.5, 0, 0, 0], [0, 2.5, 0, 0], [0, 0, 2.5, 0]], dtype=float)


def test_tstr_equals_trtr_when_synthetic_matches_real():
    rng = _rng(11)
    real_x, real_y = _blobs(rng, 200, MEANS)
    synth_x, synth_y = _blobs(rng, 200, MEANS)
    test_x, test_y = _blobs(rng, 200, MEANS)
    tstr, trtr = tstr_trtr(synth_x, synth_y, real_x, real_y, test_x, test_y, seed=0)
    assert trtr.overall > 0.75  # the task is learnable
    assert abs(tstr.overall - trtr.overall) < 0.03
    assert set(tstr.per_class) == {0, 1, 2, 3}
    for c in range(4):
        assert abs(tstr.per_class[c] - trtr.per_class[c]) < 0.08


def test_tstr_far_below_trtr_when_synthetic_is_wrong():
    rng = _rng(12)
    real_x, real_y = _blobs(rng, 200, MEANS)
    test_x, test_y = _blobs(rng, 200, MEANS)
    # synthetic classes sit where other classes live (labels rotated): a misleading generator
    synth_x, synth_y = _blobs(rng, 200, np.roll(MEANS, 1, axis=0))
    tstr, trtr = tstr_trtr(synth_x, synth_y, real_x, real_y, test_x, test_y, seed=0)
    assert trtr.overall > 0.75
    assert tstr.overall < 0.2
    assert tstr.overall < trtr.overall - 0.5


def test_classifier_is_deterministic_and_identical_train_set_gives_trtr():
    rng = _rng(13)
    x, y = _blobs(rng, 100, MEANS)
    t, ty = _blobs(rng, 100, MEANS)
    a = classifier_accuracy(x, y, t, ty, seed=0)
    b = classifier_accuracy(x.copy(), y.copy(), t, ty, seed=0)
    assert a == b
    tstr, trtr = tstr_trtr(x, y, x, y, t, ty, seed=0)
    assert tstr == trtr


def test_classifier_per_class_and_balanced():
    # one training class only: predicts it everywhere -> its class recall 1, others 0
    x = np.zeros((10, 2))
    y = np.full(10, 2)
    t = np.zeros((6, 2))
    ty = np.array([2, 2, 0, 0, 0, 0])
    s = classifier_accuracy(x, y, t, ty)
    assert s.per_class == {0: 0.0, 2: 1.0}
    assert s.overall == pytest.approx(2 / 6)
    assert s.balanced == pytest.approx(0.5)


# ------------------------------------------------------------------ reconstruction, input checks


def test_reconstruction_error_known_value():
    x = np.array([[0.0, 0.0], [1.0, 1.0]])
    recon = np.array([[1.0, 1.0], [1.0, 3.0]])
    mean, per = reconstruction_error(x, recon)
    assert per.tolist() == [1.0, 2.0]
    assert mean == pytest.approx(1.5)
    assert reconstruction_error(x, x)[0] == 0.0


@pytest.mark.parametrize(
    "fn", [frechet_distance, mmd_rbf, lambda a, b: knn_precision_recall(a, b, 1)]
)
def test_bad_inputs_are_data_errors(fn):
    with pytest.raises(DataError, match="dimensions differ"):
        fn(np.zeros((10, 3)), np.zeros((10, 4)))
    bad = np.zeros((10, 3))
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        fn(bad, np.zeros((10, 3)))
