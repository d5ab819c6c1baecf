# The README's two commands: `make run` (the main job) and `make test`. Each sets itself up.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
# DVC runs each stage's `python -m stages.<name>` through the shell: put the venv's python first.
export PATH := $(BIN):$(PATH)

.PHONY: install init run test

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

test: install
	python -m pytest
