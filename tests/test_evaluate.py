"""evaluate: a classifier on real digits scores real data near its floor and an untrained generator far."""

import warnings

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_OVERRIDES, _mnist, default_params, merge
from pipeline.config import config_from_dict
from pipeline.data import scale_images
from pipeline import metrics
from pipeline.evaluate import embed, evaluate_generator, evaluate_report, feature_extractor, train_classifier
from pipeline.models import build_generator


@pytest.fixture(scope="module")
def setup():
    """A config, a classifier trained on 2,000 real digits, its accuracy, and (train, holdout) splits."""
    config = config_from_dict(merge(default_params(), merge(TINY_OVERRIDES, {"classifier": {"epochs": 2}})))
    images, labels = _mnist()
    x, y = scale_images(images), labels.astype(np.int32)
    idx = np.random.default_rng(0).permutation(len(x))
    train, holdout = (x[idx[:2000]], y[idx[:2000]]), (x[idx[2000:2500]], y[idx[2000:2500]])
    classifier, accuracy = train_classifier(config, train, holdout)
    return config, classifier, accuracy, train, holdout


@pytest.fixture(scope="module")
def generator(setup):
    config = setup[0]
    return build_generator(config.model, config.train.latent_dim, (28, 28, 1))


@pytest.fixture(scope="module")
def untrained_result(setup, generator):
    config, classifier, _, train, holdout = setup
    return evaluate_generator(config, generator, feature_extractor(classifier), train, holdout)


def test_classifier_learns_real_digits(setup):
    _, _, accuracy, _, _ = setup
    assert accuracy > 0.85


def test_untrained_generator_scores_far_worse_than_the_real_floor(untrained_result):
    result = untrained_result
    assert result["num_samples"] == TINY_OVERRIDES["evaluate"]["num_samples"]
    assert result["real_floor_fid"] < result["fid_untrained"] / 5
    assert result["fid"] > 5 * result["real_floor_fid"]  # this generator is untrained too
    assert result["kid"] > result["real_floor_kid"]
    assert result["real_floor_precision"] > result["precision"]
    assert result["real_floor_coverage"] > result["coverage"]


def test_fid_on_features_with_dead_units_gives_no_singular_matrix_warning(setup):
    _, classifier, _, train, _ = setup
    features, _ = embed(feature_extractor(classifier), train[0][:200])
    # The classifier's ReLU feature layer has units that are 0 on every digit (51 of 128 here), so every
    # covariance FID sees is singular; that case must neither warn nor fail.
    assert (features.max(axis=0) == 0).sum() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.fid(features[:100], features[100:]) > 0


def test_class_counts_add_up_and_modes_count_classes(untrained_result):
    assert sum(untrained_result[f"class_count_{c}"] for c in range(10)) == untrained_result["num_samples"]
    assert 1 <= untrained_result["modes"] <= 10 and untrained_result["class_kl"] >= 0


def test_evaluation_repeats_exactly_for_the_same_seed(setup, generator, untrained_result):
    config, classifier, _, train, holdout = setup
    assert evaluate_generator(config, generator, feature_extractor(classifier), train, holdout) == untrained_result


def test_report_states_best_and_last_and_draws_the_picture(setup, tmp_path):
    config, classifier, _, train, holdout = setup
    generators = {name: build_generator(config.model, config.train.latent_dim, (28, 28, 1)) for name in ("best", "last")}
    history = pd.DataFrame({"epoch": [5, 10, 15], "fid": [30.0, 12.0, 20.0], "kid": [0.3, 0.1, 0.2]})
    report = tmp_path / "report.png"
    result = evaluate_report(config, generators, classifier, train, holdout, history, report)
    assert result["best_epoch"] == 10 and result["train_best_fid"] == 12.0
    assert result["last_epoch"] == 15 and result["train_last_fid"] == 20.0
    assert result["fid_best"] == result["fid"] and np.isfinite(result["fid_last"])
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
