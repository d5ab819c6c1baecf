"""The TensorFlow kernels that pipeline/fused.py trains its layers and Adam with (imported only on TensorFlow).

Same maths as Keras' own ops, on faster kernels: benchmarks/RESULTS.md has the figures.
"""

from __future__ import annotations

import keras
import tensorflow as tf


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


def conv2d(x, kernel, stride: int):
    """Returns the "same"-padded convolution of `x`, its kernel gradient taken by `kernel_gradient`."""

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            dx = tf.compat.v1.nn.conv2d_backprop_input(tf.shape(x), kernel, dy, [1, stride, stride, 1], "SAME")
            return dx, kernel_gradient(x, dy, kernel.shape[0], stride)

        return keras.ops.conv(x, kernel, strides=stride, padding="same"), grad

    return conv(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel))


def conv2d_transpose(x, kernel, stride: int):
    """Returns the "same"-padded transposed convolution of `x`, its kernel gradient taken by `kernel_gradient`."""

    @tf.custom_gradient
    def conv_transpose(x, kernel):
        def grad(dy):
            # The transposed convolution's input is the convolution of its output: the roles swap.
            return tf.nn.conv2d(dy, kernel, stride, "SAME"), kernel_gradient(dy, x, kernel.shape[0], stride)

        return keras.ops.conv_transpose(x, kernel, strides=stride, padding="same"), grad

    return conv_transpose(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel))


def kernel_gradient(x, dy, size: int, stride: int):
    """Returns the gradient of a "same"-padded `size`x`size` convolution's kernel, given its input
    `x` and output gradient `dy`, computed as one forward convolution.

    kernel_grad[i, j, c, o] = sum over (n, h, w) of x_padded[n, stride*h + i, stride*w + j, c] * dy[n, h, w, o]:
    a convolution of x, with the batch as its channels, by dy as a filter dilated by the stride.
    oneDNN's backward-weights kernel computes the same sums at about a third of its forward
    speed on these CPUs (270 against 950 GFLOP/s for the generator's widest layer).
    """
    pads = [max((dy.shape[axis] - 1) * stride + size - x.shape[axis], 0) for axis in (1, 2)]
    x = tf.pad(tf.transpose(x, [3, 1, 2, 0]), [[0, 0], *([p // 2, p - p // 2] for p in pads), [0, 0]])
    grad = tf.nn.conv2d(x, tf.transpose(dy, [1, 2, 0, 3]), strides=1, padding="VALID", dilations=stride)
    return tf.transpose(grad, [1, 2, 0, 3])


def adam_update(optimizer, gradient, variable, learning_rate) -> bool:
    """Applies Keras' Adam update to `variable` as the one fused ApplyAdam kernel; False for a sparse gradient."""
    if isinstance(gradient, tf.IndexedSlices):
        return False
    dtype = variable.dtype
    step = tf.cast(optimizer.iterations + 1, dtype)
    beta_1, beta_2 = tf.cast(optimizer.beta_1, dtype), tf.cast(optimizer.beta_2, dtype)
    index = optimizer._get_variable_index(variable)
    handle = lambda v: (v.value if isinstance(v, keras.Variable) else v).handle  # noqa: E731
    # The same formula as keras.optimizers.Adam.update_step: lr * sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + eps).
    tf.raw_ops.ResourceApplyAdam(
        var=handle(variable), m=handle(optimizer._momentums[index]), v=handle(optimizer._velocities[index]),
        beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype),
        beta1=beta_1, beta2=beta_2, epsilon=tf.cast(optimizer.epsilon, dtype), grad=tf.cast(gradient, dtype))
    return True
