"""Keras' BatchNormalization, Conv2D, Conv2DTranspose and Adam, trained by faster TensorFlow kernels.

On TensorFlow (pipeline/tf_kernels.py has the kernels; benchmarks/RESULTS.md the figures):
- BatchNormalization trains through the fused batch-norm kernel (oneDNN's on CPU), which reads
  the activations twice, where Keras 3 composes a dozen float32 elementwise ops: 1.13-1.18x.
- Conv2D and Conv2DTranspose, on CPU in bfloat16, compute their kernel's gradient as a forward
  convolution of the input with the output's gradient: oneDNN's backward-weights convolution
  runs at about a third of its forward speed on these CPUs' AMX units. 1.1x at batch 64.
- 5x5 convolutions in float32 with oneDNN (`train.winograd: auto`) run as Winograd convolutions: transposed
  ones at stride 1 as F(4x4, 5x5) (4.8x fewer multiplications on a 7x7 map, 2.4x the layer's training speed at
  batch 64 on an AVX2 CPU), stride-2 ones (forward and transposed, from/to >= 8 channels) as F(4x4, 3x3) on their
  four parity phases. `choose_winograd` sets it on a built model's layers.
- Adam updates each variable with the one fused ApplyAdam kernel, Keras' formula unchanged.
Elsewhere (JAX, whose XLA fuses the same ops itself; inference; settings those kernels do not
cover) they are Keras' own, and results are the same up to float rounding either way.

Saved models hold Keras' own classes (`float32_copy`), so loading one needs nothing from this project.
"""

from __future__ import annotations

import keras
from keras import layers, ops

from pipeline import devices


def _tensorflow():
    """Returns pipeline.tf_kernels when Keras runs on TensorFlow, else None (it imports TensorFlow)."""
    if keras.backend.backend() != "tensorflow":
        return None
    from pipeline import tf_kernels

    return tf_kernels


def _cpu_kernel_gradient(layer) -> bool:
    """Returns whether `layer`'s kernel gradient is taken as a forward convolution: on TensorFlow's
    CPU in bfloat16, where it was measured faster (in float32, oneDNN's own kernel is as fast).
    """
    kernel, strides = layer.kernel_size, layer.strides
    return (_tensorflow() is not None and not devices.gpu_count() and layer.compute_dtype == "bfloat16"
            and layer.padding == "same"
            and layer.data_format == "channels_last" and tuple(layer.dilation_rate) == (1, 1)
            and kernel[0] == kernel[1] and strides[0] == strides[1] and kernel[0] >= strides[0])


def _winograd_fits(layer) -> bool:
    """Returns whether `layer` is a convolution that pipeline/tf_kernels.py's Winograd functions compute: on
    TensorFlow, float32, 5x5, "same", undilated, channels last; a transposed one at stride 1, or 2 with at least 8
    filters, a forward one at stride 2 from at least 8 channels (a 1-channel image layer ran 0.7x as fast)."""
    if not (isinstance(layer, (Conv2D, Conv2DTranspose)) and _tensorflow() is not None
            and layer.compute_dtype == "float32" and tuple(layer.kernel_size) == (5, 5) and layer.padding == "same"
            and tuple(layer.dilation_rate) == (1, 1) and layer.data_format == "channels_last"):
        return False
    strides, filters_in = tuple(layer.strides), layer.kernel.shape[2]
    if isinstance(layer, Conv2DTranspose):  # kernel (h, w, filters, channels)
        return layer.output_padding is None and (strides == (1, 1) or (strides == (2, 2) and filters_in >= 8))
    return layer.groups == 1 and strides == (2, 2) and filters_in >= 8


def choose_winograd(model: keras.Model, setting: str) -> int:
    """Returns how many of `model`'s layers run as Winograd convolutions, having set each that fits as
    `train.winograd` says (devices.winograd_enabled). Measured in benchmarks/stride1_transpose.py.
    """
    chosen = devices.winograd_enabled(setting)
    layers_ = [layer for layer in model._flatten_layers(include_self=False) if _winograd_fits(layer)]
    for layer in layers_:
        layer.winograd = chosen
    return len(layers_) if chosen else 0


@keras.saving.register_keras_serializable(package="pipeline")
class BatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization, trained through TensorFlow's fused kernel where it applies."""

    def call(self, inputs, training=None, mask=None):
        kernels = _tensorflow()
        if training and self.trainable and kernels is not None:
            outputs = kernels.fused_batch_norm(self, inputs, mask)
            if outputs is not None:
                return outputs
        return super().call(inputs, training=training, mask=mask)


@keras.saving.register_keras_serializable(package="pipeline")
class Conv2D(layers.Conv2D):
    """Keras' Conv2D; on TensorFlow's CPU in bfloat16 its kernel gradient is a forward convolution, and where
    choose_winograd set it (stride 2, even input), a Winograd convolution."""

    winograd = False  # set per layer by choose_winograd

    def convolution_op(self, inputs, kernel):
        if self.winograd and inputs.shape[1] % 2 == 0 and inputs.shape[2] % 2 == 0:
            return _tensorflow().winograd_strided_conv2d(inputs, kernel)
        if self.groups == 1 and _cpu_kernel_gradient(self):
            return _tensorflow().conv2d(inputs, kernel, self.strides[0])
        return super().convolution_op(inputs, kernel)


@keras.saving.register_keras_serializable(package="pipeline")
class Conv2DTranspose(layers.Conv2DTranspose):
    """Keras' Conv2DTranspose; on TensorFlow's CPU in bfloat16 its kernel gradient is a forward convolution, and
    where choose_winograd set it, a Winograd convolution."""

    winograd = False  # set per layer by choose_winograd

    def call(self, inputs):
        if self.winograd:
            outputs = _tensorflow().winograd_conv2d_transpose(inputs, self.kernel, self.strides[0])
        elif self.output_padding is not None or not _cpu_kernel_gradient(self):
            return super().call(inputs)
        else:
            outputs = _tensorflow().conv2d_transpose(inputs, self.kernel, self.strides[0])
        if self.use_bias:
            outputs = ops.add(outputs, ops.reshape(self.bias, (1, 1, 1, self.filters)))
        return self.activation(outputs) if self.activation is not None else outputs


class Adam(keras.optimizers.Adam):
    """Keras' Adam; on TensorFlow each dense update is the one fused ApplyAdam kernel."""

    def update_step(self, gradient, variable, learning_rate):
        kernels = _tensorflow()
        if kernels is None or self.amsgrad or not kernels.adam_update(self, gradient, variable, learning_rate):
            super().update_step(gradient, variable, learning_rate)


def keras_class(layer: keras.layers.Layer) -> type:
    """Returns the Keras class that `layer` is, or that this module's class of it extends."""
    return next(cls for cls in type(layer).__mro__ if cls.__module__.startswith("keras."))


def float32_copy(model: keras.Model) -> keras.Model:
    """Returns a copy of `model` in float32 with the same weights (spectrally normalized kernels divided out) and
    Keras' own layer classes: what is saved."""

    def clone(layer):
        return keras_class(layer).from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(model, clone_function=clone)
    for source, target in zip(model.layers, copy.layers):
        # A spectrally normalized layer (pipeline/spectral_norm.py) becomes Keras' own with its kernel normalized.
        target.set_weights(getattr(source, "inference_weights", source.get_weights)())
    return copy
