"""Security rules that hold for the whole code base: no unpickling, safe Keras loading, a local-only UI."""

import re

from conftest import ROOT

SOURCES = sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py"), *ROOT.glob("benchmarks/*.py")])


def test_nothing_is_ever_unpickled():
    for path in SOURCES:
        text = path.read_text()
        assert "allow_pickle=True" not in text, path
        assert not re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M), path
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, f"{path}: {call}"


def test_keras_models_load_only_in_safe_mode():
    for path in SOURCES:
        for call in re.findall(r"load_model\((?:[^()]|\([^()]*\))*\)", path.read_text()):
            if "keras.saving.load_model" in call or "keras.models.load_model" in call:
                assert "safe_mode=True" in call, f"{path}: {call}"
    loader = (ROOT / "pipeline/models.py").read_text()
    assert "keras.saving.load_model(path, compile=False, safe_mode=True)" in loader


def test_readme_mlflow_ui_binds_localhost_only():
    commands = [line for line in (ROOT / "README.md").read_text().splitlines() if "mlflow ui" in line]
    assert commands and all("--host 127.0.0.1" in line for line in commands)
