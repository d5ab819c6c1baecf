"""One thin entry script per DVC stage: `python -m stages.<name>` (dvc.yaml).

DVC starts each stage's `python` through the shell, so the first `python` on PATH runs it: without the
project's environment activated, that is a system Python without the project's packages. This package runs
before any stage, so it checks for them and, if any is missing, says in one line how to get the environment.
It uses only the standard library, in syntax old Pythons read, since it must run under whatever `python` is.
"""

import importlib.util
import sys

# The import names of pyproject.toml's dependencies that every Keras backend needs.
REQUIRED = ("numpy", "pandas", "scipy", "yaml", "PIL", "mlxtend", "keras", "mlflow")


def missing_packages():
    """Returns the REQUIRED packages this interpreter cannot import (found, not imported: it stays fast)."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


_missing = missing_packages()
if _missing:
    sys.exit("error: {} lacks the project's packages ({}): run DVC and the stages from the project's "
             "environment: `source .venv/bin/activate` first (`make install` creates it), or use "
             "`make repro`".format(sys.executable or "this Python", ", ".join(_missing)))
