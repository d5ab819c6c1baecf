"""Experiments in parallel (issue 19): two `dvc exp run --queue` and `dvc queue start -j 2` finish both, each into its
own complete MLflow run, with the project's new SQLite store, with a tracking server (conftest.mlflow_server) and
with the team stack (PostgreSQL, S3 and an mlflow server over them: conftest.team_stack).

One project is prepared once, its stages up to the classifier reproduced and committed, so the queued experiments
skip them; it has no MLflow store yet (train is the first stage to open one), so both experiments create the new
mlflow.db at once. Per store, a module fixture copies it, queues two experiments that differ in train.epochs, runs
the queue with two workers and waits; the tests read what the queue left: its logs, `dvc exp show`, the store.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import (TINY_OVERRIDES, copy_project, make_project, mlflow_server, queue_started, run, team_stack,
                      team_stack_script)

pytestmark = pytest.mark.slow

# Experiment name -> train.epochs: a run's epochs show in its params and in the length of its training curves.
EXPERIMENTS = {"one-epoch": 1, "two-epochs": 2}
MODEL = "dcgan-mnist"
# Two tiny experiments take about four minutes on two busy cores.
QUEUE_TIMEOUT_S = 1800


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """A committed tiny project whose stages up to the classifier ran, with no MLflow store: (root, env, dvc)."""
    root, env, dvc = make_project(tmp_path_factory.mktemp("baseline"), TINY_OVERRIDES)
    run([dvc, "repro", "classifier"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "up to the classifier"], root, env)
    assert not (root / "mlflow.db").exists()
    return root, env, dvc


def run_queue(root: Path, env: dict, dvc: str) -> tuple[str, dict[str, str]]:
    """Returns `dvc queue status` and each experiment's `dvc queue logs` after queueing EXPERIMENTS and running
    them with two workers; kills them and fails if they are not done within QUEUE_TIMEOUT_S."""
    for name, epochs in EXPERIMENTS.items():
        run([dvc, "exp", "run", "--queue", "-n", name, "-S", f"train.epochs={epochs}"], root, env)
    with queue_started(root, env, dvc, jobs=2):
        deadline = time.monotonic() + QUEUE_TIMEOUT_S
        while True:
            status = run([dvc, "queue", "status"], root, env).stdout
            if not any(state in status for state in ("Queued", "Running")):
                break
            if time.monotonic() > deadline:
                subprocess.run([dvc, "queue", "kill", *EXPERIMENTS], cwd=root, env=env, capture_output=True,
                               check=False)
                pytest.fail(f"the queue did not finish within {QUEUE_TIMEOUT_S} s:\n{status}", pytrace=False)
            time.sleep(5)
    logs = {name: subprocess.run([dvc, "queue", "logs", name], cwd=root, env=env, capture_output=True, text=True,
                                 check=False).stdout for name in EXPERIMENTS}
    return status, logs


def experiment_results(root: Path, env: dict, dvc: str) -> dict[str, SimpleNamespace]:
    """Returns {experiment name: its params.yaml and metrics files} from `dvc exp show --json`."""
    shown = json.loads(run([dvc, "exp", "show", "--json"], root, env).stdout)
    return {rev["name"]: SimpleNamespace(params=rev["data"]["params"]["params.yaml"]["data"],
                                         metrics={path: m.get("data", {}) for path, m in rev["data"]["metrics"].items()})
            for baseline in shown for experiment in baseline.get("experiments") or [] for rev in experiment["revs"]}


@contextlib.contextmanager
def store(kind: str, root: Path, env: dict) -> Iterator[tuple[str, dict]]:
    """Yields (tracking URI, env) of the store `kind`: the project's own mlflow.db, or a fresh tracking server."""
    if kind == "sqlite":
        yield f"sqlite:///{root / 'mlflow.db'}", env
        return
    folder = root.parent / kind
    folder.mkdir()
    if kind == "server":
        with mlflow_server(folder) as url:
            yield url, {**env, "MLFLOW_TRACKING_URI": url}
        return
    with team_stack(folder):
        exported = team_stack_script.load_stack(folder).env()  # what `source .stack/env` exports
        yield exported["MLFLOW_TRACKING_URI"], {**env, **exported}


@pytest.fixture(scope="module", params=["sqlite", "server", "stack"])
def queued(request, baseline, tmp_path_factory):
    """The two experiments run in parallel into one store: the queue's status and logs, `dvc exp show`'s results,
    the store's client and its runs by experiment name."""
    from mlflow import MlflowClient

    root = copy_project(baseline[0], tmp_path_factory.mktemp(request.param) / "project")
    _, env, dvc = baseline
    with store(request.param, root, env) as (uri, store_env):
        status, logs = run_queue(root, store_env, dvc)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name("mnist")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        yield SimpleNamespace(kind=request.param, root=root, status=status, logs=logs, client=client, runs=runs,
                              by_name={r.data.tags.get("dvc.exp_name"): r for r in runs},
                              results=experiment_results(root, env, dvc))


def test_both_queued_experiments_succeed(queued):
    for name in EXPERIMENTS:
        [line] = [line for line in queued.status.splitlines() if f" {name} " in line]
        assert "Success" in line, f"{queued.status}\n{queued.logs[name][-4000:]}"


def test_no_stage_meets_a_locked_database_or_a_half_made_store(queued):
    for name, log in queued.logs.items():
        for symptom in ("database is locked", "already exists", "alembic", "Traceback", "ERROR"):
            assert symptom not in log, f"{name}: {symptom!r}\n{log[-4000:]}"


def test_each_experiment_has_exactly_one_finished_run_tagged_with_its_name(queued):
    assert sorted(r.data.tags.get("dvc.exp_name") for r in queued.runs) == sorted(EXPERIMENTS)
    assert {r.info.status for r in queued.runs} == {"FINISHED"}


def test_each_run_has_its_own_params_and_one_training_step_per_epoch(queued):
    for name, epochs in EXPERIMENTS.items():
        run_ = queued.by_name[name]
        assert run_.data.params["train.epochs"] == str(epochs)
        for key in ("train/d_loss", "train/g_loss", "train/fid"):
            steps = [m.step for m in queued.client.get_metric_history(run_.info.run_id, key)]
            assert steps == list(range(1, epochs + 1)), (name, key, steps)


def test_each_runs_metrics_are_its_own_experiments_results(queued):
    for name, epochs in EXPERIMENTS.items():
        run_, result = queued.by_name[name], queued.results[name]
        assert result.params["train"]["epochs"] == epochs
        metrics = run_.data.metrics
        assert metrics["eval/fid"] == pytest.approx(result.metrics["metrics/eval.json"]["fid"])
        assert metrics["train/best_fid"] == pytest.approx(result.metrics["metrics/train.json"]["best_fid"])
        assert metrics["promotion/version"] == result.metrics["metrics/promotion.json"]["version"]
    fids = {queued.by_name[name].data.metrics["eval/fid"] for name in EXPERIMENTS}
    assert len(fids) == len(EXPERIMENTS)  # two trainings, two results: none was logged into the other's run


def test_each_run_holds_its_generators_artifacts_and_dataset(queued):
    client = queued.client
    for name in EXPERIMENTS:
        run_ = queued.by_name[name]
        run_id = run_.info.run_id
        models = client.search_logged_models(experiment_ids=[run_.info.experiment_id],
                                             filter_string=f"source_run_id = '{run_id}'")
        assert sorted(m.name for m in models) == ["generator", "generator_best"], name
        # The experiment's artifacts are in the store, not in the queued copy that DVC deleted after the run.
        artifacts = {a.path for folder in ("train", "samples", "metrics", "report")
                     for a in client.list_artifacts(run_id, folder)}
        assert {"train/history.csv", "samples/grid.png", "metrics/eval.json", "metrics/promotion.json",
                "report/report.png"} <= artifacts, (name, artifacts)
        [training] = run_.inputs.dataset_inputs
        assert training.dataset.name == "mnist-offline-subset"


def test_the_registry_has_one_applied_version_per_run_and_one_champion(queued):
    client = queued.client
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(v.run_id for v in versions) == sorted(r.info.run_id for r in queued.runs)
    assert {v.tags.get("promotion.applied") for v in versions} == {"true"}
    aliases = client.get_registered_model(MODEL).aliases
    champions = {str(v.version) for v in versions if v.tags["promotion.decision"] == "champion"}
    assert str(aliases["champion"]) in champions


def test_the_later_gate_compares_with_the_champion_the_earlier_one_made(queued):
    # One gate at a time: the first finds no champion and becomes it; the second is scored against that one and
    # either takes the alias or is the challenger. Two gates at once would both find no champion.
    client = queued.client
    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    values = {number: json.loads(v.tags["promotion.values"]) for number, v in versions.items()}
    [first] = [number for number, v in values.items() if "champion_version" not in v]
    [second] = [number for number, v in values.items() if "champion_version" in v]
    assert versions[first].tags["promotion.decision"] == "champion"
    assert str(values[second]["champion_version"]) == first
    aliases = {alias: str(number) for alias, number in client.get_registered_model(MODEL).aliases.items()}
    if versions[second].tags["promotion.decision"] == "champion":
        assert aliases == {"champion": second}
    else:
        assert aliases == {"champion": first, "challenger": second}
