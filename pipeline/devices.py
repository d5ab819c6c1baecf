"""Where training runs, at what precision and with which kernels: a GPU first, bfloat16 where the CPU has it;
on how many devices (`train.distribution`) and processes (one per machine, KERAS_DISTRIBUTION_* variables)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import numpy as np

from pipeline.config import ConfigError
from pipeline.tf_startup import cpu_flags, isa_summary

# CPU flags of native bfloat16 matrix units (Intel AMX, AVX512-BF16); without them bfloat16 is emulated and slower.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
# What keras.distribution.initialize reads: the coordinator's host:port (process 0's machine), how many processes
# train together (one per machine) and which one this is.
ADDRESSES_VARIABLE = "KERAS_DISTRIBUTION_JOB_ADDRESSES"
PROCESSES_VARIABLE = "KERAS_DISTRIBUTION_NUM_PROCESSES"
PROCESS_ID_VARIABLE = "KERAS_DISTRIBUTION_PROCESS_ID"


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


def winograd_enabled(setting: str) -> bool:
    """Returns whether `train.winograd` turns Winograd convolutions on (pipeline/fused.py): "auto" does on a CPU
    with oneDNN, where they were measured faster (benchmarks/stride1_transpose.py), not on a GPU or without it."""
    return setting == "enabled" or (setting == "auto" and not gpu_count() and bool(onednn_enabled()))


def speed_settings(setting_precision: str, jit_compile: bool) -> dict[str, str]:
    """Returns the settings a training step runs with, for the train log and the run's tags (the models' Winograd
    layers are counted once built: pipeline/train.py winograd_settings)."""
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
def _keras_global(get: Callable[[], Any], set_: Callable[[Any], None], value: Any) -> Iterator[None]:
    """Runs what is inside with one of Keras' process-wide settings at `value`, the previous one restored after."""
    previous = get()
    set_(value)
    try:
        yield
    finally:
        set_(previous)


def precision(policy: str):
    """Builds the layers made inside it with `policy`, restoring the global policy afterwards."""
    return _keras_global(keras.config.dtype_policy, keras.config.set_dtype_policy, policy)


def requested_processes() -> int:
    """Returns how many processes the environment says train together (KERAS_DISTRIBUTION_NUM_PROCESSES, else 1)."""
    value = os.environ.get(PROCESSES_VARIABLE, "").strip() or "1"
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{PROCESSES_VARIABLE}={value!r} is not a number of processes; allowed values: 1, 2, ...")
    return int(value)


def initialize_processes() -> int:
    """Returns the number of processes training runs in, after joining them when the environment asks for several.

    With KERAS_DISTRIBUTION_NUM_PROCESSES > 1, keras.distribution.initialize connects this process to the others
    through the coordinator at KERAS_DISTRIBUTION_JOB_ADDRESSES, as process KERAS_DISTRIBUTION_PROCESS_ID; then
    keras.distribution.list_devices() is every process's devices. It must run before anything touches the JAX
    backend (loading a model does). One process (no variables set) changes nothing.
    """
    count = requested_processes()
    if count == 1:
        return 1
    if keras.backend.backend() != "jax":
        raise ConfigError(f"{PROCESSES_VARIABLE}={count} needs the JAX backend (keras.distribution), and Keras runs "
                          f"on {keras.backend.backend()}: set KERAS_BACKEND=jax")
    missing = [name for name in (ADDRESSES_VARIABLE, PROCESS_ID_VARIABLE) if not os.environ.get(name, "").strip()]
    if missing:
        raise ConfigError(f"{PROCESSES_VARIABLE}={count} also needs {' and '.join(missing)}: the coordinator's "
                          f"host:port and this process's id, 0 to {count - 1}")
    process_id = os.environ[PROCESS_ID_VARIABLE].strip()
    if not process_id.isdigit() or int(process_id) >= count:
        raise ConfigError(f"{PROCESS_ID_VARIABLE}={process_id!r} is not a process id; allowed values: 0 to {count - 1}")
    import jax

    if not jax.distributed.is_initialized():
        # Cross-process all-reduces on CPUs go through Gloo over TCP (already JAX's default on CPU; on GPUs NCCL is
        # used and this setting is ignored).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        keras.distribution.initialize()  # reads the three variables itself
    return jax.process_count()


def process_count() -> int:
    """Returns how many processes train together: 1 unless initialize_processes joined several."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return jax.process_count() if jax.distributed.is_initialized() else 1


def process_index() -> int:
    """Returns this process's id among those training together (0 alone)."""
    if process_count() == 1:
        return 0
    import jax

    return jax.process_index()


def is_writer() -> bool:
    """Returns whether this process writes training's files and tracks it in MLflow: process 0 alone."""
    return process_index() == 0


def from_writer(value: Any) -> Any:
    """Returns process 0's `value` (a pytree of arrays of the same shapes everywhere) in every process.

    All processes must call it at the same point: it is an all-reduce. In one process, `value` itself as numpy.
    """
    if process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(value)


def check_same_inputs(fingerprint: str) -> None:
    """Raises ConfigError if another process's training fingerprint (params, data, evaluator) differs from this one's.

    Every process takes its rows of each global batch by index from its own copy of the data: copies that differ
    would train silently on something else than process 0 believes.
    """
    if process_count() == 1:
        return
    mine = np.frombuffer(bytes.fromhex(fingerprint), np.uint8)
    writers = bytes(from_writer(mine)).hex()
    if writers != fingerprint:
        raise ConfigError(f"process {process_index()} has other params.yaml, data/processed or classifier than "
                          f"process 0 (training fingerprint {fingerprint[:12]}..., process 0's {writers[:12]}...): "
                          f"every machine needs the same checkout and inputs: `git pull` and `dvc pull` on each")


def check_distribution(setting: str, batch_size: int) -> None:
    """Raises ConfigError, naming the key, if `train.distribution` cannot run here with this global batch."""
    if setting == "none":
        if process_count() > 1:
            raise ConfigError(f"train.distribution: none trains in one process, and {PROCESSES_VARIABLE} asks for "
                              f"{process_count()}: set train.distribution: data_parallel, or run one process")
        return
    if keras.backend.backend() != "jax":
        # Keras 3's fit() under tf.distribute is broken for multi-worker training (tensorflow#72388, keras#20585);
        # keras.distribution, the engine used here, runs on JAX only.
        raise ConfigError(f"train.distribution: {setting} runs on the JAX backend only, and Keras runs on "
                          f"{keras.backend.backend()}: set KERAS_BACKEND=jax (Keras 3 with tf.distribute is "
                          f"broken for multi-worker, tensorflow#72388), or set train.distribution: none")
    count = len(keras.distribution.list_devices())
    if batch_size % count:
        raise ConfigError(f"train.batch_size: {batch_size} does not split evenly across the {count} devices of "
                          f"train.distribution: {setting}; use a multiple of {count}")


def distribution_settings(setting: str) -> dict[str, str]:
    """Returns what training is spread over, for the train log and the run's tags: the devices and the mesh."""
    if setting == "none":
        return {"distribution": "none"}
    devices = keras.distribution.list_devices()
    return {"distribution": setting, "distribution.devices": ",".join(devices),
            "distribution.device_count": str(len(devices)), "distribution.mesh": f"batch={len(devices)}",
            "distribution.processes": str(process_count())}


@contextmanager
def distributed(setting: str, batch_size: int) -> Iterator[int]:
    """Yields the number of devices training runs on, with Keras' global distribution set for `train.distribution`.

    Under `data_parallel`, Keras' DataParallel over every device keras.distribution.list_devices() sees (the GPUs,
    else the CPU devices, e.g. XLA_FLAGS=--xla_force_host_platform_device_count=N): variables made inside are
    replicated on each, fit() splits each batch of `batch_size` (the global batch) across them, and the jitted
    step reduces over the whole batch (gradients, BatchNorm statistics, metrics). The learning rate is left
    as it is. Models must be built inside; the previous distribution comes back afterwards. With several processes
    (initialize_processes) the devices are all processes' and each process feeds its own slice of every batch.
    """
    check_distribution(setting, batch_size)
    devices = keras.distribution.list_devices() if setting != "none" else []
    # Not auto-sharded: Keras shards only tf.data datasets across processes; train.process_batches gives each
    # process its slice of every global batch itself.
    chosen = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False) if devices else None
    with _keras_global(keras.distribution.distribution, keras.distribution.set_distribution, chosen):
        yield max(len(devices), 1)


def undistributed():
    """Runs what is inside with no global distribution: there predict() takes a batch of any size.

    Under DataParallel predict() splits its batches across the devices, and refuses one that does not
    divide by their number; without it, replicated weights compute on whole batches as on one device.
    """
    return _keras_global(keras.distribution.distribution, keras.distribution.set_distribution, None)
