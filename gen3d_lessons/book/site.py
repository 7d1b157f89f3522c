"""Staging the sources and building the site.

:func:`stage` writes ``_build/src``: the config, the toc and ``book/`` with the executed copies in
place of the sources (which stay output-free in git), the generated pages (the run report, the
library) and MathJax. :func:`build_html` runs ``jupyter-book build`` on it without executing
anything, and checks the site: no fatal Sphinx warning, no broken link, nothing loaded from
another machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterator

from .library import PACKAGE_DIR, library_markdown
from .paths import LIBRARY_DOCNAME, REPORT_DOCNAME, BookPaths, chapters, toc_docnames
from .report import make_report, report_markdown

MATHJAX_VERSION = "3.2.2"
# What the site needs from the MathJax package (the combined component loads the rest lazily).
MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output", "ui", "a11y", "adaptors", "sre")

# Sphinx warnings that mean a broken book (a link, a reference or a toc entry that leads nowhere).
FATAL_WARNINGS = re.compile(
    r"undefined label|unknown document|nonexisting document|isn't included in any toctree"
    r"|not found in the toc|\[toc\.|\[ref\.|\[myst\.xref_missing\]|xref_missing"
    r"|could not find bibtex key|citation not found|Unknown target name|\[bibtex\."
    r"|\[mystnb\.glue\]"          # a glued number that is missing or glued twice: the prose would lie
)



def mathjax_source(log: Callable[[str], None] = print) -> Path:
    """A local MathJax 3 ``es5`` folder: ``$GEN3D_MATHJAX_DIR``, or npm's package, cached.

    The cache is ``$XDG_CACHE_HOME/gen3d`` (``~/.cache/gen3d``), filled once with
    ``npm install mathjax@3``. The site then needs no CDN for its maths.
    """
    env = os.environ.get("GEN3D_MATHJAX_DIR")
    if env:
        folder = Path(env)
        if not (folder / "tex-mml-chtml.js").is_file():
            raise FileNotFoundError(f"GEN3D_MATHJAX_DIR={env} has no tex-mml-chtml.js")
        return folder
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gen3d"
    prefix = cache / f"mathjax-{MATHJAX_VERSION}"
    folder = prefix / "node_modules" / "mathjax" / "es5"
    if (folder / "tex-mml-chtml.js").is_file():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("the book serves MathJax itself and needs npm (Node.js) to fetch it "
                           "once; install Node.js, or set GEN3D_MATHJAX_DIR to a MathJax 3 "
                           "'es5' folder")
    log(f"fetching mathjax@{MATHJAX_VERSION} with npm into {prefix}")
    prefix.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                    "--loglevel=error", f"mathjax@{MATHJAX_VERSION}"], check=True)
    return folder


_OFFSITE_STYLESHEET = re.compile(
    r"""<link\b[^>]*\bhref\s*=\s*["'](?:https?:)?//[^"']*["'][^>]*>\s*""", re.I)


def prepare_notebook(source: Path, target: Path) -> None:
    """Copy a (possibly executed) notebook into the staged book.

    Papermill adds an ``injected-parameters`` cell after the ``parameters`` cell; the book
    shows only the injected one (it says which profile ran), so the default is hidden.
    """
    import nbformat

    nb = nbformat.read(str(source), as_version=4)
    injected = any("injected-parameters" in c.get("metadata", {}).get("tags", [])
                   for c in nb.cells)
    if injected:
        for cell in nb.cells:
            tags = cell.setdefault("metadata", {}).setdefault("tags", [])
            if "parameters" in tags and "remove-cell" not in tags:
                tags.append("remove-cell")
        # The parameters come before the chapter's title in the notebook; on the page the
        # title comes first.
        tags_of = [c.get("metadata", {}).get("tags", []) for c in nb.cells]
        at = next(i for i, t in enumerate(tags_of) if "injected-parameters" in t)
        title = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                      and re.match(r"\s*# ", "".join(c.source))), None)
        if title is not None and title > at:
            nb.cells.insert(title, nb.cells.pop(at))
    # Widget state would make MyST-NB load require.js and the widget manager from a CDN.
    nb.metadata.pop("widgets", None)
    # matplotlib's to_jshtml links Font Awesome 4 from a CDN for its buttons; the theme
    # already serves Font Awesome, so the site drops such stylesheet links.
    for cell in nb.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = output.get("data", {})
            if "text/html" in data:
                html = data["text/html"]
                text = "".join(html) if isinstance(html, list) else html
                data["text/html"] = _OFFSITE_STYLESHEET.sub("", text)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell["outputs"] = coalesce_streams(cell.get("outputs", []))
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(target))


def _settle_carriage_returns(text: str) -> str:
    """What a terminal would show: on each line, only the text after its last ``\r``."""
    lines = text.split("\n")
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)


def coalesce_streams(outputs: list) -> list:
    """Merge consecutive stdout (or stderr) outputs into one, as a terminal would show them.

    A text progress bar redraws its line with ``\r`` every few seconds, and the kernel sends
    each redraw as its own output; the page would show a box per redraw. Merged and settled,
    each bar is one line in its final state.
    """
    merged: list = []
    for output in outputs:
        if (output.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                and merged[-1].get("name") == output.get("name")):
            merged[-1]["text"] = merged[-1]["text"] + output["text"]
        else:
            merged.append(output)
    for output in merged:
        if output.get("output_type") == "stream":
            output["text"] = _settle_carriage_returns(output["text"])
    return merged


def stage(paths: BookPaths, report: dict | None, *, log: Callable[[str], None] = print) -> Path:
    """Write ``_build/src``: config, toc, ``book/`` with executed notebooks, the generated pages
    (the run report; the library, where the toc lists it), MathJax."""
    import yaml

    src = paths.stage
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(paths.root / name, src / name)

    docnames = toc_docnames(paths.toc)
    book_dirs = sorted({d.split("/")[0] for d in docnames if "/" in d})
    ignore = shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints", "mathjax", "__pycache__")
    for folder in book_dirs:
        if (paths.root / folder).is_dir():
            shutil.copytree(paths.root / folder, src / folder, ignore=ignore)

    staged: set[str] = set()
    for chapter in chapters(paths, missing_ok=True):
        executed = paths.executed / f"{chapter.docname}.ipynb"
        source = executed if executed.is_file() else chapter.path
        if not source.is_file():
            log(f"warning: {chapter.docname} is in the toc but has no notebook yet")
            continue
        if source is chapter.path:
            log(f"warning: {chapter.docname} has no executed copy; the page shows no outputs")
        prepare_notebook(source, src / f"{chapter.docname}.ipynb")
        staged.add(chapter.docname)

    report_page = src / f"{REPORT_DOCNAME}.md"
    report_page.parent.mkdir(parents=True, exist_ok=True)
    report_page.write_text(report_markdown(report or make_report([]), staged))
    if LIBRARY_DOCNAME in docnames:      # the chapters' notebooks sit beside it, as the report's do
        notebooks = [c.path for c in chapters(paths, missing_ok=True) if c.docname in staged]
        (src / f"{LIBRARY_DOCNAME}.md").write_text(library_markdown(PACKAGE_DIR, notebooks, link=True))

    config = yaml.safe_load(paths.config.read_text()) or {}
    for bib in config.get("bibtex_bibfiles") or []:
        if not (src / bib).is_file():
            log(f"warning: {bib} is missing; the bibliography is empty")
            (src / bib).parent.mkdir(parents=True, exist_ok=True)
            (src / bib).write_text("")

    static = (config.get("sphinx", {}).get("config", {}) or {}).get("html_static_path") or []
    target = src / (static[0] if static else "_static") / "mathjax"
    mathjax = mathjax_source(log)
    for part in MATHJAX_PARTS:
        item = mathjax / part
        if item.is_dir():
            shutil.copytree(item, target / part)
        elif item.is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target / part)
    return src


def _jupyter_book() -> list[str]:
    beside = Path(sys.executable).with_name("jupyter-book")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("jupyter-book")
    return [found] if found else [sys.executable, "-m", "jupyter_book.cli.main"]


def build_html(paths: BookPaths, *, log: Callable[[str], None] = print) -> tuple[bool, list[str]]:
    """``jupyter-book build`` of the staged sources into ``_build/html``.

    Returns (ok, problems): ok is False when Sphinx failed, when a warning says a link, a
    reference or a toc entry is broken, when a page links to a missing file, or when a page
    loads a script or stylesheet from another machine.
    """
    if paths.build.name != "_build":      # jupyter-book writes to <path-output>/_build/html
        raise ValueError(f"the build folder must be called _build, not {paths.build}")
    cmd = _jupyter_book() + ["build", str(paths.stage), "--path-output", str(paths.build.parent)]
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = _ANSI.sub("", proc.stdout + proc.stderr).replace(str(paths.stage) + os.sep, "")
    (paths.build / "sphinx.log").write_text(output)
    warnings = [line for line in output.splitlines() if "WARNING" in line or "ERROR" in line]
    for line in warnings:
        log("  " + line)
    problems = [line for line in warnings if FATAL_WARNINGS.search(line)]
    if proc.returncode != 0 or not (paths.html / "index.html").is_file():
        tail = "\n".join(output.splitlines()[-30:])
        problems.append(f"jupyter-book build failed (exit {proc.returncode}):\n{tail}")
    else:
        problems += [f"broken link: {p}" for p in broken_links(paths.html)]
        problems += [f"loads from another machine: {p}" for p in offsite_assets(paths.html)]
    log(f"site: {paths.html / 'index.html'} ({len(warnings)} Sphinx warnings, "
        f"{len(problems)} problems; log in {paths.build / 'sphinx.log'})")
    return not problems, problems


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REF = re.compile(r"""(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
_ASSET = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*?(?:src|href)\s*=\s*["'](https?:)?//""",
                    re.I)


def _html_pages(html: Path) -> Iterator[Path]:
    for page in sorted(html.rglob("*.html")):
        if "_static" not in page.relative_to(html).parts:
            yield page


def broken_links(html: Path) -> list[str]:
    """Relative links and sources of the site's pages that point at files that do not exist."""
    broken = []
    for page in _html_pages(html):
        for ref in _REF.findall(page.read_text(errors="replace")):
            if re.match(r"^([a-z][a-z0-9+.-]*:|//|#)", ref, re.I) or "{" in ref:
                continue
            target = ref.split("#")[0].split("?")[0]
            if not target:
                continue
            resolved = (html / target.lstrip("/")) if target.startswith("/") \
                else (page.parent / target)
            if not resolved.exists():
                broken.append(f"{page.relative_to(html)} -> {ref}")
    return broken


def offsite_assets(html: Path) -> list[str]:
    """Scripts, stylesheets, images and frames that a page would fetch from another machine."""
    found = []
    for page in _html_pages(html):
        text = page.read_text(errors="replace")
        for match in _ASSET.finditer(text):
            tag = text[match.start(): text.find(">", match.start()) + 1]
            if re.search(r"rel\s*=\s*[\"'](?:canonical|alternate)", tag, re.I):
                continue
            if re.match(r"<link", tag, re.I) and not re.search(
                    r"rel\s*=\s*[\"'](?:stylesheet|preload|modulepreload|icon)", tag, re.I):
                continue
            found.append(f"{page.relative_to(html)}: {tag[:160]}")
    return found
