"""Stage normalize: images in [-1, 1] NHWC, a fixed train/holdout split and a stats table."""

from pipeline.cli import run_stage
from pipeline import paths
from pipeline.config import load_config
from pipeline.data import image_stats, load_dataset, load_manifest, normalize_dataset, save_split
from pipeline.files import atomic_path


def main() -> None:
    config = load_config()
    raw_dir = paths.raw_dir(config.data.name)
    images, labels = load_dataset(raw_dir, load_manifest(raw_dir))
    splits = normalize_dataset(images, labels, config.data, config.seed, source=str(raw_dir))
    save_split(paths.TRAIN_SPLIT, *splits["train"])
    save_split(paths.HOLDOUT_SPLIT, *splits["holdout"])
    with atomic_path(paths.DATA_STATS) as tmp:
        image_stats(splits).to_csv(tmp, index=False)


if __name__ == "__main__":
    run_stage(main)
