"""The GANs' generators and discriminators, shaped by the data rather than hard-coded to 28x28.

Three architectures (`model.arch`): the seeds' DCGAN, the classic fully-connected GAN of the
Keras examples, and a class-conditional DCGAN whose models take a class label as a second input.
"""

from __future__ import annotations

import errno
import math
import zipfile
from pathlib import Path

import keras
import numpy as np
from keras import layers

from pipeline.config import ClassifierConfig, ModelConfig
from pipeline.errors import PipelineError
from pipeline.fused import BatchNormalization, Conv2D, Conv2DTranspose
from pipeline.spectral_norm import SpectralConv2D, SpectralDense

# The generator doubles the resolution twice (7 -> 14 -> 28 for MNIST, 8 -> 16 -> 32 for CIFAR-10).
UPSAMPLINGS = 2
# Every supported dataset has ten classes.
NUM_CLASSES = 10


def build_generator(config: ModelConfig, latent_dim: int, image_shape: tuple[int, int, int]) -> keras.Model:
    """Returns the generator of `config.arch`: noise (and, for cdcgan, a class label) -> tanh image."""
    noise = keras.Input(shape=(latent_dim,), name="noise")
    if config.arch == "mlp":
        return keras.Model(noise, _mlp_generator(noise, config, image_shape), name="generator")
    if config.arch == "cdcgan":
        label = keras.Input(shape=(1,), dtype="int32", name="label")
        embedded = layers.Flatten()(layers.Embedding(NUM_CLASSES, config.label_embedding)(label))
        joined = layers.Concatenate()([noise, embedded])
        return keras.Model([noise, label], _dcgan_generator(joined, config, image_shape), name="generator")
    return keras.Model(noise, _dcgan_generator(noise, config, image_shape), name="generator")


def build_discriminator(config: ModelConfig, image_shape: tuple[int, int, int]) -> keras.Model:
    """Returns the discriminator of `config.arch`: image (and, for cdcgan, a class label) -> one logit."""
    image = keras.Input(shape=image_shape, name="image")
    if config.arch == "mlp":
        return keras.Model(image, _mlp_discriminator(image, config), name="discriminator")
    if config.arch == "cdcgan":
        label = keras.Input(shape=(1,), dtype="int32", name="label")
        height, width, _ = image_shape
        # The label as one extra image channel, so the first convolution already sees it.
        plane = layers.Embedding(NUM_CLASSES, height * width)(label)
        plane = layers.Reshape((height, width, 1))(plane)
        joined = layers.Concatenate()([image, plane])
        return keras.Model([image, label], _dcgan_discriminator(joined, config), name="discriminator")
    return keras.Model(image, _dcgan_discriminator(image, config), name="discriminator")


def _dcgan_generator(x, config: ModelConfig, image_shape: tuple[int, int, int]):
    height, width, channels = image_shape
    scale = 2**UPSAMPLINGS
    if height % scale or width % scale:
        raise ValueError(f"image size {height}x{width} must be divisible by {scale} for the generator")
    dense_filters, *conv_filters = config.generator_filters
    # Biases before BatchNorm are cancelled by its mean subtraction, so none (TF tutorial).
    x = layers.Dense((height // scale) * (width // scale) * dense_filters, use_bias=False)(x)
    x = BatchNormalization()(x)
    x = layers.LeakyReLU(negative_slope=config.leaky_relu_slope)(x)
    x = layers.Reshape((height // scale, width // scale, dense_filters))(x)
    for i, filters in enumerate(conv_filters):
        # Only the last hidden layer and the output layer upsample; earlier ones refine at low resolution.
        stride = 2 if i == len(conv_filters) - 1 else 1
        x = Conv2DTranspose(filters, config.kernel_size, strides=stride, padding="same", use_bias=False)(x)
        x = BatchNormalization()(x)
        x = layers.LeakyReLU(negative_slope=config.leaky_relu_slope)(x)
    return Conv2DTranspose(channels, config.kernel_size, strides=2, padding="same", activation="tanh")(x)


def _discriminator_layers(config: ModelConfig) -> tuple[type, type]:
    """Returns the discriminator's Conv2D and Dense classes: spectrally normalized when `model.spectral_norm`."""
    return (SpectralConv2D, SpectralDense) if config.spectral_norm else (Conv2D, layers.Dense)


def _dcgan_discriminator(x, config: ModelConfig):
    conv, dense = _discriminator_layers(config)
    for filters in config.discriminator_filters:
        x = conv(filters, config.kernel_size, strides=2, padding="same")(x)
        x = layers.LeakyReLU(negative_slope=config.leaky_relu_slope)(x)
        x = layers.Dropout(config.dropout)(x)
    return dense(1)(layers.Flatten()(x))  # a logit: the loss applies the sigmoid, more stably


def _mlp_generator(x, config: ModelConfig, image_shape: tuple[int, int, int]):
    for units in config.mlp_generator_units:
        x = layers.Dense(units)(x)
        x = layers.LeakyReLU(negative_slope=config.leaky_relu_slope)(x)
        x = BatchNormalization(momentum=config.mlp_batchnorm_momentum)(x)
    x = layers.Dense(math.prod(image_shape), activation="tanh")(x)
    return layers.Reshape(image_shape)(x)


def _mlp_discriminator(x, config: ModelConfig):
    _, dense = _discriminator_layers(config)
    x = layers.Flatten()(x)
    for units in config.mlp_discriminator_units:
        x = dense(units)(x)
        x = layers.LeakyReLU(negative_slope=config.leaky_relu_slope)(x)
    return dense(1)(x)


def build_classifier(config: ClassifierConfig, image_shape: tuple[int, int, int]) -> keras.Model:
    """Returns the evaluator's classifier; its 'features' layer feeds FID and the other metrics."""
    inputs = keras.Input(shape=image_shape)
    x = inputs
    for filters in config.filters:
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    features = layers.Dense(config.features, activation="relu", name="features")(x)
    x = layers.Dropout(0.3)(features)
    logits = layers.Dense(NUM_CLASSES, name="logits")(x)
    return keras.Model(inputs, logits, name="classifier")


def is_conditional(model: keras.Model) -> bool:
    """Returns whether the model takes a class label beside its image or noise input."""
    return len(model.inputs) == 2


def latent_dim_of(generator: keras.Model) -> int:
    """Returns the width of the generator's noise input."""
    return int(generator.inputs[0].shape[-1])


def balanced_labels(count: int) -> np.ndarray:
    """Returns `count` class labels cycling 0..9, the same share of every class."""
    return (np.arange(count) % NUM_CLASSES).astype(np.int32)


def fixed_noise(seed: int, count: int, latent_dim: int) -> np.ndarray:
    """Returns the same (count, latent_dim) standard normal noise for the same seed."""
    return np.random.default_rng(seed).standard_normal((count, latent_dim)).astype(np.float32)


def generate(generator: keras.Model, noise: np.ndarray, labels: np.ndarray | None = None,
             batch_size: int = 500) -> np.ndarray:
    """Returns the generator's images in [-1, 1] for `noise`, in inference mode.

    A conditional generator gets `labels`, or balanced labels when none are given.
    """
    if is_conditional(generator) and labels is None:
        labels = balanced_labels(len(noise))
    out = []
    for i in range(0, len(noise), batch_size):
        inputs = noise[i:i + batch_size]
        if is_conditional(generator):
            inputs = [inputs, labels[i:i + batch_size, None]]
        out.append(np.asarray(generator.predict_on_batch(inputs)))
    return np.concatenate(out)


class ModelFileError(PipelineError):
    """A model file that Keras cannot load, or that its safe mode refuses because it holds code."""


def load_model(path: Path) -> keras.Model:
    """Returns the model saved at `path`, loaded in Keras' safe mode (no arbitrary code).

    Raises FileNotFoundError (filename set) when there is none, ModelFileError when the file is not one of ours.
    """
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no model file", str(path))
    # Every stage that saves a model is a DVC stage, so DVC's cache holds the pipeline's own copy of the file.
    fix = f"put back the pipeline's own file with `dvc checkout --force {path}`, or rebuild it with `dvc repro`"
    try:
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except ValueError as e:
        if "safe_mode" not in str(e):
            raise ModelFileError(f"{path} is not a Keras model file that loads ({_first_sentence(e)}); {fix}") from e
        # Keras' own message suggests turning safe mode off: never, for a file this pipeline did not write.
        raise ModelFileError(f"{path} holds Python code (e.g. a Lambda layer), which this pipeline never saves, "
                             f"so it was not loaded; {fix}") from None
    except (OSError, KeyError, TypeError, zipfile.BadZipFile) as e:  # h5py, a config naming no known class
        raise ModelFileError(f"{path} is not a Keras model file that loads ({_first_sentence(e)}); {fix}") from e


def _first_sentence(error: Exception) -> str:
    """Returns the first sentence of `error`'s message, on one line."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(". ")[0].rstrip(".")
