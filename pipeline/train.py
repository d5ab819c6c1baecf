"""Adversarial training: the GAN as a keras.Model with its own train_step, checkpoints and history."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from keras import ops

from pipeline import fused, metrics, paths, steps, tracking
from pipeline.checkpoint import TrainState, read_state, restore_checkpoint, save_checkpoint, training_fingerprint
from pipeline.config import Config, ConfigError, TrainConfig
from pipeline.devices import configure_devices, dtype_policy, float32_copy, precision
from pipeline.errors import PipelineError
from pipeline.evaluate import TRAIN_EVAL_NOISE_OFFSET, embed, feature_extractor
from pipeline.files import atomic_path, write_json
from pipeline.images import save_png, tile, to_uint8
from pipeline.models import (NUM_CLASSES, balanced_labels, build_discriminator, build_generator, fixed_noise,
                             generate, is_conditional, load_model)

log = logging.getLogger(__name__)

METRIC_NAMES = ("d_loss", "g_loss", "d_acc_real", "d_acc_fake", "d_real", "d_fake")


class GAN(keras.Model):
    """A generator and a discriminator trained against each other by fit().

    Trains any `model.arch`: a conditional pair gets the real labels from fit's `y` and random
    labels for its fakes. Options from params: `d_steps` discriminator updates per generator
    update, one-sided label smoothing, and instance noise on the discriminator's inputs.

    Backend-neutral (keras.ops, keras.random): what a step computes is defined here; only its
    gradients and optimizer updates live in pipeline/steps, one module per Keras backend.
    """

    def __init__(self, generator: keras.Model, discriminator: keras.Model, config: TrainConfig, seed: int):
        super().__init__(name="gan")
        self.generator = generator
        self.discriminator = discriminator
        self.conditional = is_conditional(generator)
        self.latent_dim = config.latent_dim
        self.d_steps = config.d_steps
        self.real_target = 1.0 - config.label_smoothing
        self.instance_noise = config.instance_noise
        # Annealed each epoch by InstanceNoiseSchedule; a variable, so the compiled step sees it change.
        self.noise_std = keras.Variable(config.instance_noise, trainable=False, name="noise_std")
        self.noise_seed = keras.random.SeedGenerator(seed)
        self.trackers = {name: keras.metrics.Mean(name=name) for name in METRIC_NAMES}
        # Complete: its models are built and it has no call() of its own. (JAX's fit() would else
        # try to build it by calling it on a batch.)
        self.built = True

    def compile(self, d_optimizer: keras.optimizers.Optimizer, g_optimizer: keras.optimizers.Optimizer):
        super().compile(optimizer=None)
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        # Both as the one `optimizer` Keras' trainers look for: JAX's carries its variables through the step.
        self.optimizer = steps.OptimizerPair(d_optimizer, self.discriminator, g_optimizer, self.generator)
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def _latent(self, batch):
        """Returns the noise (and, conditional, the class labels) of `batch` fakes."""
        noise = keras.random.normal((batch, self.latent_dim), seed=self.noise_seed)
        if not self.conditional:
            return noise, None
        return noise, keras.random.randint((batch, 1), 0, NUM_CLASSES, seed=self.noise_seed)

    def _generate(self, noise, labels, training: bool):
        return self.generator([noise, labels] if self.conditional else noise, training=training)

    def _judge(self, images, labels):
        """Returns the discriminator's float32 logits for `images`, with the instance noise added when on."""
        if self.instance_noise:  # in float32: under mixed precision the fakes come in the compute dtype
            noise = keras.random.normal(ops.shape(images), seed=self.noise_seed)
            images = ops.cast(images, "float32") + self.noise_std * noise
        # float32 whatever the compute dtype: the losses, targets and metrics are computed in float32.
        return ops.cast(self.discriminator([images, labels] if self.conditional else images, training=True),
                        "float32")

    def _judge_both(self, real, labels, fake, fake_labels):
        """Returns the discriminator's float32 logits for `real` and for `fake`, from one call on each.

        Two calls, not one on both concatenated: the generator's loss then backpropagates through
        the discriminator on the fakes alone, not on zeros for the reals too (1.1x faster steps on
        the tutorial's network, benchmarks/RESULTS.md).
        """
        return self._judge(real, labels), self._judge(fake, fake_labels)

    def _d_loss(self, real_logits, fake_logits):
        real_targets = ops.full_like(real_logits, self.real_target)
        return self.loss_fn(real_targets, real_logits) + self.loss_fn(ops.zeros_like(fake_logits), fake_logits)

    def unpack(self, data):
        """Returns the real images of a batch from fit() and, conditional, their labels as int32 (batch, 1)."""
        real, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        if self.conditional:
            labels = ops.reshape(ops.cast(labels, "int32"), (-1, 1))
        return real, labels

    def discriminator_loss(self, real, labels):
        """Returns the loss of a discriminator-only update: `real` against a fresh batch of fakes."""
        noise, fake_labels = self._latent(ops.shape(real)[0])
        fake = self._generate(noise, fake_labels, training=True)
        return self._d_loss(*self._judge_both(real, labels, fake, fake_labels))

    def joint_losses(self, real, labels):
        """Returns (d_loss, g_loss, real_logits, fake_logits) of the joint update.

        One generator pass serves both updates, as in the TF tutorial: cheaper than two.
        """
        noise, fake_labels = self._latent(ops.shape(real)[0])
        fake = self._generate(noise, fake_labels, training=True)
        real_logits, fake_logits = self._judge_both(real, labels, fake, fake_labels)
        d_loss = self._d_loss(real_logits, fake_logits)
        g_loss = self.loss_fn(ops.ones_like(fake_logits), fake_logits)
        return d_loss, g_loss, real_logits, fake_logits

    def record_metrics(self, d_loss, g_loss, real_logits, fake_logits) -> dict:
        """Returns the running means of METRIC_NAMES after adding this step's values."""
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

    def train_step(self, *args):
        # (data) under TensorFlow's trainer, (state, data) under JAX's: pipeline/steps has one per backend.
        return steps.train_step(self, *args)


def build_gan(config: Config, image_shape: tuple[int, int, int]) -> GAN:
    """Returns the compiled GAN of `model.arch` for `image_shape`, with Adam(lr, beta_1) for each side.

    The models compute in `train.mixed_precision`'s policy (variables stay float32); the
    generator's optimizer keeps its exponential moving average when `train.ema` is on.
    """
    t = config.train
    with precision(dtype_policy(t.mixed_precision)):
        gan = GAN(build_generator(config.model, t.latent_dim, image_shape),
                  build_discriminator(config.model, image_shape), t, config.seed)
    gan.compile(d_optimizer=fused.Adam(t.lr, beta_1=t.beta_1),
                g_optimizer=fused.Adam(t.lr, beta_1=t.beta_1, use_ema=t.ema > 0, ema_momentum=t.ema))
    # JAX without jit runs op by op, many times slower: there the step is always compiled.
    gan.jit_compile = t.jit_compile or keras.backend.backend() == "jax"
    return gan


def averaged_generator(gan: GAN, out: keras.Model | None = None) -> keras.Model:
    """Returns the generator that is saved and scored: float32, with the averaged weights when `train.ema` is on.

    Writes into `out`, an earlier result, when given: callers refreshing one copy each epoch
    trace its predict function once.
    """
    out = float32_copy(gan.generator) if out is None else out
    raw = [ops.convert_to_numpy(v) for v in gan.generator.trainable_variables]
    if gan.g_optimizer.use_ema and gan.g_optimizer.built:
        gan.g_optimizer.finalize_variable_values(gan.generator.trainable_variables)
    for source, target in zip(gan.generator.variables, out.variables):
        # A copy: on JAX, predict() on `out` donates its variables' buffers, which must not be the GAN's.
        target.assign(ops.copy(ops.cast(source, target.dtype)))
    for variable, value in zip(gan.generator.trainable_variables, raw):
        variable.assign(value)
    return out


class InstanceNoiseSchedule(keras.callbacks.Callback):
    """Anneals the instance noise linearly from `train.instance_noise` to 0 over training."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.model.noise_std.assign(self.model.instance_noise * (1.0 - epoch / self.epochs))


class TrainingDiverged(PipelineError):
    """A loss became NaN or infinite: training stopped, the last good checkpoint kept."""


def is_final(model: keras.Model, epoch: int, config: Config) -> bool:
    """Returns whether `epoch` (1-based) ends training: the last one, or the time limit has stopped it."""
    return epoch == config.train.epochs or model.stop_training


class TimeLimit(keras.callbacks.Callback):
    """Stops training at the end of the first epoch that leaves too little time for another.

    The time counts from `started`, the start of train_gan, so building the models and tracing
    the step count too; another epoch is estimated from the last one, callbacks included. Runs
    before the other callbacks, so they see `stop_training` and treat the epoch as the last.
    """

    def __init__(self, minutes: float, started: float):
        super().__init__()
        self.seconds = minutes * 60
        self.started = self.last_end = started

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        last_epoch, self.last_end = now - self.last_end, now
        if now - self.started + last_epoch > self.seconds:
            log.info("train.time_limit_minutes reached after epoch %d (%.0f s)", epoch + 1, now - self.started)
            self.model.stop_training = True


class EpochOutputs(keras.callbacks.Callback):
    """After each epoch: a history row and the history CSV; every N epochs a fixed-noise sample grid."""

    def __init__(self, config: Config, rows: list[dict], history_path: Path, grid_dir: Path):
        super().__init__()
        self.config, self.rows, self.history_path, self.grid_dir = config, rows, history_path, grid_dir
        side = config.train.grid_size
        self.noise = fixed_noise(config.seed, side * side, config.train.latent_dim)
        self.started = 0.0
        self.export: keras.Model | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        number = epoch + 1
        metrics = {name: float(logs[name]) for name in METRIC_NAMES}
        metrics["seconds"] = time.perf_counter() - self.started
        self.rows.append({"epoch": number, **metrics})
        with atomic_path(self.history_path) as tmp:
            pd.DataFrame(self.rows).to_csv(tmp, index=False)
        if number % self.config.train.sample_every == 0 or is_final(self.model, number, self.config):
            self.export = averaged_generator(self.model, self.export)
            images = to_uint8(generate(self.export, self.noise))
            save_png(self.grid_dir / f"epoch_{number:04d}.png", tile(images, self.config.train.grid_size))


class FidTracking(keras.callbacks.Callback):
    """Every eval_every epochs and at the last: FID and KID of fixed-noise samples; keeps the best generator.

    GAN quality peaks and then degrades, so the generator with the lowest FID so far is saved
    beside the last one.
    """

    def __init__(self, config: Config, classifier: keras.Model, real_images: np.ndarray, state: TrainState,
                 history_path: Path, best_path: Path):
        super().__init__()
        self.config, self.state, self.history_path, self.best_path = config, state, history_path, best_path
        self.extractor = feature_extractor(classifier)
        count = min(config.train.eval_samples, len(real_images))
        chosen = np.random.default_rng(config.seed).permutation(len(real_images))[:count]
        self.real_features, _ = embed(self.extractor, real_images[chosen])
        self.noise = fixed_noise(config.seed + TRAIN_EVAL_NOISE_OFFSET, count, config.train.latent_dim)
        self.best_weights: list[np.ndarray] | None = None
        self.export: keras.Model | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        number = epoch + 1
        if number % self.config.train.eval_every and not is_final(self.model, number, self.config):
            return
        generator = self.export = averaged_generator(self.model, self.export)
        fake, _ = embed(self.extractor, generate(generator, self.noise))
        kid, _ = metrics.kid(self.real_features, fake, subsets=self.config.train.eval_kid_subsets,
                             subset_size=self.config.evaluate.kid_subset_size, seed=self.config.seed)
        row = {"epoch": number, "fid": metrics.fid(fake, self.real_features), "kid": kid}
        self.state.fid_history.append(row)
        with atomic_path(self.history_path) as tmp:
            pd.DataFrame(self.state.fid_history).to_csv(tmp, index=False)
        if self.state.best is None or row["fid"] < self.state.best["fid"]:
            self.state.best = row
            self.best_weights = generator.get_weights()
            with atomic_path(self.best_path) as tmp:
                generator.save(tmp)
        log.info("epoch %d: FID %.3f, KID %.5f (best FID %.3f at epoch %d)", number, row["fid"], kid,
                 self.state.best["fid"], self.state.best["epoch"])


class Checkpointing(keras.callbacks.Callback):
    """Every checkpoint_every epochs and at the last: a checkpoint, then the epochs' metrics to MLflow.

    Each epoch's metrics go to MLflow only once a checkpoint covers the epoch, stamped with a time
    the checkpoint records; a resumed run logs them again with the same stamp, which MLflow's SQL
    stores keep once, so a crash between checkpoint and logging loses and doubles nothing.
    """

    def __init__(self, config: Config, state: TrainState, fid: FidTracking, path: Path, track: bool):
        super().__init__()
        self.config, self.state, self.fid, self.path, self.track = config, state, fid, path, track
        self.logged_epoch = 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        number = epoch + 1
        if number % self.config.train.checkpoint_every and not is_final(self.model, number, self.config):
            return
        self.state.epoch = number
        now = int(time.time() * 1000)
        for row in self.state.history:
            self.state.log_times.setdefault(str(row["epoch"]), now)
        save_checkpoint(self.model, self.state, self.fid.best_weights, self.path)
        self.flush()

    def flush(self) -> None:
        """Logs every checkpointed epoch not yet logged by this process to MLflow, with its recorded time."""
        if not self.track:
            return
        fid_rows = {row["epoch"]: row for row in self.state.fid_history}
        for row in self.state.history:
            epoch = row["epoch"]
            if not self.logged_epoch < epoch <= self.state.epoch:
                continue
            values = {k: v for k, v in row.items() if k != "epoch"}
            if epoch in fid_rows:
                values.update(train_fid=fid_rows[epoch]["fid"], train_kid=fid_rows[epoch]["kid"])
            tracking.log_metrics(values, step=epoch, timestamp_ms=self.state.log_times[str(epoch)])
        self.logged_epoch = self.state.epoch


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss; warns when the discriminator wins outright."""

    def __init__(self, config: Config, track: bool):
        super().__init__()
        self.config, self.track = config, track
        self.epoch = 0
        self.winning_epochs = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        for name in ("d_loss", "g_loss"):
            value = float(logs[name])
            if not np.isfinite(value):
                raise TrainingDiverged(f"{name} became {value} in epoch {self.epoch}, step {batch + 1}; "
                                       f"training stopped, the last good checkpoint is kept")

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        t = self.config.train
        self.winning_epochs = self.winning_epochs + 1 if logs["d_loss"] < t.d_win_loss else 0
        if self.winning_epochs == t.d_win_epochs:
            message = (f"the discriminator wins outright: d_loss below {t.d_win_loss} for {t.d_win_epochs} "
                       f"epochs up to epoch {epoch + 1}; the generator gets no useful gradient")
            log.warning("%s", message)
            if self.track:
                mlflow.set_tag("warning.discriminator_wins", message)


def train_gan(config: Config, images: np.ndarray, labels: np.ndarray, classifier: keras.Model,
              state: TrainState | None = None, verbose: int | None = None,
              track: bool = False) -> tuple[GAN, pd.DataFrame, pd.DataFrame]:
    """Returns the trained GAN, its per-epoch history and its FID history.

    Starts from `state` (a checkpoint's) when given. On the way it writes grids, checkpoints and
    the best-FID generator; with `track`, checkpointed epochs' metrics go to the active MLflow run.
    """
    if config.train.batch_size > len(images):
        raise ConfigError(f"train.batch_size: {config.train.batch_size} is larger than the {len(images)} "
                          f"training images; allowed values: <= {len(images)}")
    started = time.perf_counter()
    device = configure_devices()  # before any model: TensorFlow fixes GPU memory settings at first use
    keras.utils.set_random_seed(config.seed + (state.epoch if state else 0))
    gan = build_gan(config, tuple(images.shape[1:]))
    log.info("training with %s in %s: %d images of shape %s", device, gan.generator.dtype_policy.name,
             len(images), images.shape[1:])
    state = state or TrainState(fingerprint="")
    if not state.epoch:
        shutil.rmtree(paths.PROGRESS_GRIDS, ignore_errors=True)  # grids persist for resumes, not fresh runs
    outputs = EpochOutputs(config, state.history, paths.HISTORY, paths.PROGRESS_GRIDS)
    fid = FidTracking(config, classifier, images, state, paths.FID_HISTORY, paths.GENERATOR_BEST)
    if state.epoch:
        fid.best_weights = restore_checkpoint(gan, paths.CHECKPOINT)
        restore_outputs(gan, state, fid.best_weights)
    checkpointing = Checkpointing(config, state, fid, paths.CHECKPOINT, track)
    callbacks = [outputs, fid, DivergenceGuard(config, track), checkpointing]
    if config.train.time_limit_minutes is not None:
        callbacks.insert(0, TimeLimit(config.train.time_limit_minutes, started))
    if config.train.instance_noise:
        callbacks.append(InstanceNoiseSchedule(config.train.epochs))
    if verbose is None:
        # A live progress bar on a terminal; one line per epoch in logs, where a bar is noise.
        verbose = 1 if sys.stdout.isatty() else 2
    gan.fit(images, labels if gan.conditional else None, batch_size=config.train.batch_size, shuffle=True,
            initial_epoch=state.epoch, epochs=config.train.epochs, callbacks=callbacks, verbose=verbose)
    checkpointing.flush()  # what a resumed run restored, also when nothing was left to train
    return gan, pd.DataFrame(state.history), pd.DataFrame(state.fid_history)


def restore_outputs(gan: GAN, state: TrainState, best_weights: list[np.ndarray] | None) -> None:
    """Rewrites the history CSVs and the best generator that a resumed run had made before it stopped."""
    with atomic_path(paths.HISTORY) as tmp:
        pd.DataFrame(state.history).to_csv(tmp, index=False)
    with atomic_path(paths.FID_HISTORY) as tmp:
        pd.DataFrame(state.fid_history).to_csv(tmp, index=False)
    if best_weights is not None:
        best = float32_copy(gan.generator)
        best.set_weights(best_weights)
        with atomic_path(paths.GENERATOR_BEST) as tmp:
            best.save(tmp)


def save_models(gan: GAN) -> None:
    """Writes the final generator (averaged, when `train.ema` is on) and discriminator as float32 .keras files."""
    for model, path in ((averaged_generator(gan), paths.GENERATOR),
                        (float32_copy(gan.discriminator), paths.DISCRIMINATOR)):
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

    noise = fixed_noise(seed, 2, latent_dim)
    example = {"noise": noise, "label": balanced_labels(2)[:, None]} if is_conditional(generator) else noise
    signature = infer_signature(example, generate(generator, noise))
    Model.log(artifact_path=None, name=name, flavor=_KerasFlavor, model=generator,
              signature=signature, input_example=example,
              # The backend it was trained on, by its PyPI name: tensorflow or jax (which brings jaxlib).
              pip_requirements=[f"keras=={keras.__version__}", keras.backend.backend()])


def train_and_log(config: Config, train_images: np.ndarray, train_labels: np.ndarray, classifier: keras.Model,
                  manifest: dict) -> pd.DataFrame:
    """Returns the history of a full training run, resumed from a matching checkpoint when one exists.

    Every output is written and tracked in MLflow: in the interrupted run when resuming one,
    else in a new run.
    """
    fingerprint = training_fingerprint(config, train_images, train_labels, classifier)
    state = read_state(paths.CHECKPOINT, fingerprint)
    with tracking.start_run(config, manifest, paths.MLFLOW_RUN, resume_run_id=state and state.run_id) as run:
        state = state or TrainState(fingerprint=fingerprint)
        state.run_id = run.info.run_id
        gan, history, fid_history = train_gan(config, train_images, train_labels, classifier, state=state,
                                              track=True)
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
        log_generator(load_model(paths.GENERATOR), "generator", config.train.latent_dim, config.seed)
        log_generator(load_model(paths.GENERATOR_BEST), "generator_best", config.train.latent_dim, config.seed)
    return history
