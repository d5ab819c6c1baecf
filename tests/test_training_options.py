"""Training options from params.yaml: discriminator steps, instance noise, the time limit (label smoothing: test_losses.py)."""

import numpy as np
import pytest

from conftest import merge
from pipeline.config import config_from_dict
from pipeline.paths import TrainOutputs
from pipeline.train import Schedules, TimeLimit, build_gan, mode_seeking_loss, paired_labels, train_gan
from test_train import classifier  # noqa: F401 (fixture)


def config_with(tiny_params, **train):
    return config_from_dict(merge(tiny_params, {"train": train}))


@pytest.mark.parametrize("d_steps", [1, 3])
def test_discriminator_takes_d_steps_updates_per_generator_update(d_steps, tiny_params, scaled_digits, classifier,
                                                                   tmp_path):
    gan, _, _ = train_gan(config_with(tiny_params, d_steps=d_steps), *scaled_digits, classifier,
                          TrainOutputs(tmp_path), verbose=0)
    steps = len(scaled_digits[0][:256]) // 32
    g_updates = int(gan.g_optimizer.iterations)
    assert g_updates >= steps and int(gan.d_optimizer.iterations) == d_steps * g_updates


def test_instance_noise_perturbs_what_the_discriminator_sees(tiny_params):
    images = np.zeros((4, 28, 28, 1), np.float32)
    quiet = build_gan(config_with(tiny_params, instance_noise=0.0), (28, 28, 1))
    noisy = build_gan(config_with(tiny_params, instance_noise=0.5), (28, 28, 1))
    noisy.discriminator.set_weights(quiet.discriminator.get_weights())
    # Dropout is active in _judge (training=True): compare against the same call with noise off.
    noisy.noise_std.assign(0.0)
    baseline = [np.asarray(noisy._judge(images, None)) for _ in range(2)]
    noisy.noise_std.assign(0.5)
    perturbed = np.asarray(noisy._judge(images, None))
    assert np.abs(perturbed - baseline[0]).mean() > 3 * np.abs(baseline[1] - baseline[0]).mean()


def test_instance_noise_anneals_linearly_to_zero(tiny_params):
    config = config_with(tiny_params, instance_noise=0.4, epochs=4)
    gan = build_gan(config, (28, 28, 1))
    schedule = Schedules(config.train)
    schedule.set_model(gan)
    seen = []
    for epoch in range(4):
        schedule.on_epoch_begin(epoch)
        seen.append(float(gan.noise_std))
    assert seen == pytest.approx([0.4, 0.3, 0.2, 0.1])


def test_training_with_instance_noise_runs_the_schedule(tiny_params, scaled_digits, classifier, tmp_path):
    config = config_with(tiny_params, instance_noise=0.4, epochs=2)
    gan, _, _ = train_gan(config, scaled_digits[0][:64], scaled_digits[1][:64], classifier,
                          TrainOutputs(tmp_path), verbose=0)
    assert float(gan.noise_std) == pytest.approx(0.2)  # the last epoch's value


def test_time_limit_stops_at_an_epoch_end_and_treats_it_as_the_last(tiny_params, scaled_digits, classifier,
                                                                    tmp_path):
    from pipeline.checkpoint import read_state

    config = config_from_dict(merge(tiny_params, {"train": {"epochs": 5, "time_limit_minutes": 0.0001,
                                                            "eval_every": 3, "checkpoint_every": 3,
                                                            "sample_every": 3}}))
    _, history, fid_history = train_gan(config, scaled_digits[0][:64], scaled_digits[1][:64], classifier,
                                        TrainOutputs(tmp_path), verbose=0)
    assert history["epoch"].tolist() == [1]
    assert fid_history["epoch"].tolist() == [1]  # evaluated although 1 is off the schedule
    assert read_state(TrainOutputs(tmp_path).checkpoint, fingerprint="").epoch == 1
    # A run of fewer epochs than the checkpoint's does not resume it (it would get the longer run's generator).
    assert read_state(TrainOutputs(tmp_path).checkpoint, fingerprint="", epochs=1).epoch == 1
    assert read_state(TrainOutputs(tmp_path).checkpoint, fingerprint="", epochs=0) is None
    assert (TrainOutputs(tmp_path).grids / "epoch_0001.png").exists()


def run_time_limit(gan, minutes: float, epochs: list[tuple[float, float]], monkeypatch) -> list[bool]:
    """Returns stop_training after each epoch, for epochs beginning and ending at the given seconds (from 0)."""
    limit = TimeLimit(minutes=minutes, started=0.0)
    limit.set_model(gan)
    gan.stop_training = False
    clock = iter([t for epoch in epochs for t in epoch])
    monkeypatch.setattr("pipeline.train.time.perf_counter", lambda: next(clock))
    stops = []
    for number in range(len(epochs)):
        limit.on_epoch_begin(number)
        limit.on_epoch_end(number)
        stops.append(gan.stop_training)
    return stops


def test_time_limit_counts_from_the_start_of_training_and_expects_an_epoch_like_the_last(tiny_params, monkeypatch):
    gan = build_gan(config_with(tiny_params), (28, 28, 1))
    # Epoch 1 begins 10 s after train_gan began (model building counts) and trains 20 s; epoch 2 trains 21 s.
    assert run_time_limit(gan, 1.0, [(10.0, 30.0), (30.0, 51.0)], monkeypatch) == [False, True]


def test_time_limit_keeps_room_for_the_longest_wrap_up_because_the_last_epoch_evaluates(tiny_params, monkeypatch):
    gan = build_gan(config_with(tiny_params), (28, 28, 1))
    # 10 s epochs; after epoch 2 an evaluation takes 10 s. At 41 s, going on would cost up to 10 + 10 + 10 s.
    epochs = [(0.0, 10.0), (11.0, 21.0), (31.0, 41.0)]
    assert run_time_limit(gan, 70 / 60, epochs, monkeypatch) == [False, False, True]
    # Without that evaluation the same epochs leave room for a fourth within 70 s.
    assert run_time_limit(gan, 70 / 60, [(0.0, 10.0), (11.0, 21.0), (22.0, 32.0)], monkeypatch) == [False] * 3


def test_instance_noise_anneals_over_the_time_limit_when_that_ends_first(tiny_params, monkeypatch):
    config = config_with(tiny_params, instance_noise=0.4, epochs=1000, time_limit_minutes=100 / 60)
    gan = build_gan(config, (28, 28, 1))
    schedule = Schedules(config.train, started=0.0)
    schedule.set_model(gan)
    seen = []
    for now in (25.0, 50.0, 150.0):
        monkeypatch.setattr("pipeline.train.time.perf_counter", lambda: now)
        schedule.on_epoch_begin(1)
        seen.append(float(gan.noise_std))
    assert seen == pytest.approx([0.3, 0.2, 0.0])


def test_learning_rates_stay_then_fall_linearly_to_zero_over_the_last_lr_decay_of_training(tiny_params):
    config = config_with(tiny_params, lr=0.001, d_lr=0.002, lr_decay=0.5, epochs=10)
    gan = build_gan(config, (28, 28, 1))
    schedule = Schedules(config.train)
    schedule.set_model(gan)
    seen = []
    for epoch in (0, 4, 5, 7, 9):
        schedule.on_epoch_begin(epoch)
        seen.append([float(gan.g_optimizer.learning_rate), float(gan.d_optimizer.learning_rate)])
    assert np.allclose(seen, [[0.001, 0.002], [0.001, 0.002], [0.001, 0.002], [0.0006, 0.0012], [0.0002, 0.0004]])


def test_trained_optimizers_end_at_the_decayed_learning_rate(tiny_params, scaled_digits, classifier, tmp_path):
    config = config_with(tiny_params, lr=0.001, lr_decay=0.5, epochs=4)
    gan, _, _ = train_gan(config, scaled_digits[0][:64], scaled_digits[1][:64], classifier, TrainOutputs(tmp_path),
                          verbose=0)
    assert float(gan.g_optimizer.learning_rate) == pytest.approx(0.0005)  # the last epoch's: 1 - 3/4 over 0.5


def test_mode_seeking_loss_punishes_a_generator_that_ignores_its_noise():
    noise = np.random.default_rng(0).normal(size=(8, 100)).astype(np.float32)
    collapsed = np.zeros((8, 28, 28, 1), np.float32)
    varied = np.random.default_rng(1).uniform(-1, 1, size=(8, 28, 28, 1)).astype(np.float32)
    assert float(mode_seeking_loss(collapsed, noise)) > 1000 * float(mode_seeking_loss(varied, noise))


def test_mode_seeking_loss_is_the_inverse_of_image_over_noise_distance_between_the_halves():
    noise = np.concatenate([np.zeros((2, 4)), np.full((2, 4), 2.0)]).astype(np.float32)
    fake = np.concatenate([np.zeros((2, 3, 3, 1)), np.full((2, 3, 3, 1), 0.5)]).astype(np.float32)
    assert float(mode_seeking_loss(fake, noise)) == pytest.approx(1 / (0.5 / 2.0 + 1e-5))


@pytest.mark.parametrize("batch", [6, 7])
def test_mode_seeking_pairs_share_their_class(batch):
    labels = np.arange(batch).reshape(-1, 1)
    paired = np.asarray(paired_labels(labels))
    half = batch // 2
    assert paired.shape == (batch, 1) and (paired[:half] == paired[half:2 * half]).all()


def test_mode_seeking_adds_to_the_generators_loss_only(tiny_params):
    real = np.zeros((8, 28, 28, 1), np.float32)
    labels = np.arange(8).reshape(-1, 1) % 10
    params = merge(tiny_params, {"model": {"arch": "cdcgan", "dropout": 0.0}})
    # A vanishing weight pairs the fake labels as weight 1 does: both GANs judge the same batch, only the term differs.
    faint = build_gan(config_from_dict(merge(params, {"train": {"mode_seeking": 1e-9}})), (28, 28, 1))
    seeking = build_gan(config_from_dict(merge(params, {"train": {"mode_seeking": 1.0}})), (28, 28, 1))
    seeking.set_weights(faint.get_weights())
    d_faint, g_faint, *_ = faint.joint_losses(real, labels)
    d_seeking, g_seeking, *_ = seeking.joint_losses(real, labels)
    # Both GANs draw the same noise (same seed); the term is positive, so G's loss rises by at least it.
    assert float(g_seeking) > float(g_faint) + 0.5
    assert float(d_seeking) == pytest.approx(float(d_faint), rel=1e-6)
