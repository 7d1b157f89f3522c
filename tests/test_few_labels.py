"""Chapter 8, few labels: the deformation CVAE, same-class pairs, subsets, random warps, segment_hearts."""

import numpy as np
import pytest
import torch

from gen3d_lessons.models.shape_classifier import one_hot_hearts
from gen3d_lessons.models.shape_generator import DeformationCVAE, DeformationCVAEConfig, most_likely_labels
from gen3d_lessons.tasks import classify as C
from gen3d_lessons.training.classification import same_class_pairs, train_deformation_cvae

SMALL = DeformationCVAEConfig(latent_dim=4, channels=(8, 8), hidden=8, train_size=8, flow_grid=4)


def _hearts(n=4, size=16):
    """Boxes of labels (N, 2, size³): an LV cube in a MYO shell, an RV slab beside it; sizes differ per heart."""
    lab = torch.zeros(n, 2, size, size, size, dtype=torch.int64)
    for i in range(n):
        for f in range(2):
            r = 3 + (i % 2) - f
            c = size // 2
            lab[i, f, c - r - 1:c + r + 1, c - r - 1:c + r + 1, c - r - 1:c + r + 1] = 2
            lab[i, f, c - r:c + r, c - r:c + r, c - r:c + r] = 3
            lab[i, f, 1:3, c - 2:c + 2, c - 2:c + 2] = 1
    return lab


def test_one_hot_hearts_layout_and_errors():
    x = one_hot_hearts(_hearts(2))
    assert x.shape == (2, 8, 16, 16, 16) and torch.equal(x.sum(1), torch.full((2, 16, 16, 16), 2.0))
    assert torch.equal(x[:, 4:].argmax(1), _hearts(2)[:, 1])                   # channels 4..7: the ES frame
    assert torch.equal(most_likely_labels(0.5 * x + 0.1 * torch.rand_like(x)), _hearts(2))
    with pytest.raises(ValueError, match="integer labels"):
        one_hot_hearts(_hearts(1).float())
    with pytest.raises(ValueError, match="values in 0..3"):
        one_hot_hearts(_hearts(1) + 1)
    with pytest.raises(ValueError, match="label volumes"):
        one_hot_hearts(_hearts(1)[0])


def test_an_untrained_generator_returns_its_source_and_checks_its_input():
    model = DeformationCVAE(SMALL)
    src, c = _hearts(3), torch.tensor([0, 1, 4])
    made, v = model.sample(src, c, generator=torch.Generator().manual_seed(0))
    assert torch.equal(made, src) and v.shape == (3, 6, 4, 4, 4) and v.abs().max() == 0   # zero velocities at init
    with pytest.raises(ValueError, match="class indices 0..4"):
        model.sample(src, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="one class index per heart"):
        model.sample(src, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="train_size 10 must be divisible"):
        DeformationCVAEConfig(channels=(8, 8), train_size=10)


def test_same_class_pairs():
    i, j = same_class_pairs(torch.tensor([0, 1, 0, 0]))
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (0, 3), (2, 0), (2, 3), (3, 0), (3, 2)]
    with pytest.raises(ValueError, match="at least two hearts of one class"):
        same_class_pairs(torch.tensor([0, 1, 2]))


def test_training_the_generator_brings_a_source_closer_to_its_target():
    torch.manual_seed(0)
    lab, c = _hearts(4), torch.tensor([0, 0, 0, 0])
    model = DeformationCVAE(SMALL)
    x = torch.nn.functional.adaptive_avg_pool3d(one_hot_hearts(lab), 8)
    def gap():                                                                 # the warped source vs the target, eval mode
        model.eval()
        with torch.no_grad():
            warped, target, *_ = model(x[[0, 1]], x[[1, 0]], c[:2])
        return float((warped - target).abs().mean())
    before = gap()
    history = train_deformation_cvae(model, lab, c, steps=60, batch=4, lr=5e-3, desc="test")
    assert history.steps == 60 and gap() < 0.8 * before
    made, _ = model.sample(lab, c, generator=torch.Generator().manual_seed(1))
    assert made.shape == lab.shape and made.dtype == torch.int64 and made.max() <= 3


def test_labelled_subset_draws_the_same_hearts_for_the_same_seed():
    shapes = C.HeartShapes(_hearts(10), torch.zeros(10, 2, 16, 16, 16), torch.arange(10) % 5, (1.0, 1.0, 2.0),
                           [{} for _ in range(10)])
    a, b = C.labelled_subset(shapes, 2, seed=3), C.labelled_subset(shapes, 2, seed=3)
    assert torch.equal(a.classes, torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])) and torch.equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="n_per_class: expected 1..2"):
        C.labelled_subset(shapes, 3, seed=0)


def test_random_warps_keep_labels_and_zero_amplitude_is_the_identity():
    lab = _hearts(2)
    assert torch.equal(C.random_warps(lab, 0.0, flow_grid=4), lab)
    moved = C.random_warps(lab, 0.5, torch.Generator().manual_seed(0), flow_grid=4)
    assert moved.shape == lab.shape and set(moved.unique().tolist()) <= {0, 1, 2, 3} and not torch.equal(moved, lab)
    with pytest.raises(ValueError, match="amplitude"):
        C.random_warps(lab, -1.0)


def test_segment_hearts_runs_every_frame_and_refuses_labels():
    class Threshold(torch.nn.Module):                                          # 1 channel -> 4 logits: label = round(x)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.cat([-(x - k).abs() for k in range(4)], 1) + 0 * self.w

    images = _hearts(3).float()
    assert torch.equal(C.segment_hearts(Threshold(), images, batch_size=4), _hearts(3))
    with pytest.raises(ValueError, match="float images"):
        C.segment_hearts(Threshold(), _hearts(3))


def test_plot_by_budget_draws_one_line_per_method_and_names_a_missing_one():
    import matplotlib.pyplot as plt
    import pandas as pd
    from gen3d_lessons.viz import plot_by_budget

    table = pd.DataFrame([{"labelled per class": n, "draw": d, "method": m, "balanced accuracy": 0.5 + 0.01 * n + 0.01 * d}
                          for n in (2, 5) for d in range(2) for m in ("a", "b")])
    fig = plot_by_budget(table, {"first": ["a", "b"], "second": ["b"]})
    assert len(fig.axes) == 2 and len(fig.axes[0].containers) == 2
    with pytest.raises(ValueError, match="method 'c' is not in the table"):
        plot_by_budget(table, {"first": ["c"]})
    assert not plt.get_fignums()                                               # closed, and none left open by the error
    with pytest.raises(ValueError, match="expected a DataFrame with columns"):
        plot_by_budget(table.drop(columns="method"), {"first": ["a"]})


def test_one_few_label_draw_scores_every_method():
    lab = torch.cat([_hearts(2) for _ in range(5)])                             # two hearts of each class, classes in turn
    classes = torch.arange(10) % 5
    shapes = C.HeartShapes(lab, torch.zeros(10, 2, 16, 16, 16), classes, (4.0, 4.0, 8.0), [{} for _ in range(10)])
    scores, made = C.few_label_draw(shapes, shapes, 2, 0, generator_cfg=SMALL, generator_steps=2, cnn_channels=(4, 4),
                                    cnn_steps=2, n_synthetic=2)
    assert set(scores) == {f"clinical LR, {s}" for s in ("real", "generated", "warped")} | {
        f"CNN, {s}" for s in ("real", "real, shifted", "warped", "generated", "generated, shifted")}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert made["generated"].shape == (10, 2, 16, 16, 16) and made["classes"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
