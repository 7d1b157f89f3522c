"""The book pipeline: recording results, the toc, the report, staging, the CLI, and one small
book built end to end from two throw-away notebooks."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

from gen3d_lessons import book, cli
from gen3d_lessons.profiles import MAX_STEPS_ENV

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# record()
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv(book.RESULTS_ENV, str(tmp_path))
    monkeypatch.delenv(book.CHAPTER_ENV, raising=False)
    monkeypatch.delenv(book.PROFILE_ENV, raising=False)
    return tmp_path


def _read(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.json").read_text())


def test_record_passes_and_writes_json(results, monkeypatch):
    monkeypatch.setenv(book.PROFILE_ENV, "cpu")
    table = book.record("ch10_segmentation",
                        dict(metric="dice", value=0.84, gate=0.7, goal=0.85, higher_is_better=True),
                        metrics={"hd95": 3.5})
    saved = _read(results, "ch10_segmentation")
    assert saved["passed"] is True and saved["profile"] == "cpu"
    assert saved["gate"] == 0.7 and saved["goal"] == 0.85 and saved["goal_met"] is False
    assert saved["metrics"] == {"hd95": 3.5}
    assert list(table.index) == ["dice", "hd95"]
    assert table.loc["dice", "gate passed"] == "pass" and table.loc["dice", "goal met"] == "not met"


def test_record_raises_on_a_missed_gate_after_writing(results, monkeypatch):
    monkeypatch.setenv(book.PROFILE_ENV, "cpu")
    with pytest.raises(AssertionError, match=r"rmse = 0\.3 misses the cpu gate \(<= 0\.1\)"):
        book.record("ch11", dict(metric="rmse", value=0.3, gate=0.1, goal=0.05, higher_is_better=False))
    assert _read(results, "ch11")["passed"] is False


def test_a_missed_goal_is_reported_not_failed(results, monkeypatch):
    monkeypatch.setenv(book.PROFILE_ENV, "cpu")
    book.record("ch13", dict(metric="dice", value=0.76, gate=0.7, goal=0.8),
                checks=[dict(metric="folding %", value=0.2, gate=1.0, goal=1.0, higher_is_better=False),
                        dict(metric="speed-up", value=3.8, goal=20.0),
                        dict(metric="beats affine", value=True, gate=True, goal=True)])
    saved = _read(results, "ch13")
    assert saved["passed"] is True and saved["goal_met"] == [False, True, False, True]
    assert [c["passed"] for c in saved["checks"]] == [True, True, None, True]
    assert book.goal_text(saved["goal_met"]) == "2 of 4 met"


def test_every_missed_gate_is_named(results, monkeypatch):
    monkeypatch.setenv(book.PROFILE_ENV, "cpu")
    with pytest.raises(AssertionError, match=r"a = 1 misses .*; c = no misses the cpu gate \(yes\)"):
        book.record("ch03", dict(metric="a", value=1, gate=2, goal=3),
                    checks=[dict(metric="b", value=5, gate=2), dict(metric="c", value=False, gate=True, goal=True)])


def test_a_gate_stricter_than_its_goal_is_refused(results, monkeypatch):
    monkeypatch.setenv(book.PROFILE_ENV, "cpu")
    with pytest.raises(ValueError, match="stricter than the goal"):
        book.record("ch04", dict(metric="ssim gain", value=0.1, gate=0.01, goal=0.0))
    with pytest.raises(ValueError, match=r"checks\[0\] \(y\): the gate 0.6 is stricter"):
        book.record("ch05", dict(metric="x", value=0.1, gate=0.4, goal=0.5),
                    checks=[dict(metric="y", value=1, gate=0.6, goal=0.5)])


def test_record_checks_nothing_in_smoke_nor_in_a_dry_run(results, monkeypatch):
    monkeypatch.setenv(book.PROFILE_ENV, "smoke")
    book.record("ch03", dict(metric="mmd", value=9.0, gate=0.1, goal=0.1, higher_is_better=False))
    saved = _read(results, "ch03")
    assert saved["passed"] is None and saved["goal_met"] is None
    monkeypatch.setenv(book.PROFILE_ENV, "gpu")
    monkeypatch.setenv(MAX_STEPS_ENV, "2")
    book.record("ch03", dict(metric="mmd", value=9.0, gate=0.1, goal=0.1, higher_is_better=False))
    saved = _read(results, "ch03")
    assert saved["passed"] is None and saved["goal_met"] is None and saved["dry_run"] == 2


def test_record_takes_the_profile_from_run_and_per_profile_gates(results):
    @dataclass
    class Run:
        profile: str
        seed: int = 0

    np = pytest.importorskip("numpy")
    headline = dict(metric="psnr", value=np.float32(25.0), gate={"cpu": 24.0, "gpu": 30.0}, goal=30.0)
    book.record("ch09", headline, run=Run("cpu"))
    assert _read(results, "ch09")["gate"] == 24.0
    assert _read(results, "ch09")["run"] == {"profile": "cpu", "seed": 0}
    with pytest.raises(AssertionError):
        book.record("ch09", headline, run=Run("gpu"))


def test_record_without_headline_and_with_chapter_env(results, monkeypatch):
    monkeypatch.setenv(book.CHAPTER_ENV, "ch02_taxonomy")
    book.record("2", None, metrics={"chapters": 17})
    saved = _read(results, "ch02_taxonomy")
    assert saved["metric"] is None and saved["passed"] is None and saved["label"] == "2"


def test_record_rejects_a_malformed_headline(results):
    with pytest.raises(ValueError):
        book.record("ch01", dict(name="dice", value=1.0))
    with pytest.raises(ValueError, match="'threshold' is now 'gate'"):
        book.record("ch01", dict(metric="dice", value=1.0, threshold=0.5))


def test_passes_handles_nan_and_direction():
    assert book.passes(1.0, 0.5) and not book.passes(0.4, 0.5)
    assert book.passes(0.1, 0.5, higher_is_better=False)
    assert not book.passes(float("nan"), 0.5) and not book.passes(None, 0.5)


# ---------------------------------------------------------------------------------------------
# The toc and the chapters
# ---------------------------------------------------------------------------------------------

def _notebook(path: Path, body: list[str], title: str = "A chapter") -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}

    def code(source: str, *tags: str):
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = list(tags)
        return cell

    nb.cells = [
        code('import sys\nif "google.colab" in sys.modules:\n    pass', "remove-cell"),
        code("profile = None", "parameters"),
        nbformat.v4.new_markdown_cell(f"# {title}\n\nSome maths: $x^2$."),
        *[code(source) for source in body[:-1]],
        code(body[-1], "results"),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return path


def _toc(root: Path, files: list[str]) -> None:
    lines = ["format: jb-book", "root: book/intro", "parts:", "  - caption: Foundations",
             "    chapters:"] + [f"      - file: {f}" for f in files]
    lines += ["  - caption: Appendices", "    chapters:", "      - file: book/library",
              "      - file: book/report", "      - file: book/bibliography"]
    (root / "_toc.yml").write_text("\n".join(lines) + "\n")


@pytest.fixture
def tiny_book(tmp_path):
    """A book folder with the repository's config, intro and static files, and two chapters:
    one that passes its threshold and one that misses it."""
    root = tmp_path / "tinybook"
    (root / "book").mkdir(parents=True)
    shutil.copy2(REPO / "_config.yml", root / "_config.yml")
    shutil.copytree(REPO / "book" / "_static", root / "book" / "_static",
                    ignore=shutil.ignore_patterns("mathjax"))
    (root / "book" / "intro.md").write_text("# Tiny\n\nStart with {doc}`ch01_first`.\n")
    (root / "book" / "bibliography.md").write_text("# Bibliography\n\n```{bibliography}\n:all:\n```\n")
    record = "from gen3d_lessons.book import record\nrecord('{name}', dict(metric='score', " \
             "value=value, gate=0.5, goal=0.5))"
    _notebook(root / "book" / "ch01_first.ipynb",
              ["value = 0.9\nprint('profile', profile)", record.format(name="ch01_first")],
              title="First")
    _notebook(root / "book" / "ch02_second.ipynb",
              ["value = 0.1", record.format(name="ch02_second")], title="Second")
    _toc(root, ["book/ch01_first", "book/ch02_second"])
    return book.BookPaths(root)


def test_toc_and_chapters(tiny_book):
    assert book.toc_docnames(tiny_book.toc) == [
        "book/intro", "book/ch01_first", "book/ch02_second", "book/library", "book/report",
        "book/bibliography"]
    found = book.chapters(tiny_book)
    assert [(c.number, c.name, c.title) for c in found] == [(1, "ch01_first", "First"),
                                                          (2, "ch02_second", "Second")]
    assert book.find_chapter(2, found).name == "ch02_second"
    assert book.find_chapter("ch01_first", found).number == 1
    assert book.find_chapter("book/ch02_second.ipynb", found).number == 2
    with pytest.raises(KeyError):
        book.find_chapter(7, found)
    pages = found + [book.Chapter(2, "ch02_more", "book/ch02_more", found[1].path)]   # a chapter of two pages
    assert [c.name for c in book.find_chapters(2, pages)] == ["ch02_second", "ch02_more"]
    assert [c.name for c in book.find_chapters("ch02_more", pages)] == ["ch02_more"]
    with pytest.raises(KeyError):
        book.find_chapters(7, pages)


def test_a_missing_chapter_is_reported(tiny_book):
    _toc(tiny_book.root, ["book/ch01_first", "book/ch05_later"])
    with pytest.raises(FileNotFoundError):
        book.chapters(tiny_book)
    assert [c.name for c in book.chapters(tiny_book, missing_ok=True)] == ["ch01_first",
                                                                            "ch05_later"]


def test_repository_toc_lists_the_generated_and_existing_pages():
    names = book.toc_docnames(REPO / "_toc.yml")
    assert names[0] == "book/intro" and set(book.GENERATED_DOCNAMES) <= set(names)
    assert names.index(book.LIBRARY_DOCNAME) > max(names.index(c.docname) for c in book.chapters(book.BookPaths(REPO)))
    for name in names:
        if name not in book.GENERATED_DOCNAMES and "/ch" not in name:
            assert (REPO / f"{name}.md").is_file(), name


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

def _rows() -> list[book.ChapterRun]:
    return [
        book.ChapterRun("ch01_first", 1, "First", "book/ch01_first", "cpu", 12.3, "pass",
                        "dice", 0.84, 0.7, goal=0.85, goal_met=False),
        book.ChapterRun("ch02_second", 2, "Second", "book/ch02_second", "cpu", 4.0, "fail",
                        "rmse", 0.3, 0.1, False, "AssertionError: rmse misses", goal=0.1,
                        goal_met=[False, True]),
        book.ChapterRun("ch03_third", 3, "Third", "book/ch03_third", "-"),
    ]


def test_report_table_and_page():
    report = book.make_report(_rows(), profile="cpu", build_seconds=20.0, build_ok=True)
    text = book.format_report(report)
    assert text.splitlines()[0].split() == " ".join(book.REPORT_COLUMNS).split()
    assert "ch01_first" in text and ">= 0.7" in text and "<= 0.1" in text and ">= 0.85" in text
    assert "not met" in text and "1 of 2 met" in text
    assert "FAIL" in text and "not run" in text and "site build: 20.0 s" in text
    page = book.report_markdown(report, {"book/ch01_first"})
    assert page.startswith("# Run report")
    assert "{doc}`ch01_first <ch01_first>`" in page and "{doc}`ch03_third" not in page
    assert "## Failures" in page and "rmse misses" in page
    again = book.rows_of(json.loads(json.dumps(report)))
    assert again == _rows()


def test_merge_rows_keeps_earlier_results(tiny_book):
    old = _rows()[:2]
    fresh = [book.ChapterRun("ch02_second", 2, "Second", "book/ch02_second", "cpu", 1.0, "pass")]
    merged = book.merge_rows(fresh, old, book.chapters(tiny_book))
    assert [r.status for r in merged] == ["pass", "pass"] and merged[1].seconds == 1.0


# ---------------------------------------------------------------------------------------------
# Staging and the static checks of the site
# ---------------------------------------------------------------------------------------------

def test_prepare_notebook_orders_hides_and_drops_cdn_links(tmp_path):
    nb = nbformat.v4.new_notebook()
    setup = nbformat.v4.new_code_cell("setup")
    setup.metadata["tags"] = ["remove-cell"]
    params = nbformat.v4.new_code_cell("profile = None")
    params.metadata["tags"] = ["parameters"]
    injected = nbformat.v4.new_code_cell('profile = "cpu"')
    injected.metadata["tags"] = ["injected-parameters"]
    title = nbformat.v4.new_markdown_cell("# Title")
    anim = nbformat.v4.new_code_cell("HTML(anim.to_jshtml())")
    anim.outputs = [nbformat.v4.new_output("display_data", data={"text/html": (
        '<link rel="stylesheet" href="https://maxcdn.bootstrapcdn.com/font-awesome/4.4.0/'
        'css/font-awesome.min.css">\n<div class="animation"></div>')})]
    nb.cells = [setup, params, injected, title, anim]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    source, target = tmp_path / "in.ipynb", tmp_path / "out" / "out.ipynb"
    nbformat.write(nb, str(source))
    book.prepare_notebook(source, target)
    out = nbformat.read(str(target), as_version=4)
    assert [c.source for c in out.cells] == ["setup", "profile = None", "# Title",
                                             'profile = "cpu"', "HTML(anim.to_jshtml())"]
    assert "remove-cell" in out.cells[1].metadata["tags"]
    html = out.cells[4].outputs[0]["data"]["text/html"]
    assert "bootstrapcdn" not in html and '<div class="animation">' in html
    assert "widgets" not in out.metadata


def test_broken_links_and_offsite_assets(tmp_path):
    (tmp_path / "book").mkdir()
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "a.css").write_text("")
    (tmp_path / "book" / "page.html").write_text(
        '<link rel="stylesheet" href="../_static/a.css">'
        '<a href="other.html#x">ok?</a> <a href="https://example.org">external</a>'
        '<img src="data:image/png;base64,AAAA"> <a href="#top">top</a>'
        '<script src="https://cdn.example.org/x.js"></script>'
        '<link rel="canonical" href="https://gen3d.example.org/book/page.html">')
    assert book.broken_links(tmp_path) == ["book/page.html -> other.html#x"]
    offsite = book.offsite_assets(tmp_path)
    assert len(offsite) == 1 and "cdn.example.org" in offsite[0]
    (tmp_path / "book" / "other.html").write_text("")
    assert book.broken_links(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# The library page
# ---------------------------------------------------------------------------------------------

PACKAGE = REPO / "gen3d_lessons"


def _code_notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter\n\nfrom gen3d_lessons.viz import nothing")]
    nb.cells += [nbformat.v4.new_code_cell(source) for source in cells]
    nbformat.write(nb, str(path))
    return path


def _layout_rows(page: str) -> list[list[str]]:
    """The cells of the page's layout table, the tree's indentation as two spaces per level."""
    table = page.split("## Layout")[1].split("##")[0]
    rows = [line.strip("|").split(" | ") for line in table.splitlines() if line.startswith("| ")][1:]
    return [[row[0].strip().replace(book.library.INDENT, "  ").replace("`", ""), *[c.strip() for c in row[1:]]]
            for row in rows]


def test_library_page_lists_every_module_and_package():
    chapter_notebooks = [c.path for c in book.chapters(book.BookPaths(REPO))]
    page = book.library_markdown(PACKAGE, chapter_notebooks)
    assert page.startswith("# The library\n")
    files = [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    folders = {p.parent for p in files}
    expected = {str(p.relative_to(PACKAGE)) for p in files if p.name != "__init__.py"}
    expected |= {f"{f.relative_to(PACKAGE)}/" for f in folders if f != PACKAGE}
    modules = book.library_modules(PACKAGE)
    assert {m.label for m in modules} == expected | {"gen3d_lessons/"}
    assert modules[0].label == "gen3d_lessons/"
    assert modules[0].lines == sum(len(p.read_text().splitlines()) for p in files)
    # the page's tree: one row per module, in the same order, indented by depth
    rows = _layout_rows(page)
    assert [row[0] for row in rows] == ["  " * m.name.count(".") + m.label.rstrip("/").rsplit("/", 1)[-1]
                                        + ("/" if m.is_package else "") for m in modules]
    assert ["  tasks/", "    segment.py"] == [r[0] for r in rows if r[0].strip() in ("tasks/", "segment.py")]
    assert any(row[3] == "every chapter" for row in rows)        # profiles.setup, record


def test_library_page_knows_which_chapter_uses_which_module():
    ch10 = REPO / "book" / "ch10_segmentation.ipynb"
    used = book.notebook_imports(ch10, PACKAGE)
    assert "gen3d_lessons.tasks.segment" in used and "gen3d_lessons.models.unet" in used
    assert "gen3d_lessons.book.results" in used            # `from gen3d_lessons.book import record`
    page = book.library_markdown(PACKAGE, [ch10], link=True)
    chapter_row = next(line for line in page.splitlines() if line.startswith("| {doc}`ch10_segmentation"))
    assert "`tasks/segment.py`" in chapter_row and "`viz.py`" in chapter_row
    tasks = [row for row in _layout_rows(page) if row[0].strip() in ("tasks/", "segment.py")]
    assert tasks[1][3] == "{doc}`10 <ch10_segmentation>`"


def test_library_resolves_each_form_of_import(tmp_path):
    notebook = _code_notebook(
        tmp_path / "ch07_forms.ipynb",
        "%matplotlib inline\nimport gen3d_lessons.spatial as sp\n!echo hi",
        "from gen3d_lessons.tasks import yardstick as Y\nfrom gen3d_lessons.training import fit, save_model",
        "def f():\n    from gen3d_lessons.data import ensure_dataset\n    import numpy",
    )
    assert book.notebook_imports(notebook, PACKAGE) == {
        "gen3d_lessons.spatial", "gen3d_lessons.tasks.yardstick", "gen3d_lessons.training.fit",
        "gen3d_lessons.data"}
    broken = _code_notebook(tmp_path / "ch08_broken.ipynb", "from gen3d_lessons import (")
    with pytest.raises(ValueError, match="ch08_broken.ipynb: code cell 1"):
        book.notebook_imports(broken, PACKAGE)


def test_a_module_added_later_shows_up(tmp_path):
    package = tmp_path / "gen3d_lessons"
    shutil.copytree(PACKAGE, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "tasks" / "upscale.py").write_text(
        '"""Super-resolution of a volume, e.g. from 2 mm to 1 mm. Not yet in the book."""\n\n\n'
        "def upscale(x):\n    return x\n")
    notebook = _code_notebook(tmp_path / "ch09_later.ipynb",
                              "from gen3d_lessons.tasks.upscale import upscale")
    page = book.library_markdown(package, [notebook])
    assert ["    upscale.py", "5", "Super-resolution of a volume, e.g. from 2 mm to 1 mm.", "9"] \
        in _layout_rows(page)
    assert "| ch09_later | `tasks/upscale.py` |" in page.splitlines()


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------

def test_cli_chapters_and_report(tiny_book, capsys):
    assert cli.main(["--root", str(tiny_book.root), "chapters"]) == 0
    assert "ch02_second" in capsys.readouterr().out
    assert cli.main(["--root", str(tiny_book.root), "report"]) == 1     # no report yet
    book.save_report(book.make_report(_rows()[:1]), tiny_book)
    assert cli.main(["--root", str(tiny_book.root), "report"]) == 0
    assert "ch01_first" in capsys.readouterr().out
    assert cli.main(["--root", str(tiny_book.root), "run", "9", "--profile", "smoke"]) == 2
    assert cli.main(["--root", str(tiny_book.root), "run", "1", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "ch01_first" in out and "executed notebook:" in out


def test_cli_data_writes_through_a_partial_folder(tmp_path, monkeypatch, capsys):
    calls = []

    def make_brain_dataset(out, n, size, seed, progress=True):
        calls.append((Path(out).name.split("-")[0], n, size, seed))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "dataset.json").write_text(json.dumps({"numTraining": n - 1, "numTest": 1}))
        (Path(out) / "manifest.csv").write_text("id,split\n")

    fake = types.ModuleType("gen3d_lessons.data.brain")
    fake.make_brain_dataset = make_brain_dataset
    monkeypatch.setitem(sys.modules, "gen3d_lessons.data.brain", fake)
    out = tmp_path / "brain"
    args = ["data", "brain", "--out", str(out), "--n", "3", "--size", "16"]
    assert cli.main(args) == 0
    assert calls == [(".brain.partial", 3, 16, 0)] and (out / "dataset.json").is_file()
    assert cli.main(args) == 0 and len(calls) == 1            # present: skipped
    assert cli.main(args + ["--force"]) == 0 and len(calls) == 2
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


# ---------------------------------------------------------------------------------------------
# One small book, end to end: run, report, stage, build, check
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("npm") is None and not os.environ.get("GEN3D_MATHJAX_DIR"),
                    reason="the site build fetches MathJax with npm")
def test_build_book_end_to_end(tiny_book, capsys):
    status = book.build_book(tiny_book, profile="cpu")
    out = capsys.readouterr().out
    assert status == 1, "a chapter that misses its gate fails the build"
    report = book.load_report(tiny_book)
    assert [r["status"] for r in report["chapters"]] == ["pass", "fail"]
    assert report["build_ok"] is True, out
    assert all(r["seconds"] > 0 for r in report["chapters"])
    assert "misses the cpu gate" in report["chapters"][1]["error"]

    html = tiny_book.html
    for page in ("index", "book/intro", "book/ch01_first", "book/ch02_second", "book/library",
                 "book/report", "book/bibliography"):
        assert (html / f"{page}.html").is_file(), page
    assert (html / "_static" / "mathjax" / "tex-mml-chtml.js").is_file()
    first = (html / "book" / "ch01_first.html").read_text()
    assert "profile cpu" in first                       # the executed outputs are on the page
    assert ("colab.research.google.com/github/gen3d-book/gen3d/blob/main/book/ch01_first.ipynb"
            in first)
    assert "FAIL" in (html / "book" / "report.html").read_text()
    library = (html / "book" / "library.html").read_text()
    assert "book/results.py" in library and 'href="ch02_second.html"' in library
    assert book.broken_links(html) == [] and book.offsite_assets(html) == []
    # rebuilding the site alone keeps the last results
    assert book.build_book(tiny_book, run=False) == 0
    assert [r["status"] for r in book.load_report(tiny_book)["chapters"]] == ["pass", "fail"]
    # the sources were not touched: still no outputs
    source = nbformat.read(str(tiny_book.root / "book" / "ch01_first.ipynb"), as_version=4)
    assert not any(c.get("outputs") for c in source.cells if c.cell_type == "code")


def test_concurrent_requests_make_a_dataset_once(tmp_path, monkeypatch):
    """Two chapters asking for the same cohort at once: one generates it, the other waits and reuses it."""
    import threading
    import time as _time

    from gen3d_lessons import data

    calls = []

    def make_brain_dataset(out, n, size, seed, progress=True):
        calls.append(Path(out).name)
        _time.sleep(0.3)                                 # long enough for the second request to arrive
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "dataset.json").write_text(json.dumps({"numTraining": n, "numTest": 0}))
        (Path(out) / "manifest.csv").write_text("id,split\n")

    fake = types.ModuleType("gen3d_lessons.data.brain")
    fake.make_brain_dataset = make_brain_dataset
    monkeypatch.setitem(sys.modules, "gen3d_lessons.data.brain", fake)
    monkeypatch.setenv("GEN3D_DATA", str(tmp_path))
    found = []
    threads = [threading.Thread(target=lambda: found.append(data.ensure_dataset("brain", n=2, size=16)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(found)) == 1 and (found[0] / "dataset.json").is_file()


def test_progress_bar_redraws_become_one_line_on_the_page():
    """Each redraw of a text progress bar is its own output; the page shows the final line once."""
    import nbformat

    out = [nbformat.v4.new_output("stream", name="stdout", text=t) for t in ("\rfit 0%", "\rfit 50%", "\rfit 100%\n")]
    out += [nbformat.v4.new_output("stream", name="stdout", text="fit: 10 steps\n"),
            nbformat.v4.new_output("stream", name="stderr", text="a warning\n"),
            nbformat.v4.new_output("stream", name="stdout", text="x\ry\n")]
    merged = book.coalesce_streams(out)
    assert [(o["name"], o["text"]) for o in merged] == [("stdout", "fit 100%\nfit: 10 steps\n"),
                                                        ("stderr", "a warning\n"), ("stdout", "y\n")]
