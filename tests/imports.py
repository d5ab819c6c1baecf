"""Which project files a DVC stage runs: the static import closure of its entry module, read with `ast`.

Nothing here imports the project (no TensorFlow, no Keras): it parses source files only.

The rules, following what Python executes:
- A module is a project module when its file is under the project root: `a/b/c.py`, or `a/b/c/__init__.py`
  for a package. Anything else (the standard library, installed packages) is not followed.
- Importing `a.b.c` runs `a/__init__.py`, then `a/b/__init__.py`, then `a/b/c.py` (each that exists), so all
  three are in the closure. `python -m stages.train` likewise runs `stages/__init__.py` before `stages/train.py`.
- Every import statement anywhere in a module counts, at the top or inside a function, a method, an `if`:
  `import a.b`, `from a.b import name` (runs a.b; and `a.b.name` too where that is a submodule, as in
  `from pipeline import paths`), and relative imports (`from . import x`, `from ..y import z`).
  A statement that may not run on some path still counts: the stage may take that path. The one exception
  is the body of `if TYPE_CHECKING:`, which never runs (imports there serve annotations only).
- `importlib.import_module("a.b")` with a literal name imports `a.b`.
- Dynamic import rule: a module calling `importlib.import_module(f"{__name__}.{...}")` (an f-string that
  starts with `{__name__}.`) picks one of its own submodules at run time, which one is not known statically,
  so it counts as importing every submodule of its package (`*.py` files and subpackages beside its
  `__init__.py`). This is how pipeline/steps/__init__.py loads the step module of the Keras backend.
- `from pkg import *` runs `pkg` only; submodules named in its `__all__` are not followed.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path, PurePosixPath


def module_file(name: str, root: Path) -> Path | None:
    """Returns the file under `root` that defines module `name`, or None when it is not a project module."""
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def import_closure(module: str, root: Path) -> set[PurePosixPath]:
    """Returns the project files (relative to `root`) that importing or running `module` executes."""
    root = Path(root)
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is not None:
            pending.extend(_imported_modules(name, path, root))
        # Importing a submodule first runs each package above it.
        if "." in name:
            pending.append(name.rpartition(".")[0])
    return {PurePosixPath(path.relative_to(root).as_posix())
            for name in seen if (path := module_file(name, root)) is not None}


def _imported_modules(name: str, path: Path, root: Path) -> list[str]:
    """Returns the dotted names `path` (module `name`) may import; non-project names are filtered later."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    names: list[str] = []
    for node in _executed_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            names.append(base)
            # `from pkg import x` imports the submodule pkg.x when there is one; a plain name is skipped later.
            names.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            argument = node.args[0]
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                names.append(argument.value)
            elif _starts_with_own_name(argument) and is_package:
                names.extend(f"{name}.{sub}" for sub in submodules(path.parent))
    return [n for n in names if module_file(n, root) is not None]


def _executed_nodes(tree: ast.AST):
    """Yields every node of `tree` except those under `if TYPE_CHECKING:` (its `else` still runs)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    """Returns whether `test` is `TYPE_CHECKING` or `typing.TYPE_CHECKING`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(module: str | None, level: int, package: str) -> str:
    """Returns the absolute name of `from <level dots><module> import ...` written in `package`."""
    if level == 0:
        return module or ""
    parts = package.split(".")
    base = ".".join(parts[:len(parts) - (level - 1)])
    return f"{base}.{module}" if module else base


def _is_import_module(func: ast.expr) -> bool:
    """Returns whether `func` is `importlib.import_module` or a bare `import_module`."""
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id == "import_module")


def _starts_with_own_name(argument: ast.expr) -> bool:
    """Returns whether `argument` is an f-string starting with `{__name__}.`."""
    if not isinstance(argument, ast.JoinedStr) or len(argument.values) < 2:
        return False
    first, second = argument.values[:2]
    return (isinstance(first, ast.FormattedValue) and isinstance(first.value, ast.Name)
            and first.value.id == "__name__"
            and isinstance(second, ast.Constant) and str(second.value).startswith("."))


def submodules(folder: Path) -> list[str]:
    """Returns the names of the modules and subpackages directly in the package `folder`."""
    files = [p.stem for p in folder.glob("*.py") if p.name != "__init__.py"]
    packages = [p.name for p in folder.iterdir() if (p / "__init__.py").is_file()]
    return sorted(files + packages)


def entry_module(cmd: str) -> str:
    """Returns the module a stage command runs: `python -m stages.train` -> `stages.train`."""
    words = shlex.split(cmd)
    if "-m" not in words[:-1]:
        raise ValueError(f"not of the form `python -m <module>`: {cmd!r}")
    return words[words.index("-m") + 1]


def stage_closures(stages: dict, root: Path) -> dict[str, set[PurePosixPath]]:
    """Returns, for each stage of a dvc.yaml `stages` mapping, the project files its command runs."""
    return {stage: import_closure(entry_module(spec["cmd"]), root) for stage, spec in stages.items()}
