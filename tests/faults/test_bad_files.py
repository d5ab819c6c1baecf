"""Bad data files: truncated, malformed, mis-shaped or mis-typed input is a DataError naming the file.

Examples pin down the message for each kind of damage; property-based tests then feed random bytes,
random damage to valid files and npz files of arbitrary arrays to every parser, and require each
either to return arrays that pass validation or to raise DataError naming the file: never another
exception, a hang, a huge allocation or silent garbage.
"""

import contextlib
import gzip
import io
import signal
import struct
import tempfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline import data

# Bounded runs: about 150 examples each; no per-example deadline (a shared machine may be slow at any
# moment; a hang is caught per file, below); no example database, so nothing is written into the repository.
FUZZ = settings(max_examples=150, deadline=None, database=None)
SECONDS_PER_FILE = 30  # a parser taking longer on a few kilobytes has hung (ms on a quiet machine)


# --- valid files, small enough to fuzz quickly --------------------------------------------------


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random 28x28 uint8 images with labels 0..9: format-identical to MNIST, not real digits."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def npz_bytes(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def mnist_npz(compressed: bool = False) -> bytes:
    """Returns an npz in the layout of Keras' mnist.npz: x_train, y_train, x_test, y_test."""
    (x, y) = digits(8)
    return npz_bytes(compressed, x_train=x[:6], y_train=y[:6], x_test=x[6:], y_test=y[6:])


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """Returns `array` in the IDX format: big-endian magic number, one uint32 per dimension, the bytes."""
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def cifar_bytes(n: int) -> bytes:
    """Returns n CIFAR-10 binary records: per image 1 label byte, then 3 x 32 x 32 pixel bytes."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    return np.concatenate([(np.arange(n) % 10).astype(np.uint8)[:, None], pixels], axis=1).tobytes()


def split_npz() -> bytes:
    """Returns a processed split as normalize writes it: float32 NHWC in [-1, 1], int32 labels."""
    x, y = digits(6)
    return npz_bytes(images=data.scale_images(x), labels=y.astype(np.int32))


MNIST_NPZ, MNIST_NPZ_COMPRESSED = mnist_npz(), mnist_npz(compressed=True)
IDX_IMAGES, IDX_LABELS = idx_bytes(digits(5)[0], 2051), idx_bytes(digits(5)[1], 2049)
CIFAR = cifar_bytes(3)
SPLIT = split_npz()


@contextlib.contextmanager
def file_holding(content: bytes, name: str):
    """Yields the path of a fresh file holding `content`, removed afterwards."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        yield path


@contextlib.contextmanager
def within(seconds: int):
    """Fails the block if it runs longer than `seconds`: a parser must not hang on any input."""
    def hung(signum, frame):
        raise AssertionError(f"still parsing after {seconds} s: the parser hangs")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def valid_or_refused(parse, *paths: Path):
    """Returns parse(*paths), or None if it raised a DataError naming one of `paths`; anything else fails."""
    try:
        with within(SECONDS_PER_FILE):
            return parse(*paths)
    except data.DataError as e:
        assert any(str(p) in str(e) for p in paths), f"the error does not name the file: {e}"
        return None


def assert_images_or_refused(parse, *paths: Path) -> None:
    """parse(*paths) returns (images, labels) that pass validate_images, or refuses the file."""
    result = valid_or_refused(parse, *paths)
    if result is not None:
        images, labels = result
        data.validate_images(images, labels, str(paths[0]))


def assert_split_or_refused(path: Path) -> None:
    """load_split returns float32 NHWC images in [-1, 1] with one label 0..9 each, or refuses the file."""
    result = valid_or_refused(data.load_split, path)
    if result is not None:
        images, labels = result
        assert images.dtype == np.float32 and images.ndim == 4 and min(images.shape[1:3]) >= 4
        assert labels.ndim == 1 and len(labels) == len(images) and np.issubdtype(labels.dtype, np.integer)
        assert np.all((images >= -1.0) & (images <= 1.0))  # False for NaN
        assert np.all((labels >= 0) & (labels <= 9))


# --- strategies -------------------------------------------------------------------------------


@st.composite
def damaged(draw, valid: bytes) -> bytes:
    """Returns `valid` with bytes overwritten, inserted or deleted, maybe cut short: how files get damaged."""
    content = bytearray(valid)
    for _ in range(draw(st.integers(0, 4))):
        # Headers sit at the start (IDX, npy, zip entries) and the end (the zip directory): aim there too.
        end = max(len(content) - 1, 0)
        at = draw(st.one_of(st.integers(0, min(end, 128)), st.integers(max(end - 128, 0), end),
                            st.integers(0, end)))
        action = draw(st.sampled_from(["overwrite", "insert", "delete"]))
        if action == "overwrite" and content:
            content[at] = draw(st.integers(0, 255))
        elif action == "insert":
            content[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del content[at:at + draw(st.integers(1, 16))]
    if draw(st.booleans()):
        content = content[: draw(st.integers(0, len(content)))]
    return bytes(content)


noise = st.binary(max_size=4096)
# The shapes and dtypes a wrong file might hold, valid ones among them.
any_array = st.sampled_from(["u1", "i1", "u2", ">i4", "i8", "f4", "f8", "?", "c8", "U2", "M8[s]",
                             [("a", "u1"), ("b", "f4")]]).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)))
images_like = hnp.arrays(np.uint8, st.tuples(st.integers(0, 4), st.integers(0, 6), st.integers(0, 6)))
labels_like = st.sampled_from([np.uint8, np.int8, np.int64]).flatmap(lambda dtype: hnp.arrays(
    dtype, st.integers(0, 4).map(lambda n: (n,)), elements=st.integers(0 if dtype == np.uint8 else -1, 11)))


# --- mnist-format npz (load_raw) --------------------------------------------------------------


@pytest.mark.parametrize("content, message", [
    (b"", "not a readable npz file (starts with b'', not a zip header)"),
    (b"<html>503 Service Unavailable</html>", "not a readable npz file (starts with b'<htm', not a zip header)"),
    (MNIST_NPZ[: len(MNIST_NPZ) // 2], "not a readable npz file (BadZipFile"),
    (MNIST_NPZ_COMPRESSED[:-30], "not a readable npz file (BadZipFile"),
], ids=["empty", "html", "truncated", "truncated-compressed"])
def test_npz_that_is_not_a_readable_zip_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "mnist.npz"
    path.write_bytes(content)
    with pytest.raises(data.MalformedFile) as error:
        data.load_raw(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_a_bare_npy_file_is_not_taken_for_an_npz(tmp_path):
    path = tmp_path / "mnist.npz"
    np.save(path.with_suffix(".npy"), digits(3)[0])
    path.with_suffix(".npy").rename(path)
    with pytest.raises(data.MalformedFile) as error:
        data.load_raw(path)
    npy_magic = np.lib.format.MAGIC_PREFIX[:4]
    assert str(error.value) == f"{path}: not a readable npz file (starts with {npy_magic!r}, not a zip header)"


def bad_mnist(**changes: np.ndarray) -> dict:
    (x, y) = digits(8)
    return {"x_train": x[:6], "y_train": y[:6], "x_test": x[6:], "y_test": y[6:], **changes}


@pytest.mark.parametrize("arrays, message", [
    (bad_mnist(x_train=digits(6)[0].astype(np.float32)), "x_train must be uint8 images of shape (N, H, W), "
                                                         "got float32 (6, 28, 28)"),
    (bad_mnist(x_test=digits(2)[0].reshape(2, -1)), "x_test must be uint8 images of shape (N, H, W), "
                                                    "got uint8 (2, 784)"),
    (bad_mnist(x_train=np.uint8(7)), "x_train must be uint8 images of shape (N, H, W), got uint8 ()"),
    (bad_mnist(y_train=digits(5)[1]), "y_train must hold one integer label for each of the 6 images of "
                                      "x_train, got uint8 (5,)"),
    (bad_mnist(y_test=np.zeros((2, 1), np.uint8)), "y_test must hold one integer label for each of the 2 "
                                                   "images of x_test, got uint8 (2, 1)"),
    (bad_mnist(y_train=np.zeros(6, np.float32)), "y_train must hold one integer label for each of the 6 "
                                                 "images of x_train, got float32 (6,)"),
    (bad_mnist(x_test=np.zeros((2, 27, 27), np.uint8)), "x_test images are (27, 27), x_train images (28, 28)"),
    (bad_mnist(y_test=np.array([3, 12], np.uint8)), "labels must lie in 0..9, got 0..12"),
    (bad_mnist(x_train=np.zeros((6, 2, 2), np.uint8), x_test=np.zeros((2, 2, 2), np.uint8)), "images must have "
                                                                                           "shape (N, H, W)"),
], ids=["float-images", "flat-images", "scalar-images", "label-count", "2d-labels", "float-labels",
        "test-size", "label-range", "tiny-images"])
def test_npz_of_wrong_shapes_or_dtypes_is_refused_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.DataError) as error:
        data.load_raw(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def forged_npz(path: Path, shape: tuple, stored: bytes, compression: int = zipfile.ZIP_STORED) -> None:
    """Writes an mnist npz whose x_train header claims `shape` of uint8 but whose data is `stored`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("x_train.npy", header.getvalue() + stored)
        for key, array in bad_mnist().items():
            if key != "x_train":
                archive.writestr(f"{key}.npy", npz_member(array))


def npz_member(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def peak_bytes_of(call) -> int:
    """Returns the most memory Python and numpy held at once during `call()`."""
    tracemalloc.start()
    try:
        call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_npz_header_claiming_more_bytes_than_stored_is_refused_before_allocating(tmp_path):
    path = tmp_path / "mnist.npz"
    forged_npz(path, (2_000_000, 28, 28), b"\0" * 1000)  # 1.5 GB claimed, 1 kB there

    def load():
        with pytest.raises(data.MalformedFile, match=f"^{path}: array x_train's header claims uint8 "
                                                     r"\(2000000, 28, 28\), 1568000000 bytes, but 1000 bytes"):
            data.load_raw(path)
    assert peak_bytes_of(load) < 10_000_000


def test_npz_member_claiming_more_than_deflate_can_expand_is_refused(tmp_path):
    path = tmp_path / "mnist.npz"
    forged_npz(path, (4, 28, 28), bytes(4 * 28 * 28), zipfile.ZIP_DEFLATED)
    content = bytearray(path.read_bytes())
    # Raise x_train's uncompressed size in the zip directory, as a flipped bit there would.
    entry = content.index(b"PK\x01\x02")
    content[entry + 24:entry + 28] = struct.pack("<I", 3_000_000_000)
    path.write_bytes(bytes(content))
    with pytest.raises(data.MalformedFile, match=f"^{path}: array x_train claims 3000000000 bytes, more than"):
        data.load_raw(path)


def test_missing_npz_is_a_data_error_naming_it(tmp_path):
    with pytest.raises(data.DataError, match=f"^{tmp_path / 'mnist.npz'}: missing"):
        data.load_raw(tmp_path / "mnist.npz")


@FUZZ
@given(noise)
def test_random_bytes_as_mnist_npz_are_refused_or_valid(content):
    with file_holding(content, "mnist.npz") as path:
        assert_images_or_refused(data.load_raw, path)


@FUZZ
@given(st.binary(max_size=2048).map(lambda tail: b"PK\x03\x04" + tail))
def test_random_bytes_behind_a_zip_header_are_refused_or_valid(content):
    with file_holding(content, "mnist.npz") as path:
        assert_images_or_refused(data.load_raw, path)


@FUZZ
@given(st.one_of(damaged(MNIST_NPZ), damaged(MNIST_NPZ_COMPRESSED)))
def test_damaged_mnist_npz_is_refused_or_valid(content):
    with file_holding(content, "mnist.npz") as path:
        assert_images_or_refused(data.load_raw, path)


@FUZZ
@given(st.fixed_dictionaries({
    "x_train": st.one_of(images_like, any_array), "y_train": st.one_of(labels_like, any_array),
    "x_test": st.one_of(images_like, any_array), "y_test": st.one_of(labels_like, any_array)}))
def test_mnist_npz_of_arbitrary_arrays_is_refused_or_valid(arrays):
    with file_holding(npz_bytes(**arrays), "mnist.npz") as path:
        assert_images_or_refused(data.load_raw, path)


# --- IDX (read_idx, read_idx_pair) ------------------------------------------------------------


def test_idx_header_claiming_more_bytes_than_stored_is_refused_before_allocating(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">4I", 2051, 1_000_000, 28, 28) + bytes(100)))  # 784 MB claimed

    def read():
        with pytest.raises(data.MalformedFile, match=f"^{path}: IDX payload length mismatch: dimensions "
                                                     r"\(1000000, 28, 28\) need exactly 784000000 bytes, "
                                                     "the file holds 100 bytes"):
            data.read_idx(path, data.IDX_IMAGES_MAGIC)
    assert peak_bytes_of(read) < 10_000_000


@pytest.mark.parametrize("content, message", [
    (b"", "truncated IDX file: 0 bytes, no magic number"),
    (b"<html>404</html>", "truncated or corrupt gzip data (BadGzipFile"),
], ids=["empty-gzip", "not-gzip"])
def test_idx_that_is_not_gzipped_idx_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(content) if content == b"" else content)
    with pytest.raises(data.MalformedFile) as error:
        data.read_idx(path, data.IDX_IMAGES_MAGIC)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


@pytest.mark.parametrize("images, message", [
    (np.zeros((0, 28, 28), np.uint8), "images must have shape (N, H, W) or (N, H, W, C), got (0, 28, 28)"),
    (np.zeros((5, 2, 2), np.uint8), "images must have shape (N, H, W) or (N, H, W, C), got (5, 2, 2)"),
], ids=["no-images", "tiny-images"])
def test_idx_images_a_dataset_cannot_use_are_refused_naming_the_file(tmp_path, images, message):
    images_path, labels_path = tmp_path / "train-images-idx3-ubyte.gz", tmp_path / "train-labels-idx1-ubyte.gz"
    images_path.write_bytes(gzip.compress(idx_bytes(images, 2051)))
    labels_path.write_bytes(gzip.compress(idx_bytes(np.zeros(len(images), np.uint8), 2049)))
    with pytest.raises(data.DataError, match=f"^{images_path}: ") as error:
        data.read_idx_pair(images_path, labels_path)
    assert message in str(error.value)


def assert_idx_or_refused(path: Path) -> None:
    """read_idx returns a uint8 array of the rank its magic number gives, or refuses the file."""
    array = valid_or_refused(data.read_idx, path, data.IDX_IMAGES_MAGIC)
    if array is not None:
        assert isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim == 3


@FUZZ
@given(noise)
def test_random_bytes_as_idx_are_refused_or_valid(content):
    with file_holding(content, "train-images-idx3-ubyte.gz") as path:
        assert_idx_or_refused(path)


@FUZZ
@given(st.one_of(noise, damaged(IDX_IMAGES)).map(gzip.compress))
def test_damaged_idx_inside_intact_gzip_is_refused_or_valid(content):
    with file_holding(content, "train-images-idx3-ubyte.gz") as path:
        assert_idx_or_refused(path)


@FUZZ
@given(damaged(gzip.compress(IDX_IMAGES)))
def test_damaged_idx_gzip_is_refused_or_valid(content):
    with file_holding(content, "train-images-idx3-ubyte.gz") as path:
        assert_idx_or_refused(path)


@FUZZ
@given(st.sampled_from(["images", "labels"]), st.data())
def test_damaged_idx_pair_is_refused_or_valid(which, draw):
    images = draw.draw(damaged(IDX_IMAGES)) if which == "images" else IDX_IMAGES
    labels = draw.draw(damaged(IDX_LABELS)) if which == "labels" else IDX_LABELS
    with file_holding(gzip.compress(images), "images.gz") as images_path, \
            file_holding(gzip.compress(labels), "labels.gz") as labels_path:
        assert_images_or_refused(data.read_idx_pair, images_path, labels_path)


# --- CIFAR-10 binary (read_cifar_batch) -------------------------------------------------------


def test_empty_cifar_batch_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(b"")
    with pytest.raises(data.MalformedFile, match=f"^{path}: 0 bytes is not a whole number of 3073-byte records"):
        data.read_cifar_batch(path)


def test_a_folder_in_place_of_a_cifar_batch_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    path.mkdir()
    with pytest.raises(data.DataError, match=f"^{path}: cannot read it"):
        data.read_cifar_batch(path)


@FUZZ
@given(st.one_of(noise, st.integers(1, 3).flatmap(lambda n: st.binary(min_size=3073 * n, max_size=3073 * n))))
def test_random_bytes_as_cifar_batch_are_refused_or_valid(content):
    with file_holding(content, "data_batch_1.bin") as path:
        assert_images_or_refused(data.read_cifar_batch, path)


@FUZZ
@given(damaged(CIFAR))
def test_damaged_cifar_batch_is_refused_or_valid(content):
    with file_holding(content, "data_batch_1.bin") as path:
        assert_images_or_refused(data.read_cifar_batch, path)


# --- processed splits (load_split) ------------------------------------------------------------


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.full((2, 28, 28, 1), np.nan, np.float32), "labels": np.zeros(2, np.int32)},
     "images must lie in [-1, 1], got nan..nan"),
    ({"images": np.full((2, 28, 28, 1), 255, np.float32), "labels": np.zeros(2, np.int32)},
     "images must lie in [-1, 1], got 255.0..255.0"),
    ({"images": np.zeros((2, 28, 28, 1), np.float32), "labels": np.int32(3)},
     "expected float32 NHWC images with one integer label each, got float32 (2, 28, 28, 1) and int32 () labels"),
    ({"images": np.zeros((2, 28, 28, 1), np.uint8), "labels": np.zeros(2, np.int32)},
     "expected float32 NHWC images with one integer label each, got uint8 (2, 28, 28, 1)"),
    ({"images": np.zeros((2, 28, 28, 1), np.float32), "labels": np.array([0, 10], np.int32)},
     "labels must lie in 0..9, got 0..10"),
    ({"images": np.zeros((2, 28, 28, 1), np.float32)}, "missing arrays ['labels']"),
], ids=["nan", "unscaled", "scalar-labels", "uint8-images", "label-range", "no-labels"])
def test_bad_processed_split_is_refused_naming_the_file(tmp_path, arrays, message):
    path = tmp_path / "train.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.DataError) as error:
        data.load_split(path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_an_empty_holdout_split_still_loads(tmp_path):
    path = tmp_path / "holdout.npz"
    data.save_split(path, np.zeros((0, 28, 28, 1), np.float32), np.zeros(0, np.int32))
    images, labels = data.load_split(path)
    assert images.shape == (0, 28, 28, 1) and labels.shape == (0,)


@FUZZ
@given(st.one_of(noise, damaged(SPLIT)))
def test_random_or_damaged_split_is_refused_or_valid(content):
    with file_holding(content, "train.npz") as path:
        assert_split_or_refused(path)


@FUZZ
@given(st.fixed_dictionaries({
    "images": st.one_of(any_array, hnp.arrays(np.float32, hnp.array_shapes(min_dims=4, max_dims=4, max_side=6),
                                              elements=st.one_of(st.floats(-2, 2, width=32), st.just(np.nan)))),
    "labels": st.one_of(labels_like, any_array)}))
def test_split_of_arbitrary_arrays_is_refused_or_valid(arrays):
    with file_holding(npz_bytes(**arrays), "train.npz") as path:
        assert_split_or_refused(path)
