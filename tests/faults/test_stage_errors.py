"""Every failure a user can cause ends a stage with one line naming the file or setting and the command that
fixes it, exit status 1, no traceback (PIPELINE_DEBUG=1 adds it), and no file changed but what the case says.

The cases run the real stages, directly (`python -m stages.X`, as DVC starts them) and through
`dvc repro -f -s <stage>` as in the issue, each on its own copy of one reproduced tiny project.
"""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_project, run
from pipeline.errors import PipelineError
from test_params_guard import changed_files, dvc_command, error_lines, file_hashes, reproduced_project

STAGE_TIMEOUT = 600


@pytest.fixture
def project(tmp_path_factory, tmp_path) -> tuple[Path, dict, str]:
    """A copy of the session's reproduced project (the one test_params_guard's tests copy), this test's own."""
    root, env, dvc = reproduced_project(tmp_path_factory)
    return copy_project(root, tmp_path / "project"), env, dvc


def run_stage_process(stage: str, root: Path, env: dict, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Returns the finished `python -m stages.<stage>` in `root`, whatever its exit status."""
    return subprocess.run([*prefix, sys.executable, "-m", f"stages.{stage}"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=STAGE_TIMEOUT, check=False)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """Returns the stage's one error line, asserting that it failed with exit status 1 and no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    (line,) = error_lines(result)
    return line


def declared_outputs(root: Path, stage: str) -> list[str]:
    """Returns the files dvc.yaml declares as `stage`'s outputs (what DVC deletes before running it)."""
    entries = yaml.safe_load((root / "dvc.yaml").read_text())["stages"][stage]["outs"]
    return sorted(next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries)


def save_model_with_code(path: Path) -> None:
    """Writes a .keras file holding a Lambda layer: Python code, which Keras' safe mode refuses to load."""
    import keras

    noise = keras.Input(shape=(100,))
    image = keras.layers.Reshape((28, 28, 1))(keras.layers.Dense(784)(noise))
    keras.Model(noise, keras.layers.Lambda(lambda x: x * 2)(image)).save(path)


@pytest.mark.slow
def test_generator_holding_code_is_refused_naming_the_file_and_never_suggesting_unsafe_loading(project):
    root, env, _ = project
    save_model_with_code(root / "models/generator_best.keras")  # the generator `generator: best` picks
    before = file_hashes(root)
    line = one_error_line(run_stage_process("sample", root, env))
    assert "models/generator_best.keras holds Python code" in line
    assert "`dvc checkout --force models/generator_best.keras`" in line
    assert "safe_mode" not in line and "unsafe" not in line
    assert changed_files(before, file_hashes(root)) == []


@pytest.mark.slow
def test_forced_repro_of_sample_with_a_generator_holding_code_fails_in_one_line(project):
    # DVC deletes a stage's own outputs before any forced run: those, and nothing else, are gone.
    root, env, dvc = project
    save_model_with_code(root / "models/generator_best.keras")
    before = file_hashes(root)
    result = dvc_command([dvc, "repro", "-f", "-s", "sample"], root, env)
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    (line,) = error_lines(result)
    assert "models/generator_best.keras holds Python code" in line and "safe_mode" not in line
    assert changed_files(before, file_hashes(root)) == declared_outputs(root, "sample")


@pytest.mark.slow
def test_lost_tracking_store_names_the_run_and_the_command_that_opens_a_new_one(project):
    root, env, dvc = project
    (root / "mlflow.db").unlink()
    before = file_hashes(root)
    result = dvc_command([dvc, "repro", "-f", "-s", "sample"], root, env)
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    (line,) = error_lines(result)
    assert "(from models/mlflow_run.json) is not in the tracking store" in line and "mlflow.db does not exist" in line
    assert "`dvc repro -f -s train && dvc repro`" in line
    # Nothing but what DVC deletes before a forced run; in particular no new, empty mlflow.db.
    assert changed_files(before, file_hashes(root)) == declared_outputs(root, "sample")


@pytest.mark.slow
def test_the_command_named_for_a_lost_tracking_store_gets_the_pipeline_going_without_training_again(project):
    from mlflow.tracking import MlflowClient

    root, env, dvc = project
    (root / "mlflow.db").unlink()
    train = run([dvc, "repro", "-f", "-s", "train"], root, env)
    assert "resuming from models/checkpoints/checkpoint.npz after epoch 1" in train.stdout + train.stderr
    rest = run([dvc, "repro"], root, env)
    assert "Running stage 'sample'" in rest.stdout and "Running stage 'evaluate'" in rest.stdout
    run_id = yaml.safe_load((root / "models/mlflow_run.json").read_text())["run_id"]
    new_run = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").get_run(run_id)
    assert {"train/d_loss", "eval/fid"} <= set(new_run.data.metrics)  # training's epochs and the evaluation, in one run


def tmpfs_prefix() -> tuple[str, ...] | None:
    """Returns the unshare command that lets a child mount a filesystem of its own, or None where none can."""
    with tempfile.TemporaryDirectory() as folder:
        for prefix in (("unshare", "--user", "--map-root-user", "--mount"), ("unshare", "--mount")):
            try:
                probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", folder],
                                       capture_output=True, timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired):
                continue
            if probe.returncode == 0:
                return prefix
    return None


@pytest.mark.slow
def test_full_disk_while_sampling_names_the_output_not_its_temporary_file(project):
    # A real full disk: a 4 KiB tmpfs over samples/, mounted in a mount namespace of the stage's own, so that the
    # project's samples/ stays as it was and only the stage sees a disk with no room for samples.npz.
    prefix = tmpfs_prefix()
    if prefix is None:
        pytest.skip("this machine lets no process mount a filesystem (unshare --mount is not permitted)")
    root, env, _ = project
    before = file_hashes(root)
    result = subprocess.run([*prefix, "sh", "-c", 'mount -t tmpfs -o size=4k tmpfs samples && exec "$@"', "sh",
                             sys.executable, "-m", "stages.sample"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=STAGE_TIMEOUT, check=False)
    line = one_error_line(result)
    assert "cannot write samples/samples.npz: No space left on device; free space on that disk" in line
    assert ".tmp" not in line and "`dvc repro`" in line
    # The stage had resumed the MLflow run, which records its failure; no other file changed.
    assert changed_files(before, file_hashes(root)) == ["mlflow.db"]


@pytest.mark.slow
def test_missing_upstream_output_names_the_file_and_the_command_that_rebuilds_it(project):
    root, env, _ = project
    (root / "reports/train/fid.csv").unlink()
    before = file_hashes(root)
    line = one_error_line(run_stage_process("evaluate", root, env))
    assert "reports/train/fid.csv is missing: an earlier stage's output; rebuild it with `dvc repro evaluate`" in line
    assert changed_files(before, file_hashes(root)) == []


@pytest.mark.slow
def test_dvc_with_a_python_lacking_the_projects_packages_says_how_to_get_them(project, tmp_path):
    # As with `.venv/bin/dvc` and the environment not activated: DVC starts the stages with the first `python`
    # on PATH. Here that is this interpreter without its site-packages.
    root, env, dvc = project
    bare = tmp_path / "bin"
    bare.mkdir()
    (bare / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S -B "$@"\n')
    (bare / "python").chmod(0o755)
    before = file_hashes(root)
    result = dvc_command([dvc, "repro", "-f", "-s", "params"], root, {**env, "PATH": f"{bare}:{env['PATH']}"})
    assert result.returncode != 0
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert "lacks the project's packages (numpy, pandas," in line and "`source .venv/bin/activate`" in line
    assert changed_files(before, file_hashes(root)) == []  # the params stage's output is kept (persist)


@pytest.mark.parametrize("stage", list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_every_stage_started_without_the_projects_packages_says_so_in_one_line(stage):
    result = subprocess.run([sys.executable, "-S", "-B", "-m", f"stages.{stage}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "lacks the project's packages" in result.stderr
    assert "`make repro`" in result.stderr


def test_write_failure_names_the_output_not_its_temporary_file(tmp_path):
    from pipeline.files import WriteFailed, atomic_path

    target = tmp_path / "samples.npz"
    with pytest.raises(WriteFailed) as error, atomic_path(target) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert str(error.value).startswith(f"cannot write {target}: No space left on device; free space")
    assert ".tmp" not in str(error.value) and list(tmp_path.iterdir()) == []


def test_model_file_that_is_not_a_model_is_named_with_the_command_that_restores_it(tmp_path):
    from pipeline.models import ModelFileError, load_model

    path = tmp_path / "generator.keras"
    path.write_bytes(b"half a zip file")
    with pytest.raises(ModelFileError, match=f"^{path} is not a Keras model file that loads .*"
                                             f"`dvc checkout --force {path}`"):
        load_model(path)


def failing_stage() -> None:
    raise PipelineError("models/x.keras is bad; run `dvc repro`")


@pytest.mark.parametrize("debug, traceback_shown", [(None, False), ("1", True)])
def test_pipeline_debug_adds_the_traceback_to_the_error_line(debug, traceback_shown, monkeypatch, caplog):
    from pipeline.cli import DEBUG_VARIABLE, run_stage

    if debug is None:
        monkeypatch.delenv(DEBUG_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(DEBUG_VARIABLE, debug)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        run_stage(failing_stage)
    assert exit_info.value.code == 1
    (record,) = caplog.records
    assert record.getMessage() == "models/x.keras is bad; run `dvc repro`"
    assert bool(record.exc_info) == traceback_shown
