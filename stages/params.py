"""Stage params: all of params.yaml validated before any other stage runs, so that a bad value deletes nothing.

DVC deletes a stage's outputs before it starts the stage's command, so a stage's own check of its params
comes after its outputs are gone. Every other stage depends on this stage's output, so DVC runs this one first
and stops here. The output's bytes never change: a new valid value reruns only the stages that read it.
It imports neither TensorFlow nor MLflow, so the check takes a second.
"""

from pipeline.cli import run_stage
from pipeline import paths
from pipeline.config import load_config
from pipeline.files import write_text

CHECKED = "params.yaml passed pipeline/config.py's checks (this line never changes: see stages/params.py)\n"


def main() -> None:
    load_config(paths.PARAMS)
    write_text(paths.PARAMS_CHECKED, CHECKED)


if __name__ == "__main__":
    run_stage(main)
