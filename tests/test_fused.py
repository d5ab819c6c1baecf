"""pipeline/fused.py: Keras' layers and Adam with faster TensorFlow training kernels, saved as Keras' own."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.devices import precision
from pipeline.fused import float32_copy
from pipeline import fused
from pipeline.fused import BatchNormalization
from pipeline.models import build_discriminator, build_generator

# Every test here compares TensorFlow's CPU kernels or the graph they pick: `make test` runs them with oneDNN on and off.
pytestmark = pytest.mark.numerics


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


def conv_gradients(layer, x):
    """Returns (outputs, input gradient, kernel gradient) of `layer` on `x` under an uneven loss."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.cast(layer(x), tf.float32)
        loss = tf.reduce_sum(y * tf.sin(y))
    dx, dkernel = tape.gradient(loss, [x, layer.kernel])
    return y.numpy(), dx.numpy(), dkernel.numpy()


def twin_convolutions(name, filters, size, stride, shape, policy):
    """Returns this module's convolution layer and Keras' own, built with the same weights."""
    with precision(policy):
        ours = getattr(fused, name)(filters, size, strides=stride, padding="same")
        theirs = getattr(keras.layers, name)(filters, size, strides=stride, padding="same")
    for layer in (ours, theirs):
        layer.build(shape)
    theirs.set_weights([np.random.default_rng(2).normal(size=w.shape).astype(np.float32) for w in theirs.get_weights()])
    ours.set_weights(theirs.get_weights())
    return ours, theirs


CONVS = [("Conv2D", 64, 5, 2, (4, 28, 28, 1)), ("Conv2D", 16, 5, 2, (4, 14, 14, 8)), ("Conv2D", 8, 3, 2, (4, 7, 7, 3)),
         ("Conv2DTranspose", 16, 5, 1, (4, 7, 7, 32)), ("Conv2DTranspose", 8, 5, 2, (4, 7, 7, 16)),
         ("Conv2DTranspose", 1, 5, 2, (4, 14, 14, 8)), ("Conv2DTranspose", 3, 3, 2, (4, 8, 8, 4))]


@pytest.mark.parametrize(("name", "filters", "size", "stride", "shape"), CONVS)
def test_kernel_gradients_as_forward_convolutions_equal_tensorflows_own(name, filters, size, stride, shape):
    from pipeline import tf_kernels

    rng = np.random.default_rng(3)
    x = tf.constant(rng.normal(size=shape).astype(np.float32))
    layer = getattr(keras.layers, name)(filters, size, strides=stride, padding="same", use_bias=False)
    layer.build(shape)
    kernel = tf.constant(rng.normal(size=layer.kernel.shape).astype(np.float32))
    ours = {"Conv2D": tf_kernels.conv2d, "Conv2DTranspose": tf_kernels.conv2d_transpose}[name]
    theirs = {"Conv2D": keras.ops.conv, "Conv2DTranspose": keras.ops.conv_transpose}[name]
    results = []
    for op in (lambda: ours(x, kernel, stride), lambda: theirs(x, kernel, strides=stride, padding="same")):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = op()
            loss = tf.reduce_sum(y * tf.sin(y))
        results.append([y.numpy(), *(g.numpy() for g in tape.gradient(loss, [x, kernel]))])
    for what, a, b in zip(["outputs", "d_inputs", "d_kernel"], *results):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=what)


@pytest.mark.parametrize(("name", "filters", "size", "stride", "shape"), [CONVS[1], CONVS[4]])
def test_bfloat16_convolutions_train_like_keras_own(name, filters, size, stride, shape):
    ours, theirs = twin_convolutions(name, filters, size, stride, shape, "mixed_bfloat16")
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    for what, a, b in zip(["outputs", "d_inputs", "d_kernel"], conv_gradients(ours, x), conv_gradients(theirs, x)):
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02 * np.abs(b).max(), err_msg=what)  # bfloat16 rounding


def kernel_gradient_ops(layer, shape) -> set[str]:
    """Returns the op types of the traced graph that takes `layer`'s kernel gradient."""

    def kernel_gradient(x):
        with tf.GradientTape() as tape:
            y = layer(x)
        return tape.gradient(y, layer.kernel)

    graph = tf.function(kernel_gradient).get_concrete_function(tf.TensorSpec(shape)).graph
    return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("name", ["Conv2D", "Conv2DTranspose"])
def test_bfloat16_kernel_gradients_are_forward_convolutions_on_cpu(name):
    ours, _ = twin_convolutions(name, 8, 5, 2, (4, 14, 14, 8), "mixed_bfloat16")
    types = kernel_gradient_ops(ours, (4, 14, 14, 8))
    assert "Conv2DBackpropFilter" not in types and "Conv2D" in types


@pytest.mark.parametrize("name", ["Conv2D", "Conv2DTranspose"])
def test_float32_kernel_gradients_keep_tensorflows_own_kernel(name):
    ours, _ = twin_convolutions(name, 8, 5, 2, (4, 14, 14, 8), "float32")
    assert "Conv2DBackpropFilter" in kernel_gradient_ops(ours, (4, 14, 14, 8))


def adam_trajectory(optimizer_class, **kwargs) -> list[np.ndarray]:
    """Returns a variable after three Adam steps on fixed gradients, and its moving average."""
    rng = np.random.default_rng(4)
    variable = keras.Variable(rng.normal(size=(6, 5)).astype(np.float32))
    optimizer = optimizer_class(learning_rate=1e-2, beta_1=0.5, **kwargs)
    step = tf.function(lambda g: optimizer.apply_gradients([(g, variable)]))
    for _ in range(3):
        step(tf.constant(rng.normal(size=(6, 5)).astype(np.float32)))
    averages = [v.numpy() for v in optimizer.variables if "average" in v.path]
    return [variable.numpy(), *averages]


def test_fused_adam_updates_like_keras_adam():
    for ours, theirs in zip(adam_trajectory(fused.Adam, use_ema=True, ema_momentum=0.9),
                            adam_trajectory(keras.optimizers.Adam, use_ema=True, ema_momentum=0.9), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)  # steps are ~1e-2


def test_fused_adam_runs_the_apply_adam_kernel():
    variable = keras.Variable(np.ones((3,), np.float32))
    optimizer = fused.Adam()
    optimizer.build([variable])
    graph = tf.function(lambda g: optimizer.apply_gradients([(g, variable)])).get_concrete_function(
        tf.TensorSpec((3,))).graph
    assert "ResourceApplyAdam" in {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("taps", [3, 5])
def test_winograd_matrices_compute_a_correlation(taps):
    from pipeline import tf_kernels

    a_t, g, b_t = tf_kernels.winograd_matrices(taps)
    rng = np.random.default_rng(5)
    d, kernel = rng.normal(size=taps + 3), rng.normal(size=taps)
    direct = [sum(kernel[k] * d[i + k] for k in range(taps)) for i in range(4)]
    np.testing.assert_allclose(a_t @ ((g @ kernel) * (b_t @ d)), direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "stride", "shape"),
                         [("Conv2DTranspose", 1, (4, 7, 7, 32)), ("Conv2DTranspose", 1, (3, 5, 9, 8)),
                          ("Conv2DTranspose", 1, (2, 1, 1, 4)), ("Conv2DTranspose", 2, (3, 7, 7, 8)),
                          ("Conv2DTranspose", 2, (2, 5, 9, 4)), ("Conv2D", 2, (3, 14, 14, 8)),
                          ("Conv2D", 2, (2, 6, 10, 3))])
def test_winograd_convolutions_train_like_keras_own(name, stride, shape):
    ours, theirs = twin_convolutions(name, 16, 5, stride, shape, "float32")
    ours.winograd = True
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    for what, a, b in zip(["outputs", "d_inputs", "d_kernel"], conv_gradients(ours, x), conv_gradients(theirs, x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=what)  # float32 rounding


@pytest.mark.parametrize(("name", "stride", "shape"), [("Conv2DTranspose", 1, (4, 7, 7, 8)),
                                                      ("Conv2DTranspose", 2, (4, 7, 7, 8)), ("Conv2D", 2, (4, 14, 14, 8))])
def test_winograd_convolutions_run_no_convolution_kernel(name, stride, shape):
    ours, _ = twin_convolutions(name, 8, 5, stride, shape, "float32")
    ours.winograd = True
    types = kernel_gradient_ops(ours, shape) | {
        op.type for op in tf.function(ours).get_concrete_function(tf.TensorSpec(shape)).graph.get_operations()}
    assert not {t for t in types if t.startswith("Conv2D")} and "BatchMatMulV2" in types


def winograd_layers(model) -> list[str]:
    return [layer.name for layer in model.layers if getattr(layer, "winograd", False)]


@pytest.mark.parametrize("setting", ["enabled", "disabled"])
def test_choose_winograd_sets_exactly_the_float32_stride1_5x5_transposed_convolutions(tiny_config, setting):
    config = tiny_config.model.__class__(**{**tiny_config.model.__dict__, "arch": "dcgan", "kernel_size": 5,
                                            "generator_filters": (16, 8, 4)})
    with precision("float32"):
        generator = build_generator(config, 100, (28, 28, 1))
    stride1 = [layer.name for layer in generator.layers
               if isinstance(layer, keras.layers.Conv2DTranspose) and layer.strides == (1, 1)]
    assert len(stride1) == 1  # (16, 8, 4): 7x7 -> 7x7, then two upsamplings
    assert fused.choose_winograd(generator, setting) == (1 if setting == "enabled" else 0)
    assert winograd_layers(generator) == (stride1 if setting == "enabled" else [])


def test_choose_winograd_sets_the_discriminators_strided_convolution_from_8_channels(tiny_config):
    config = tiny_config.model.__class__(**{**tiny_config.model.__dict__, "arch": "dcgan", "kernel_size": 5,
                                            "discriminator_filters": (8, 16)})
    with precision("float32"):
        discriminator = build_discriminator(config, (28, 28, 1))
    convs = [layer.name for layer in discriminator.layers if isinstance(layer, keras.layers.Conv2D)]
    assert fused.choose_winograd(discriminator, "enabled") == 1
    assert winograd_layers(discriminator) == convs[1:]  # not the first, on the 1-channel image


def test_choose_winograd_leaves_bfloat16_layers_alone(tiny_config):
    config = tiny_config.model.__class__(**{**tiny_config.model.__dict__, "arch": "dcgan", "kernel_size": 5,
                                            "generator_filters": (16, 8, 4)})
    with precision("mixed_bfloat16"):
        generator = build_generator(config, 100, (28, 28, 1))
    assert fused.choose_winograd(generator, "enabled") == 0 and not winograd_layers(generator)
