"""Times the tutorial generator's widest layer, the stride-1 5x5 transposed convolution 7x7x256 -> 7x7x128,
as TensorFlow computes each of its three convolutions, its forward pass rewritten as a forward convolution, and
the layer as Winograd's F(4x4, 5x5) (what train.winograd runs: pipeline/tf_kernels.py), forward and training.

Usage: python benchmarks/stride1_transpose.py [--batch-size 64] [--blocks 5] [--steps 20]
AVX2 profile: ONEDNN_MAX_CPU_ISA=AVX2 TF_ENABLE_ONEDNN_OPTS=1 python benchmarks/stride1_transpose.py

A stride-1 "same" transposed convolution is the forward convolution of its input by the kernel flipped in space
with its channel axes swapped (the script checks that both give the same output). Issue 17 asked whether that
rewrite, or either argument order of the kernel-gradient kernel, is faster in float32 than what Keras runs. Prints
milliseconds per call (median of the blocks) and GFLOP/s (2 x the direct convolution's multiply-adds, for
Winograd too, which does 4.8x fewer: so its figure is an effective rate). "Training" rows are one forward pass and
both gradients, as a training step runs the layer.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from pipeline.tf_kernels import winograd_conv2d_transpose as winograd_transpose  # noqa: E402


def winograd_conv2d_transpose(x, kernel):
    """Returns the layer as Winograd F(4x4, 5x5)."""
    return winograd_transpose(x, kernel, 1)


def as_keras_runs_it(x, kernel):
    """Returns the stride-1 "same" transposed convolution of `x` (kernel: h, w, out, in) as Keras computes it."""
    return keras.ops.conv_transpose(x, kernel, strides=1, padding="same")


def rewritten(x, kernel):
    """Returns the same as a forward convolution by the kernel flipped in space, its channel axes swapped."""
    return tf.nn.conv2d(x, tf.transpose(kernel[::-1, ::-1], [0, 1, 3, 2]), 1, "SAME")


def trained(forward):
    """Returns a compiled function giving `forward(x, kernel)` and its input and kernel gradients for output gradient
    `dy`: the layer's forward pass and both its gradients, as a training step runs them."""

    @tf.function
    def gradients(x, kernel, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = forward(x, kernel)
        return [y, *tape.gradient(y, [x, kernel], output_gradients=dy)]  # y too, or tf.function drops the forward

    return gradients


def median_ms(function, arguments, blocks: int, steps: int) -> float:
    """Returns the median over `blocks` blocks of `steps` calls of milliseconds per call, after two warm-up calls."""
    function(*arguments)
    function(*arguments)
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(steps):
            result = function(*arguments)
        tf.nest.map_structure(lambda tensor: tensor.numpy(), result)
        times.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    b = args.batch_size
    rng = tf.random.Generator.from_seed(0)
    x, dy = rng.normal((b, 7, 7, 256)), rng.normal((b, 7, 7, 128))
    kernel = rng.normal((5, 5, 128, 256)) * 0.02  # Conv2DTranspose's layout: (h, w, out, in)
    variants = {
        "forward as Keras runs it (Conv2DBackpropInput)": (tf.function(as_keras_runs_it), (x, kernel)),
        "forward as a Conv2D of the flipped kernel": (tf.function(rewritten), (x, kernel)),
        "forward as Winograd F(4x4, 5x5)": (tf.function(winograd_conv2d_transpose), (x, kernel)),
        "input gradient (Conv2D, either way)": (
            tf.function(lambda dy, k: tf.nn.conv2d(dy, k, 1, "SAME")), (dy, kernel)),
        "kernel gradient as Keras runs it (BackpropFilter of dy by x)": (
            tf.function(lambda x, dy: tf.compat.v1.nn.conv2d_backprop_filter(dy, [5, 5, 128, 256], x, [1, 1, 1, 1],
                                                                             "SAME")), (x, dy)),
        "kernel gradient of the rewrite (BackpropFilter of x by dy)": (
            tf.function(lambda x, dy: tf.compat.v1.nn.conv2d_backprop_filter(x, [5, 5, 256, 128], dy, [1, 1, 1, 1],
                                                                             "SAME")), (x, dy)),
        "training, as Keras runs it (the three convolutions)": (trained(as_keras_runs_it), (x, kernel, dy)),
        "training, as Winograd F(4x4, 5x5)": (trained(winograd_conv2d_transpose), (x, kernel, dy)),
    }
    expected = as_keras_runs_it(x, kernel)
    difference = float(tf.reduce_max(tf.abs(expected - rewritten(x, kernel))) / tf.reduce_max(tf.abs(expected)))
    winograd = tf.norm(expected - winograd_conv2d_transpose(x, kernel)) / tf.norm(expected)
    print(f"oneDNN ISA limit: {os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}, TF_ENABLE_ONEDNN_OPTS="
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'unset')}, batch {b}, float32; rewrite's largest relative "
          f"difference: {difference:.1e}; Winograd's relative RMS difference: {float(winograd):.1e}")
    gflop = 2 * b * 7 * 7 * 5 * 5 * 256 * 128 / 1e9
    for name, (function, arguments) in variants.items():
        ms = median_ms(function, arguments, args.blocks, args.steps)
        passes = 3 if name.startswith("training") else 1
        print(f"{name:<62}{ms:8.2f} ms{passes * gflop / ms * 1000:8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
