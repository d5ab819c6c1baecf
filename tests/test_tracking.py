"""How the pipeline's metrics, dataset and model descriptions look in MLflow (a real SQLite store)."""

from __future__ import annotations

import subprocess

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from pipeline import registry, tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_metrics_are_grouped_by_stage_and_class_counts_by_class():
    grouped = tracking.grouped(tracking.EVAL, {"fid": 3.0, "class_count_7": 12, "kid_std": 0.1})
    assert grouped == {"eval/fid": 3.0, "eval/class_count/7": 12, "eval/kid_std": 0.1}


def test_the_training_split_is_the_runs_input_with_the_downloads_digest_and_url(store, tiny_config):
    manifest = {"source": "https://example.org/mnist.npz", "sha256": "ab" * 32, "offline_fallback": False}
    images, labels = np.zeros((6, 28, 28, 1), np.float32), np.arange(6, dtype=np.int32)
    with mlflow.start_run() as run:
        tracking.log_dataset(tiny_config, manifest, images, labels)
    [logged] = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("mnist", "ab" * 18)
    assert logged.dataset.source_type == "http" and "https://example.org/mnist.npz" in logged.dataset.source
    assert '"features_shape": [6, 28, 28, 1]' in logged.dataset.profile


def test_a_version_description_states_its_metrics_data_and_code():
    tags = {"metric.fid": "12.3456", "metric.modes": "10.0", "data.name": "mnist", "data.offline_fallback": "true",
            "data.sha256": "0123456789abcdef", "git.commit": "feedbeef" * 5, "params.hash": "c0ffee" * 8}
    text = registry.version_description(tags)
    assert text.startswith("fid 12.35, modes 10.")
    assert "mnist (offline subset), sha256 0123456789ab" in text and "git feedbeeffeed" in text


def test_a_run_from_edited_params_says_its_commit_is_dirty(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    for command in (["init", "-q"], ["add", "params.yaml"],
                    ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params"]):
        subprocess.run(["git", *command], check=True)
    assert tracking.run_tags({})["git.dirty"] == "false"
    (tmp_path / "params.yaml").write_text("seed: 2\n")
    assert tracking.run_tags({})["git.dirty"] == "true"
