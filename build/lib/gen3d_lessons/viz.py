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
