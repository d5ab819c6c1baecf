"""Every file the pipeline reads or writes, relative to the project root; dvc.yaml declares the same."""

from pathlib import Path

RAW_ROOT = Path("data/raw")  # + <dataset>/
PROCESSED = Path("data/processed")
TRAIN_SPLIT = PROCESSED / "train.npz"
HOLDOUT_SPLIT = PROCESSED / "holdout.npz"
DATA_STATS = PROCESSED / "stats.csv"

MODELS = Path("models")
GENERATOR = MODELS / "generator.keras"
DISCRIMINATOR = MODELS / "discriminator.keras"
CHECKPOINT = MODELS / "checkpoints" / "checkpoint.npz"
CLASSIFIER = MODELS / "classifier.keras"
MLFLOW_RUN = MODELS / "mlflow_run.json"

TRAIN_REPORTS = Path("reports/train")
HISTORY = TRAIN_REPORTS / "history.csv"
PROGRESS_GRIDS = TRAIN_REPORTS / "grids"

SAMPLES = Path("samples")
SAMPLES_NPZ = SAMPLES / "samples.npz"
SAMPLES_GRID = SAMPLES / "grid.png"
SAMPLES_INTERPOLATION = SAMPLES / "interpolation.png"

TRAIN_METRICS = Path("metrics/train.json")
EVAL_METRICS = Path("metrics/eval.json")


def raw_dir(dataset: str) -> Path:
    """Returns the folder the download stage fills for `dataset`."""
    return RAW_ROOT / dataset
