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


class _SpectrallyNormalized:
    """What a spectrally normalized layer adds to its Keras class: the power-iteration vector `u`, and the weights of
    the plain layer that computes what it does at inference."""

    def build(self, input_shape):
        super().build(input_shape)
        self.u = self.add_weight(shape=(1, self.kernel.shape[-1]),
                                 initializer=keras.initializers.RandomNormal(stddev=1.0), trainable=False,
                                 autocast=False, name="spectral_u", dtype="float32")

    def inference_weights(self) -> list:
        """Returns the plain layer's weights: the normalized kernel, then the bias if any."""
        kernel = ops.convert_to_numpy(normalized_kernel(self, training=False))
        return [kernel, ops.convert_to_numpy(self.bias)] if self.use_bias else [kernel]


@keras.saving.register_keras_serializable(package="pipeline")
class SpectralConv2D(_SpectrallyNormalized, Conv2D):
    """Returns Conv2D's output computed with the spectrally normalized kernel."""

    def call(self, inputs, training=None):
        outputs = self.convolution_op(inputs, normalized_kernel(self, training))
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, self.filters)))
        return self.activation(outputs) if self.activation is not None else outputs


@keras.saving.register_keras_serializable(package="pipeline")
class SpectralDense(_SpectrallyNormalized, layers.Dense):
    """Returns Dense's output computed with the spectrally normalized kernel."""

    def call(self, inputs, training=None):
        outputs = ops.matmul(inputs, normalized_kernel(self, training))
        if self.use_bias:
            outputs = ops.add(outputs, self.bias)
        return self.activation(outputs) if self.activation is not None else outputs
