"""Training jobs run on the Keras backend of this process, for tests/test_backends.py.

Keras fixes its backend at import, so the tests run the JAX side as
`KERAS_BACKEND=jax python backend_worker.py JOBS_JSON RESULTS_DIR`, TensorFlow made unimportable as
on a JAX-only machine; one_step() also runs in the tests' own (TensorFlow) process. Each job writes
RESULTS_DIR/<name>.npz, or RESULTS_DIR/<name>.error with its traceback, and the others still run.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

if __name__ == "__main__" and "--no-tensorflow" in sys.argv:
    sys.modules["tensorflow"] = None  # `import tensorflow` now fails, as where it is not installed

import keras  # noqa: E402
from keras import ops  # noqa: E402

from pipeline.config import config_from_dict  # noqa: E402
from pipeline.train import GAN, build_gan  # noqa: E402

PARTS = ("generator", "discriminator", "g_optimizer", "d_optimizer")
ROOT = Path(__file__).resolve().parents[1]
# Every module of the pipeline and its stages, except the two that are TensorFlow's by design: none may need
# TensorFlow on another backend. Listed from the folders, so a new module is checked without anyone adding it.
TENSORFLOW_ONLY = {"pipeline.tf_kernels", "pipeline.steps.tensorflow"}
MODULES = tuple(sorted(
    name for name in (".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                      for folder in ("pipeline", "stages") for path in (ROOT / folder).rglob("*.py"))
    if name not in TENSORFLOW_ONLY))


def arrays(variables) -> list[np.ndarray]:
    return [np.array(ops.convert_to_numpy(v)) for v in variables]


def numbered(prefix: str, values: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{i}": value for i, value in enumerate(values)}


def gan_arrays(gan, prefix: str = "") -> dict[str, np.ndarray]:
    """Returns every variable of both models (weights, no RNG states) and both optimizers, by part/index."""
    out = {}
    for part in PARTS:
        model = getattr(gan, part)
        values = arrays(model.weights if isinstance(model, keras.Model) else model.variables)
        out.update(numbered(f"{prefix}{part}", values))
    return out


def roles(gan) -> dict[str, str]:
    """Returns what each variable of gan_arrays(gan) holds, by key: "weight" (trainable), "statistic"
    (BatchNorm's moving mean or variance), "iteration", "learning_rate", "momentum", "velocity", or
    "average of <key>" for the generator's moving average of the weight at <key>. Builds the optimizers.
    """
    gan.optimizer.build()
    out, where = {}, {}
    for part in ("generator", "discriminator"):
        model = getattr(gan, part)
        trainable = {id(v) for v in model.trainable_variables}
        for i, variable in enumerate(model.weights):
            out[f"{part}/{i}"] = "weight" if id(variable) in trainable else "statistic"
            where[id(variable)] = f"{part}/{i}"
    for part in ("g_optimizer", "d_optimizer"):
        optimizer = getattr(gan, part)
        averages = optimizer._model_variables_moving_average if optimizer.use_ema else []
        averaged = {id(a): where[id(v)] for a, v in zip(averages, gan.generator.trainable_variables)}
        for i, variable in enumerate(optimizer.variables):
            if id(variable) in averaged:
                out[f"{part}/{i}"] = f"average of {averaged[id(variable)]}"
            else:
                out[f"{part}/{i}"] = next(r for r in ("iteration", "learning_rate", "momentum", "velocity")
                                          if variable.path.endswith(r))
    return out


def one_step(params: dict, weights: dict[str, np.ndarray], noise: np.ndarray, fake_labels: np.ndarray | None,
             images: np.ndarray, labels: np.ndarray, adam_epsilon: float | None = None,
             smooth: bool = False) -> dict[str, np.ndarray]:
    """Returns the GAN's variables and metrics after one fit() step on `images` from the given weights.

    Every draw of the latent returns `noise` (and `fake_labels`): the backends' random streams differ.
    `adam_epsilon`, when given, replaces both optimizers' epsilon (params.yaml has no key for it);
    with `smooth`, every LeakyReLU is `smooth_leaky_relu`.
    """
    gan = build_gan(config_from_dict(params), tuple(images.shape[1:]))
    if adam_epsilon is not None:
        gan.d_optimizer.epsilon = gan.g_optimizer.epsilon = adam_epsilon
    for part in ("generator", "discriminator"):
        model = getattr(gan, part)
        model.set_weights([weights[f"{part}/{i}"] for i in range(len(model.weights))])
    original, leaky_relu = GAN._latent, keras.layers.LeakyReLU.call
    GAN._latent = lambda self, batch: (ops.convert_to_tensor(noise),
                                       None if fake_labels is None else ops.convert_to_tensor(fake_labels))
    if smooth:
        keras.layers.LeakyReLU.call = lambda self, inputs: smooth_leaky_relu(inputs, self.negative_slope)
    try:
        history = gan.fit(images, labels if gan.conditional else None, batch_size=len(images), epochs=1,
                          shuffle=False, verbose=0)
    finally:
        GAN._latent, keras.layers.LeakyReLU.call = original, leaky_relu
    logs = {f"logs/{name}": np.float32(values[-1]) for name, values in history.history.items()}
    return {**gan_arrays(gan), **logs}


def smooth_leaky_relu(x, negative_slope: float):
    """Returns LeakyReLU without its kink: x (s + (1 - s) sigmoid(x)), the same slopes far from 0.

    At LeakyReLU's kink a pre-activation that rounds to 0 from either side takes a different slope,
    so one rounding apart changes a gradient by a whole term: smooth, a rounding apart stays one.
    """
    return x * (negative_slope + (1.0 - negative_slope) * ops.sigmoid(x))


def train(params: dict, images: np.ndarray, labels: np.ndarray, workdir: Path, resume: bool) -> dict[str, np.ndarray]:
    """Returns what train_gan did in `workdir`: history, state before and after, a restored checkpoint.

    With `resume`, also what train_gan did when resumed from that checkpoint for one more epoch.
    """
    from pipeline.checkpoint import read_state, restore_checkpoint
    from pipeline.config import ClassifierConfig
    from pipeline.models import build_classifier
    from pipeline.paths import TrainOutputs
    from pipeline.train import train_gan

    outputs = TrainOutputs(workdir)
    config = config_from_dict(params)
    shape = tuple(images.shape[1:])
    classifier = build_classifier(ClassifierConfig(filters=(8, 16), features=32, epochs=1, batch_size=32, lr=1e-3),
                                  shape)  # untrained: FID needs features, not good ones
    starts = []  # what each GAN that train_gan fits starts from
    fit = GAN.fit

    def recording_fit(self, *args, **kwargs):
        starts.append({**gan_arrays(self, "before/"), "rng_before": arrays([self.noise_seed.state])[0],
                       **numbered("g_trainable_before", arrays(self.generator.trainable_variables))})
        return fit(self, *args, **kwargs)

    GAN.fit = recording_fit
    try:
        gan, history, fid_history = train_gan(config, images, labels, classifier, outputs, verbose=0)
        out = {**starts[0], **gan_arrays(gan, "after/"), "history": history.to_numpy(np.float64),
               "history_columns": np.array(list(history.columns)), "fid_epochs": fid_history["epoch"].to_numpy(),
               "noise_std": arrays([gan.noise_std])[0], "rng_after": arrays([gan.noise_seed.state])[0],
               "d_iterations": arrays([gan.d_optimizer.iterations])[0],
               "g_iterations": arrays([gan.g_optimizer.iterations])[0],
               **numbered("g_trainable_after", arrays(gan.generator.trainable_variables))}
        if gan.g_optimizer.use_ema:
            out.update(numbered("ema", arrays(gan.g_optimizer._model_variables_moving_average)))

        fresh = build_gan(config, shape)
        restore_checkpoint(fresh, outputs.checkpoint)
        out.update({**gan_arrays(fresh, "restored/"), "restored_rng": arrays([fresh.noise_seed.state])[0]})

        out["pip_requirements"] = np.array(logged_requirements(gan, config))
        if not resume:
            return out
        longer = config_from_dict({**params, "train": {**params["train"], "epochs": config.train.epochs + 1}})
        _, resumed, _ = train_gan(longer, images, labels, classifier, outputs,
                                  state=read_state(outputs.checkpoint, ""), verbose=0)
        out["resumed_from"] = starts[1]["rng_before"]
        out["resumed_epochs"] = resumed["epoch"].to_numpy()
        out["resumed_losses"] = resumed[["d_loss", "g_loss"]].to_numpy(np.float64)
    finally:
        GAN.fit = fit
    return out


def logged_requirements(gan, config) -> list[str]:
    """Returns the pip requirements that log_generator gives MLflow for `gan`'s generator."""
    from mlflow.models import Model

    from pipeline.tracking import log_generator

    logged = {}
    original = Model.log
    Model.log = classmethod(lambda cls, **kwargs: logged.update(kwargs))
    try:
        log_generator(gan.generator, "generator", config.train.latent_dim, config.seed)
    finally:
        Model.log = original
    return logged["pip_requirements"]


def main(jobs_path: str, results: str) -> None:
    results_dir = Path(results)
    for name, job in json.loads(Path(jobs_path).read_text()).items():
        started = time.perf_counter()
        try:
            inputs = {}
            if "inputs" in job:
                with np.load(job["inputs"], allow_pickle=False) as npz:
                    inputs = dict(npz)
            if job["kind"] == "imports":
                for module in MODULES:
                    importlib.import_module(module)
                out = {"modules": np.array(MODULES)}
            elif job["kind"] == "train":
                workdir = results_dir / name
                workdir.mkdir()
                out = train(job["params"], inputs["images"], inputs["labels"], workdir, job.get("resume", False))
            else:
                weights = {k.split(":", 1)[1]: v for k, v in inputs.items() if k.startswith("weights:")}
                out = one_step(job["params"], weights, inputs["noise"], inputs.get("fake_labels"), inputs["images"],
                               inputs["labels"], job.get("adam_epsilon"), job.get("smooth", False))
            out["tensorflow_imported"] = np.bool_(sys.modules.get("tensorflow") is not None)
            out["backend"] = np.array(keras.backend.backend())
            np.savez(results_dir / f"{name}.npz", **out)
        except Exception:
            (results_dir / f"{name}.error").write_text(traceback.format_exc())
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main(*[arg for arg in sys.argv[1:] if not arg.startswith("--")])
