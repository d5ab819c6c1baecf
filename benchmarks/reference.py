"""The TensorFlow DCGAN tutorial's network and training step, written from its public description.

A yardstick for `pipeline/`: plain TensorFlow/Keras code that imports nothing from the project.

Generator: Dense 7*7*256 (no bias) -> BatchNorm -> LeakyReLU -> Reshape (7, 7, 256)
-> Conv2DTranspose 128 (5x5, stride 1, no bias) -> BatchNorm -> LeakyReLU
-> Conv2DTranspose 64 (5x5, stride 2, no bias) -> BatchNorm -> LeakyReLU
-> Conv2DTranspose 1 (5x5, stride 2, no bias, tanh): a 28x28x1 image in [-1, 1].
Discriminator: Conv2D 64 (5x5, stride 2) -> LeakyReLU -> Dropout 0.3
-> Conv2D 128 (5x5, stride 2) -> LeakyReLU -> Dropout 0.3 -> Flatten -> Dense 1 (a logit).
Loss: binary cross-entropy from logits. One `tf.function` train step updates both models from one
generator pass, with two GradientTapes, exactly as the tutorial does.

Recipes: `tutorial` (Adam 1e-4 for both, batch 256, noise 100) and `tuned` (Adam 2e-4 with
beta_1 0.5, the DCGAN paper's, batch 64, noise 100).

Usage from another benchmark:
    from benchmarks.reference import RECIPES, build, make_train_step, train_for
    generator = train_for(60.0, images, "tuned")   # images: float32 (N, 28, 28, 1) in [-1, 1]
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import layers

IMAGE_SHAPE = (28, 28, 1)


@dataclass(frozen=True)
class Recipe:
    """The optimizer and batch settings of one way to train the reference."""

    lr: float
    beta_1: float
    batch_size: int
    noise_dim: int = 100


RECIPES: dict[str, Recipe] = {
    "tutorial": Recipe(lr=1e-4, beta_1=0.9, batch_size=256),  # Adam(1e-4): Keras' default beta_1 0.9
    "tuned": Recipe(lr=2e-4, beta_1=0.5, batch_size=64),
}


@dataclass
class Reference:
    """The two models and their optimizers; `make_train_step` turns them into a compiled step."""

    generator: keras.Model
    discriminator: keras.Model
    generator_optimizer: keras.optimizers.Optimizer
    discriminator_optimizer: keras.optimizers.Optimizer
    recipe: Recipe


def make_generator_model(noise_dim: int = 100) -> keras.Model:
    """Returns the tutorial's generator: noise (noise_dim,) -> tanh image (28, 28, 1)."""
    return keras.Sequential([
        keras.Input(shape=(noise_dim,)),
        layers.Dense(7 * 7 * 256, use_bias=False),
        layers.BatchNormalization(),
        layers.LeakyReLU(),
        layers.Reshape((7, 7, 256)),
        layers.Conv2DTranspose(128, (5, 5), strides=(1, 1), padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.LeakyReLU(),
        layers.Conv2DTranspose(64, (5, 5), strides=(2, 2), padding="same", use_bias=False),
        layers.BatchNormalization(),
        layers.LeakyReLU(),
        layers.Conv2DTranspose(1, (5, 5), strides=(2, 2), padding="same", use_bias=False, activation="tanh"),
    ], name="reference_generator")


def make_discriminator_model() -> keras.Model:
    """Returns the tutorial's discriminator: image (28, 28, 1) -> one logit."""
    return keras.Sequential([
        keras.Input(shape=IMAGE_SHAPE),
        layers.Conv2D(64, (5, 5), strides=(2, 2), padding="same"),
        layers.LeakyReLU(),
        layers.Dropout(0.3),
        layers.Conv2D(128, (5, 5), strides=(2, 2), padding="same"),
        layers.LeakyReLU(),
        layers.Dropout(0.3),
        layers.Flatten(),
        layers.Dense(1),
    ], name="reference_discriminator")


def build(recipe: str | Recipe = "tutorial") -> Reference:
    """Returns fresh models and Adam optimizers for `recipe` (a name in RECIPES or a Recipe)."""
    r = RECIPES[recipe] if isinstance(recipe, str) else recipe
    return Reference(generator=make_generator_model(r.noise_dim),
                     discriminator=make_discriminator_model(),
                     generator_optimizer=keras.optimizers.Adam(r.lr, beta_1=r.beta_1),
                     discriminator_optimizer=keras.optimizers.Adam(r.lr, beta_1=r.beta_1),
                     recipe=r)


cross_entropy = keras.losses.BinaryCrossentropy(from_logits=True)


def discriminator_loss(real_output, fake_output):
    real_loss = cross_entropy(tf.ones_like(real_output), real_output)
    fake_loss = cross_entropy(tf.zeros_like(fake_output), fake_output)
    return real_loss + fake_loss


def generator_loss(fake_output):
    return cross_entropy(tf.ones_like(fake_output), fake_output)


def make_train_step(ref: Reference, jit_compile: bool = False):
    """Returns the tutorial's compiled train step: `step(images) -> (gen_loss, disc_loss)`.

    `jit_compile=True` compiles it with XLA. Each call traces once per batch shape.
    """
    generator, discriminator = ref.generator, ref.discriminator
    noise_dim = ref.recipe.noise_dim

    @tf.function(jit_compile=jit_compile)
    def train_step(images):
        noise = tf.random.normal([tf.shape(images)[0], noise_dim])
        with tf.GradientTape() as gen_tape, tf.GradientTape() as disc_tape:
            generated_images = generator(noise, training=True)
            real_output = discriminator(images, training=True)
            fake_output = discriminator(generated_images, training=True)
            gen_loss = generator_loss(fake_output)
            disc_loss = discriminator_loss(real_output, fake_output)
        gradients_of_generator = gen_tape.gradient(gen_loss, generator.trainable_variables)
        gradients_of_discriminator = disc_tape.gradient(disc_loss, discriminator.trainable_variables)
        ref.generator_optimizer.apply_gradients(zip(gradients_of_generator, generator.trainable_variables))
        ref.discriminator_optimizer.apply_gradients(zip(gradients_of_discriminator,
                                                        discriminator.trainable_variables))
        return gen_loss, disc_loss

    return train_step


def as_images(images: np.ndarray) -> np.ndarray:
    """Returns `images` as float32 (N, 28, 28, 1), checking the shape and the [-1, 1] range."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(f"expected images of shape (N, 28, 28) or (N, 28, 28, 1), got {images.shape}")
    if x.size and (x.min() < -1.0 - 1e-6 or x.max() > 1.0 + 1e-6):
        raise ValueError(f"expected images scaled to [-1, 1], got values in [{x.min()}, {x.max()}]")
    return x


def make_dataset(images: np.ndarray, batch_size: int, shuffle: bool = True, seed: int | None = None) -> tf.data.Dataset:
    """Returns the endless batched dataset: reshuffled each pass (tutorial), full batches only.

    Full batches keep one static shape, so the step traces (and XLA compiles) once.
    """
    ds = tf.data.Dataset.from_tensor_slices(images)
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    return ds.repeat().batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def train_for(seconds: float, images: np.ndarray, recipe: str | Recipe = "tutorial", *, jit_compile: bool = False,
              seed: int | None = None) -> keras.Model:
    """Trains a fresh reference on `images` for a wall-clock budget and returns its generator.

    `images`: float32 (N, 28, 28[, 1]) scaled to [-1, 1], N >= the recipe's batch size. The budget
    counts from the call, tracing and compilation included, and is checked after every step, so
    training stops at the first step that ends past it (at least one step always runs).
    """
    return train_snapshots([seconds], images, recipe, jit_compile=jit_compile, seed=seed)[0]


def train_snapshots(budgets: list[float], images: np.ndarray, recipe: str | Recipe = "tutorial", *,
                    jit_compile: bool = False, seed: int | None = None) -> list[keras.Model]:
    """Returns copies of one reference's generator taken as each budget (seconds) runs out, as train_for's.

    One training serves every budget: the recipe has no schedule, so the snapshot after t seconds is
    what a separate train_for(t) would have returned.
    """
    start = time.perf_counter()
    r = RECIPES[recipe] if isinstance(recipe, str) else recipe
    x = as_images(images)
    if len(x) < r.batch_size:
        raise ValueError(f"{len(x)} images are fewer than one batch of {r.batch_size}")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    ref = build(r)
    step = make_train_step(ref, jit_compile=jit_compile)
    pending, taken = sorted(set(budgets)), {}
    for batch in make_dataset(x, r.batch_size, seed=seed):
        gen_loss, _ = step(batch)
        while pending and time.perf_counter() - start >= pending[0]:
            float(gen_loss)  # waits for the last step
            copy = keras.models.clone_model(ref.generator)
            copy.set_weights(ref.generator.get_weights())
            taken[pending.pop(0)] = copy
        if not pending:
            break
    return [taken[budget] for budget in budgets]
