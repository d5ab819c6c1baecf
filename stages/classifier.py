"""Stage classifier: the evaluator's digit classifier, trained once per dataset on the real training split."""

from pipeline.cli import run_stage
from pipeline import paths
from pipeline.config import load_config
from pipeline.data import load_split
from pipeline.evaluate import train_classifier
from pipeline.files import atomic_path, write_json


def main() -> None:
    config = load_config()
    train, holdout = load_split(paths.TRAIN_SPLIT), load_split(paths.HOLDOUT_SPLIT)
    classifier, accuracy = train_classifier(config, train, holdout)
    with atomic_path(paths.CLASSIFIER) as tmp:
        classifier.save(tmp)
    write_json(paths.CLASSIFIER_METRICS, {"holdout_accuracy": accuracy, "train_images": len(train[0]),
                                          "holdout_images": len(holdout[0])})


if __name__ == "__main__":
    run_stage(main)
