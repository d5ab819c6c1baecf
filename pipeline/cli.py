"""What every stage entry point shares: logging set-up, a quiet TensorFlow start and clean exits on bad input.

A failure the user can cause and fix (bad params, a bad or missing input file, a full disk, a lost MLflow run)
ends the stage with one error line that names the file or setting and the command that fixes it, and exit
status 1; PIPELINE_DEBUG=1 adds the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from pipeline import tf_startup
from pipeline.config import load_config
from pipeline.errors import PipelineError


def _onednn_setting() -> str:
    """Returns params.yaml's train.onednn; "auto" when the params do not load (the stage then says why)."""
    try:
        return load_config().train.onednn
    except (PipelineError, OSError):
        return "auto"


# Before any TensorFlow import: oneDNN for this CPU, and its C++ start-up chatter out of the stage logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf_startup.start_notes(_onednn_setting())
tf_startup.quiet_tensorflow_start()

log = logging.getLogger("pipeline")

# Set to 1 for the traceback behind a stage's one-line error.
DEBUG_VARIABLE = "PIPELINE_DEBUG"


def run_stage(main: Callable[[], None]) -> None:
    """Runs a stage's main(), turning a PipelineError or a missing input into one error line and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # TensorFlow gives its logger a stderr handler of its own when it loads before logging is set up, as it
    # does in the stages; beside the root's handler every TensorFlow warning would print twice.
    tensorflow_log = logging.getLogger("tensorflow")
    for handler in tensorflow_log.handlers[:]:
        tensorflow_log.removeHandler(handler)
    tf_startup.log_pending_notes()
    debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    try:
        main()
    except PipelineError as e:
        log.error("%s", e, exc_info=debug)
        sys.exit(1)
    except FileNotFoundError as e:
        # What a stage opens without checking first is an earlier stage's output, gone since that stage ran
        # (deleted, or `dvc repro -s` skipped the stage that writes it): DVC rebuilds it.
        if debug or e.filename is None:
            raise
        log.error("%s is missing: an earlier stage's output; rebuild it with `dvc repro %s`",
                  e.filename, stage_name(main))
        sys.exit(1)


def stage_name(main: Callable[[], None]) -> str:
    """Returns the DVC stage that runs `main`: DVC's DVC_STAGE, else the X of the `python -m stages.X` running."""
    if os.environ.get("DVC_STAGE"):
        return os.environ["DVC_STAGE"]
    module = main.__module__
    if module == "__main__":  # python -m stages.X runs stages/X.py as __main__; its spec keeps the name
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    return module.removeprefix("stages.")
