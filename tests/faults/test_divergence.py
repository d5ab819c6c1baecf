"""A NaN loss stops training naming epoch and step and keeps the last good checkpoint; D winning is warned."""

import json
import logging

import numpy as np
import pytest

from conftest import merge
from pipeline.checkpoint import read_state
from pipeline.config import config_from_dict
from pipeline.paths import TrainOutputs
from pipeline.train import TrainingDiverged, train_gan
from test_train import classifier  # noqa: F401 (fixture)


def poisoned(images: np.ndarray) -> np.ndarray:
    """Returns the images with one pixel of one image set to NaN, as a corrupt record would be."""
    bad = images.copy()
    bad[7, 14, 14, 0] = np.nan
    return bad


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(tiny_params, scaled_digits,
                                                                               classifier, tmp_path):
    images, labels = scaled_digits[0][:256], scaled_digits[1][:256]
    clean = config_from_dict(merge(tiny_params, {"train": {"epochs": 2}}))
    train_gan(clean, images, labels, classifier, TrainOutputs(tmp_path), verbose=0)
    checkpoint = TrainOutputs(tmp_path).checkpoint
    good = read_state(checkpoint, fingerprint="")
    good_bytes = checkpoint.read_bytes()
    assert good.epoch == 2

    longer = config_from_dict(merge(tiny_params, {"train": {"epochs": 4}}))
    with pytest.raises(TrainingDiverged, match=r"d_loss became nan in epoch 3, step \d+; training stopped"):
        train_gan(longer, poisoned(images), labels, classifier, TrainOutputs(tmp_path), state=good, verbose=0)
    assert checkpoint.read_bytes() == good_bytes


def test_discriminator_winning_outright_is_warned(tiny_params, scaled_digits, classifier, tmp_path,
                                                  caplog):
    # A threshold every d_loss is under: D "wins" every epoch, so the warning must come at epoch 2.
    config = config_from_dict(merge(tiny_params, {"train": {"epochs": 3, "d_win_loss": 100.0, "d_win_epochs": 2}}))
    with caplog.at_level(logging.WARNING):
        train_gan(config, scaled_digits[0][:128], scaled_digits[1][:128], classifier, TrainOutputs(tmp_path), verbose=0)
    warnings = [r.message for r in caplog.records if "discriminator wins outright" in r.message]
    assert warnings == ["the discriminator wins outright: d_loss below 100.0 for 2 epochs up to epoch 2; "
                        "the generator gets no useful gradient"]


def test_no_warning_while_the_discriminator_is_beatable(tiny_params, scaled_digits, classifier, tmp_path, caplog):
    config = config_from_dict(merge(tiny_params, {"train": {"epochs": 2, "d_win_epochs": 1}}))
    with caplog.at_level(logging.WARNING):
        train_gan(config, scaled_digits[0][:128], scaled_digits[1][:128], classifier, TrainOutputs(tmp_path), verbose=0)
    assert not [r for r in caplog.records if "discriminator wins" in r.message]


def test_a_checkpoint_cut_short_while_writing_is_never_picked_up(tiny_params, scaled_digits, classifier,
                                                                 tmp_path, monkeypatch):
    config = config_from_dict(merge(tiny_params, {"train": {"epochs": 1}}))
    train_gan(config, scaled_digits[0][:64], scaled_digits[1][:64], classifier, TrainOutputs(tmp_path), verbose=0)
    checkpoint = TrainOutputs(tmp_path).checkpoint
    good_bytes = checkpoint.read_bytes()

    def crash_halfway(file, **arrays):  # the process dies after writing half the file
        with open(file, "wb") as f:
            f.write(good_bytes[: len(good_bytes) // 2])
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr("pipeline.checkpoint.np.savez", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        train_gan(config, scaled_digits[0][:64], scaled_digits[1][:64], classifier, TrainOutputs(tmp_path), verbose=0)
    assert checkpoint.read_bytes() == good_bytes
    assert [p.name for p in checkpoint.parent.iterdir()] == ["checkpoint.npz"]


def test_a_truncated_checkpoint_file_is_refused_and_training_starts_fresh(tmp_path, caplog):
    path = tmp_path / "checkpoint.npz"
    np.savez(path, state=np.array(json.dumps({"fingerprint": "f", "epoch": 3})), weights=np.zeros(1000))
    path.write_bytes(path.read_bytes()[:300])
    with caplog.at_level(logging.WARNING):
        assert read_state(path, fingerprint="f") is None
    assert "is unreadable" in caplog.text and "starting fresh" in caplog.text


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """A working directory with its own SQLite MLflow store; yields an MlflowClient on it."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return MlflowClient(tracking_uri=uri)


MANIFEST = {"dataset": "mnist", "source": "test", "sha256": "0", "offline_fallback": False}


def only_run(client):
    return client.search_runs([client.get_experiment_by_name("mnist").experiment_id])[0]


def test_divergence_marks_the_mlflow_run_failed(tiny_params, scaled_digits, classifier, tracked, tmp_path):
    from pipeline.train import train_and_log

    config = config_from_dict(merge(tiny_params, {"train": {"epochs": 2}}))
    with pytest.raises(TrainingDiverged):
        train_and_log(config, poisoned(scaled_digits[0][:128]), scaled_digits[1][:128], classifier, MANIFEST,
                      TrainOutputs(tmp_path))
    assert only_run(tracked).info.status == "FAILED"


def test_discriminator_winning_is_tagged_on_the_mlflow_run(tiny_params, scaled_digits, classifier, tracked,
                                                            tmp_path):
    from pipeline.train import train_and_log

    config = config_from_dict(merge(tiny_params, {"train": {"epochs": 1, "d_win_loss": 100.0, "d_win_epochs": 1}}))
    train_and_log(config, scaled_digits[0][:128], scaled_digits[1][:128], classifier, MANIFEST,
                      TrainOutputs(tmp_path))
    run = only_run(tracked)
    assert run.info.status == "FINISHED"
    assert run.data.tags["warning.discriminator_wins"].startswith("the discriminator wins outright")
