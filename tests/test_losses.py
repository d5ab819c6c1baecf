"""The GAN's losses against a plain NumPy reference: binary cross-entropy from logits, non-saturating generator loss.

Both backends share the loss code (pipeline/train.py), so comparing them cannot catch an error in it;
these tests compare it with the formulas instead, on logits given to it.
"""

import numpy as np
import pytest
from keras import ops

from conftest import merge
from pipeline.config import config_from_dict
from pipeline.train import build_gan

pytestmark = pytest.mark.numerics

# Logits the discriminator might give a batch: ordinary values and saturated ones, where a naive
# log(sigmoid(x)) would give log(0).
REAL_LOGITS = np.array([[2.0], [0.5], [-1.5], [30.0], [-30.0], [0.0]], np.float32)
FAKE_LOGITS = np.array([[-1.0], [0.3], [4.0], [-25.0], [25.0], [-0.2]], np.float32)
# Float32 losses: each term a few roundings of log1p(exp(.)), then a mean of six; 1e-6 is some 17
# float32 roundings (u = 6e-8) of the result.
RTOL = 1e-6


def softplus(x):
    """log(1 + e^x) in float64, without overflow."""
    return np.logaddexp(0.0, np.asarray(x, np.float64))


def bce_from_logits(target: float, logits) -> float:
    """Mean binary cross-entropy of sigmoid(logits) against `target`: -t log s(x) - (1 - t) log(1 - s(x))."""
    # -log s(x) = softplus(-x) and -log(1 - s(x)) = softplus(x).
    return float(np.mean(target * softplus(-logits) + (1 - target) * softplus(logits)))


def gan_judging(tiny_params, monkeypatch, real_logits, fake_logits, **train):
    """Returns a GAN whose discriminator gives `real_logits` to the reals and `fake_logits` to the fakes."""
    gan = build_gan(config_from_dict(merge(tiny_params, {"train": train})), (28, 28, 1))
    monkeypatch.setattr(gan, "_judge_both", lambda *args: (ops.convert_to_tensor(real_logits),
                                                           ops.convert_to_tensor(fake_logits)))
    return gan


def joint_losses(gan) -> tuple[float, float]:
    real = np.zeros((len(REAL_LOGITS), 28, 28, 1), np.float32)
    d_loss, g_loss, _, _ = gan.joint_losses(real, None)
    return float(d_loss), float(g_loss)


def test_generator_loss_is_the_non_saturating_cross_entropy_of_fakes_labelled_real(tiny_params, monkeypatch):
    gan = gan_judging(tiny_params, monkeypatch, REAL_LOGITS, FAKE_LOGITS)
    _, g_loss = joint_losses(gan)
    # -mean log D(G(z)) (Goodfellow et al. 2014, section 3), not the saturating mean log(1 - D(G(z))).
    assert g_loss == pytest.approx(float(np.mean(softplus(-FAKE_LOGITS))), rel=RTOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_discriminator_loss_is_cross_entropy_of_reals_as_real_and_fakes_as_fake(smoothing, tiny_params, monkeypatch):
    gan = gan_judging(tiny_params, monkeypatch, REAL_LOGITS, FAKE_LOGITS, label_smoothing=smoothing)
    d_loss, _ = joint_losses(gan)
    # One-sided label smoothing: real targets 1 - smoothing, fake targets stay 0 (Salimans et al. 2016).
    expected = bce_from_logits(1.0 - smoothing, REAL_LOGITS) + bce_from_logits(0.0, FAKE_LOGITS)
    assert d_loss == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_discriminator_only_updates_minimise_the_same_loss_as_the_joint_update(smoothing, tiny_params, monkeypatch):
    gan = gan_judging(tiny_params, monkeypatch, REAL_LOGITS, FAKE_LOGITS, label_smoothing=smoothing, d_steps=2)
    real = np.zeros((len(REAL_LOGITS), 28, 28, 1), np.float32)
    expected = bce_from_logits(1.0 - smoothing, REAL_LOGITS) + bce_from_logits(0.0, FAKE_LOGITS)
    assert float(gan.discriminator_loss(real, None)) == pytest.approx(expected, rel=RTOL)


def test_label_smoothing_leaves_the_generators_targets_at_one(tiny_params, monkeypatch):
    gan = gan_judging(tiny_params, monkeypatch, REAL_LOGITS, FAKE_LOGITS, label_smoothing=0.2)
    _, g_loss = joint_losses(gan)
    assert g_loss == pytest.approx(bce_from_logits(1.0, FAKE_LOGITS), rel=RTOL)


def test_hinge_discriminator_loss_is_the_mean_margin_violation_of_reals_and_fakes(tiny_params, monkeypatch):
    gan = gan_judging(tiny_params, monkeypatch, REAL_LOGITS, FAKE_LOGITS, loss="hinge")
    d_loss, _ = joint_losses(gan)
    # mean max(0, 1 - D(x)) + mean max(0, 1 + D(G(z))) (Lim & Ye 2017; SAGAN, BigGAN).
    expected = np.mean(np.maximum(0, 1 - REAL_LOGITS)) + np.mean(np.maximum(0, 1 + FAKE_LOGITS))
    assert d_loss == pytest.approx(float(expected), rel=RTOL)


def test_hinge_generator_loss_is_the_negated_mean_logit_of_fakes(tiny_params, monkeypatch):
    gan = gan_judging(tiny_params, monkeypatch, REAL_LOGITS, FAKE_LOGITS, loss="hinge")
    _, g_loss = joint_losses(gan)
    assert g_loss == pytest.approx(float(-np.mean(FAKE_LOGITS)), rel=RTOL)
