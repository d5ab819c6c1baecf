"""Adversarial training: the DCGAN as a keras.Model with its own train_step, checkpoints and history."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from keras import ops

from pipeline import metrics, paths, tracking
from pipeline.config import Config
from pipeline.evaluate import TRAIN_EVAL_NOISE_OFFSET, embed, feature_extractor
from pipeline.files import atomic_path, write_json
from pipeline.images import save_png, tile, to_uint8
from pipeline.models import build_discriminator, build_generator, fixed_noise, generate, load_model

log = logging.getLogger(__name__)

METRIC_NAMES = ("d_loss", "g_loss", "d_acc_real", "d_acc_fake", "d_real", "d_fake")


class DCGAN(keras.Model):
    """A generator and a discriminator trained against each other by fit()."""

    def __init__(self, generator: keras.Model, discriminator: keras.Model, latent_dim: int, seed: int):
        super().__init__(name="dcgan")
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = latent_dim
        self.noise_seed = keras.random.SeedGenerator(seed)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in METRIC_NAMES}

    def compile(self, d_optimizer: keras.optimizers.Optimizer, g_optimizer: keras.optimizers.Optimizer):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def train_step(self, data):
        import tensorflow as tf  # the gradient step is the one backend-specific piece

        real, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        batch = ops.shape(real)[0]
        noise = keras.random.normal((batch, self.latent_dim), seed=self.noise_seed)
        # One generator pass serves both updates, as in the TF tutorial: cheaper than two.
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = self.generator(noise, training=True)
            real_logits = self.discriminator(real, training=True)
            fake_logits = self.discriminator(fake, training=True)
            ones, zeros = ops.ones_like(real_logits), ops.zeros_like(fake_logits)
            d_loss = self.loss_fn(ones, real_logits) + self.loss_fn(zeros, fake_logits)
            g_loss = self.loss_fn(ones, fake_logits)
        d_grads = d_tape.gradient(d_loss, self.discriminator.trainable_weights)
        g_grads = g_tape.gradient(g_loss, self.generator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(d_grads, self.discriminator.trainable_weights))
        self.g_optimizer.apply_gradients(zip(g_grads, self.generator.trainable_weights))
        values = {
            "d_loss": d_loss,
            "g_loss": g_loss,
            "d_acc_real": ops.mean(ops.cast(real_logits > 0, "float32")),
            "d_acc_fake": ops.mean(ops.cast(fake_logits < 0, "float32")),
            "d_real": ops.mean(ops.sigmoid(real_logits)),
            "d_fake": ops.mean(ops.sigmoid(fake_logits)),
        }
        for name, value in values.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}


def build_gan(config: Config, image_shape: tuple[int, int, int]) -> DCGAN:
    """Returns the compiled DCGAN for `image_shape`, with Adam(lr, beta_1) for each side."""
    gan = DCGAN(build_generator(config.model, config.train.latent_dim, image_shape),
                build_discriminator(config.model, image_shape), config.train.latent_dim, config.seed)
    gan.compile(d_optimizer=keras.optimizers.Adam(config.train.lr, beta_1=config.train.beta_1),
                g_optimizer=keras.optimizers.Adam(config.train.lr, beta_1=config.train.beta_1))
    return gan


def save_checkpoint(gan: DCGAN, epoch: int, config: Config, path: Path) -> None:
    """Writes both models' and both optimizers' variables and the epoch to one npz, atomically."""
    arrays = {"epoch": np.array(epoch), "config": np.array(repr(config))}
    for part in ("generator", "discriminator", "g_optimizer", "d_optimizer"):
        for i, variable in enumerate(getattr(gan, part).variables):
            arrays[f"{part}/{i}"] = ops.convert_to_numpy(variable)
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)


def load_checkpoint(gan: DCGAN, path: Path) -> int:
    """Returns the epoch of the checkpoint at `path` after restoring its variables into `gan`."""
    with np.load(path, allow_pickle=False) as npz:
        for part in ("generator", "discriminator", "g_optimizer", "d_optimizer"):
            variables = getattr(gan, part).variables
            stored = sum(1 for key in npz.files if key.startswith(part + "/"))
            if stored != len(variables):
                raise ValueError(f"{path}: {part} has {stored} variables, the model {len(variables)}")
            for i, variable in enumerate(variables):
                variable.assign(npz[f"{part}/{i}"])
        return int(npz["epoch"])


class EpochOutputs(keras.callbacks.Callback):
    """After each epoch: the history CSV; every N epochs a sample grid and a checkpoint."""

    def __init__(self, config: Config, history_path: Path, grid_dir: Path, checkpoint_path: Path):
        super().__init__()
        self.config = config
        self.history_path, self.grid_dir, self.checkpoint_path = history_path, grid_dir, checkpoint_path
        side = config.train.grid_size
        self.noise = fixed_noise(config.seed, side * side, config.train.latent_dim)
        self.rows: list[dict] = []
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        number = epoch + 1
        metrics = {name: float(logs[name]) for name in METRIC_NAMES}
        metrics["seconds"] = time.perf_counter() - self.started
        self.rows.append({"epoch": number, **metrics})
        with atomic_path(self.history_path) as tmp:
            pd.DataFrame(self.rows).to_csv(tmp, index=False)
        last = number == self.config.train.epochs
        if number % self.config.train.sample_every == 0 or last:
            images = to_uint8(generate(self.model.generator, self.noise))
            save_png(self.grid_dir / f"epoch_{number:04d}.png", tile(images, self.config.train.grid_size))
        if number % self.config.train.checkpoint_every == 0 or last:
            save_checkpoint(self.model, number, self.config, self.checkpoint_path)


class FidTracking(keras.callbacks.Callback):
    """Every eval_every epochs and at the last: FID and KID of fixed-noise samples; keeps the best generator.

    DCGAN quality peaks and then degrades, so the generator with the lowest FID so far is saved
    beside the last one.
    """

    def __init__(self, config: Config, classifier: keras.Model, real_images: np.ndarray, history_path: Path,
                 best_path: Path, track: bool):
        super().__init__()
        self.config, self.history_path, self.best_path, self.track = config, history_path, best_path, track
        self.extractor = feature_extractor(classifier)
        count = min(config.train.eval_samples, len(real_images))
        chosen = np.random.default_rng(config.seed).permutation(len(real_images))[:count]
        self.real_features, _ = embed(self.extractor, real_images[chosen])
        self.noise = fixed_noise(config.seed + TRAIN_EVAL_NOISE_OFFSET, count, config.train.latent_dim)
        self.rows: list[dict] = []
        self.best: dict | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        number = epoch + 1
        if number % self.config.train.eval_every and number != self.config.train.epochs:
            return
        fake, _ = embed(self.extractor, generate(self.model.generator, self.noise))
        e = self.config.evaluate
        kid, _ = metrics.kid(self.real_features, fake, subsets=e.kid_subsets, subset_size=e.kid_subset_size,
                             seed=self.config.seed)
        row = {"epoch": number, "fid": metrics.fid(fake, self.real_features), "kid": kid}
        self.rows.append(row)
        with atomic_path(self.history_path) as tmp:
            pd.DataFrame(self.rows).to_csv(tmp, index=False)
        if self.best is None or row["fid"] < self.best["fid"]:
            self.best = row
            with atomic_path(self.best_path) as tmp:
                self.model.generator.save(tmp)
        log.info("epoch %d: FID %.3f, KID %.5f (best FID %.3f at epoch %d)", number, row["fid"], kid,
                 self.best["fid"], self.best["epoch"])
        if self.track:
            tracking.log_metrics({"train_fid": row["fid"], "train_kid": kid}, step=number)


class MlflowEpochMetrics(keras.callbacks.Callback):
    """Logs each epoch's metrics to the active MLflow run, the epoch number as the step."""

    def __init__(self, outputs: EpochOutputs):
        super().__init__()
        self.outputs = outputs  # runs first and holds the row with the epoch's wall time

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = dict(self.outputs.rows[-1])
        tracking.log_metrics(row, step=row.pop("epoch"))


def configure_devices() -> str:
    """Returns the device training will use: a GPU (with memory growth) when one is visible, else the CPU."""
    if keras.backend.backend() != "tensorflow":
        return keras.backend.backend()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    return f"GPU x{len(gpus)}" if gpus else "CPU"


def train_gan(config: Config, images: np.ndarray, classifier: keras.Model, verbose: int | None = None,
              track: bool = False) -> tuple[DCGAN, pd.DataFrame, pd.DataFrame]:
    """Returns the trained DCGAN, its per-epoch history and its FID history.

    On the way it writes grids, checkpoints and the best-FID generator; with `track`, metrics also
    go to the active MLflow run.
    """
    if config.train.batch_size > len(images):
        raise ValueError(f"train.batch_size {config.train.batch_size} is larger than the "
                         f"{len(images)} training images")
    log.info("training on %s: %d images of shape %s", configure_devices(), len(images), images.shape[1:])
    keras.utils.set_random_seed(config.seed)
    gan = build_gan(config, tuple(images.shape[1:]))
    outputs = EpochOutputs(config, paths.HISTORY, paths.PROGRESS_GRIDS, paths.CHECKPOINT)
    fid = FidTracking(config, classifier, images, paths.FID_HISTORY, paths.GENERATOR_BEST, track)
    callbacks = [outputs, fid, MlflowEpochMetrics(outputs)] if track else [outputs, fid]
    if verbose is None:
        # A live progress bar on a terminal; one line per epoch in logs, where a bar is noise.
        verbose = 1 if sys.stdout.isatty() else 2
    gan.fit(images, batch_size=config.train.batch_size, epochs=config.train.epochs, shuffle=True,
            callbacks=callbacks, verbose=verbose)
    return gan, pd.DataFrame(outputs.rows), pd.DataFrame(fid.rows)


def save_models(gan: DCGAN) -> None:
    """Writes the final generator and discriminator as .keras files, atomically."""
    for model, path in ((gan.generator, paths.GENERATOR), (gan.discriminator, paths.DISCRIMINATOR)):
        with atomic_path(path) as tmp:
            model.save(tmp)


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

    example = fixed_noise(seed, 2, latent_dim)
    signature = infer_signature(example, generate(generator, example))
    Model.log(artifact_path=None, name=name, flavor=_KerasFlavor, model=generator,
              signature=signature, input_example=example,
              pip_requirements=[f"keras=={keras.__version__}", "tensorflow"])


def train_and_log(config: Config, train_images: np.ndarray, classifier: keras.Model, manifest: dict) -> pd.DataFrame:
    """Returns the history of a full training run, with every output written and tracked in a new MLflow run."""
    with tracking.start_run(config, manifest, paths.MLFLOW_RUN):
        gan, history, fid_history = train_gan(config, train_images, classifier, track=True)
        save_models(gan)
        best = fid_history.loc[fid_history["fid"].idxmin()]
        summary = {"epochs": int(history["epoch"].iloc[-1]), **history.iloc[-1].drop("epoch").to_dict(),
                   "best_epoch": int(best["epoch"]), "best_fid": float(best["fid"]),
                   "last_fid": float(fid_history["fid"].iloc[-1])}
        write_json(paths.TRAIN_METRICS, summary)
        tracking.log_metrics({k: summary[k] for k in ("best_epoch", "best_fid", "last_fid")})
        mlflow.log_artifact(str(paths.HISTORY), artifact_path="train")
        mlflow.log_artifact(str(paths.FID_HISTORY), artifact_path="train")
        mlflow.log_artifacts(str(paths.PROGRESS_GRIDS), artifact_path="train/grids")
        log_generator(gan.generator, "generator", config.train.latent_dim, config.seed)
        best_generator = load_model(paths.GENERATOR_BEST)
        log_generator(best_generator, "generator_best", config.train.latent_dim, config.seed)
    return history
