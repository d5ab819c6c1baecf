"""evaluate: a classifier on real digits scores real data near its floor and an untrained generator far."""

import dataclasses
import warnings

import keras
import numpy as np
import pandas as pd
import pytest
from keras import layers, ops

from conftest import TINY_OVERRIDES, _mnist, default_params, merge
from pipeline.config import config_from_dict
from pipeline.data import scale_images
from pipeline import metrics, paths
from pipeline.evaluate import embed, evaluate_generator, evaluate_report, feature_extractor, train_classifier
from pipeline.models import NUM_CLASSES, build_generator


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


def test_generator_last_is_the_one_evaluated_and_named_in_the_report(setup, tmp_path, monkeypatch):
    config, classifier, _, train, holdout = setup
    config = dataclasses.replace(config, generator="last")
    generators = {}
    for seed, name in enumerate(("best", "last")):  # two different generators
        keras.utils.set_random_seed(seed)
        generators[name] = build_generator(config.model, config.train.latent_dim, (28, 28, 1))
    titles = []
    monkeypatch.setattr("pipeline.evaluate.draw_report", lambda *args, title: titles.append(title))
    history = pd.DataFrame({"epoch": [5, 10, 15], "fid": [30.0, 12.0, 20.0], "kid": [0.3, 0.1, 0.2]})
    result = evaluate_report(config, generators, classifier, train, holdout, history, tmp_path / "report.png")
    assert result["fid"] == result["fid_last"] != result["fid_best"]
    assert titles[0].startswith("mnist: generator 'last' (epoch 15)")


def test_report_title_gives_every_sample_quality_metric(setup, tmp_path, monkeypatch):
    config, classifier, _, train, holdout = setup
    generator = build_generator(config.model, config.train.latent_dim, (28, 28, 1))
    titles = []
    monkeypatch.setattr("pipeline.evaluate.draw_report", lambda *args, title: titles.append(title))
    history = pd.DataFrame({"epoch": [5], "fid": [30.0], "kid": [0.3]})
    result = evaluate_report(config, {"best": generator, "last": generator}, classifier, train, holdout, history,
                             tmp_path / "report.png")
    for name, key in [("FID", "fid"), ("precision", "precision"), ("recall", "recall"), ("density", "density"),
                      ("coverage", "coverage"), ("memorization distance ratio", "memorization_distance_ratio")]:
        assert f"{name} {result[key]:.2f}" in titles[0]
    assert f"{result['modes']}/10 classes" in titles[0]


@pytest.mark.parametrize(("choice", "saved"), [("best", paths.GENERATOR_BEST), ("last", paths.GENERATOR)])
def test_generator_choice_names_the_file_training_saves_it_to(choice, saved):
    # save_models writes the last (averaged) generator to GENERATOR; the best-FID one goes to GENERATOR_BEST.
    assert paths.generator_path(choice) == saved


def digits_on_request(digits: np.ndarray, latent_dim: int, label_of) -> keras.Model:
    """Returns a conditional "generator" whose image for (noise, label) is one of digits[label_of(label, noise)].

    `digits` is (10, K, 28, 28, 1), real digits by class; the noise's largest of its first K entries picks one.
    """
    per_class = digits.shape[1]
    table = ops.convert_to_tensor(digits.reshape(-1, *digits.shape[2:]))

    def draw(inputs):
        noise, label = inputs
        which = ops.cast(ops.argmax(noise[:, :per_class], axis=1), "int32")
        return ops.take(table, label_of(ops.reshape(label, (-1,)), noise) * per_class + which, axis=0)

    noise, label = keras.Input((latent_dim,)), keras.Input((1,), dtype="int32")
    return keras.Model([noise, label], layers.Lambda(draw, output_shape=digits.shape[2:])([noise, label]))


@pytest.fixture(scope="module")
def recognised_holdout_digits(setup) -> np.ndarray:
    """(10, 5, 28, 28, 1): five holdout digits of each class that the classifier classifies correctly.

    Clearly: the right class's logit leads the next by more than 1, far beyond what rounding in
    another batch size could change.
    """
    _, classifier, _, _, (images, labels) = setup
    logits = classifier.predict(images, verbose=0)
    top_two = np.sort(logits, axis=1)[:, -2:]
    clear = (np.argmax(logits, axis=1) == labels) & (top_two[:, 1] - top_two[:, 0] > 1.0)
    return np.stack([images[clear & (labels == c)][:5] for c in range(NUM_CLASSES)])


def test_conditional_accuracy_is_one_when_every_sample_is_a_recognised_digit_of_the_class_asked_for(
        setup, recognised_holdout_digits):
    config, classifier, _, train, holdout = setup
    generator = digits_on_request(recognised_holdout_digits, config.train.latent_dim, lambda label, noise: label)
    result = evaluate_generator(config, generator, feature_extractor(classifier), train, holdout)
    assert result["conditional_accuracy"] == 1.0
    assert [result[f"conditional_accuracy_{c}"] for c in range(NUM_CLASSES)] == [1.0] * NUM_CLASSES


def test_conditional_accuracy_is_zero_when_every_sample_is_of_the_next_class(setup, recognised_holdout_digits):
    config, classifier, _, train, holdout = setup
    generator = digits_on_request(recognised_holdout_digits, config.train.latent_dim,
                                  lambda label, noise: (label + 1) % NUM_CLASSES)
    result = evaluate_generator(config, generator, feature_extractor(classifier), train, holdout)
    assert result["conditional_accuracy"] == 0.0


def test_conditional_accuracy_is_chance_when_the_generator_ignores_the_label(setup, recognised_holdout_digits):
    config, classifier, _, train, holdout = setup
    # The class comes from the noise instead: right one time in ten.
    generator = digits_on_request(recognised_holdout_digits, config.train.latent_dim,
                                  lambda label, noise: ops.cast(ops.argmax(noise[:, -NUM_CLASSES:], axis=1), "int32"))
    result = evaluate_generator(config, generator, feature_extractor(classifier), train, holdout)
    # 100 samples: a binomial(100, 0.1) count lies in [2, 20] with probability 0.998.
    assert result["num_samples"] == 100 and 0.02 <= result["conditional_accuracy"] <= 0.2
