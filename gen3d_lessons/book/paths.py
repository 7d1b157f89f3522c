"""Where things are: the book's folders, the environment variables, the toc and its chapters.

Every chapter is a notebook listed in ``_toc.yml``; :func:`chapters` reads them in reading order.
Nothing here imports torch or the rest of the library.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

PROFILES = ("smoke", "cpu", "gpu")

RESULTS_ENV = "GEN3D_RESULTS_DIR"
DATA_ENV = "GEN3D_DATA"     # read by gen3d_lessons.data.data_root()
BUILD_ENV = "GEN3D_BUILD_DIR"   # where runs and builds write (default <root>/_build); must end in _build
PROFILE_ENV = "GEN3D_PROFILE"
CHAPTER_ENV = "GEN3D_CHAPTER"
STATIC_ENV = "GEN3D_STATIC"

# Pages the build writes into the staged sources: they are in the toc but have no source file.
REPORT_DOCNAME = "book/report"      # the run report (report.report_markdown)
LIBRARY_DOCNAME = "book/library"    # the library's layout and which chapter uses what (library.library_markdown)
GENERATED_DOCNAMES = (REPORT_DOCNAME, LIBRARY_DOCNAME)


def find_root(start: str | Path | None = None) -> Path:
    """The book's root: the folder holding ``_toc.yml``.

    The repository this package was installed from (an editable install) wins; otherwise the
    nearest folder at or above ``start`` (default: the working directory) that has a toc.
    """
    package_parent = Path(__file__).resolve().parents[2]
    if (package_parent / "_toc.yml").is_file():
        return package_parent
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file():
            return folder
    return here


@dataclass(frozen=True)
class BookPaths:
    """Every path the pipeline reads or writes. Sources under ``root``; what a run writes
    under ``build_dir`` (default ``root/_build``); datasets under ``data_dir`` (default
    ``$GEN3D_DATA`` or ``root/data``)."""

    root: Path
    build_dir: Path | None = None
    data_dir: Path | None = None

    @classmethod
    def at(cls, root: str | Path | None = None) -> "BookPaths":
        return cls(Path(root).resolve() if root else find_root())

    @property
    def toc(self) -> Path:
        return self.root / "_toc.yml"

    @property
    def config(self) -> Path:
        return self.root / "_config.yml"

    @property
    def build(self) -> Path:
        if self.build_dir:
            return Path(self.build_dir)
        return Path(os.environ.get(BUILD_ENV) or self.root / "_build")

    @property
    def executed(self) -> Path:
        return self.build / "executed"

    @property
    def results(self) -> Path:
        return self.build / "results"

    @property
    def stage(self) -> Path:
        return self.build / "src"

    @property
    def html(self) -> Path:
        return self.build / "html"

    @property
    def report_json(self) -> Path:
        return self.build / "report.json"

    @property
    def screenshots(self) -> Path:
        return self.build / "screenshots"

    @property
    def data(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir)
        return Path(os.environ.get(DATA_ENV) or self.root / "data")


# ---------------------------------------------------------------------------------------------
# The table of contents
# ---------------------------------------------------------------------------------------------

def toc_docnames(toc: str | Path) -> list[str]:
    """Every ``file:`` of a jupyter-book ``_toc.yml``, in reading order (root first)."""
    import yaml

    data = yaml.safe_load(Path(toc).read_text()) or {}
    names: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node:
                names.append(_strip_suffix(str(node["file"])))
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    if "root" in data:
        names.append(_strip_suffix(str(data["root"])))
    walk({k: v for k, v in data.items() if k in ("parts", "chapters", "sections")})
    return names


def _strip_suffix(name: str) -> str:
    for suffix in (".ipynb", ".md", ".rst"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class Chapter:
    """A notebook of the toc. ``number`` comes from its name (``ch01_...`` → 1)."""

    number: int
    name: str       # file name without suffix: "ch01_volumes"
    docname: str    # as in the toc: "book/ch01_volumes"
    path: Path      # the source notebook

    @property
    def title(self) -> str:
        return notebook_title(self.path) or self.name


def chapters(paths: BookPaths, *, missing_ok: bool = False) -> list[Chapter]:
    """The toc's notebooks, in order.

    An entry with neither a ``.md`` nor an ``.ipynb`` file is taken to be a chapter that is not
    written yet: it raises ``FileNotFoundError`` unless ``missing_ok``, in which case it is
    returned with a path that does not exist. Generated pages (the run report, the library) are
    skipped.
    """
    found: list[Chapter] = []
    position = 0
    for docname in toc_docnames(paths.toc):
        if docname in GENERATED_DOCNAMES:      # written at build time
            continue
        source = paths.root / docname
        if source.with_suffix(".md").is_file() or source.with_suffix(".rst").is_file():
            continue
        notebook = source.with_suffix(".ipynb")
        if not notebook.is_file() and not missing_ok:
            raise FileNotFoundError(f"{paths.toc} lists {docname!r} but {notebook} does not exist")
        position += 1
        name = notebook.stem
        match = re.match(r"(?:ch|chapter)?_?(\d+)", name)
        found.append(Chapter(int(match.group(1)) if match else position, name, docname, notebook))
    return found


def find_chapter(key: str | int, available: Sequence[Chapter]) -> Chapter:
    """A chapter by number (``1``, ``"01"``) or name (``ch01_volumes``, ``book/ch01_volumes``)."""
    text = str(key).strip()
    for chapter in available:
        if text.isdigit() and int(text) == chapter.number:
            return chapter
        if _strip_suffix(text) in (chapter.name, chapter.docname) or text == str(chapter.path):
            return chapter
    known = ", ".join(f"{c.number} ({c.name})" for c in available) or "none"
    raise KeyError(f"no chapter {key!r} in the toc; chapters: {known}")


def find_chapters(key: str | int, available: Sequence[Chapter]) -> list[Chapter]:
    """Every page of a chapter by number (chapter 7 has several: a toc entry and its sections), in
    reading order; a name gives its one page (:func:`find_chapter`)."""
    text = str(key).strip()
    pages = [c for c in available if text.isdigit() and int(text) == c.number]
    return pages or [find_chapter(key, available)]


def notebook_title(path: Path) -> str | None:
    """The first markdown heading of a notebook."""
    try:
        cells = json.loads(Path(path).read_text()).get("cells", [])
    except (OSError, ValueError):
        return None
    for cell in cells:
        if cell.get("cell_type") == "markdown":
            source = "".join(cell.get("source", []))
            for line in source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return None
