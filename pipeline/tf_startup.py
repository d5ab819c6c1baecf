"""How TensorFlow starts in a stage: its oneDNN kernels chosen for the CPU, and quiet on machines without an
NVIDIA driver, its real errors kept.

`choose_onednn()` sets TF_ENABLE_ONEDNN_OPTS from `train.onednn` before TensorFlow loads (see its docstring).

TensorFlow's Linux pip build is a CUDA build. On a machine without an NVIDIA driver its start prints lines that
read like failures and are not: "Could not find cuda drivers" while it loads (absl writes it, and every
other INFO line of that moment, before TF_CPP_MIN_LOG_LEVEL is applied) and "failed call to cuInit:
INTERNAL: CUDA error" at ERROR level when it first lists devices. `quiet_tensorflow_start()` arranges, for
the first `import tensorflow` of the process: no CUDA probe where no NVIDIA driver could answer it
(TF_ENABLED_DEVICE_TYPES=CPU, which TensorFlow reads once when it loads), the load-time lines below
TF_CPP_MIN_LOG_LEVEL dropped as TensorFlow drops later ones, and one line of ours saying which case this is.
Machines with a driver, and everything at or above the level, are left alone.
"""

from __future__ import annotations

import ctypes
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import re
import site
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

# The NVIDIA kernel module's version file, and the driver's user-space library, which TensorFlow's CUDA
# platform loads; under WSL2 the library is the driver's only sign.
NVIDIA_DRIVER_VERSION = Path("/proc/driver/nvidia/version")
LIBCUDA = "libcuda.so.1"
# TensorFlow registers only the device types listed here (read once, when it loads).
ENABLED_DEVICE_TYPES = "TF_ENABLED_DEVICE_TYPES"
# 1: TensorFlow's oneDNN CPU kernels on, 0: off, unset: TensorFlow decides by the CPU (read once, when it loads).
ONEDNN_VARIABLE = "TF_ENABLE_ONEDNN_OPTS"
# An absl log record: severity letter, mmdd hh:mm:ss.micros (before absl's set-up 0000 00:00:<epoch seconds>),
# thread id, file:line] message.
ABSL_RECORD = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")
ABSL_SEVERITIES = b"IWEF"  # TF_CPP_MIN_LOG_LEVEL 0..3
# absl's note heading the records written before its set-up; says nothing about this program.
ABSL_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# What TensorFlow logs (at INFO) when it cannot load libcudart, the CUDA runtime, whatever the driver.
NO_CUDA_RUNTIME = b"Could not find cuda drivers"

# Messages about TensorFlow's start, held until logging is set up (pipeline.cli.run_stage).
_pending: list[tuple[int, str]] = []


def nvidia_driver_present() -> bool:
    """Returns whether this machine has an NVIDIA driver: its kernel module's version file or its libcuda."""
    if NVIDIA_DRIVER_VERSION.exists():
        return True
    try:
        ctypes.CDLL(LIBCUDA)
    except OSError:
        return False
    return True


def tensorflow_is_cuda_build(tensorflow_dir: Path) -> bool:
    """Returns whether the TensorFlow package in `tensorflow_dir` was built for CUDA, without importing it."""
    path = tensorflow_dir / "python" / "platform" / "build_info.py"
    spec = importlib.util.spec_from_file_location("_tensorflow_build_info", path) if path.exists() else None
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return bool(getattr(module, "build_info", {}).get("is_cuda_build"))


def tensorflow_device_plugins(tensorflow_dir: Path) -> bool:
    """Returns whether TensorFlow will load device plugins: a tensorflow-plugins folder where it looks, or
    TF_PLUGGABLE_DEVICE_LIBRARY_PATH."""
    folders = {tensorflow_dir.parent, *map(Path, site.getsitepackages()),
               *(Path(p) for p in sys.path if "site-packages" in p),
               *(Path(sysconfig.get_paths()[name]) for name in ("purelib", "platlib"))}
    if site.ENABLE_USER_SITE:
        folders.add(Path(site.getusersitepackages()))
    return bool(os.environ.get("TF_PLUGGABLE_DEVICE_LIBRARY_PATH")) or any(
        (folder / "tensorflow-plugins").exists() for folder in folders)


def cuda_probe_can_only_fail(tensorflow_dir: Path, driver_present: bool) -> bool:
    """Returns whether TensorFlow's CUDA probe can find nothing: a CUDA build, no NVIDIA driver, no plugins.

    Then listing only the CPU skips the probe and its error lines and hides no device: a ROCm build or a
    device plugin (whose devices this setting would hide too) keeps every device type.
    """
    return (not driver_present and tensorflow_is_cuda_build(tensorflow_dir)
            and not tensorflow_device_plugins(tensorflow_dir))


def min_log_level() -> int:
    """Returns TF_CPP_MIN_LOG_LEVEL as TensorFlow reads it: 0 shows INFO and up, 1 WARNING, 2 ERROR, 3 FATAL."""
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def shown_load_line(line: bytes, level: int) -> bool:
    """Returns whether a stderr line of TensorFlow's load is one to show at TF_CPP_MIN_LOG_LEVEL `level`.

    absl records below the level and absl's banner go, as TensorFlow drops such records once loaded;
    every other line (a real error, a Python warning, anything not absl's) stays.
    """
    if line.rstrip(b"\r\n") == ABSL_BANNER:
        return False
    record = ABSL_RECORD.match(line)
    return record is None or ABSL_SEVERITIES.index(record.group(1)) >= level


@contextmanager
def filtered_stderr(show: Callable[[bytes], bool]) -> Iterator[list[bytes]]:
    """Yields a list that gets the dropped lines, capturing file descriptor 2 (where C++ code writes) while
    the body runs; then writes back the lines `show` accepts, or every line if the body raised."""
    dropped: list[bytes] = []
    sys.stderr.flush()
    saved = os.dup(2)
    raised = True
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield dropped
            raised = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = []
            for line in capture:
                (kept if raised or show(line) else dropped).append(line)
            with open(2, "wb", closefd=False) as stderr:
                stderr.writelines(kept)


def _note(level: int, message: str) -> None:
    """Logs a message about TensorFlow's start now if logging is set up, else once run_stage sets it up."""
    if logging.getLogger().handlers:
        log.log(level, message)
    else:
        _pending.append((level, message))


class _QuietLoader:
    """Loads the tensorflow package through its own loader, with the set-up and filtering described above."""

    def __init__(self, loader: importlib.abc.Loader, tensorflow_dir: Path):
        self.loader, self.tensorflow_dir = loader, tensorflow_dir

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        """Returns what the package's own loader creates (None: the default module)."""
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        """Runs the package's code, after turning off a CUDA probe that can only fail and with its load-time
        lines filtered; the package keeps its own loader afterwards."""
        driver = nvidia_driver_present()
        if ENABLED_DEVICE_TYPES not in os.environ and cuda_probe_can_only_fail(self.tensorflow_dir, driver):
            # In os.environ, so child processes, on the same machine, skip the probe too.
            os.environ[ENABLED_DEVICE_TYPES] = "CPU"
            _note(logging.INFO, f"no NVIDIA driver found: TensorFlow runs on the CPU and skips its CUDA probe "
                                f"({ENABLED_DEVICE_TYPES}=CPU)")
        level = min_log_level()
        try:
            with filtered_stderr(lambda line: shown_load_line(line, level)) as dropped:
                self.loader.exec_module(module)
        finally:
            module.__loader__ = module.__spec__.loader = self.loader
        if driver and any(NO_CUDA_RUNTIME in line for line in dropped):
            # With a driver the line is true: this TensorFlow lacks the CUDA libraries, so the GPU sits idle.
            _note(logging.WARNING, "an NVIDIA driver is present but TensorFlow found no CUDA runtime: it runs on "
                                   "the CPU; pip install 'tensorflow[and-cuda]' to use the GPU")


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds the tensorflow package the first time it is imported and hands it to a _QuietLoader."""

    def __init__(self):
        self.used = False

    def find_spec(self, name: str, path=None, target=None) -> importlib.machinery.ModuleSpec | None:
        """Returns tensorflow's spec with a _QuietLoader the first time it is looked for, None otherwise."""
        if name != "tensorflow" or self.used:
            return None
        self.used = True  # also keeps the search below from coming back here
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or spec.origin is None:
            return spec
        spec.loader = _QuietLoader(spec.loader, Path(spec.origin).parent)
        return spec


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """Returns the first CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def isa_summary(flags: set[str]) -> str:
    """Returns the vector and matrix units TensorFlow's CPU kernels can use, e.g. "AVX2 FMA AVX-512 AMX bf16"."""
    names = (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"),
             ("amx_tile", "AMX"), ("avx512_bf16", "bf16"), ("amx_bf16", "AMX-bf16"))
    found = [name for flag, name in names if flag in flags]
    return " ".join(found) or "no AVX2"


def start_notes(setting: str) -> None:
    """Chooses oneDNN for `setting` on this CPU and notes the choice for the stage's log."""
    flags = cpu_flags()
    why = choose_onednn(setting, flags)
    _pending.append((logging.INFO, f"CPU units: {isa_summary(flags)}; TensorFlow's oneDNN: {why}"))


def choose_onednn(setting: str, flags: set[str]) -> str:
    """Sets TF_ENABLE_ONEDNN_OPTS for `train.onednn` unless the environment already does; returns why.

    TensorFlow reads it once, when it loads, and on its own turns oneDNN on only for CPUs with AVX-512 VNNI,
    bf16 or AMX units: on AVX2-only CPUs (AMD EPYC and Ryzen, older Xeons) it stays off, though both the
    tutorial's step and ours run faster with it there (benchmarks/RESULTS.md). "auto" turns it on for every
    x86 CPU with AVX2 and leaves other CPUs to TensorFlow's default.
    """
    if ONEDNN_VARIABLE in os.environ:
        return f"{ONEDNN_VARIABLE}={os.environ[ONEDNN_VARIABLE]} from the environment"
    if setting == "auto":
        if "avx2" not in flags:
            return "TensorFlow's default (auto: no AVX2)"
        setting = "enabled"
        why = "train.onednn: auto, an AVX2 CPU: enabled"
    else:
        why = f"train.onednn: {setting}"
    os.environ[ONEDNN_VARIABLE] = "1" if setting == "enabled" else "0"
    return why


def quiet_tensorflow_start() -> None:
    """Arranges the first `import tensorflow` of this process as the module docstring says (once; no-op after it)."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


def log_pending_notes() -> None:
    """Logs the notes about TensorFlow's start that came before logging was set up."""
    while _pending:
        log.log(*_pending.pop(0))
