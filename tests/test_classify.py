"""Chapter 8: heart cohorts, clinical features, scores, the shape VAE classifier, latent paths, classify()."""

import math

import numpy as np
import pytest
import torch

from gen3d_lessons.data.heart import HEART_CLASSES
from gen3d_lessons.models.shape_classifier import ImageCNN3D, ImageCNNConfig, ShapeVAEClassifier, ShapeVAEConfig
from gen3d_lessons.tasks import classify as C
from gen3d_lessons.training.classification import shape_vae_step, train_classifier, train_shape_vae


def _box_heart(lv=4, wall=2, n=16):
    """ED and ES label maps: an LV cube (side lv at ED, lv - 2 at ES) in a MYO shell of width wall, RV beside."""
    lab = np.zeros((2, n, n, n), np.int64)
    c = n // 2
    for f, side in enumerate((lv, lv - 2)):
        lo, hi = c - side // 2, c - side // 2 + side
        lab[f, lo - wall:hi + wall, lo - wall:hi + wall, lo - wall:hi + wall] = 2
        lab[f, lo:hi, lo:hi, lo:hi] = 3
        lab[f, 1:3, 1:3, 1:3 + f] = 1
    return lab


def test_heart_shapes_is_balanced_and_indexable():
    h = C.heart_shapes(1, seed=5, size=16, fov_mm=140.0, desc="test")
    assert len(h) == 5 and h.classes.tolist() == [0, 1, 2, 3, 4]
    assert h.labels.shape == (5, 2, 16, 16, 16) and h.labels.dtype == torch.int64 and h.images.dtype == torch.float32
    assert h.labels.max() == 3 and [a["pathology"] for a in h.attributes] == list(HEART_CLASSES)
    sub = h[h.classes >= 3]
    assert len(sub) == 2 and sub.attributes[0]["pathology"] == "MINF" and torch.equal(sub.labels, h.labels[3:])
    with pytest.raises(ValueError, match="n_per_class: expected a positive integer"):
        C.heart_shapes(0, seed=0)


def test_clinical_features_measure_known_boxes():
    f = C.clinical_features(_box_heart(lv=4, wall=2), spacing=(1.0, 1.0, 2.0))
    row = f.iloc[0]
    assert row["LV EDV (ml)"] == pytest.approx(64 * 2 / 1000) and row["LV ESV (ml)"] == pytest.approx(8 * 2 / 1000)
    assert row["LV EF (%)"] == pytest.approx(100 * (64 - 8) / 64)
    assert row["RV EDV (ml)"] == pytest.approx(8 * 2 / 1000) and row["RV EF (%)"] == pytest.approx(100 * (8 - 12) / 8)
    assert row["myocardial mass (g)"] == pytest.approx(1.05 * (8 ** 3 - 4 ** 3) * 2 / 1000)
    thin, thick = (C.clinical_features(_box_heart(wall=w), 1.0)["max wall thickness (mm)"][0] for w in (1, 3))
    assert 0 < thin < thick
    empty = np.zeros((2, 8, 8, 8), np.int64)
    assert math.isnan(C.clinical_features(empty, 1.0)["LV EF (%)"][0])


@pytest.mark.parametrize("labels, match", [
    (np.zeros((3, 8, 8, 8), np.int64), r"expected ED and ES label maps"),
    (np.zeros((2, 8, 8, 8), np.float32), r"expected integer labels"),
    (np.full((2, 8, 8, 8), 5), r"expected labels 0..3"),
])
def test_clinical_features_refuse_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        C.clinical_features(labels, 1.0)
    with pytest.raises(ValueError, match="spacing"):
        C.clinical_features(np.zeros((2, 8, 8, 8), np.int64), (1.0, 0.0, 1.0))


def test_class_scores_and_score_table():
    t = np.array([0, 1, 2, 3, 4] * 4)
    p = t.copy()
    p[0] = 1                                                   # one NOR called HCM
    s = C.class_scores(t, p)
    assert s["per class"].loc["NOR", "sensitivity"] == 0.75 and s["per class"].loc["HCM", "specificity"] == 15 / 16
    assert s["balanced accuracy"] == pytest.approx((0.75 + 4) / 5) and s["confusion"].loc["true NOR", "HCM"] == 1
    table = C.score_table(t, {"perfect": t, "one wrong": p}, folds=2)
    assert table.loc["perfect", "std over folds"] == 0 and table.loc["one wrong", "mean over folds"] < 1
    assert table.loc["one wrong", "sensitivity NOR"] == 0.75
    with pytest.raises(ValueError, match="folds"):
        C.score_table(t, {"x": t}, folds=5)                     # 20 hearts: only 4 rounds of the classes
    with pytest.raises(ValueError, match="class indices 0..4"):
        C.class_scores([0, 7], [0, 1])


def _model(size=16):
    torch.manual_seed(0)
    return ShapeVAEClassifier(ShapeVAEConfig(size=size, channels=(8, 16), latent_dim=4, hidden=8))


def test_shape_vae_classifier_shapes_and_input_checks():
    m = _model()
    labels = torch.from_numpy(np.stack([_box_heart(), _box_heart(lv=6)]))
    logits, mu, logvar, cls = m(labels)
    assert logits.shape == (2, 2, 4, 16, 16, 16) and mu.shape == (2, 4) and cls.shape == (2, 5)
    assert torch.allclose(m.predict_proba(labels).sum(1), torch.ones(2))
    assert m.decode_labels(mu).shape == (2, 2, 16, 16, 16)
    with pytest.raises(ValueError, match=r"expected label volumes \(B, 2, 16, 16, 16\)"):
        m(labels[:, :1])
    with pytest.raises(ValueError, match="expected integer labels"):
        m(labels.float())
    with pytest.raises(ValueError, match="expected values in 0..3"):
        m(labels + 1)


def test_joint_training_lowers_both_losses():
    labels = torch.from_numpy(np.stack([_box_heart(lv=4), _box_heart(lv=6)] * 4))
    classes = torch.tensor([0, 2] * 4)
    m = _model()
    h = train_shape_vae(m, labels, classes, steps=40, batch=4, lr=5e-3, class_weight=1.0, desc="test")
    assert np.mean(h.values["rec"][-5:]) < 0.5 * h.values["rec"][0]
    assert np.mean(h.values["ce"][-5:]) < h.values["ce"][0]
    with pytest.raises(ValueError, match="expected a dict with 'x'"):
        shape_vae_step({"labels": labels}, 0, model=m, optimizer=torch.optim.SGD(m.parameters(), 0.0))


def test_latent_path_climbs_the_class_probability():
    m = _model()
    heart = torch.from_numpy(_box_heart())
    codes, decoded = C.latent_path(m, heart, target=3, steps=4, step_size=0.5)
    assert codes.shape == (5, 4) and decoded.shape == (5, 2, 16, 16, 16)
    log_p = torch.log_softmax(m.head(codes), 1)[:, 3].detach()
    assert (log_p[1:] > log_p[:-1]).all()
    assert torch.allclose((codes[1:] - codes[:-1]).norm(dim=1), torch.full((4,), 0.5), atol=1e-4)
    with pytest.raises(ValueError, match="target: expected a class index 0..4"):
        C.latent_path(m, heart, target=7)


def test_path_trend():
    assert C.path_trend([1, 2, 3, 5]) == pytest.approx(1.0) and C.path_trend([4, 3, 2]) == pytest.approx(-1.0)
    assert math.isnan(C.path_trend([2, 2, 2]))
    with pytest.raises(ValueError, match="at least 3"):
        C.path_trend([1, 2])


def test_classify_answers_with_a_class_and_refuses_bad_input():
    m = _model()
    ed, es = _box_heart()
    out = C.classify(m, ed, es)
    assert out["class"] in HEART_CLASSES and sum(out["probabilities"].values()) == pytest.approx(1.0)
    assert C.classify(m, ed.astype(np.float32), es)["class"] == out["class"]        # whole numbers as floats are fine
    for kwargs, match in [(dict(ed=ed, es=None), "es: missing"), (dict(ed=ed[:8], es=es), r"ed: expected a label map of shape \(16, 16, 16\)"),
                          (dict(ed=ed + 0.5, es=es), "fractional"), (dict(ed=ed * 3, es=es), "expected labels 0..3")]:
        with pytest.raises(ValueError, match=match):
            C.classify(m, **kwargs)
    with pytest.raises(ValueError, match="classes: expected 5 names"):
        C.classify(m, ed, es, classes=("A", "B"))


def test_image_cnn_learns_bright_from_dark():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 2, 8, 8, 8, generator=g) * 0.2
    y = torch.arange(16) % 2
    x[y == 1] += 0.5
    torch.manual_seed(0)
    cnn = ImageCNN3D(ImageCNNConfig(classes=2, channels=(4, 8)))
    train_classifier(cnn, x, y, steps=30, batch=8, lr=1e-2, desc="test")
    assert (cnn.predict_proba(x).argmax(1) == y).float().mean() == 1.0
    with pytest.raises(ValueError, match=r"expected images \(B, 2, D, H, W\)"):
        cnn(x[:, :1])


def test_a_saved_classifier_comes_back_and_a_missing_one_names_the_page(tmp_path):
    from gen3d_lessons.training import save_model

    m = _model()
    save_model(tmp_path / "clf.pt", m, m.cfg)
    back = C.load_classifier(tmp_path / "clf.pt")
    ed, es = _box_heart()
    assert C.classify(back, ed, es) == C.classify(m, ed, es)
    with pytest.raises(FileNotFoundError, match="gen3d run ch08_classification"):
        C.load_classifier(tmp_path / "nothing.pt")
