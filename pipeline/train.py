"""Adversarial training: the GAN as a keras.Model with its own train_step, checkpoints and history.

`train_gan` trains and writes where a `TrainOutputs` says; it knows nothing of experiment
tracking: a tracker joins as one more Keras callback that also hears of checkpoints and warnings
(`TrainingListener`). `train_and_log` is the train stage's whole job, tracked.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import keras
import numpy as np
import pandas as pd
from keras import ops

from pipeline import fused, metrics, steps, tracking
from pipeline.augment import diff_augment
from pipeline.checkpoint import TrainState, read_state, restore_checkpoint, save_checkpoint, training_fingerprint
from pipeline.config import Config, ConfigError, TrainConfig
from pipeline.devices import (check_distribution, check_same_inputs, configure_devices, distributed,
                              distribution_settings, dtype_policy, from_writer, is_writer, precision, process_count,
                              process_index, speed_settings, undistributed)
from pipeline.errors import PipelineError
from pipeline.evaluate import TRAIN_EVAL_NOISE_OFFSET, embed, feature_extractor
from pipeline.files import atomic_path, write_json
from pipeline.fused import float32_copy
from pipeline.images import save_png, tile, to_uint8
from pipeline.models import NUM_CLASSES, build_discriminator, build_generator, fixed_noise, generate, is_conditional
from pipeline.paths import TrainOutputs

log = logging.getLogger(__name__)

METRIC_NAMES = ("d_loss", "g_loss", "d_acc_real", "d_acc_fake", "d_real", "d_fake")


class GAN(keras.Model):
    """A generator and a discriminator trained against each other by fit().

    Trains any `model.arch`: a conditional pair gets the real labels from fit's `y` and random
    labels for its fakes. Options from params: the loss (non-saturating cross-entropy or hinge),
    `d_steps` discriminator updates per generator update, one-sided label smoothing, and, on every
    image the discriminator sees, differentiable augmentation and instance noise.

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
        self.loss = config.loss
        self.augment = config.augment or ()
        self.instance_noise = config.instance_noise
        self.mode_seeking = config.mode_seeking
        # Annealed each epoch by Schedules; a variable, so the compiled step sees it change.
        self.noise_std = keras.Variable(config.instance_noise, trainable=False, name="noise_std")
        self.noise_seed = keras.random.SeedGenerator(seed)
        self.winograd_layers = 0  # how many of its convolutions run as Winograd's (set by build_gan)
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
        """Returns the discriminator's float32 logits for `images`, augmented and with the instance noise added
        when those are on."""
        if self.augment:
            images = diff_augment(images, self.augment, self.noise_seed)
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
        if self.loss == "hinge":
            return ops.mean(ops.relu(1.0 - real_logits)) + ops.mean(ops.relu(1.0 + fake_logits))
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
        if self.mode_seeking and self.conditional:
            fake_labels = paired_labels(fake_labels)
        fake = self._generate(noise, fake_labels, training=True)
        real_logits, fake_logits = self._judge_both(real, labels, fake, fake_labels)
        d_loss = self._d_loss(real_logits, fake_logits)
        g_loss = -ops.mean(fake_logits) if self.loss == "hinge" else self.loss_fn(ops.ones_like(fake_logits),
                                                                                   fake_logits)
        if self.mode_seeking:
            g_loss = g_loss + self.mode_seeking * mode_seeking_loss(fake, noise)
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


def paired_labels(labels):
    """Returns `labels` with its second half a copy of its first: the pairs mode_seeking_loss compares share a class."""
    count = ops.shape(labels)[0]
    return ops.concatenate([labels[:count // 2], labels[:count - count // 2]], axis=0)


def mode_seeking_loss(fake, noise):
    """Returns MSGAN's term (Mao et al. 2019): the inverse of how far apart two fakes are per unit of noise distance.

    The batch's first half is paired with its second. A generator that maps different noise to
    the same image (mode collapse: low recall) gets a large loss; one whose images vary with the
    noise a small one. Mean absolute differences, in float32 whatever the compute dtype.
    """
    half = ops.shape(fake)[0] // 2
    fake = ops.cast(fake, "float32")
    image_distance = ops.mean(ops.abs(fake[:half] - fake[half:2 * half]))
    noise_distance = ops.mean(ops.abs(noise[:half] - noise[half:2 * half]))
    return 1.0 / (image_distance / noise_distance + 1e-5)


def build_gan(config: Config, image_shape: tuple[int, int, int]) -> GAN:
    """Returns the compiled GAN of `model.arch` for `image_shape`, with Adam(beta_1) at `lr` for the generator and
    `d_lr` (or `lr`) for the discriminator.

    The models compute in `train.mixed_precision`'s policy (variables stay float32); the
    generator's optimizer keeps its exponential moving average when `train.ema` is on.
    """
    t = config.train
    with precision(dtype_policy(t.mixed_precision)):
        gan = GAN(build_generator(config.model, t.latent_dim, image_shape),
                  build_discriminator(config.model, image_shape), t, config.seed)
    gan.winograd_layers = sum(fused.choose_winograd(model, t.winograd) for model in (gan.generator, gan.discriminator))
    gan.compile(d_optimizer=fused.Adam(t.discriminator_lr, beta_1=t.beta_1),
                g_optimizer=fused.Adam(t.lr, beta_1=t.beta_1, use_ema=t.ema > 0, ema_momentum=t.ema))
    # JAX without jit runs op by op, many times slower: there the step is always compiled.
    gan.jit_compile = t.jit_compile or keras.backend.backend() == "jax"
    return gan


def winograd_settings(gan: GAN) -> dict[str, str]:
    """Returns the train log's and the run's tags for `gan`'s Winograd convolutions: "on" where any layer runs one
    (train.winograd chose it and the layer fits, pipeline/fused.py), and how many."""
    return {"speed.winograd": "on" if gan.winograd_layers else "off",
            "speed.winograd_layers": str(gan.winograd_layers)}


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
        # Through numpy: a copy (on JAX, predict() on `out` donates its variables' buffers, which must not be the
        # GAN's), and on this process's devices only, also where the GAN's variables span several processes.
        target.assign(ops.convert_to_numpy(source).astype(target.dtype))
    for variable, value in zip(gan.generator.trainable_variables, raw):
        variable.assign(value)
    return out



class Schedules(keras.callbacks.Callback):
    """Anneals, at each epoch's start, the settings params anneal over training: the instance noise linearly from
    `train.instance_noise` to 0, and both learning rates linearly to 0 over the last `train.lr_decay` of training.

    Training's progress is the share of `train.epochs` done or, under a time limit, the share of its seconds gone
    (counted from `started`, as TimeLimit counts; by default from now), whichever is further.
    """

    def __init__(self, config: TrainConfig, started: float | None = None):
        super().__init__()
        self.config = config
        self.started = time.perf_counter() if started is None else started

    def progress(self, epoch: int) -> float:
        """Returns the share of training done when epoch `epoch` (0-based) begins."""
        t = self.config
        done = epoch / t.epochs
        if t.time_limit_minutes is not None:
            done = max(done, (time.perf_counter() - self.started) / (t.time_limit_minutes * 60))
        return min(done, 1.0)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        t, done = self.config, self.progress(epoch)
        self.model.noise_std.assign(t.instance_noise * (1.0 - done))
        if t.lr_decay:
            scale = min(1.0, (1.0 - done) / t.lr_decay)
            self.model.g_optimizer.learning_rate = t.lr * scale
            self.model.d_optimizer.learning_rate = t.discriminator_lr * scale


class TrainingDiverged(PipelineError):
    """A loss became NaN or infinite: training stopped, the last good checkpoint kept."""


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss, naming the epoch and step."""

    def __init__(self):
        super().__init__()
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        for name in ("d_loss", "g_loss"):
            value = float(logs[name])
            if not np.isfinite(value):
                raise TrainingDiverged(f"{name} became {value} in epoch {self.epoch}, step {batch + 1}; "
                                       f"training stopped, the last good checkpoint is kept")


class TimeLimit(keras.callbacks.Callback):
    """Stops training at the end of the first epoch that leaves too little time for another and the wrap-up.

    The time counts from `started`, the start of train_gan, so building the models and tracing the step count
    too. Another epoch is estimated from this one's training, and an epoch's wrap-up (the callbacks' work after
    it: EpochEnd's evaluation, sample grid and checkpoint) as the longest seen so far: the last epoch always does
    all of EpochEnd's work, and this epoch's may be as long. Runs before EpochEnd, which then sees
    `stop_training` and treats the epoch as the last.
    """

    def __init__(self, minutes: float, started: float):
        super().__init__()
        self.seconds = minutes * 60
        self.started = self.began = started
        self.ended: float | None = None
        self.wrap_up = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.began = time.perf_counter()
        if self.ended is not None:
            self.wrap_up = max(self.wrap_up, self.began - self.ended)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = self.ended = time.perf_counter()
        # Going on costs this epoch's wrap-up, the next epoch and the last wrap-up; stopping, one wrap-up.
        needed = (now - self.began) + 2 * self.wrap_up
        # Process 0's clock decides for all: a process that stopped alone would leave the others waiting in the
        # next step's all-reduce.
        if from_writer(np.bool_(now - self.started + needed > self.seconds)):
            log.info("train.time_limit_minutes reached after epoch %d (%.0f s)", epoch + 1, now - self.started)
            self.model.stop_training = True


@runtime_checkable
class TrainingListener(Protocol):
    """What a callback given to train_gan may also implement, to hear what fit's own events do not say."""

    def on_start(self, settings: Mapping[str, str]) -> None:
        """Training starts with these speed settings, the models built: the train log's line, as `speed.*` tags."""

    def on_checkpoint(self, state: TrainState) -> None:
        """A checkpoint now holds `state`: its epochs survive a crash (read-only)."""

    def on_warning(self, name: str, message: str) -> None:
        """Training found something a user should know, e.g. "discriminator_wins"."""


def fid_scorer(config: Config, classifier: keras.Model, real_images: np.ndarray) -> Callable[[keras.Model], dict]:
    """Returns a function giving {"fid", "kid"} of a generator's fixed-noise samples against fixed real images.

    Training-time scores: `train.eval_samples` images each side and `train.eval_kid_subsets`
    KID subsets, cheaper than the evaluate stage's.
    """
    extractor = feature_extractor(classifier)
    count = min(config.train.eval_samples, len(real_images))
    chosen = np.random.default_rng(config.seed).permutation(len(real_images))[:count]
    with undistributed():  # any count of images (devices.undistributed)
        real_features, _ = embed(extractor, real_images[chosen])
    noise = fixed_noise(config.seed + TRAIN_EVAL_NOISE_OFFSET, count, config.train.latent_dim)

    def score(generator: keras.Model) -> dict:
        fake, _ = embed(extractor, generate(generator, noise))
        kid, _ = metrics.kid(real_features, fake, subsets=config.train.eval_kid_subsets,
                             subset_size=config.evaluate.kid_subset_size, seed=config.seed)
        return {"fid": metrics.fid(fake, real_features), "kid": kid}

    return score


class EpochEnd(keras.callbacks.Callback):
    """Everything training does after an epoch, in this order: the history row and CSV; every
    sample_every epochs a fixed-noise grid; every eval_every epochs FID and KID, keeping the best
    generator; the discriminator-wins check; every checkpoint_every epochs a checkpoint. The last
    epoch (train.epochs, or the time limit's) does all of them.

    One callback, so the order is this method's and `state` has one writer; listeners hear of
    checkpoints and warnings through their own methods (TrainingListener; train_gan tells them of the start).

    Checkpoints record when each epoch was first checkpointed (`state.log_times`): a tracker that
    stamps an epoch's metrics with it can send them again after a crash without doubling them.

    With several processes (devices.initialize_processes) every one computes all of this, so that all take the same
    steps, and process 0 alone writes files and tells the listeners.
    """

    def __init__(self, config: Config, state: TrainState, outputs: TrainOutputs,
                 score: Callable[[keras.Model], dict], best_weights: list[np.ndarray] | None,
                 listeners: Sequence[TrainingListener]):
        super().__init__()
        self.config, self.state, self.outputs, self.score = config, state, outputs, score
        self.best_weights, self.listeners = best_weights, listeners
        side = config.train.grid_size
        self.grid_noise = fixed_noise(config.seed, side * side, config.train.latent_dim)
        self.export: keras.Model | None = None  # one float32 copy of the averaged generator, refreshed in place
        self.writer = is_writer()
        self.started = 0.0
        self.winning_epochs = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        t, number = self.config.train, epoch + 1
        final = number == t.epochs or self.model.stop_training
        self.record(number, logs)
        grid_due, fid_due = final or number % t.sample_every == 0, final or number % t.eval_every == 0
        # On whole batches of any size, also under train.distribution (devices.undistributed).
        with undistributed():
            if grid_due or fid_due:
                self.export = averaged_generator(self.model, self.export)
            if grid_due:
                images = to_uint8(generate(self.export, self.grid_noise))
                if self.writer:
                    save_png(self.outputs.grids / f"epoch_{number:04d}.png", tile(images, t.grid_size))
            if fid_due:
                self.track_fid(number, self.export)
        self.watch_discriminator(number, float(logs["d_loss"]))
        if final or number % t.checkpoint_every == 0:
            self.checkpoint(number)

    def record(self, number: int, logs: dict) -> None:
        """Appends the epoch's metrics to the history and rewrites its CSV."""
        row = {"epoch": number, **{name: float(logs[name]) for name in METRIC_NAMES},
               "seconds": time.perf_counter() - self.started}
        self.state.history.append(row)
        if self.writer:
            write_csv(self.outputs.history, self.state.history)

    def track_fid(self, number: int, generator: keras.Model) -> None:
        """Scores `generator`, appends to the FID history and saves it if it is the best so far.

        GAN quality peaks and then degrades, so the generator with the lowest FID is kept beside the last.
        """
        row = {"epoch": number, **self.score(generator)}
        self.state.fid_history.append(row)
        if self.writer:
            write_csv(self.outputs.fid_history, self.state.fid_history)
        if self.state.best is None or row["fid"] < self.state.best["fid"]:
            self.state.best = row
            self.best_weights = generator.get_weights()
            if self.writer:
                with atomic_path(self.outputs.generator_best) as tmp:
                    generator.save(tmp)
        log.info("epoch %d: FID %.3f, KID %.5f (best FID %.3f at epoch %d)", number, row["fid"], row["kid"],
                 self.state.best["fid"], self.state.best["epoch"])

    def watch_discriminator(self, number: int, d_loss: float) -> None:
        """Warns once d_loss has stayed under train.d_win_loss for train.d_win_epochs epochs in a row."""
        t = self.config.train
        self.winning_epochs = self.winning_epochs + 1 if d_loss < t.d_win_loss else 0
        if self.winning_epochs == t.d_win_epochs:
            message = (f"the discriminator wins outright: d_loss below {t.d_win_loss} for {t.d_win_epochs} "
                       f"epochs up to epoch {number}; the generator gets no useful gradient")
            log.warning("%s", message)
            for listener in self.listeners if self.writer else ():
                listener.on_warning("discriminator_wins", message)

    def checkpoint(self, number: int) -> None:
        """Writes a checkpoint of everything after epoch `number`, then tells the listeners."""
        self.state.epoch = number
        now = int(time.time() * 1000)
        for row in self.state.history:
            self.state.log_times.setdefault(str(row["epoch"]), now)
        if not self.writer:
            return
        save_checkpoint(self.model, self.state, self.best_weights, self.outputs.checkpoint)
        for listener in self.listeners:
            listener.on_checkpoint(self.state)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Writes `rows` as a CSV table, atomically."""
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def train_gan(config: Config, images: np.ndarray, labels: np.ndarray, classifier: keras.Model,
              outputs: TrainOutputs, state: TrainState | None = None,
              callbacks: Sequence[keras.callbacks.Callback] = (),
              verbose: int | None = None) -> tuple[GAN, pd.DataFrame, pd.DataFrame]:
    """Returns the trained GAN, its per-epoch history and its FID history.

    Starts from `state` (a checkpoint's) when given. On the way it writes grids, checkpoints and
    the best-FID generator to `outputs`. `callbacks` run after training's own each epoch; those
    that are TrainingListeners also hear of the start's speed settings, each checkpoint and each warning.

    With several processes (devices.initialize_processes), process 0's `state` and checkpoint count: the others
    start from its epoch and variables, feed their rows of each global batch (process_batches) and write nothing.
    """
    if config.train.batch_size > len(images):
        raise ConfigError(f"train.batch_size: {config.train.batch_size} is larger than the {len(images)} "
                          f"training images; allowed values: <= {len(images)}")
    started = time.perf_counter()
    device = configure_devices()  # before any model: TensorFlow fixes GPU memory settings at first use
    t = config.train
    writer = is_writer()
    state = state or TrainState(fingerprint="")
    # Process 0 read the checkpoint: every process resumes after its epoch (the others' `state` is not read).
    state.epoch = int(from_writer(np.int32(state.epoch)))
    with distributed(t.distribution, t.batch_size) as device_count:  # models are laid out on the devices as built
        keras.utils.set_random_seed(config.seed + state.epoch)
        gan = build_gan(config, tuple(images.shape[1:]))
        settings = {**speed_settings(t.mixed_precision, t.jit_compile), **winograd_settings(gan),
                    **distribution_settings(t.distribution)}
        log.info("training with %s in %s: %d images of shape %s; %s", device, gan.generator.dtype_policy.name,
                 len(images), images.shape[1:],
                 ", ".join(f"{k.removeprefix('speed.')} {v}" for k, v in settings.items()))
        listeners = [c for c in callbacks if isinstance(c, TrainingListener)]
        for listener in listeners if writer else ():
            listener.on_start(settings)  # before the first step: a run that dies in training still says how it ran
        best_weights = None
        if state.epoch:
            best_weights = restore_checkpoint(gan, outputs.checkpoint if writer else None)
            if writer:
                with undistributed():  # the best generator's copy on this process's devices alone
                    restore_outputs(gan, state, best_weights, outputs)
        elif writer:
            shutil.rmtree(outputs.grids, ignore_errors=True)  # grids persist for resumes, not fresh runs
        own = [EpochEnd(config, state, outputs, fid_scorer(config, classifier, images), best_weights, listeners),
               DivergenceGuard()]
        if t.time_limit_minutes is not None:
            own.insert(0, TimeLimit(t.time_limit_minutes, started))
        if t.instance_noise or t.lr_decay:
            own.append(Schedules(t, started))
        if verbose is None:
            # A live progress bar on a terminal; one line per epoch in logs, where a bar is noise.
            verbose = 1 if sys.stdout.isatty() else 2
        images, labels = even_split(images, labels, t.batch_size, device_count)
        if t.distribution == "none":
            gan.fit(images, labels if gan.conditional else None, batch_size=t.batch_size, shuffle=True,
                    initial_epoch=state.epoch, epochs=t.epochs, callbacks=[*own, *callbacks], verbose=verbose)
        else:
            batches = process_batches(images, labels if gan.conditional else None, t.batch_size, config.seed,
                                      range(state.epoch, t.epochs), process_index(), process_count())
            gan.fit(batches, steps_per_epoch=-(-len(images) // t.batch_size), initial_epoch=state.epoch,
                    epochs=t.epochs, callbacks=[*own, *callbacks], verbose=verbose)
    if state.epoch and writer:
        for listener in listeners:  # what a resumed run restored, also when nothing was left to train
            listener.on_checkpoint(state)
    return gan, pd.DataFrame(state.history), pd.DataFrame(state.fid_history)


def even_split(images: np.ndarray, labels: np.ndarray, batch_size: int,
               device_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the images and labels fit() trains on: all of them on one device; on several, all but the last
    len(images) % device_count, so that every batch, an epoch's last and smaller one too, splits evenly
    across the devices (Keras' DataParallel refuses a batch that does not: batch_size divides already).
    """
    left_out = len(images) % device_count
    if not left_out:
        return images, labels
    log.info("training on the first %d of the %d images: batches of %d split evenly across %d devices, and so "
             "does the last one of each epoch", len(images) - left_out, len(images), batch_size, device_count)
    return images[:-left_out], labels[:-left_out]


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """Returns the order of the `count` training images in epoch `epoch` (0-based) under train.distribution: the
    same in every process and on every resume, from `seed` and the epoch alone."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def process_batches(images: np.ndarray, labels: np.ndarray | None, batch_size: int, seed: int, epochs: range,
                    index: int, count: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Yields process `index`'s part of each global batch of `batch_size` of `epochs`: (images,) or (images, labels).

    Each epoch's global batches are consecutive runs of epoch_order, the last one smaller; process `index` of
    `count` takes the index-th of `count` equal slices of each (Keras' JAX trainer joins the processes' slices in
    process order into the global batch). So any number of processes, one included, trains on the same global
    batches. Every batch must divide by `count` (even_split and check_distribution see to that).
    """
    for epoch in epochs:
        order = epoch_order(seed, epoch, len(images))
        for start in range(0, len(order), batch_size):
            rows = np.split(order[start:start + batch_size], count)[index]
            yield (images[rows],) if labels is None else (images[rows], labels[rows])  # tuples, as fit() wants


def restore_outputs(gan: GAN, state: TrainState, best_weights: list[np.ndarray] | None,
                    outputs: TrainOutputs) -> None:
    """Rewrites the history CSVs and the best generator that a resumed run had made before it stopped."""
    write_csv(outputs.history, state.history)
    write_csv(outputs.fid_history, state.fid_history)
    if best_weights is not None:
        best = float32_copy(gan.generator)
        best.set_weights(best_weights)
        with atomic_path(outputs.generator_best) as tmp:
            best.save(tmp)


def save_models(gan: GAN, outputs: TrainOutputs) -> None:
    """Writes the final generator (averaged, when `train.ema` is on) and discriminator as float32 .keras files.

    Every process makes them (averaged_generator swaps variables that all processes share); process 0 writes them.
    """
    for model, path in ((averaged_generator(gan), outputs.generator),
                        (float32_copy(gan.discriminator), outputs.discriminator)):
        if is_writer():
            with atomic_path(path) as tmp:
                model.save(tmp)


def summarize(history: pd.DataFrame, fid_history: pd.DataFrame) -> dict[str, Any]:
    """Returns metrics/train.json's content: the last epoch's metrics, the best and the last FID."""
    best = fid_history.loc[fid_history["fid"].idxmin()]
    return {"epochs": int(history["epoch"].iloc[-1]), **history.iloc[-1].drop("epoch").to_dict(),
            "best_epoch": int(best["epoch"]), "best_fid": float(best["fid"]),
            "last_fid": float(fid_history["fid"].iloc[-1])}


def train_and_log(config: Config, images: np.ndarray, labels: np.ndarray, classifier: keras.Model,
                  manifest: Mapping[str, Any], outputs: TrainOutputs) -> pd.DataFrame:
    """Returns the history of a full training run, resumed from a matching checkpoint when one exists.

    Every output is written to `outputs` and tracked: in the interrupted run when resuming one,
    else in a new run. With several processes, process 0 alone does both; the others train beside it and
    neither write nor touch MLflow.
    """
    t = config.train
    check_distribution(t.distribution, t.batch_size)  # before a run is opened for a training that cannot start
    fingerprint = training_fingerprint(config, images, labels, classifier)
    check_same_inputs(fingerprint)
    if not is_writer():
        gan, history, _ = train_gan(config, images, labels, classifier, outputs)
        save_models(gan, outputs)  # the same computations as process 0's, writing nothing
        return history
    state = read_state(outputs.checkpoint, fingerprint, config.train.epochs)
    with tracking.start_run(config, manifest, resume_run_id=state and state.run_id, dataset=(images, labels)) as run:
        state = state or TrainState(fingerprint=fingerprint)
        state.run_id = run.info.run_id
        gan, history, fid_history = train_gan(config, images, labels, classifier, outputs, state=state,
                                              callbacks=[run.epoch_logger()])
        save_models(gan, outputs)
        summary = summarize(history, fid_history)
        write_json(outputs.metrics, summary)
        tracking.log_training(run, config, summary, outputs)
    return history
