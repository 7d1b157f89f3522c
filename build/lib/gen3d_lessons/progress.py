"""Progress bars that suit where the notebook runs.

A chapter runs in three places:

- a live Jupyter kernel (a reader running the notebook): widget bars from ``tqdm.auto``;
- the book runner (papermill), whose executed notebooks become static HTML: it sets env
  ``GEN3D_STATIC=1``. A widget bar there would be dead in the page and would pull its
  JavaScript from a CDN, so we write plain text instead, and rarely (every few seconds),
  so that the saved output stays a few lines long;
- a terminal or a test: the same plain text bar.

:func:`static_output` and :func:`in_live_kernel` are also used by :mod:`gen3d_lessons.viz` to
choose between an interactive widget and a self-contained HTML animation.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable

# How often (seconds) a plain text bar may redraw: a 2-minute training run then leaves
# about two dozen updates in the notebook instead of thousands.
STATIC_MININTERVAL_S = 5.0


def static_output() -> bool:
    """True when outputs will be frozen into a static page (env ``GEN3D_STATIC=1``)."""
    return os.environ.get("GEN3D_STATIC", "").strip().lower() in ("1", "true", "yes")


def in_live_kernel() -> bool:
    """True inside a Jupyter kernel whose outputs a person watches live.

    False in a terminal, in tests, and under the book runner (``GEN3D_STATIC=1``), even though
    papermill executes the notebook in a kernel.
    """
    if static_output():
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # IPython is optional for the library itself
        return False
    shell = get_ipython()
    # Terminal IPython has no kernel; a Jupyter kernel's shell does.
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, **kw: Any):
    """A tqdm progress bar: widgets in a live kernel, short plain text everywhere else.

    Takes the same keyword arguments as ``tqdm`` (``initial``, ``leave``, ``unit`` ...), which
    override the defaults chosen here.
    """
    if in_live_kernel():
        try:
            from tqdm.auto import tqdm
            return tqdm(iterable, total=total, desc=desc, **kw)
        except ImportError:  # ipywidgets missing: fall through to text
            pass
    from tqdm.std import tqdm

    # stdout rather than stderr: in an executed notebook stderr is drawn as a warning box.
    options = dict(mininterval=STATIC_MININTERVAL_S, file=sys.stdout, ncols=100, dynamic_ncols=False)
    options.update(kw)
    return tqdm(iterable, total=total, desc=desc, **options)
