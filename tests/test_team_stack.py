"""The team set-up (README, "Team set-up"), on real servers on 127.0.0.1: PostgreSQL, an S3 server (moto) and an
`mlflow server` over them, started and stopped by scripts/team_stack.py, as `make stack-up` does.

One module-scoped stack and one tiny `dvc repro` into it: the run is read back through MLflow's client (its store
PostgreSQL, its artifacts in the bucket and nowhere on disk); `dvc push` to an S3 remote on the same server and
`dvc pull` into a fresh clone give back every output; a wrong PostgreSQL password or a missing bucket stops the
train stage at once with one line naming the store, its credentials masked.

Skipped, saying why, only where PostgreSQL's server is not installed (`make postgres` installs it, and `make test`
runs that first); under CI (the CI variable set) a missing PostgreSQL fails instead.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, TINY_OVERRIDES, copy_project, make_project, run

pytestmark = pytest.mark.slow

NAME = "dcgan-mnist"
SCRIPT = ROOT / "scripts" / "team_stack.py"
# A stage that cannot reach its stores must say so before training; MLflow's own retries take minutes.
FAIL_FAST_S = 60
STACK_TIMEOUT_S = 600
WRONG_PASSWORD = "not-the-password-7f3a"
NOT_INSTALLED = ("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb, no pg_ctl on PATH): "
                 "`make postgres` installs Debian's, and `make test` runs it first; by hand, as root: "
                 "apt-get install postgresql")


def load_script():
    """Returns scripts/team_stack.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("team_stack", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


team_stack = load_script()


def postgres_installed() -> bool:
    return bool(shutil.which("pg_ctl") or glob.glob("/usr/lib/postgresql/*/bin/initdb"))


def stack_command(command: str, folder: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STACK_", "MLFLOW_", "AWS_"))}
    return subprocess.run([sys.executable, str(SCRIPT), command, "--dir", str(folder)], env=env,
                          capture_output=True, text=True, timeout=STACK_TIMEOUT_S, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Yields the running stack (scripts/team_stack.py start): its settings, env variables and start output."""
    if not postgres_installed():
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(NOT_INSTALLED, pytrace=False)
        pytest.skip(NOT_INSTALLED)
    folder = tmp_path_factory.mktemp("stack")
    started = stack_command("start", folder)
    try:
        assert started.returncode == 0, f"stack start failed:\n{started.stdout}\n{started.stderr}"
        yield SimpleNamespace(folder=folder, stack=team_stack.load_stack(folder), output=started.stdout + started.stderr,
                              env=team_stack.read_env_file(folder / "env"))
    finally:
        stopped = subprocess.run([sys.executable, str(SCRIPT), "stop", "--purge", "--dir", str(folder)],
                                 capture_output=True, text=True, timeout=STACK_TIMEOUT_S, check=False)
        assert stopped.returncode == 0, f"stack stop failed:\n{stopped.stdout}\n{stopped.stderr}"


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
    from mlflow import MlflowClient

    url = stack.stack.mlflow_url
    return MlflowClient(tracking_uri=url, registry_uri=url)


@pytest.fixture(scope="module")
def s3(stack):
    import boto3

    return boto3.client("s3", endpoint_url=stack.stack.s3_url, aws_access_key_id=stack.stack.access_key,
                        aws_secret_access_key=stack.stack.secret_key, region_name="us-east-1")


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
    status = stack_command("status", stack.folder)
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
    model_prefix = generator.artifact_location.replace("mlflow-artifacts:/", "mlflow/", 1).rstrip("/") + "/"
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


@pytest.fixture
def server_without_bucket(stack):
    """Yields the URL of a second mlflow server on the stack's PostgreSQL whose artifacts bucket does not exist."""
    s = stack.stack
    port = team_stack.free_port()
    name = "mlflow-no-bucket"
    team_stack.spawn(s, name, team_stack.mlflow_command(s, port, "s3://no-such-bucket/mlflow"),
                     team_stack.server_env(s))
    try:
        team_stack.wait_for(s, name, f"http://127.0.0.1:{port}/health")
        yield f"http://127.0.0.1:{port}"
    finally:
        team_stack.stop_process(s, name)


def test_a_missing_bucket_stops_the_train_stage_before_training_naming_the_store(project, server_without_bucket,
                                                                                 tmp_path):
    root = train_stage_without_its_outputs(project, tmp_path)
    result, _ = run_train_stage(root, {**project.env, "MLFLOW_TRACKING_URI": server_without_bucket})
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "Traceback" not in output
    [line] = [line for line in error_lines(result, server_without_bucket) if "artifact" in line]
    assert " ERROR " in line
    assert not (root / "models/checkpoints/checkpoint.npz").exists()  # no epoch was trained
