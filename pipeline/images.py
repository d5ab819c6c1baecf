"""Image conversion and PNG grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.files import atomic_path


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Returns images in [-1, 1] as uint8 in [0, 255], the same NHWC shape."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def tile(images: np.ndarray, cols: int, pad: int = 2) -> np.ndarray:
    """Returns uint8 NHWC images tiled row by row into one HWC image, `cols` per row."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[y:y + h, x:x + w] = image
    return canvas


def save_png(path: Path, image: np.ndarray, scale: int = 2) -> None:
    """Writes one uint8 HWC image as a PNG, enlarged `scale` times with nearest-neighbour, atomically."""
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
