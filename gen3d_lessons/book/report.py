"""The run report: one row per chapter (profile, seconds, headline, gate, goal, result), kept in
``_build/report.json``, printed as a table by ``gen3d report`` and staged as the book's
"Run report" page.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

from .paths import BookPaths, Chapter
from .results import bound_text, format_value, goal_text, write_json


@dataclass
class ChapterRun:
    """One row of the run report."""

    chapter: str
    number: int
    title: str
    docname: str
    profile: str
    seconds: float | None = None
    status: str = "not run"      # pass | fail | error | ran (nothing to check) | not run
    metric: str | None = None
    value: float | None = None
    gate: float | None = None    # what this profile must reach (the headline's)
    higher_is_better: bool = True
    error: str | None = None
    executed: str | None = None
    metrics: dict = field(default_factory=dict)
    goal: float | None = None    # what the book aims for (the headline's)
    goal_met: bool | list | None = None   # a list where the chapter has several goals
    checks: list = field(default_factory=list)
    dry_run: int | None = None   # the step cap of a dry run

    @property
    def ok(self) -> bool:
        return self.status in ("pass", "ran")


REPORT_COLUMNS = ("chapter", "profile", "seconds", "metric", "value", "gate", "goal", "goal met", "result")


def machine_summary() -> dict:
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpus": os.cpu_count(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    except Exception:  # torch missing or broken: the report still works
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, cwd=Path(__file__).parent)
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def make_report(rows: Sequence[ChapterRun], *, profile: str | None = None,
                build_seconds: float | None = None, build_ok: bool | None = None) -> dict:
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile,
        "machine": machine_summary(),
        "build_seconds": build_seconds,
        "build_ok": build_ok,
        "chapters": [asdict(row) for row in rows],
    }


def load_report(paths: BookPaths) -> dict | None:
    try:
        return json.loads(paths.report_json.read_text())
    except (OSError, ValueError):
        return None


def save_report(report: dict, paths: BookPaths) -> Path:
    paths.build.mkdir(parents=True, exist_ok=True)
    write_json(paths.report_json, report)
    return paths.report_json


def rows_of(report: dict | None) -> list[ChapterRun]:
    names = {f.name for f in fields(ChapterRun)}
    return [ChapterRun(**{k: v for k, v in row.items() if k in names})
            for row in (report or {}).get("chapters", [])]


def merge_rows(fresh: Sequence[ChapterRun], previous: Sequence[ChapterRun],
               order: Sequence[Chapter]) -> list[ChapterRun]:
    """One row per chapter of the toc: this run's, else an earlier run's, else 'not run'."""
    by_name = {row.chapter: row for row in previous}
    by_name.update({row.chapter: row for row in fresh})
    return [by_name.get(c.name) or ChapterRun(c.name, c.number, c.title, c.docname, "-")
            for c in order]


def status_text(row: ChapterRun) -> str:
    """A row's result in words, as the report and the runner's log print it."""
    if row.status == "ran" and row.dry_run is not None:
        return f"ok (dry run, {row.dry_run} steps)"
    return {"pass": "pass", "fail": "FAIL", "error": "ERROR", "ran": "ok (not checked)",
            "not run": "not run"}.get(row.status, row.status)


def report_cells(row: ChapterRun) -> list[str]:
    """A row of the report as the table's column texts (REPORT_COLUMNS)."""
    return [
        row.chapter,
        row.profile,
        "-" if row.seconds is None else f"{row.seconds:.1f}",
        row.metric or "-",
        format_value(row.value),
        bound_text(asdict(row), "gate"),
        bound_text(asdict(row), "goal"),
        goal_text(row.goal_met),
        status_text(row),
    ]


def format_report(report: dict) -> str:
    """The report as a plain-text table, the way ``make book`` and ``gen3d report`` print it."""
    rows = rows_of(report)
    table = [list(REPORT_COLUMNS)] + [report_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(REPORT_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    total = sum(r.seconds or 0 for r in rows)
    footer = f"chapters: {total:.1f} s"
    if report.get("build_seconds") is not None:
        footer += f", site build: {report['build_seconds']:.1f} s"
        if report.get("build_ok") is False:
            footer += " (FAILED)"
    lines.append(footer)
    for r in rows:
        if r.error:
            lines.append(f"{r.chapter}: {r.error}")
    return "\n".join(lines)


def report_markdown(report: dict, pages: set[str] | None = None) -> str:
    """The report as the book's 'Run report' page (MyST markdown).

    Chapters named in ``pages`` (docnames) are linked to.
    """
    rows = rows_of(report)
    machine = report.get("machine") or {}
    head = "| chapter | profile | seconds | headline metric | value | gate | goal | goal met | result |"
    lines = [
        "# Run report",
        "",
        "Every chapter of this book was executed top to bottom before the site was built. "
        "This page is written by the build itself: it lists the profile each chapter ran in, "
        "how long it took, and its headline number next to two bounds. The **gate** is what the "
        "profile must reach for the chapter to pass: a guard against regressions, set from "
        "measured runs. The **goal** is what the book aims for; it is the same in every profile, "
        "and a missed goal is reported here, not hidden. A chapter's own page lists all its goals.",
        "",
        head,
        "|" + "---|" * len(REPORT_COLUMNS),
    ]
    for row in rows:
        cells = report_cells(row)
        if pages and row.docname in pages:
            cells[0] = f"{{doc}}`{row.chapter} <{Path(row.docname).name}>`"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    total = sum(r.seconds or 0 for r in rows)
    lines += ["", f"Chapters took {total:.0f} s in all."]
    errors = [r for r in rows if r.error]
    if errors:
        lines += ["", "## Failures", ""]
        lines += [f"- **{r.chapter}**: `{r.error.replace('`', '')}`" for r in errors]
    lines += ["", "## Machine", ""]
    lines += [f"- {key}: `{value}`" for key, value in machine.items()]
    if report.get("created"):
        lines.append(f"- built: {report['created']}")
    lines += ["", "Profiles: `smoke` only checks that a chapter runs; `cpu` and `gpu` train "
              "for real, fail on a missed gate and report their goals. See the introduction for "
              "how to run a chapter yourself.", ""]
    return "\n".join(lines)
