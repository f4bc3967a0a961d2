"""Generator-quality metrics on embedding sets (pure functions; numpy/scipy/sklearn only).

Every function takes 2-D arrays ``[n, d]`` (numpy or torch), computes in float64 and returns plain
Python floats / dicts so results go straight into JSON. Nothing here draws random numbers: the
classifier behind TSTR/TRTR is deterministic (lbfgs, fixed random_state, one BLAS thread).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from feda2v.errors import DataError

__all__ = [
    "as_array",
    "frechet_distance",
    "frechet_distance_from_stats",
    "mmd_rbf",
    "median_bandwidth",
    "knn_precision_recall",
    "ClassifierScores",
    "classifier_accuracy",
    "tstr_trtr",
    "reconstruction_error",
]


def as_array(x) -> np.ndarray:
    """``[n, d]`` float64 numpy array from a numpy array, a torch tensor or a nested list."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise DataError(f"expected a 2-D embedding array [n, d], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise DataError("embeddings contain NaN or inf; the generator's samples are not usable")
    return a


def _check_pair(x: np.ndarray, y: np.ndarray, min_n: int = 1) -> None:
    if x.shape[1] != y.shape[1]:
        raise DataError(f"embedding dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if len(x) < min_n or len(y) < min_n:
        raise DataError(f"need at least {min_n} samples in each set, got {len(x)} and {len(y)}")


# ---------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root by eigen-decomposition; tiny negative eigenvalues clipped to 0."""
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1-mu2||² + tr(S1 + S2 - 2 (S1 S2)^½) for PSD S1, S2 (rank-deficient allowed).

    tr (S1 S2)^½ equals tr (S1^½ S2 S1^½)^½, and the latter is a symmetric PSD matrix, so its
    eigenvalues are real and >= 0 up to rounding: no complex sqrtm, no ill-conditioned inverse.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if not (mu1.shape == mu2.shape and s1.shape == s2.shape == (mu1.size, mu1.size)):
        raise DataError(f"mismatched statistics shapes: {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    w = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # rounding can give -1e-12 for identical inputs


def frechet_distance(x, y) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets (unbiased covariances)."""
    x, y = as_array(x), as_array(y)
    _check_pair(x, y, min_n=2)
    return frechet_distance_from_stats(
        x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    )


# ---------------------------------------------------------------------------------------------
# MMD (RBF kernel, unbiased)
# ---------------------------------------------------------------------------------------------


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.clip(d, 0.0, None)


def median_bandwidth(x, y) -> float:
    """Median heuristic: the median pairwise Euclidean distance of the pooled set (off-diagonal)."""
    z = np.concatenate([as_array(x), as_array(y)])
    d = _sq_dists(z, z)[np.triu_indices(len(z), k=1)]
    med = float(np.sqrt(np.median(d))) if d.size else 0.0
    return med if med > 0 else 1.0  # all points equal: any bandwidth gives MMD 0


def mmd_rbf(x, y, bandwidth: float | None = None) -> float:
    """Unbiased estimate of MMD² with k(a,b) = exp(-||a-b||² / (2 σ²)); σ from the median heuristic.

    Unbiased means diagonal terms are left out, so the estimate fluctuates around 0 (can be
    slightly negative) when both sets come from one distribution.
    """
    x, y = as_array(x), as_array(y)
    _check_pair(x, y, min_n=2)
    sigma = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if sigma <= 0:
        raise DataError(f"MMD bandwidth must be > 0, got {sigma}")
    g = 1.0 / (2.0 * sigma * sigma)
    kxx, kyy, kxy = (np.exp(-g * _sq_dists(a, b)) for a, b in ((x, x), (y, y), (x, y)))
    n, m = len(x), len(y)
    sxx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


# ---------------------------------------------------------------------------------------------
# k-NN precision / recall (Kynkäänniemi et al., 2019)
# ---------------------------------------------------------------------------------------------


def _knn_radii(a: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour within its own set (itself excluded)."""
    d = _sq_dists(a, a)
    np.fill_diagonal(d, np.inf)
    return np.sqrt(np.partition(d, k - 1, axis=1)[:, k - 1])


def _coverage(points: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> float:
    """Share of ``points`` inside at least one ball (center, radius) of the other set's manifold."""
    d = np.sqrt(_sq_dists(points, centers))
    return float(np.mean((d <= radii[None, :] * (1 + 1e-12)).any(axis=1)))


def knn_precision_recall(real, fake, k: int = 5) -> tuple[float, float]:
    """(precision, recall): precision = share of fake samples inside the real k-NN manifold;
    recall = share of real samples inside the fake k-NN manifold."""
    real, fake = as_array(real), as_array(fake)
    k = int(k)
    if k < 1:
        raise DataError(f"evaluate.knn_k must be >= 1, got {k}")
    _check_pair(real, fake, min_n=k + 1)
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


# ---------------------------------------------------------------------------------------------
# TSTR / TRTR
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierScores:
    overall: float  # accuracy on the whole test set
    per_class: dict[int, float]  # recall of each class present in the test set
    balanced: float  # mean of per_class (robust to the skewed test sets of non-IID splits)


def _fit_predict(train_x, train_y, test_x, seed: int) -> np.ndarray:
    """The one fixed classifier: standardise (on train) + multinomial logistic regression (lbfgs).

    lbfgs is deterministic, and random_state pins anything else, so the same inputs give the same
    predictions on every run.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.unique(train_y)
    if labels.size == 1:  # one class to learn from: the only sensible prediction
        return np.full(len(test_x), labels[0])
    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    )
    # One BLAS thread: lbfgs makes hundreds of small matmuls, and with torch's OpenMP pool alive in
    # the same process multi-threaded OpenBLAS measured 20-60x slower on a loaded 2-core machine.
    from threadpoolctl import threadpool_limits

    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)  # a capped fit is still a fixed rule
        clf.fit(train_x, train_y)
        return clf.predict(test_x)


def classifier_accuracy(train_x, train_y, test_x, test_y, *, seed: int = 0) -> ClassifierScores:
    """Train the fixed classifier on (train_x, train_y), score it on (test_x, test_y)."""
    train_x, test_x = as_array(train_x), as_array(test_x)
    train_y = np.asarray(train_y.detach().cpu() if hasattr(train_y, "detach") else train_y).ravel()
    test_y = np.asarray(test_y.detach().cpu() if hasattr(test_y, "detach") else test_y).ravel()
    _check_pair(train_x, test_x)
    if len(train_y) != len(train_x) or len(test_y) != len(test_x):
        raise DataError("labels and embeddings differ in length")
    pred = _fit_predict(train_x, train_y, test_x, seed)
    correct = pred == test_y
    per_class = {int(c): float(correct[test_y == c].mean()) for c in np.unique(test_y)}
    return ClassifierScores(
        overall=float(correct.mean()),
        per_class=per_class,
        balanced=float(np.mean(list(per_class.values()))),
    )


def tstr_trtr(
    synth_x, synth_y, real_train_x, real_train_y, test_x, test_y, *, seed: int = 0
) -> tuple[ClassifierScores, ClassifierScores]:
    """(TSTR, TRTR): the same classifier trained on synthetic vs real data, tested on held-out real."""
    tstr = classifier_accuracy(synth_x, synth_y, test_x, test_y, seed=seed)
    trtr = classifier_accuracy(real_train_x, real_train_y, test_x, test_y, seed=seed)
    return tstr, trtr


# ---------------------------------------------------------------------------------------------
# Reconstruction error
# ---------------------------------------------------------------------------------------------


def reconstruction_error(x, recon) -> tuple[float, np.ndarray]:
    """(mean, per-sample) squared error per feature between inputs and their reconstructions."""
    x, recon = as_array(x), as_array(recon)
    if x.shape != recon.shape:
        raise DataError(f"reconstruction shape {recon.shape} differs from input shape {x.shape}")
    per = ((x - recon) ** 2).mean(axis=1)
    return float(per.mean()) if per.size else float("nan"), per

