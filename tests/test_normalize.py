"""normalize: [-1, 1] float32 NHWC, a fixed stratified split, a stats table, clear errors on bad data."""

import numpy as np
import pytest

from pipeline import data
from pipeline.config import DataConfig

CONFIG = DataConfig(name="mnist", limit=None, offline_fallback=True, mirror=None, holdout_fraction=0.1)


def test_images_are_scaled_to_minus_one_one_float32_nhwc(mnist_digits):
    images, labels = mnist_digits
    splits = data.normalize_dataset(images, labels, CONFIG, seed=0)
    x, _ = splits["train"]
    assert x.dtype == np.float32 and x.shape[1:] == (28, 28, 1)
    assert x.min() == -1.0 and x.max() == 1.0


def test_split_is_stratified_disjoint_and_fixed_by_seed(mnist_digits):
    _, labels = mnist_digits
    train, holdout = data.split_holdout(labels, 0.1, seed=7)
    assert len(np.intersect1d(train, holdout)) == 0 and len(train) + len(holdout) == len(labels)
    assert np.all(np.bincount(labels[holdout]) == 50)
    again = data.split_holdout(labels, 0.1, seed=7)
    np.testing.assert_array_equal(train, again[0])
    assert not np.array_equal(holdout, data.split_holdout(labels, 0.1, seed=8)[1])


def test_limit_caps_the_training_split_only(mnist_digits):
    config = DataConfig(name="mnist", limit=300, offline_fallback=True, mirror=None, holdout_fraction=0.1)
    splits = data.normalize_dataset(*mnist_digits, config, seed=0)
    assert len(splits["train"][0]) == 300 and len(splits["holdout"][0]) == 500


def test_stats_table_has_per_class_counts_and_pixel_stats(mnist_digits):
    splits = data.normalize_dataset(*mnist_digits, CONFIG, seed=0)
    stats = data.image_stats(splits)
    train_rows = stats[(stats["split"] == "train") & (stats["class"] != "all")]
    assert train_rows["count"].sum() == 4500 and len(train_rows) == 10
    overall = stats[(stats["split"] == "train") & (stats["class"] == "all")].iloc[0]
    assert overall["pixel_min"] == -1.0 and overall["pixel_max"] == 1.0
    assert -1.0 < overall["pixel_mean"] < 0.0  # mostly black background


@pytest.mark.parametrize("make_bad, message", [
    (lambda x, y: (x.astype(np.float32), y), "images must be uint8, got float32"),
    (lambda x, y: (x.reshape(len(x), -1), y), "images must have shape (N, H, W) or (N, H, W, C)"),
    (lambda x, y: (x, y[:-1]), "expected 5000 labels in a 1-D array"),
    (lambda x, y: (x, np.where(y == 3, 11, y)), "labels must lie in 0..9, got 0..11"),
    (lambda x, y: (x, y.astype(np.float32)), "labels must be integers, got float32"),
    (lambda x, y: (x[:0], y[:0]), "images must have shape"),
])
def test_bad_images_are_refused_naming_the_file(mnist_digits, make_bad, message):
    with pytest.raises(data.DataError) as error:
        data.normalize_dataset(*make_bad(*mnist_digits), CONFIG, seed=0, source="data/raw/mnist/x.npz")
    assert "data/raw/mnist/x.npz" in str(error.value) and message in str(error.value)


def test_truncated_npz_is_refused_naming_the_file(tmp_path, mnist_digits):
    path = tmp_path / "mnist.npz"
    images, labels = mnist_digits
    np.savez(path, x_train=images, y_train=labels, x_test=images[:0], y_test=labels[:0])
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(data.DataError, match=f"{path}: not a readable npz file"):
        data.load_raw(path)


def test_npz_missing_arrays_is_refused(tmp_path, mnist_digits):
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=mnist_digits[0])
    with pytest.raises(data.DataError, match=r"missing arrays \['y_train', 'x_test', 'y_test'\]"):
        data.load_raw(path)


def test_pickled_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "mnist.npz"
    obj = np.array([{"a": 1}], dtype=object)
    np.savez(path, x_train=obj, y_train=obj, x_test=obj, y_test=obj)
    with pytest.raises(data.DataError, match="not a readable npz file"):
        data.load_raw(path)


def test_processed_split_round_trips(tmp_path, scaled_digits):
    path = tmp_path / "train.npz"
    data.save_split(path, *scaled_digits)
    images, labels = data.load_split(path)
    np.testing.assert_array_equal(images, scaled_digits[0])
    np.testing.assert_array_equal(labels, scaled_digits[1])
    assert [p.name for p in tmp_path.iterdir()] == ["train.npz"]  # no temporary left behind
