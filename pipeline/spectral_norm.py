"""Conv2D and Dense layers whose kernel is divided by its spectral norm (Miyato et al. 2018): `model.spectral_norm`.

The largest singular value of the kernel (reshaped to fan-in x units) is estimated by one step of
power iteration per training call, from a vector `u` kept between steps as a non-trainable weight,
and the gradient flows through the division, as in the paper. Keras' own SpectralNormalization
wrapper is not used: it writes the normalized kernel back into the trainable weight, so the
optimizer never sees the division, and under JAX's stateless step that write would be dropped.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from pipeline.fused import Conv2D

EPSILON = 1e-12


def _unit(x):
    return x / ops.maximum(ops.sqrt(ops.sum(ops.square(x))), EPSILON)


def normalized_kernel(layer, training):
    """Returns `layer.kernel` divided by its estimated spectral norm; on training calls `layer.u` moves on one step."""
    kernel = layer.kernel
    # In float32 whatever the compute dtype: the estimate is a handful of small matrix-vector products.
    matrix = ops.reshape(ops.cast(kernel, "float32"), (-1, ops.shape(kernel)[-1]))
    v = ops.stop_gradient(_unit(ops.matmul(layer.u, ops.transpose(matrix))))
    u = ops.stop_gradient(_unit(ops.matmul(v, matrix)))
    if training:
        layer.u.assign(u)
    sigma = ops.sum(ops.matmul(v, matrix) * u)
    return kernel / ops.cast(sigma, kernel.dtype)


def _inference_weights(layer) -> list:
    """Returns the weights of the plain layer that computes what `layer` does at inference: the kernel normalized."""
    return [keras.ops.convert_to_numpy(normalized_kernel(layer, training=False)),
            *(keras.ops.convert_to_numpy(layer.bias) for _ in range(layer.use_bias))]


def _add_u(layer, units: int) -> None:
    layer.u = layer.add_weight(shape=(1, units), initializer=keras.initializers.RandomNormal(stddev=1.0),
                               trainable=False, autocast=False, name="spectral_u", dtype="float32")


@keras.saving.register_keras_serializable(package="pipeline")
class SpectralConv2D(Conv2D):
    """Returns Conv2D's output computed with the spectrally normalized kernel."""

    def build(self, input_shape):
        super().build(input_shape)
        _add_u(self, self.filters)

    def inference_weights(self) -> list:
        return _inference_weights(self)

    def call(self, inputs, training=None):
        outputs = self.convolution_op(inputs, normalized_kernel(self, training))
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, self.filters)))
        return self.activation(outputs) if self.activation is not None else outputs


@keras.saving.register_keras_serializable(package="pipeline")
class SpectralDense(layers.Dense):
    """Returns Dense's output computed with the spectrally normalized kernel."""

    def build(self, input_shape):
        super().build(input_shape)
        _add_u(self, self.units)

    def inference_weights(self) -> list:
        return _inference_weights(self)

    def call(self, inputs, training=None):
        outputs = ops.matmul(inputs, normalized_kernel(self, training))
        if self.use_bias:
            outputs = ops.add(outputs, self.bias)
        return self.activation(outputs) if self.activation is not None else outputs
