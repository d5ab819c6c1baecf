"""`train.distribution: data_parallel`: Keras' DataParallel on the JAX backend, here over 2 CPU devices.

JAX takes its number of CPU devices from XLA_FLAGS when it starts, so the data-parallel jobs run in a
subprocess (tests/distribution_worker.py) with KERAS_BACKEND=jax and --xla_force_host_platform_device_count=2;
the refusals run in this (TensorFlow) process.
"""

import json
import os
import sqlite3
import subprocess
import sys

import keras
import numpy as np
import pytest

import backend_worker
from conftest import ROOT, TINY_OVERRIDES, make_project, merge, run
from pipeline.config import ConfigError, config_from_dict
from pipeline.devices import check_distribution
from pipeline.train import METRIC_NAMES, build_gan, train_and_log
from test_backends import SMOOTH, STEP_EPSILON, STEP_JOBS, digits, params_with, parts, step_inputs, step_mismatches

DEVICES = 2
JAX_ENV = {"KERAS_BACKEND": "jax", "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
DATA_PARALLEL = {"train": {"distribution": "data_parallel"}}
STEP_JOB = "step_dcgan"  # test_backends' step: BatchNorm in the generator, d_steps 2, EMA, label smoothing
TRAIN_IMAGES = 255  # odd: the last image is left out, so that every batch splits across the 2 devices


def run_on_devices(folder, jobs: dict) -> None:
    """Runs `jobs` in tests/distribution_worker.py on JAX with DEVICES CPU devices, each writing folder/<name>.npz."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "distribution_worker.py"),
                             str(folder / "jobs.json"), str(folder)], cwd=ROOT, env={**os.environ, **JAX_ENV},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def result(folder, name: str) -> dict[str, np.ndarray]:
    error = folder / f"{name}.error"
    assert not error.exists(), error.read_text()
    with np.load(folder / f"{name}.npz", allow_pickle=False) as npz:
        out = dict(npz)
    assert out["devices"].tolist() == [f"cpu:{i}" for i in range(DEVICES)]
    assert not out["tensorflow_imported"]
    return out


@pytest.fixture(scope="module")
def jax_jobs(tmp_path_factory):
    """Runs one step on one device and under data_parallel, and a short training that resumes; returns
    (results folder, the step's inputs)."""
    folder = tmp_path_factory.mktemp("distribution")
    params = params_with(STEP_JOBS[STEP_JOB])
    inputs = step_inputs(params)
    np.savez(folder / "step_inputs.npz", **inputs)
    images, labels = digits()
    np.savez(folder / "digits.npz", images=images[:TRAIN_IMAGES], labels=labels[:TRAIN_IMAGES])
    train_params = params_with({"train": {"distribution": "data_parallel", "ema": 0.9}})
    run_on_devices(folder, {
        "step": {"kind": "step", "params": params, "inputs": str(folder / "step_inputs.npz"),
                 "adam_epsilon": STEP_EPSILON, "smooth": SMOOTH},
        "train": {"kind": "train", "params": train_params, "inputs": str(folder / "digits.npz")}})
    return folder, inputs


@pytest.mark.slow
def test_data_parallel_splits_the_global_batch_across_the_devices(jax_jobs):
    r = result(jax_jobs[0], "step")
    batch = len(jax_jobs[1]["images"])
    assert (int(r["none/batch_shards"]), int(r["none/shard_rows"])) == (1, batch)
    assert (int(r["data_parallel/batch_shards"]), int(r["data_parallel/shard_rows"])) == (DEVICES, batch // DEVICES)


@pytest.mark.slow
def test_one_data_parallel_step_equals_one_step_on_one_device(jax_jobs):
    """The same global batch, weights and noise: the same weights, Adam slots, averages, batch statistics and
    metrics after the step, to test_backends' float32 tolerance.

    That tolerance bounds float32 sums regrouped in any order (10 layers of sums of up to 64 x 28 x 28 terms,
    each off by about sqrt(n) u); data parallelism regroups only the sums over the batch, into one partial sum
    per device and an all-reduce, so it fits. BatchNorm statistics taken per device instead of over the global
    batch would not: each half's variance differs from the batch's by far more than rounding, and the
    generator's moving variances (role "statistic") and every weight downstream of them would be off.
    """
    folder, inputs = jax_jobs
    r = result(folder, "step")
    one, parallel = ({key.split("/", 1)[1]: v for key, v in r.items() if key.startswith(f"{d}/")}
                     for d in ("none", "data_parallel"))
    weights = {k.split(":", 1)[1]: v for k, v in inputs.items() if k.startswith("weights:")}
    params = params_with(STEP_JOBS[STEP_JOB])
    roles = backend_worker.roles(build_gan(config_from_dict(params), (28, 28, 1)))
    assert set(roles) | {f"logs/{m}" for m in METRIC_NAMES} <= set(one)
    mismatches = step_mismatches(one, parallel, weights, roles)
    worst = sorted(mismatches.items(), key=lambda kv: -kv[1])[:5]
    print("|one device - data_parallel| / tolerance, largest:", worst)
    assert worst[0][1] <= 1.0, [(key, roles.get(key, "metric"), ratio) for key, ratio in worst]
    for key, start in weights.items():  # the step moved everything compared, on both
        assert not np.array_equal(parallel[key], start), key
    # The check would see per-device statistics: the first BatchNorm's moving variance, taken as the mean of the
    # two halves' variances, would be far outside the tolerance.
    key, local = per_device_moving_variance(params, inputs, weights, one)
    assert step_mismatches({**one, key: local}, one, weights, {key: "statistic"})[key] > 10  # measured: 55


def per_device_moving_variance(params: dict, inputs: dict, weights: dict, one: dict) -> tuple[str, np.ndarray]:
    """Returns the key of the generator's first BatchNorm moving variance and its value after the step of `one`
    had each device normalized by its half of the batch: the mean of the halves' variances for the batch's.

    That BatchNorm normalizes noise @ kernel (the Dense before it has no bias); the step moved its moving
    variance from 1 by a factor times (batch variance - 1), the same factor with per-device statistics.
    """
    generator = build_gan(config_from_dict(params), (28, 28, 1)).generator
    first = next(layer for layer in generator.layers if isinstance(layer, keras.layers.BatchNormalization))
    key = f"generator/{[id(v) for v in generator.weights].index(id(first.moving_variance))}"
    x = inputs["noise"].astype(np.float64) @ weights["generator/0"]
    whole, halves = x.var(axis=0), np.mean([half.var(axis=0) for half in np.split(x, DEVICES)], axis=0)
    np.testing.assert_allclose(one[key] - 1, (one[key][0] - 1) / (whole[0] - 1) * (whole - 1), rtol=1e-3)
    return key, 1 + (one[key] - 1) * (halves - 1) / (whole - 1)


@pytest.mark.slow
def test_data_parallel_training_checkpoints_and_resumes_every_variable(jax_jobs):
    r = result(jax_jobs[0], "train")
    history = dict(zip(r["history_columns"].tolist(), r["history"].T))
    assert history["epoch"].tolist() == [1, 2] and np.isfinite(r["history"]).all()
    assert r["fid_epochs"].tolist() == [1, 2]  # FID tracked each epoch
    for part in backend_worker.PARTS:  # both models (BatchNorm statistics too), both optimizers (EMA too)
        after, restored = parts(r, "after/", part), parts(r, "restored/", part)
        assert len(after) == len(restored) > 0, part
        for a, b in zip(after, restored):
            np.testing.assert_array_equal(a, b, err_msg=part)
    np.testing.assert_array_equal(r["restored_rng"], r["rng_after"])
    # 2 epochs of 254 images in batches of 32, the last of 30: both optimizers took every step.
    assert int(r["g_iterations"]) == int(r["d_iterations"]) == 2 * 8
    averages = [r[k] for k in r if k.startswith("ema/")]
    assert averages and all(np.isfinite(a).all() for a in averages)
    np.testing.assert_array_equal(r["resumed_from"], r["rng_after"])  # resumed where the checkpoint stopped
    assert r["resumed_epochs"].tolist() == [1, 2, 3] and np.isfinite(r["resumed_losses"]).all()


@pytest.mark.slow
def test_tiny_train_stage_runs_data_parallel_and_tags_the_devices(tmp_path):
    root, env, dvc = make_project(tmp_path, merge(TINY_OVERRIDES, DATA_PARALLEL))
    env.update(JAX_ENV)
    output = run([dvc, "repro", "train"], root, env)
    log = output.stdout + output.stderr
    assert "distribution data_parallel" in log and "distribution.devices cpu:0,cpu:1" in log
    with sqlite3.connect(root / "mlflow.db") as db:
        tags = dict(db.execute("SELECT key, value FROM tags"))
    assert (tags["distribution"], tags["distribution.devices"], tags["distribution.device_count"],
            tags["distribution.mesh"]) == ("data_parallel", "cpu:0,cpu:1", "2", "batch=2")
    summary = json.loads((root / "metrics" / "train.json").read_text())
    assert summary["epochs"] == 1 and np.isfinite(summary["best_fid"])


def test_distribution_must_be_one_of_the_choices(tiny_params):
    with pytest.raises(ConfigError, match=r"^train\.distribution: 'mirrored' is not supported; "
                                          r"allowed values: none, data_parallel$"):
        config_from_dict(merge(tiny_params, {"train": {"distribution": "mirrored"}}))


def test_data_parallel_on_tensorflow_is_refused_naming_the_key_and_the_backend_to_use():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("refused on TensorFlow only")
    with pytest.raises(ConfigError, match=r"^train\.distribution: data_parallel runs on the JAX backend only.*"
                                          r"KERAS_BACKEND=jax.*tensorflow#72388"):
        check_distribution("data_parallel", 64)


def test_data_parallel_on_tensorflow_is_refused_before_a_run_opens(tiny_params, monkeypatch):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("refused on TensorFlow only")
    opened = []
    monkeypatch.setattr("pipeline.tracking.start_run", lambda *a, **k: opened.append(a))
    config = config_from_dict(merge(tiny_params, DATA_PARALLEL))
    with pytest.raises(ConfigError, match="KERAS_BACKEND=jax"):
        train_and_log(config, np.zeros((64, 28, 28, 1), np.float32), np.zeros(64, np.int32), None, {}, None)
    assert not opened


def test_no_distribution_is_accepted_on_every_backend():
    check_distribution("none", 63)


def test_a_batch_that_does_not_split_across_the_devices_is_refused(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    monkeypatch.setattr(keras.distribution, "list_devices", lambda: ["gpu:0", "gpu:1", "gpu:2", "gpu:3"])
    check_distribution("data_parallel", 64)
    with pytest.raises(ConfigError, match=r"^train\.batch_size: 66 does not split evenly across the 4 devices of "
                                          r"train\.distribution: data_parallel; use a multiple of 4$"):
        check_distribution("data_parallel", 66)
