"""The same training code on both Keras backends: TensorFlow here, JAX in a subprocess without TensorFlow.

Keras fixes its backend at import, so one JAX process (tests/backend_worker.py) runs every JAX job
of this file; each test checks its job. One step from the same weights and noise gives the same
weights on both backends: the JAX step is the TensorFlow step's algorithm, not just a runnable one.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import backend_worker
from conftest import ROOT, TINY_OVERRIDES, _mnist, default_params, merge
from pipeline.train import METRIC_NAMES, build_gan

EPOCHS = 2
STEPS = 256 // 32  # per epoch: 256 digits, the tiny batch of 32

TRAIN_JOBS = {
    # bfloat16 compute, the generator's EMA and annealed instance noise.
    "train_dcgan": {"model": {"arch": "dcgan"}, "train": {"mixed_precision": "bfloat16", "ema": 0.9,
                                                           "instance_noise": 0.2}},
    "train_cdcgan": {"model": {"arch": "cdcgan"}, "train": {"mixed_precision": "float32", "ema": 0.0, "d_steps": 2,
                                                             "label_smoothing": 0.1}},
}
RESUMED = "train_dcgan"  # also resumed from its checkpoint for one more epoch
# Deterministic models (no dropout, no instance noise); EMA on so its slots are compared too.
STEP_JOBS = {
    "step_dcgan": {"model": {"arch": "dcgan", "dropout": 0.0},
                   "train": {"d_steps": 2, "label_smoothing": 0.1, "ema": 0.9}},
    "step_cdcgan": {"model": {"arch": "cdcgan", "dropout": 0.0}, "train": {"d_steps": 1, "ema": 0.9}},
}
STEP_BATCH = 64
TOLERANCE = 1e-4


def params_with(overrides: dict) -> dict:
    defaults = {"train": {"epochs": EPOCHS, "mixed_precision": "float32", "instance_noise": 0.0}}
    return merge(merge(merge(default_params(), TINY_OVERRIDES), defaults), overrides)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """256 real MNIST digits in [-1, 1] NHWC, every class present, and their labels."""
    from pipeline.data import scale_images

    images, labels = _mnist()
    chosen = np.random.default_rng(0).permutation(len(images))[:256]
    return scale_images(images[chosen]), labels[chosen].astype(np.int32)


def step_inputs(params: dict) -> dict[str, np.ndarray]:
    """Returns the weights (of a GAN built here), latent noise and real batch that both backends step from."""
    images, labels = digits()
    gan = build_gan(backend_worker.config_from_dict(params), (28, 28, 1))
    rng = np.random.default_rng(1)
    inputs = {"images": images[:STEP_BATCH], "labels": labels[:STEP_BATCH],
              "noise": rng.standard_normal((STEP_BATCH, params["train"]["latent_dim"])).astype(np.float32)}
    if gan.conditional:
        inputs["fake_labels"] = rng.integers(0, 10, (STEP_BATCH, 1)).astype(np.int32)
    for part in ("generator", "discriminator"):
        inputs.update({f"weights:{part}/{i}": w for i, w in enumerate(getattr(gan, part).get_weights())})
    return inputs


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory):
    """Runs every job under KERAS_BACKEND=jax with TensorFlow unimportable; returns (results folder, inputs)."""
    folder = tmp_path_factory.mktemp("jax")
    images, labels = digits()
    np.savez(folder / "digits.npz", images=images, labels=labels)
    jobs = {"imports": {"kind": "imports"}}  # first, before training has imported anything
    jobs.update({name: {"kind": "train", "params": params_with(o), "inputs": str(folder / "digits.npz"),
                        "resume": name == RESUMED} for name, o in TRAIN_JOBS.items()})
    inputs = {}
    for name, overrides in STEP_JOBS.items():
        inputs[name] = step_inputs(params_with(overrides))
        np.savez(folder / f"{name}_inputs.npz", **inputs[name])
        jobs[name] = {"kind": "step", "params": params_with(overrides), "inputs": str(folder / f"{name}_inputs.npz")}
    (folder / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "backend_worker.py"), str(folder / "jobs.json"),
                             str(folder), "--no-tensorflow"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder, inputs


def job(jax_runs, name: str) -> dict[str, np.ndarray]:
    folder, _ = jax_runs
    error = folder / f"{name}.error"
    assert not error.exists(), f"JAX job {name} failed:\n{error.read_text()}"
    with np.load(folder / f"{name}.npz", allow_pickle=False) as npz:
        return dict(npz)


def parts(results: dict, prefix: str, part: str) -> list[np.ndarray]:
    keys = sorted((k for k in results if k.startswith(f"{prefix}{part}/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    return [results[k] for k in keys]


def test_every_pipeline_module_imports_without_tensorflow_on_jax(jax_runs):
    r = job(jax_runs, "imports")
    assert r["modules"].tolist() == list(backend_worker.MODULES) and not r["tensorflow_imported"]


@pytest.mark.parametrize("name", sorted(TRAIN_JOBS))
def test_jax_training_without_tensorflow_gives_finite_losses_and_moves_both_models(jax_runs, name):
    r = job(jax_runs, name)
    assert str(r["backend"]) == "jax" and not r["tensorflow_imported"]
    history = dict(zip(r["history_columns"].tolist(), r["history"].T))
    assert history["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert np.isfinite(np.stack([history[m] for m in METRIC_NAMES])).all()
    assert r["fid_epochs"].tolist() == list(range(1, EPOCHS + 1))
    for part in ("generator", "discriminator"):
        before, after = parts(r, "before/", part), parts(r, "after/", part)
        moved = [not np.array_equal(a, b) for a, b in zip(before, after)]
        assert len(moved) == len(before) and all(moved), (part, moved)


@pytest.mark.parametrize("name", sorted(TRAIN_JOBS))
def test_jax_takes_d_steps_discriminator_updates_and_fresh_noise_each_step(jax_runs, name):
    r = job(jax_runs, name)
    train = params_with(TRAIN_JOBS[name])["train"]
    d_steps, conditional = train["d_steps"], TRAIN_JOBS[name]["model"]["arch"] == "cdcgan"
    assert int(r["g_iterations"]) == EPOCHS * STEPS and int(r["d_iterations"]) == d_steps * EPOCHS * STEPS
    # The noise RNG advanced once per draw (latent noise, fake labels, instance noise on each of
    # the discriminator's two calls, real and fake), in every step: a state the jitted step did
    # not hand on would draw the same noise each time.
    draws = d_steps * (1 + conditional + 2 * (train["instance_noise"] > 0))
    assert int(r["rng_after"][1] - r["rng_before"][1]) == EPOCHS * STEPS * draws


def test_jax_reads_the_annealed_instance_noise_each_epoch(jax_runs):
    r = job(jax_runs, "train_dcgan")
    # After each epoch fit() writes the state the jitted step returned back into the variables: this is
    # the value the schedule set at the start of the last epoch only if the step was handed that value.
    assert float(r["noise_std"]) == pytest.approx(0.2 * (1 - (EPOCHS - 1) / EPOCHS))


def test_jax_keeps_the_generators_moving_average(jax_runs):
    r = job(jax_runs, "train_dcgan")
    averages, start, trained = parts(r, "", "ema"), parts(r, "", "g_trainable_before"), parts(r, "", "g_trainable_after")
    assert len(averages) == len(start) == len(trained) > 0
    # Each average left the start and trails the trained weights. (That the average is the one TF
    # keeps: the EMA slots are among the optimizer variables test_one_jax_step_equals... compares.)
    for average, first, last in zip(averages, start, trained):
        assert np.isfinite(average).all() and not np.array_equal(average, first)
        assert not np.allclose(average, last, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(TRAIN_JOBS))
def test_jax_checkpoint_restores_every_variable(jax_runs, name):
    r = job(jax_runs, name)
    for part in backend_worker.PARTS:
        after, restored = parts(r, "after/", part), parts(r, "restored/", part)
        assert len(after) == len(restored) > 0, part
        for a, b in zip(after, restored):
            np.testing.assert_array_equal(a, b, err_msg=part)
    np.testing.assert_array_equal(r["restored_rng"], r["rng_after"])


def test_logged_models_require_the_backend_they_were_trained_on(jax_runs):
    assert job(jax_runs, "train_dcgan")["pip_requirements"].tolist() == [f"keras=={keras.__version__}", "jax"]
    config = backend_worker.config_from_dict(params_with({}))
    here = backend_worker.logged_requirements(build_gan(config, (28, 28, 1)), config)
    assert here == [f"keras=={keras.__version__}", keras.backend.backend()]  # tensorflow, unless run under JAX


def test_jax_training_resumes_from_its_checkpoint(jax_runs):
    r = job(jax_runs, RESUMED)
    np.testing.assert_array_equal(r["resumed_from"], r["rng_after"])  # fit() starts from the restored state
    assert r["resumed_epochs"].tolist() == list(range(1, EPOCHS + 2))
    assert np.isfinite(r["resumed_losses"]).all()


@pytest.mark.parametrize("name", sorted(STEP_JOBS))
def test_one_jax_step_equals_one_tensorflow_step(jax_runs, name):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("compares against TensorFlow in this process")
    jax_result = job(jax_runs, name)
    inputs = jax_runs[1][name]
    weights = {k.split(":", 1)[1]: v for k, v in inputs.items() if k.startswith("weights:")}
    tf_result = backend_worker.one_step(params_with(STEP_JOBS[name]), weights, inputs["noise"],
                                        inputs.get("fake_labels"), inputs["images"], inputs["labels"])
    assert set(tf_result) == set(jax_result) - {"tensorflow_imported", "backend"}
    worst = {key: float(np.max(np.abs(np.asarray(tf_result[key], np.float64) - jax_result[key]), initial=0.0))
             for key in tf_result}
    print(name, "max |TF - JAX|:", max(worst.values()), "at", max(worst, key=worst.get))
    assert max(worst.values()) < TOLERANCE, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    # The step moved every weight: the results agree, and not by both leaving the start untouched.
    for key, start in weights.items():
        assert not np.array_equal(tf_result[key], start), key
