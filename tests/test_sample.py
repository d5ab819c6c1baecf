"""sample: a fixed seed gives the same uint8 NHWC images, a grid and an interpolation strip."""

import numpy as np
import pytest

from pipeline.models import build_generator
from pipeline.sample import interpolation_strip, sample_images, slerp, write_samples


@pytest.fixture
def generator(tiny_config):
    return build_generator(tiny_config.model, tiny_config.train.latent_dim, (28, 28, 1))


@pytest.mark.numerics
def test_samples_are_uint8_nhwc_and_repeat_for_the_same_seed(generator):
    first = sample_images(generator, 8, seed=3)
    assert first.dtype == np.uint8 and first.shape == (8, 28, 28, 1)
    np.testing.assert_array_equal(first, sample_images(generator, 8, seed=3))
    assert not np.array_equal(first, sample_images(generator, 8, seed=4))


def test_slerp_runs_from_a_to_b():
    a, b = np.array([1.0, 0.0]), np.array([0.0, 2.0])
    path = slerp(a, b, 5)
    np.testing.assert_allclose(path[0], a, atol=1e-12)
    np.testing.assert_allclose(path[-1], b, atol=1e-12)
    assert len(path) == 5


def test_interpolation_strip_has_one_image_per_step(generator):
    assert interpolation_strip(generator, 6, seed=0).shape == (6, 28, 28, 1)


def test_write_samples_writes_npz_grid_and_strip(generator, tiny_config, tmp_path):
    npz, grid, strip = tmp_path / "s.npz", tmp_path / "grid.png", tmp_path / "strip.png"
    write_samples(generator, tiny_config, npz, grid, strip)
    with np.load(npz, allow_pickle=False) as f:
        assert f["images"].shape == (tiny_config.sample.count, 28, 28, 1) and f["images"].dtype == np.uint8
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and strip.exists()
