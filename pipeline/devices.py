"""Where training runs and at what precision: a visible GPU first, bfloat16 where the hardware has it."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import keras

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


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Returns whether the CPU advertises native bfloat16 matrix instructions."""
    try:
        flags = cpuinfo.read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def dtype_policy(setting: str) -> str:
    """Returns the Keras dtype policy for `train.mixed_precision` on this machine.

    "auto" takes mixed bfloat16 on a GPU and on CPUs with bfloat16 units (1.7x the float32 step
    on this project's AMX Xeons, benchmarks/train_throughput.py), float32 elsewhere. bfloat16 keeps
    float32's exponent range, so, unlike float16, it needs no loss scaling.
    """
    if setting != "auto":
        return POLICIES[setting]
    return POLICIES["bfloat16"] if gpu_count() or cpu_has_bf16() else POLICIES["float32"]


@contextmanager
def precision(policy: str):
    """Builds the layers made inside it with `policy`, restoring the global policy afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)

