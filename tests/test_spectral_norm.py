"""model.spectral_norm: every discriminator kernel is divided by its largest singular value, differentiably."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from conftest import merge
from pipeline.config import config_from_dict
from pipeline.fused import float32_copy
from pipeline.models import build_discriminator
from pipeline.paths import TrainOutputs
from pipeline.spectral_norm import SpectralConv2D, SpectralDense, normalized_kernel
from pipeline.train import train_gan
from test_train import classifier  # noqa: F401 (fixture)


def converged(layer, calls: int = 300):
    """Returns `layer`, built from seeded weights, after `calls` training calls: its power iteration has converged."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    for _ in range(calls):
        layer(x if isinstance(layer, SpectralConv2D) else x.reshape(2, -1), training=True)
    return layer


def largest_singular_value(kernel) -> float:
    kernel = np.asarray(ops.convert_to_numpy(kernel), np.float64)
    return float(np.linalg.svd(kernel.reshape(-1, kernel.shape[-1]), compute_uv=False)[0])


@pytest.mark.parametrize("layer", [SpectralConv2D(16, 5, strides=2, padding="same"), SpectralDense(16)],
                         ids=["conv", "dense"])
def test_normalized_kernel_has_spectral_norm_one(layer):
    layer = converged(layer)
    assert largest_singular_value(layer.kernel) != pytest.approx(1.0, abs=0.1)  # Glorot's kernel is not normalized
    assert largest_singular_value(normalized_kernel(layer, training=False)) == pytest.approx(1.0, abs=1e-3)


def test_only_training_calls_move_the_power_iteration():
    layer = converged(SpectralDense(4), calls=1)
    before = ops.convert_to_numpy(layer.u)
    layer(np.ones((2, 192), np.float32), training=False)
    assert np.array_equal(ops.convert_to_numpy(layer.u), before)
    layer(np.ones((2, 192), np.float32), training=True)
    assert not np.array_equal(ops.convert_to_numpy(layer.u), before)


def test_gradient_flows_through_the_spectral_norm():
    # <W / sigma(W), u v^T> = u^T W v / sigma = 1 for the converged singular vectors u, v, whatever W: its
    # gradient is 0 when the division by sigma is differentiated, u v^T / sigma when sigma is held constant.
    layer = converged(SpectralDense(6))
    matrix = ops.convert_to_numpy(layer.kernel).astype(np.float64)
    left, _, right = np.linalg.svd(matrix)
    outer = tf.constant(np.outer(left[:, 0], right[0]), tf.float32)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(normalized_kernel(layer, training=False) * outer)
    gradient = tape.gradient(value, layer.kernel.value).numpy()
    assert abs(float(value)) == pytest.approx(1.0, abs=1e-3)
    held_constant = np.abs(outer.numpy()).max() / largest_singular_value(matrix)
    print("largest gradient element over sigma-held-constant's:", np.abs(gradient).max() / held_constant)
    assert np.abs(gradient).max() < 0.01 * held_constant


def test_saved_discriminator_is_keras_own_and_judges_alike(tiny_params):
    config = config_from_dict(merge(tiny_params, {"model": {"spectral_norm": True, "dropout": 0.0}}))
    discriminator = build_discriminator(config.model, (28, 28, 1))
    images = np.random.default_rng(1).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
    for _ in range(20):
        discriminator(images, training=True)
    saved = float32_copy(discriminator)
    assert not any(isinstance(layer, (SpectralConv2D, SpectralDense)) for layer in saved.layers)
    np.testing.assert_allclose(ops.convert_to_numpy(saved(images, training=False)),
                               ops.convert_to_numpy(discriminator(images, training=False)), rtol=1e-4, atol=1e-5)


def test_discriminator_layers_are_spectral_only_when_asked(tiny_params):
    for arch in ("dcgan", "cdcgan", "mlp"):
        for on in (False, True):
            config = config_from_dict(merge(tiny_params, {"model": {"arch": arch, "spectral_norm": on}}))
            kinds = {type(layer) for layer in build_discriminator(config.model, (28, 28, 1)).layers}
            assert bool(kinds & {SpectralConv2D, SpectralDense}) == on, (arch, on)


def test_training_with_spectral_norm_and_hinge_loss_runs(tiny_params, scaled_digits, classifier, tmp_path):
    config = config_from_dict(merge(tiny_params, {"model": {"spectral_norm": True}, "train": {"loss": "hinge"}}))
    gan, history, fid_history = train_gan(config, scaled_digits[0][:64], scaled_digits[1][:64], classifier,
                                          TrainOutputs(tmp_path), verbose=0)
    kernels = [layer for layer in gan.discriminator.layers if isinstance(layer, (SpectralConv2D, SpectralDense))]
    assert len(kernels) == len(config.model.discriminator_filters) + 1
    assert all(largest_singular_value(normalized_kernel(k, training=False)) < 1.1 for k in kernels)
    assert np.isfinite(history[["d_loss", "g_loss"]].to_numpy()).all() and len(fid_history) == 1
