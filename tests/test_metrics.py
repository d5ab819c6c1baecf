"""FID, Inception-style score and class coverage checked against closed forms and plain loops."""

import numpy as np
import pytest

from pipeline import metrics


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


def test_fid_refuses_a_significant_imaginary_part(monkeypatch):
    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", lambda m: np.eye(len(m)) * (1 + 0.5j))
    with pytest.raises(ValueError, match="significant imaginary part"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2))


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
