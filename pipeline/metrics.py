"""Sample-quality metrics on classifier features and probabilities: FID, KID, Inception-style score,
precision/recall, density/coverage, class coverage and KL, and nearest-neighbour memorization checks.

Pure NumPy, so each is testable against closed forms without a model.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

# Eigenvalues of a covariance below -this x its largest are not round-off: the matrix is not a covariance.
NEGATIVE_EIGENVALUE_TOLERANCE = 1e-6


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the float64 mean and covariance of (N, D) features."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {x.shape}")
    # atleast_2d: np.cov of one feature column is a 0-d array, not a 1 x 1 matrix.
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Returns the symmetric positive semi-definite square root of a covariance matrix.

    Eigenvalues within eigh's round-off of 0 (D x eps x the largest, as numpy's matrix_rank counts rank)
    are taken as exactly 0: the square root would otherwise turn noise of 1e-15 into 3e-8 per null direction.
    """
    eigenvalues, vectors = np.linalg.eigh(sigma)
    largest = max(float(eigenvalues[-1]), 0.0)
    if eigenvalues[0] < -NEGATIVE_EIGENVALUE_TOLERANCE * largest:
        raise ValueError(f"FID: a covariance is not positive semi-definite (eigenvalue {eigenvalues[0]:.3g}, "
                         f"largest {largest:.3g})")
    noise = largest * len(eigenvalues) * np.finfo(np.float64).eps
    return (vectors * np.sqrt(np.where(eigenvalues > noise, eigenvalues, 0.0))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Returns Tr((S1 S2)^1/2) of two covariances, also where either is singular.

    The eigenvalues of S1 S2 are the squared singular values of S1^1/2 S2^1/2, so the trace is their sum:
    no inverse and no square root of a non-symmetric matrix (scipy's sqrtm of S1 S2 warns "Matrix is
    singular" whenever a feature is constant, as dead ReLU units of the classifier's feature layer are).
    """
    return float(np.linalg.svd(psd_sqrt(sigma1) @ psd_sqrt(sigma2), compute_uv=False).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Returns the Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2) of two Gaussians."""
    if not all(np.isfinite(x).all() for x in (mu1, sigma1, mu2, sigma2)):
        raise ValueError("FID: the features hold NaN or inf")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


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


# Rows per block of a distance matrix: a block is chunk x len(refs) float64, 0.5 GB against 63,000 references.
DISTANCE_CHUNK = 1024


def _rows(x: np.ndarray, name: str, dtype: type = np.float64) -> np.ndarray:
    """Returns x as a 2-D array of `dtype`, refusing other shapes."""
    x = np.asarray(x, dtype)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {x.shape}")
    return x


def distance_blocks(a: np.ndarray, b: np.ndarray, chunk: int = DISTANCE_CHUNK,
                    dtype: type = np.float64) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (first row, block) of the Euclidean distances between rows of a and b, `chunk` rows of a at a time."""
    a, b = _rows(a, "a", dtype), _rows(b, "b", dtype)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"rows of different length: {a.shape[1]} and {b.shape[1]}")
    b_sq = np.einsum("ij,ij->i", b, b)
    for start in range(0, len(a), chunk):
        part = a[start:start + chunk]
        # ||a||^2 + ||b||^2 - 2 a.b in place: one block-sized array, a matrix product instead of N*M differences.
        block = part @ b.T
        block *= -2.0
        block += np.einsum("ij,ij->i", part, part)[:, None]
        block += b_sq[None, :]
        # Cancellation can leave tiny negatives where the true distance is 0.
        np.maximum(block, 0.0, out=block)
        yield start, np.sqrt(block, out=block)


def pairwise_distances(a: np.ndarray, b: np.ndarray, chunk: int = DISTANCE_CHUNK,
                       dtype: type = np.float64) -> np.ndarray:
    """Returns the full (len(a), len(b)) matrix of Euclidean distances between rows; only for sets that fit."""
    return np.concatenate([block for _, block in distance_blocks(a, b, chunk, dtype)], axis=0)


def nearest_distances(queries: np.ndarray, refs: np.ndarray,
                      chunk: int = DISTANCE_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Returns, for each query row, the distance to and the index of its nearest row of refs."""
    if len(refs) == 0:
        raise ValueError("nearest_distances: no reference rows")
    dist, index = np.empty(len(queries)), np.empty(len(queries), np.intp)
    for start, block in distance_blocks(queries, refs, chunk):
        nearest = block.argmin(axis=1)
        index[start:start + len(block)] = nearest
        dist[start:start + len(block)] = np.take_along_axis(block, nearest[:, None], axis=1)[:, 0]
    return dist, index


def kth_neighbour_radii(x: np.ndarray, k: int, chunk: int = DISTANCE_CHUNK) -> np.ndarray:
    """Returns, for each row of x, the distance to its k-th nearest other row of x (itself excluded)."""
    x = _rows(x, "x")
    if not 1 <= k < len(x):
        raise ValueError(f"k-th neighbour radii: k={k} needs 1 <= k < {len(x)} rows")
    radii = np.empty(len(x))
    for start, block in distance_blocks(x, x, chunk):
        rows = np.arange(len(block))
        # Exclude each row by index rather than by value: a duplicate row is a neighbour at distance 0,
        # while the row's own distance is only approximately 0 after the dot-product trick.
        block[rows, start + rows] = np.inf
        radii[start:start + len(block)] = np.partition(block, k - 1, axis=1)[:, k - 1]
    return radii


def _balls_containing(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, strict: bool,
                      chunk: int = DISTANCE_CHUNK) -> np.ndarray:
    """Returns, for each point, how many balls B(centres[i], radii[i]) contain it (strictly inside if strict)."""
    counts = np.empty(len(points), np.int64)
    for start, block in distance_blocks(points, centres, chunk):
        inside = block < radii[None, :] if strict else block <= radii[None, :]
        counts[start:start + len(block)] = inside.sum(axis=1)
    return counts


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Returns the mean and std over random subsets of the Kernel Inception Distance (Binkowski et al. 2018).

    Each subset is the unbiased MMD^2 estimate with the kernel k(x, y) = (x.y / d + 1)^3 between
    m = min(subset_size, len(real), len(fake)) real and m fake rows, each drawn without replacement;
    a subset_size at least the set sizes takes every row of the smaller set.
    """
    x, y = _rows(real, "real"), _rows(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"KID: real and fake features differ in length: {x.shape[1]} and {y.shape[1]}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID: the unbiased estimate needs at least 2 rows a set, got {m}")
    if subsets < 1:
        raise ValueError(f"KID: subsets must be >= 1, got {subsets}")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    mmds = np.empty(subsets)
    for s in range(subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        k_xx = (xs @ xs.T / d + 1.0) ** 3
        k_yy = (ys @ ys.T / d + 1.0) ** 3
        k_xy = (xs @ ys.T / d + 1.0) ** 3
        # Unbiased: a sample's kernel with itself says nothing about the distributions, so diagonals are dropped.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        mmds[s] = within - 2.0 * k_xy.mean()
    return float(mmds.mean()), float(mmds.std())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Returns improved precision and recall (Kynkaanniemi et al. 2019) of fake against real features.

    Precision is the fraction of fake rows inside at least one real k-NN ball (radius: distance to the
    k-th nearest other real row); recall the fraction of real rows inside at least one fake k-NN ball.
    """
    real, fake = _rows(real, "real"), _rows(fake, "fake")
    # Inclusive boundary (<=), as in the reference implementation (NVlabs/improved-precision-and-recall-metric).
    precision = (_balls_containing(fake, real, kth_neighbour_radii(real, k), strict=False) > 0).mean()
    recall = (_balls_containing(real, fake, kth_neighbour_radii(fake, k), strict=False) > 0).mean()
    return float(precision), float(recall)


def density_coverage(real: np.ndarray, fake: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Returns density and coverage (Naeem et al. 2020) of fake against real features.

    Density is (1 / kM) * sum over M fake rows of the number of real k-NN balls holding them, about 1 when
    fake and real share a distribution and above 1 where fakes crowd dense regions; coverage is the
    fraction of real rows whose nearest fake row lies in their own k-NN ball.
    """
    real, fake = _rows(real, "real"), _rows(fake, "fake")
    radii = kth_neighbour_radii(real, k)
    # Strict boundary (<) for both, as in the reference implementation (clovaai/generative-evaluation-prdc),
    # unlike precision/recall above: a point exactly on a ball's surface counts for those but not for these.
    density = _balls_containing(fake, real, radii, strict=True).sum() / (k * len(fake))
    coverage = (nearest_distances(real, fake)[0] < radii).mean()
    return float(density), float(coverage)


def class_kl(fake_histogram: np.ndarray, real_histogram: np.ndarray, eps: float = 1e-10) -> float:
    """Returns KL(p_fake || p_real) in nats between the normalised class histograms.

    eps is added to both distributions inside the log, so a class the real histogram lacks gives a large
    finite value instead of inf, and a class the fake histogram lacks contributes 0.
    """
    p, q = np.asarray(fake_histogram, np.float64), np.asarray(real_histogram, np.float64)
    if p.shape != q.shape or p.ndim != 1:
        raise ValueError(f"class KL: histograms must be 1-D of one length, got {p.shape} and {q.shape}")
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("class KL: a histogram is empty")
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p + eps) - np.log(q + eps))))


def memorization(generated: np.ndarray, train: np.ndarray, holdout: np.ndarray) -> dict[str, float]:
    """Returns nearest-neighbour signs of copied training images, in the space of the rows given (pixels).

    memorization_distance_ratio: mean distance from a generated row to its nearest training row, over the
    same mean for holdout rows. About 1 for a generator that does not copy (its samples sit as far from the
    training set as unseen real images do), well below 1 for one that reproduces training images.

    memorization_train_closer_fraction: fraction of generated rows whose nearest training row is closer
    than their nearest holdout row. Its no-copying level depends on the set sizes, not on 1/2: a sample
    from the data distribution, independent of both sets, is equally likely to have any of the
    len(train) + len(holdout) rows as its nearest neighbour, so the fraction is len(train) / (len(train) +
    len(holdout)) in expectation; memorization_train_closer_fraction_holdout_baseline is that value, what
    unseen real images would score. It is computed in closed form: scoring holdout rows themselves would
    find each one in the holdout set at distance 0, and splitting the holdout set in two would compare
    against a different train/holdout size ratio than the generated rows face.
    """
    generated, train, holdout = _rows(generated, "generated"), _rows(train, "train"), _rows(holdout, "holdout")
    generated_to_train = nearest_distances(generated, train)[0]
    generated_to_holdout = nearest_distances(generated, holdout)[0]
    holdout_to_train = nearest_distances(holdout, train)[0]
    return {
        "memorization_distance_ratio": float(generated_to_train.mean() / holdout_to_train.mean()),
        "memorization_train_closer_fraction": float((generated_to_train < generated_to_holdout).mean()),
        "memorization_train_closer_fraction_holdout_baseline": len(train) / (len(train) + len(holdout)),
    }
