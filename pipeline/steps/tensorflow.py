"""The gradient step on TensorFlow: gradient tapes over GAN's shared losses; Keras traces it into a tf.function."""

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
