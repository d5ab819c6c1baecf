"""The MLflow model registry: tracking's registry half (pipeline/tracking.py owns the runs, this module the
registered models, their versions and aliases, and the model that serves a generator). No other module calls
MLflow.

One registered model per dataset and architecture, `<arch>-<dataset>` (e.g. `dcgan-mnist`). The register
stage adds the generator `generator:` names as a new version, from the pipeline's own run, and the gate
(pipeline/promotion.py) gives it the `champion` alias or the `challenger` one. Crash-safe by order:

1. register the version (tags: headline metrics, dataset sha256, git commit, params hash, generator sha256);
2. decide, and record the decision in the version's tags (`promotion.*`);
3. move the alias;
4. tag the version `promotion.applied`.

A rerun finds the version by its run and generator hash, so a crash leaves no second version: after 1 it
decides, after 2 it applies the recorded decision, after 3 or 4 it returns what was decided. The champion
alias only ever points at a registered version.

Command line (rollback and inspection; MLflow 3 has no CLI for aliases), the store being the project's:

    python -m pipeline.registry list [--model dcgan-mnist]     # versions, metrics, aliases, decisions
    python -m pipeline.registry promote N [--model ...]        # version N becomes the champion
    python -m pipeline.registry name                           # the model params.yaml trains
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from pipeline import tracking
from pipeline.config import Config, load_config, to_flat_dict
from pipeline.errors import PipelineError
from pipeline.models import load_model
from pipeline.promotion import CHALLENGER, CHAMPION, Decision, decide
from pipeline.serving import BadRequest, answer

log = logging.getLogger(__name__)

# Under the pipeline's run: registry/<generator sha256 prefix>/ holds each registered MLflow model.
ARTIFACT_DIR = "registry"
# The project's code travels with each version, so a version serves with the code it was registered with.
PACKAGE = Path(__file__).resolve().parent
# metrics/eval.json keys copied to each version's tags as metric.<key>.
HEADLINE_METRICS = ("fid", "kid", "precision", "recall", "density", "coverage", "inception_score", "modes",
                    "class_kl", "memorization_distance_ratio", "real_floor_fid", "conditional_accuracy")
MODEL_DESCRIPTION = (
    "DCGAN generators trained by the pipeline's `dvc repro`, one version per run. `@champion` is the served "
    "version (`make serve`): the register stage moves it only to a version whose FID beats the champion's, "
    "re-scored by the same evaluator, by `register.margin`, with no fewer classes and no memorization; "
    "others become `@challenger`. Each version's tags hold its metrics (`metric.*`), data, code and params "
    "hashes and the decision (`promotion.*`). Roll back: `python -m pipeline.registry promote N`.")
GENERATOR_SHA = "generator.sha256"
DECISION = "promotion.decision"
REASONS = "promotion.reasons"
VALUES = "promotion.values"  # the decision's numbers, JSON
APPLIED = "promotion.applied"


class RegistryError(PipelineError):
    """A registered model or version that is not there, or a store that has none."""


class GeneratorModel(mlflow.pyfunc.PythonModel):
    """The served generator: noise (and labels) in, images out; or {"n", "seed"} in, uint8 images out.

    pipeline/serving.py has the request forms. A bad request raises INVALID_PARAMETER_VALUE, which MLflow's
    scoring server answers with a 400 and the message.
    """

    def __init__(self, max_images: int):
        self.max_images = max_images
        self.generator: keras.Model | None = None

    def load_context(self, context) -> None:
        self.generator = load_model(Path(context.artifacts["generator"]))  # Keras' safe mode: no code runs

    def predict(self, context, model_input, params=None) -> np.ndarray:
        try:
            return answer(self.generator, model_input, self.max_images)
        except BadRequest as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


def model_name(config: Config) -> str:
    """Returns the registered model of `config`'s dataset and architecture, e.g. `dcgan-mnist`."""
    return f"{config.model.arch}-{config.data.name}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def version_tags(config: Config, metrics: Mapping[str, float], manifest: Mapping[str, Any], generator_path: Path,
                 classifier_path: Path) -> dict[str, str]:
    """Returns the tags of a new version: headline metrics, data, code, params, generator and evaluator."""
    params = json.dumps(to_flat_dict(config), sort_keys=True)
    tags = {f"metric.{key}": repr(float(metrics[key])) for key in HEADLINE_METRICS if key in metrics}
    tags.update({
        "data.name": config.data.name,
        "data.sha256": str(manifest.get("sha256", "")),
        "data.offline_fallback": str(bool(manifest.get("offline_fallback"))).lower(),
        "git.commit": tracking.git_commit() or "unknown",
        "git.dirty": str(tracking.git_dirty()).lower(),
        "params.hash": hashlib.sha256(params.encode()).hexdigest(),
        "generator": config.generator,
        GENERATOR_SHA: file_sha256(generator_path),
        "evaluator.sha256": file_sha256(classifier_path),
    })
    return tags


def version_description(tags: Mapping[str, str]) -> str:
    """Returns a version's one-paragraph summary: its headline metrics, data and code, from its tags."""
    metrics = ", ".join(f"{key} {float(tags[f'metric.{key}']):.4g}" for key in HEADLINE_METRICS
                        if f"metric.{key}" in tags)
    data = tags.get("data.name", "?") + (" (offline subset)" if tags.get("data.offline_fallback") == "true" else "")
    return (f"{metrics}. Data: {data}, sha256 {tags.get('data.sha256', '?')[:12]}; "
            f"git {tags.get('git.commit', '?')[:12]}; params {tags.get('params.hash', '?')[:12]}.")


def client() -> MlflowClient:
    """Returns a client of the project's store (MLFLOW_TRACKING_URI, else mlflow.db), which must exist."""
    uri = tracking._use_store()  # the same store as the runs
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///").split("?")[0]).is_file():
        raise RegistryError(f"no MLflow store at {uri}: `dvc repro` makes one")
    return MlflowClient()


def register_and_gate(config: Config, run_id: str, generator_path: Path, candidate: Mapping[str, float],
                      tags: Mapping[str, str], score: Callable[[keras.Model], Mapping[str, float]]) -> dict:
    """Returns metrics/promotion.json's content after registering `generator_path` and gating it.

    `candidate` holds the generator's metrics (metrics/eval.json), `score` gives the same metrics of another
    generator under the same evaluator: the champion's. See the module's docstring for the order of steps.
    """
    registry = client()
    name = model_name(config)
    version = find_version(registry, name, run_id, tags[GENERATOR_SHA])
    if version is None:
        version = register_version(registry, name, run_id, generator_path, config.register.max_images, tags)
    elif version.tags.get(APPLIED) == "true":
        log.info("%s version %s was decided before: %s", name, version.version, version.tags[DECISION])
        return recorded(version)
    # One gate at a time, from reading the champion to moving the alias: two parallel experiments (`dvc queue start
    # -j 2`) would each compare with the same champion, and the later one could take the alias from a better
    # version it never saw. The lock is this machine's; runners on several machines that share a tracking server
    # need the same serialisation there (e.g. one register job at a time in CI): MLflow has no compare-and-set
    # on aliases.
    with tracking.store_lock(tracking.tracking_uri(), f"gate-{name}"):
        decision = recorded_decision(version)
        if decision is None:
            decision = gate(registry, name, version, config, candidate, score)
            record_decision(registry, name, version.version, decision)
        else:
            log.info("%s version %s: applying the decision recorded before a crash", name, version.version)
        apply_alias(registry, name, version.version, decision.alias)
        registry.set_model_version_tag(name, version.version, APPLIED, "true")
    log.info("%s version %s is the %s: %s", name, version.version, decision.alias, decision.reasons)
    return {"version": int(version.version), **decision.as_metrics()}


def find_version(registry: MlflowClient, name: str, run_id: str, generator_sha: str) -> ModelVersion | None:
    """Returns the version of `name` registered from run `run_id` with this generator file, if any."""
    try:
        found = registry.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    matches = [v for v in found if v.tags.get(GENERATOR_SHA) == generator_sha]
    return min(matches, key=lambda v: int(v.version), default=None)


def register_version(registry: MlflowClient, name: str, run_id: str, generator_path: Path, max_images: int,
                     tags: Mapping[str, str]) -> ModelVersion:
    """Returns a new version of `name`: the generator wrapped as a GeneratorModel, logged under run `run_id`."""
    artifact_path = f"{ARTIFACT_DIR}/{tags[GENERATOR_SHA][:16]}"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(local), python_model=GeneratorModel(max_images), artifacts={"generator": str(generator_path)},
            code_paths=[str(PACKAGE)],
            # Given, not inferred: inferring loads the model in a subprocess, seconds for nothing.
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"keras=={keras.__version__}",
                              keras.backend.backend(), f"numpy=={np.__version__}"])
        registry.log_artifacts(run_id, str(local), artifact_path)  # the same bytes again after a crash
    try:
        registry.create_registered_model(name, description=MODEL_DESCRIPTION)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{registry.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = registry.create_model_version(name, source, run_id=run_id, tags=dict(tags),
                                            description=version_description(tags))
    log.info("registered %s version %s from run %s", name, version.version, run_id)
    return version


def champion(registry: MlflowClient, name: str) -> ModelVersion | None:
    """Returns the version the `champion` alias of `name` points at, or None."""
    try:
        return registry.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def gate(registry: MlflowClient, name: str, version: ModelVersion, config: Config, candidate: Mapping[str, float],
         score: Callable[[keras.Model], Mapping[str, float]]) -> Decision:
    """Returns the decision for `version`: its metrics against the champion's, scored again by `score`."""
    current = champion(registry, name)
    if current is None:
        return decide(config.register, candidate, None)
    if current.version == version.version:  # made champion by hand before its own decision
        return Decision(CHAMPION, "already the champion (promoted by hand)", {})
    log.info("scoring the champion, %s version %s, with this run's evaluator", name, current.version)
    decision = decide(config.register, candidate, score(load_version(name, current.version)))
    return Decision(decision.alias, decision.reasons, {**decision.values, "champion_version": int(current.version)})


def load_version(name: str, version: str | int) -> keras.Model:
    """Returns the Keras generator inside version `version` of `name`, loaded in safe mode."""
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp))
        files = sorted(local.glob("artifacts/*.keras"))
        if len(files) != 1:
            raise RegistryError(f"{name} version {version} holds {len(files)} .keras generators, not one")
        return load_model(files[0])


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """Yields with MLflow's download progress bars off: a stage log is no terminal."""
    name = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    saved = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def record_decision(registry: MlflowClient, name: str, version: str, decision: Decision) -> None:
    for key, value in ((DECISION, decision.alias), (REASONS, decision.reasons),
                       (VALUES, json.dumps(decision.values, sort_keys=True))):
        registry.set_model_version_tag(name, version, key, value)


def recorded_decision(version: ModelVersion) -> Decision | None:
    """Returns the decision recorded in `version`'s tags, or None if none was."""
    if DECISION not in version.tags:
        return None
    return Decision(version.tags[DECISION], version.tags.get(REASONS, ""), json.loads(version.tags.get(VALUES, "{}")))


def recorded(version: ModelVersion) -> dict:
    """Returns metrics/promotion.json's content as recorded for a decided version."""
    return {"version": int(version.version), **recorded_decision(version).as_metrics()}


def apply_alias(registry: MlflowClient, name: str, version: str, alias: str) -> None:
    """Points `alias` of `name` at `version` (a new champion also stops being the challenger)."""
    registry.set_registered_model_alias(name, alias, version)
    if alias == CHAMPION and str(registry.get_registered_model(name).aliases.get(CHALLENGER)) == str(version):
        registry.delete_registered_model_alias(name, CHALLENGER)


def log_promotion(run: tracking.TrackedRun, result: Mapping[str, Any], path: Path) -> None:
    """Logs the register stage's decision to `run`: numbers as promotion.* metrics, words as tags, the file."""
    run.log_metrics(tracking.grouped(tracking.PROMOTION, result))
    run.set_tags({"promotion.decision": str(result["decision"]), "promotion.reasons": str(result["reasons"]),
                  "promotion.version": str(result["version"])})
    mlflow.log_artifact(str(path), artifact_path="metrics")


def promote(name: str, version: str | int) -> None:
    """Makes version `version` of `name` the champion (a rollback, or overruling the gate)."""
    registry = client()
    try:
        registry.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version}: `python -m pipeline.registry list --model {name}` "
                            f"shows the versions") from None
    apply_alias(registry, name, str(version), CHAMPION)
    registry.set_model_version_tag(name, str(version), "promotion.by_hand", "true")
    log.info("%s version %s is the champion", name, version)


def list_versions(name: str) -> list[dict[str, str]]:
    """Returns one row per version of `name`, newest first: aliases, headline metrics, decision, origin."""
    registry = client()
    try:
        aliases = registry.get_registered_model(name).aliases
    except MlflowException:
        raise RegistryError(f"no registered model {name!r} in the store: the register stage makes it") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(registry.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version)):
        rows.append({"version": str(v.version), "aliases": ",".join(sorted(by_version.get(str(v.version), []))) or "-",
                     **{key: _short(v.tags.get(f"metric.{key}")) for key in ("fid", "modes",
                                                                              "memorization_distance_ratio")},
                     "decision": v.tags.get(DECISION, "undecided"), "generator": v.tags.get("generator", "?"),
                     "run": (v.run_id or "")[:8], "commit": v.tags.get("git.commit", "")[:8]})
    return rows


def _short(value: str | None) -> str:
    return "-" if value is None else f"{float(value):.4g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.registry", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="versions with their metrics, aliases and decisions")
    promoting = commands.add_parser("promote", help="make version N the champion (rollback)")
    promoting.add_argument("version", type=int)
    commands.add_parser("name", help="print the registered model that params.yaml trains")
    for sub in (listing, promoting):
        sub.add_argument("--model", help="registered model name; default: the one params.yaml trains")
    args = parser.parse_args(argv)
    name = getattr(args, "model", None) or model_name(load_config())
    if args.command == "name":
        sys.stdout.write(name + "\n")
    elif args.command == "promote":
        promote(name, args.version)
    else:
        rows = list_versions(name)
        widths = {key: max(len(key), *(len(row[key]) for row in rows)) for key in rows[0]} if rows else {}
        for row in [dict(zip(widths, widths)), *rows]:
            sys.stdout.write("  ".join(str(row[key]).ljust(width) for key, width in widths.items()).rstrip() + "\n")


if __name__ == "__main__":
    from pipeline.cli import run_stage

    run_stage(main)
