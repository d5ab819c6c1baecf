"""No value in params.yaml, and no `dvc exp run -S`, makes DVC delete a file: the params stage refuses it first.

DVC deletes a stage's outputs before it runs the stage's command, so each stage's own validation came too late.
The params stage validates all of params.yaml, and every other stage depends on its output, so `dvc repro` and
`dvc exp run` stop there. Each case runs the real DVC on its own copy of one reproduced tiny project and
compares the hash of every file in it (DVC's cache included) before and after.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY_OVERRIDES, copy_project, make_project, run

STAGE_TIMEOUT = 600
# Run state, not project files: DVC's locks and temporary files, Python's byte code.
UNHASHED = (".git", ".dvc/tmp", "__pycache__")
DATASETS = "allowed values: mnist, fashion_mnist, cifar10, mnist_5k"


@functools.cache
def _reproduced(base: Path) -> tuple[Path, dict, str]:
    root, env, dvc = make_project(base, TINY_OVERRIDES)
    run([dvc, "repro"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "reproduced"], root, env)
    return root, env, dvc


def reproduced_project(tmp_path_factory) -> tuple[Path, dict, str]:
    """Returns (root, env, dvc) of the one tiny project this test session reproduces, committed to its git."""
    return _reproduced(tmp_path_factory.getbasetemp() / "reproduced")


@pytest.fixture
def project(tmp_path_factory, tmp_path) -> tuple[Path, dict, str]:
    """A copy of the reproduced project, this test's own to break; yields (root, env, dvc)."""
    root, env, dvc = reproduced_project(tmp_path_factory)
    return copy_project(root, tmp_path / "project"), env, dvc


def file_hashes(root: Path) -> dict[str, str]:
    """Returns {path relative to root: sha256} of every file in the project but UNHASHED."""
    hashes = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_file() and not any(name == part or name.startswith(f"{part}/") or f"/{part}/" in f"/{name}"
                                      for part in UNHASHED):
            hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def dvc_command(args: list[str], root: Path, env: dict) -> subprocess.CompletedProcess:
    """Returns the finished command, whatever its exit status."""
    return subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=STAGE_TIMEOUT, check=False)


def set_param(root: Path, section: str, key: str, value) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params[section][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """Returns the stage's own error lines (the log format of pipeline.cli), not DVC's."""
    return [line for line in (result.stdout + result.stderr).splitlines() if " ERROR pipeline: " in line]


def test_no_path_in_dvc_yaml_is_built_from_a_param():
    # An output path built from a param (data/raw/${data.name}) let a value point DVC's deletion anywhere.
    def strings(node):
        if isinstance(node, dict):
            for key, value in node.items():
                yield str(key)
                yield from strings(value)
        elif isinstance(node, list):
            for item in node:
                yield from strings(item)
        elif isinstance(node, str):
            yield node

    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert "vars" not in dvc_yaml
    assert [text for text in strings(dvc_yaml) if "${" in text] == []


def test_params_stage_tracks_every_key_and_every_other_stage_waits_for_it():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    check = stages.pop("params")
    assert check["params"] == [{"params.yaml": None}]  # no key list: DVC tracks every key in the file
    assert check["outs"] == [{"data/params.ok": {"persist": True}}]  # kept, not deleted, when the check fails
    assert {name for name, stage in stages.items() if "data/params.ok" not in stage["deps"]} == set()


def test_params_stage_imports_neither_tensorflow_nor_mlflow():
    code = ("import sys, stages.params; "
            "heavy = [m for m in ('tensorflow', 'keras', 'mlflow') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-B", "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_params_check_writes_the_same_bytes_whatever_the_valid_values(tmp_path, monkeypatch, tiny_params):
    # Otherwise every valid change would rerun every stage, each of them depending on this output.
    import stages.params
    from pipeline import paths

    monkeypatch.chdir(tmp_path)
    written = []
    for epochs in (1, 7):
        tiny_params["train"]["epochs"] = epochs
        Path("params.yaml").write_text(yaml.safe_dump(tiny_params))
        stages.params.main()
        written.append(paths.PARAMS_CHECKED.read_bytes())
    assert written[0] == written[1]


@pytest.mark.slow
@pytest.mark.parametrize("section, key, value, message", [
    ("data", "name", "../../mlflow.db", f"data.name: '../../mlflow.db' is not supported; {DATASETS}"),
    ("train", "lr", -1, "train.lr: -1.0 is out of range; allowed values: > 0.0 and <= 1.0"),
], ids=["data.name-outside-the-project", "train.lr-negative"])
def test_bad_value_stops_dvc_repro_before_any_file_changes(project, section, key, value, message):
    root, env, dvc = project
    set_param(root, section, key, value)
    before = file_hashes(root)
    result = dvc_command([dvc, "repro"], root, env)
    assert result.returncode != 0
    (line,) = error_lines(result)
    assert f"{message}; correct it in params.yaml and run again" in line
    assert "Running stage 'params'" in result.stdout and "Running stage 'download'" not in result.stdout
    assert changed_files(before, file_hashes(root)) == []


@pytest.mark.slow
def test_bad_value_stops_dvc_repro_of_one_target_too(project):
    # `dvc repro train` runs train's upstream stages first, the params check among them.
    root, env, dvc = project
    set_param(root, "train", "batch_size", 0)
    before = file_hashes(root)
    result = dvc_command([dvc, "repro", "train"], root, env)
    assert result.returncode != 0 and "train.batch_size: 0 is out of range" in "".join(error_lines(result))
    assert changed_files(before, file_hashes(root)) == []


@pytest.mark.slow
def test_bad_exp_run_set_value_is_refused_and_only_params_yaml_holds_it(project):
    root, env, dvc = project
    before = file_hashes(root)
    result = dvc_command([dvc, "exp", "run", "-S", "train.epochs=abc"], root, env)
    assert result.returncode != 0
    (line,) = error_lines(result)
    assert "train.epochs: expected an integer, got 'abc' (str)" in line
    # DVC wrote the value before any stage ran, and leaves it there: the message says so and how to undo it.
    assert "the file now holds this value" in line and "`git checkout params.yaml`" in line
    assert changed_files(before, file_hashes(root)) == ["params.yaml"]
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["epochs"] == "abc"
    run(["git", "checkout", "params.yaml"], root, env)
    assert changed_files(before, file_hashes(root)) == []


@pytest.mark.slow
def test_params_yaml_that_is_not_yaml_stops_dvc_itself_before_any_stage(project):
    # DVC reads params.yaml before it runs anything (for its own templating), and refuses it with its own message.
    root, env, dvc = project
    (root / "params.yaml").write_text("train:\n  epochs: [1\n")
    before = file_hashes(root)
    result = dvc_command([dvc, "repro"], root, env)
    assert result.returncode != 0
    assert "unable to read: 'params.yaml'" in result.stderr and "Running stage" not in result.stdout
    assert changed_files(before, file_hashes(root)) == []


@pytest.mark.slow
def test_empty_params_yaml_is_refused_by_the_params_stage(project):
    root, env, dvc = project
    (root / "params.yaml").write_text("")
    before = file_hashes(root)
    result = dvc_command([dvc, "repro"], root, env)
    assert result.returncode != 0
    assert "params.yaml: expected a mapping of keys, got None" in "".join(error_lines(result))
    assert changed_files(before, file_hashes(root)) == []


@pytest.mark.slow
def test_switching_back_to_a_dataset_restores_it_from_the_run_cache(project):
    # data/raw is one output whatever the dataset: switching away replaces it, switching back restores it
    # from DVC's run cache, without running the download again.
    root, env, dvc = project
    manifest = root / "data/raw/mnist/manifest.json"
    first = manifest.read_bytes()
    set_param(root, "data", "name", "mnist_5k")
    run([dvc, "repro", "download"], root, env)
    assert sorted(p.name for p in (root / "data/raw").iterdir()) == ["mnist_5k"]
    set_param(root, "data", "name", "mnist")
    result = run([dvc, "repro", "download"], root, env)
    assert "Stage 'download' is cached - skipping run, checking out outputs" in result.stdout
    assert manifest.read_bytes() == first
