"""Every bad params.yaml stops a stage before any work, with the key named and nothing written."""

import logging

import pytest
import yaml

import stages.download
from conftest import default_params, merge
from pipeline.cli import run_stage
from test_config import BAD_PARAMS

TEXT_CASES = [
    ("train:\n  epochs: [1\n", "is not valid YAML"),
    ("", "params.yaml: expected a mapping of keys, got None"),
    ("- just\n- a list\n", "params.yaml: expected a mapping of keys, got ['just', 'a list']"),
]


def run_download_stage(tmp_path, monkeypatch, caplog, text: str) -> str:
    (tmp_path / "params.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        run_stage(stages.download.main)
    assert exit_info.value.code == 1
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # nothing written
    return caplog.text


@pytest.mark.parametrize("overrides, message", BAD_PARAMS, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD_PARAMS)])
def test_bad_value_stops_the_stage_naming_the_key(overrides, message, tmp_path, monkeypatch, caplog):
    text = yaml.safe_dump(merge(default_params(), overrides))
    assert message in run_download_stage(tmp_path, monkeypatch, caplog, text)


@pytest.mark.parametrize("text, message", TEXT_CASES)
def test_unreadable_params_stop_the_stage(text, message, tmp_path, monkeypatch, caplog):
    assert message in run_download_stage(tmp_path, monkeypatch, caplog, text)


def test_the_table_has_at_least_25_bad_inputs():
    assert len(BAD_PARAMS) + len(TEXT_CASES) >= 25


def test_message_says_where_to_correct_the_value(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    text = yaml.safe_dump(merge(default_params(), {"train": {"lr": -1}}))
    assert "train.lr: -1.0 is out of range; allowed values: > 0.0 and <= 1.0; correct it in params.yaml and run again" \
        in run_download_stage(tmp_path, monkeypatch, caplog, text)


def test_inside_dvc_exp_run_the_message_says_params_yaml_now_holds_the_value(tmp_path, monkeypatch, caplog):
    # `dvc exp run -S` writes the value into the workspace's params.yaml before any stage runs, and leaves it.
    monkeypatch.setenv("DVC_EXP_NAME", "bad-exp")
    text = yaml.safe_dump(merge(default_params(), {"train": {"epochs": "abc"}}))
    message = run_download_stage(tmp_path, monkeypatch, caplog, text)
    assert "train.epochs: expected an integer, got 'abc' (str); `dvc exp run` writes its -S values into params.yaml" \
        in message
    assert "restore the committed file with `git checkout params.yaml`" in message


def test_yaml_syntax_error_is_one_line_with_its_position(tmp_path, monkeypatch, caplog):
    message = run_download_stage(tmp_path, monkeypatch, caplog, "train:\n  epochs: [1\n")
    (line,) = [line for line in message.splitlines() if "is not valid YAML" in line]
    assert "params.yaml is not valid YAML: expected ',' or ']', but got '<stream end>' at line 3, column 1" in line
