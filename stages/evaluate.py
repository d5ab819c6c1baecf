"""Stage evaluate: metrics/eval.json from a classifier trained on the real training split."""

import mlflow

from pipeline.cli import run_stage
from pipeline import paths, tracking
from pipeline.config import load_config
from pipeline.data import load_split
from pipeline.evaluate import evaluate_generator, train_classifier
from pipeline.files import atomic_path, write_json
from pipeline.sample import load_generator


def main() -> None:
    config = load_config()
    train, holdout = load_split(paths.TRAIN_SPLIT), load_split(paths.HOLDOUT_SPLIT)
    generator = load_generator(paths.GENERATOR)
    classifier, accuracy = train_classifier(config, train, holdout)
    with atomic_path(paths.CLASSIFIER) as tmp:
        classifier.save(tmp)
    results = {"classifier_holdout_accuracy": accuracy,
               **evaluate_generator(config, generator, classifier, train[0])}
    write_json(paths.EVAL_METRICS, results)
    with tracking.resume_run(paths.MLFLOW_RUN):
        tracking.log_metrics(results)
        mlflow.set_tags(tracking.dvc_stage_tags())
        mlflow.log_artifact(str(paths.EVAL_METRICS), artifact_path="metrics")


if __name__ == "__main__":
    run_stage(main)
