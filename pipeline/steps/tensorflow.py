"""The gradient step on TensorFlow: gradient tapes over GAN's shared losses; Keras traces it into a tf.function.

Also the TensorFlow kernels that pipeline/layers.py trains its layers with.
"""

from __future__ import annotations

import tensorflow as tf


def train_step(gan, data):
    """Returns the metrics after `d_steps` discriminator updates and one generator update on `data`."""
    real, labels = gan.unpack(data)
    d_weights, g_weights = gan.discriminator.trainable_weights, gan.generator.trainable_weights
    for _ in range(gan.d_steps - 1):  # the extra discriminator-only updates
        with tf.GradientTape() as d_tape:
            d_loss = gan.discriminator_loss(real, labels)
        gan.d_optimizer.apply_gradients(zip(dense(d_tape.gradient(d_loss, d_weights)), d_weights))
    with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
        d_loss, g_loss, real_logits, fake_logits = gan.joint_losses(real, labels)
    d_grads = dense(d_tape.gradient(d_loss, d_weights))
    g_grads = dense(g_tape.gradient(g_loss, g_weights))
    gan.d_optimizer.apply_gradients(zip(d_grads, d_weights))
    gan.g_optimizer.apply_gradients(zip(g_grads, g_weights))
    return gan.record_metrics(d_loss, g_loss, real_logits, fake_logits)


def dense(grads: list) -> list:
    """Returns `grads` with the sparse ones (cdcgan's label embeddings) made dense.

    An embedding's gradient comes as IndexedSlices, one slice per occurrence of a label, and
    Keras' Adam squares those slices one by one: its second moment gets the sum of the squares,
    not the square of the sum. Dense, the update is Adam's, the same as on JAX.
    """
    return [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g for g in grads]


def fused_batch_norm(layer, inputs, mask=None):
    """Returns training-mode batch norm of `inputs` by TensorFlow's fused kernel, updating `layer`'s
    moving statistics as Keras does; None where that kernel does not apply (Keras' ops then run).
    """
    rank = len(inputs.shape)
    if (mask is not None or rank not in (2, 4) or layer.axis not in (-1, rank - 1) or layer.synchronized
            or not (layer.scale and layer.center) or layer.epsilon < 1.001e-5):  # the kernel's smallest epsilon
        return None
    channels = inputs.shape[-1]
    # (batch, features) as (batch, 1, 1, features): statistics per feature, as Keras computes them.
    x = inputs if rank == 4 else tf.reshape(inputs, (-1, 1, 1, channels))
    # bfloat16 or float16 activations in, float32 statistics: no float32 copy of the activations.
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, layer.gamma.value, layer.beta.value,
                                                         epsilon=layer.epsilon, is_training=True)
    # The kernel hands back the variance with Bessel's correction; Keras' moving variance averages the biased one.
    count = tf.cast(tf.size(x) // channels, variance.dtype)
    variance = variance * (count - 1.0) / count
    momentum = layer.momentum
    layer.moving_mean.assign(layer.moving_mean * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(layer.moving_variance * momentum + variance * (1.0 - momentum))
    y = tf.cast(y, layer.compute_dtype)
    return y if rank == 4 else tf.reshape(y, tf.shape(inputs))
