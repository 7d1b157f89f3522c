"""Every chapter of ``_toc.yml`` runs top to bottom in the ``smoke`` profile.

The executed copies and results go to a temporary folder, so the book's own ``_build`` is left
alone. Run one with ``pytest tests/test_notebooks.py -k ch01``.

The **gpu dry run** (``make dryrun``: ``GEN3D_MAX_STEPS=2 pytest -m dryrun``) executes every
chapter with the ``gpu`` profile's sizes and models but two steps per training or sampling loop,
so that a shape or config error at gpu sizes fails here and not in a reader's Colab. It is
skipped unless ``GEN3D_MAX_STEPS`` is set. It runs the most recently changed pages first (by
their last commit), and with ``GEN3D_DRYRUN_DEADLINE`` (seconds since the epoch; CI sets it from
its 90 minutes) it starts no page that could not finish by then: such a page is skipped, and
says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from gen3d_lessons.profiles import MAX_STEPS_ENV
from gen3d_lessons.book import BookPaths, chapters, run_chapter

ROOT = BookPaths.at(os.environ.get("GEN3D_BOOK_ROOT"))
CHAPTERS = chapters(ROOT, missing_ok=True)


def test_toc_lists_chapters():
    assert CHAPTERS, f"{ROOT.toc} lists no notebook"


@pytest.mark.notebook
@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.name for c in CHAPTERS])
def test_chapter_runs_in_smoke_profile(chapter, tmp_path):
    assert chapter.path.is_file(), f"{ROOT.toc} lists {chapter.docname} but it does not exist"
    cells = json.loads(chapter.path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    tags = [c.get("metadata", {}).get("tags", []) for c in code]
    assert code and "remove-cell" in tags[0] and "google.colab" in "".join(code[0]["source"]), \
        "the first code cell is the Colab setup cell, tagged 'remove-cell'"
    assert any("parameters" in t for t in tags), "a cell must be tagged 'parameters'"
    assert "results" in tags[-1], "the last code cell must be tagged 'results'"
    assert not any(c.get("outputs") for c in code), "notebooks are committed without outputs"

    paths = BookPaths(ROOT.root, build_dir=tmp_path / "_build", data_dir=ROOT.data)
    row = run_chapter(chapter, "smoke", paths)
    assert row.ok, (f"{chapter.name} failed in the smoke profile: {row.error} "
                    f"(executed copy: {row.executed})")
    assert (paths.results / f"{chapter.name}.json").is_file()


REPEATED = "ch11_denoising"     # a chapter that trains (two networks) and is quick in smoke


@pytest.mark.notebook
@pytest.mark.skipif(REPEATED not in {c.name for c in CHAPTERS}, reason=f"{REPEATED} is not in the toc")
def test_a_training_chapter_run_twice_tells_the_same_story(tmp_path):
    """Steps, not clocks, and seeds: the same chapter in the same profile prints the same numbers."""
    chapter = next(c for c in CHAPTERS if c.name == REPEATED)
    results = []
    for attempt in ("first", "second"):
        paths = BookPaths(ROOT.root, build_dir=tmp_path / attempt / "_build", data_dir=ROOT.data)
        row = run_chapter(chapter, "smoke", paths)
        assert row.ok, f"{chapter.name}: {row.error}"
        results.append(json.loads((paths.results / f"{chapter.name}.json").read_text()))
    first, second = ([(c["metric"], c["value"]) for c in r["checks"]] for r in results)
    assert first and first == second, f"{chapter.name} gave different results in two runs: {first} vs {second}"


DEADLINE_ENV = "GEN3D_DRYRUN_DEADLINE"
PAGE_ALLOWANCE_S = 240      # the longest page's dry run on a slow two-core machine was 183 s


# Pages that read what a page of another chapter saves in the same run (a page of the same
# chapter always runs after the chapter's earlier pages).
NEEDS = {"ch09_counterfactual": ("ch04_autoencoders",), "ch16_trust": ("ch08_classification",)}


def last_changed(chapters: list) -> list:
    """The chapters' pages, the most recently committed chapter first (a chapter's pages in toc
    order, each after the pages it reads from, :data:`NEEDS`): with a deadline, the chapters
    changed last are the ones a dry run must not miss. Toc order where git cannot tell."""
    def stamp(chapter) -> int:
        try:
            out = subprocess.run(["git", "log", "-1", "--format=%ct", "--", str(chapter.path)], cwd=ROOT.root,
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return 0
        return int(out) if out.isdigit() else 0
    groups: dict = {}
    for c in chapters:
        groups.setdefault(c.number, []).append(c)
    recency = {number: max(stamp(c) for c in pages) for number, pages in groups.items()}
    by_name, order = {c.name: c for c in chapters}, []
    for number in sorted(groups, key=lambda n: -recency[n]):      # stable: toc order among equals
        for page in groups[number]:
            for name in NEEDS.get(page.name, ()):
                if name in by_name and by_name[name] not in order:
                    order.append(by_name[name])
            if page not in order:
                order.append(page)
    return order


DRY_ORDER = last_changed(CHAPTERS) if os.environ.get(MAX_STEPS_ENV) else CHAPTERS


def test_dry_run_order_runs_every_page_once_and_after_what_it_reads():
    order = [c.name for c in last_changed(CHAPTERS)]
    assert sorted(order) == sorted(c.name for c in CHAPTERS)
    for i, page in enumerate(CHAPTERS):
        earlier = [c.name for c in CHAPTERS[:i] if c.number == page.number] + list(NEEDS.get(page.name, ()))
        assert all(order.index(e) < order.index(page.name) for e in earlier if e in order), \
            f"{page.name} would run before a page it reads from"


@pytest.mark.dryrun
@pytest.mark.skipif(not os.environ.get(MAX_STEPS_ENV), reason=f"the gpu dry run needs {MAX_STEPS_ENV} (make dryrun)")
@pytest.mark.parametrize("chapter", DRY_ORDER, ids=[c.name for c in DRY_ORDER])
def test_chapter_runs_in_gpu_dry_run(chapter, tmp_path):
    deadline = os.environ.get(DEADLINE_ENV)
    if deadline and time.time() + PAGE_ALLOWANCE_S > float(deadline):
        pytest.skip(f"{chapter.name}: not started, it could not finish before {DEADLINE_ENV} "
                    f"(CI's time is spent; `make dryrun` runs every page)")
    paths = BookPaths(ROOT.root, build_dir=tmp_path / "_build", data_dir=ROOT.data)
    row = run_chapter(chapter, "gpu", paths)
    assert row.ok, (f"{chapter.name} failed in the gpu dry run: {row.error} "
                    f"(executed copy: {row.executed})")
    assert row.dry_run is not None and row.status == "ran", "a dry run must check no gate"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.name for c in CHAPTERS])
def test_colab_cell_installs_from_the_configured_repository(chapter):
    """The hidden Colab cell clones the same repository that the launch buttons point at."""
    import yaml

    url = yaml.safe_load(ROOT.config.read_text())["repository"]["url"].rstrip("/")
    first = "".join(json.loads(chapter.path.read_text())["cells"][0]["source"])
    assert f'"{url}"' in first, f"{chapter.name}: the Colab cell must clone {url} (repository.url in _config.yml)"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.name for c in CHAPTERS])
def test_results_cell_records_this_chapter(chapter):
    last = [c for c in json.loads(chapter.path.read_text())["cells"] if c["cell_type"] == "code"][-1]
    assert f'record("{chapter.name}"' in "".join(last["source"]), \
        f"{chapter.name}: the results cell must call record(\"{chapter.name}\", ...)"


PAGE_CELLS = (8, 12)       # code cells a chapter has, the Colab and parameters cells included
CELL_LINES = 15            # lines a code cell may have: longer cells overflow the page


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.name for c in CHAPTERS])
def test_chapter_reads_like_a_page(chapter):
    """A chapter is a book page: a few short code cells with prose between them; what is not
    teaching code (scoring, tables, figures) lives in the library, where it is tested."""
    cells = [c for c in json.loads(chapter.path.read_text())["cells"] if c["cell_type"] == "code"]
    lines = ["".join(c["source"]).strip().splitlines() for c in cells]
    long = {i: len(l) for i, l in enumerate(lines) if len(l) > CELL_LINES}
    assert PAGE_CELLS[0] <= len(cells) <= PAGE_CELLS[1], \
        f"{chapter.name}: {len(cells)} code cells, expected {PAGE_CELLS[0]} to {PAGE_CELLS[1]}"
    assert not long, f"{chapter.name}: code cells over {CELL_LINES} lines (cell index: lines): {long}"
