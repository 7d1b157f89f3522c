"""Run the chapters and build the book.

Every chapter is a notebook listed in ``_toc.yml``. Building the book is three steps:

1. **run** each chapter with papermill in a profile (``smoke``, ``cpu`` or ``gpu``) into an
   executed copy under ``_build/executed/``; the chapter's last cell calls :func:`record`,
   which writes its headline result to ``_build/results/<chapter>.json``;
2. **report**: the results plus the seconds each chapter took become ``_build/report.json``,
   a printed table and a page of the book;
3. **build**: the config, the toc and ``book/`` are staged into ``_build/src`` with the executed
   copies in place of the sources (which stay output-free in git), MathJax is copied next to
   them, and ``jupyter-book build`` turns that into ``_build/html`` without executing anything.

The environment a chapter runs in:

    GEN3D_PROFILE       the profile (the papermill parameter ``profile`` says the same)
    GEN3D_STATIC=1      progress bars print text lines instead of widgets
    GEN3D_RESULTS_DIR   where :func:`record` writes (default ``<root>/_build/results``)
    GEN3D_DATA          where the datasets live (default ``<root>/data``)
    GEN3D_CHAPTER       the chapter's file name (``ch01_volumes``), used to name its result
    GEN3D_MAX_STEPS     a dry run: every training and sampling loop stops after this many steps

Nothing here imports torch or the rest of the library at import time.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

PROFILES = ("smoke", "cpu", "gpu")
MATHJAX_VERSION = "3.2.2"
# What the site needs from the MathJax package (the combined component loads the rest lazily).
MATHJAX_PARTS = ("tex-mml-chtml.js", "input", "output", "ui", "a11y", "adaptors", "sre")

RESULTS_ENV = "GEN3D_RESULTS_DIR"
DATA_ENV = "GEN3D_DATA"     # read by gen3d_lessons.data.data_root()
BUILD_ENV = "GEN3D_BUILD_DIR"   # where runs and builds write (default <root>/_build); must end in _build
PROFILE_ENV = "GEN3D_PROFILE"
CHAPTER_ENV = "GEN3D_CHAPTER"
STATIC_ENV = "GEN3D_STATIC"
REPORT_DOCNAME = "book/report"    # the run-report page, generated into the staged sources

# Sphinx warnings that mean a broken book (a link, a reference or a toc entry that leads nowhere).
FATAL_WARNINGS = re.compile(
    r"undefined label|unknown document|nonexisting document|isn't included in any toctree"
    r"|not found in the toc|\[toc\.|\[ref\.|\[myst\.xref_missing\]|xref_missing"
    r"|could not find bibtex key|citation not found|Unknown target name|\[bibtex\."
    r"|\[mystnb\.glue\]"          # a glued number that is missing or glued twice: the prose would lie
)


# ---------------------------------------------------------------------------------------------
# Where things are
# ---------------------------------------------------------------------------------------------

def find_root(start: str | Path | None = None) -> Path:
    """The book's root: the folder holding ``_toc.yml``.

    The repository this package was installed from (an editable install) wins; otherwise the
    nearest folder at or above ``start`` (default: the working directory) that has a toc.
    """
    package_parent = Path(__file__).resolve().parent.parent
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
    returned with a path that does not exist. Generated pages (the run report) are skipped.
    """
    found: list[Chapter] = []
    position = 0
    for docname in toc_docnames(paths.toc):
        if docname == REPORT_DOCNAME:      # generated at build time
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


# ---------------------------------------------------------------------------------------------
# Recording a chapter's result (called in the notebook's last cell)
# ---------------------------------------------------------------------------------------------

def results_dir() -> Path:
    """Where :func:`record` writes: ``$GEN3D_RESULTS_DIR`` or ``<root>/_build/results``."""
    env = os.environ.get(RESULTS_ENV)
    return Path(env) if env else find_root() / "_build" / "results"


CHECK_KEYS = {"metric", "value", "gate", "goal", "higher_is_better"}


def record(chapter: str, headline: dict | None, metrics: dict | None = None, run: Any = None,
           checks: Sequence[dict] = ()):
    """Write a chapter's result and check its gates; report its goals as met or not.

    ``headline`` is ``dict(metric=..., value=..., gate=..., goal=..., higher_is_better=True)``
    (or ``None`` for a chapter that measures nothing); ``checks`` holds the chapter's other
    comparisons in the same form — every comparison its text makes. For each of them:

    - the **goal** is what the book aims for (a number, or ``True`` for a yes/no check). It is
      the same in every profile, shown as met or not met, and never fails the chapter;
    - the **gate** is what this profile must reach (a number, ``True``, or a mapping
      ``{profile: number}``; ``None``: no gate). It is a regression guard from measured runs
      and may never be stricter than the goal. A missed gate fails the chapter.

    ``metrics`` holds any other numbers worth keeping; ``run`` is what ``profiles.setup``
    returned (its ``name`` is the profile; else ``$GEN3D_PROFILE``). Nothing is checked in the
    ``smoke`` profile or in a dry run (``$GEN3D_MAX_STEPS``): a few steps say nothing about
    learning. After writing ``<chapter>.json``, a missed gate raises ``AssertionError`` naming
    every miss. Returns a table (a pandas DataFrame) of the checks and metrics to display.
    """
    from .profiles import max_steps_cap       # the one reading of GEN3D_MAX_STEPS (imports torch)

    profile = _profile_of(run)
    name = os.environ.get(CHAPTER_ENV) or str(chapter)
    dry_run = max_steps_cap()
    checked = profile != "smoke" and dry_run is None
    rows = ([] if headline is None else [_check(headline, "headline", profile, checked)])
    rows += [_check(c, f"checks[{i}]", profile, checked) for i, c in enumerate(checks)]
    with_goal = [c for c in rows if c["goal"] is not None]
    gates = [c["passed"] for c in rows if c["passed"] is not None]
    head = rows[0] if headline is not None else None
    result: dict[str, Any] = {
        "chapter": name,
        "label": str(chapter),
        "profile": profile,
        "dry_run": dry_run,                                 # the step cap, or None
        "metric": head and head["metric"],
        "value": head and head["value"],
        "gate": head and head["gate"],
        "goal": head and head["goal"],
        "higher_is_better": True if head is None else head["higher_is_better"],
        "passed": all(gates) if gates else None,          # None: no gate checked
        # one goal: met or not; several: a list in the order of the checks
        "goal_met": (None if not with_goal else with_goal[0]["goal_met"] if len(with_goal) == 1
                     else [c["goal_met"] for c in with_goal]),
        "checks": rows,
        "metrics": _jsonable(metrics or {}),
        "run": _run_summary(run),
        "recorded_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }

    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / f"{name}.json", result)

    missed = [c for c in rows if c["passed"] is False]
    if missed:
        raise AssertionError(f"{name}: " + "; ".join(
            f"{c['metric']} = {_fmt(c['value'])} misses the {profile} gate ({_bound_text(c, 'gate')})"
            for c in missed))
    return result_table(result)


def _check(spec: Any, where: str, profile: str, checked: bool) -> dict:
    """One headline or check, validated, with its gate passed or not and its goal met or not."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a dict(metric=..., value=..., gate=..., goal=...), "
                         f"got {type(spec).__name__}")
    if "threshold" in spec:
        raise ValueError(f"{where}: 'threshold' is now 'gate' (what the profile must reach) and "
                         "'goal' (what the book aims for)")
    unknown = set(spec) - CHECK_KEYS
    if unknown or "metric" not in spec or "value" not in spec:
        raise ValueError(f"{where} needs metric and value (and optionally gate, goal, higher_is_better); "
                         f"got keys {sorted(spec)}")
    gate = spec.get("gate")
    if isinstance(gate, Mapping):
        gate = gate.get(profile)
    higher = bool(spec.get("higher_is_better", True))
    value, gate, goal = (_number(spec["value"]), _number(gate), _number(spec.get("goal")))
    if gate is not None and goal is not None and passes(gate, goal, higher) and gate != goal:
        raise ValueError(f"{where} ({spec['metric']}): the gate {_fmt(gate)} is stricter than the goal "
                         f"{_fmt(goal)}; a gate guards against regressions and never asks more than the goal")
    return {
        "metric": str(spec["metric"]),
        "value": value,
        "gate": gate,
        "goal": goal,
        "higher_is_better": higher,
        "passed": passes(value, gate, higher) if checked and gate is not None else None,
        "goal_met": passes(value, goal, higher) if checked and goal is not None else None,
    }


def passes(value: float | bool | None, bound: float | bool, higher_is_better: bool = True) -> bool:
    """Is ``value`` on the right side of ``bound`` (inclusive)? NaN and None never pass."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value >= bound if higher_is_better else value <= bound


def _bound_text(row: Mapping, key: str) -> str:
    bound = row.get(key)
    if bound is None:
        return "-"
    if isinstance(bound, bool):
        return "yes" if bound else "no"
    return (">= " if row.get("higher_is_better", True) else "<= ") + _fmt(bound)


def _verdict(flag: bool | None, yes: str, no: str) -> str:
    return "-" if flag is None else (yes if flag else no)


def goal_text(goal_met: bool | list | None) -> str:
    """A row's ``goal_met`` in words: "met", "not met", "2 of 3 met" or "-"."""
    if isinstance(goal_met, list):
        known = [g for g in goal_met if g is not None]
        return f"{sum(known)} of {len(goal_met)} met" if known else "-"
    return _verdict(goal_met, "met", "not met")


def glue_values(**values: Any) -> None:
    """Glue numbers (or strings) for the prose: ``glue_values(dice=0.87)``, then
    ``{glue:text}`dice:.3f``` in a markdown cell. Silent (nothing is displayed). Without MyST-NB
    (the ``[book]`` extra), e.g. in a reader's Colab, there is no book to glue into: nothing happens."""
    try:
        from myst_nb import glue
    except ImportError:
        return

    for key, value in values.items():
        glue(key, _number(value) if hasattr(value, "item") else value, display=False)


def glue_choice(key: str, condition: Any, if_true: str, if_false: str) -> str:
    """Glue the wording that this run's values choose: ``glue_choice("vs_pca", ae > pca,
    "beats", "does not beat")``, then ``{glue:text}`vs_pca``` in a sentence. Returns it."""
    text = if_true if bool(condition) else if_false
    glue_values(**{key: text})
    return text


def result_table(result: dict):
    """A result's checks (value, gate, goal, verdicts) and its other metrics as a DataFrame."""
    import pandas as pd

    rows = [{"metric": c["metric"], "value": c["value"], "gate": _bound_text(c, "gate"),
             "gate passed": _verdict(c["passed"], "pass", "FAIL"), "goal": _bound_text(c, "goal"),
             "goal met": _verdict(c["goal_met"], "met", "not met")} for c in result.get("checks") or []]
    for key, value in (result.get("metrics") or {}).items():
        rows.append({"metric": key, "value": value, "gate": "", "gate passed": "", "goal": "", "goal met": ""})
    table = pd.DataFrame(rows, columns=["metric", "value", "gate", "gate passed", "goal", "goal met"])
    table.attrs["chapter"] = result.get("chapter")
    return table.set_index("metric")


def _profile_of(run: Any) -> str:
    for attr in ("profile", "name"):
        value = getattr(run, attr, None) if run is not None else None
        if isinstance(value, str) and value:
            return value
        if value is not None and isinstance(getattr(value, "name", None), str):
            return value.name      # a Profile object with a name
    return os.environ.get(PROFILE_ENV) or "unknown"


def _run_summary(run: Any) -> dict | None:
    if run is None:
        return None
    try:
        if is_dataclass(run):
            items = {f.name: getattr(run, f.name) for f in fields(run)}
        else:
            items = {k: v for k, v in vars(run).items() if not k.startswith("_")}
    except TypeError:
        return {"repr": repr(run)}
    return _jsonable(items)


def _number(value: Any) -> float | bool | None:
    if value is None:
        return None
    if hasattr(value, "item"):          # numpy / torch scalars
        value = value.item()
    if isinstance(value, bool):         # a yes/no check stays yes/no
        return value
    return float(value)


def _jsonable(value: Any, depth: int = 0) -> Any:
    """Numbers, strings, lists and dicts as they are; arrays and scalars as Python; others str."""
    if depth > 6:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v, depth + 1) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value), depth + 1)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and getattr(value, "size", 2) <= 64:
        return _jsonable(value.tolist(), depth + 1)
    if hasattr(value, "item"):
        try:
            return _jsonable(value.item(), depth + 1)
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(value)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Running one chapter
# ---------------------------------------------------------------------------------------------

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
        _write_json(result_file, result)
    elif row.error is None:
        row.status = "error"
        row.error = "the notebook finished without calling gen3d_lessons.book.record(...)"
    log(f"  {chapter.name:<24} {profile:<6} {row.seconds:>8.1f} s  {_status_text(row)}"
        + (f"  ({row.error})" if row.error else ""))
    return row


# ---------------------------------------------------------------------------------------------
# The run report
# ---------------------------------------------------------------------------------------------

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
    _write_json(paths.report_json, report)
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


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _status_text(row: ChapterRun) -> str:
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
        _fmt(row.value),
        _bound_text(asdict(row), "gate"),
        _bound_text(asdict(row), "goal"),
        goal_text(row.goal_met),
        _status_text(row),
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


# ---------------------------------------------------------------------------------------------
# Staging the sources and building the site
# ---------------------------------------------------------------------------------------------

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


def _prepare_notebook(source: Path, target: Path) -> None:
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
    """Write ``_build/src``: config, toc, ``book/`` with executed notebooks, report, MathJax."""
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
        _prepare_notebook(source, src / f"{chapter.docname}.ipynb")
        staged.add(chapter.docname)

    report_page = src / f"{REPORT_DOCNAME}.md"
    report_page.parent.mkdir(parents=True, exist_ok=True)
    report_page.write_text(report_markdown(report or make_report([]), staged))

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


# ---------------------------------------------------------------------------------------------
# The whole book
# ---------------------------------------------------------------------------------------------

def default_profile() -> str:
    """``$GEN3D_PROFILE`` if set, else ``gpu`` where CUDA works, else ``cpu``
    (:func:`gen3d_lessons.profiles.pick_profile`, imported here: it needs torch)."""
    from .profiles import pick_profile

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
    selected = [find_chapter(key, available) for key in wanted] if wanted else available
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
            log: Callable[[str], None] = print) -> ChapterRun:
    """Run one chapter (``gen3d run 1``) and fold its row into ``_build/report.json``."""
    paths = paths or BookPaths.at()
    available = chapters(paths, missing_ok=True)
    chapter = find_chapter(key, available)
    row = run_chapter(chapter, profile or default_profile(), paths, log=log)
    previous = load_report(paths) or make_report([])
    rows = merge_rows([row], rows_of(previous), available)
    previous["chapters"] = [asdict(r) for r in rows]
    save_report(previous, paths)
    return row
