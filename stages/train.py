"""Stage train: the DCGAN, its checkpoints, history, FID schedule and best generator, in a new MLflow run."""

from pipeline.cli import run_stage
from pipeline import paths
from pipeline.config import load_config
from pipeline.data import load_manifest, load_split
from pipeline.models import load_model
from pipeline.paths import TrainOutputs
from pipeline.devices import initialize_processes
from pipeline.train import train_and_log


def main() -> None:
    initialize_processes()  # one process per machine when KERAS_DISTRIBUTION_* ask; before JAX is first used
    config = load_config()
    images, labels = load_split(paths.TRAIN_SPLIT)
    classifier = load_model(paths.CLASSIFIER)
    train_and_log(config, images, labels, classifier, load_manifest(paths.raw_dir(config.data.name)), TrainOutputs())


if __name__ == "__main__":
    run_stage(main)
