"""The team set-up (README, "Team set-up"), on real servers on 127.0.0.1: PostgreSQL, an S3 server (moto) and an
`mlflow server` over them, started and stopped by scripts/team_stack.py, as `make stack-up` does.

One module-scoped stack and one tiny `dvc repro` into it: the run is read back through MLflow's client (its store
PostgreSQL, its artifacts in the bucket and nowhere on disk); `dvc push` to an S3 remote on the same server and
`dvc pull` into a fresh clone give back every output; a wrong PostgreSQL password, a missing bucket or wrong S3
keys stop the train stage at once with one line naming the store, its credentials masked; PostgreSQL and S3
restarted during training lose and double no metric and no artifact.

Skipped, saying why, only where PostgreSQL's server is not installed (conftest.team_stack: `make postgres`
installs it, and `make test` runs that first); under CI (the CI variable set) a missing PostgreSQL fails instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import (TINY_OVERRIDES, copy_project, make_project, run, team_stack, team_stack_command,
                      team_stack_script)

pytestmark = pytest.mark.slow

NAME = "dcgan-mnist"
# A stage that cannot reach its stores must say so before training; MLflow's own retries take minutes.
FAIL_FAST_S = 60
WRONG_PASSWORD = "not-the-password-7f3a"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Yields the running stack (scripts/team_stack.py start): its settings, env variables and start output."""
    folder = tmp_path_factory.mktemp("stack")
    with team_stack(folder) as output:
        yield SimpleNamespace(folder=folder, stack=team_stack_script.load_stack(folder), output=output,
                              env=team_stack_script.read_env_file(folder / "env"))


def stack_env(env: dict, stack) -> dict:
    """Returns `env` with the variables `source .stack/env` exports."""
    return {**env, **stack.stack.env()}


@pytest.fixture(scope="module")
def project(stack, tmp_path_factory):
    """The tiny project after one `dvc repro` against the stack: root, env, dvc, its run and experiment ids."""
    root, env, dvc = make_project(tmp_path_factory.mktemp("project"), TINY_OVERRIDES)
    env = stack_env(env, stack)
    run([dvc, "repro"], root, env)
    ids = json.loads((root / "models/mlflow_run.json").read_text())
    return SimpleNamespace(root=root, env=env, dvc=dvc, run_id=ids["run_id"], experiment_id=ids["experiment_id"])


@pytest.fixture(scope="module")
def client(stack):
    """Yields an MLflow client of the stack, in this process set up as `source .stack/env` sets up a shell."""
    from mlflow import MlflowClient

    url = stack.stack.mlflow_url
    with pytest.MonkeyPatch.context() as patch:  # module-scoped: the `monkeypatch` fixture is per test
        for name, value in stack.stack.env().items():
            if name.startswith("MLFLOW_ENABLE_PROXY_"):
                patch.setenv(name, value)
        yield MlflowClient(tracking_uri=url, registry_uri=url)


@pytest.fixture(scope="module")
def s3(stack):
    import boto3

    return boto3.client("s3", endpoint_url=stack.stack.s3_url, aws_access_key_id=stack.stack.access_key,
                        aws_secret_access_key=stack.stack.secret_key, region_name="us-east-1")


def bucket_prefix(model) -> str:
    """Returns the bucket folder of a logged model that the server stores under s3://<bucket>/mlflow."""
    return model.artifact_location.replace("mlflow-artifacts:/", "mlflow/", 1).rstrip("/") + "/"


def bucket_keys(s3, bucket: str, prefix: str) -> set[str]:
    keys = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys |= {item["Key"] for item in page.get("Contents", [])}
    return keys


def test_start_answers_on_every_server_and_prints_the_variables_with_credentials_masked(stack):
    s = stack.stack
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert f"export {name}=" in stack.output
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{s.mlflow_port}" in stack.output
    for secret in (s.pg_password, s.access_key, s.secret_key):
        assert secret not in stack.output
        assert secret not in (stack.folder / "mlflow.log").read_text()
    assert (stack.folder / "env").stat().st_mode & 0o777 == 0o600
    assert stack.env["MLFLOW_TRACKING_URI"] == s.mlflow_url and stack.env["AWS_SECRET_ACCESS_KEY"] == s.secret_key
    status = team_stack_command("status", stack.folder)
    assert status.returncode == 0, status.stdout + status.stderr
    assert s.pg_password not in status.stdout and "DOWN" not in status.stdout


def test_repro_against_the_stack_is_read_back_through_the_tracking_server(project, client):
    run_ = client.get_run(project.run_id)
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.epochs"] == "1" and run_.data.params["model.generator_filters"] == "[16, 8]"
    for key in ("train/d_loss", "train/fid", "eval/fid", "eval/class_count/0", "promotion/version"):
        assert key in run_.data.metrics, key
    assert [m.step for m in client.get_metric_history(project.run_id, "train/d_loss")] == [1]
    eval_json = json.loads((project.root / "metrics/eval.json").read_text())
    assert run_.data.metrics["eval/fid"] == pytest.approx(eval_json["fid"])
    models = client.search_logged_models(experiment_ids=[project.experiment_id])
    assert {"generator", "generator_best"} <= {m.name for m in models}
    artifacts = {a.path for folder in ("train", "samples", "metrics") for a in client.list_artifacts(project.run_id, folder)}
    assert {"train/history.csv", "samples/grid.png", "metrics/eval.json"} <= artifacts
    downloaded = client.download_artifacts(project.run_id, "metrics/eval.json", str(project.root.parent))
    assert json.loads(Path(downloaded).read_text()) == eval_json


def test_the_registered_generator_is_version_1_and_the_champion(project, client):
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert (champion.version, champion.run_id) == ("1", project.run_id)
    promotion = json.loads((project.root / "metrics/promotion.json").read_text())
    assert (promotion["version"], promotion["decision"]) == (1, "champion")


def test_the_runs_are_in_postgresql(project, stack):
    import psycopg

    s = stack.stack
    with psycopg.connect(host="127.0.0.1", port=s.pg_port, user="mlflow", password=s.pg_password,
                         dbname="mlflow") as connection:
        rows = connection.execute("SELECT status FROM runs WHERE run_uuid = %s", (project.run_id,)).fetchall()
    assert rows == [("FINISHED",)]


def test_the_artifacts_are_in_the_bucket_and_not_on_local_disk(project, client, stack, s3):
    s = stack.stack
    assert client.get_run(project.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    run_prefix = f"mlflow/{project.experiment_id}/{project.run_id}/artifacts/"
    keys = bucket_keys(s3, s.bucket, run_prefix)
    assert {run_prefix + path for path in ("metrics/eval.json", "train/history.csv", "samples/grid.png")} <= keys
    assert any(key.startswith(run_prefix + "registry/") for key in keys), sorted(keys)
    generator = client.search_logged_models(experiment_ids=[project.experiment_id],
                                            filter_string="name = 'generator'")[0]
    model_prefix = bucket_prefix(generator)
    assert model_prefix + "MLmodel" in bucket_keys(s3, s.bucket, model_prefix)
    for folder in (project.root, stack.folder):
        for store in ("mlruns", "mlartifacts", "mlflow.db"):
            assert not (folder / store).exists(), folder / store


def output_files(root: Path) -> dict[str, str]:
    """Returns {path: sha256} of every file of every output that the project's dvc.lock records."""
    import yaml

    lock = yaml.safe_load((root / "dvc.lock").read_text())
    files = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = root / out["path"]
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file():
                    files[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return files


def test_dvc_push_to_the_s3_remote_and_pull_into_a_fresh_clone_restore_every_output(project, stack, s3, tmp_path):
    s = stack.stack
    root = copy_project(project.root, tmp_path / "pushed")
    env, dvc = project.env, project.dvc
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny run"], root, env)
    # The README's lines; the keys come from the environment (AWS_ACCESS_KEY_ID, ...), not from .dvc/config.
    run([dvc, "remote", "add", "-d", "s3", f"s3://{s.bucket}/dvc"], root, env)
    run([dvc, "remote", "modify", "s3", "endpointurl", s.s3_url], root, env)
    assert s.secret_key not in (root / ".dvc/config").read_text()
    run(["git", "commit", "-qam", "S3 remote"], root, env)
    run([dvc, "push"], root, env)
    assert bucket_keys(s3, s.bucket, "dvc/files/md5/")

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "models/generator.keras").exists()
    run([dvc, "pull"], clone, env)
    expected = output_files(root)
    assert "models/generator.keras" in expected and "data/processed/train.npz" in expected
    assert output_files(clone) == expected
    assert json.loads(run([dvc, "status", "--json"], clone, env).stdout) == {}


def train_stage_without_its_outputs(project, tmp_path) -> Path:
    """Returns a copy of the project whose train stage has to train again (no checkpoint, no run file)."""
    root = copy_project(project.root, tmp_path / "project")
    shutil.rmtree(root / "models/checkpoints")
    (root / "models/mlflow_run.json").unlink()
    return root


def run_train_stage(root: Path, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    """Returns the finished `python -m stages.train` and its duration; fails the test if it runs past FAIL_FAST_S."""
    started = time.monotonic()
    try:
        result = subprocess.run([sys.executable, "-m", "stages.train"], cwd=root, env=env, capture_output=True,
                                text=True, timeout=FAIL_FAST_S, check=False)
    except subprocess.TimeoutExpired as e:
        output = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"the train stage did not stop within {FAIL_FAST_S} s:\n{output[-3000:]}", pytrace=False)
    return result, time.monotonic() - started


def error_lines(result: subprocess.CompletedProcess, needle: str) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if needle in line]


def test_a_wrong_postgresql_password_stops_the_train_stage_at_once_naming_the_store_masked(project, stack, tmp_path):
    s = stack.stack
    root = train_stage_without_its_outputs(project, tmp_path)
    uri = f"postgresql://mlflow:{WRONG_PASSWORD}@127.0.0.1:{s.pg_port}/mlflow"
    result, _ = run_train_stage(root, {**project.env, "MLFLOW_TRACKING_URI": uri})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert WRONG_PASSWORD not in output and s.pg_password not in output
    assert "Traceback" not in output
    [line] = error_lines(result, f"127.0.0.1:{s.pg_port}")
    assert f"postgresql://***@127.0.0.1:{s.pg_port}/mlflow" in line and "password authentication failed" in line
    assert not (root / "models/checkpoints/checkpoint.npz").exists()


@contextlib.contextmanager
def second_server(stack, artifacts: str, **env) -> Iterator[SimpleNamespace]:
    """Yields the URL and log of a second mlflow server on the stack's PostgreSQL, its artifacts in `artifacts`, its
    environment the stack's with `env` changed."""
    s = stack.stack
    port = team_stack_script.free_port()
    name = f"mlflow-{port}"
    team_stack_script.spawn(s, name, team_stack_script.mlflow_command(s, port, artifacts),
                            {**team_stack_script.server_env(s), **env})
    try:
        team_stack_script.wait_for(s, name, f"http://127.0.0.1:{port}/health")
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", log=stack.folder / f"{name}.log")
    finally:
        team_stack_script.stop_process(s, name)


def assert_stops_before_training_naming_the_store(project, server: str, tmp_path) -> str:
    """Returns the one error line of a train stage that used `server` and stopped before its first epoch."""
    root = train_stage_without_its_outputs(project, tmp_path)
    result, _ = run_train_stage(root, {**project.env, "MLFLOW_TRACKING_URI": server})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    [line] = [line for line in error_lines(result, server) if "artifact" in line]
    assert " ERROR " in line
    assert not (root / "models/checkpoints/checkpoint.npz").exists()  # no epoch was trained
    return line


def test_a_missing_bucket_stops_the_train_stage_before_training_naming_the_store(project, stack, tmp_path):
    with second_server(stack, "s3://no-such-bucket/mlflow") as server:
        assert_stops_before_training_naming_the_store(project, server.url, tmp_path)


def test_wrong_s3_keys_stop_the_train_stage_before_training_naming_the_store_masked(project, stack, tmp_path):
    with second_server(stack, f"s3://{stack.stack.bucket}/mlflow", AWS_SECRET_ACCESS_KEY=WRONG_PASSWORD) as server:
        line = assert_stops_before_training_naming_the_store(project, server.url, tmp_path)
    assert WRONG_PASSWORD not in line and "S3 keys" in line
    # The stack's S3 server checks signatures, as S3 does: the same key with the wrong secret is refused.
    assert "SignatureDoesNotMatch" in server.log.read_text()


# Epochs of the interrupted training. PostgreSQL is down from OUTAGE_FROM's FID line until the metric buffer has
# waited through OUTAGE_EPOCHS more; S3 is down from S3_DOWN_EPOCHS before the end (a margin: it must be down before
# the uploads at the end start) until the tracking server has failed to store one of the train stage's uploads, and
# S3_DOWN_AFTER_FAILED_UPLOAD_S longer.
RESTART_EPOCHS, OUTAGE_FROM, OUTAGE_EPOCHS = 12, 2, 2
S3_DOWN_EPOCHS = 3
S3_DOWN_AFTER_FAILED_UPLOAD_S = 5
# The server's access log line of an artifact upload it answered with an error.
FAILED_UPLOAD = r'"PUT /api/2\.0/mlflow-artifacts/artifacts/\S+ HTTP/1\.1" 5\d\d'

RESTART_TIMEOUT_S = 900


class RestartableS3:
    """127.0.0.1:port forwarding to the S3 server: `down()` refuses connections and drops the open ones, as a
    stopped server does, and `up()` answers again on the same port.

    moto keeps its objects in memory, so restarting moto itself would lose them, which no real S3 server does (MinIO
    keeps them on disk); in front of it, this gives its clients a real restart's outage with the objects kept.
    """

    def __init__(self, target_port: int):
        self.target = target_port
        self.port = team_stack_script.free_port()
        self.links: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        self.listener.settimeout(0.2)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        listener, self.listener = self.listener, None
        listener.close()
        for link in self.links:
            with contextlib.suppress(OSError):
                link.shutdown(socket.SHUT_RDWR)
            link.close()
        self.links.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self.listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.links += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)


def wait_for_line(log: Path, process: subprocess.Popen, pattern: str, deadline: float) -> None:
    """Returns once `log` has a match of `pattern`; fails the test if the process ended or the deadline passed first."""
    while not re.search(pattern, log.read_text(errors="replace")):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{log.name} never had {pattern!r}:\n{log.read_text(errors='replace')[-3000:]}",
                        pytrace=False)
        time.sleep(0.2)


def test_restarting_postgresql_and_s3_during_training_loses_and_doubles_nothing(project, stack, client, s3,
                                                                               tmp_path):
    """PostgreSQL really restarts; S3 is restarted as its clients see it (RestartableS3), behind a tracking server of
    the stack's that reaches S3 only through it."""
    import yaml

    s = stack.stack
    root = train_stage_without_its_outputs(project, tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = RESTART_EPOCHS
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log = tmp_path / "train.log"
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    s3_front = RestartableS3(s.s3_port)
    with second_server(stack, f"s3://{s.bucket}/mlflow", MLFLOW_S3_ENDPOINT_URL=s3_front.url) as server:
        with log.open("w") as out:
            process = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, stdout=out,
                                       stderr=subprocess.STDOUT, env={**project.env, "MLFLOW_TRACKING_URI": server.url})
        try:
            wait_for_line(log, process, f"epoch {OUTAGE_FROM}: FID", deadline)
            team_stack_script.stop_postgres(s)
            try:
                wait_for_line(log, process, "does not answer", deadline)
                wait_for_line(log, process, f"epoch {OUTAGE_FROM + 1 + OUTAGE_EPOCHS}: FID", deadline)
            finally:
                team_stack_script.start_postgres(s)
            wait_for_line(log, process, f"epoch {RESTART_EPOCHS - S3_DOWN_EPOCHS}: FID", deadline)
            s3_front.down()
            try:
                # Down until the stage's uploads met it: the server answered one with an error.
                wait_for_line(server.log, process, FAILED_UPLOAD, deadline)
                time.sleep(S3_DOWN_AFTER_FAILED_UPLOAD_S)
                assert process.poll() is None, "the train stage ended while S3 was down"
            finally:
                s3_front.up()
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log.read_text(errors="replace")
    assert process.returncode == 0, output[-3000:]
    assert "answers again after" in output and "never reached" not in output

    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    epochs = list(range(1, RESTART_EPOCHS + 1))
    for key in ("train/d_loss", "train/g_loss", "train/fid"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == epochs, key
    csv = (root / "reports/train/history.csv").read_text().splitlines()
    assert len(csv) - 1 == RESTART_EPOCHS
    prefix = f"mlflow/{project.experiment_id}/{run_id}/artifacts/"
    keys = bucket_keys(s3, s.bucket, prefix)
    expected = ("params.json", "train/history.csv", "train/fid.csv", f"train/grids/epoch_{RESTART_EPOCHS:04d}.png")
    assert {prefix + path for path in expected} <= keys, keys
    models = [m for m in client.search_logged_models(experiment_ids=[project.experiment_id])
              if m.source_run_id == run_id]
    assert sorted(m.name for m in models) == ["generator", "generator_best"]
    for model in models:
        model_prefix = bucket_prefix(model)
        assert model_prefix + "MLmodel" in bucket_keys(s3, s.bucket, model_prefix), model.name
