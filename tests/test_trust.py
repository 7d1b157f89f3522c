"""Chapter 16's site renders, harmonisation, uncertainty and explanation helpers (tasks/trust.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gen3d_lessons.data.brain import BrainConfig, make_brain_dataset
from gen3d_lessons.models.unet import UNet3D, UNetConfig
from gen3d_lessons.tasks import trust


@pytest.fixture(scope="module")
def tiny_brains(tmp_path_factory):
    return make_brain_dataset(tmp_path_factory.mktemp("brains") / "brain", n=2, size=16, seed=0, progress=False)


def test_site_renders_keep_the_anatomy_and_change_the_scanner(tiny_brains):
    images, labels, attrs = trust.site_renders(tiny_brains, 2)
    sites = len(BrainConfig().sites)
    assert images.shape == (sites, 2, 4, 16, 16, 16) and labels.shape == (2, 1, 16, 16, 16) and len(attrs) == 2
    assert labels.dtype == torch.int64 and not torch.equal(images[0], images[1])
    again = trust.site_renders(tiny_brains, 2)
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)      # seeded: the same brains
    x, y = trust.lesion_brain(tiny_brains, site=1)
    assert x.shape == (1, 4, 16, 16, 16) and (y == 4).any()
    with pytest.raises(ValueError, match="n: expected a positive number"):
        trust.site_renders(tiny_brains, 0)


def test_intensity_augment_changes_intensities_not_labels_or_background():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 4, 8, 8, 8) + 0.1
    image[:, :, :2] = 0                                                          # background
    label = torch.randint(0, 5, (2, 1, 8, 8, 8))
    out = trust.intensity_augment({"image": image, "label": label}, g)
    assert out["image"].shape == image.shape and not torch.allclose(out["image"].abs(), image)
    for x in out["image"]:                                                       # each crop flipped or not
        assert (x[:, :2] == 0).all() or (x[:, -2:] == 0).all()
    assert sorted(out["label"].flatten().tolist()) == sorted(label.flatten().tolist())


def test_match_histograms_maps_onto_the_reference_quantiles():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 1, 8, 8, 8, generator=g) + 1.0                          # values in [1, 2]
    x = (torch.rand(2, 1, 8, 8, 8, generator=g) ** 3) * 10                      # another scale and shape
    x[0, 0, 0] = 0
    out = trust.match_histograms(x, ref)
    inside = out[x != 0]
    assert inside.min() >= 0.99 and inside.max() <= 2.01 and (out[x == 0] == 0).all()
    assert torch.equal(out[1].flatten().argsort(), x[1].flatten().argsort())     # monotone: the order is kept
    with pytest.raises(ValueError, match="the same contrasts"):
        trust.match_histograms(x, torch.rand(1, 2, 8, 8, 8))


def _probs(p_right: float, n: int = 1000) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two classes, every voxel says class 0 with probability p_right; a share p_right is class 0."""
    probs = torch.tensor([p_right, 1 - p_right]).view(1, 2, 1, 1, 1).expand(1, 2, n, 1, 1).clone()
    labels = (torch.arange(n) >= round(p_right * n)).long().view(1, 1, n, 1, 1)
    return probs, labels, torch.ones_like(labels)


def test_a_calibrated_prediction_has_zero_ece_and_an_overconfident_one_does_not():
    probs, labels, mask = _probs(0.8)
    assert trust.calibration(probs, labels, mask)["ece"] == pytest.approx(0.0, abs=1e-6)
    sure = trust.tempered(probs, 0.25)                                           # sharpened: p(class 0) ~ 1
    assert trust.calibration(sure, labels, mask)["ece"] == pytest.approx(float(sure[0, 0].max()) - 0.8, abs=1e-4)
    assert trust.fit_temperature(sure, labels, mask) == pytest.approx(4.0)        # undoes the sharpening
    with pytest.raises(ValueError, match="temperature"):
        trust.tempered(probs, 0)


def test_error_auroc_is_one_when_uncertainty_marks_the_errors():
    probs = torch.tensor([[0.99, 0.01], [0.6, 0.4], [0.98, 0.02], [0.55, 0.45]]).T.reshape(1, 2, 4, 1, 1)
    labels = torch.tensor([0, 1, 0, 1]).view(1, 1, 4, 1, 1)                      # the unsure voxels are the wrong ones
    assert trust.error_auroc(probs, labels, torch.ones_like(labels)) == 1.0
    assert math.isnan(trust.error_auroc(probs, torch.zeros_like(labels), torch.ones_like(labels)))   # all right


def test_mc_dropout_samples_and_leaves_the_model_as_found():
    torch.manual_seed(0)
    model = UNet3D(UNetConfig(in_channels=1, out_channels=2, features=(4, 8), norm="batch", dropout=0.5))
    with torch.no_grad():
        model.down[-1][-1].p = 0.5
        model.up[0].weight.mul_(1e3)                                              # let the bottleneck matter
    x = torch.randn(2, 1, 8, 8, 8)
    one = trust.mean_probabilities([model], x)                                    # leaves it in eval mode
    a, b = (trust.mc_dropout_probabilities(model, x, 3, seed=s) for s in (0, 1))
    assert not torch.allclose(a, one) and not torch.allclose(a, b)
    model.train()
    assert torch.equal(a, trust.mc_dropout_probabilities(model, x, 3, seed=0))   # seeded; batch norm still in eval
    assert all(m.training for m in model.modules())                               # modes restored (all train)
    with pytest.raises(ValueError, match="no dropout"):
        with trust.dropout_on(UNet3D(UNetConfig(in_channels=1, out_channels=2, features=(4, 8)))):
            pass


def test_enrichment_and_input_gradient():
    sal = torch.zeros(1, 4, 4, 4)
    sal[0, :2] = 1.0                                                             # all saliency on half the volume
    region, within = torch.zeros_like(sal, dtype=torch.bool), torch.ones_like(sal, dtype=torch.bool)
    region[0, :2] = True
    assert trust.enrichment(sal, region, within) == pytest.approx(2.0)
    x = torch.randn(1, 2, 4, 4, 4)
    grad = trust.input_gradient(lambda v: (v[:, 0] * 3).sum(), x)
    assert grad.shape == (1, 4, 4, 4) and torch.allclose(grad, torch.full_like(grad, 3.0))
    with pytest.raises(ValueError, match="holds no voxel"):
        trust.enrichment(sal, torch.zeros_like(region), within)


def test_site_and_subgroup_tables(tiny_brains):
    images, labels, attrs = trust.site_renders(tiny_brains, 2)
    torch.manual_seed(0)
    model = UNet3D(UNetConfig(in_channels=4, out_channels=5, features=(4, 8), norm="batch")).eval()
    table, per_brain = trust.site_table({"a": (model, None), "b": (model, lambda v: v)}, images, labels, reference=0)
    assert list(table.index) == ["a", "b"] and per_brain["a"].shape == (len(images), 2)
    assert np.allclose(table.loc["a"].to_numpy(), table.loc["b"].to_numpy(), equal_nan=True)
    assert table.loc["a", "worst gap"] == max(table.loc["a", "gap, site 1"], table.loc["a", "gap, site 2"])
    groups = trust.subgroup_table(per_brain["a"], attrs)
    assert list(groups.index) == ["older half", "younger half", "with lesions", "without lesions"]
    assert groups.loc["older half", "brains"] + groups.loc["younger half", "brains"] == 2
