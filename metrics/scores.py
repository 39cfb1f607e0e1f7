"""FID and KID from Inception features (numpy/scipy, no network)."""

from __future__ import annotations

import numpy as np
from scipy import linalg

from errors import MetricsError


def feature_statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) of a feature matrix, as pytorch-fid computes them."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise MetricsError(f'need at least 2 feature rows for FID statistics, got shape {feats.shape}; '
                           'use more images')
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Same algorithm as pytorch-fid's ``calculate_frechet_distance`` (Dougal Sutherland's stable
    version): ``||mu1-mu2||^2 + Tr(s1 + s2 - 2 sqrtm(s1 s2))``, retrying with ``eps`` on the diagonals
    when the product is singular enough to give a non-finite square root.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricsError(f'feature statistics differ in size ({mu1.shape} vs {mu2.shape}); '
                           'compute both with the same network')
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Tiny imaginary parts are numerical noise of sqrtm; large ones mean broken statistics.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricsError(f'FID square root has an imaginary component '
                               f'{np.max(np.abs(covmean.imag)):.3g}; check the features for NaN/inf')
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for all row pairs."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the polynomial kernel (diagonal terms excluded within each set)."""
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    term_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    term_yy = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(feats1: np.ndarray, feats2: np.ndarray, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std of the unbiased polynomial-kernel MMD^2 over random subsets.

    Each subset draws ``min(subset_size, n1, n2)`` rows without replacement from each set, so small
    sets still work (down to 2 images per side).
    """
    feats1 = np.asarray(feats1, dtype=np.float64)
    feats2 = np.asarray(feats2, dtype=np.float64)
    if feats1.ndim != 2 or feats2.ndim != 2 or feats1.shape[1] != feats2.shape[1]:
        raise MetricsError(f'KID needs two feature matrices of equal width, got {feats1.shape} and '
                           f'{feats2.shape}; compute both with the same network')
    size = min(subset_size, feats1.shape[0], feats2.shape[0])
    if size < 2 or num_subsets < 1:
        raise MetricsError(f'KID needs at least 2 images per set and 1 subset (got subset size {size}, '
                           f'{num_subsets} subsets); use more images')
    rng = np.random.default_rng(seed)
    mmds = np.array([
        _unbiased_mmd2(feats1[rng.choice(feats1.shape[0], size, replace=False)],
                       feats2[rng.choice(feats2.shape[0], size, replace=False)])
        for _ in range(num_subsets)
    ])
    return float(mmds.mean()), float(mmds.std())
