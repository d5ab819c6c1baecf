"""Credentials in the environment never reach a run's params, tags or metrics."""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from conftest import TINY_OVERRIDES, default_params, merge
from pipeline import tracking
from pipeline.config import config_from_dict

MARKER = "Cr3dMarker-7f3a"
SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def test_credentials_in_the_environment_reach_no_param_tag_or_metric(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded SQLite store, in tmp_path
    for name in SECRETS:
        monkeypatch.setenv(name, f"{MARKER}-{name}")
    caplog.set_level(logging.DEBUG)
    config = config_from_dict(merge(default_params(), TINY_OVERRIDES))
    manifest = {"dataset": "mnist", "source": "x", "sha256": "y", "offline_fallback": True}
    run_file = tmp_path / "run.json"
    with tracking.start_run(config, manifest, run_file) as run:
        for step in (1, 2):
            run.log_metrics({"d_loss": 0.5, "g_loss": 1.5}, step=step)
        run.log_metrics({"fid": 12.0})
        run.set_tags(tracking.dvc_stage_tags())
    with tracking.resume_run(run_file) as resumed:
        resumed.log_metrics({"kid": 0.1})
    stored = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run.info.run_id)
    assert stored.data.params and stored.data.tags and set(stored.data.metrics) == {"d_loss", "g_loss", "fid", "kid"}
    for section in (stored.data.params, stored.data.tags, stored.data.metrics):
        for key, value in section.items():
            assert MARKER not in key and MARKER not in str(value), (key, value)
    assert MARKER not in stored.info.run_name
    assert MARKER not in run_file.read_text() and MARKER not in caplog.text
