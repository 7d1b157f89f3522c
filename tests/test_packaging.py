"""``pip install .`` gives a library that imports: every third-party package the library imports
is declared in pyproject.toml (the book's toolchain, used only by book/ and cli.py, in [book])."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DISTRIBUTION = {"sklearn": "scikit-learn", "skimage": "scikit-image", "yaml": "pyyaml", "myst_nb": "myst-nb"}
BOOK_ONLY = {"book", "cli.py"}             # run and build the book: the [book] extra's packages
NOTEBOOK = {"IPython", "ipywidgets"}        # imported only inside a notebook kernel, which has them


def _declared(names: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", n, maxsplit=1)[0].lower() for n in names}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"gen3d_lessons", "__future__"}


def test_every_import_of_the_library_is_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = _declared(project["dependencies"])
    book = runtime | _declared(project["optional-dependencies"]["book"]) | {"myst-nb", "papermill", "nbformat"}
    missing = []
    for path in sorted((REPO / "gen3d_lessons").rglob("*.py")):
        allowed = book if BOOK_ONLY & set(path.relative_to(REPO / "gen3d_lessons").parts) else runtime
        for module in sorted(_imports(path)):
            if DISTRIBUTION.get(module, module).lower() not in allowed and module not in NOTEBOOK:
                missing.append(f"{path.relative_to(REPO)} imports {module}")
    assert not missing, "undeclared in pyproject.toml: " + "; ".join(missing)
