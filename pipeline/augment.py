"""Differentiable augmentation of every image the discriminator sees (DiffAugment, Zhao et al. 2020).

On a small training set the discriminator memorizes the real images and its feedback to the
generator degrades. Augmenting the reals and the fakes alike, in the discriminator's loss and the
generator's, keeps it from doing so without teaching the generator to draw the augmentations: the
transforms are differentiable, so the generator's gradient flows back through them. The policies,
ratios and zero fill are the paper's (its DiffAugment_tf.py), in keras.ops for every backend.
"""

from __future__ import annotations

import keras
from keras import ops

TRANSLATION_RATIO = 0.125  # shift by up to 1/8 of the image side (4 pixels on 28x28)
CUTOUT_RATIO = 0.5  # one square of half the image side, zeroed


def diff_augment(images, policies: tuple[str, ...], seed: keras.random.SeedGenerator):
    """Returns `images` (batch, height, width, channels) with each policy applied, fresh randomness per image."""
    for policy in policies:
        images = _TRANSFORMS[policy](images, seed)
    return images


def _uniform(images, seed):
    """Returns one uniform [0, 1) draw per image, shaped to broadcast over it."""
    return keras.random.uniform((ops.shape(images)[0], 1, 1, 1), seed=seed, dtype=images.dtype)


def color(images, seed):
    """Returns images with random brightness, saturation and contrast (saturation is a no-op on one channel)."""
    images = images + (_uniform(images, seed) - 0.5)
    mean = ops.mean(images, axis=3, keepdims=True)
    images = (images - mean) * (_uniform(images, seed) * 2) + mean
    mean = ops.mean(images, axis=(1, 2, 3), keepdims=True)
    return (images - mean) * (_uniform(images, seed) + 0.5) + mean


def translation(images, seed):
    """Returns images shifted by up to TRANSLATION_RATIO of their side each way, zeros filling in."""
    batch, height, width, channels = _shape(images)
    padded = ops.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))  # the one-pixel zero border every shift reads
    rows = _shifted(batch, height, seed)  # (batch, height) rows of `padded`
    cols = _shifted(batch, width, seed)
    padded = ops.take_along_axis(padded, ops.broadcast_to(rows[:, :, None, None], (batch, height, width + 2,
                                                                                     channels)), axis=1)
    return ops.take_along_axis(padded, ops.broadcast_to(cols[:, None, :, None], (batch, height, width, channels)),
                               axis=2)


def _shifted(batch: int, size: int, seed):
    """Returns (batch, size) indices into a side padded by one: each row shifted by its own random offset,
    past either edge onto the zero border."""
    shift = int(size * TRANSLATION_RATIO + 0.5)
    offset = keras.random.randint((batch, 1), -shift, shift + 1, seed=seed)
    return ops.clip(ops.arange(size)[None, :] + offset + 1, 0, size + 1)


def cutout(images, seed):
    """Returns images with one square of CUTOUT_RATIO of their side set to zero, at a random place in each."""
    batch, height, width, _ = _shape(images)
    size_y, size_x = int(height * CUTOUT_RATIO + 0.5), int(width * CUTOUT_RATIO + 0.5)
    center_y = keras.random.randint((batch, 1, 1), 0, height + (1 - size_y % 2), seed=seed)
    center_x = keras.random.randint((batch, 1, 1), 0, width + (1 - size_x % 2), seed=seed)
    y = ops.arange(height)[None, :, None] - center_y + size_y // 2
    x = ops.arange(width)[None, None, :] - center_x + size_x // 2
    inside = (y >= 0) & (y < size_y) & (x >= 0) & (x < size_x)
    return images * ops.cast(~inside, images.dtype)[..., None]


def _shape(images) -> tuple[int, int, int, int]:
    """Returns the static (batch, height, width, channels) of a batch; the batch from the tensor when unknown."""
    batch, height, width, channels = images.shape
    return (ops.shape(images)[0] if batch is None else batch), height, width, channels


_TRANSFORMS = {"color": color, "translation": translation, "cutout": cutout}
