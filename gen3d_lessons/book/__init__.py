"""Run the chapters and build the book.

Every chapter is a notebook listed in ``_toc.yml``. Building the book is three steps:

1. **run** each chapter with papermill in a profile (``smoke``, ``cpu`` or ``gpu``) into an
   executed copy under ``_build/executed/``; the chapter's last cell calls :func:`record`,
   which writes its headline result to ``_build/results/<chapter>.json``;
2. **report**: the results plus the seconds each chapter took become ``_build/report.json``,
   a printed table and a page of the book;
3. **build**: the config, the toc and ``book/`` are staged into ``_build/src`` with the executed
   copies in place of the sources (which stay output-free in git), the generated pages (the run
   report, the library) and MathJax next to them, and ``jupyter-book build`` turns that into
   ``_build/html`` without executing anything.

One module per job: ``paths`` (folders, environment, toc, chapters), ``results`` (:func:`record`,
gates and goals, glue), ``run`` (papermill, the whole book), ``report``, ``site`` (staging, the
build and its checks), ``library`` (the "The library" page) and ``curriculum`` (the book's plan).

The environment a chapter runs in:

    GEN3D_PROFILE       the profile (the papermill parameter ``profile`` says the same)
    GEN3D_STATIC=1      progress bars print text lines instead of widgets
    GEN3D_RESULTS_DIR   where :func:`record` writes (default ``<root>/_build/results``)
    GEN3D_DATA          where the datasets live (default ``<root>/data``)
    GEN3D_CHAPTER       the chapter's file name (``ch01_volumes``), used to name its result
    GEN3D_MAX_STEPS     a dry run: every training and sampling loop stops after this many steps

Nothing here imports torch or the rest of the library at import time; nothing in the library
imports this package (only the CLI does).
"""

from .library import library_markdown, library_modules, notebook_imports
from .paths import (BUILD_ENV, CHAPTER_ENV, DATA_ENV, GENERATED_DOCNAMES, LIBRARY_DOCNAME, PROFILE_ENV,
                    PROFILES, REPORT_DOCNAME, RESULTS_ENV, STATIC_ENV, BookPaths, Chapter, chapters,
                    find_chapter, find_chapters, find_root, notebook_title, toc_docnames)
from .report import (REPORT_COLUMNS, ChapterRun, format_report, load_report, machine_summary, make_report,
                     merge_rows, report_cells, report_markdown, rows_of, save_report, status_text)
from .results import (Checks, bound_text, format_value, glue_choice, glue_values, goal_text, passes, record,
                      result_table, results_dir, write_json)
from .run import build_book, default_profile, environment, parse_only, run_chapter, run_one
from .site import (FATAL_WARNINGS, MATHJAX_PARTS, MATHJAX_VERSION, broken_links, build_html,
                   coalesce_streams, mathjax_source, offsite_assets, prepare_notebook, stage)

__all__ = [
    # paths
    "PROFILES", "RESULTS_ENV", "DATA_ENV", "BUILD_ENV", "PROFILE_ENV", "CHAPTER_ENV", "STATIC_ENV",
    "REPORT_DOCNAME", "LIBRARY_DOCNAME", "GENERATED_DOCNAMES", "find_root", "BookPaths", "toc_docnames",
    "Chapter", "chapters", "find_chapter", "find_chapters", "notebook_title",
    # results
    "results_dir", "record", "Checks", "passes", "goal_text", "bound_text", "format_value", "glue_values",
    "glue_choice", "result_table", "write_json",
    # run
    "environment", "run_chapter", "default_profile", "parse_only", "build_book", "run_one",
    # report
    "ChapterRun", "REPORT_COLUMNS", "machine_summary", "make_report", "load_report", "save_report",
    "rows_of", "merge_rows", "status_text", "report_cells", "format_report", "report_markdown",
    # site
    "MATHJAX_VERSION", "MATHJAX_PARTS", "FATAL_WARNINGS", "mathjax_source", "prepare_notebook",
    "coalesce_streams", "stage", "build_html", "broken_links", "offsite_assets",
    # library
    "library_modules", "notebook_imports", "library_markdown",
]
