"""Training under `train.distribution: data_parallel` on several CPU devices, for tests/test_distribution.py.

JAX fixes its device count when it starts, from XLA_FLAGS, so the tests run this as
`KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=2 python distribution_worker.py JOBS_JSON
RESULTS_DIR`, TensorFlow made unimportable as on a JAX-only machine. Jobs as in tests/backend_worker.py: each
writes RESULTS_DIR/<name>.npz, or RESULTS_DIR/<name>.error with its traceback, and the others still run.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.modules["tensorflow"] = None  # `import tensorflow` now fails, as where it is not installed

import jax  # noqa: E402
import keras  # noqa: E402

import backend_worker  # noqa: E402
from pipeline.devices import distributed  # noqa: E402
from pipeline.train import GAN  # noqa: E402


def one_step(job: dict, inputs: dict[str, np.ndarray], distribution: str) -> dict[str, np.ndarray]:
    """Returns backend_worker.one_step's results under `distribution`, and how the step saw its real batch split:
    `batch_shards`, the number of devices holding a part of it, and `shard_rows`, the rows each part holds.
    """
    weights = {k.split(":", 1)[1]: v for k, v in inputs.items() if k.startswith("weights:")}
    seen = []
    unpack = GAN.unpack

    def recording_unpack(self, data):
        real, labels = unpack(self, data)
        # Called while the step is traced: `real` is the batch as the jitted step receives it.
        jax.debug.inspect_array_sharding(real, callback=lambda sharding: seen.append(
            (len(sharding.device_set), sharding.shard_shape(real.shape)[0])))
        return real, labels

    GAN.unpack = recording_unpack
    try:
        with distributed(distribution, len(inputs["images"])):
            out = backend_worker.one_step(job["params"], weights, inputs["noise"], inputs.get("fake_labels"),
                                          inputs["images"], inputs["labels"], job.get("adam_epsilon"),
                                          job.get("smooth", False))
    finally:
        GAN.unpack = unpack
    out["batch_shards"], out["shard_rows"] = np.array(seen[-1])
    return out


def main(jobs_path: str, results: str) -> None:
    results_dir = Path(results)
    for name, job in json.loads(Path(jobs_path).read_text()).items():
        started = time.perf_counter()
        try:
            with np.load(job["inputs"], allow_pickle=False) as npz:
                inputs = dict(npz)
            if job["kind"] == "train":  # train_gan itself sets the distribution, from the params
                workdir = results_dir / name
                workdir.mkdir()
                out = backend_worker.train(job["params"], inputs["images"], inputs["labels"], workdir, resume=True)
            else:
                out = {f"{d}/{key}": value for d in ("none", "data_parallel")
                       for key, value in one_step(job, inputs, d).items()}
            out["devices"] = np.array(keras.distribution.list_devices())
            out["tensorflow_imported"] = np.bool_(sys.modules.get("tensorflow") is not None)
            np.savez(results_dir / f"{name}.npz", **out)
        except Exception:
            (results_dir / f"{name}.error").write_text(traceback.format_exc())
        print(f"{name}: {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
