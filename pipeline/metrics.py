"""Sample-quality metrics on classifier features and probabilities: FID, Inception-style score, class coverage.

Pure NumPy/SciPy, so each is testable against closed forms without a model.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

# sqrtm of a product of covariances picks up round-off imaginary parts; larger ones mean a broken input.
IMAGINARY_TOLERANCE = 1e-3


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the float64 mean and covariance of (N, D) features."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Returns the Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) of two Gaussians."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product: shift both covariances slightly, as the reference implementation does.
        offset = np.eye(len(sigma1)) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_TOLERANCE):
            raise ValueError(f"FID: sqrtm has a significant imaginary part "
                             f"({np.max(np.abs(covmean.imag)):.3g}); the features are degenerate")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Returns the Frechet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


def inception_score(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """Returns the mean and std over `splits` of exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016)."""
    p = np.asarray(probs, np.float64)
    if len(p) < splits:
        raise ValueError(f"inception score: {len(p)} samples cannot make {splits} splits")
    eps = 1e-12
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + eps) - np.log(marginal + eps))).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def class_histogram(probs: np.ndarray) -> np.ndarray:
    """Returns how many samples the classifier assigns to each class."""
    return np.bincount(np.argmax(probs, axis=1), minlength=probs.shape[1])


def classes_covered(histogram: np.ndarray) -> int:
    """Returns the number of classes holding at least 1/(2C) of the samples, so stray hits don't count."""
    total = histogram.sum()
    return int((histogram >= total / (2 * len(histogram))).sum()) if total else 0


def softmax(logits: np.ndarray) -> np.ndarray:
    """Returns row-wise softmax probabilities of logits."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
