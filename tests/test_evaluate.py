"""evaluate: a classifier on real digits scores real data near its floor and an untrained generator far."""

import numpy as np
import pytest

from pipeline.evaluate import evaluate_generator, train_classifier
from pipeline.models import build_generator


@pytest.fixture(scope="module")
def classifier_and_data(request):
    from conftest import TINY_OVERRIDES, default_params, merge, _mnist
    from pipeline.config import config_from_dict
    from pipeline.data import scale_images

    config = config_from_dict(merge(default_params(), merge(TINY_OVERRIDES, {"evaluate": {"classifier_epochs": 2}})))
    images, labels = _mnist()
    x, y = scale_images(images), labels.astype(np.int32)
    idx = np.random.default_rng(0).permutation(len(x))
    train, holdout = idx[:2000], idx[2000:2500]
    classifier, accuracy = train_classifier(config, (x[train], y[train]), (x[holdout], y[holdout]))
    return config, classifier, accuracy, x[train]


def test_classifier_learns_real_digits(classifier_and_data):
    _, _, accuracy, _ = classifier_and_data
    assert accuracy > 0.85


def test_untrained_generator_scores_far_worse_than_the_real_floor(classifier_and_data):
    config, classifier, _, train_images = classifier_and_data
    generator = build_generator(config.model, config.train.latent_dim, (28, 28, 1))
    result = evaluate_generator(config, generator, classifier, train_images)
    assert result["num_samples"] == config.evaluate.num_samples
    assert result["fid_real_floor"] < result["fid_untrained"] / 5
    assert result["fid"] > 5 * result["fid_real_floor"]  # this generator is untrained too
    assert sum(result[f"class_count_{c}"] for c in range(10)) == result["num_samples"]
    assert 1 <= result["classes_covered"] <= 10


def test_evaluation_repeats_exactly_for_the_same_seed(classifier_and_data):
    config, classifier, _, train_images = classifier_and_data
    generator = build_generator(config.model, config.train.latent_dim, (28, 28, 1))
    first = evaluate_generator(config, generator, classifier, train_images)
    assert evaluate_generator(config, generator, classifier, train_images) == first
