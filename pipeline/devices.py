"""Where training runs, at what precision and with which kernels: a GPU first, bfloat16 where the CPU has it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import keras

from pipeline.tf_startup import cpu_flags, isa_summary

# CPU flags of native bfloat16 matrix units (Intel AMX, AVX512-BF16); without them bfloat16 is emulated and slower.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}


def gpu_count() -> int:
    """Returns how many GPUs the Keras backend sees."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return sum(1 for d in jax.devices() if d.platform == "gpu")
    return 0


def configure_devices() -> str:
    """Returns the device training will use: a GPU (with memory growth) when one is visible, else the CPU."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        # Grappler's remapper fails on the GAN step ("remapper failed: ... LeakyReluGrad ... missing
        # node"), printing an ERROR line and leaving the graph as it was: turned off, the step is the
        # same graph and the log has no false alarm. Inference was no slower without it (measured).
        tf.config.optimizer.set_experimental_options({"remapping": False})
    gpus = gpu_count()
    return f"{keras.backend.backend()} on GPU x{gpus}" if gpus else f"{keras.backend.backend()} on CPU"


def onednn_enabled() -> bool | None:
    """Returns whether TensorFlow runs its oneDNN CPU kernels (None on another backend)."""
    if keras.backend.backend() != "tensorflow":
        return None
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def speed_settings(setting_precision: str, jit_compile: bool) -> dict[str, str]:
    """Returns the settings a training step ran with, for the train log and the run's tags."""
    onednn = onednn_enabled()
    return {"speed.cpu_units": isa_summary(cpu_flags()),
            "speed.onednn": "n/a" if onednn is None else ("on" if onednn else "off"),
            "speed.dtype_policy": dtype_policy(setting_precision),
            "speed.xla": "on" if jit_compile or keras.backend.backend() == "jax" else "off"}


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Returns whether the CPU advertises native bfloat16 matrix instructions."""
    return bool(cpu_flags(cpuinfo) & set(BF16_CPU_FLAGS))


def dtype_policy(setting: str) -> str:
    """Returns the Keras dtype policy for `train.mixed_precision` on this machine.

    "auto" takes mixed bfloat16 on a GPU and on CPUs with bfloat16 units that oneDNN drives (1.7x the
    float32 step on this project's AMX Xeons, benchmarks/train_throughput.py), float32 elsewhere. bfloat16 keeps
    float32's exponent range, so, unlike float16, it needs no loss scaling.
    """
    if setting != "auto":
        return POLICIES[setting]
    # bfloat16 runs on the CPU's bfloat16 units only through oneDNN: without it TensorFlow emulates it, 40x
    # slower than float32 (13 against 510 images/s, benchmarks/train_throughput.py, ours/onednn-off).
    cpu_bf16 = cpu_has_bf16() and onednn_enabled() is not False
    return POLICIES["bfloat16"] if gpu_count() or cpu_bf16 else POLICIES["float32"]


@contextmanager
def precision(policy: str):
    """Builds the layers made inside it with `policy`, restoring the global policy afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)

