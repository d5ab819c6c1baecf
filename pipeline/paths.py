"""Every file the pipeline reads or writes, relative to the project root; dvc.yaml declares the same."""

from dataclasses import dataclass
from pathlib import Path

PARAMS = Path("params.yaml")
# The params stage's output: it exists once params.yaml has passed validation (stages/params.py says why).
PARAMS_CHECKED = Path("data/params.ok")

# The download stage's output is the whole folder, a fixed path: an output path built from a param would let a
# bad value (data.name: ../../mlflow.db) point DVC's deletion of a stage's outputs at any file.
RAW_ROOT = Path("data/raw")  # + <dataset>/
PROCESSED = Path("data/processed")
TRAIN_SPLIT = PROCESSED / "train.npz"
HOLDOUT_SPLIT = PROCESSED / "holdout.npz"
DATA_STATS = PROCESSED / "stats.csv"

MODELS = Path("models")
GENERATOR = MODELS / "generator.keras"
GENERATOR_BEST = MODELS / "generator_best.keras"
DISCRIMINATOR = MODELS / "discriminator.keras"
CHECKPOINT = MODELS / "checkpoints" / "checkpoint.npz"
CLASSIFIER = MODELS / "classifier.keras"

TRAIN_REPORTS = Path("reports/train")
HISTORY = TRAIN_REPORTS / "history.csv"
FID_HISTORY = TRAIN_REPORTS / "fid.csv"
PROGRESS_GRIDS = TRAIN_REPORTS / "grids"

SAMPLES = Path("samples")
SAMPLES_NPZ = SAMPLES / "samples.npz"
SAMPLES_GRID = SAMPLES / "grid.png"
SAMPLES_INTERPOLATION = SAMPLES / "interpolation.png"

REPORT = Path("reports/eval/report.png")

CLASSIFIER_METRICS = Path("metrics/classifier.json")
TRAIN_METRICS = Path("metrics/train.json")
EVAL_METRICS = Path("metrics/eval.json")
PROMOTION_METRICS = Path("metrics/promotion.json")


def raw_dir(dataset: str) -> Path:
    """Returns the folder the download stage fills for `dataset`."""
    return RAW_ROOT / dataset


def generator_path(choice: str) -> Path:
    """Returns the saved generator that `generator: best|last` in params.yaml names."""
    return GENERATOR_BEST if choice == "best" else GENERATOR


@dataclass(frozen=True)
class TrainOutputs:
    """Where training writes: the train stage's outputs, under `root` (the project root by default)."""

    root: Path = Path()

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT

    @property
    def history(self) -> Path:
        return self.root / HISTORY

    @property
    def fid_history(self) -> Path:
        return self.root / FID_HISTORY

    @property
    def grids(self) -> Path:
        return self.root / PROGRESS_GRIDS

    @property
    def generator(self) -> Path:
        return self.root / GENERATOR

    @property
    def generator_best(self) -> Path:
        return self.root / GENERATOR_BEST

    @property
    def discriminator(self) -> Path:
        return self.root / DISCRIMINATOR

    @property
    def metrics(self) -> Path:
        return self.root / TRAIN_METRICS
