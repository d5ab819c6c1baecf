#!/usr/bin/env bash
# Trains in NUM_PROCESSES processes on this machine, as that many machines would (README, "Training on several
# devices and machines"): each runs `python -m stages.train` with the KERAS_DISTRIBUTION_* variables, on the
# JAX backend, over 127.0.0.1:PORT; process 0 writes the outputs and the MLflow run. When all succeed,
# `dvc commit` records the train stage's outputs in dvc.lock, as `dvc repro train` would have.
#
# usage, from the project root with params.yaml's train.distribution: data_parallel and the stages before train
# done (`dvc repro classifier`):  scripts/train_processes.sh NUM_PROCESSES [PORT]
set -uo pipefail

count=${1:?usage: scripts/train_processes.sh NUM_PROCESSES [PORT]}
port=${2:-12355}
[ -x .venv/bin/python ] && PATH="$PWD/.venv/bin:$PATH"

export KERAS_BACKEND=jax KERAS_DISTRIBUTION_JOB_ADDRESSES="127.0.0.1:$port" KERAS_DISTRIBUTION_NUM_PROCESSES="$count"
pids=()
# A process that fails leaves the others waiting in their next all-reduce: whatever ends this script ends them.
trap 'kill "${pids[@]}" 2>/dev/null' EXIT
trap 'exit 143' TERM INT
for ((id = 0; id < count; id++)); do
  KERAS_DISTRIBUTION_PROCESS_ID=$id python -m stages.train &
  pids+=($!)
done
for ((left = count; left > 0; left--)); do
  wait -n || { status=$?; echo "train_processes.sh: a process failed (exit status $status); stopping the others" >&2
               exit "$status"; }
done
dvc commit --force --quiet train
