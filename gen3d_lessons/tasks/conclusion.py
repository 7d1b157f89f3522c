"""Chapter 17: what every executed chapter measured, in one place.

Each page ends by calling :func:`~gen3d_lessons.book.record`, which writes ``<page>.json`` into the
results folder (``_build/results`` in a book run): the headline with its gate and goal, every
other check, and the seconds the page took (added by the book runner). :func:`gather` reads them
for the pages of the toc, in order; :func:`by_application` sets the survey's count of papers per
application and model family (:data:`~gen3d_lessons.book.curriculum.SURVEY_TABLES`) beside the
book's own headlines; :func:`family_of` reads which model family a headline names. Nothing here
is typed from a run: a page that has not run in the profile is listed as such.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ..book.curriculum import SURVEY_TABLES

LIMIT_S = 150.0       # the book's aim for one chapter page in the cpu profile
BOOK_LIMIT_S = 35 * 60.0     # ... and for the whole book

# The survey's three families, as a headline names its model. Tried in this order: "VQ-VAE +
# transformer" is the survey's autoregressive example, "pix2pix" a conditional GAN.
FAMILIES = (
    ("autoregressive", r"PixelCNN|transformer"),
    ("GAN", r"GAN|pix2pix|adversarial"),
    ("autoencoder", r"VAE|U-Net|autoencoder|\bAE\b|\bDAE\b|DDPM|\bLDM\b|diffusion|VoxelMorph"),
)

COLUMNS = ("chapter", "page", "title", "family", "headline", "value", "gate", "goal", "higher_is_better",
           "headline goal met", "goals met", "goals", "gates passed", "seconds", "status")


def family_of(text: Any) -> str:
    """The model family a headline names (``"GAN"``, ``"autoencoder"``, ``"autoregressive"``),
    or ``"-"`` where it names none (a baseline, a yardstick, a cost)."""
    for family, pattern in FAMILIES:
        if re.search(pattern, str(text or "")):
            return family
    return "-"


def read_result(path: str | Path) -> dict:
    """One page's result file, checked: a one-line ``ValueError`` for a file that is not JSON or
    not a result that :func:`~gen3d_lessons.book.record` wrote."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable result file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("chapter", "profile", "metric", "checks") if not isinstance(result, dict) or k not in result]
    if missing:
        raise ValueError(f"{path}: not a result written by record() (missing {', '.join(missing)})")
    return result


def gather(results: str | Path, pages: Iterable[Any], profile: str, *, skip: Iterable[str] = ()) -> pd.DataFrame:
    """One row per page of ``pages`` (the toc's, :func:`~gen3d_lessons.book.paths.chapters`) but
    those in ``skip``: its headline, value, gate and goal, whether the headline's goal was met,
    how many of its goals were met, whether its gates passed, and its seconds. ``status`` says
    ``"ran"``, ``"not run"`` (no result file) or which other profile or dry run the file is from:
    only this ``profile``'s full runs are read."""
    results, skip, rows = Path(results), set(skip), []
    for page in pages:
        if page.name in skip:
            continue
        row: dict[str, Any] = {"chapter": page.number, "page": page.name, "title": page.title, "status": "not run"}
        path = results / f"{page.name}.json"
        if path.is_file():
            result = read_result(path)
            if result["profile"] != profile or result.get("dry_run"):
                row["status"] = f"{result['profile']}{' dry run' if result.get('dry_run') else ''} result only"
            else:
                goals = [c.get("goal_met") for c in result["checks"] if c.get("goal") is not None]
                head = result["checks"][0] if result["metric"] is not None and result["checks"] else {}
                row.update(family=family_of(result["metric"]), headline=result["metric"], value=result.get("value"),
                           gate=result.get("gate"), goal=result.get("goal"),
                           higher_is_better=result.get("higher_is_better", True),
                           **{"headline goal met": head.get("goal_met") if head.get("goal") is not None else None,
                              "goals met": sum(bool(g) for g in goals), "goals": len(goals),
                              "gates passed": result.get("passed"), "seconds": result.get("seconds")},
                           status="ran")
        rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summary(table: pd.DataFrame) -> dict[str, Any]:
    """The numbers the conclusion speaks of: pages ran, headline goals met (and their share),
    pages within :data:`LIMIT_S` and the seconds of all pages that ran."""
    ran = table[table["status"] == "ran"]
    with_goal = ran[ran["headline goal met"].notna()]
    timed = ran[ran["seconds"].notna()]
    met = int(with_goal["headline goal met"].astype(bool).sum())
    return {"pages": len(table), "ran": len(ran), "with_goal": len(with_goal), "met": met,
            "met_share": met / len(with_goal) if len(with_goal) else 0.0,
            "goals": int(ran["goals"].sum()), "goals_met": int(ran["goals met"].sum()),
            "timed": len(timed), "within_limit": int((timed["seconds"] <= LIMIT_S).sum()),
            "seconds": float(timed["seconds"].sum()), "slowest": timed.loc[timed["seconds"].idxmax(), "page"]
            if len(timed) else "-"}


def by_application(table: pd.DataFrame) -> pd.DataFrame:
    """The survey's applications (its Tables 2-8): papers listed per family, beside this book's
    chapter for the application, the families its headlines name, and which of those met their
    goal here. Indexed by application."""
    rows = []
    for application, survey_table, chapter, listed, gan, ae, ar in SURVEY_TABLES:
        pages = table[(table["chapter"] == chapter) & (table["status"] == "ran")]
        named = pages[pages["family"].fillna("-") != "-"]
        met = named[named["headline goal met"].fillna(False).astype(bool)]
        counts = {"GAN": gan, "autoencoder": ae, "autoregressive": ar}
        rows.append({"application": application, "survey table": survey_table, "papers": listed, **counts,
                     "survey's most used": max(counts, key=counts.get), "chapter": chapter,
                     "headlines here": len(pages), "families named here": ", ".join(sorted(set(named["family"]))) or "-",
                     "met its goal here": ", ".join(sorted(set(met["family"]))) or "-"})
    return pd.DataFrame(rows).set_index("application")


def missed(table: pd.DataFrame) -> pd.DataFrame:
    """The pages whose headline missed its goal in this run: what the profile could not show."""
    ran = table[(table["status"] == "ran") & table["headline goal met"].notna()]
    out = ran[~ran["headline goal met"].astype(bool)]
    return out[["page", "headline", "value", "goal", "higher_is_better"]].set_index("page")


def presented(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`gather`'s table as the page shows it: values formatted, gates and goals with their
    direction (``>= 0.1``), ``met`` / ``not met``, ``k of n`` goals, gates ``passed`` or ``FAILED``."""
    from ..book.results import bound_text, format_value, goal_text

    def cells(row: pd.Series) -> dict[str, Any]:
        if row["status"] != "ran":
            return {"status": row["status"]}
        raw = {k: (None if isinstance(v, float) and pd.isna(v) else v) for k, v in row.items()}
        met = raw["headline goal met"]
        return {"family": raw["family"], "headline": raw["headline"] or "-", "value": format_value(raw["value"]),
                "gate": bound_text(raw, "gate"), "goal": bound_text(raw, "goal"),
                "headline goal": goal_text(met),
                "goals met": f"{int(raw['goals met'])} of {int(raw['goals'])}" if raw["goals"] else "-",
                "gates": "-" if raw["gates passed"] is None else "passed" if raw["gates passed"] else "FAILED",
                "seconds": "-" if raw["seconds"] is None else f"{raw['seconds']:.1f}", "status": "ran"}
    shown = pd.DataFrame([{"chapter": r["chapter"], "page": r["page"], **cells(r)} for _, r in table.iterrows()])
    return shown.set_index("page").fillna("")
