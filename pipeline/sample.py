"""Sampling a trained generator: an image set, a grid and a latent interpolation, all from fixed seeds."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from pipeline.config import Config
from pipeline.files import atomic_path
from pipeline.images import save_png, tile, to_uint8
from pipeline.models import fixed_noise, generate


def slerp(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """Returns `steps` points on the great circle from a to b, which keeps Gaussian noise at its typical norm."""
    omega = np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))
    t = np.linspace(0.0, 1.0, steps)[:, None]
    if omega < 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def sample_images(generator: keras.Model, count: int, seed: int) -> np.ndarray:
    """Returns `count` generated uint8 NHWC images; the same seed gives the same images."""
    return to_uint8(generate(generator, fixed_noise(seed, count, generator.input_shape[-1])))


def interpolation_strip(generator: keras.Model, steps: int, seed: int) -> np.ndarray:
    """Returns uint8 images along the slerp between two fixed latent points."""
    a, b = fixed_noise(seed + 1, 2, generator.input_shape[-1])
    return to_uint8(generate(generator, slerp(a, b, steps).astype(np.float32)))


def write_samples(generator: keras.Model, config: Config, npz_path: Path, grid_path: Path,
                  interpolation_path: Path) -> np.ndarray:
    """Returns the sampled images after writing them as an npz, a PNG grid and an interpolation PNG."""
    images = sample_images(generator, config.sample.count, config.seed)
    with atomic_path(npz_path) as tmp:
        np.savez_compressed(tmp, images=images)
    side = config.sample.grid_size
    grid_images = sample_images(generator, side * side, config.seed)
    save_png(grid_path, tile(grid_images, side))
    strip = interpolation_strip(generator, config.sample.interpolation_steps, config.seed)
    save_png(interpolation_path, tile(strip, len(strip)))
    return images
