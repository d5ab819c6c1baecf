"""The same training code on both Keras backends: TensorFlow here, JAX in a subprocess without TensorFlow.

Keras fixes its backend at import, so a JAX process (tests/backend_worker.py) runs the JAX jobs of
this file: one for the training runs, one for the single steps; each test checks its job. One step
from the same weights and noise gives the same results on both backends, up to float32 rounding:
the JAX step is the TensorFlow step's algorithm, not just a runnable one.
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
                                                             "label_smoothing": 0.1, "mode_seeking": 1.0}},
}
RESUMED = "train_dcgan"  # also resumed from its checkpoint for one more epoch
# Deterministic models (no dropout, no instance noise); EMA on so its slots are compared too. Both are
# run with lr = STEP_LR, Adam's epsilon STEP_EPSILON and every LeakyReLU smoothed (see below).
STEP_LR = 0.5
STEP_JOBS = {
    "step_dcgan": {"model": {"arch": "dcgan", "dropout": 0.0},
                   "train": {"d_steps": 2, "label_smoothing": 0.1, "ema": 0.9, "lr": STEP_LR}},
    "step_cdcgan": {"model": {"arch": "cdcgan", "dropout": 0.0}, "train": {"d_steps": 1, "ema": 0.9, "lr": STEP_LR,
                                                                        "mode_seeking": 1.0}},
    # Spectral norm's power-iteration vectors are non-trainable discriminator state, updated in the step.
    "step_dcgan_spectral_norm": {"model": {"arch": "dcgan", "dropout": 0.0, "spectral_norm": True},
                                 "train": {"d_steps": 2, "ema": 0.0, "lr": STEP_LR}},
}
STEP_BATCH = 64

# What makes every result of a step a smooth function of its inputs, so that the two backends' float32
# roundings, which differ (other kernels, other summation orders), stay rounding-sized in every result:
# - Adam's first update of an element is lr a g / (a |g| + epsilon), a = sqrt(1 - beta_2) (Keras' bias
#   corrections): its relative error is the gradient's times up to 1 + a max|g| / epsilon. With Keras'
#   epsilon = 1e-7 that is ~1e5: where gradient elements lie near 0, weights step up to lr apart. Measured
#   on 6 input sets with the kink below smoothed: gradients (first moments) agreed to 2e-5, weight steps
#   only to 1.3e-3 with d_steps = 2 (the discriminator's second update starts from weights already apart).
#   With epsilon = 0.1 the update is nearly proportional to the gradient and the factor at most 1.25
#   (max |g| = 0.8 here); lr = 0.5 keeps each step hundreds of float32 spacings of its weight or more.
# - LeakyReLU's kink: a pre-activation within rounding of 0 takes slope 1 on one backend and 0.2 on the
#   other, changing a whole term of a gradient (measured: one of the 64 x 784 generator pre-activations
#   8.6e-8 from 0 moved the first kernel's gradient by 3.5e-3, relatively). tests/backend_worker.py's
#   smooth_leaky_relu has the same slopes away from 0 and no kink.
STEP_EPSILON = 0.1
SMOOTH = True

# Tolerances from float32's unit roundoff u = 6.0e-8. A float32 sum of n terms is off by about sqrt(n) u
# of its terms' size (rounding errors as random, Higham & Mary 2019); the largest sums here are the
# output layer's gradients over a batch's pixels, n = 64 * 28 * 28, and some 10 layers of such sums,
# forward and back, lie between the loss and any gradient: 10 sqrt(50,176) u = 1.3e-4. Measured on 6
# input sets per job, oneDNN on and off (TF_ENABLE_ONEDNN_OPTS=0 ONEDNN_MAX_CPU_ISA=AVX2): at most 1.9e-5
# for gradients (Adam's first moments), 4e-5 for weight steps and averages (float32 storage included),
# 2.4e-6 for batch statistics, 2.4e-7 for losses.
U32 = float(np.finfo(np.float32).eps) / 2
RTOL = 10 * np.sqrt(STEP_BATCH * 28 * 28) * U32
# Adam's second moments (1 - beta_2) g^2: twice the gradient's relative error, plus 1 - beta_2 in float32,
# which carries beta_2's own rounding magnified beta_2 / (1 - beta_2) = 999 times: u * 999 = 6e-5 on
# each side (measured: 1.3e-5 between the backends in nearly every second moment, 3.6e-5 at most).
RTOL_SQUARED = 2 * RTOL + 2 * U32 * 0.999 / (1 - 0.999)


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
    keras.utils.set_random_seed(0)  # the same weights whatever ran before
    gan = build_gan(backend_worker.config_from_dict(params), (28, 28, 1))
    rng = np.random.default_rng(1)
    inputs = {"images": images[:STEP_BATCH], "labels": labels[:STEP_BATCH],
              "noise": rng.standard_normal((STEP_BATCH, params["train"]["latent_dim"])).astype(np.float32)}
    if gan.conditional:
        inputs["fake_labels"] = rng.integers(0, 10, (STEP_BATCH, 1)).astype(np.int32)
    for part in ("generator", "discriminator"):
        inputs.update({f"weights:{part}/{i}": w for i, w in enumerate(getattr(gan, part).get_weights())})
    return inputs


def run_on_jax(folder, jobs: dict) -> None:
    """Runs `jobs` under KERAS_BACKEND=jax with TensorFlow unimportable, each writing folder/<name>.npz."""
    (folder / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "backend_worker.py"), str(folder / "jobs.json"),
                             str(folder), "--no-tensorflow"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def jax_runs(tmp_path_factory):
    """Runs the imports check and every training job on JAX; returns (results folder, {})."""
    folder = tmp_path_factory.mktemp("jax")
    images, labels = digits()
    np.savez(folder / "digits.npz", images=images, labels=labels)
    jobs = {"imports": {"kind": "imports"}}  # first, before training has imported anything
    jobs.update({name: {"kind": "train", "params": params_with(o), "inputs": str(folder / "digits.npz"),
                        "resume": name == RESUMED} for name, o in TRAIN_JOBS.items()})
    run_on_jax(folder, jobs)
    return folder, {}


@pytest.fixture(scope="module")
def jax_steps(tmp_path_factory):
    """Runs every one-step job on JAX; returns (results folder, the inputs of each job)."""
    folder = tmp_path_factory.mktemp("jax_steps")
    jobs, inputs = {}, {}
    for name, overrides in STEP_JOBS.items():
        inputs[name] = step_inputs(params_with(overrides))
        np.savez(folder / f"{name}_inputs.npz", **inputs[name])
        jobs[name] = {"kind": "step", "params": params_with(overrides), "inputs": str(folder / f"{name}_inputs.npz"),
                      "adam_epsilon": STEP_EPSILON, "smooth": SMOOTH}
    run_on_jax(folder, jobs)
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


def step_mismatches(tf_result: dict, jax_result: dict, start: dict, roles: dict[str, str]) -> dict[str, float]:
    """Returns, for each result, ||TF - JAX|| over what its tolerance allows: above 1 is a mismatch.

    Weights, batch statistics and averages are compared by how far the step moved them, with an
    allowance of one float32 rounding of the stored values on each side (2 u |value|); Adam's moments,
    started from 0, as they are.
    """
    out = {}
    for key, role in roles.items():
        a, b = np.asarray(tf_result[key], np.float64), np.asarray(jax_result[key], np.float64)
        if role in ("iteration", "learning_rate"):  # counts and constants: exactly
            out[key] = 0.0 if np.array_equal(a, b) else np.inf
            continue
        rtol, atol = (RTOL_SQUARED if role == "velocity" else RTOL), 0.0
        origin = start.get(key) if role in ("weight", "statistic") else start.get(role.removeprefix("average of "))
        if origin is not None:
            atol = 2 * U32 * np.linalg.norm(b)
            a, b = a - origin, b - origin
        out[key] = float(np.linalg.norm(a - b) / (rtol * np.linalg.norm(b) + atol))
    for name in METRIC_NAMES:
        a, b = float(tf_result[f"logs/{name}"]), float(jax_result[f"logs/{name}"])
        # An accuracy counts logits above 0: one logit within rounding of 0 may count on one side only.
        allowed = 1 / STEP_BATCH if name.startswith("d_acc") else RTOL * abs(b)
        out[f"logs/{name}"] = abs(a - b) / allowed if allowed else (0.0 if a == b else np.inf)
    return out


@pytest.mark.numerics
@pytest.mark.parametrize("name", sorted(STEP_JOBS))
def test_one_jax_step_equals_one_tensorflow_step(jax_steps, name):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("compares against TensorFlow in this process")
    jax_result = job(jax_steps, name)
    inputs = jax_steps[1][name]
    weights = {k.split(":", 1)[1]: v for k, v in inputs.items() if k.startswith("weights:")}
    params = params_with(STEP_JOBS[name])
    tf_result = backend_worker.one_step(params, weights, inputs["noise"], inputs.get("fake_labels"), inputs["images"],
                                        inputs["labels"], STEP_EPSILON, SMOOTH)
    assert set(tf_result) == set(jax_result) - {"tensorflow_imported", "backend"}
    roles = backend_worker.roles(build_gan(backend_worker.config_from_dict(params), (28, 28, 1)))
    assert set(roles) | {f"logs/{m}" for m in METRIC_NAMES} == set(tf_result)
    mismatches = step_mismatches(tf_result, jax_result, weights, roles)
    worst = sorted(mismatches.items(), key=lambda kv: -kv[1])[:5]
    print(name, "|TF - JAX| / tolerance, largest:", worst)
    assert worst[0][1] <= 1.0, [(key, roles.get(key, "metric"), ratio) for key, ratio in worst]
    # The step moved every weight and batch statistic: the results agree, and not by both leaving them untouched.
    for key, start in weights.items():
        assert not np.array_equal(tf_result[key], start), key
