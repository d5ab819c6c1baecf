"""Evaluation: a classifier trained on real data gives the features and labels every metric uses."""

from __future__ import annotations

import logging

from pathlib import Path

import keras
import numpy as np
import pandas as pd

from pipeline import metrics
from pipeline.config import Config
from pipeline.models import (NUM_CLASSES, balanced_labels, build_classifier, build_generator, fixed_noise,
                             generate, is_conditional)
from pipeline.report import draw_report

log = logging.getLogger(__name__)

# Evaluation noise has seeds of its own, apart from the sample stage's and the training grids'.
EVAL_NOISE_OFFSET = 2
TRAIN_EVAL_NOISE_OFFSET = 3
REPORT_PAIRS = 8  # generated images shown beside their nearest training images


def train_classifier(config: Config, train: tuple[np.ndarray, np.ndarray],
                     holdout: tuple[np.ndarray, np.ndarray]) -> tuple[keras.Model, float]:
    """Returns the classifier trained on the real training split and its holdout accuracy."""
    keras.utils.set_random_seed(config.seed)
    model = build_classifier(config.classifier, train[0].shape[1:])
    model.compile(optimizer=keras.optimizers.Adam(config.classifier.lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(*train, batch_size=config.classifier.batch_size, epochs=config.classifier.epochs, verbose=2)
    _, accuracy = model.evaluate(*holdout, batch_size=500, verbose=0)
    log.info("classifier holdout accuracy: %.4f", accuracy)
    return model, float(accuracy)


def feature_extractor(classifier: keras.Model) -> keras.Model:
    """Returns a model mapping images to the classifier's (features, logits)."""
    return keras.Model(classifier.input, [classifier.get_layer("features").output, classifier.output])


def embed(extractor: keras.Model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (features, class probabilities) of images in [-1, 1] under a feature extractor."""
    features, logits = extractor.predict(images, batch_size=500, verbose=0)
    return features, metrics.softmax(logits)


def real_reference(config: Config, images: np.ndarray, labels: np.ndarray, count: int) -> tuple[np.ndarray, ...]:
    """Returns two disjoint random real sets of `count` images and the first set's labels."""
    order = np.random.default_rng(config.seed).permutation(len(images))
    a, b = order[:count], order[count:2 * count]
    return images[a], images[b], labels[a]


def sample_count(config: Config, train_size: int) -> int:
    """Returns how many images each compared set holds: evaluate.num_samples, capped at half the train split."""
    count = min(config.evaluate.num_samples, train_size // 2)
    if count < config.evaluate.num_samples:
        log.warning("evaluate.num_samples %d capped at %d: the train split has %d images and the "
                    "real-vs-real floor needs two disjoint halves", config.evaluate.num_samples, count, train_size)
    return count


def distribution_metrics(config: Config, real: np.ndarray, fake: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Returns FID, KID, precision/recall and density/coverage of `fake` against `real` features."""
    e = config.evaluate
    kid_mean, kid_std = metrics.kid(real, fake, subsets=e.kid_subsets, subset_size=e.kid_subset_size,
                                    seed=config.seed)
    precision, recall = metrics.precision_recall(real, fake, k=e.precision_recall_k)
    density, coverage = metrics.density_coverage(real, fake, k=e.density_coverage_k)
    values = {"fid": metrics.fid(fake, real), "kid": kid_mean, "kid_std": kid_std, "precision": precision,
              "recall": recall, "density": density, "coverage": coverage}
    return {prefix + key: value for key, value in values.items()}


def evaluate_generator(config: Config, generator: keras.Model, extractor: keras.Model,
                       train: tuple[np.ndarray, np.ndarray], holdout: tuple[np.ndarray, np.ndarray],
                       others: dict[str, keras.Model] | None = None) -> dict:
    """Returns every metric of the generator's samples, flat, with real-vs-real and untrained references.

    Each generator in `others` gets its FID too, as `fid_<name>`, on the same real set and noise.
    """
    train_images, train_labels = train
    n = sample_count(config, len(train_images))
    real_a, real_b, labels_a = real_reference(config, train_images, train_labels, n)
    features_a, _ = embed(extractor, real_a)
    features_b, probs_b = embed(extractor, real_b)
    noise = fixed_noise(config.seed + EVAL_NOISE_OFFSET, n, config.train.latent_dim)
    fake_images = generate(generator, noise)
    fake_features, fake_probs = embed(extractor, fake_images)
    keras.utils.set_random_seed(config.seed)
    untrained = build_generator(config.model, config.train.latent_dim, tuple(train_images.shape[1:]))
    untrained_features, _ = embed(extractor, generate(untrained, noise))

    histogram = metrics.class_histogram(fake_probs)
    real_histogram = np.bincount(labels_a, minlength=NUM_CLASSES)
    is_mean, is_std = metrics.inception_score(fake_probs, config.evaluate.inception_splits)
    result = {
        "num_samples": n,
        **distribution_metrics(config, features_a, fake_features),
        **distribution_metrics(config, features_a, features_b, prefix="real_floor_"),
        "fid_untrained": metrics.fid(untrained_features, features_a),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_real": metrics.inception_score(probs_b, config.evaluate.inception_splits)[0],
        "modes": metrics.classes_covered(histogram),
        "class_kl": metrics.class_kl(histogram, real_histogram),
        **metrics.memorization(flat(fake_images), flat(train_images), flat(holdout[0])),
    }
    result["fid_untrained_ratio"] = result["fid_untrained"] / max(result["fid"], 1e-12)
    if is_conditional(generator):
        result.update(conditional_accuracy(fake_probs, balanced_labels(n)))
    for name, other in (others or {}).items():
        result[f"fid_{name}"] = metrics.fid(embed(extractor, generate(other, noise))[0], features_a)
    result.update({f"class_count_{c}": int(k) for c, k in enumerate(histogram)})
    return result


def conditional_accuracy(probs: np.ndarray, wanted: np.ndarray) -> dict[str, float]:
    """Returns how often a sample asked for class c is classified as c, overall and per class."""
    hits = np.argmax(probs, axis=1) == wanted
    per_class = {f"conditional_accuracy_{c}": float(hits[wanted == c].mean()) for c in range(NUM_CLASSES)}
    return {"conditional_accuracy": float(hits.mean()), **per_class}


def flat(images: np.ndarray) -> np.ndarray:
    """Returns images as (N, pixels) rows, the space in which copies of training images show."""
    return images.reshape(len(images), -1)


def nearest_training_images(config: Config, generator: keras.Model, train_images: np.ndarray,
                            count: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns `count` generated images and, for each, the training image nearest in pixel space."""
    samples = generate(generator, fixed_noise(config.seed + EVAL_NOISE_OFFSET, count, config.train.latent_dim))
    _, index = metrics.nearest_distances(flat(samples), flat(train_images))
    return samples, train_images[index]


def evaluate_report(config: Config, generators: dict[str, keras.Model], classifier: keras.Model,
                    train: tuple[np.ndarray, np.ndarray], holdout: tuple[np.ndarray, np.ndarray],
                    fid_history: pd.DataFrame, report_path: Path) -> dict:
    """Returns the metrics of the generator `config.generator` names, after drawing the one-page report.

    The metrics also hold the FID of every generator given (`fid_best`, `fid_last`) and the
    epochs of the training-time FID schedule.
    """
    extractor = feature_extractor(classifier)
    generator = generators[config.generator]
    result = evaluate_generator(config, generator, extractor, train, holdout, others=generators)
    best = fid_history.loc[fid_history["fid"].idxmin()]
    result.update(best_epoch=int(best["epoch"]), train_best_fid=float(best["fid"]),
                  last_epoch=int(fid_history["epoch"].iloc[-1]), train_last_fid=float(fid_history["fid"].iloc[-1]))
    samples, nearest = nearest_training_images(config, generator, train[0], REPORT_PAIRS)
    real_share = np.bincount(train[1], minlength=NUM_CLASSES) / len(train[1])
    fake_counts = np.array([result[f"class_count_{c}"] for c in range(NUM_CLASSES)])
    draw_report(report_path, samples, nearest, fake_counts / fake_counts.sum(), real_share, fid_history,
                title=f"{config.data.name}: generator '{config.generator}' (epoch "
                      f"{result['best_epoch'] if config.generator == 'best' else result['last_epoch']}), "
                      f"FID {result['fid']:.2f} (real floor {result['real_floor_fid']:.2f}), "
                      f"{result['modes']}/10 classes\nprecision {result['precision']:.2f}, "
                      f"recall {result['recall']:.2f}, density {result['density']:.2f}, "
                      f"coverage {result['coverage']:.2f}, "
                      f"memorization distance ratio {result['memorization_distance_ratio']:.2f}")
    return result
