"""Evaluation: a digit classifier trained on real data gives the features and labels the metrics use."""

from __future__ import annotations

import logging

import keras
import numpy as np

from pipeline import metrics
from pipeline.config import Config
from pipeline.models import build_classifier, build_generator
from pipeline.train import fixed_noise, generate

log = logging.getLogger(__name__)

NUM_CLASSES = 10


def train_classifier(config: Config, train: tuple[np.ndarray, np.ndarray],
                     holdout: tuple[np.ndarray, np.ndarray]) -> tuple[keras.Model, float]:
    """Returns the classifier trained on the real training split and its holdout accuracy."""
    keras.utils.set_random_seed(config.seed)
    model = build_classifier(train[0].shape[1:], NUM_CLASSES)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(*train, batch_size=config.evaluate.classifier_batch_size,
              epochs=config.evaluate.classifier_epochs, verbose=2)
    _, accuracy = model.evaluate(*holdout, batch_size=512, verbose=0)
    log.info("classifier holdout accuracy: %.4f", accuracy)
    return model, float(accuracy)


def feature_extractor(classifier: keras.Model) -> keras.Model:
    """Returns a model mapping images to the classifier's (features, logits)."""
    return keras.Model(classifier.input, [classifier.get_layer("features").output, classifier.output])


def embed(extractor: keras.Model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (features, class probabilities) of images in [-1, 1] under a feature extractor."""
    features, logits = extractor.predict(images, batch_size=500, verbose=0)
    return features, metrics.softmax(logits)


def evaluate_generator(config: Config, generator: keras.Model, classifier: keras.Model,
                       train_images: np.ndarray) -> dict[str, float]:
    """Returns FID (with its real-vs-real floor and an untrained generator's), IS and class coverage."""
    extractor = feature_extractor(classifier)
    rng = np.random.default_rng(config.seed)
    # Equal sizes everywhere: FID is biased by sample count, so only same-size values compare.
    n = min(config.evaluate.num_samples, len(train_images) // 2)
    real = train_images[rng.permutation(len(train_images))[: 2 * n]]
    real_a, _ = embed(extractor, real[:n])
    real_b, real_b_probs = embed(extractor, real[n:])
    # Evaluation noise comes from its own seed, apart from the sample stage's.
    noise = fixed_noise(config.seed + 2, n, config.train.latent_dim)
    fake, fake_probs = embed(extractor, generate(generator, noise))
    keras.utils.set_random_seed(config.seed)
    untrained = build_generator(config.model, config.train.latent_dim, tuple(train_images.shape[1:]))
    untrained_features, _ = embed(extractor, generate(untrained, noise))

    histogram = metrics.class_histogram(fake_probs)
    is_mean, is_std = metrics.inception_score(fake_probs, config.evaluate.inception_splits)
    real_is, _ = metrics.inception_score(real_b_probs, config.evaluate.inception_splits)
    fid = metrics.fid(fake, real_a)
    fid_untrained = metrics.fid(untrained_features, real_a)
    result = {
        "num_samples": n,
        "fid": fid,
        "fid_real_floor": metrics.fid(real_b, real_a),
        "fid_untrained": fid_untrained,
        "fid_untrained_ratio": fid_untrained / max(fid, 1e-12),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "inception_score_real": real_is,
        "classes_covered": metrics.classes_covered(histogram),
    }
    result.update({f"class_count_{c}": int(k) for c, k in enumerate(histogram)})
    return result
