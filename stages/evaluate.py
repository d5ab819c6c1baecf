"""Stage evaluate: metrics/eval.json and the one-page report, for the generator params.yaml chooses."""

import json

import pandas as pd

from pipeline.cli import run_stage
from pipeline import paths, tracking
from pipeline.config import load_config
from pipeline.data import load_split
from pipeline.evaluate import evaluate_report
from pipeline.files import write_json
from pipeline.models import load_model


def main() -> None:
    config = load_config()
    train, holdout = load_split(paths.TRAIN_SPLIT), load_split(paths.HOLDOUT_SPLIT)
    generators = {choice: load_model(paths.generator_path(choice)) for choice in ("best", "last")}
    classifier = load_model(paths.CLASSIFIER)
    fid_history = pd.read_csv(paths.FID_HISTORY)
    classifier_accuracy = json.loads(paths.CLASSIFIER_METRICS.read_text())["holdout_accuracy"]
    # The run first: a lost one fails the stage before minutes of evaluation, not after.
    with tracking.resume_run() as run:
        results = evaluate_report(config, generators, classifier, train, holdout, fid_history=fid_history,
                                  report_path=paths.REPORT)
        results["classifier_holdout_accuracy"] = classifier_accuracy
        write_json(paths.EVAL_METRICS, results)
        tracking.log_evaluation(run, results, paths.EVAL_METRICS, paths.REPORT)


if __name__ == "__main__":
    run_stage(main)
