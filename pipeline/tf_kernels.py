"""The TensorFlow kernels that pipeline/fused.py trains its layers and Adam with (imported only on TensorFlow).

Same maths as Keras' own ops, on faster kernels: benchmarks/RESULTS.md has the figures.
"""

from __future__ import annotations

import keras
import numpy as np
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


# Winograd F(4, r): 4 outputs of an r-tap correlation from r + 3 inputs in r + 3 multiplications, not 4r. The
# interpolation points: 0, +-1, +-2, +-1/2 and infinity (Lavin & Gray 2016), the float32-friendly ones.
WINOGRAD_TILE = 4
WINOGRAD_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)


def winograd_matrices(taps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns Winograd's F(4, taps) matrices (A^T, G, B^T), float64: the 4 outputs y_i = sum_k g_k d_(i+k) of
    inputs d (taps + 3 of them) are A^T ((G g) * (B^T d)).

    A^T and G come from the points by Toom-Cook; B^T is solved from that identity, and checked.
    """
    m, alpha = WINOGRAD_TILE, WINOGRAD_TILE + taps - 1
    if not 2 <= alpha - 1 <= len(WINOGRAD_POINTS):
        raise ValueError(f"Winograd F(4, {taps}) needs {alpha - 1} points; {len(WINOGRAD_POINTS)} are defined")
    points = np.array(WINOGRAD_POINTS[:alpha - 1])
    a_t, g = np.zeros((m, alpha)), np.zeros((alpha, taps))
    a_t[:, :-1] = points[None, :] ** np.arange(m)[:, None]
    scale = [np.prod([p - q for q in points if q != p]) for p in points]
    g[:-1] = points[:, None] ** np.arange(taps)[None, :] / np.array(scale)[:, None]
    a_t[m - 1, -1] = g[-1, taps - 1] = 1.0  # the point at infinity: the leading coefficients
    # Output i, tap k reads input i + k: sum_j A^T[i, j] G[j, k] B^T[j, q] = [q == i + k] for every i, k, q.
    products = np.einsum("ij,jk->ikj", a_t, g).reshape(m * taps, alpha)
    reads = np.array([[float(q == i + k) for q in range(alpha)] for i in range(m) for k in range(taps)])
    b_t = np.linalg.lstsq(products, reads, rcond=None)[0]
    if not np.allclose(products @ b_t, reads, atol=1e-9):
        raise ArithmeticError(f"no Winograd F(4, {taps}) input transform for points {points}")
    return a_t, g, b_t


def _tile_transforms(length: int, taps: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns, for one spatial axis of `length` and a "same" stride-1 correlation of `taps` taps, the matrices
    taking the axis to Winograd's tiles, (tile point, tile) x position, and back, position x (tile point, tile).

    The zero padding and the tiles' overlap are in the matrices, so both transforms are matmuls of the whole axis.
    """
    a_t, _, b_t = winograd_matrices(taps)
    alpha, tiles, pad = b_t.shape[0], -(-length // WINOGRAD_TILE), (taps - 1) // 2
    into, back = np.zeros((alpha, tiles, length)), np.zeros((length, alpha, tiles))
    for t in range(tiles):
        for h in range(length):
            if 0 <= h + pad - WINOGRAD_TILE * t < alpha:
                into[:, t, h] = b_t[:, h + pad - WINOGRAD_TILE * t]
            if 0 <= h - WINOGRAD_TILE * t < WINOGRAD_TILE:
                back[h, :, t] = a_t[h - WINOGRAD_TILE * t, :]
    return (tf.constant(into.reshape(alpha * tiles, length), tf.float32),
            tf.constant(back.reshape(length, alpha * tiles), tf.float32))


def winograd_conv2d(x, kernel):
    """Returns the "same"-padded stride-1 correlation of float32 `x` (batch, height, width, channels) by `kernel`
    (size, size, channels, filters), computed by Winograd's F(4x4, size x size).

    Winograd takes each 4x4 output tile from (size + 3)^2 products per channel pair, not 16 size^2: for 5x5 6.25x
    fewer multiplications, 4.8x on a 7x7 map (its 4x4 tiles cover 8x8); for 3x3 4x and 2.8x. The products are one
    batched matmul; the input, kernel and output transforms are small matmuls, so its gradients are matmuls too
    (TensorFlow's own). Results differ from the direct convolution by float32 rounding (relative RMS about 6e-6
    for 5x5); in bfloat16 the transforms would lose too much, so this is float32 only.
    """
    size, _, channels, filters = kernel.shape
    _, height, width, _ = x.shape
    rows_in, rows_out = _tile_transforms(height, size)
    cols_in, cols_out = _tile_transforms(width, size)
    alpha, batch = size + WINOGRAD_TILE - 1, tf.shape(x)[0]
    row_tiles, col_tiles = rows_in.shape[0] // alpha, cols_in.shape[0] // alpha
    # Input tiles: [(row point, row tile), (column point, column tile), batch * channels].
    v = tf.reshape(rows_in @ tf.reshape(tf.transpose(x, (1, 2, 0, 3)), (height, -1)), (alpha * row_tiles, width, -1))
    v = tf.reshape(tf.linalg.matmul(cols_in[None], v), (alpha, row_tiles, alpha, col_tiles * batch, channels))
    # Kernel: [row point, 1, column point, channels, filters].
    g = tf.constant(winograd_matrices(size)[1], tf.float32)
    u = tf.reshape(g @ tf.reshape(kernel, (size, -1)), (alpha, size, -1))
    u = tf.reshape(tf.linalg.matmul(g[None], u), (alpha, 1, alpha, channels, filters))
    # One matmul per pair of points, over every tile of the batch: [row point, row tile, column point, ., filters].
    y = tf.reshape(tf.linalg.matmul(v, u), (alpha * row_tiles, -1))
    y = tf.reshape(rows_out @ y, (height, alpha * col_tiles, -1))
    y = tf.reshape(tf.linalg.matmul(cols_out[None], y), (height, width, batch, filters))
    return tf.transpose(y, (2, 0, 1, 3))


# A stride-2 "same" 5x5 convolution (input 2n -> n, padding 1 before) splits by the input's parity into a 3x3
# correlation of each phase: along an axis, output i reads even inputs 2(i-1..i+1) with taps (none, 1, 3) and odd
# ones 2(i-1..i+1)+1 with taps (0, 2, 4). Its transpose (n -> 2n) gives output phase 0 taps (3, 1, none) and
# phase 1 taps (4, 2, 0) over inputs i-1..i+1. Index 5 is a zero tap.
CONV_PHASE_TAPS = ((5, 1, 3), (0, 2, 4))
TRANSPOSE_PHASE_TAPS = ((3, 1, 5), (4, 2, 0))


def _phase_kernels(kernel, taps):
    """Returns a 5x5 kernel's taps per phase pair: [row phase, row tap, column phase, column tap, ...] (2, 3, 2, 3)."""
    padded = tf.pad(kernel, [[0, 1], [0, 1], [0, 0], [0, 0]])
    return tf.gather(tf.gather(padded, taps, axis=0), taps, axis=2)


def winograd_strided_conv2d(x, kernel):
    """Returns the "same"-padded stride-2 convolution of float32 `x` (even height and width) by a 5x5 `kernel`
    (5, 5, channels, filters): the 3x3 Winograd correlation of x's four parity phases (space_to_depth)."""
    channels, filters = kernel.shape[2:]
    phases = _phase_kernels(kernel, CONV_PHASE_TAPS)  # [a, th, b, tw, channels, filters]
    # space_to_depth orders channels (row phase, column phase, channel).
    stacked = tf.reshape(tf.transpose(phases, (1, 3, 0, 2, 4, 5)), (3, 3, 4 * channels, filters))
    return winograd_conv2d(tf.nn.space_to_depth(x, 2), stacked)


def winograd_conv2d_transpose(x, kernel, stride: int):
    """Returns the "same"-padded transposed convolution of float32 `x` by a Keras 5x5 `kernel` (5, 5, filters,
    channels) at stride 1 or 2, as Winograd correlations.

    At stride 1 it is the correlation by the kernel flipped in space, channel axes swapped; at stride 2 each of the
    output's four parity phases is a 3x3 correlation of x, computed as one with 4 x filters (depth_to_space).
    """
    if stride == 1:
        return winograd_conv2d(x, tf.transpose(tf.reverse(kernel, (0, 1)), (0, 1, 3, 2)))
    filters, channels = kernel.shape[2:]
    phases = _phase_kernels(kernel, TRANSPOSE_PHASE_TAPS)  # [p, th, q, tw, filters, channels]
    # depth_to_space reads channels as (row phase, column phase, filter).
    stacked = tf.reshape(tf.transpose(phases, (1, 3, 5, 0, 2, 4)), (3, 3, channels, 4 * filters))
    return tf.nn.depth_to_space(winograd_conv2d(x, stacked), 2)


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
