"""Figures and players: they draw without error, respect spacing and label colours, refuse bad input."""

import re

import matplotlib

matplotlib.use("Agg")  # tests only: no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from IPython.display import HTML  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from gen3d_lessons import viz  # noqa: E402
from gen3d_lessons.training import History  # noqa: E402


@pytest.fixture(autouse=True)
def static_book(monkeypatch):
    monkeypatch.setenv("GEN3D_STATIC", "1")
    yield
    plt.close("all")


def volume(shape=(16, 16, 16)):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return np.exp(-(x ** 2 + y ** 2 + z ** 2) * 2).astype(np.float32)


def labels(shape=(16, 16, 16)):
    lab = np.zeros(shape, dtype=np.int64)
    lab[4:12, 4:12, 4:12] = 1
    lab[6:10, 6:10, 6:10] = 3
    return lab


def images_of(fig):
    return [im for ax in fig.axes for im in ax.get_images()]


def test_orthogonal_slices_draws_three_closed_panels():
    fig = viz.orthogonal_slices(torch.from_numpy(volume()), title="phantom")
    assert isinstance(fig, Figure)
    assert [ax.get_title() for ax in fig.axes] == ["axial z=8", "coronal y=8", "sagittal x=8"]
    assert not plt.get_fignums()                       # closed: a notebook shows it once
    assert viz.orthogonal_slices(volume()[None, None], index=(2, None, 5)).axes[2].get_title() == "sagittal x=2"


def test_slices_follow_spacing():
    fig = viz.orthogonal_slices(np.zeros((16, 12, 8)) + volume((16, 12, 8)), spacing=(1.0, 2.0, 4.0))
    axial, coronal, sagittal = fig.axes
    assert axial.get_aspect() == pytest.approx(2.0)     # y over x
    assert coronal.get_aspect() == pytest.approx(4.0)   # z over x
    assert sagittal.get_aspect() == pytest.approx(2.0)  # z over y
    # the axial panel shows x left → right and y bottom → top
    assert axial.get_images()[0].get_array().shape == (12, 16)
    assert viz.montage(volume(), axis=0, n=4, spacing=(1, 1, 3)).axes[0].get_aspect() == pytest.approx(3.0)


def test_label_overlay_colours():
    fig = viz.orthogonal_slices(volume(), label=labels())
    overlay = fig.axes[0].get_images()[1].get_array()   # (H, W, 4) RGBA of the axial labels
    assert overlay[8, 8, :3].tolist() == pytest.approx(viz.label_color(3))
    assert overlay[5, 5, :3].tolist() == pytest.approx(viz.label_color(1))
    assert overlay[0, 0, 3] == 0 and overlay[8, 8, 3] == pytest.approx(0.4)   # 0 is transparent
    assert viz.label_color(1) != viz.label_color(3)
    assert viz.label_color(11) == viz.label_color(1)                        # the palette cycles


def test_montage_overlay_compare():
    fig = viz.montage(volume(), n=12, label=labels())
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 12 and titles[0] != "z=0"      # the empty edge slice is skipped
    assert len(viz.montage(volume((4, 4, 4)), n=12).axes) == 4   # cannot show more slices than exist

    fig = viz.overlay(volume()[:, :, 8], labels()[:, :, 8], alpha=0.6)
    rgba = images_of(fig)[1].get_array()
    assert rgba[8, 8, 3] == pytest.approx(0.6)

    vols = {"target": volume(), "model": volume() * 0.9, "baseline": volume() * 0.5}
    fig = viz.compare(vols, labels={"target": labels()})
    assert [ax.get_title() for ax in fig.axes] == list(vols)
    climits = {im.get_clim() for im in images_of(fig) if im.get_array().ndim == 2}
    assert len(climits) == 1                             # one shared grey scale


def test_plot_history_forms():
    h = History()
    for i in range(120):
        h.record({"loss": 1.0 / (i + 1), **({"g": 0.5} if i % 5 == 0 else {})})
    fig = viz.plot_history(h, log=True)
    assert [ax.get_title() for ax in fig.axes] == ["loss", "g"] and fig.axes[0].get_yscale() == "log"
    assert len(viz.plot_history(h.to_dict(), keys=["g"]).axes) == 1
    assert len(viz.plot_history({"a": [1, 2, 3]}).axes) == 1
    with pytest.raises(ValueError, match="keys.*available: loss, g"):
        viz.plot_history(h, keys=["kl"])


def n_frames(html: str) -> int:
    return int(re.search(r"new Array\((\d+)\)", html).group(1))


def test_cine_is_a_scrubbable_html_player():
    frames = np.stack([volume() * (1 + 0.1 * t) for t in range(5)])            # (T, X, Y, Z)
    out = viz.cine(torch.from_numpy(frames), label=np.stack([labels()] * 5))
    assert isinstance(out, HTML)
    html = out.data
    assert '<input' in html and 'type="range"' in html
    assert n_frames(html) == 5
    assert "font-awesome" not in html and "cdn" not in html.lower()            # works offline
    assert len(html) < 300_000
    assert not plt.get_fignums()
    # time last works the same
    assert n_frames(viz.cine(np.moveaxis(frames, 0, -1), time_axis=-1).data) == 5


def test_slice_scrubber_static_and_live(monkeypatch):
    out = viz.slice_scrubber(volume((16, 16, 10)), label=labels((16, 16, 10)), axis=2)
    assert isinstance(out, HTML) and 'type="range"' in out.data
    assert n_frames(out.data) == 10                      # one frame per axial slice
    assert n_frames(viz.slice_scrubber(volume(), max_frames=4).data) == 4

    import ipywidgets
    monkeypatch.setattr(viz, "in_live_kernel", lambda: True)
    live = viz.slice_scrubber(volume(), axis=1)
    assert isinstance(live, ipywidgets.Widget)
    slider = live.children[0]
    assert (slider.min, slider.max, slider.value) == (0, 15, 8)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="volume: expected a 3D"):
        viz.orthogonal_slices(np.zeros((16, 16)))
    bad = volume()
    bad[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="volume: contains 1 NaN"):
        viz.montage(bad)
    with pytest.raises(ValueError, match="label: shape"):
        viz.orthogonal_slices(volume(), label=labels((8, 8, 8)))
    with pytest.raises(ValueError, match="label: labels must be"):
        viz.slice_scrubber(volume(), label=-labels())
    with pytest.raises(ValueError, match="spacing"):
        viz.orthogonal_slices(volume(), spacing=(1, 1))
    with pytest.raises(ValueError, match="axis"):
        viz.montage(volume(), axis=3)
    with pytest.raises(ValueError, match=r"volumes\['b'\]: shape"):
        viz.compare({"a": volume(), "b": volume((8, 8, 8))})
    with pytest.raises(ValueError, match="labels: names"):
        viz.compare({"a": volume()}, labels={"z": labels()})
    with pytest.raises(ValueError, match="frames: expected a 4D"):
        viz.cine(volume())
    with pytest.raises(ValueError, match="label2d: shape"):
        viz.overlay(volume()[:, :, 0], labels()[:8, :, 0])
    with pytest.raises(ValueError, match="index"):
        viz.compare({"a": volume()}, index=16)


def test_plot_scaling_draws_one_line_per_dimension_and_names_missing_columns():
    from gen3d_lessons.viz import plot_scaling
    rows = [{"dims": d, "voxels": e ** d, "memory_MB": 0.1 * e ** d, "s_per_step": 1e-4 * e ** d} for d in (2, 3) for e in (8, 16)]
    fig = plot_scaling(rows)
    assert len(fig.axes) == 2 and all(len(a.lines) == 2 for a in fig.axes)
    with pytest.raises(ValueError, match="missing"):
        plot_scaling([{"dims": 2, "voxels": 64}])


def test_difference_maps_one_symmetric_scale_and_one_colour_bar():
    ref = volume()
    fig = viz.difference_maps({"a": ref + 0.1, "b": ref - 0.3}, ref, index=8, title="error")
    images = [a.images[0] for a in fig.axes if a.images]
    assert isinstance(fig, Figure) and len(images) == 2 and len(fig.axes) == 3          # two panels + the colour bar
    assert all(im.get_clim() == pytest.approx((-0.3, 0.3)) for im in images)          # the largest difference shown
    assert np.allclose(images[0].get_array(), 0.1, atol=1e-6)
    assert viz.difference_maps({"a": ref}, ref, limit=0.1).axes[0].images[0].get_clim() == pytest.approx((-0.1, 0.1))
    with pytest.raises(ValueError, match="reference's"):
        viz.difference_maps({"a": volume((8, 8, 8))}, ref)
    with pytest.raises(ValueError, match="limit"):
        viz.difference_maps({"a": ref}, ref, limit=0)
    with pytest.raises(ValueError, match="non-empty"):
        viz.difference_maps({}, ref)


def test_line_profiles_one_curve_per_volume_bold_ones_thicker():
    fig = viz.line_profiles({"a": np.linspace(0, 1, 9), "b": torch.zeros(9)}, np.linspace(-2, 2, 9), bold=("b",))
    lines = fig.axes[0].lines
    assert [l.get_label() for l in lines] == ["a", "b"] and lines[1].get_linewidth() > lines[0].get_linewidth()
    assert lines[0].get_xdata()[0] == -2
    with pytest.raises(ValueError, match="9 samples"):
        viz.line_profiles({"a": np.zeros(9), "b": np.zeros(5)})
    with pytest.raises(ValueError, match="positions"):
        viz.line_profiles({"a": np.zeros(9)}, positions=np.zeros(3))
    with pytest.raises(ValueError, match="bold"):
        viz.line_profiles({"a": np.zeros(9)}, bold=("c",))


def test_lesion_and_worst_case_and_first_and_worst_frame_two_figures_each():
    import pandas as pd

    labels = torch.zeros(3, 1, 8, 8, 8, dtype=torch.long)
    labels[:, 0, 2:6, 2:6, 2:6] = 3
    labels[1, 0, 3:5, 3:5, 3:5] = 4                                              # brain 1 has the lesion
    images = labels.float()
    preds = {"U-Net": list(labels[:, 0].numpy()), "atlas": list(np.zeros((3, 8, 8, 8), dtype=int))}
    per_case = pd.Series([0.9, 0.8, 0.95], index=pd.Index([0, 1, 2], name="case"))
    first, second = viz.lesion_and_worst_case(images, labels, preds, per_case, show=["U-Net", "atlas"])
    assert isinstance(first, Figure) and "test brain 1" in first._suptitle.get_text()
    assert "worst test brain, 1" in second._suptitle.get_text() and "0 wrong voxels" in second._suptitle.get_text()
    per_frame = pd.Series([0.9, 0.7, 0.8, 0.95], index=pd.MultiIndex.from_tuples(
        [(0, "ED"), (0, "ES"), (1, "ED"), (1, "ES")], names=["case", "phase"]))
    frames = torch.zeros(4, 1, 8, 8, 8, dtype=torch.long)
    a, b = viz.first_and_worst_frame(frames.float(), frames, {"U-Net": list(frames[:, 0].numpy())}, per_frame,
                                     ["normal", "hypertrophy"])
    assert "at ED" in a._suptitle.get_text() and "case 0 (normal) at ES" in b._suptitle.get_text()
    with pytest.raises(ValueError, match="one of each"):
        viz.lesion_and_worst_case(images[:2], labels, preds, per_case, show=["U-Net"])


def test_plot_distributions_one_panel_per_group_and_the_reference_filled():
    import pandas as pd

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"class": ["NOR"] * 20 + ["DCM"] * 20, "source": (["real"] * 10 + ["generated"] * 10) * 2,
                          "EF": np.r_[rng.normal(60, 3, 20), rng.normal(25, 5, 20)]})
    fig = viz.plot_distributions(table, "EF", unit="%")
    assert [a.get_title() for a in fig.axes] == ["NOR", "DCM"] and fig.axes[0].get_xlabel() == "EF (%)"
    with pytest.raises(ValueError, match="missing"):
        viz.plot_distributions(table, "ESV")
    with pytest.raises(ValueError, match="reference source"):
        viz.plot_distributions(table, "EF", reference="truth")
