"""The book's "The library" page: the layout of ``gen3d_lessons`` and which chapter uses which module.

Like the run report, the page is written at staging time from the code itself, so it cannot
drift: the modules are the package's ``.py`` files, their summaries the first sentence of their
docstrings, and a chapter's modules are what its code cells import, read with :mod:`ast`
(``from gen3d_lessons.x.y import f``, ``from gen3d_lessons.x import y`` where ``y`` is a module,
``import gen3d_lessons.x``). A name a package re-exports (``from gen3d_lessons.training import
save_model``) counts for the module that defines it.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

PACKAGE_DIR = Path(__file__).resolve().parents[1]      # the package this book runs on
INDENT = "&nbsp;" * 4       # one level of the layout's tree (non-breaking: a long name never wraps away)
ABBREVIATIONS = {"al", "e.g", "i.e", "cf", "vs", "eq", "fig", "sec", "ch"}   # their "." ends no sentence


@dataclass(frozen=True)
class Module:
    """One module of the library, or one package (a folder; its ``__init__.py`` if it has one)."""

    name: str           # dotted: "gen3d_lessons.tasks.segment"; a package: "gen3d_lessons.tasks"
    label: str          # as the page shows it: "tasks/segment.py"; a package: "tasks/"
    lines: int          # a package: all its files together
    summary: str        # the first sentence of the docstring ("" without one)
    is_package: bool


def summary(text: str) -> str:
    """The first sentence of a module's docstring (its first paragraph, joined), or ""."""
    doc = ast.get_docstring(ast.parse(text)) or ""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    for match in re.finditer(r"\.\s+(?=[A-Z(])", paragraph):
        word = paragraph[: match.start()].rsplit(" ", 1)[-1].lstrip("(").lower()
        if word not in ABBREVIATIONS:
            return paragraph[: match.start() + 1]
    return paragraph


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def library_modules(package_dir: str | Path = PACKAGE_DIR) -> list[Module]:
    """Every package and module under ``package_dir``, in the page's order: a package, its
    modules (alphabetical), then its sub-packages the same way. A folder counts as a package
    when it holds Python files (with or without ``__init__.py``)."""
    root = Path(package_dir)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    found: list[Module] = []

    def walk(folder: Path, name: str) -> None:
        files = sorted(p for p in folder.glob("*.py") if p.name != "__init__.py")
        init = folder / "__init__.py"
        every = [p for p in folder.rglob("*.py") if "__pycache__" not in p.parts]
        label = f"{folder.relative_to(root.parent) if folder == root else folder.relative_to(root)}/"
        found.append(Module(name, label, sum(_line_count(p) for p in every),
                            summary(init.read_text()) if init.is_file() else "", True))
        for path in files:
            found.append(Module(f"{name}.{path.stem}", str(path.relative_to(root)), _line_count(path),
                                summary(path.read_text()), False))
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"):
            if any(sub.rglob("*.py")):
                walk(sub, f"{name}.{sub.name}")

    walk(root, root.name)
    return found


class _Imports:
    """Resolves what a chapter imports to the library's modules (dotted names)."""

    def __init__(self, package_dir: Path):
        self.root = Path(package_dir)
        self.package = self.root.name
        self.listing = library_modules(self.root)
        # by name; a module file wins over a folder of the same name without __init__ (as in Python)
        self.modules = {m.name: m for m in sorted(self.listing, key=lambda m: not m.is_package)}

    def _init_of(self, name: str) -> Path | None:
        init = self.root.joinpath(*name.split(".")[1:], "__init__.py")
        return init if init.is_file() else None

    def known(self, dotted: str) -> str | None:
        """The longest prefix of ``dotted`` that is a module of the library."""
        parts = dotted.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in self.modules:
                return ".".join(parts[:end])
        return None

    def defining(self, module: str, name: str, depth: int = 0) -> str | None:
        """The module that ``from <module> import <name>`` takes ``name`` from: ``module.name``
        when that is a module, else the module a package's ``__init__`` re-exports it from."""
        if f"{module}.{name}" in self.modules:
            return f"{module}.{name}"
        init = self._init_of(module)
        if init is not None and depth < 8:
            for node in ast.walk(ast.parse(init.read_text())):
                if not isinstance(node, ast.ImportFrom):
                    continue
                for alias in node.names:
                    if (alias.asname or alias.name) != name or alias.name == "*":
                        continue
                    if node.level:
                        base = module.split(".")[: len(module.split(".")) - node.level + 1]
                        source = ".".join(base + ([node.module] if node.module else []))
                    else:
                        source = node.module or ""
                    if source == self.package or source.startswith(self.package + "."):
                        return self.defining(source, alias.name, depth + 1)
        return self.known(module)

    def of_code(self, code: str) -> set[str]:
        tree = ast.parse(code)
        used: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == self.package]
                used |= {self.known(n) for n in names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == self.package:
                used |= {self.defining(node.module, a.name) if a.name != "*" else self.known(node.module)
                         for a in node.names}
        return {name for name in used if name}

    def of_notebook(self, notebook: Path) -> set[str]:
        cells = json.loads(Path(notebook).read_text()).get("cells", [])
        used: set[str] = set()
        for i, cell in enumerate(cells):
            if cell.get("cell_type") != "code":
                continue
            source = cell.get("source", "")
            source = "".join(source) if isinstance(source, list) else source
            # IPython's own syntax (%magic, !shell) is no Python: those lines import nothing
            code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line
                             for line in source.splitlines())
            try:
                used |= self.of_code(code)
            except SyntaxError as err:
                raise ValueError(f"{notebook}: code cell {i} is not Python ({err.msg}, line {err.lineno})") from err
        return used


def notebook_imports(notebook: str | Path, package_dir: str | Path = PACKAGE_DIR) -> set[str]:
    """The library's modules (dotted names) that a notebook's code cells import."""
    return _Imports(Path(package_dir)).of_notebook(Path(notebook))


def _chapter_label(notebook: Path, link: bool, short: bool = False) -> str:
    """A chapter as the page names it: its file name, or (``short``) its number."""
    name = notebook.stem
    number = re.match(r"ch(\d+)", name)
    text = str(int(number[1])) if short and number else name
    return f"{{doc}}`{text} <{name}>`" if link else text


def library_markdown(package_dir: str | Path, notebooks: Sequence[str | Path], *, link: bool = False) -> str:
    """The "The library" page (MyST markdown): the layout of the package at ``package_dir`` with
    each module's summary, length and the chapters that import it, then each chapter's modules.

    ``notebooks`` are the chapters, in reading order. With ``link``, chapters are ``{doc}``
    links by file name: the page must sit in the same folder as the notebooks.
    """
    imports = _Imports(Path(package_dir))
    notebooks = [Path(n) for n in notebooks]
    used = {nb: imports.of_notebook(nb) for nb in notebooks}
    lines = [
        "# The library",
        "",
        f"The code the chapters call lives in the Python package `{imports.package}`. This page is "
        "written by the build from the code itself, as the run report is, so it cannot fall out of "
        "date: every package and module with the first sentence of its docstring and its length in "
        "lines (a package's count covers all its files), and the chapters that import it, read from "
        "their code cells.",
        "",
        "## Layout",
        "",
        "| module | lines | what it holds | chapters |",
        "|---|---:|---|---|",
    ]
    for module in imports.listing:
        users = [_chapter_label(nb, link, short=True) for nb in notebooks if module.name in used[nb]]
        chapters = "every chapter" if len(users) == len(notebooks) > 1 else ", ".join(users) or "-"
        lines.append(f"| {_tree_cell(module)} | {module.lines} | {_cell(module.summary)} | {chapters} |")
    lines += [
        "",
        "## What each chapter imports",
        "",
        "| chapter | modules |",
        "|---|---|",
    ]
    order = [m.name for m in imports.listing]
    for nb in notebooks:
        names = sorted(used[nb], key=order.index)
        lines.append(f"| {_chapter_label(nb, link)} | "
                     f"{', '.join(f'`{imports.modules[n].label}`' for n in names) or '-'} |")
    lines.append("")
    return "\n".join(lines)


def _tree_cell(module: Module) -> str:
    """A module in the layout's tree: its file or folder name, indented by its depth."""
    depth = module.name.count(".")                  # 0: the package itself
    name = module.name.rsplit(".", 1)[-1] + ("/" if module.is_package else ".py")
    return INDENT * depth + f"`{name}`"


def _cell(text: str) -> str:
    """A docstring's text for a markdown table cell: reST's ``code`` and :role:`name` as code
    spans, pipes escaped, "-" for nothing."""
    text = re.sub(r":[\w:]+:`(~?)([^`]+)`", lambda m: f"`{m[2].split('.')[-1] if m[1] else m[2]}`", text)
    text = text.replace("``", "`")
    return text.replace("|", "\\|") or "-"
