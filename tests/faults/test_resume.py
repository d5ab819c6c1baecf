"""A train stage killed with SIGKILL mid-epoch resumes from its checkpoint on the next `dvc repro`."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import TINY_OVERRIDES, copy_project, make_project, merge, run

EPOCHS = 8
OVERRIDES = merge(TINY_OVERRIDES, {"train": {"epochs": EPOCHS, "checkpoint_every": 1, "eval_every": 2},
                                   "data": {"limit": 512}})


def checkpoint_epoch(path) -> int:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return json.loads(str(npz["state"]))["epoch"]
    except (OSError, ValueError, KeyError):
        return 0


def mlflow_runs(root):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mnist")
    return client, client.search_runs([experiment.experiment_id])


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """Kills `dvc repro` during training once epoch 2 is checkpointed, then reruns it; yields what each did."""
    root, env, dvc = make_project(tmp_path_factory.mktemp("resume"), OVERRIDES)
    checkpoint = root / "models/checkpoints/checkpoint.npz"
    process = subprocess.Popen([dvc, "repro"], cwd=root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while checkpoint_epoch(checkpoint) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed_after = checkpoint_epoch(checkpoint)
    os.killpg(process.pid, signal.SIGKILL)  # dvc and the stage's python, as a preemption would
    process.wait()
    assert 2 <= killed_after < EPOCHS, f"the kill came too late: {process.stdout.read()[-3000:]}"
    second = run([dvc, "repro"], root, env)
    return root, env, dvc, killed_after, second.stdout + second.stderr


def test_second_repro_resumes_from_the_checkpoint(resumed):
    _, _, _, killed_after, output = resumed
    assert "resuming from models/checkpoints/checkpoint.npz after epoch" in output
    resumed_from = int(output.split("after epoch ")[1].split()[0])
    assert resumed_from >= killed_after


def test_history_has_every_epoch_once(resumed):
    root, *_ = resumed
    assert pd.read_csv(root / "reports/train/history.csv")["epoch"].tolist() == list(range(1, EPOCHS + 1))
    assert pd.read_csv(root / "reports/train/fid.csv")["epoch"].tolist() == list(range(2, EPOCHS + 1, 2))


def test_mlflow_run_is_resumed_with_no_gap_and_no_duplicate_epoch(resumed):
    root, *_ = resumed
    client, runs = mlflow_runs(root)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == json.loads((root / "models/mlflow_run.json").read_text())["run_id"]
    for metric in ("d_loss", "g_loss", "seconds"):
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, f"train/{metric}")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), metric
    fid_steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/fid")]
    assert sorted(fid_steps) == list(range(2, EPOCHS + 1, 2))


def test_resumed_stage_writes_every_output_of_an_uninterrupted_run(resumed):
    root, *_ = resumed
    for path in ("models/generator.keras", "models/generator_best.keras", "models/discriminator.keras",
                 "metrics/train.json", "metrics/eval.json", "samples/samples.npz"):
        assert (root / path).is_file(), path
    grids = sorted(p.name for p in (root / "reports/train/grids").iterdir())
    assert grids == [f"epoch_{e:04d}.png" for e in range(1, EPOCHS + 1)]
    assert json.loads((root / "metrics/train.json").read_text())["epochs"] == EPOCHS


def test_changed_params_start_fresh_and_say_why(resumed, tmp_path):
    root, env, dvc, _, _ = resumed
    root = copy_project(root, tmp_path / "project")  # the other tests see the resumed project unchanged
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["lr"] = 0.0001
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    output = run([dvc, "repro", "train"], root, env)
    text = output.stdout + output.stderr
    assert "was made with other params or data" in text and "starting fresh" in text
    assert "resuming" not in text
    _, runs = mlflow_runs(root)
    assert len(runs) == 2
