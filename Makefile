# The README's two commands: `make run` (the main job) and `make test`. Each sets itself up.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
# DVC runs each stage's `python -m stages.<name>` through the shell: put the venv's python first.
export PATH := $(BIN):$(PATH)

.PHONY: install init run test repro exp status ui

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

init: install
	@test -d .git || git init --quiet
	@test -d .dvc || dvc init --quiet

run: init
	dvc repro

# The everyday verbs, with the project's environment first on PATH (above) so that DVC starts every stage with
# its python: extra arguments in ARGS, e.g. `make repro ARGS=train`, `make exp ARGS='-S train.epochs=5'`.
ARGS ?=
PORT ?= 5000

repro: init
	dvc repro $(ARGS)

exp: init
	dvc exp run $(ARGS)

status: install
	dvc status $(ARGS)

# The MLflow UI for the project's store, reachable from this machine only.
ui: install
	mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $(PORT)

# The whole suite with oneDNN on (TF_ENABLE_ONEDNN_OPTS=1, as TensorFlow runs on recent Intel CPUs), then the
# tests marked `numerics` again with oneDNN off and its kernels capped at AVX2, as on AMD CPUs. Both runs go,
# and the target fails if either failed. pytest-randomly shuffles the order, printing its seed in each header:
# `python -m pytest --randomly-seed=N` replays an order.
test: install
	status=0; \
	TF_ENABLE_ONEDNN_OPTS=1 python -m pytest || status=1; \
	TF_ENABLE_ONEDNN_OPTS=0 ONEDNN_MAX_CPU_ISA=AVX2 python -m pytest -m numerics || status=1; \
	exit $$status
