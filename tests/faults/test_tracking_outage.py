"""Tracking outages, injected for real: a local `mlflow server` killed and restarted mid-run, a
network outage (the URI switched to a closed port), a dead and a hanging server at the start.

Time limits here tell "fails fast" from MLflow's default of minutes of retries and timeouts; they leave
room for a shared machine several times slower than a quiet one.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY_OVERRIDES, closed_port_url, default_params, merge
from pipeline import tracking
from pipeline.config import config_from_dict
from pipeline.errors import PipelineError

MANIFEST = {"dataset": "mnist", "source": "x", "sha256": "y", "offline_fallback": False}
KEYS = ("d_loss", "g_loss")


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 whose process can be killed and restarted on the same port and store."""

    def __init__(self, root: Path):
        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no job runner process: a faster start
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
                   "--artifacts-destination", str(self.root / "artifacts")]
        log_file = (self.root / "server.log").open("a")
        # Its own session: stop() kills the server and its uvicorn worker together.
        self.process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"mlflow server on {self.url} did not answer /health")

    def stop(self) -> None:
        """Kills the server outright, as a crash would, and waits until it is gone."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None


@pytest.fixture(scope="module")
def module_server(tmp_path_factory):
    """One `mlflow server` for the module (its start takes seconds); stopped after the last test."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server
    server.stop()


@pytest.fixture
def server(module_server):
    """The module's server, answering when the test starts whatever an earlier test did to it (a test that
    kills it and fails before restarting it costs the next test a restart, not a failure)."""
    if not module_server.running:
        module_server.start()
    return module_server


@pytest.fixture
def config():
    return config_from_dict(merge(default_params(), TINY_OVERRIDES))


@pytest.fixture(autouse=True)
def clean_tracking(tmp_path, monkeypatch):
    """Leaves MLflow as a test found it, even one that failed mid-run: no active run, no tracking URI set."""
    monkeypatch.chdir(tmp_path)  # a local store's ./mlruns lands here
    # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ: monkeypatch restores it after the test.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    while mlflow.active_run():  # end_run takes the run off the stack before it calls the store
        try:
            with tracking.http_limits(max_retries=0, backoff_factor=0, timeout=2):
                mlflow.end_run()
        except Exception:
            pass
    mlflow.set_tracking_uri(None)  # not the URI of this test's (perhaps closed) server for the next one


def log_steps(run: tracking.TrackedRun, steps: range) -> list[float]:
    """Logs KEYS for each step to `run`; returns each call's duration in seconds."""
    durations = []
    for step in steps:
        started = time.monotonic()
        run.log_metrics({"d_loss": step / 10, "g_loss": step / 5, "note": "not a number"}, step=step)
        durations.append(time.monotonic() - started)
    return durations


def assert_on_server(url: str, run_id: str, steps: list[int]) -> None:
    client = MlflowClient(tracking_uri=url)
    for key in KEYS:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == steps, key  # every step, each exactly once
        scale = 10 if key == "d_loss" else 5
        assert all(m.value == pytest.approx(m.step / scale) for m in history)


def messages(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.tracking" and r.levelno == level]


def test_metrics_logged_while_the_server_restarts_all_reach_it_once(server, config, tmp_path, monkeypatch,
                                                                     caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setattr(tracking, "RETRY_INTERVAL_S", 0.0)  # try the server on every call
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    with tracking.start_run(config, MANIFEST, tmp_path / "run.json") as run:
        log_steps(run, range(1, 5))
        assert len(run.buffer) == 0
        server.stop()
        durations = log_steps(run, range(5, 11))  # must neither raise nor wait for the dead server
        assert max(durations) < 10, durations  # a refused connection, no retries: milliseconds; MLflow's: minutes
        assert len(run.buffer) == 6 * len(KEYS)
        warnings = messages(caplog, logging.WARNING)
        assert len(warnings) == 1 and "does not answer" in warnings[0] and server.url in warnings[0]
        server.start()
        log_steps(run, range(11, 12))  # the first call that reaches the server sends everything before it
        assert len(run.buffer) == 0
        assert "answers again" in messages(caplog, logging.WARNING)[-1]
        assert_on_server(server.url, run.info.run_id, list(range(1, 12)))
        log_steps(run, range(12, 15))
    assert_on_server(server.url, run.info.run_id, list(range(1, 15)))
    assert MlflowClient(tracking_uri=server.url).get_run(run.info.run_id).info.status == "FINISHED"


def test_a_full_buffer_drops_the_oldest_and_the_rest_is_sent_when_the_run_ends(server, config, tmp_path,
                                                                                monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setattr(tracking, "METRIC_BUFFER_LIMIT", 3 * len(KEYS))
    monkeypatch.setattr(tracking, "RETRY_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    with tracking.start_run(config, MANIFEST, tmp_path / "run.json") as run:
        log_steps(run, range(1, 3))
        mlflow.set_tracking_uri(closed_port_url())  # the network goes: connections are refused
        log_steps(run, range(3, 11))  # 8 steps, room for 3: steps 3..7 are dropped
        drops = [m for m in messages(caplog, logging.WARNING) if "dropped" in m]
        assert drops and all("oldest" in m for m in drops)
        assert "(10 so far in this outage)" in drops[-1]
        started = time.monotonic()
        assert run.buffer.flush(timeout=1.5) == 3 * len(KEYS)  # a flush gives up after its timeout
        assert 1.5 <= time.monotonic() - started < 1.5 + 10  # it tried until then; and not FLUSH_TIMEOUT_S
        mlflow.set_tracking_uri(server.url)  # the network is back; nothing else is logged
    assert_on_server(server.url, run.info.run_id, [1, 2, 8, 9, 10])


def test_an_unreachable_server_fails_the_start_fast_naming_the_uri_without_credentials(config, tmp_path,
                                                                                      monkeypatch, caplog):
    closed = closed_port_url()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed.replace("http://", "http://alice:s3cr%40t-pw@"))
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable) as error:
        tracking.start_run(config, MANIFEST, tmp_path / "run.json")
    assert time.monotonic() - started < 60  # three refused tries in about 3 s; MLflow's retries: minutes
    message = str(error.value)
    assert closed.replace("http://", "http://***@") in message and "MLFLOW_TRACKING_URI" in message
    assert "s3cr" not in message and "alice" not in message and "s3cr" not in caplog.text
    assert isinstance(error.value, PipelineError)  # run_stage reports it as one error line, exit status 1
    assert error.value.__suppress_context__  # MLflow's message, with the credentials, is not shown
    assert not (tmp_path / "run.json").exists() and mlflow.active_run() is None


def test_a_server_that_accepts_but_never_answers_fails_the_start_within_the_timeouts(config, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(tracking, "START_HTTP", {"max_retries": 1, "backoff_factor": 0, "timeout": 1})
    with socket.socket() as hung:  # the kernel completes the handshake; nobody ever reads or replies
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{hung.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(tracking.TrackingUnavailable, match="cannot reach the MLflow tracking store"):
            tracking.start_run(config, MANIFEST, tmp_path / "run.json")
        assert time.monotonic() - started < 30  # two 1 s timeouts; MLflow's defaults: 120 s each, 7 retries


def test_a_run_that_ends_while_the_store_is_unreachable_says_what_was_lost_within_seconds(
        server, config, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setattr(tracking, "FLUSH_TIMEOUT_S", 1.0)
    caplog.set_level(logging.INFO, logger="pipeline.tracking")
    started = None
    with pytest.raises(tracking.TrackingUnavailable, match="cannot reach the MLflow tracking store"):
        with tracking.start_run(config, MANIFEST, tmp_path / "run.json") as run:
            mlflow.set_tracking_uri(closed_port_url())
            log_steps(run, range(1, 4))
            started = time.monotonic()
    assert time.monotonic() - started < 60  # a 1 s flush timeout, not MLflow's four minutes of retries
    assert f"{3 * len(KEYS)} metric values never reached" in caplog.text
    assert len(run.buffer) == 0 and mlflow.active_run() is None


def test_a_store_lost_after_the_last_metric_fails_the_run_end_within_seconds(server, config, tmp_path,
                                                                             monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    with pytest.raises(tracking.TrackingUnavailable, match="cannot reach the MLflow tracking store"):
        with tracking.start_run(config, MANIFEST, tmp_path / "run.json") as run:
            log_steps(run, range(1, 3))
            assert len(run.buffer) == 0  # everything sent: only ending the run is left
            server.stop()
            started = time.monotonic()
    assert time.monotonic() - started < 60  # START_HTTP's retries, not MLflow's four minutes
    assert mlflow.active_run() is None
