"""Keras layers that train faster on TensorFlow and are Keras' own everywhere else.

Keras 3 composes training-mode batch normalization from a dozen elementwise ops in float32;
`BatchNormalization` here runs it, on TensorFlow, as the one fused kernel (oneDNN's on CPU),
which reads the activations twice instead: 1.13-1.18x faster steps (benchmarks/RESULTS.md).
Same config, weights, statistics and results, to float rounding. In inference and on other
backends it is Keras' layer unchanged (XLA fuses those ops on JAX by itself).

Saved models hold Keras' own classes (`keras_class`, used by pipeline.devices.float32_copy),
so loading one needs nothing from this project.
"""

from __future__ import annotations

import keras
from keras import layers


@keras.saving.register_keras_serializable(package="pipeline")
class BatchNormalization(layers.BatchNormalization):
    """Keras' BatchNormalization, trained through TensorFlow's fused kernel where it applies."""

    def call(self, inputs, training=None, mask=None):
        if training and self.trainable and keras.backend.backend() == "tensorflow":
            from pipeline.steps import tensorflow as tf_step

            outputs = tf_step.fused_batch_norm(self, inputs, mask)
            if outputs is not None:
                return outputs
        return super().call(inputs, training=training, mask=mask)


def keras_class(layer: keras.layers.Layer) -> type:
    """Returns the Keras class that `layer` is, or that this module's class of it extends."""
    return next(cls for cls in type(layer).__mro__ if cls.__module__.startswith("keras."))
