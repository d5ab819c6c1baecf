"""One thin entry script per DVC stage: `python -m stages.<name>` (dvc.yaml)."""
