"""dvc.yaml lists, for every stage, each project file its command runs, so that editing code reruns what it affects.

What a stage runs is its entry module's import closure, read from the source with `ast` (tests/imports.py has
the rules, among them how a `importlib.import_module(f"{__name__}.{...}")` counts). A folder dep covers every
file under it. Pure ast and yaml: nothing here imports the project.
"""

from pathlib import Path, PurePosixPath

import pytest
import yaml

from imports import entry_module, import_closure

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_code(stage: str) -> set[PurePosixPath]:
    """Returns the project files the command of `stage` runs."""
    return import_closure(entry_module(STAGES[stage]["cmd"]), ROOT)


def deps(stage: str) -> list[PurePosixPath]:
    return [PurePosixPath(dep) for dep in STAGES[stage].get("deps", [])]


def covered(path: PurePosixPath, dependencies: list[PurePosixPath]) -> bool:
    """Returns whether a dep is `path` itself or a folder above it."""
    return any(dep == path or dep in path.parents for dep in dependencies)


def code_under(dep: PurePosixPath) -> set[PurePosixPath]:
    """Returns the Python files a dep names: itself if it names one, those under it if it is a folder."""
    if dep.suffix == ".py":
        return {dep}
    folder = ROOT / dep
    return {PurePosixPath(p.relative_to(ROOT).as_posix()) for p in folder.rglob("*.py")} if folder.is_dir() else set()


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_lists_every_project_file_its_command_runs(stage):
    code = stage_code(stage)
    entry = PurePosixPath(*entry_module(STAGES[stage]["cmd"]).split(".")).with_suffix(".py")
    assert entry in code, f"stage {stage!r}: its command runs {entry}, which does not exist"
    missing = sorted(str(path) for path in code if not covered(path, deps(stage)))
    assert not missing, f"stage {stage!r} runs these files but dvc.yaml does not list them in its deps: {missing}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_lists_no_code_its_command_does_not_run(stage):
    # A stale code dep reruns the stage for edits that cannot change its results.
    code = stage_code(stage)
    extra = sorted(str(path) for dep in deps(stage) for path in code_under(dep) if path not in code)
    assert not extra, f"stage {stage!r} lists code deps its command does not run: {extra}"


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def closure_names(module: str, root: Path) -> set[str]:
    return {str(path) for path in import_closure(module, root)}


def test_closure_follows_imports_inside_functions_and_submodules_named_by_from_imports(tmp_path):
    write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/main.py": "import os\nfrom pkg import sub, CONSTANT\n\ndef later():\n    import pkg.lazy\n",
        "pkg/sub.py": "from pkg.leaf import name\n",
        "pkg/leaf.py": "name = 1\n",
        "pkg/lazy.py": "",
        "pkg/unused.py": "",
    })
    assert closure_names("pkg.main", tmp_path) == {
        "pkg/__init__.py", "pkg/main.py", "pkg/sub.py", "pkg/leaf.py", "pkg/lazy.py"}


def test_closure_runs_the_init_of_every_package_on_the_way_and_follows_relative_imports(tmp_path):
    write(tmp_path, {
        "app.py": "import pkg.inner.deep\n",
        "pkg/__init__.py": "",
        "pkg/helper.py": "",
        "pkg/inner/__init__.py": "from . import sibling\n",
        "pkg/inner/sibling.py": "",
        "pkg/inner/deep.py": "from ..helper import name\n",
    })
    assert closure_names("app", tmp_path) == {
        "app.py", "pkg/__init__.py", "pkg/helper.py", "pkg/inner/__init__.py", "pkg/inner/sibling.py",
        "pkg/inner/deep.py"}


def test_closure_counts_an_import_module_of_own_name_as_importing_every_submodule(tmp_path):
    write(tmp_path, {
        "app.py": "from plugins import run\n",
        "plugins/__init__.py": "import importlib\n\ndef run(kind):\n"
                               "    return importlib.import_module(f'{__name__}.{kind}')\n",
        "plugins/one.py": "import helper\n",
        "plugins/two.py": "",
        "plugins/nested/__init__.py": "",
        "helper.py": "",
        "other/__init__.py": "",
    })
    assert closure_names("app", tmp_path) == {
        "app.py", "plugins/__init__.py", "plugins/one.py", "plugins/two.py", "plugins/nested/__init__.py",
        "helper.py"}


def test_closure_skips_imports_made_only_for_type_checking(tmp_path):
    write(tmp_path, {
        "app.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import annotations_only\n"
                  "else:\n    import at_run_time\n",
        "annotations_only.py": "",
        "at_run_time.py": "",
    })
    assert closure_names("app", tmp_path) == {"app.py", "at_run_time.py"}


def test_entry_module_is_read_from_a_python_dash_m_command():
    assert entry_module("python -m stages.train") == "stages.train"
    with pytest.raises(ValueError, match="python -m"):
        entry_module("python stages/train.py")
