"""Security rules that hold for the whole code base: no unpickling, safe Keras loading, a local-only UI.

The code rules read every call with `ast`, so a call is checked however it is written (qualified,
imported by name, split over lines, with nested parentheses in its arguments).
"""

import ast

import pytest

from conftest import ROOT

SOURCES = sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("stages/*.py"), *ROOT.glob("benchmarks/*.py")])
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "joblib"}


def calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    """Returns (dotted name of the callee, call) for every call: "keras.saving.load_model", "load_model", ..."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, func = [], node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            out.append((".".join(reversed(parts)), node))
    return out


def imported_from(tree: ast.AST, prefixes: tuple[str, ...]) -> set[str]:
    """Returns the names bound by `from <module> import name` where the module starts with one of `prefixes`."""
    return {alias.asname or alias.name for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(prefixes)
            for alias in node.names}


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unpickling(text: str) -> list[str]:
    """Returns each way `text` could unpickle: a pickle-family import, read_pickle, np.load without allow_pickle=False."""
    tree = ast.parse(text)
    found = [f"import {alias.name}" for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names if alias.name.split(".")[0] in PICKLE_MODULES]
    found += [f"from {node.module} import" for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES]
    numpy_load = imported_from(tree, ("numpy",)) & {"load"}
    for name, call in calls(tree):
        if name.endswith("read_pickle"):
            found.append(ast.unparse(call))
        elif name in ("np.load", "numpy.load", *numpy_load) and not keyword_is(call, "allow_pickle", False):
            found.append(ast.unparse(call))
    return found


def unsafe_keras_loads(text: str) -> list[str]:
    """Returns each Keras model load in `text` without a literal safe_mode=True, and any unsafe switch."""
    tree = ast.parse(text)
    from_keras = imported_from(tree, ("keras", "tensorflow", "tf_keras"))
    found = []
    for name, call in calls(tree):
        keras_loader = name.endswith(("saving.load_model", "models.load_model")) or (
            name == "load_model" and "load_model" in from_keras)
        if keras_loader and not keyword_is(call, "safe_mode", True):
            found.append(ast.unparse(call))
        if name.endswith("enable_unsafe_deserialization"):
            found.append(ast.unparse(call))
    return found


def test_nothing_is_ever_unpickled():
    assert SOURCES
    found = {str(path.relative_to(ROOT)): unpickling(path.read_text()) for path in SOURCES}
    assert {path: hits for path, hits in found.items() if hits} == {}


def test_keras_models_load_only_in_safe_mode():
    found = {str(path.relative_to(ROOT)): unsafe_keras_loads(path.read_text()) for path in SOURCES}
    assert {path: hits for path, hits in found.items() if hits} == {}
    # The project's one loader, which every stage uses, is a Keras load that the rule above checked.
    loader = [ast.unparse(call) for name, call in calls(ast.parse((ROOT / "pipeline/models.py").read_text()))
              if name == "keras.saving.load_model"]
    assert loader == ["keras.saving.load_model(path, compile=False, safe_mode=True)"]


@pytest.mark.parametrize("source", [
    "keras.saving.load_model(path, compile=False)",
    "keras.models.load_model(Path(p), safe_mode=False)",
    "tf.keras.models.load_model(\n    str(path),\n    compile=False,\n)",
    "from keras.saving import load_model\nload_model(path)",
    "from keras import saving\nsaving.load_model(path, safe_mode=flag)",
    "keras.config.enable_unsafe_deserialization()",
])
def test_the_safe_mode_rule_catches_a_keras_load_that_is_not_safe(source):
    assert unsafe_keras_loads(source) != []


@pytest.mark.parametrize("source", [
    "import pickle",
    "import dill as d",
    "from pickle import loads",
    "pd.read_pickle(path)",
    "np.load(path)",
    "np.load(Path(p), allow_pickle=True)",
    "from numpy import load\nload(path)",
])
def test_the_pickle_rule_catches_each_way_to_unpickle(source):
    assert unpickling(source) != []


def test_the_rules_pass_safe_loads_and_the_project_loader():
    source = ("from pipeline.models import load_model\nload_model(path)\n"
              "keras.saving.load_model(Path(p), compile=False, safe_mode=True)\n"
              "np.load(path, allow_pickle=False)")
    assert (unsafe_keras_loads(source), unpickling(source)) == ([], [])


def test_readme_mlflow_ui_binds_localhost_only():
    commands = [line for line in (ROOT / "README.md").read_text().splitlines() if "mlflow ui" in line]
    assert commands and all("--host 127.0.0.1" in line for line in commands)
