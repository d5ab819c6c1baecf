"""Training in 2 processes (KERAS_DISTRIBUTION_*, one CPU device each) on 127.0.0.1, as on 2 machines.

A tiny project is trained up to its classifier once; then the train stage runs in 2 processes, process 1 in a
copy of the project as on a second machine with its own disk. Once process 0 has checkpointed an epoch, process 1
is killed (and process 0, left waiting in an all-reduce, stopped); scripts/train_processes.sh then runs both again
on the one project: they resume from process 0's checkpoint and finish, logging into the one MLflow run. Last, one
process on 2 CPU devices trains the same from scratch, for the same numbers.
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, TINY_OVERRIDES, free_port, make_project, merge, run, stop
from pipeline.config import ConfigError
from pipeline.devices import check_distribution, initialize_processes, is_writer, process_count
from pipeline.train import epoch_order, process_batches

EPOCHS = 3
PARAMS = merge(TINY_OVERRIDES, {"train": {"distribution": "data_parallel", "epochs": EPOCHS, "checkpoint_every": 1}})
# Generous: the machine is shared and may be several times slower at any moment.
TIMEOUT_S = 900


def checkpointed_epoch(root: Path) -> int:
    """Returns the epoch of the project's checkpoint, 0 while there is none (or it is being replaced)."""
    try:
        with np.load(root / "models" / "checkpoints" / "checkpoint.npz", allow_pickle=False) as npz:
            return json.loads(str(npz["state"]))["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def files(root: Path) -> dict[str, int]:
    """Returns every file under `root` outside .git and DVC's cache, with its modification time in ns."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and not str(p.relative_to(root)).startswith((".git/", ".dvc/cache/", ".dvc/tmp/"))}


def start(cwd: Path, env: dict, process_id: int, port: int, log: Path) -> subprocess.Popen:
    """Returns process `process_id` of 2 running the train stage in `cwd`, its output in `log`."""
    env = {**env, "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
           "KERAS_DISTRIBUTION_PROCESS_ID": str(process_id)}
    with open(log, "w") as output:
        return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=cwd, env=env, stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_after_a_kill_and_log_one_run(tmp_path):
    root, env, dvc = make_project(tmp_path / "host0", PARAMS)
    env = {k: v for k, v in env.items() if not k.startswith("KERAS_DISTRIBUTION_")}
    env.update(KERAS_BACKEND="jax", XLA_FLAGS="")  # one CPU device per process
    run([dvc, "repro", "classifier"], root, env)
    second = tmp_path / "host1"  # process 1's machine: the same checkout and inputs, its own disk
    subprocess.run(["cp", "-a", str(root), str(second)], check=True)
    before = files(second)

    port, logs = free_port(), [tmp_path / "process0.log", tmp_path / "process1.log"]
    processes = [start(root, env, 0, port, logs[0]), start(second, env, 1, port, logs[1])]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while checkpointed_epoch(root) < 1:
            for p, log in zip(processes, logs):
                assert p.poll() is None, f"a process exited before the first checkpoint:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, logs[0].read_text()[-4000:]
            time.sleep(0.2)
        os.killpg(processes[1].pid, signal.SIGKILL)  # process 1's machine fails mid-run
    finally:
        for p in processes:
            stop(p)
    killed_after = checkpointed_epoch(root)
    assert 1 <= killed_after < EPOCHS
    assert files(second) == before, "process 1 wrote files"
    first_log = logs[0].read_text() + logs[1].read_text()
    assert "distribution.processes 2" in first_log and "distribution.devices cpu:0,cpu:" in first_log

    script_log = tmp_path / "train_processes.log"
    with open(script_log, "w") as output:
        script = subprocess.Popen([str(ROOT / "scripts" / "train_processes.sh"), "2", str(free_port())], cwd=root,
                                  env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        script.wait(timeout=TIMEOUT_S)
    finally:
        stop(script)  # and both processes, were they still running
    log = script_log.read_text()
    assert script.returncode == 0, log[-4000:]
    # Both processes resume at process 0's checkpoint: process 1 from the variables process 0 sends it.
    assert f"after epoch {killed_after}" in log, log[-4000:]
    summary = json.loads((root / "metrics" / "train.json").read_text())
    assert summary["epochs"] == EPOCHS and np.isfinite(summary["best_fid"])
    history = (root / "reports" / "train" / "history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == [str(e) for e in range(1, EPOCHS + 1)]
    assert "train:" in (root / "dvc.lock").read_text()  # the script recorded the stage's outputs

    with sqlite3.connect(root / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid FROM runs").fetchall()
        assert len(runs) == 1, runs  # the first launch's run, resumed: none from process 1, none new
        steps = db.execute("SELECT step, COUNT(*) FROM metrics WHERE key = 'train/d_loss' GROUP BY step").fetchall()
        tags = dict(db.execute("SELECT key, value FROM tags"))
    assert sorted(steps) == [(e, 1) for e in range(1, EPOCHS + 1)], steps
    assert (tags["distribution.processes"], tags["distribution.device_count"]) == ("2", "2")

    # One process on 2 devices, uninterrupted, trains on the same global batches with the same noise: the same
    # metrics and FIDs. (Bitwise here: each all-reduce adds 2 partial sums either way; the tolerance only allows
    # for another CPU's kernels.)
    alone = tmp_path / "alone"
    subprocess.run(["cp", "-a", str(second), str(alone)], check=True)
    run([sys.executable, "-m", "stages.train"], alone, {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        timeout=TIMEOUT_S)
    for name in ("history.csv", "fid.csv"):
        ours, theirs = (pd.read_csv(r / "reports" / "train" / name).drop(columns="seconds", errors="ignore")
                        for r in (root, alone))
        pd.testing.assert_frame_equal(ours, theirs, rtol=1e-5)


def test_processes_together_feed_the_global_batches_of_one_process():
    images, labels = np.arange(40)[:, None] * np.ones((1, 3)), np.arange(40) % 10
    alone = list(process_batches(images, labels, 16, 7, range(1, 3), 0, 1))
    parts = [list(process_batches(images, labels, 16, 7, range(1, 3), index, 2)) for index in range(2)]
    assert len(alone) == len(parts[0]) == len(parts[1]) == 2 * 3  # 2 epochs of batches of 16, 16 and 8
    for whole, first, second in zip(alone, *parts):
        assert len(first[0]) == len(second[0]) == len(whole[0]) // 2
        for i in range(2):  # in process order, the processes' slices are the batch
            np.testing.assert_array_equal(np.concatenate([first[i], second[i]]), whole[i])
    rows = np.concatenate([batch[1] for batch in alone[:3]])
    np.testing.assert_array_equal(rows, np.arange(40)[epoch_order(7, 1, 40)] % 10)  # epoch 2's order, each row once
    assert not np.array_equal(epoch_order(7, 1, 40), epoch_order(7, 2, 40))  # reshuffled every epoch
    np.testing.assert_array_equal(epoch_order(7, 2, 40), epoch_order(7, 2, 40))  # the same after a resume


@pytest.mark.parametrize("value", ["two", "0", "-1"])
def test_a_number_of_processes_that_is_not_one_is_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", value)
    with pytest.raises(ConfigError, match=r"^KERAS_DISTRIBUTION_NUM_PROCESSES=.* is not a number of processes"):
        initialize_processes()


def test_one_process_joins_nothing(monkeypatch):
    monkeypatch.delenv("KERAS_DISTRIBUTION_NUM_PROCESSES", raising=False)
    assert initialize_processes() == 1 and process_count() == 1 and is_writer()


def test_several_processes_need_the_coordinator_and_an_id_in_range(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    monkeypatch.delenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", raising=False)
    monkeypatch.delenv("KERAS_DISTRIBUTION_PROCESS_ID", raising=False)
    with pytest.raises(ConfigError,
                       match="also needs KERAS_DISTRIBUTION_JOB_ADDRESSES and KERAS_DISTRIBUTION_PROCESS_ID"):
        initialize_processes()
    monkeypatch.setenv("KERAS_DISTRIBUTION_JOB_ADDRESSES", "127.0.0.1:1")
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "2")
    with pytest.raises(ConfigError, match=r"^KERAS_DISTRIBUTION_PROCESS_ID='2' is not a process id; allowed values: "
                                          r"0 to 1$"):
        initialize_processes()


def test_several_processes_on_tensorflow_are_refused_naming_the_backend(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    monkeypatch.setenv("KERAS_DISTRIBUTION_NUM_PROCESSES", "2")
    with pytest.raises(ConfigError, match="KERAS_BACKEND=jax"):
        initialize_processes()


def test_several_processes_without_data_parallel_are_refused(monkeypatch):
    monkeypatch.setattr("pipeline.devices.process_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"^train\.distribution: none trains in one process"):
        check_distribution("none", 64)
