"""pipeline/layers.py: Keras' layers with faster TensorFlow training kernels, saved as Keras' own."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.devices import float32_copy, precision
from pipeline.layers import BatchNormalization
from pipeline.models import build_discriminator, build_generator


def trained_once(layer_class, x, policy: str, **kwargs):
    """Returns (outputs, input and weight gradients, moving statistics) after one training call."""
    with precision(policy):
        layer = layer_class(momentum=0.9, **kwargs)
    layer.build(x.shape)
    channels = x.shape[-1]
    layer.gamma.assign(np.linspace(0.5, 2.0, channels, dtype=np.float32))
    layer.beta.assign(np.linspace(-1.0, 1.0, channels, dtype=np.float32))
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.cast(layer(x, training=True), tf.float32)
        loss = tf.reduce_sum(y * tf.sin(x))  # an uneven upstream gradient
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    return [y.numpy(), *(g.numpy() for g in grads), layer.moving_mean.numpy(), layer.moving_variance.numpy()]


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("shape", [(32, 40), (16, 7, 7, 8)], ids=["dense", "conv"])
def test_fused_batch_norm_trains_like_keras_own(shape, policy):
    x = np.random.default_rng(0).normal(1.0, 3.0, shape).astype(np.float32)
    ours = trained_once(BatchNormalization, x, policy)
    theirs = trained_once(keras.layers.BatchNormalization, x, policy)
    tolerance = 1e-5 if policy == "float32" else 1e-2
    for name, a, b in zip(["outputs", "d_inputs", "d_gamma", "d_beta", "moving_mean", "moving_variance"], ours, theirs):
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max(), err_msg=name)


@pytest.mark.parametrize("shape", [(32, 40), (16, 7, 7, 8)], ids=["dense", "conv"])
def test_training_batch_norm_runs_tensorflows_fused_kernel(shape):
    layer = BatchNormalization()
    layer.build(shape)
    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(tf.TensorSpec(shape)).graph
    assert "FusedBatchNormV3" in {op.type for op in graph.get_operations()}


def test_batch_norm_keeps_keras_own_path_where_the_fused_kernel_does_not_apply():
    x = np.random.default_rng(1).normal(size=(8, 5, 6)).astype(np.float32)  # rank 3: no fused kernel
    for a, b in zip(trained_once(BatchNormalization, x, "float32"),
                    trained_once(keras.layers.BatchNormalization, x, "float32")):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["dcgan", "mlp", "cdcgan"])
def test_saved_copies_hold_only_keras_own_layer_classes(tiny_config, arch):
    model_config = tiny_config.model.__class__(**{**tiny_config.model.__dict__, "arch": arch})
    for model in (build_generator(model_config, 100, (28, 28, 1)), build_discriminator(model_config, (28, 28, 1))):
        copy = float32_copy(model)
        assert {type(layer).__module__.split(".")[0] for layer in copy.layers} == {"keras"}, arch
        assert [layer.get_config() | {"dtype": None} for layer in copy.layers[1:]] == \
            [layer.get_config() | {"dtype": None} for layer in model.layers[1:]]
