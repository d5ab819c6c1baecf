# The README's two commands: `make run` (the main job) and `make test`. Each sets itself up.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
# DVC runs each stage's `python -m stages.<name>` through the shell: put the venv's python first.
export PATH := $(BIN):$(PATH)

.PHONY: install init run test repro exp status ui serve models promote

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,team]'
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

# The model lifecycle (README, "Model lifecycle"): the registered model of params.yaml's dataset and architecture
# unless MODEL=... names another. `make serve` serves its champion on http://127.0.0.1:$(PORT)/invocations,
# `make models` lists its versions, `make promote VERSION=N` makes version N the champion (rollback).
MODEL ?=
VERSION ?=
MODEL_OPTION = $(if $(MODEL),--model $(MODEL))

serve: install
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} mlflow models serve \
	  -m "models:/$${MODEL:-$$(python -m pipeline.registry name)}@champion" --env-manager local -h 127.0.0.1 -p $(PORT)

models: install
	python -m pipeline.registry list $(MODEL_OPTION)

promote: install
	@test -n "$(VERSION)" || { echo "usage: make promote VERSION=N [MODEL=name]"; exit 2; }
	python -m pipeline.registry promote $(VERSION) $(MODEL_OPTION)

# $(call apt_install,TARGET,PACKAGE,WHAT FOR): a shell line that installs Debian's PACKAGE with apt-get, as root
# or through sudo, and otherwise stops, saying how.
apt_install = if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "make $(1): $(2) is missing and there is no apt-get: install it by hand" >&2; exit 1; \
	  elif [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else echo "make $(1): $(2) is missing and installing it needs root: run \`apt-get install $(2)\` as root" >&2; exit 1; \
	  fi; \
	  echo "make $(1): installing Debian's $(2) (apt-get) for $(3)"; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2)

# Chromium for the browser test of the MLflow UI (tests/test_mlflow_ui.py): Debian's package, which Playwright
# drives (Playwright's own browser downloads are not used). Installed only when `chromium` is not on PATH.
.PHONY: browser
browser:
	@command -v chromium >/dev/null 2>&1 || { $(call apt_install,browser,chromium,tests/test_mlflow_ui.py); }

# The team stack (README, "Team set-up"): PostgreSQL, an S3 server (moto) and an mlflow server over them, on
# 127.0.0.1; `make stack-up` prints what to export, which `source .stack/env` does. `make stack-down` stops them.
.PHONY: stack-up stack-down stack-status
stack-up: install
	python scripts/team_stack.py start

stack-down:
	python scripts/team_stack.py stop

stack-status:
	python scripts/team_stack.py status

# PostgreSQL's server for the team stack and tests/test_team_stack.py: Debian's package, installed only when no
# initdb is in /usr/lib/postgresql/*/bin (nor pg_ctl on PATH).
.PHONY: postgres
postgres:
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { $(call apt_install,postgres,postgresql,the team stack and tests/test_team_stack.py); }

# The whole suite with oneDNN on (TF_ENABLE_ONEDNN_OPTS=1, as TensorFlow runs on recent Intel CPUs), then the
# tests marked `numerics` again with oneDNN off and its kernels capped at AVX2, as on AMD CPUs. Both runs go,
# and the target fails if either failed. pytest-randomly shuffles the order, printing its seed in each header:
# `python -m pytest --randomly-seed=N` replays an order.
test: install browser postgres
	status=0; \
	TF_ENABLE_ONEDNN_OPTS=1 python -m pytest || status=1; \
	TF_ENABLE_ONEDNN_OPTS=0 ONEDNN_MAX_CPU_ISA=AVX2 python -m pytest -m numerics || status=1; \
	exit $$status
