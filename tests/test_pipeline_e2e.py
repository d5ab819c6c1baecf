"""End to end: `dvc repro` in a fresh git repo runs every stage into one MLflow run, then skips them all.

The module reproduces one project; tests that only read it share it, and each test that changes it (params,
code, the DVC remote, a queued experiment) works on its own copy (conftest.copy_project), so the tests hold
in any order.
"""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY_OVERRIDES, copy_project, default_params, make_project, merge, queue_started, run
from imports import stage_closures

SHIPPED_ARCH = default_params()["model"]["arch"]
SHIPPED_MODE_SEEKING = default_params()["train"]["mode_seeking"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh git + DVC project with the tiny profile of the shipped recipe (architecture and loss), after one
    `dvc repro`; yields (root, env, dvc, output)."""
    shipped = merge(TINY_OVERRIDES, {"model": {"arch": SHIPPED_ARCH}, "train": {"mode_seeking": SHIPPED_MODE_SEEKING}})
    root, env, dvc = make_project(tmp_path_factory.mktemp("project"), shipped)
    output = run([dvc, "repro"], root, env)
    yield root, env, dvc, output.stdout


@pytest.fixture
def own_project(project, tmp_path):
    """A copy of the reproduced project for a test that changes it: (root, env, dvc)."""
    root, env, dvc, _ = project
    return copy_project(root, tmp_path / "project"), env, dvc


def stages(root: Path) -> list[str]:
    """Returns the names of the stages in the project's dvc.yaml."""
    return list(yaml.safe_load((root / "dvc.yaml").read_text())["stages"])


def test_repro_runs_every_stage(project):
    root, _, _, stdout = project
    assert len(stages(root)) >= 6
    for stage in stages(root):
        assert f"Running stage '{stage}'" in stdout


def test_every_declared_output_exists(project):
    root, *_ = project
    for path in ("data/raw/mnist/manifest.json", "data/processed/train.npz", "data/processed/holdout.npz",
                 "data/processed/stats.csv", "models/generator.keras", "models/discriminator.keras",
                 "models/generator_best.keras", "models/checkpoints/checkpoint.npz", "models/classifier.keras",
                 "models/mlflow_run.json", "reports/train/history.csv", "reports/train/fid.csv",
                 "reports/train/grids/epoch_0001.png", "samples/grid.png", "samples/interpolation.png",
                 "reports/eval/report.png", "metrics/classifier.json", "metrics/train.json", "metrics/eval.json",
                 "dvc.lock"):
        assert (root / path).is_file(), path


def test_samples_are_uint8_nhwc(project):
    root, *_ = project
    with np.load(root / "samples/samples.npz", allow_pickle=False) as f:
        assert f["images"].shape == (TINY_OVERRIDES["sample"]["count"], 28, 28, 1)
        assert f["images"].dtype == np.uint8


def test_eval_metrics_are_real_numbers(project):
    root, *_ = project
    metrics = json.loads((root / "metrics/eval.json").read_text())
    for key in ("fid", "real_floor_fid", "fid_untrained", "kid", "kid_std", "real_floor_kid", "precision",
                "recall", "density", "coverage", "inception_score", "inception_score_std",
                "classifier_holdout_accuracy", "modes", "class_kl", "memorization_distance_ratio",
                "memorization_train_closer_fraction", "fid_best", "fid_last", "best_epoch", "last_epoch"):
        assert np.isfinite(metrics[key]), key
    assert metrics["real_floor_fid"] < metrics["fid_untrained"]
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # flat, for dvc metrics diff
    manifest = json.loads((root / "data/raw/mnist/manifest.json").read_text())
    assert manifest["offline_fallback"] is True and manifest["images"] == 5000


def test_one_mlflow_run_holds_params_metrics_artifacts_model_and_tags(project):
    from mlflow.tracking import MlflowClient

    root, env, *_ = project
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert re.fullmatch(rf"mnist-{SHIPPED_ARCH}-[0-9a-f]{{8}}", run.info.run_name)
    assert run.info.run_id == json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    assert run.data.params["train.epochs"] == "1" and run.data.params["train.lr"] == "0.0008"
    assert run.data.params["model.generator_filters"] == "[16, 8]"
    # Grouped by stage, so the UI draws sections: per-epoch training, evaluation, per-class counts, the gate.
    for key in ("train/d_loss", "train/g_loss", "train/d_acc_real", "train/d_acc_fake", "train/d_real",
                "train/d_fake", "train/fid", "train/best_epoch", "eval/fid", "eval/inception_score",
                "eval/classifier_holdout_accuracy", "eval/modes", "eval/kid", "eval/precision", "eval/recall",
                "eval/coverage", "eval/class_count/0", "eval/class_count/9", "promotion/version"):
        assert key in run.data.metrics, key
    assert not [key for key in run.data.metrics if "/" not in key]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/d_loss")] == [1]
    artifacts = {a.path for folder in ("train", "samples", "metrics")
                 for a in client.list_artifacts(run.info.run_id, folder)}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"train/history.csv", "train/fid.csv", "samples/grid.png", "samples/interpolation.png",
            "metrics/eval.json", "report/report.png"} <= artifacts
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    tags = run.data.tags
    assert tags["git.commit"] == head and tags["git.dirty"] == "false"
    # What the step ran with: this process' oneDNN (make test sets TF_ENABLE_ONEDNN_OPTS), the tiny float32.
    expected_onednn = {"0": "off", "1": "on"}.get(os.environ.get("TF_ENABLE_ONEDNN_OPTS", ""), tags["speed.onednn"])
    assert (tags["speed.onednn"], tags["speed.dtype_policy"], tags["speed.xla"]) == (expected_onednn, "float32", "off")
    # train.winograd auto: on where oneDNN is, in float32, for the generator's stride-1 5x5 layer at least.
    assert tags["speed.winograd"] == expected_onednn
    assert (int(tags["speed.winograd_layers"]) > 0) == (expected_onednn == "on")
    assert tags["speed.cpu_units"]
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(root / "mlruns")
    assert tags["data.offline_fallback"] == "true" and "OFFLINE FALLBACK" in tags["data.warning"]
    manifest = json.loads((root / "data/raw/mnist/manifest.json").read_text())
    assert tags["data.sha256"] == manifest["sha256"] and tags["data.source"] == manifest["source"]
    [training] = run.inputs.dataset_inputs  # the UI's Datasets panel and lineage
    assert (training.dataset.name, training.dataset.digest) == ("mnist-offline-subset", manifest["sha256"][:36])
    assert training.dataset.source_type == "code" and [t.value for t in training.tags] == ["training"]
    assert any(key.startswith("dvc.train.models/generator.keras") for key in tags)
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert sorted(m.name for m in models) == ["generator", "generator_best"]
    assert {m.source_run_id for m in models} == {run.info.run_id}


def test_rerun_skips_every_stage(project):
    root, env, dvc, _ = project
    stdout = run([dvc, "repro"], root, env).stdout
    for stage in stages(root):
        assert f"Stage '{stage}' didn't change, skipping" in stdout
    assert "Running stage" not in stdout


def dvc_status(root: Path, env: dict, dvc: str) -> dict:
    """Returns `dvc status --json`: {stage: [{"changed deps": {path: "modified"}}, ...]}, {} when up to date."""
    return json.loads(run([dvc, "status", "--json"], root, env).stdout)


def changed_deps(status: dict) -> dict[str, dict[str, str]]:
    """Returns {stage: {dep: change}} of the "changed deps" entries in a `dvc status --json`."""
    return {stage: {dep: change for entry in entries if isinstance(entry, dict)
                    for dep, change in entry.get("changed deps", {}).items()}
            for stage, entries in status.items()}


def test_editing_a_code_file_changes_exactly_the_stages_whose_imports_reach_it(own_project):
    # `dvc status` names a stage only for its own changed deps or outs: a stage downstream of a changed one is
    # not named (its deps, the upstream outputs, are unchanged until upstream reruns). So editing a module must
    # name exactly the stages that import it, each with that module as its one changed dep.
    root, env, dvc = own_project
    closures = stage_closures(yaml.safe_load((root / "dvc.yaml").read_text())["stages"], root)
    assert dvc_status(root, env, dvc) == {}
    reported, expected = {}, {}
    for path in sorted([*(root / "pipeline").rglob("*.py"), *(root / "stages").rglob("*.py")]):
        name = path.relative_to(root).as_posix()
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        reported[name] = changed_deps(dvc_status(root, env, dvc))
        path.write_bytes(original)  # one edit at a time
        expected[name] = {stage: {name: "modified"} for stage, code in closures.items()
                          if any(str(file) == name for file in code)}
    assert reported == expected


def test_plots_draw_the_three_curves_first_then_each_picture_once(project, tmp_path):
    root, env, dvc, _ = project
    shown = json.loads(run([dvc, "plots", "show", "--json", "-o", str(tmp_path / "json")], root, env).stdout)
    kinds = {plot: {entry["type"] for entry in entries} for plot, entries in shown["data"].items()}
    plots = list(kinds)  # in the order drawn
    # The three named curves first; after them pictures only, not also a default curve of each CSV.
    assert plots[:3] == ["losses", "discriminator", "fid"] and all(kinds[plot] == {"vega"} for plot in plots[:3])
    assert all(kinds[plot] == {"image"} for plot in plots[3:]), kinds
    run([dvc, "plots", "show", "-o", str(tmp_path / "html")], root, env)
    images = re.findall(r'<img src="([^"]+)"', (tmp_path / "html" / "index.html").read_text())
    assert len(images) == len(set(images)), images
    assert {"static/workspace_samples_grid.png", "static/workspace_samples_interpolation.png",
            "static/workspace_reports_eval_report.png",
            "static/workspace_reports_train_grids_epoch_0001.png"} == set(images)


def test_changing_epochs_invalidates_only_train_and_after(own_project):
    root, env, dvc = own_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["epochs"] = 2
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stdout = run([dvc, "repro", "--dry"], root, env).stdout
    assert "Running stage 'train'" in stdout
    assert "Running stage 'download'" not in stdout and "Running stage 'normalize'" not in stdout


def test_queued_experiment_copy_resolves_to_the_project_store(tmp_path, monkeypatch):
    from pipeline.tracking import project_root, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    copy = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    assert project_root(copy) == tmp_path.resolve()
    assert tracking_uri(copy) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_tracking_uri_from_the_environment_wins(monkeypatch, tmp_path):
    from pipeline.tracking import tracking_uri

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_push_sends_data_and_models_to_the_default_remote(own_project):
    root, env, dvc = own_project
    run([dvc, "push"], root, env)
    assert len([p for p in (root / ".dvc-remote").rglob("*") if p.is_file()]) >= 10
    status = run([dvc, "status", "--cloud"], root, env).stdout
    assert "Cache and remote 'local' are in sync" in status


def test_queued_experiment_runs_in_a_copy_and_logs_into_the_project_store(own_project):
    from mlflow.tracking import MlflowClient

    root, env, dvc = own_project
    run([dvc, "exp", "run", "--queue", "-n", "two-epochs", "-S", "train.epochs=2"], root, env)
    with queue_started(root, env, dvc):
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = run([dvc, "queue", "status"], root, env).stdout
            if "two-epochs" in status and not any(s in status for s in ("Queued", "Running")):
                break
            time.sleep(3)
    assert "Success" in status, status
    shown = json.loads(run([dvc, "exp", "show", "--json"], root, env).stdout)
    assert "two-epochs" in json.dumps(shown) and '"fid"' in json.dumps(shown)
    assert not list((root / ".dvc" / "tmp").rglob("mlflow.db"))
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist")
    queued = [r for r in client.search_runs([experiment.experiment_id])
              if r.data.tags.get("dvc.exp_name") == "two-epochs"]
    assert len(queued) == 1
    assert queued[0].data.params["train.epochs"] == "2" and "eval/fid" in queued[0].data.metrics
    assert queued[0].data.tags["dvc.exp_baseline_rev"] == queued[0].data.tags["git.commit"]
    # Its artifacts too land in the project, not in the temporary copy DVC deletes after the run.
    assert Path(queued[0].info.artifact_uri.removeprefix("file://")).is_relative_to(root / "mlruns")
