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
