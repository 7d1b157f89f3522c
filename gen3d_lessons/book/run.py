"""Running the chapters and building the book.

:func:`run_chapter` executes one chapter top to bottom with papermill in a profile (``smoke``,
``cpu`` or ``gpu``) into an executed copy under ``_build/executed/``, in the environment the
package docstring lists; :func:`run_one` is ``gen3d run``; :func:`build_book` is ``gen3d book``:
run, report, stage and build the site. Nothing here imports torch at import time.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Callable, Iterator, Sequence

from .paths import (CHAPTER_ENV, DATA_ENV, PROFILE_ENV, RESULTS_ENV, STATIC_ENV, BookPaths, Chapter,
                    chapters, find_chapters)
from .report import (ChapterRun, format_report, load_report, make_report, merge_rows, rows_of,
                     save_report, status_text)
from .results import write_json
from .site import build_html, stage


@contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block (the kernel inherits them)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update({key: str(value) for key, value in values.items()})
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def run_chapter(chapter: Chapter, profile: str, paths: BookPaths | None = None, *,
                timeout: int | None = None, log: Callable[[str], None] = print) -> ChapterRun:
    """Execute one chapter top to bottom with papermill and collect what it recorded.

    The executed copy goes to ``_build/executed/<docname>.ipynb`` (written even when a cell
    fails: papermill marks the failing cell). Never raises for a failing chapter: the returned
    row says ``error`` or ``fail``.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    paths = paths or BookPaths.at()
    if timeout is None:
        timeout = int(os.environ.get("GEN3D_CELL_TIMEOUT", "1800"))
    row = ChapterRun(chapter.name, chapter.number, chapter.title, chapter.docname, profile)
    if not chapter.path.is_file():
        row.status, row.error = "error", f"{chapter.path} does not exist"
        return row

    executed = paths.executed / f"{chapter.docname}.ipynb"
    executed.parent.mkdir(parents=True, exist_ok=True)
    paths.results.mkdir(parents=True, exist_ok=True)
    result_file = paths.results / f"{chapter.name}.json"
    result_file.unlink(missing_ok=True)
    row.executed = str(executed)

    env = {
        PROFILE_ENV: profile,
        STATIC_ENV: "1",
        RESULTS_ENV: str(paths.results),
        CHAPTER_ENV: chapter.name,
        DATA_ENV: str(paths.data),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",   # silences a debugger warning in every kernel
    }
    log(f"  {chapter.name:<24} {profile:<6} running ...")
    start = time.perf_counter()
    try:
        with environment(**env):
            papermill.execute_notebook(
                str(chapter.path), str(executed),
                parameters={"profile": profile},
                cwd=str(chapter.path.parent),       # as when the reader opens it in Jupyter
                kernel_name="python3",
                progress_bar=False,
                execution_timeout=timeout,
            )
    except PapermillExecutionError as exc:
        row.error = f"{exc.ename}: {exc.evalue}".strip()
        row.status = "error"
    except Exception as exc:  # a dead kernel, a timeout, an unreadable notebook ...
        row.error = f"{type(exc).__name__}: {exc}".strip()
        row.status = "error"
    row.seconds = round(time.perf_counter() - start, 1)

    if result_file.is_file():
        result = json.loads(result_file.read_text())
        row.metric = result.get("metric")
        row.value = result.get("value")
        row.gate = result.get("gate")
        row.goal = result.get("goal")
        row.goal_met = result.get("goal_met")
        row.checks = result.get("checks") or []
        row.dry_run = result.get("dry_run")
        row.higher_is_better = result.get("higher_is_better", True)
        row.metrics = result.get("metrics") or {}
        if result.get("passed") is False:
            row.status = "fail"
        elif row.error is None:
            row.status = "pass" if result.get("passed") else "ran"
        result["seconds"] = row.seconds
        write_json(result_file, result)
    elif row.error is None:
        row.status = "error"
        row.error = "the notebook finished without calling gen3d_lessons.book.record(...)"
    log(f"  {chapter.name:<24} {profile:<6} {row.seconds:>8.1f} s  {status_text(row)}"
        + (f"  ({row.error})" if row.error else ""))
    return row


def default_profile() -> str:
    """``$GEN3D_PROFILE`` if set, else ``gpu`` where CUDA works, else ``cpu``
    (:func:`gen3d_lessons.profiles.pick_profile`, imported here: it needs torch)."""
    from ..profiles import pick_profile

    return pick_profile()


def parse_only(only: str | Sequence[str] | None) -> list[str] | None:
    if only is None:
        return None
    items = only.split(",") if isinstance(only, str) else list(only)
    return [item.strip() for item in items if item.strip()]


def build_book(paths: BookPaths | None = None, *, profile: str | None = None,
               only: str | Sequence[str] | None = None, run: bool = True, build: bool = True,
               log: Callable[[str], None] = print) -> int:
    """Run the chapters, write the report, build the site. Returns the exit status.

    A failing chapter does not stop the others or the site; it makes the status 1.
    ``only`` (numbers or names) runs a subset; the other chapters keep their last results
    and executed copies. ``run=False`` only rebuilds the site from the last executed copies.
    """
    paths = paths or BookPaths.at()
    available = chapters(paths, missing_ok=True)
    wanted = parse_only(only)
    selected = [c for key in wanted for c in find_chapters(key, available)] if wanted else available
    if not run:
        selected = []
    profile = (profile or default_profile()) if selected else profile

    if selected:
        log(f"running {len(selected)} chapter(s) in the '{profile}' profile")
    fresh = [run_chapter(chapter, profile, paths, log=log) for chapter in selected]
    previous = load_report(paths)
    rows = merge_rows(fresh, rows_of(previous), available)
    report = make_report(rows, profile=profile or (previous or {}).get("profile"))
    save_report(report, paths)

    ok_build = None
    if build:
        start = time.perf_counter()
        try:
            stage(paths, report, log=log)
            ok_build, problems = build_html(paths, log=log)
        except Exception as exc:  # staging or MathJax failed: still print the report
            ok_build, problems = False, [f"{type(exc).__name__}: {exc}"]
        for problem in problems:
            log("problem: " + problem)
        report["build_seconds"] = round(time.perf_counter() - start, 1)
        report["build_ok"] = ok_build
        save_report(report, paths)

    log("")
    log(format_report(report))
    log(f"report: {paths.report_json}")
    failed = [row for row in fresh if not row.ok]
    return 1 if failed or ok_build is False else 0


def run_one(key: str | int, *, profile: str | None = None, paths: BookPaths | None = None,
            log: Callable[[str], None] = print) -> list[ChapterRun]:
    """Run one chapter (``gen3d run 1``) — every page of it, for a chapter of several pages — and
    fold their rows into ``_build/report.json``. Returns one row per page."""
    paths = paths or BookPaths.at()
    available = chapters(paths, missing_ok=True)
    fresh = [run_chapter(page, profile or default_profile(), paths, log=log) for page in find_chapters(key, available)]
    previous = load_report(paths) or make_report([])
    rows = merge_rows(fresh, rows_of(previous), available)
    previous["chapters"] = [asdict(r) for r in rows]
    save_report(previous, paths)
    return fresh
