"""What every stage entry point shares: logging set-up, a quiet TensorFlow start and clean exits on bad input."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from pipeline import tf_startup
from pipeline.errors import PipelineError

# Before any TensorFlow import: keep its C++ start-up chatter out of the stage logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf_startup.quiet_tensorflow_start()

log = logging.getLogger("pipeline")


def run_stage(main: Callable[[], None]) -> None:
    """Runs a stage's main(), turning a PipelineError into one clear error line and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # TensorFlow gives its logger a stderr handler of its own when it loads before logging is set up, as it
    # does in the stages; beside the root's handler every TensorFlow warning would print twice.
    tensorflow_log = logging.getLogger("tensorflow")
    for handler in tensorflow_log.handlers[:]:
        tensorflow_log.removeHandler(handler)
    tf_startup.log_pending_notes()
    try:
        main()
    except PipelineError as e:
        log.error("%s", e)
        sys.exit(1)
