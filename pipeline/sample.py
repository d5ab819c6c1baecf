"""Sampling a trained generator: an image set, a grid and a latent interpolation, all from fixed seeds."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from pipeline.config import Config
from pipeline.files import atomic_path
from pipeline.images import save_png, tile, to_uint8
from pipeline.models import (NUM_CLASSES, balanced_labels, fixed_noise, generate, is_conditional,
                             latent_dim_of)


def slerp(a: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """Returns `steps` points on the great circle from a to b, which keeps Gaussian noise at its typical norm."""
    omega = np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1.0, 1.0))
    t = np.linspace(0.0, 1.0, steps)[:, None]
    if omega < 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def sample_images(generator: keras.Model, count: int, seed: int,
                  labels: np.ndarray | None = None) -> np.ndarray:
    """Returns `count` generated uint8 NHWC images; the same seed gives the same images.

    A conditional generator draws the classes in `labels`, or every class in turn.
    """
    return to_uint8(generate(generator, fixed_noise(seed, count, latent_dim_of(generator)), labels))


def grid_images(generator: keras.Model, side: int, seed: int) -> tuple[np.ndarray, int]:
    """Returns images for the PNG grid and its column count: one row per class when conditional."""
    if not is_conditional(generator):
        return sample_images(generator, side * side, seed), side
    # The same noise in every row, so a column shows one "style" across all classes.
    noise = np.tile(fixed_noise(seed, side, latent_dim_of(generator)), (NUM_CLASSES, 1))
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), side)
    return to_uint8(generate(generator, noise, labels)), side


def interpolation_strip(generator: keras.Model, steps: int, seed: int) -> np.ndarray:
    """Returns uint8 images along the slerp between two fixed latent points (class 0 when conditional)."""
    a, b = fixed_noise(seed + 1, 2, latent_dim_of(generator))
    return to_uint8(generate(generator, slerp(a, b, steps).astype(np.float32), np.zeros(steps, np.int32)))


def write_samples(generator: keras.Model, config: Config, npz_path: Path, grid_path: Path,
                  interpolation_path: Path) -> np.ndarray:
    """Returns the sampled images after writing them as an npz, a PNG grid and an interpolation PNG."""
    images = sample_images(generator, config.sample.count, config.seed)
    arrays = {"images": images}
    if is_conditional(generator):
        arrays["labels"] = balanced_labels(config.sample.count)
    with atomic_path(npz_path) as tmp:
        np.savez_compressed(tmp, **arrays)
    grid, cols = grid_images(generator, config.sample.grid_size, config.seed)
    save_png(grid_path, tile(grid, cols))
    strip = interpolation_strip(generator, config.sample.interpolation_steps, config.seed)
    save_png(interpolation_path, tile(strip, len(strip)))
    return images
