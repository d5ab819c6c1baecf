"""tf_startup via pipeline.cli: a stage's TensorFlow start prints no CUDA failures on a CPU machine, and keeps TensorFlow's real errors."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from pipeline import tf_startup as cli

CUDA_FAILURE = re.compile(r"cuInit|cuda drivers|CUDA error", re.IGNORECASE)
INFO_RECORD = b"I0000 00:00:1796184346.962341    3634 cudart_stub.cc:31] Could not find cuda drivers on your machine\n"
ERROR_RECORD = b"E1202 04:14:51.986000    3634 cuda_platform.cc:52] failed call to cuInit: CUDA error\n"


@pytest.fixture(scope="module")
def stage_start():
    """The finished run of a stage-like script: pipeline.cli first, then TensorFlow listing its devices and
    logging a warning."""
    code = ("from pipeline.cli import run_stage\n"
            "import tensorflow as tf\n"
            "def main():\n"
            "    print(tf.config.list_physical_devices())\n"
            "    tf.get_logger().warning('a warning of TensorFlow')\n"
            "run_stage(main)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", cli.ENABLED_DEVICE_TYPES)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


no_driver = pytest.mark.skipif(cli.nvidia_driver_present(), reason="this machine has an NVIDIA driver: TensorFlow "
                               "probes CUDA for real here and its messages are worth reading")


@no_driver
def test_stage_start_without_an_nvidia_driver_prints_no_cuda_failure(stage_start):
    assert stage_start.returncode == 0, stage_start.stderr
    assert "/physical_device:CPU:0" in stage_start.stdout
    assert not CUDA_FAILURE.search(stage_start.stderr), stage_start.stderr


@no_driver
def test_stage_start_without_an_nvidia_driver_says_so_once(stage_start):
    assert stage_start.stderr.count("no NVIDIA driver found: TensorFlow runs on the CPU") == 1, stage_start.stderr


def test_tensorflow_warnings_print_once_in_the_stage_format(stage_start):
    lines = [line for line in stage_start.stderr.splitlines() if "a warning of TensorFlow" in line]
    assert len(lines) == 1 and " WARNING tensorflow: " in lines[0], stage_start.stderr


def test_load_lines_below_the_log_level_are_dropped():
    assert not cli.shown_load_line(INFO_RECORD, level=2)
    assert not cli.shown_load_line(cli.ABSL_BANNER + b"\n", level=2)


def test_load_errors_and_lines_not_from_absl_are_shown():
    assert cli.shown_load_line(ERROR_RECORD, level=2)
    assert cli.shown_load_line(b"UserWarning: something Python said\n", level=2)
    assert cli.shown_load_line(INFO_RECORD, level=0)  # TF_CPP_MIN_LOG_LEVEL=0 asks for everything


def test_filtered_stderr_writes_back_only_the_shown_lines(capfd):
    with cli.filtered_stderr(lambda line: line.startswith(b"keep")) as dropped:
        os.write(2, b"keep 1\ndrop\nkeep 2\n")
    assert capfd.readouterr().err == "keep 1\nkeep 2\n"
    assert dropped == [b"drop\n"]


def test_filtered_stderr_writes_back_every_line_when_its_body_fails(capfd):
    with pytest.raises(RuntimeError), cli.filtered_stderr(lambda line: False):
        os.write(2, b"what went wrong\n")
        raise RuntimeError
    assert capfd.readouterr().err == "what went wrong\n"


def fake_tensorflow(tmp_path, cuda_build: bool):
    """Returns a folder laid out like the tensorflow package, down to its build_info."""
    platform = tmp_path / "site-packages" / "tensorflow" / "python" / "platform"
    platform.mkdir(parents=True)
    (platform / "build_info.py").write_text(f"build_info = {{'is_cuda_build': {cuda_build}}}\n")
    return platform.parents[1]


def test_cuda_probe_is_skipped_for_a_cuda_build_without_a_driver(tmp_path):
    assert cli.cuda_probe_can_only_fail(fake_tensorflow(tmp_path, cuda_build=True), driver_present=False)


def test_cuda_probe_is_kept_where_an_nvidia_driver_is_present(tmp_path):
    assert not cli.cuda_probe_can_only_fail(fake_tensorflow(tmp_path, cuda_build=True), driver_present=True)


def test_devices_are_kept_for_a_build_not_for_cuda(tmp_path):
    # A ROCm build: its GPUs need no NVIDIA driver.
    assert not cli.cuda_probe_can_only_fail(fake_tensorflow(tmp_path, cuda_build=False), driver_present=False)


def test_devices_are_kept_when_a_device_plugin_is_installed(tmp_path):
    tensorflow_dir = fake_tensorflow(tmp_path, cuda_build=True)
    (tensorflow_dir.parent / "tensorflow-plugins").mkdir()
    assert not cli.cuda_probe_can_only_fail(tensorflow_dir, driver_present=False)


AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma"}  # an AMD EPYC's units, as TensorFlow's kernels see them
AMX = AVX2_ONLY | {"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16"}


@pytest.fixture
def no_onednn_variable(monkeypatch):
    monkeypatch.delenv(cli.ONEDNN_VARIABLE, raising=False)


def test_auto_turns_onednn_on_for_an_avx2_cpu(no_onednn_variable):
    assert "auto" in cli.choose_onednn("auto", AVX2_ONLY) and os.environ[cli.ONEDNN_VARIABLE] == "1"


def test_auto_leaves_a_cpu_without_avx2_to_tensorflows_default(no_onednn_variable):
    cli.choose_onednn("auto", {"sse4_2", "neon"})
    assert cli.ONEDNN_VARIABLE not in os.environ


def test_disabled_turns_onednn_off_whatever_the_cpu(no_onednn_variable):
    cli.choose_onednn("disabled", AMX)
    assert os.environ[cli.ONEDNN_VARIABLE] == "0"


def test_the_environment_variable_wins_over_the_setting(monkeypatch):
    monkeypatch.setenv(cli.ONEDNN_VARIABLE, "0")
    assert "environment" in cli.choose_onednn("enabled", AVX2_ONLY) and os.environ[cli.ONEDNN_VARIABLE] == "0"


def test_the_isa_summary_names_the_units_the_kernels_can_use():
    assert cli.isa_summary(AVX2_ONLY) == "AVX2 FMA"
    assert cli.isa_summary(AMX) == "AVX2 FMA AVX-512 VNNI AMX bf16 AMX-bf16"


@pytest.mark.parametrize("setting, expected", [("enabled", "True"), ("disabled", "False")])
def test_a_stage_runs_tensorflow_with_onednn_as_params_say(tmp_path, setting, expected):
    params = (ROOT / "params.yaml").read_text().replace("onednn: auto", f"onednn: {setting}")
    assert f"onednn: {setting}" in params
    (tmp_path / "params.yaml").write_text(params)
    code = ("from pipeline.cli import run_stage\n"
            "from tensorflow.python.util import _pywrap_util_port\n"
            "run_stage(lambda: print('oneDNN', _pywrap_util_port.IsMklEnabled()))\n")
    env = {k: v for k, v in os.environ.items() if k != cli.ONEDNN_VARIABLE}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"oneDNN {expected}" in done.stdout
    assert f"TensorFlow's oneDNN: train.onednn: {setting}" in done.stderr
