"""train: one epoch on real digits writes history, grids and a checkpoint that restores exactly."""

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import merge
from pipeline import paths
from pipeline.checkpoint import restore_checkpoint
from pipeline.config import ConfigError, config_from_dict
from pipeline.models import load_model
from pipeline.paths import TrainOutputs
from pipeline.train import METRIC_NAMES, averaged_generator, build_gan, train_gan


@pytest.fixture(scope="module")
def classifier():
    from pipeline.config import ClassifierConfig
    from pipeline.models import build_classifier

    return build_classifier(ClassifierConfig(filters=(8, 16), features=32, epochs=1, batch_size=32, lr=1e-3),
                            (28, 28, 1))  # untrained: FID needs features, not good ones


@pytest.fixture
def trained(tiny_config, scaled_digits, classifier, tmp_path):
    images, labels = scaled_digits
    return train_gan(tiny_config, images[:256], labels[:256], classifier, TrainOutputs(tmp_path), verbose=0)


def test_history_has_every_metric_per_epoch(trained, tmp_path):
    _, history, _ = trained
    assert list(history.columns) == ["epoch", *METRIC_NAMES, "seconds"]
    assert history["epoch"].tolist() == [1]
    on_disk = pd.read_csv(tmp_path / paths.HISTORY)
    assert on_disk["epoch"].tolist() == [1]
    row = history.iloc[0]
    assert np.isfinite(row[list(METRIC_NAMES)].to_numpy(float)).all()
    assert 0.0 <= row["d_acc_real"] <= 1.0 and 0.0 < row["d_real"] < 1.0


def test_sample_grid_and_checkpoint_are_written(trained, tmp_path):
    assert (tmp_path / paths.PROGRESS_GRIDS / "epoch_0001.png").exists()
    assert (tmp_path / paths.CHECKPOINT).exists()
    assert not list((tmp_path / paths.CHECKPOINT.parent).glob(".*tmp*"))


def test_checkpoint_restores_both_models_and_optimizers(trained, tiny_config, tmp_path):
    gan, _, _ = trained
    fresh = build_gan(tiny_config, (28, 28, 1))
    best = restore_checkpoint(fresh, tmp_path / paths.CHECKPOINT)
    # One epoch: the best generator is the last one, as saved (its averaged weights).
    np.testing.assert_array_equal(best[0], averaged_generator(gan).get_weights()[0])
    np.testing.assert_array_equal(np.asarray(fresh.noise_seed.state), np.asarray(gan.noise_seed.state))
    for part in ("generator", "discriminator", "g_optimizer", "d_optimizer"):
        for a, b in zip(getattr(gan, part).variables, getattr(fresh, part).variables):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fid_schedule_is_written_and_the_best_generator_kept(trained, tmp_path):
    _, _, fid_history = trained
    assert list(fid_history.columns) == ["epoch", "fid", "kid"]
    assert fid_history["epoch"].tolist() == [1] and np.isfinite(fid_history["fid"]).all()
    assert pd.read_csv(tmp_path / paths.FID_HISTORY)["epoch"].tolist() == [1]
    assert (tmp_path / paths.GENERATOR_BEST).exists()


class AveragedGenerators(keras.callbacks.Callback):
    """Records the averaged generator's weights at the end of each epoch."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(averaged_generator(self.model).get_weights())


@pytest.mark.parametrize(("fids", "best_epoch"), [([30.0, 10.0, 20.0], 2), ([10.0, 20.0, 30.0], 1)],
                         ids=["best-in-the-middle", "best-first"])
def test_the_best_generator_is_the_averaged_generator_of_the_epoch_with_the_lowest_fid(
        fids, best_epoch, tiny_params, scaled_digits, classifier, tmp_path, monkeypatch):
    scripted = iter(fids)
    monkeypatch.setattr("pipeline.train.fid_scorer",
                        lambda *args: lambda generator: {"fid": next(scripted), "kid": 0.0})
    config = config_from_dict(merge(tiny_params, {"train": {"epochs": 3}}))
    outputs, averaged = TrainOutputs(tmp_path), AveragedGenerators()
    _, _, fid_history = train_gan(config, scaled_digits[0][:64], scaled_digits[1][:64], classifier, outputs,
                                  callbacks=[averaged], verbose=0)
    assert fid_history["fid"].tolist() == fids
    saved = load_model(outputs.generator_best).get_weights()
    checkpointed = restore_checkpoint(build_gan(config, (28, 28, 1)), outputs.checkpoint)
    for kept in (saved, checkpointed):
        assert all(np.array_equal(a, b) for a, b in zip(kept, averaged.weights[best_epoch - 1], strict=True))
        assert not all(np.array_equal(a, b) for a, b in zip(kept, averaged.weights[-1], strict=True))


def test_batch_larger_than_dataset_is_refused_before_training(tiny_config, scaled_digits, classifier, tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size: 32 is larger than the 10 training images"):
        train_gan(tiny_config, scaled_digits[0][:10], scaled_digits[1][:10], classifier, TrainOutputs(tmp_path),
                  verbose=0)
    assert not (tmp_path / "models").exists()


def test_listeners_hear_the_speed_settings_before_the_first_step(tiny_config, scaled_digits, classifier, tmp_path):
    heard = []

    class Listener(keras.callbacks.Callback):
        def on_start(self, settings):
            heard.append(dict(settings))

        def on_checkpoint(self, state):
            pass

        def on_warning(self, name, message):
            pass

        def on_train_batch_begin(self, batch, logs=None):
            raise RuntimeError("the first step")  # a training that dies at once

    with pytest.raises(RuntimeError, match="the first step"):
        train_gan(tiny_config, scaled_digits[0][:64], scaled_digits[1][:64], classifier, TrainOutputs(tmp_path),
                  callbacks=[Listener()], verbose=0)
    [settings] = heard
    expected = {"speed.dtype_policy", "speed.onednn", "speed.xla", "speed.winograd", "speed.winograd_layers"}
    assert expected <= set(settings)
    assert settings["speed.dtype_policy"] == "float32"  # the tiny config's train.mixed_precision
