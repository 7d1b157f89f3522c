"""Recording a chapter's result: :func:`record` (called in the notebook's last cell), its gates
and goals, the glue that puts this run's numbers into the prose, and the JSON it writes.

A chapter's last cell calls :func:`record`, which writes ``<chapter>.json`` into
:func:`results_dir` (``$GEN3D_RESULTS_DIR``, set by the runner) and fails the chapter on a missed
gate. Nothing here imports torch at import time.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from .paths import CHAPTER_ENV, PROFILE_ENV, RESULTS_ENV, find_root


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
    from ..profiles import max_steps_cap       # the one reading of GEN3D_MAX_STEPS (imports torch)

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
    write_json(out / f"{name}.json", result)

    missed = [c for c in rows if c["passed"] is False]
    if missed:
        raise AssertionError(f"{name}: " + "; ".join(
            f"{c['metric']} = {format_value(c['value'])} misses the {profile} gate ({bound_text(c, 'gate')})"
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
        raise ValueError(f"{where} ({spec['metric']}): the gate {format_value(gate)} is stricter than the goal "
                         f"{format_value(goal)}; a gate guards against regressions and never asks more than the goal")
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


def bound_text(row: Mapping, key: str) -> str:
    bound = row.get(key)
    if bound is None:
        return "-"
    if isinstance(bound, bool):
        return "yes" if bound else "no"
    return (">= " if row.get("higher_is_better", True) else "<= ") + format_value(bound)


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

    rows = [{"metric": c["metric"], "value": c["value"], "gate": bound_text(c, "gate"),
             "gate passed": _verdict(c["passed"], "pass", "FAIL"), "goal": bound_text(c, "goal"),
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


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (a temporary file, then a rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def format_value(value: Any) -> str:
    """A value as the report and the messages print it: 4 significant digits, yes/no, or "-"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class Checks(list):
    """A chapter's comparisons, in the form :func:`record` takes (``record(..., checks=check)``), and
    what the page says about each of them.

    ``check = Checks(goals, run.gates, glue_prefix="ch04_")`` once; then every comparison the text
    makes is one call, ``check(key, metric, value, higher_is_better=True, says=None)``, which
    appends ``dict(metric=..., value=..., goal=goals.get(key), gate=gates.get(key), ...)`` and
    returns ``value``. With a ``glue_prefix`` it also glues, for the prose, the value as
    ``<prefix><key>``, the goal as ``<prefix><key>_goal`` and, given ``says=(if_met, if_missed)``,
    the words this value chooses against the goal (:func:`passes`) as ``<prefix><key>_says``: the
    sentence the page prints and the check the result records cannot disagree. A key that
    ``goals`` lacks is a row that describes, with no aim. A key checked again (a second
    measurement against the same goal) is recorded again but glued only from its first check:
    a glue name holds one value. :meth:`headline` does the same for the
    chapter's headline, which :func:`record` takes apart from the checks.
    """

    def __init__(self, goals: Mapping[str, Any], gates: Mapping[str, Any] | None = None,
                 glue_prefix: str | None = None):
        super().__init__()
        if not isinstance(goals, Mapping) or (gates is not None and not isinstance(gates, Mapping)):
            raise ValueError(f"goals, gates: expected dicts {{key: bound}}, got {type(goals).__name__} and "
                             f"{type(gates).__name__}")
        self.goals, self.gates, self.glue_prefix = goals, gates or {}, glue_prefix
        self._glued: set[str] = set()                  # keys whose value and goal are glued already

    def __call__(self, key: str, metric: str, value: Any, higher_is_better: bool = True,
                 says: tuple[str, str] | None = None) -> Any:
        self.append(self._row(key, metric, value, higher_is_better, says))
        return value

    def headline(self, key: str, metric: str, value: Any, higher_is_better: bool = True,
                 says: tuple[str, str] | None = None) -> dict:
        """The headline dict for :func:`record` (not appended to the checks), glued like a check."""
        return self._row(key, metric, value, higher_is_better, says)

    def _row(self, key: str, metric: str, value: Any, higher_is_better: bool, says: tuple[str, str] | None) -> dict:
        goal = self.goals.get(key)
        if says is not None and (goal is None or self.glue_prefix is None or len(says) != 2):
            raise ValueError(f"says: {key!r} needs a goal, a glue_prefix and two wordings (if met, if missed); "
                             f"got goal {goal!r}, glue_prefix {self.glue_prefix!r}, says {says!r}")
        if self.glue_prefix is not None:
            name = f"{self.glue_prefix}{key}"
            if key in self._glued:
                if says is not None:
                    raise ValueError(f"says: {key!r} was checked and glued before; give this check its own key")
            else:
                self._glued.add(key)
                glue_values(**{name: value}, **({} if goal is None else {f"{name}_goal": goal}))
                if says is not None:
                    glue_choice(f"{name}_says", passes(value, goal, higher_is_better), *says)
        return dict(metric=metric, value=value, goal=goal, gate=self.gates.get(key), higher_is_better=higher_is_better)
