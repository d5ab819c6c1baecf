"""Stage register: the chosen generator as a new registry version, champion only if it beats the champion."""

import json

from pipeline.cli import run_stage
from pipeline import paths, registry, tracking
from pipeline.config import load_config
from pipeline.data import load_manifest, load_split
from pipeline.evaluate import feature_extractor
from pipeline.files import write_json
from pipeline.models import load_model
from pipeline.promotion import score_generator


def main() -> None:
    config = load_config()
    train, holdout = load_split(paths.TRAIN_SPLIT), load_split(paths.HOLDOUT_SPLIT)
    extractor = feature_extractor(load_model(paths.CLASSIFIER))
    candidate = json.loads(paths.EVAL_METRICS.read_text())
    generator = paths.generator_path(config.generator)
    tags = registry.version_tags(config, candidate, load_manifest(paths.raw_dir(config.data.name)), generator,
                                 paths.CLASSIFIER)
    with tracking.resume_run() as run:
        result = registry.register_and_gate(
            config, run.info.run_id, generator, candidate, tags,
            score=lambda champion: score_generator(config, champion, extractor, train, holdout))
        write_json(paths.PROMOTION_METRICS, result)
        registry.log_promotion(run, result, paths.PROMOTION_METRICS)


if __name__ == "__main__":
    run_stage(main)
