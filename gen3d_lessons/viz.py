"""Pictures of volumes: slices, montages, side-by-side comparisons, cine loops, training curves.

Everything here takes arrays or tensors — never files, never models — so a chapter can draw
a phantom, a model's output and a baseline's the same way.

Conventions
-----------
- A volume is 3D, ``(X, Y, Z)`` as the data are stored (RAS: x to the right, y to the front,
  z up), which is also the ``(D, H, W)`` of a ``(B, C, D, H, W)`` tensor. Leading axes of size
  1 are dropped, so ``x[0]`` of a (1, 1, D, H, W) batch is fine.
- Slicing along axis 2 gives an *axial* slice, axis 1 *coronal*, axis 0 *sagittal*. A slice
  is drawn with its first remaining axis left → right and its second bottom → top, so
  heads point up.
- ``spacing`` is the voxel size per axis (mm); it sets each panel's aspect ratio so that
  thick-slab or short-axis volumes are not squashed.
- Labels are integer maps drawn over the image in a fixed colour per value
  (:func:`label_color`), with 0 transparent: label 3 is the same colour in every chapter.
- Each function returns a *closed* Figure: leave it as the last expression of a cell (or call
  ``display(fig)``) and it is shown once. :func:`cine` and, in the static book,
  :func:`slice_scrubber` return HTML with a slider that works without a kernel.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.animation import FuncAnimation
from matplotlib.figure import Figure

from .progress import in_live_kernel

DPI = 90
PANEL_IN = 2.4                     # inches per panel: small figures keep the book light
PLANES = ("sagittal", "coronal", "axial")   # the plane you see when slicing along axis 0, 1, 2
AXIS_LETTERS = ("x", "y", "z")

# Categorical colours for label values 1, 2, 3 ... (matplotlib's tab10), cycled past 10.
LABEL_COLORS: tuple[tuple[float, float, float], ...] = tuple(plt.get_cmap("tab10").colors)


def label_color(value: int) -> tuple[float, float, float]:
    """The RGB colour (0–1) that label ``value`` (≥ 1) is drawn in, in every figure."""
    if int(value) < 1:
        raise ValueError(f"value: label 0 is background and has no colour, got {value!r}")
    return LABEL_COLORS[(int(value) - 1) % len(LABEL_COLORS)]


# 1. Checking inputs --------------------------------------------------------------------------

def _numpy(a: Any, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        a = a.float() if a.is_floating_point() else a
        a = a.numpy()
    a = np.asarray(a)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{name}: expected a numeric array, got dtype {a.dtype}")
    return a


def _volume(a: Any, name: str = "volume", ndim: int = 3) -> np.ndarray:
    """A finite float32 array with ``ndim`` axes (after dropping leading axes of size 1)."""
    a = _numpy(a, name)
    while a.ndim > ndim and a.shape[0] == 1:
        a = a[0]
    if a.ndim != ndim:
        layout = {2: "(X, Y)", 3: "(X, Y, Z) / (D, H, W)", 4: "frames and (X, Y, Z)"}[ndim]
        raise ValueError(f"{name}: expected a {ndim}D array {layout}, got shape {a.shape}")
    if min(a.shape) < 1:
        raise ValueError(f"{name}: has an empty axis, shape {a.shape}")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains {int((~np.isfinite(a)).sum())} NaN or infinite values")
    return a


def _label(label: Any, shape: tuple[int, ...], name: str = "label") -> np.ndarray | None:
    """None, or a non-negative integer map of exactly ``shape``."""
    if label is None:
        return None
    lab = _numpy(label, name)
    while lab.ndim > len(shape) and lab.shape[0] == 1:
        lab = lab[0]
    if lab.shape != tuple(shape):
        raise ValueError(f"{name}: shape {lab.shape} does not match the volume's shape {tuple(shape)}")
    if np.issubdtype(lab.dtype, np.floating):
        if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
            raise ValueError(f"{name}: expected integer labels, found NaN or fractional values")
    lab = lab.astype(np.int64)
    if lab.min() < 0:
        raise ValueError(f"{name}: labels must be ≥ 0, found {int(lab.min())}")
    return lab


def _spacing(spacing: Any, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    s = tuple(float(v) for v in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(s) != ndim or not all(math.isfinite(v) and v > 0 for v in s):
        raise ValueError(f"spacing: expected {ndim} positive voxel sizes, got {spacing!r}")
    return s


def _axis(axis: int, ndim: int = 3) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(f"axis: expected an axis between {-ndim} and {ndim - 1}, got {axis!r}")
    return int(axis) % ndim


def _index(index: Any, size: int, name: str = "index") -> int:
    """A slice index along an axis of ``size``; None means the centre."""
    if index is None:
        return size // 2
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < size:
        raise ValueError(f"{name}: expected a slice index in [0, {size - 1}], got {index!r}")
    return int(index)


# 2. Drawing one slice ------------------------------------------------------------------------

def _window(*volumes: np.ndarray) -> tuple[float, float]:
    """Grey levels from the 0.5th to the 99.5th percentile: one bright voxel cannot wash out the rest."""
    values = np.concatenate([v.ravel() for v in volumes])
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:  # a constant volume
        lo, hi = float(values.min()), float(values.min()) + 1.0
    return float(lo), float(hi)


def _cut(vol: np.ndarray, axis: int, k: int) -> np.ndarray:
    """The 2D slice ``k`` along ``axis``, with its remaining axes in order (first, second)."""
    return np.take(vol, k, axis=axis)


def _aspect(spacing: Sequence[float], axis: int) -> float:
    """Height / width of one pixel of a slice along ``axis``: vertical spacing over horizontal."""
    first, second = [a for a in range(len(spacing)) if a != axis]
    return spacing[second] / spacing[first]


def _label_rgba(lab2d: np.ndarray, alpha: float) -> np.ndarray:
    """(H, W, 4) colours for a label slice as drawn (already transposed): 0 is transparent."""
    rgba = np.zeros((*lab2d.shape, 4), dtype=np.float32)
    for value in np.unique(lab2d):
        if value == 0:
            continue
        rgba[lab2d == value] = (*label_color(int(value)), alpha)
    return rgba


def _draw(ax, img2d: np.ndarray, lab2d: np.ndarray | None, aspect: float, vmin: float, vmax: float,
          alpha: float = 0.4, title: str | None = None):
    """Draw a slice (first axis → right, second axis ↑) and its labels; return both artists."""
    # imshow puts array rows top to bottom: transpose so the second axis is vertical,
    # and origin="lower" so it grows upwards.
    image = ax.imshow(img2d.T, cmap="gray", vmin=vmin, vmax=vmax, origin="lower",
                      aspect=aspect, interpolation="nearest")
    overlay = None
    if lab2d is not None:
        overlay = ax.imshow(_label_rgba(lab2d.T, alpha), origin="lower", aspect=aspect, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    return image, overlay


def _figure(nrows: int, ncols: int, title: str | None = None):
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL_IN * ncols, PANEL_IN * nrows + (0.3 if title else 0)),
                             dpi=DPI, squeeze=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def _done(fig: Figure) -> Figure:
    """Tidy the layout and close the figure, so that a notebook shows it once, when returned."""
    fig.tight_layout()
    plt.close(fig)
    return fig


def _slice_title(axis: int, k: int) -> str:
    return f"{PLANES[axis]} {AXIS_LETTERS[axis]}={k}"


# 3. Static figures ---------------------------------------------------------------------------

def orthogonal_slices(volume: Any, spacing: Any = None, label: Any = None, title: str | None = None,
                      index: Sequence[int | None] | None = None, ax: Sequence[Any] | None = None) -> Figure:
    """Axial, coronal and sagittal slices through one point (the centre, or ``index`` = (i, j, k)).

    ``ax``: three matplotlib Axes to draw into (e.g. one row of a larger figure); by default
    a new 1 × 3 figure.
    """
    vol = _volume(volume)
    lab = _label(label, vol.shape)
    sp = _spacing(spacing, 3)
    if index is None:
        index = (None, None, None)
    if isinstance(index, (int, np.integer)) or len(index) != 3:
        raise ValueError(f"index: expected a point (i, j, k) with None for the centre, got {index!r}")
    point = [_index(i, n, f"index[{a}]") for a, (i, n) in enumerate(zip(index, vol.shape))]
    vmin, vmax = _window(vol)

    if ax is None:
        fig, axes = _figure(1, 3, title)
        axes = list(axes[0])
        owned = True
    else:
        axes = list(ax)
        if len(axes) != 3:
            raise ValueError(f"ax: expected 3 Axes, got {len(axes)}")
        fig, owned = axes[0].figure, False
        if title:
            fig.suptitle(title, fontsize=10)
    for a, axis in zip(axes, (2, 1, 0)):            # axial, coronal, sagittal
        k = point[axis]
        _draw(a, _cut(vol, axis, k), None if lab is None else _cut(lab, axis, k),
              _aspect(sp, axis), vmin, vmax, title=_slice_title(axis, k))
    return _done(fig) if owned else fig


def montage(volume: Any, axis: int = 2, n: int = 12, label: Any = None, spacing: Any = None,
            title: str | None = None, ncols: int = 6) -> Figure:
    """``n`` slices along ``axis``, evenly spread (the outermost, usually empty, are skipped)."""
    vol = _volume(volume)
    lab = _label(label, vol.shape)
    sp = _spacing(spacing, 3)
    axis = _axis(axis)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n: expected a positive number of slices, got {n!r}")
    size = vol.shape[axis]
    n = min(int(n), size)
    ks = np.unique(np.round(np.linspace(0, size - 1, n + 2)[1:-1]).astype(int)) if n < size else np.arange(size)
    cols = min(len(ks), ncols)
    rows = math.ceil(len(ks) / cols)
    vmin, vmax = _window(vol)

    fig, axes = _figure(rows, cols, title)
    for a in axes.ravel():
        a.set_axis_off()
    for a, k in zip(axes.ravel(), ks):
        _draw(a, _cut(vol, axis, k), None if lab is None else _cut(lab, axis, k),
              _aspect(sp, axis), vmin, vmax, title=f"{AXIS_LETTERS[axis]}={k}")
    return _done(fig)


def overlay(image2d: Any, label2d: Any, ax: Any = None, alpha: float = 0.4, spacing: Any = None,
            title: str | None = None) -> Figure:
    """One slice with its labels on top; the slice is (X, Y) as cut from a volume."""
    img = _volume(image2d, "image2d", ndim=2)
    lab = _label(label2d, img.shape, "label2d")
    if lab is None:
        raise ValueError("label2d: is None; use orthogonal_slices or montage for an image alone")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha: expected an opacity between 0 and 1, got {alpha!r}")
    sp = _spacing(spacing, 2)
    vmin, vmax = _window(img)
    if ax is None:
        fig, axes = _figure(1, 1, None)
        a, owned = axes[0, 0], True
    else:
        a, owned = ax, False
    _draw(a, img, lab, sp[1] / sp[0], vmin, vmax, alpha=alpha, title=title)
    return _done(a.figure) if owned else a.figure


def compare(volumes: Mapping[str, Any], axis: int = 2, index: int | None = None, spacing: Any = None,
            labels: Mapping[str, Any] | None = None, title: str | None = None) -> Figure:
    """One row of panels, one per volume, the same slice of each: e.g. target vs model vs baseline.

    All volumes share one grey scale, so that a brighter panel really is brighter.
    ``labels`` optionally maps some of the names to label maps drawn on their panel.
    """
    if not isinstance(volumes, Mapping) or not volumes:
        raise ValueError("volumes: expected a non-empty dict {title: volume}")
    vols = {name: _volume(v, f"volumes[{name!r}]") for name, v in volumes.items()}
    shape = next(iter(vols.values())).shape
    for name, v in vols.items():
        if v.shape != shape:
            raise ValueError(f"volumes[{name!r}]: shape {v.shape} differs from the first volume's {shape}")
    labels = {} if labels is None else labels
    if not isinstance(labels, Mapping):
        raise ValueError("labels: expected a dict {title: label map} or None")
    unknown = set(labels) - set(vols)
    if unknown:
        raise ValueError(f"labels: names {sorted(unknown)} are not among volumes {list(vols)}")
    labs = {name: _label(lab, shape, f"labels[{name!r}]") for name, lab in labels.items()}
    sp = _spacing(spacing, 3)
    axis = _axis(axis)
    k = _index(index, shape[axis])
    vmin, vmax = _window(*vols.values())

    fig, axes = _figure(1, len(vols), title or _slice_title(axis, k))
    for a, (name, v) in zip(axes[0], vols.items()):
        lab = labs.get(name)
        _draw(a, _cut(v, axis, k), None if lab is None else _cut(lab, axis, k), _aspect(sp, axis),
              vmin, vmax, title=name)
    return _done(fig)


def plot_history(history_or_dict: Any, keys: Sequence[str] | None = None, log: bool = False) -> Figure:
    """Training curves, one panel per key: each step faintly, a moving average on top.

    Takes a :class:`~gen3d_lessons.training.History`, its ``to_dict()``, or ``{key: values}``.
    """
    # 1. find the value lists
    src = history_or_dict
    if hasattr(src, "values") and isinstance(getattr(src, "values"), Mapping):
        values = src.values                              # a History
    elif isinstance(src, Mapping) and isinstance(src.get("values"), Mapping):
        values = src["values"]                           # History.to_dict()
    elif isinstance(src, Mapping):
        values = src
    else:
        raise ValueError(f"history_or_dict: expected a History or a dict of value lists, got {type(src).__name__}")
    if not values:
        raise ValueError("history_or_dict: holds no values to plot")
    keys = list(values) if keys is None else list([keys] if isinstance(keys, str) else keys)
    missing = [k for k in keys if k not in values]
    if missing or not keys:
        raise ValueError(f"keys: {missing or keys} not in the history; available: {', '.join(values)}")

    # 2. one panel per key
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), dpi=DPI, squeeze=False)
    for a, key in zip(axes[0], keys):
        y = np.asarray(values[key], dtype=float)
        steps = np.arange(len(y))
        ok = np.isfinite(y)                              # steps that did not log this key hold NaN
        a.plot(steps[ok], y[ok], color="tab:blue", alpha=0.3, lw=0.8)
        window = max(1, ok.sum() // 50)
        if window > 1:
            smooth = np.convolve(y[ok], np.ones(window) / window, mode="valid")
            a.plot(steps[ok][window - 1:], smooth, color="tab:blue", lw=1.5)
        if log:
            a.set_yscale("log")
        a.set_title(key, fontsize=9)
        a.set_xlabel("step", fontsize=8)
        a.tick_params(labelsize=7)
        a.grid(alpha=0.3)
    return _done(fig)


# 4. Moving pictures that work without a kernel -----------------------------------------------

# matplotlib's player links Font Awesome from a CDN for its button icons; the book must work
# offline, so we drop the link and draw the icons with plain characters instead.
_PLAYER_CSS = """<style>
.gen3d-anim .fa::before { font-family: sans-serif; font-style: normal; font-weight: normal; }
.gen3d-anim .fa-minus::before { content: "\\2212"; }
.gen3d-anim .fa-plus::before { content: "+"; }
.gen3d-anim .fa-fast-backward::before { content: "\\23EE"; }
.gen3d-anim .fa-step-backward::before { content: "\\2039"; }
.gen3d-anim .fa-play::before { content: "\\25B6"; }
.gen3d-anim .fa-pause::before { content: "\\23F8"; }
.gen3d-anim .fa-step-forward::before { content: "\\203A"; }
.gen3d-anim .fa-fast-forward::before { content: "\\23ED"; }
.gen3d-anim .fa-flip-horizontal { display: inline-block; transform: scaleX(-1); }
</style>"""


def _animate(fig: Figure, update, n_frames: int, fps: float, mode: str, start: int = 0):
    """Render every frame into a self-contained HTML player (slider + buttons); close ``fig``.

    The player opens on frame ``start`` (e.g. the middle slice rather than an empty first one).
    """
    from IPython.display import HTML  # only needed here: the rest of viz works without IPython

    fig.tight_layout()
    anim = FuncAnimation(fig, update, frames=n_frames, blit=False)
    html = anim.to_jshtml(fps=fps, default_mode=mode)
    plt.close(fig)
    html = re.sub(r"<link[^>]*font-awesome[^>]*>", "", html)
    if start:  # matplotlib's player object is created as `anim<id> = new Animation(...);`
        html = re.sub(r"(anim\w+) = new Animation\(([^;]*)\);", rf"\1 = new Animation(\2); \1.set_frame({int(start)});",
                      html, count=1)
    return HTML(f'{_PLAYER_CSS}<div class="gen3d-anim">{html}</div>')


def cine(frames: Any, time_axis: int = 0, axis: int = 2, index: int | None = None, label: Any = None,
         spacing: Any = None, fps: float = 8, title: str | None = None):
    """A looping movie of one slice over time, e.g. a heart beating, as an HTML player.

    ``frames`` is (T, X, Y, Z) with ``time_axis=0`` or (X, Y, Z, T) with ``time_axis=-1``;
    ``label`` (optional) has the same shape. Returns ``IPython.display.HTML``.
    """
    movie = _volume(frames, "frames", ndim=4)
    lab = _label(label, movie.shape)
    t_axis = _axis(time_axis, 4)
    movie = np.moveaxis(movie, t_axis, 0)                           # (T, X, Y, Z)
    lab = None if lab is None else np.moveaxis(lab, t_axis, 0)     # (T, X, Y, Z)
    axis = _axis(axis)
    k = _index(index, movie.shape[1 + axis])
    sp = _spacing(spacing, 3)
    vmin, vmax = _window(movie)

    fig, axes = _figure(1, 1, None)
    a = axes[0, 0]
    cut = lambda t: _cut(movie[t], axis, k)                                   # noqa: E731
    cut_lab = lambda t: None if lab is None else _cut(lab[t], axis, k)        # noqa: E731
    image, over = _draw(a, cut(0), cut_lab(0), _aspect(sp, axis), vmin, vmax,
                        title=f"{title + ': ' if title else ''}t=0")

    def update(t: int):
        image.set_data(cut(t).T)
        if over is not None:
            over.set_data(_label_rgba(cut_lab(t).T, 0.4))
        a.set_title(f"{title + ': ' if title else ''}t={t}", fontsize=9)
        return [image] if over is None else [image, over]

    return _animate(fig, update, movie.shape[0], fps, "loop")


def slice_scrubber(volume: Any, label: Any = None, axis: int = 2, spacing: Any = None,
                   title: str | None = None, max_frames: int = 64):
    """Browse a volume slice by slice with a slider.

    In a live Jupyter kernel: an ipywidgets slider that redraws the slice. In the static book
    (``GEN3D_STATIC=1``) or without ipywidgets: an HTML player with one frame per slice (at most
    ``max_frames``, evenly spread) whose slider works without a kernel — never a dead widget.
    """
    vol = _volume(volume)
    lab = _label(label, vol.shape)
    axis = _axis(axis)
    sp = _spacing(spacing, 3)
    size = vol.shape[axis]
    vmin, vmax = _window(vol)
    aspect = _aspect(sp, axis)
    heading = (title + ": ") if title else ""

    def one_slice(k: int) -> Figure:
        fig, axes = _figure(1, 1, None)
        _draw(axes[0, 0], _cut(vol, axis, k), None if lab is None else _cut(lab, axis, k), aspect,
              vmin, vmax, title=heading + _slice_title(axis, k))
        return _done(fig)

    # 1. live: a real widget
    if in_live_kernel():
        try:
            import ipywidgets as widgets
            from IPython.display import display
        except ImportError:
            pass
        else:
            slider = widgets.IntSlider(value=size // 2, min=0, max=size - 1, description=PLANES[axis],
                                       continuous_update=False)
            return widgets.interactive(lambda k: display(one_slice(k)), k=slider)

    # 2. static: every slice pre-rendered into an HTML player
    if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames < 1:
        raise ValueError(f"max_frames: expected a positive integer, got {max_frames!r}")
    ks = np.unique(np.round(np.linspace(0, size - 1, min(size, int(max_frames)))).astype(int))
    fig, axes = _figure(1, 1, None)
    a = axes[0, 0]
    image, over = _draw(a, _cut(vol, axis, ks[0]), None if lab is None else _cut(lab, axis, ks[0]),
                        aspect, vmin, vmax, title=heading + _slice_title(axis, ks[0]))

    def update(f: int):
        k = ks[f]
        image.set_data(_cut(vol, axis, k).T)
        if over is not None:
            over.set_data(_label_rgba(_cut(lab, axis, k).T, 0.4))
        a.set_title(heading + _slice_title(axis, k), fontsize=9)
        return [image] if over is None else [image, over]

    return _animate(fig, update, len(ks), fps=4, mode="once", start=len(ks) // 2)


def plot_scaling(rows: Any, x: str = "voxels", ys: Sequence[str] = ("memory_MB", "s_per_step"),
                 group: str = "dims") -> Figure:
    """Log-log curves of cost against size, one line per ``group`` (2D vs 3D), one panel per ``ys``.

    ``rows``: a DataFrame or a list of dicts such as
    :func:`~gen3d_lessons.training.benchmark.measure_training_step` returns.
    """
    records = list(rows.to_dict("records")) if hasattr(rows, "to_dict") else list(rows)
    missing = sorted({k for k in (x, group, *ys) for r in records if k not in r})
    if not records or missing:
        raise ValueError(f"rows: expected records with {x!r}, {group!r} and {list(ys)}; "
                         f"{'none given' if not records else f'missing {missing}'}")
    labels = {"memory_MB": "training memory (MB)", "s_per_step": "seconds per step", "voxels": "pixels or voxels per sample"}
    fig, axes = plt.subplots(1, len(ys), figsize=(4.5 * len(ys), 3.2), dpi=DPI, squeeze=False)
    for key in sorted({r[group] for r in records}):
        mine = sorted((r for r in records if r[group] == key), key=lambda r: r[x])
        for a, y in zip(axes[0], ys):
            a.loglog([r[x] for r in mine], [r[y] for r in mine], "o-", label=f"{key}D" if group == "dims" else str(key))
    for a, y in zip(axes[0], ys):
        a.set(xlabel=labels.get(x, x), ylabel=labels.get(y, y))
        a.legend()
    return _done(fig)


def sample_rows(sets: Mapping[str, Any], n: int = 4, axis: int = 2, index: int | None = None,
                spacing: Any = None, title: str | None = None) -> Figure:
    """The same slice of the first ``n`` volumes of each set, one row per set: real volumes beside
    each model's samples. ``sets`` maps a name to volumes (N, C, D, H, W) or (N, D, H, W)
    (channel 0 is drawn); panels are titled ``"<name> <k>"``. One grey scale for every panel, so
    that a brighter sample really is brighter."""
    if not isinstance(sets, Mapping) or not sets:
        raise ValueError("sets: expected a non-empty dict {name: volumes (N, C, D, H, W)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive number of volumes per row, got {n!r}")
    rows = {}
    for name, x in sets.items():
        x = _numpy(x, f"sets[{name!r}]")
        x = x[:, 0] if x.ndim == 5 else x                                    # (N, D, H, W)
        if x.ndim != 4 or len(x) < n:
            raise ValueError(f"sets[{name!r}]: expected at least {n} volumes (N, C, D, H, W), got shape {x.shape}")
        rows[name] = [_volume(v, f"sets[{name!r}][{i}]") for i, v in enumerate(x[:n])]
    shape = next(iter(rows.values()))[0].shape
    if any(v.shape != shape for vs in rows.values() for v in vs):
        raise ValueError(f"sets: every volume needs the shape {shape} of the first")
    sp, axis = _spacing(spacing, 3), _axis(axis)
    k = _index(index, shape[axis])
    vmin, vmax = _window(*(v for vs in rows.values() for v in vs))
    fig, axes = _figure(len(rows), n, title or _slice_title(axis, k))
    for r, (name, vs) in enumerate(rows.items()):
        for i, v in enumerate(vs):
            _draw(axes[r, i], _cut(v, axis, k), None, _aspect(sp, axis), vmin, vmax, title=f"{name} {i + 1}")
    return _done(fig)


def plot_gan_training(histories: Mapping[str, Any], references: Mapping[str, float] | None = None, *,
                      probe: str = "fd", titles: Sequence[str] | None = None,
                      probe_title: str = "probe: FD to the validation brains (★ lowest)") -> Figure:
    """Adversarial runs side by side: each run's ``d_loss`` and ``g_loss`` in a panel of its own,
    and the probe of every run (e.g. FD, at the steps it ran; a star on its lowest value, the
    generator ``train_gan(keep_best=...)`` keeps) in a last panel, with ``references``
    ``{name: value}`` as grey horizontal lines on the probe's scale.

    ``histories``: ``{name: History}`` (or ``{name: {key: values}}``) from
    :func:`~gen3d_lessons.training.gan.train_gan`; ``titles``: one per run (default: its name).
    """
    if not isinstance(histories, Mapping) or not histories:
        raise ValueError("histories: expected a non-empty dict {name: History}")
    titles = list(histories) if titles is None else list(titles)
    if len(titles) != len(histories):
        raise ValueError(f"titles: expected one per history ({len(histories)}), got {len(titles)}")
    curves = {}
    for name, h in histories.items():                                       # checked before any figure opens
        values = h.values if hasattr(h, "values") and isinstance(h.values, Mapping) else h
        missing = [k for k in ("d_loss", "g_loss", probe) if k not in values]
        if missing:
            raise ValueError(f"histories[{name!r}]: no {missing}; recorded: {', '.join(values)}")
        curves[name] = {k: np.asarray(values[k], dtype=float) for k in ("d_loss", "g_loss", probe)}
    fig, axes = plt.subplots(1, len(histories) + 1, figsize=(11 / 3 * (len(histories) + 1), 3), dpi=DPI)
    for ax, (name, v) in zip(axes, curves.items()):
        ax.plot(v["d_loss"], lw=0.6, label="D loss"), ax.plot(v["g_loss"], lw=0.6, label="G loss")
        at = np.flatnonzero(np.isfinite(v[probe]))                          # the steps the probe ran at
        line, = axes[-1].plot(at + 1, v[probe][at], "o-", ms=3, label=name)
        if at.size:                                                          # a star on its lowest value
            best = at[np.argmin(v[probe][at])]
            axes[-1].plot(best + 1, v[probe][best], "*", ms=10, color=line.get_color())
    for (name, value), style in zip((references or {}).items(), (":", "--", "-.", "-")):
        axes[-1].axhline(value, color="gray", ls=style, label=name)
    for ax, title in zip(axes, (*titles, probe_title)):
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=7)
    return _done(fig)


def compare_labels(image: Any, labels: Mapping[str, Any], *, focus: int | None = None, axis: int = 2,
                   index: int | None = None, spacing: Any = None, title: str | None = None) -> Figure:
    """One image under several label maps, one panel per map: the truth beside each method's labels.

    ``labels`` maps a panel's title to a label map of the image's shape, e.g. ``{"truth": y,
    "U-Net": pred, "errors": wrong}``. ``focus``: a label value; the slice then passes through the
    mean position of that label in the *first* map (a lesion, the left ventricle), or through the
    centre if it is absent. Without ``focus``, ``index`` picks the slice (None: the centre).
    """
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError("labels: expected a non-empty dict {title: label map}")
    vol = _volume(image, "image")
    if focus is not None:
        first = next(iter(labels))
        where = np.argwhere(_label(labels[first], vol.shape, f"labels[{first!r}]") == focus)
        index = int(where[:, _axis(axis)].mean()) if len(where) else None
    return compare({name: vol for name in labels}, axis=axis, index=index, spacing=spacing, labels=labels,
                   title=title)


def plot_histories(histories: Mapping[str, Any], panels: Sequence[Sequence[str]], keys: Sequence[str] = ("loss",),
                   *, continued: Sequence[str] = (), window: int = 20, ylabel: str = "loss (moving mean)",
                   log: bool = True) -> Figure:
    """The curves of several trainings, one panel per group of ``panels``, each a moving mean over
    ``window`` steps (a per-step loss is too noisy to read).

    ``histories`` maps a name to a :class:`~gen3d_lessons.training.History` (or ``{key: values}``);
    from each, the first of ``keys`` that it recorded is drawn (``("loss", "seg")``: a plain step's
    loss, or the segmentation term of a step that records several). A name in ``continued`` is a
    training that the later names of its panel start from (a pre-training): their curves begin
    after its last step, all at the same place, so that continuations are seen side by side.
    """
    import pandas as pd

    if not isinstance(histories, Mapping) or not panels:
        raise ValueError("histories, panels: expected {name: History} and a list of groups of names")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive number of steps, got {window!r}")
    curves = {}                                          # name -> the values drawn, checked before drawing
    for name in {name: None for names in panels for name in names}:
        if name not in histories:
            raise ValueError(f"panels: {name!r} is not among the histories ({', '.join(histories)})")
        h = histories[name]
        values = h.values if hasattr(h, "values") and isinstance(h.values, Mapping) else h
        key = next((k for k in keys if k in values), None)
        if key is None:
            raise ValueError(f"histories[{name!r}]: none of {list(keys)} recorded; recorded: {', '.join(values)}")
        curves[name] = np.asarray(values[key], dtype=float)
    fig, axes = plt.subplots(1, len(panels), figsize=(11 / 3 * len(panels), 2.8), dpi=DPI, squeeze=False)
    for ax, names in zip(axes[0], panels):
        offset = 0
        for name in names:
            y = curves[name]
            steps = offset + np.arange(len(y))
            ax.plot(steps, pd.Series(y).rolling(window, min_periods=1).mean(), label=name)
            if name in continued and len(y):
                offset = int(steps[-1]) + 1
        ax.set(xlabel="step", ylabel=ylabel, yscale="log" if log else "linear")
        ax.legend(fontsize=7)
    return _done(fig)


def anomaly_panels(volumes: Mapping[str, Any], lesion: Any, brain: Any, axis: int = 2, index: int | None = None,
                   spacing: Any = None, ncols: int = 3, title: str | None = None) -> Figure:
    """One subject's anomaly maps side by side on one slice, its lesion outlined (chapter 12).

    The first of ``volumes`` is the image (grey); the others are maps (magma), drawn inside
    ``brain`` only. Each panel has its own scale, from 0 to its 99.9th percentile inside the
    brain: detectors' maps come in different units, and what matters is where each is highest.
    The slice is ``index`` along ``axis``, by default the one that holds the most lesion voxels.
    """
    if not isinstance(volumes, Mapping) or not volumes:
        raise ValueError("volumes: expected a non-empty dict {title: volume}, the image first")
    vols = {name: _volume(v, f"volumes[{name!r}]") for name, v in volumes.items()}
    shape = next(iter(vols.values())).shape
    les, inside = (_label(m, shape, name) > 0 for m, name in ((lesion, "lesion"), (brain, "brain")))
    for name, v in vols.items():
        if v.shape != shape:
            raise ValueError(f"volumes[{name!r}]: shape {v.shape} differs from the first volume's {shape}")
    if not inside.any():
        raise ValueError("brain: the mask selects no voxel")
    if isinstance(ncols, bool) or not isinstance(ncols, (int, np.integer)) or ncols < 1:
        raise ValueError(f"ncols: expected a positive integer, got {ncols!r}")
    axis, sp = _axis(axis), _spacing(spacing, 3)
    others = tuple(a for a in range(3) if a != axis)
    k = int(les.sum(others).argmax()) if index is None else _index(index, shape[axis])

    ncols = min(int(ncols), len(vols))
    fig, axes = _figure(math.ceil(len(vols) / ncols), ncols, f"{title + ', ' if title else ''}{_slice_title(axis, k)}: "
                        "anomaly maps, lesion outlined")
    for j, (a, (name, v)) in enumerate(zip(axes.flat, vols.items())):
        v = v if j == 0 else v * inside                                    # the maps inside the brain only
        hi = max(float(np.quantile(v[inside], 0.999)), 1e-6)               # each panel on its own scale
        a.imshow(_cut(v, axis, k).T, cmap="gray" if j == 0 else "magma", vmin=0, vmax=hi, origin="lower",
                 aspect=_aspect(sp, axis), interpolation="nearest")
        if les[(slice(None),) * axis + (k,)].any():
            a.contour(_cut(les, axis, k).T.astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
        a.set_title(name, fontsize=8)
    for a in axes.flat:
        a.set_axis_off()
    return _done(fig)


# Registration (chapter 13) -----------------------------------------------------------------------

_MARKERS = ("s", "*", "^", "D", "v", "P")


def accuracy_against_time(curve: Mapping[str, tuple[float, float]], points: Mapping[str, tuple[float, float]],
                          reference: Mapping[str, float] | None = None, *, curve_label: str = "iterative optimiser (steps)",
                          ylabel: str = "accuracy", title: str = "accuracy against time") -> Figure:
    """Accuracy against seconds (log scale): a method whose accuracy is bought with time is a curve, the others points.

    ``curve`` maps each point's annotation (e.g. its number of steps) to ``(seconds, accuracy)``,
    in the order of the curve; ``points`` maps a method's name to its ``(seconds, accuracy)``;
    ``reference`` draws a level that costs nothing (e.g. no registration) as a dotted line.
    """
    if not isinstance(curve, Mapping) or not curve:
        raise ValueError("curve: expected a non-empty dict {annotation: (seconds, accuracy)}")
    for name, xy in {**curve, **points}.items():
        if len(xy) != 2 or not float(xy[0]) > 0:
            raise ValueError(f"{name!r}: expected (seconds > 0, accuracy) on a log time axis, got {tuple(xy)}")
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=DPI)
    seconds, accuracy = zip(*((float(s), float(a)) for s, a in curve.values()))
    ax.plot(seconds, accuracy, "o-", label=curve_label)
    for note, s, a in zip(curve, seconds, accuracy):
        ax.annotate(str(note), (s, a), fontsize=7, textcoords="offset points", xytext=(4, -8))
    for (name, (s, a)), marker in zip(points.items(), _MARKERS * len(points)):
        ax.plot(float(s), float(a), marker, ms=10, label=name)
    for name, level in (reference or {}).items():
        ax.axhline(float(level), color="grey", ls=":", label=name)
    ax.set(xscale="log", xlabel="seconds per pair (log)", ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    return _done(fig)


def volume_change_figure(moving: Any, fixed: Any, det: Any, mask: Any, ratio: Any, mean_det: Mapping[str, Any], *,
                         names: Sequence[str] = ("moving", "fixed"), det_title: str = "det J", axis: int = 2,
                         index: int | None = None, xlabel: str = "volume ratio", ylabel: str = "mean det J",
                         title: str | None = None) -> Figure:
    """A deformation's local volume change: one slice of the pair and of det J, and det J against the truth.

    ``moving``, ``fixed``, the field's Jacobian determinant ``det`` and a structure's ``mask`` are
    volumes of one shape, drawn on one slice (``index`` along ``axis``; default: through the middle
    of the mask), det J on a diverging scale around 1 with the mask outlined. The last panel puts,
    for every pair, the structure's true volume ``ratio`` against each method's mean det J in it
    (``mean_det``: ``{method: values}``), with the diagonal where the two agree. ``title`` may hold
    ``{index}``, replaced by the slice drawn.
    """
    vols = [_volume(v, name) for v, name in ((moving, "moving"), (fixed, "fixed"), (det, "det"))]
    inside = _label(mask, vols[0].shape, "mask") > 0
    if any(v.shape != vols[0].shape for v in vols) or not inside.any():
        raise ValueError(f"moving, fixed, det, mask: expected one shape and a non-empty mask, got "
                         f"{[v.shape for v in vols]} and {int(inside.sum())} voxels in the mask")
    ratio = _numpy(ratio, "ratio").ravel()
    means = {m: _numpy(v, f"mean_det[{m!r}]").ravel() for m, v in mean_det.items()}
    if not means or any(v.shape != ratio.shape for v in means.values()):
        raise ValueError(f"mean_det: expected one value per pair ({ratio.size}) for every method, "
                         f"got {({m: v.size for m, v in means.items()})}")
    axis = _axis(axis)
    k = int(np.argwhere(inside)[:, axis].mean()) if index is None else _index(index, vols[0].shape[axis])

    fig, axes = plt.subplots(1, 4, figsize=(12, 3), dpi=DPI)
    for a, v, name in zip(axes[:2], vols[:2], names):
        a.imshow(_cut(v, axis, k).T, cmap="gray", origin="lower"), a.set_title(name, fontsize=9)
    im = axes[2].imshow(_cut(vols[2], axis, k).T, cmap="RdBu_r", vmin=0, vmax=2, origin="lower")
    axes[2].contour(_cut(inside, axis, k).T.astype(float), [0.5], colors="k", linewidths=0.8)
    axes[2].set_title(det_title, fontsize=9)
    fig.colorbar(im, ax=axes[2], shrink=0.8)
    for (m, values), marker in zip(means.items(), ("o", "*", "s", "^") * len(means)):
        axes[3].scatter(ratio, values, marker=marker, s=60 if marker == "*" else None, label=m)
    lim = [1, float(max(ratio.max(), *(v.max() for v in means.values()))) + 0.2]
    axes[3].plot(lim, lim, "k:", lw=1), axes[3].set(xlabel=xlabel, ylabel=ylabel), axes[3].legend(fontsize=7)
    for a in axes[:3]:
        a.axis("off")
    if title:
        fig.suptitle(title.replace("{index}", str(k)), fontsize=9)
    return _done(fig)


def difference_maps(volumes: Mapping[str, Any], reference: Any, axis: int = 2, index: int | None = None,
                    limit: float | None = None, title: str | None = None) -> Figure:
    """One row of panels, one per volume: the same slice of ``volume − reference`` (chapter 11: a
    method's error against the full-dose volume, or what one method adds to another).

    A diverging map (red: brighter than the reference, blue: darker) on one symmetric scale
    ``±limit`` for every panel (by default the largest difference shown), with one colour bar.
    """
    if not isinstance(volumes, Mapping) or not volumes:
        raise ValueError("volumes: expected a non-empty dict {title: volume}")
    ref = _volume(reference, "reference")
    diffs = {}
    for name, v in volumes.items():
        v = _volume(v, f"volumes[{name!r}]")
        if v.shape != ref.shape:
            raise ValueError(f"volumes[{name!r}]: shape {v.shape} differs from the reference's {ref.shape}")
        diffs[name] = v - ref
    axis = _axis(axis)
    k = _index(index, ref.shape[axis])
    cuts = {name: _cut(d, axis, k) for name, d in diffs.items()}
    if limit is None:
        limit = max(float(np.abs(c).max()) for c in cuts.values()) or 1.0
    elif not (isinstance(limit, (int, float, np.number)) and limit > 0):
        raise ValueError(f"limit: expected a positive number, got {limit!r}")

    fig, axes = plt.subplots(1, len(cuts), figsize=(PANEL_IN * len(cuts) + 0.6, 2.8), dpi=DPI, squeeze=False)
    for a, (name, c) in zip(axes[0], cuts.items()):
        image = a.imshow(c.T, cmap="RdBu_r", vmin=-limit, vmax=limit, origin="lower", interpolation="nearest")
        a.set_title(name, fontsize=8)
        a.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    plt.close(fig)                                   # no tight_layout: it cannot place a shared colour bar
    return fig


def line_profiles(profiles: Mapping[str, Any], positions: Any = None, bold: Sequence[str] = (),
                  xlabel: str = "position (voxels)", ylabel: str = "intensity", title: str | None = None) -> Figure:
    """Intensity profiles along one line, one curve per volume (e.g. from
    :func:`~gen3d_lessons.metrics.image.line_profile`), at ``positions`` (default: sample indices).
    The names in ``bold`` are drawn thicker: the methods the figure is about."""
    if not isinstance(profiles, Mapping) or not profiles:
        raise ValueError("profiles: expected a non-empty dict {name: 1D profile}")
    curves = {name: _numpy(p, f"profiles[{name!r}]").astype(float) for name, p in profiles.items()}
    n = len(next(iter(curves.values())))
    for name, y in curves.items():
        if y.ndim != 1 or len(y) != n:
            raise ValueError(f"profiles[{name!r}]: expected a 1D profile of {n} samples like the first, got shape {y.shape}")
    x = np.arange(n) if positions is None else _numpy(positions, "positions").astype(float)
    if x.shape != (n,):
        raise ValueError(f"positions: expected {n} positions, one per sample, got shape {x.shape}")
    unknown = [b for b in bold if b not in curves]
    if unknown:
        raise ValueError(f"bold: {unknown} are not among the profiles ({', '.join(curves)})")

    fig, a = plt.subplots(figsize=(4.5, 3), dpi=DPI)
    for name, y in curves.items():
        a.plot(x, y, label=name, lw=2 if name in bold else 1)
    a.set(xlabel=xlabel, ylabel=ylabel)
    if title:
        a.set_title(title, fontsize=9)
    a.legend(fontsize=7)
    return _done(fig)


def quality_vs_cost(table: Any, connect: Mapping[str, Sequence[str]] | None = None,
                    lines: Mapping[str, float] | None = None, *, x: str = "network calls", y: str = "FD",
                    err: str = "FD (std)", xlabel: str = "network calls per sample", ylabel: str = "FD",
                    log_x: bool = True) -> Figure:
    """Quality against cost, one point with an error bar per row of ``table`` (chapter 5: samplers).

    ``table``: a pandas DataFrame (or ``{name: {column: value}}``) with columns ``x``, ``y`` and
    ``err``. The rows named in each group of ``connect`` ``{label: [row names]}`` are joined by a
    line (one sampler at several step counts); every other row is a marker of its own. ``lines``
    ``{label: value}`` are horizontal reference lines (a baseline, real data).
    """
    records = ({str(k): dict(r) for k, r in table.iterrows()} if hasattr(table, "iterrows")
               else {str(k): dict(r) for k, r in dict(table).items()})
    missing = sorted({c for c in (x, y, err) for r in records.values() if c not in r})
    if not records or missing:
        raise ValueError(f"table: expected rows with columns {x!r}, {y!r}, {err!r}; "
                         f"{'none given' if not records else f'missing {missing}'}")
    groups = {label: [str(r) for r in names] for label, names in (connect or {}).items()}
    unknown = sorted({r for names in groups.values() for r in names} - set(records))
    if unknown:
        raise ValueError(f"connect: {unknown} are not rows of the table ({', '.join(records)})")
    grouped = {r for names in groups.values() for r in names}
    col = lambda names, c: [float(records[r][c]) for r in names]                     # noqa: E731

    fig, a = plt.subplots(figsize=(5.5, 3.2), dpi=DPI)
    for label, names in groups.items():
        a.errorbar(col(names, x), col(names, y), col(names, err), fmt="o-", capsize=3, label=label)
    singles = [r for r in records if r not in grouped]
    for name, mark in zip(singles, ("s", "D", "^", "v", "P", "X", "*") * (len(singles) // 7 + 1)):
        a.errorbar(col([name], x), col([name], y), col([name], err), fmt=mark, capsize=3, label=name)
    for (label, value), (color, style) in zip((lines or {}).items(), [("grey", "--"), ("green", ":"), ("black", "-.")] * 4):
        a.axhline(float(value), color=color, ls=style, label=label)
    a.set(xscale="log" if log_x else "linear", xlabel=xlabel, ylabel=ylabel)
    a.legend(fontsize=7)
    return _done(fig)


def plot_receptive_field(seen: Any, voxel: Sequence[int], radius: int = 8, planes: int = 3) -> Figure:
    """What one output voxel of a causal 3D network reads: its receptive field, plane by plane.

    ``seen``: a (D, H, W) bool map of the input voxels the output at ``voxel`` = (d, h, w)
    depends on (e.g. :func:`~gen3d_lessons.models.pixelcnn.receptive_field`). One panel per plane,
    from ``planes - 1`` planes before the voxel's up to its own plane ``d``, each cropped to
    ``± radius`` voxels around (h, w) and drawn with ``h`` down and ``w`` to the right (raster
    order reads left to right, top to bottom); a red cross marks the voxel. Blue: read.
    """
    m = _numpy(seen, "seen")
    if m.ndim != 3:
        raise ValueError(f"seen: expected a (D, H, W) map, got shape {m.shape}")
    if len(voxel) != 3 or any(not 0 <= int(v) < n for v, n in zip(voxel, m.shape)):
        raise ValueError(f"voxel: expected (d, h, w) inside {m.shape}, got {tuple(voxel)!r}")
    d, h, w = (int(v) for v in voxel)
    if isinstance(planes, bool) or not isinstance(planes, int) or not 1 <= planes <= d + 1:
        raise ValueError(f"planes: expected 1..{d + 1} planes up to the voxel's, got {planes!r}")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius: expected a non-negative number of voxels, got {radius!r}")
    h0, w0 = max(h - radius, 0), max(w - radius, 0)                                   # crop, inside the volume
    fig, axes = plt.subplots(1, planes, figsize=(2.5 * planes, 2.7), dpi=DPI, squeeze=False)
    for ax, back in zip(axes[0], range(planes - 1, -1, -1)):
        ax.imshow(m[d - back, h0:h + radius + 1, w0:w + radius + 1].astype(float), cmap="Blues", vmin=0, vmax=1.5)
        ax.plot(w - w0, h - h0, "r+", ms=12)
        ax.set(title=f"plane d-{back}" if back else "current plane d", xlabel="w →", ylabel="← h", xticks=[], yticks=[])
    return _done(fig)


def lesion_and_worst_case(images: Any, labels: Any, preds: Mapping[str, Sequence[Any]], per_case: Any, *,
                          show: Sequence[str], model: str = "U-Net", lesion: int = 4,
                          spacing: Any = None) -> tuple[Figure, Figure]:
    """Two looks at a brain segmentation (chapter 10): the test brain with the largest lesions under
    the truth and the methods named in ``show``, on an axial slice through its lesions; then
    ``model``'s worst test brain, the one with the lowest ``per_case`` Dice (a Series indexed by
    the volume's number, e.g. :func:`gen3d_lessons.tasks.segment.dice_per_case`), with the voxels
    it gets wrong in the lesion's colour (red). ``images`` (N, C, *S) and ``labels`` (N, 1, *S) are
    tensors, ``preds[name]`` one label map per volume.
    """
    if len(images) != len(labels) or any(len(preds[name]) != len(labels) for name in [*show, model]):
        raise ValueError(f"images, labels, preds: expected one of each per volume, got {len(images)} images and "
                         f"{len(labels)} labels")
    n = int((labels == lesion).flatten(1).sum(1).argmax())                    # the test brain with the largest lesions
    first = compare_labels(images[n, 0], {"truth": labels[n, 0]} | {name: preds[name][n] for name in show},
                           focus=lesion, spacing=spacing, title=f"test brain {n}: labels over T1 (axial slice)")
    worst = int(per_case.idxmin())
    wrong = np.where(preds[model][worst] != labels[worst, 0].numpy(), lesion, 0)
    second = compare_labels(images[worst, 0], {"truth": labels[worst, 0], model: preds[model][worst], "errors": wrong},
                            spacing=spacing, title=f"the {model}'s worst test brain, {worst}: mean tissue Dice "
                            f"{per_case[worst]:.3f} (median {per_case.median():.3f}), {int((wrong > 0).sum())} "
                            "wrong voxels in red")
    return first, second


def first_and_worst_frame(images: Any, labels: Any, preds: Mapping[str, Sequence[Any]], per_frame: Any,
                          pathologies: Sequence[str], *, focus: int = 3, spacing: Any = None) -> tuple[Figure, Figure]:
    """Two test frames of a cine segmentation (chapter 10) under the truth and every method's
    labels, on the slice through label ``focus`` (the left ventricle): the first frame (ED of the
    first heart), and the worst, the lowest of ``per_frame``, a Series of mean Dice indexed by
    ``(case, phase)`` with frames stored in (ED, ES) pairs; ``pathologies[case]`` names its heart.
    """
    if len(images) != len(labels) or any(len(p) != len(labels) for p in preds.values()):
        raise ValueError(f"images, labels, preds: expected one of each per frame, got {len(images)} images and "
                         f"{len(labels)} labels")
    case, phase = per_frame.idxmin()
    return tuple(compare_labels(images[i, 0], {"truth": labels[i, 0]} | {name: p[i] for name, p in preds.items()},
                                focus=focus, spacing=spacing, title=title)
                 for i, title in ((0, "a test heart at ED"), (2 * case + (phase == "ES"), f"the worst frame: case {case} "
                                  f"({pathologies[case]}) at {phase}, mean Dice {per_frame.min():.3f} (median over "
                                  f"frames {per_frame.median():.3f})")))


def plot_sensitivity(table: Any, metrics: Mapping[str, str], *, dashed: Sequence[str] = ("copies of training",)) -> Figure:
    """How a distance grows with known damage (chapter 7): one panel per metric, one line per damage.

    ``table``: a pandas DataFrame indexed by (damage, strength) with an undamaged row
    ``("none", 0.0)`` (:func:`~gen3d_lessons.tasks.sensitivity.sensitivity_table`); ``metrics``
    ``{column: panel title}``. Each line is the metric divided by its value on the undamaged
    set, against the step of strength (0: undamaged), on a log scale: a metric that measures
    climbs at every step, one that does not stays flat or wanders. ``dashed`` damages are drawn
    dashed (copies of training brains, which a distance between distributions should not see).
    """
    if not hasattr(table, "xs") or ("none", 0.0) not in table.index:
        raise ValueError("table: expected a DataFrame indexed by (damage, strength) with a ('none', 0.0) row")
    missing = [m for m in metrics if m not in table.columns]
    if not metrics or missing:
        raise ValueError(f"metrics: expected columns of the table, missing {missing or 'all'}")
    damages = [d for d in dict.fromkeys(table.index.get_level_values(0)) if d != "none"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.0), dpi=DPI, squeeze=False)
    for a, (metric, title) in zip(axes[0], metrics.items()):
        floor = float(table.loc[("none", 0.0), metric])
        for d in damages:
            part = table.xs(d, level=0).sort_index()[metric].to_numpy(dtype=float)
            values = np.r_[floor, part] / floor if floor > 0 else np.r_[floor, part]
            a.plot(range(len(values)), values, "--" if d in dashed else "-", marker="o", ms=3, label=d)
        a.set(title=title, xlabel="step of strength (0: undamaged)", ylabel="÷ undamaged" if floor > 0 else metric)
        if floor > 0:
            a.set_yscale("log")
        a.set_xticks(range(len(part) + 1))
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _done(fig)


def plot_distributions(table: Any, value: str, *, group: str = "class", source: str = "source",
                       reference: str = "real", bins: int = 12, unit: str = "") -> Figure:
    """One panel per group (e.g. a heart's pathology class): the histogram of ``value`` for each
    source (e.g. real, generated, mean motion), on shared bins, so that a generated distribution
    too narrow, too wide or off-centre shows at a glance (chapter 7's ejection fractions).

    ``table``: a pandas DataFrame with columns ``group``, ``source`` and ``value``, one row per
    measurement; the ``reference`` source is drawn filled, the others as outlines.
    """
    missing = [c for c in (group, source, value) if not hasattr(table, "columns") or c not in table.columns]
    if missing:
        raise ValueError(f"table: expected a DataFrame with the columns {group!r}, {source!r}, {value!r}; "
                         f"missing {missing}")
    groups = list(dict.fromkeys(table[group]))
    sources = list(dict.fromkeys(table[source]))
    if not groups or reference not in sources:
        raise ValueError(f"table: expected rows of the reference source {reference!r}, found sources {sources}")
    fig, axes = plt.subplots(1, len(groups), figsize=(2.6 * len(groups), 2.6), dpi=DPI, squeeze=False)
    for a, g in zip(axes[0], groups):
        part = table[table[group] == g]
        edges = np.histogram_bin_edges(part[value].to_numpy(dtype=float), bins=bins)
        for s in [reference, *(s for s in sources if s != reference)]:
            values = part.loc[part[source] == s, value].to_numpy(dtype=float)
            if s == reference:
                a.hist(values, edges, density=True, alpha=0.35, color="0.4", label=s)
            else:
                a.hist(values, edges, density=True, histtype="step", linewidth=1.5, label=s)
        a.set(title=str(g), xlabel=f"{value} ({unit})" if unit else value, yticks=[])
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _done(fig)


def plot_by_budget(table: Any, panels: Mapping[str, Sequence[str]], *, budget: str = "labelled per class",
                   method: str = "method", value: str = "balanced accuracy") -> Figure:
    """A score against the number of labels (chapter 8's few-label study): one panel per entry of
    ``panels`` ``{title: methods}``, one line per method, the mean over draws with the standard
    deviation as error bars. ``table``: a long pandas DataFrame with columns ``budget``, ``method``
    and ``value`` (one row per draw)."""
    if not hasattr(table, "groupby") or {budget, method, value} - set(table.columns):
        raise ValueError(f"table: expected a DataFrame with columns {budget!r}, {method!r} and {value!r}")
    stats = table.groupby([method, budget])[value].agg(["mean", "std"]).fillna(0.0)
    missing = [m for methods in panels.values() for m in methods if m not in stats.index.get_level_values(0)]
    if not panels or missing:
        raise ValueError(f"panels: method {missing[0]!r} is not in the table" if missing else "panels: expected {title: methods}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), dpi=DPI, squeeze=False, sharey=True)
    for a, (title, methods) in zip(axes[0], panels.items()):
        for m in methods:
            s = stats.loc[m]
            a.errorbar(s.index.to_numpy(), s["mean"], yerr=s["std"], marker="o", ms=3, capsize=3, label=m)
        a.set(title=title, xlabel=budget, xticks=sorted(table[budget].unique()))
        a.legend(fontsize=7)
    axes[0][0].set_ylabel(f"{value} (mean ± std over draws)")
    return _done(fig)


def plot_tradeoff(table: Any, panels: Mapping[str, str], *, y: str = "Dice", logx: bool = True) -> Figure:
    """A score against what it costs (chapter 15): one panel per entry of ``panels``
    ``{x label: column}``, one labelled point per row of ``table`` (a DataFrame indexed by
    architecture). Better is up and to the left."""
    if not hasattr(table, "columns") or not isinstance(panels, Mapping) or not panels:
        raise ValueError("plot_tradeoff: expected a DataFrame and panels {x label: column}")
    missing = [c for c in [y, *panels.values()] if c not in table.columns]
    if missing:
        raise ValueError(f"plot_tradeoff: table has no column {missing[0]!r}")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=DPI, squeeze=False, sharey=True)
    try:
        for a, (xlabel, col) in zip(axes[0], panels.items()):
            for k, (name, row) in enumerate(table.iterrows()):
                a.scatter(row[col], row[y], color=f"C{k}", s=30, zorder=3)
                a.annotate(str(name), (row[col], row[y]), textcoords="offset points", xytext=(4, 4), fontsize=7)
            a.set(xlabel=xlabel, xscale="log" if logx else "linear")
            a.grid(alpha=0.3)
        axes[0][0].set_ylabel(y)
    except Exception:
        plt.close(fig)
        raise
    return _done(fig)


def plot_page_seconds(table: Any, limit: float, *, column: str = "seconds", label: str = "page") -> Figure:
    """Seconds per page (chapter 17): one horizontal bar per row of ``table`` that has
    ``column``, in the table's order, grey within ``limit`` and red beyond, with ``limit`` drawn."""
    if not hasattr(table, "columns") or column not in table.columns or label not in table.columns:
        raise ValueError(f"plot_page_seconds: expected a DataFrame with columns {label!r} and {column!r}")
    timed = table[table[column].notna()]
    fig, ax = plt.subplots(figsize=(6.4, 0.28 * max(len(timed), 2) + 0.9), dpi=DPI)
    try:
        seconds = timed[column].astype(float).to_numpy()
        ax.barh(np.arange(len(timed)), seconds, color=["0.6" if s <= limit else "C3" for s in seconds])
        ax.set_yticks(np.arange(len(timed)), [str(p) for p in timed[label]], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(limit, ls="--", c="k", lw=0.8)
        ax.set(xlabel=f"seconds (dashed: {limit:g} s)")
        ax.grid(axis="x", alpha=0.3)
    except Exception:
        plt.close(fig)
        raise
    return _done(fig)


def plot_survey_counts(table: Any, families: Sequence[str] = ("GAN", "autoencoder", "autoregressive")) -> Figure:
    """Papers per application and model family (chapter 17): grouped bars, one group per row of
    ``table`` (indexed by application), one bar per column of ``families``."""
    if not hasattr(table, "columns") or any(f not in table.columns for f in families):
        raise ValueError(f"plot_survey_counts: expected a DataFrame with columns {list(families)}")
    fig, ax = plt.subplots(figsize=(7.2, 3.2), dpi=DPI)
    try:
        x, width = np.arange(len(table)), 0.8 / len(families)
        for k, family in enumerate(families):
            ax.bar(x + (k - (len(families) - 1) / 2) * width, table[family].astype(float), width, label=family, color=f"C{k}")
        ax.set_xticks(x, [str(a) for a in table.index], rotation=25, ha="right", fontsize=7)
        ax.set(ylabel="papers in the survey's table")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    except Exception:
        plt.close(fig)
        raise
    return _done(fig)


def plot_reliability(bins: Mapping[str, tuple[Sequence, Sequence]]) -> Figure:
    """Reliability diagrams (chapter 16): one panel per entry ``{name: (bins before, bins after)}``,
    each bin ``(mean confidence, accuracy, share of voxels)``; accuracy against confidence before
    (circles) and after (crosses) calibration, the diagonal where they agree. Marker area ~ share."""
    if not isinstance(bins, Mapping) or not bins:
        raise ValueError("plot_reliability: expected {name: (bins before, bins after)}")
    fig, axes = plt.subplots(1, len(bins), figsize=(3.2 * len(bins), 3.2), dpi=DPI, squeeze=False, sharey=True)
    try:
        for a, (name, (before, after)) in zip(axes[0], bins.items()):
            a.plot([0, 1], [0, 1], ls="--", c="k", lw=0.8)
            for rows, marker, label in ((before, "o", "before"), (after, "x", "calibrated")):
                if len(rows):
                    conf, acc, share = (np.asarray(v, dtype=float) for v in zip(*rows))
                    a.scatter(conf, acc, s=10 + 300 * share, marker=marker, label=label, alpha=0.8)
            a.set(title=str(name), xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
            a.grid(alpha=0.3)
        axes[0][0].set_ylabel("accuracy")
        axes[0][0].legend(fontsize=7, loc="upper left")
    except Exception:
        plt.close(fig)
        raise
    return _done(fig)
