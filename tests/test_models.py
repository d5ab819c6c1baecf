"""Generator and discriminator shapes follow the data; outputs are tanh images and one logit."""

import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.models import build_discriminator, build_generator

CONFIG = ModelConfig(generator_filters=(16, 8, 4), discriminator_filters=(8, 16), kernel_size=5,
                     dropout=0.3, leaky_relu_slope=0.2)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_generator_maps_noise_to_images_in_tanh_range(shape):
    generator = build_generator(CONFIG, latent_dim=10, image_shape=shape)
    images = np.asarray(generator(np.random.default_rng(0).standard_normal((3, 10)) * 10, training=False))
    assert images.shape == (3, *shape)
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_generator_follows_the_seed_layout():
    layers = [layer.__class__.__name__ for layer in build_generator(CONFIG, 10, (28, 28, 1)).layers]
    assert layers[:4] == ["Dense", "BatchNormalization", "LeakyReLU", "Reshape"]
    assert layers.count("Conv2DTranspose") == 3 and layers[-1] == "Conv2DTranspose"


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_discriminator_gives_one_logit_per_image(shape):
    discriminator = build_discriminator(CONFIG, shape)
    logits = np.asarray(discriminator(np.zeros((5, *shape), np.float32), training=False))
    assert logits.shape == (5, 1)
    kinds = {layer.__class__.__name__ for layer in discriminator.layers}
    assert {"Conv2D", "LeakyReLU", "Dropout", "Dense"} <= kinds


def test_generator_refuses_a_size_it_cannot_reach():
    with pytest.raises(ValueError, match="30x30 must be divisible by 4"):
        build_generator(CONFIG, 10, (30, 30, 1))
