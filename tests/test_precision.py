"""Speed settings from params.yaml: mixed precision, averaged generator weights, XLA."""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import merge
from pipeline import devices
from pipeline.config import ConfigError, config_from_dict
from pipeline.paths import TrainOutputs
from pipeline.models import generate, load_model
from pipeline.train import averaged_generator, build_gan, save_models, train_gan, winograd_settings
from test_train import classifier  # noqa: F401 (fixture)


def config_with(tiny_params, **train):
    return config_from_dict(merge(tiny_params, {"train": train}))


@pytest.mark.parametrize(("flags", "expected"), [("fpu avx512f amx_bf16 amx_tile", True),
                                                 ("fpu avx512f avx512_bf16", True),
                                                 ("fpu avx2 avx512f", False)])
def test_cpu_bfloat16_units_are_read_from_the_cpu_flags(flags, expected, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert devices.cpu_has_bf16(cpuinfo) is expected


def test_unreadable_cpuinfo_means_no_bfloat16(tmp_path):
    assert devices.cpu_has_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize(("has_bf16", "onednn", "expected"), [(True, True, "mixed_bfloat16"), (False, True, "float32"),
                                                                (True, False, "float32")])
def test_auto_precision_takes_bfloat16_only_where_the_cpu_has_it_and_onednn_drives_it(has_bf16, onednn, expected,
                                                                                      monkeypatch):
    monkeypatch.setattr(devices, "gpu_count", lambda: 0)
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: has_bf16)
    monkeypatch.setattr(devices, "onednn_enabled", lambda: onednn)
    assert devices.dtype_policy("auto") == expected
    assert devices.dtype_policy("float32") == "float32"
    assert devices.dtype_policy("bfloat16") == "mixed_bfloat16"


def test_auto_precision_takes_bfloat16_on_a_gpu(monkeypatch):
    monkeypatch.setattr(devices, "gpu_count", lambda: 1)
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    assert devices.dtype_policy("auto") == "mixed_bfloat16"


def test_unknown_precision_is_refused_naming_the_key(tiny_params):
    with pytest.raises(ConfigError, match="train.mixed_precision: 'float16' is not supported"):
        config_with(tiny_params, mixed_precision="float16")


@pytest.mark.numerics
@pytest.mark.parametrize(("precision", "policy"), [("float32", "float32"), ("bfloat16", "mixed_bfloat16")])
def test_training_runs_in_the_precision_asked_for_whatever_the_cpu(precision, policy, tiny_params, scaled_digits,
                                                                   classifier, tmp_path):
    # Explicit settings, not `auto`, which would take whichever one this CPU suits (devices.dtype_policy).
    gan, history, fid_history = train_gan(config_with(tiny_params, mixed_precision=precision), scaled_digits[0][:64],
                                          scaled_digits[1][:64], classifier, TrainOutputs(tmp_path), verbose=0)
    for model in (gan.generator, gan.discriminator):
        assert {layer.dtype_policy.name for layer in model.layers if layer.weights} == {policy}
    assert np.isfinite(history[["d_loss", "g_loss"]].to_numpy()).all() and np.isfinite(fid_history["fid"]).all()
    assert int(gan.g_optimizer.iterations) == 2  # 64 digits in batches of 32


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_variables(tiny_params):
    gan = build_gan(config_with(tiny_params, mixed_precision="bfloat16"), (28, 28, 1))
    for model in (gan.generator, gan.discriminator):
        assert {layer.dtype_policy.name for layer in model.layers if layer.weights} == {"mixed_bfloat16"}
        assert {v.dtype for v in model.trainable_variables} == {"float32"}
    images = gan.generator(np.zeros((2, 100), np.float32))
    assert keras.backend.standardize_dtype(images.dtype) == "bfloat16"


def test_building_a_bfloat16_gan_leaves_the_global_policy_float32(tiny_params):
    build_gan(config_with(tiny_params, mixed_precision="bfloat16"), (28, 28, 1))
    assert keras.config.dtype_policy().name == "float32"


def test_bfloat16_training_saves_float32_models(tiny_params, scaled_digits, classifier, tmp_path):
    config = config_with(tiny_params, mixed_precision="bfloat16", epochs=2)
    gan, history, _ = train_gan(config, *scaled_digits, classifier, TrainOutputs(tmp_path), verbose=0)
    assert np.isfinite(history[["d_loss", "g_loss"]].to_numpy()).all()
    outputs = TrainOutputs(tmp_path)
    save_models(gan, outputs)
    for path in (outputs.generator, outputs.discriminator, outputs.generator_best):
        model = load_model(path)
        assert {layer.dtype_policy.name for layer in model.layers if layer.weights} == {"float32"}, path
    images = generate(load_model(outputs.generator_best), np.zeros((3, 100), np.float32))
    assert images.dtype == np.float32


def test_averaged_generator_holds_the_optimizers_moving_average(tiny_params, scaled_digits, classifier, tmp_path):
    gan, _, _ = train_gan(config_with(tiny_params, ema=0.9, epochs=2), *scaled_digits, classifier,
                          TrainOutputs(tmp_path), verbose=0)
    raw = [ops.convert_to_numpy(v) for v in gan.generator.trainable_variables]
    averages = [ops.convert_to_numpy(v) for v in gan.g_optimizer._model_variables_moving_average]
    averaged = averaged_generator(gan)
    by_path = {v.path: ops.convert_to_numpy(v) for v in averaged.trainable_variables}
    for variable, average in zip(gan.generator.trainable_variables, averages):
        np.testing.assert_allclose(by_path[variable.path], average, rtol=1e-6)
    assert any(not np.allclose(r, a) for r, a in zip(raw, averages))
    # Reading the average leaves the weights that train untouched.
    for variable, value in zip(gan.generator.trainable_variables, raw):
        np.testing.assert_array_equal(ops.convert_to_numpy(variable), value)


def test_without_ema_the_saved_generator_has_the_trained_weights(tiny_params, scaled_digits, classifier, tmp_path):
    gan, _, _ = train_gan(config_with(tiny_params, ema=0.0), *scaled_digits, classifier,
                          TrainOutputs(tmp_path), verbose=0)
    for a, b in zip(averaged_generator(gan).get_weights(), gan.generator.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_the_moving_average_trails_the_trained_weights(tiny_params, scaled_digits, classifier, tmp_path):
    """A decay near 1 keeps the average near the start; a small one follows the weights closely."""
    distances = {}
    for ema in (0.5, 0.9999):
        gan, _, _ = train_gan(config_with(tiny_params, ema=ema), *scaled_digits, classifier,
                              TrainOutputs(tmp_path), verbose=0)
        raw = gan.generator.trainable_variables[0]
        average = averaged_generator(gan).trainable_variables[0]
        distances[ema] = float(np.abs(ops.convert_to_numpy(raw) - ops.convert_to_numpy(average)).mean())
    assert distances[0.9999] > 3 * distances[0.5]


@pytest.mark.parametrize("jit_compile", [True, False])
def test_jit_compile_param_sets_xla_for_the_step(jit_compile, tiny_params):
    gan = build_gan(config_with(tiny_params, jit_compile=jit_compile), (28, 28, 1))
    assert gan.jit_compile is jit_compile


def test_xla_training_runs(tiny_params, scaled_digits, classifier, tmp_path):
    config = config_with(tiny_params, jit_compile=True, mixed_precision="float32")
    _, history, _ = train_gan(config, scaled_digits[0][:64], scaled_digits[1][:64], classifier,
                              TrainOutputs(tmp_path), verbose=0)
    assert np.isfinite(history[["d_loss", "g_loss"]].to_numpy()).all()


@pytest.mark.parametrize(("setting", "gpus", "onednn", "expected"),
                         [("auto", 0, True, True), ("auto", 0, False, False), ("auto", 1, True, False),
                          ("enabled", 0, False, True), ("disabled", 0, True, False)])
def test_auto_winograd_is_on_only_for_a_cpu_with_onednn(setting, gpus, onednn, expected, monkeypatch):
    monkeypatch.setattr(devices, "gpu_count", lambda: gpus)
    monkeypatch.setattr(devices, "onednn_enabled", lambda: onednn)
    assert devices.winograd_enabled(setting) is expected


@pytest.mark.parametrize(("model", "train", "expected"),
                         [({"kernel_size": 5}, {"winograd": "enabled"}, "on"),
                          ({"kernel_size": 5}, {"winograd": "enabled", "mixed_precision": "bfloat16"}, "off"),
                          ({"kernel_size": 3}, {"winograd": "enabled"}, "off"),  # no layer fits
                          ({"kernel_size": 5}, {"winograd": "disabled"}, "off")])
def test_winograd_is_tagged_on_only_where_a_built_layer_runs_it(tiny_params, model, train, expected):
    gan = build_gan(config_from_dict(merge(tiny_params, {"model": model, "train": train})), (28, 28, 1))
    chosen = [layer for net in (gan.generator, gan.discriminator) for layer in net._flatten_layers()
              if getattr(layer, "winograd", False)]
    assert (len(chosen) > 0) == (expected == "on")
    assert winograd_settings(gan) == {"speed.winograd": expected, "speed.winograd_layers": str(len(chosen))}


@pytest.mark.numerics
def test_training_with_winograd_gives_the_direct_convolutions_results_to_float32_rounding(tiny_params, scaled_digits):
    # (16, 8, 4): a stride-1 5x5 transposed convolution, 7x7x16 -> 7x7x8, that Winograd computes when enabled.
    results = []
    for setting in ("enabled", "disabled"):
        config = config_from_dict(merge(tiny_params, {"model": {"generator_filters": [16, 8, 4], "kernel_size": 5},
                                                      "train": {"winograd": setting}}))
        keras.utils.set_random_seed(config.seed)
        gan = build_gan(config, (28, 28, 1))
        assert [layer.winograd for layer in gan.generator.layers
                if isinstance(layer, keras.layers.Conv2DTranspose)] == [setting == "enabled", False, False]
        history = gan.fit(scaled_digits[0][:96], batch_size=32, epochs=1, shuffle=False, verbose=0).history
        results.append([history["d_loss"][-1], history["g_loss"][-1],
                        *(ops.convert_to_numpy(v) for v in gan.generator.trainable_variables)])
    for what, a, b in zip(["d_loss", "g_loss", *range(len(results[0]) - 2)], *results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * (np.abs(b).max() + 1e-3), err_msg=str(what))
