"""Versioning you can go back to (README, "Versioning data and models"): a git commit pins data, checkpoints and
generator through a real DVC remote.

The module runs the README's workflow once on a tiny project: point the default remote at a folder outside the
project, `dvc repro`, commit what the README says to commit, `dvc push`; then a new `data.limit` in params.yaml
(a new dataset version, so new checkpoints and a new generator), `dvc repro`, commit, push. Tests that only read
that project share it; going back happens in a copy (conftest.copy_project) or in a fresh `git clone`, so the
tests hold in any order.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import TINY_OVERRIDES, copy_project, make_project, run

# What the README tells users to `git add` after a run: DVC has already written .gitignore files into these
# folders for every output it caches, so git takes only the small `cache: false` outputs (metrics, run record,
# CSVs, PNGs) and DVC's .gitignore files.
COMMIT_PATHS = ["dvc.lock", "params.yaml", "data", "models", "reports", "samples", "metrics"]
# Every folder a stage writes into.
OUTPUT_FOLDERS = ("data", "models", "reports", "samples", "metrics")
MODEL_NAME = "dcgan-mnist"  # the registered model of the tiny profile: <arch>-<dataset>

pytestmark = pytest.mark.slow  # two tiny `dvc repro` runs, a few minutes


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def output_hashes(root: Path) -> dict[str, str]:
    """Returns {path: sha256} of every file the pipeline's stages wrote (and DVC's .gitignore files among them)."""
    return {path.relative_to(root).as_posix(): sha256(path)
            for folder in OUTPUT_FOLDERS for path in sorted((root / folder).rglob("*")) if path.is_file()}


def git(root: Path, env: dict, *args: str) -> str:
    return run(["git", *args], root, env).stdout.strip()


def dvc_status(root: Path, env: dict, dvc: str) -> dict:
    """Returns `dvc status --json`: {} when every stage is up to date and every output is as dvc.lock says."""
    return json.loads(run([dvc, "status", "--json"], root, env).stdout)


def commit_run(root: Path, env: dict, message: str) -> str:
    """Commits a run the README's way and returns the commit's hash."""
    git(root, env, "add", *COMMIT_PATHS)
    git(root, env, "commit", "-qm", message)
    return git(root, env, "rev-parse", "HEAD")


def uncached_outputs(root: Path) -> set[str]:
    """Returns the paths of the outputs and metrics dvc.yaml declares `cache: false`: the ones git must hold."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {path for stage in stages.values() for entry in [*stage.get("outs", []), *stage.get("metrics", [])]
            if isinstance(entry, dict) for path, options in entry.items() if options.get("cache") is False}


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """The README's workflow, twice; returns a dict: root, env, dvc, remote, first/second (commit hashes),
    first_outputs/second_outputs ({path: sha256} right after each run), status_after_commit (git status
    --porcelain right after the first run's commit) and diff_head (`dvc metrics diff HEAD --json` after the
    second run, before its commit: what CI compares)."""
    root, env, dvc = make_project(tmp_path_factory.mktemp("project"), TINY_OVERRIDES)
    # A remote outside the project, by absolute path, so that a clone elsewhere reaches the same one.
    remote = tmp_path_factory.mktemp("remote")
    run([dvc, "remote", "add", "-d", "-f", "local", str(remote)], root, env)
    git(root, env, "commit", "-qam", "remote")

    run([dvc, "repro"], root, env)
    first = commit_run(root, env, "first run")
    status_after_commit = git(root, env, "status", "--porcelain", "--untracked-files=all")
    run([dvc, "push"], root, env)
    first_outputs = output_hashes(root)

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["limit"] += 64  # a new dataset version: new checkpoints, a new generator
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run([dvc, "repro"], root, env)
    diff_head = json.loads(run([dvc, "metrics", "diff", "HEAD", "--json"], root, env).stdout)
    second = commit_run(root, env, "second run")
    run([dvc, "push"], root, env)
    return {"root": root, "env": env, "dvc": dvc, "remote": remote, "first": first, "second": second,
            "first_outputs": first_outputs, "second_outputs": output_hashes(root),
            "status_after_commit": status_after_commit, "diff_head": diff_head}


@pytest.fixture(scope="module")
def back_at_first(versions, tmp_path_factory):
    """A copy of the project after `git checkout <first> && dvc checkout`: (root, env, dvc). Tests only read it."""
    root = copy_project(versions["root"], tmp_path_factory.mktemp("back") / "project")
    env, dvc = versions["env"], versions["dvc"]
    git(root, env, "checkout", "-q", versions["first"])
    run([dvc, "checkout"], root, env)
    return root, env, dvc


def test_the_two_commits_pin_different_data_checkpoints_and_generators(versions):
    # Otherwise restoring the first commit would prove nothing.
    first, second = versions["first_outputs"], versions["second_outputs"]
    for path in ("data/processed/train.npz", "models/checkpoints/checkpoint.npz", "models/generator.keras",
                 "models/generator_best.keras", "metrics/eval.json"):
        assert first[path] != second[path], path


def test_the_readme_commit_leaves_nothing_uncommitted(versions):
    assert versions["status_after_commit"] == ""


def test_git_holds_exactly_the_uncached_outputs_and_dvc_the_rest(versions):
    root, env = versions["root"], versions["env"]
    tracked = set(git(root, env, "ls-files", *OUTPUT_FOLDERS).splitlines())
    ignore_files = {path for path in tracked if path.endswith(".gitignore")}
    assert tracked - ignore_files == uncached_outputs(root)
    assert "models/.gitignore" in ignore_files and "data/.gitignore" in ignore_files
    assert "dvc.lock" in git(root, env, "ls-files", "dvc.lock")


def test_checkout_restores_the_first_generator_bit_for_bit(versions, back_at_first):
    root, *_ = back_at_first
    for name in ("generator.keras", "generator_best.keras"):
        assert sha256(root / "models" / name) == versions["first_outputs"][f"models/{name}"], name


def test_checkout_restores_every_output_of_the_first_run_data_and_checkpoints_included(versions, back_at_first):
    root, *_ = back_at_first
    assert output_hashes(root) == versions["first_outputs"]


def test_dvc_status_is_clean_after_checkout(back_at_first):
    assert dvc_status(*back_at_first) == {}


def test_checked_out_run_record_and_decision_name_the_checked_out_generator_in_the_mlflow_store(back_at_first):
    # mlflow.db is not versioned: it stays as the last run left it. The files git restores must still name
    # what is in it: models/mlflow_run.json the first run, metrics/promotion.json the version registered
    # from the generator now in models/.
    from mlflow import MlflowClient

    root, *_ = back_at_first
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    run_id = json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"
    promotion = json.loads((root / "metrics/promotion.json").read_text())
    assert promotion["version"] == 1 and promotion["decision"] == "champion"
    version = client.get_model_version(MODEL_NAME, str(promotion["version"]))
    assert version.run_id == run_id
    generator = yaml.safe_load((root / "params.yaml").read_text())["generator"]  # best | last
    chosen = root / "models" / ("generator_best.keras" if generator == "best" else "generator.keras")
    assert version.tags["generator.sha256"] == sha256(chosen)


def test_metrics_diff_between_the_commits_shows_the_changed_fid(versions):
    root, env, dvc = versions["root"], versions["env"], versions["dvc"]
    diff = json.loads(run([dvc, "metrics", "diff", versions["first"], versions["second"], "--json"],
                          root, env).stdout)
    fid = diff["metrics/eval.json"]["fid"]
    first = json.loads(run(["git", "show", f"{versions['first']}:metrics/eval.json"], root, env).stdout)["fid"]
    second = json.loads((root / "metrics/eval.json").read_text())["fid"]
    assert (fid["old"], fid["new"]) == (first, second) and first != second


def test_metrics_diff_head_compares_a_new_run_with_the_last_committed_one(versions):
    # What CI's `dvc metrics diff HEAD` shows: a baseline exists only because the first run was committed.
    root, env = versions["root"], versions["env"]
    fid = versions["diff_head"]["metrics/eval.json"]["fid"]
    committed = json.loads(run(["git", "show", f"{versions['first']}:metrics/eval.json"], root, env).stdout)
    assert fid["old"] == committed["fid"] and fid["new"] != fid["old"]


def test_a_fresh_clone_pulls_each_commits_outputs_from_the_remote_alone(versions, tmp_path):
    env, dvc = versions["env"], versions["dvc"]
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(versions["root"]), str(clone)], check=True, env=env)
    assert not (clone / ".dvc" / "cache").exists()  # nothing local: every output comes from the remote
    for rev, outputs in ((versions["second"], versions["second_outputs"]),
                         (versions["first"], versions["first_outputs"])):
        git(clone, env, "checkout", "-q", rev)
        run([dvc, "pull"], clone, env)
        assert sha256(clone / "models/generator.keras") == outputs["models/generator.keras"], rev
        assert output_hashes(clone) == outputs, rev
        assert dvc_status(clone, env, dvc) == {}, rev
