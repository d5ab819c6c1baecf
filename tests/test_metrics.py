"""Sample-quality metrics checked against closed forms, plain loops, hand-worked examples and real MNIST digits."""

import itertools
import warnings

import numpy as np
import pytest
import scipy.linalg

from pipeline import metrics

# Comparisons with references at tight tolerances: float64 rounding that NumPy's BLAS and LAPACK decide,
# with kernels picked by the CPU (cheap to run again in `make test`'s second pass).
pytestmark = pytest.mark.numerics


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_the_closed_form_for_full_covariances():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4))
    sigma = a @ a.T + np.eye(4)
    # Same covariance: the trace term vanishes and only the mean difference is left.
    assert metrics.frechet_distance(np.zeros(4), sigma, np.ones(4), sigma) == pytest.approx(4.0, abs=1e-8)
    # Scaled covariance c^2 S: Tr(S + c^2 S - 2 c S) = (1 - c)^2 Tr(S).
    assert metrics.frechet_distance(np.zeros(4), sigma, np.zeros(4), 9 * sigma) == pytest.approx(
        4 * np.trace(sigma), rel=1e-8)


def test_fid_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (20000, 2))
    b = rng.normal([3.0, 0.0], [2.0, 1.0], (20000, 2))
    assert metrics.fid(a, b) == pytest.approx(9.0 + 1.0, rel=0.05)
    assert metrics.fid(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_refuses_a_matrix_that_is_not_a_covariance():
    with pytest.raises(ValueError, match="not positive semi-definite"):
        metrics.frechet_distance(np.zeros(2), np.diag([1.0, -0.5]), np.zeros(2), np.eye(2))


def test_fid_refuses_non_finite_features():
    features = np.random.default_rng(0).standard_normal((10, 3))
    broken = features.copy()
    broken[4, 1] = np.nan  # what a diverged generator's images give
    with pytest.raises(ValueError, match="NaN or inf"):
        metrics.fid(features, broken)


def test_fid_ignores_constant_features_without_a_singular_matrix_warning():
    # Dead ReLU units of the classifier's feature layer: 0 for every image, real or generated.
    rng = np.random.default_rng(0)
    live_a = rng.standard_normal((500, 3))
    live_b = rng.standard_normal((400, 3)) @ np.array([[2.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.5]]) + 1.0
    dead_a, dead_b = np.zeros((500, 5)), np.zeros((400, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = metrics.fid(np.hstack([dead_a, live_a, dead_a]), np.hstack([dead_b, live_b, dead_b]))
    # Constant dims add nothing to the means' distance or the traces: the reference is the live sub-space,
    # where the covariances are non-singular and scipy's sqrtm is exact.
    (mu1, s1), (mu2, s2) = metrics.gaussian_stats(live_a), metrics.gaussian_stats(live_b)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert value == pytest.approx(reference, rel=1e-10)


def test_fid_of_fewer_samples_than_dimensions_matches_the_nuclear_norm_form():
    # 40 samples in 64 dims: both covariances singular, as in training-time FID of 100 samples in 128 dims.
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((40, 64)), rng.standard_normal((30, 64)) * 1.5 + 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = metrics.fid(a, b)
    # Tr((S1 S2)^1/2) is the nuclear norm of A B^T for the scaled centred samples A, B (S1 = A^T A, S2 = B^T B).
    ca, cb = (a - a.mean(0)) / np.sqrt(len(a) - 1), (b - b.mean(0)) / np.sqrt(len(b) - 1)
    trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    reference = diff @ diff + np.sum(ca * ca) + np.sum(cb * cb) - 2 * trace_sqrt
    assert value == pytest.approx(reference, rel=1e-10)


def test_inception_score_matches_a_plain_loop():
    probs = metrics.softmax(np.random.default_rng(1).standard_normal((40, 5)) * 3)
    scores = []
    for part in np.array_split(probs, 4):
        marginal = part.mean(axis=0)
        kls = [sum(p[j] * np.log(p[j] / marginal[j]) for j in range(5)) for p in part]
        scores.append(np.exp(np.mean(kls)))
    mean, std = metrics.inception_score(probs, splits=4)
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-9)


def test_inception_score_is_class_count_for_confident_balanced_and_one_for_collapse():
    confident = np.eye(10)[np.arange(1000) % 10]
    assert metrics.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    collapsed = np.eye(10)[np.zeros(1000, int)]
    assert metrics.inception_score(collapsed, splits=1)[0] == pytest.approx(1.0, rel=1e-6)


def test_classes_covered_ignores_classes_below_half_a_fair_share():
    histogram = np.array([100, 100, 100, 100, 100, 100, 100, 100, 50, 40])
    assert metrics.classes_covered(histogram) == 9  # the threshold is 890 / 20 = 44.5


def test_class_histogram_counts_argmax():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    np.testing.assert_array_equal(metrics.class_histogram(probs), [1, 2, 0])


def brute_distances(a, b):
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))


def test_pairwise_distances_match_direct_differences_across_chunks():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((10, 5)), rng.standard_normal((7, 5))
    np.testing.assert_allclose(metrics.pairwise_distances(a, b, chunk=3), brute_distances(a, b), rtol=1e-10)


def test_pairwise_distances_clip_cancellation_below_zero_for_near_identical_rows():
    a, b = 1.1, 1.1000000000000012  # five float64 steps apart
    # In float64 a^2 + b^2 - 2ab rounds below zero whichever order it is summed in; sqrt would give nan.
    assert (a * a + b * b) - 2 * a * b < 0 and (-2 * a * b + a * a) + b * b < 0
    distance = metrics.pairwise_distances(np.array([[a]]), np.array([[b]]))[0, 0]
    assert 0.0 <= distance < 1e-7


def test_nearest_distances_give_the_nearest_reference_and_its_distance_across_chunks():
    rng = np.random.default_rng(1)
    queries, refs = rng.standard_normal((11, 3)), rng.standard_normal((20, 3))
    dist, index = metrics.nearest_distances(queries, refs, chunk=4)
    full = brute_distances(queries, refs)
    np.testing.assert_array_equal(index, full.argmin(axis=1))
    np.testing.assert_allclose(dist, full.min(axis=1), rtol=1e-10)


def test_kth_neighbour_radii_exclude_the_row_itself():
    # Other rows' distances: from 0: 1, 3, 7; from 1: 1, 2, 6; from 3: 2, 3, 4; from 7: 4, 6, 7.
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_array_equal(metrics.kth_neighbour_radii(x, k=2), [3.0, 2.0, 3.0, 6.0])


def test_kth_neighbour_radii_count_a_duplicate_row_as_a_neighbour_at_zero():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_array_equal(metrics.kth_neighbour_radii(x, k=1), [0.0, 0.0, 5.0])


def test_kth_neighbour_radii_match_sorted_distances_across_chunks():
    x = np.random.default_rng(2).standard_normal((13, 4))
    full = brute_distances(x, x)
    expected = np.sort(full, axis=1)[:, 4]  # column 0 is the row itself
    np.testing.assert_allclose(metrics.kth_neighbour_radii(x, k=4, chunk=5), expected, rtol=1e-10)


def test_kth_neighbour_radii_refuse_k_without_enough_other_rows():
    with pytest.raises(ValueError, match="k=3"):
        metrics.kth_neighbour_radii(np.zeros((3, 2)), k=3)


def plain_mmd2(x, y):
    """Unbiased MMD^2 with the cubic polynomial kernel, one kernel value at a time."""
    m, d = len(x), x.shape[1]

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    within_x = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    within_y = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    between = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return within_x / (m * (m - 1)) + within_y / (m * (m - 1)) - 2 * between / m ** 2


def test_kid_matches_a_plain_double_loop_when_a_subset_takes_every_row():
    rng = np.random.default_rng(3)
    real, fake = rng.standard_normal((10, 4)), rng.normal(0.5, 1.5, (10, 4))
    mean, std = metrics.kid(real, fake, subsets=3, subset_size=50)
    # Every subset is a permutation of all rows, and MMD^2 does not depend on row order.
    assert mean == pytest.approx(plain_mmd2(real, fake), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_draws_as_many_real_rows_as_the_smaller_fake_set_holds():
    rng = np.random.default_rng(4)
    real, fake = rng.standard_normal((12, 4)), rng.normal(0.5, 1.5, (10, 4))
    mean, _ = metrics.kid(real, fake, subsets=1, subset_size=50)
    candidates = [plain_mmd2(real[list(rows)], fake) for rows in itertools.combinations(range(12), 10)]
    assert min(abs(mean - c) / abs(c) for c in candidates) < 1e-9


def test_kid_is_reproducible_for_a_seed_and_changes_with_it():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((200, 8)), rng.normal(0.2, 1.0, (200, 8))
    first = metrics.kid(real, fake, subsets=5, subset_size=50, seed=7)
    assert metrics.kid(real, fake, subsets=5, subset_size=50, seed=7) == first
    assert metrics.kid(real, fake, subsets=5, subset_size=50, seed=8) != first


# Real 0, 1, 3, 7 with k = 1: radii 1, 1, 2, 4. Fake 2, 2.5, 11, 11.5 with k = 1: radii 0.5 each.
LINE_REAL = np.array([[0.0], [1.0], [3.0], [7.0]])
LINE_FAKE = np.array([[2.0], [2.5], [11.0], [11.5]])


def test_precision_recall_match_a_hand_worked_line_with_inclusive_boundaries():
    # Precision: fake 2 is in B(1, 1) on its surface and in B(3, 2); 2.5 in B(3, 2); 11 on the surface of
    # B(7, 4); 11.5 is 4.5 from 7, in no ball: 3/4.
    # Recall: real 3 lies on the surface of B(2.5, 0.5); 0, 1 and 7 are at least 1 from any fake: 1/4.
    precision, recall = metrics.precision_recall(LINE_REAL, LINE_FAKE, k=1)
    assert precision == 0.75
    assert recall == 0.25


def test_density_coverage_match_a_hand_worked_line_with_strict_boundaries():
    # Density counts strictly-inside balls: fake 2 only B(3, 2) (it is on the surface of B(1, 1)),
    # 2.5 only B(3, 2), 11 none (on the surface of B(7, 4)), 11.5 none: 2 / (k M) = 2 / 4.
    # Coverage: nearest fakes of 0, 1, 3, 7 are at 2, 1, 0.5, 4 against radii 1, 1, 2, 4: only 3 is covered.
    density, coverage = metrics.density_coverage(LINE_REAL, LINE_FAKE, k=1)
    assert density == 0.5
    assert coverage == 0.25


def test_density_divides_by_k_and_exceeds_one_where_fakes_crowd_real_balls():
    # k = 2 radii of real 0, 1, 3, 7: 3, 2, 3, 6. Fake 2 is inside all four balls (distances 2, 1, 1, 5),
    # fake 11 only inside B(7, 6): (4 + 1) / (2 * 2). Every real's nearest fake is inside its ball.
    density, coverage = metrics.density_coverage(LINE_REAL, np.array([[2.0], [11.0]]), k=2)
    assert density == 1.25
    assert coverage == 1.0


def pixels(images):
    return images.reshape(len(images), -1).astype(np.float64) / 255.0


@pytest.fixture
def digit_sets(mnist_digits):
    """A real reference set of 500 digits, 500 other digits, and every '1' not in the reference (447)."""
    images, labels = mnist_digits
    order = np.random.default_rng(0).permutation(len(images))
    reference, others = order[:500], order[500:1000]
    ones = np.setdiff1d(np.flatnonzero(labels == 1), reference)
    return pixels(images[reference]), pixels(images[others]), pixels(images[ones])


def all_scores(real, fake):
    precision, recall = metrics.precision_recall(real, fake, k=3)
    density, coverage = metrics.density_coverage(real, fake, k=5)
    return precision, recall, density, coverage, metrics.kid(real, fake, subsets=10)[0]


def test_real_digits_against_other_real_digits_score_near_the_ideal(digit_sets):
    reference, others, _ = digit_sets
    precision, recall, density, coverage, kid = all_scores(reference, others)
    # Measured: precision 0.870, recall 0.898, density 1.061, coverage 0.964, KID 0.00022.
    assert precision > 0.8 and recall > 0.8 and coverage > 0.9
    assert 0.8 < density < 1.25
    assert abs(kid) < 1e-3


def test_uniform_noise_against_real_digits_scores_near_zero_with_a_large_kid(digit_sets):
    reference, others, _ = digit_sets
    noise = np.random.default_rng(1).uniform(0.0, 1.0, reference.shape)
    precision, recall, density, coverage, kid = all_scores(reference, noise)
    # Measured: all four 0.000, KID 0.676, some 3000 times the real-vs-real value.
    assert precision < 0.05 and recall < 0.05 and density < 0.05 and coverage < 0.05
    assert kid > 100 * abs(metrics.kid(reference, others, subsets=10)[0])


def test_a_single_digit_class_keeps_precision_but_loses_recall_and_coverage(digit_sets):
    reference, _, ones = digit_sets
    precision, recall, _, coverage, _ = all_scores(reference, ones)
    # Measured: precision 0.944, recall 0.132, coverage 0.250; '1's are a tenth of the reference.
    assert precision > 0.9
    assert recall < 0.2 and coverage < 0.3


def test_class_kl_is_zero_for_histograms_of_the_same_distribution():
    assert metrics.class_kl(np.array([2, 4, 6]), np.array([10, 20, 30])) == pytest.approx(0.0, abs=1e-12)


def test_class_kl_matches_a_hand_computation():
    # p = (1/2, 1/2, 0), q = (1/4, 1/4, 1/2): KL = 2 * 1/2 * ln(2) + 0 = ln 2.
    assert metrics.class_kl(np.array([5, 5, 0]), np.array([1, 1, 2])) == pytest.approx(np.log(2), rel=1e-8)


def test_class_kl_is_finite_where_real_lacks_a_class():
    # p = (1/2, 1/2), q = (1, 0): the second class's term is 1/2 ln((1/2 + eps) / eps).
    value = metrics.class_kl(np.array([1, 1]), np.array([3, 0]), eps=1e-10)
    assert np.isfinite(value)
    assert value == pytest.approx(0.5 * np.log(0.5) + 0.5 * np.log(0.5 / 1e-10), rel=1e-6)


@pytest.fixture
def memorization_sets(mnist_digits):
    """Disjoint real digits as pixels: 2,000 training, 1,000 holdout, 500 unseen."""
    images, _ = mnist_digits
    order = np.random.default_rng(0).permutation(len(images))
    return pixels(images[order[:2000]]), pixels(images[order[2000:3000]]), pixels(images[order[3000:3500]])


def test_memorization_flags_exact_copies_of_training_images(memorization_sets):
    train, holdout, _ = memorization_sets
    result = metrics.memorization(train[:500].copy(), train, holdout)
    assert result["memorization_distance_ratio"] < 1e-6
    assert result["memorization_train_closer_fraction"] == 1.0


def test_memorization_of_unseen_real_images_is_at_the_no_copying_level(memorization_sets):
    train, holdout, unseen = memorization_sets
    result = metrics.memorization(unseen, train, holdout)
    # Measured: ratio 1.016; fraction 0.674 against 2000 / 3000, with binomial sd 0.021 at 500 samples.
    assert result["memorization_distance_ratio"] == pytest.approx(1.0, abs=0.05)
    assert result["memorization_train_closer_fraction_holdout_baseline"] == pytest.approx(2 / 3)
    assert result["memorization_train_closer_fraction"] == pytest.approx(2 / 3, abs=0.07)
