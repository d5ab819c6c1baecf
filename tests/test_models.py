"""Generators and discriminators of every architecture follow the data's shape; tanh images and one logit."""

import dataclasses

import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.models import build_discriminator, build_generator, generate, is_conditional

CONFIG = ModelConfig(arch="dcgan", generator_filters=(16, 8, 4), discriminator_filters=(8, 16), kernel_size=5,
                     dropout=0.3, spectral_norm=False, leaky_relu_slope=0.2, mlp_generator_units=(32, 64),
                     mlp_discriminator_units=(64, 32), mlp_batchnorm_momentum=0.8, label_embedding=8)
SHAPES = [(28, 28, 1), (32, 32, 3)]


def config_for(arch: str) -> ModelConfig:
    return dataclasses.replace(CONFIG, arch=arch)


@pytest.mark.parametrize("arch", ["dcgan", "mlp", "cdcgan"])
@pytest.mark.parametrize("shape", SHAPES)
def test_generator_maps_noise_to_images_in_tanh_range(arch, shape):
    generator = build_generator(config_for(arch), latent_dim=10, image_shape=shape)
    images = generate(generator, np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32) * 10)
    assert images.shape == (3, *shape)
    assert images.min() >= -1.0 and images.max() <= 1.0


@pytest.mark.parametrize("arch", ["dcgan", "mlp", "cdcgan"])
@pytest.mark.parametrize("shape", SHAPES)
def test_discriminator_gives_one_logit_per_image(arch, shape):
    discriminator = build_discriminator(config_for(arch), shape)
    images = np.zeros((5, *shape), np.float32)
    inputs = [images, np.arange(5)[:, None]] if is_conditional(discriminator) else images
    assert np.asarray(discriminator(inputs, training=False)).shape == (5, 1)


def test_dcgan_generator_follows_the_seed_layout():
    layers = [layer.__class__.__name__ for layer in build_generator(CONFIG, 10, (28, 28, 1)).layers]
    assert layers[1:5] == ["Dense", "BatchNormalization", "LeakyReLU", "Reshape"]
    assert layers.count("Conv2DTranspose") == 3 and layers[-1] == "Conv2DTranspose"


def test_dcgan_discriminator_is_strided_convolutions_with_dropout():
    kinds = {layer.__class__.__name__ for layer in build_discriminator(CONFIG, (28, 28, 1)).layers}
    assert {"Conv2D", "LeakyReLU", "Dropout", "Dense"} <= kinds


def test_dcgan_for_cifar_starts_from_8x8():
    generator = build_generator(dataclasses.replace(CONFIG, generator_filters=(256, 128, 64)), 128, (32, 32, 3))
    reshape = next(layer for layer in generator.layers if layer.__class__.__name__ == "Reshape")
    assert tuple(reshape.output.shape[1:]) == (8, 8, 256)


def test_mlp_is_fully_connected_with_the_configured_widths():
    generator = build_generator(config_for("mlp"), 10, (28, 28, 1))
    dense = [layer.units for layer in generator.layers if layer.__class__.__name__ == "Dense"]
    assert dense == [32, 64, 28 * 28]
    assert {layer.momentum for layer in generator.layers if layer.__class__.__name__ == "BatchNormalization"} == {0.8}
    assert not any("Conv" in layer.__class__.__name__ for layer in build_discriminator(config_for("mlp"), (28, 28, 1)).layers)


def test_conditional_generator_draws_different_images_for_different_classes():
    generator = build_generator(config_for("cdcgan"), 10, (28, 28, 1))
    noise = np.ones((2, 10), np.float32)
    images = generate(generator, noise, labels=np.array([3, 7], np.int32))
    assert not np.allclose(images[0], images[1])


def test_generator_refuses_a_size_it_cannot_reach():
    with pytest.raises(ValueError, match="30x30 must be divisible by 4"):
        build_generator(CONFIG, 10, (30, 30, 1))
