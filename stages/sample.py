"""Stage sample: generated images (npz), a grid and a latent interpolation, logged to the run."""

from pipeline.cli import run_stage
from pipeline import paths, tracking
from pipeline.config import load_config
from pipeline.models import load_model
from pipeline.sample import write_samples


def main() -> None:
    config = load_config()
    generator = load_model(paths.generator_path(config.generator))
    # The run before any output: a lost one fails the stage with nothing written.
    with tracking.resume_run() as run:
        write_samples(generator, config, paths.SAMPLES_NPZ, paths.SAMPLES_GRID, paths.SAMPLES_INTERPOLATION)
        tracking.log_samples(run, paths.SAMPLES_GRID, paths.SAMPLES_INTERPOLATION)


if __name__ == "__main__":
    run_stage(main)
