"""Stage train: the DCGAN, its checkpoints, history and sample grids, in a new MLflow run."""

from pipeline.cli import run_stage
from pipeline import paths
from pipeline.config import load_config
from pipeline.data import load_manifest, load_split
from pipeline.train import train_and_log


def main() -> None:
    config = load_config()
    images, _ = load_split(paths.TRAIN_SPLIT)
    train_and_log(config, images, load_manifest(paths.raw_dir(config.data.name)))


if __name__ == "__main__":
    run_stage(main)
