"""The DCGAN's generator and discriminator, shaped by the data rather than hard-coded to 28x28."""

from __future__ import annotations

import keras
import numpy as np
from pathlib import Path

from keras import layers

from pipeline.config import ModelConfig

# The generator doubles the resolution twice (7 -> 14 -> 28 for MNIST), as the TF tutorial does.
UPSAMPLINGS = 2


def build_generator(config: ModelConfig, latent_dim: int, image_shape: tuple[int, int, int]) -> keras.Model:
    """Returns the generator: Dense -> reshape -> Conv2DTranspose + BatchNorm + LeakyReLU ... -> tanh."""
    height, width, channels = image_shape
    scale = 2**UPSAMPLINGS
    if height % scale or width % scale:
        raise ValueError(f"image size {height}x{width} must be divisible by {scale} for the generator")
    dense_filters, *conv_filters = config.generator_filters
    model = keras.Sequential(name="generator")
    model.add(keras.Input(shape=(latent_dim,)))
    # Biases before BatchNorm are cancelled by its mean subtraction, so none (TF tutorial).
    model.add(layers.Dense((height // scale) * (width // scale) * dense_filters, use_bias=False))
    model.add(layers.BatchNormalization())
    model.add(layers.LeakyReLU(negative_slope=config.leaky_relu_slope))
    model.add(layers.Reshape((height // scale, width // scale, dense_filters)))
    for i, filters in enumerate(conv_filters):
        # Only the last hidden layer and the output layer upsample; earlier ones refine at low resolution.
        stride = 2 if i == len(conv_filters) - 1 else 1
        model.add(layers.Conv2DTranspose(filters, config.kernel_size, strides=stride, padding="same",
                                         use_bias=False))
        model.add(layers.BatchNormalization())
        model.add(layers.LeakyReLU(negative_slope=config.leaky_relu_slope))
    model.add(layers.Conv2DTranspose(channels, config.kernel_size, strides=2, padding="same",
                                     activation="tanh"))
    return model


def build_discriminator(config: ModelConfig, image_shape: tuple[int, int, int]) -> keras.Model:
    """Returns the discriminator: strided Conv2D + LeakyReLU + Dropout ... -> one logit."""
    model = keras.Sequential(name="discriminator")
    model.add(keras.Input(shape=image_shape))
    for filters in config.discriminator_filters:
        model.add(layers.Conv2D(filters, config.kernel_size, strides=2, padding="same"))
        model.add(layers.LeakyReLU(negative_slope=config.leaky_relu_slope))
        model.add(layers.Dropout(config.dropout))
    model.add(layers.Flatten())
    model.add(layers.Dense(1))  # a logit: the loss applies the sigmoid, which is more stable
    return model


def build_classifier(image_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Returns the evaluator's digit classifier; its 'features' layer feeds FID."""
    inputs = keras.Input(shape=image_shape)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    features = layers.Dense(128, activation="relu", name="features")(x)
    x = layers.Dropout(0.3)(features)
    logits = layers.Dense(num_classes, name="logits")(x)
    return keras.Model(inputs, logits, name="classifier")


def fixed_noise(seed: int, count: int, latent_dim: int) -> np.ndarray:
    """Returns the same (count, latent_dim) standard normal noise for the same seed."""
    return np.random.default_rng(seed).standard_normal((count, latent_dim)).astype(np.float32)


def generate(generator: keras.Model, noise: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Returns the generator's images in [-1, 1] for `noise`, in inference mode."""
    return np.concatenate([np.asarray(generator.predict_on_batch(noise[i:i + batch_size]))
                           for i in range(0, len(noise), batch_size)])


def load_model(path: Path) -> keras.Model:
    """Returns the model saved at `path`, loaded in Keras' safe mode (no arbitrary code)."""
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}; run the stage that writes it first")
    return keras.saving.load_model(path, compile=False, safe_mode=True)
