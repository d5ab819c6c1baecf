"""DiffAugment (pipeline/augment.py): what each policy does to an image, and that training runs through it."""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import merge
from pipeline import augment
from pipeline.config import AUGMENTATIONS, config_from_dict
from pipeline.paths import TrainOutputs
from pipeline.train import build_gan, train_gan
from test_train import classifier  # noqa: F401 (fixture)


def digits(scaled_digits, count=16) -> np.ndarray:
    return scaled_digits[0][:count]


def shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Returns `image` moved down dy and right dx pixels, zeros where nothing moved in."""
    out = np.zeros_like(image)
    height, width = image.shape[:2]
    out[max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
        image[max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
    return out


def test_every_policy_params_accept_has_a_transform():
    assert set(AUGMENTATIONS) == set(augment._TRANSFORMS)


def test_translation_shifts_each_image_by_at_most_an_eighth_of_its_side_filling_zeros(scaled_digits):
    images = digits(scaled_digits)
    out = ops.convert_to_numpy(augment.translation(ops.convert_to_tensor(images), keras.random.SeedGenerator(0)))
    shifts = []
    for image, moved in zip(images, out):
        matches = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                   if np.array_equal(shifted(image, dy, dx), moved)]
        assert matches, "an output that is no shift of its input by up to 4 pixels"
        shifts.append(matches[0])
    assert len(set(shifts)) > 1  # each image draws its own shift


def test_cutout_zeroes_one_square_of_half_the_side_and_keeps_the_rest(scaled_digits):
    images = digits(scaled_digits)
    out = ops.convert_to_numpy(augment.cutout(ops.convert_to_tensor(images), keras.random.SeedGenerator(0)))
    for image, cut in zip(images, out):
        changed = cut != image
        assert np.all(cut[changed] == 0)
        rows, cols = np.nonzero((cut == 0)[..., 0] & (image != 0)[..., 0])
        assert rows.max() - rows.min() < 14 and cols.max() - cols.min() < 14
    zeroed = [(cut == 0).sum() - (image == 0).sum() for image, cut in zip(images, out)]
    assert max(zeroed) > 14 * 14 // 2  # a square of 14x14 reaches inside the image, not only past its edge


def test_color_changes_brightness_and_contrast_of_each_image_differently(scaled_digits):
    images = digits(scaled_digits)
    out = ops.convert_to_numpy(augment.color(ops.convert_to_tensor(images), keras.random.SeedGenerator(0)))
    brightness = (out - images).mean(axis=(1, 2, 3))
    assert np.ptp(brightness) > 0.1


def test_gradients_flow_back_through_every_policy_to_the_images(scaled_digits):
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("gradient tape: TensorFlow backend")
    images = tf.convert_to_tensor(digits(scaled_digits))
    with tf.GradientTape() as tape:
        tape.watch(images)
        out = augment.diff_augment(images, AUGMENTATIONS, keras.random.SeedGenerator(0))
        loss = tf.reduce_sum(out * out)
    grad = tape.gradient(loss, images).numpy()
    assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_discriminator_judges_augmented_images_when_augment_is_on(tiny_params, scaled_digits):
    images = digits(scaled_digits, 8)
    config = config_from_dict(merge(tiny_params, {"model": {"dropout": 0.0},
                                                  "train": {"augment": ["translation", "cutout"]}}))
    gan = build_gan(config, (28, 28, 1))
    plain = ops.convert_to_numpy(gan.discriminator(images, training=True))
    first, second = (ops.convert_to_numpy(gan._judge(images, None)) for _ in range(2))
    assert not np.allclose(first, plain) and not np.allclose(first, second)


def test_training_with_every_policy_hinge_loss_and_own_discriminator_rate_runs(tiny_params, scaled_digits,
                                                                              classifier, tmp_path):
    config = config_from_dict(merge(tiny_params, {"train": {"augment": list(AUGMENTATIONS), "loss": "hinge",
                                                            "d_lr": 0.0004}}))
    gan, history, fid_history = train_gan(config, scaled_digits[0][:64], scaled_digits[1][:64], classifier,
                                          TrainOutputs(tmp_path), verbose=0)
    assert float(gan.d_optimizer.learning_rate) == pytest.approx(0.0004)
    assert float(gan.g_optimizer.learning_rate) == pytest.approx(config.train.lr)
    assert np.isfinite(history[["d_loss", "g_loss"]].to_numpy()).all() and len(fid_history) == 1


def test_every_policy_keeps_the_shape_of_colour_images():
    # CIFAR-10's shape; the values are arbitrary, a transform's geometry does not depend on them.
    images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    out = augment.diff_augment(ops.convert_to_tensor(images), AUGMENTATIONS, keras.random.SeedGenerator(0))
    assert tuple(out.shape) == images.shape


def test_color_changes_the_saturation_of_colour_images():
    images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    out = ops.convert_to_numpy(augment.color(ops.convert_to_tensor(images), keras.random.SeedGenerator(0)))
    # How far each pixel's channels sit from their mean, per image: brightness and contrast alone keep the ratio
    # of this to the contrast-scaled spread; saturation scales it by a factor of its own per image.
    spread = lambda x: (x - x.mean(axis=3, keepdims=True)).std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3))  # noqa: E731
    assert not np.allclose(spread(out), spread(images), rtol=0.05)
