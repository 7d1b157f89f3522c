"""Chapter 17's gathering of every page's result (gen3d_lessons.tasks.conclusion)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gen3d_lessons.book import record
from gen3d_lessons.book.curriculum import SURVEY_TABLES
from gen3d_lessons.book.paths import CHAPTER_ENV, PROFILE_ENV, RESULTS_ENV
from gen3d_lessons.tasks import conclusion as C
from gen3d_lessons.viz import plot_page_seconds, plot_survey_counts


@dataclass(frozen=True)
class Page:
    number: int
    name: str
    title: str = "a page"


PAGES = [Page(3, "ch03_gans"), Page(11, "ch11_denoising"), Page(12, "ch12_anomaly"), Page(13, "ch13_registration"),
         Page(17, "ch17_conclusion")]


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    monkeypatch.delenv(CHAPTER_ENV, raising=False)
    monkeypatch.delenv("GEN3D_MAX_STEPS", raising=False)
    monkeypatch.setenv(PROFILE_ENV, "cpu")
    record("ch03_gans", dict(metric="FD of the best GAN (WGAN-GP) / FD of mean + noise", value=0.4, gate=0.6, goal=0.5,
                             higher_is_better=False),
           checks=[dict(metric="below PCA", value=False, goal=True)])
    record("ch11_denoising", dict(metric="PSNR gain of the DAE over the best Gaussian (dB)", value=1.5, gate=1.0, goal=2.0))
    monkeypatch.setenv(PROFILE_ENV, "smoke")
    record("ch13_registration", dict(metric="mean Dice, VoxelMorph", value=0.1, gate=0.7, goal=0.8))
    for name, seconds in (("ch03_gans", 120.0), ("ch11_denoising", 180.0)):   # as the book runner adds them
        import json
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "seconds": seconds}))
    return tmp_path


def test_family_of_reads_the_model_a_headline_names():
    assert C.family_of("FD of the best generator (3D StyleGAN2) / FD of mean + noise") == "GAN"
    assert C.family_of("T2 PSNR of pix2pix minus tissue remapping (dB)") == "GAN"
    assert C.family_of("voxel AUPRC, best generative detector (VQ-VAE + transformer)") == "autoregressive"
    assert C.family_of("shape VAE + latent classifier: balanced accuracy") == "autoencoder"
    assert C.family_of("min(brain tissue, heart) mean Dice of the U-Nets") == "autoencoder"
    assert C.family_of("R² of CSF fraction given age") == "-" and C.family_of(None) == "-"


def test_gather_reads_this_profiles_results_and_says_what_is_missing(results):
    table = C.gather(results, PAGES, "cpu", skip=["ch17_conclusion"])
    assert list(table["page"]) == ["ch03_gans", "ch11_denoising", "ch12_anomaly", "ch13_registration"]
    status = dict(zip(table["page"], table["status"]))
    assert status == {"ch03_gans": "ran", "ch11_denoising": "ran", "ch12_anomaly": "not run",
                      "ch13_registration": "smoke result only"}
    gans = table.set_index("page").loc["ch03_gans"]
    assert gans["family"] == "GAN" and gans["headline goal met"] is True and gans["goals met"] == 1
    assert gans["goals"] == 2 and gans["gates passed"] is True and gans["seconds"] == 120.0
    s = C.summary(table)
    assert (s["ran"], s["with_goal"], s["met"], s["met_share"]) == (2, 2, 1, 0.5)
    assert (s["within_limit"], s["seconds"], s["slowest"]) == (1, 300.0, "ch11_denoising")
    assert list(C.missed(table).index) == ["ch11_denoising"]
    shown = C.presented(table)
    assert shown.loc["ch03_gans", "goal"] == "<= 0.5" and shown.loc["ch03_gans", "headline goal"] == "met"
    assert shown.loc["ch11_denoising", "headline goal"] == "not met" and shown.loc["ch11_denoising", "gates"] == "passed"
    assert shown.loc["ch12_anomaly", "status"] == "not run"


def test_by_application_sets_the_survey_beside_the_books_headlines(results):
    apps = C.by_application(C.gather(results, PAGES, "cpu"))
    assert len(apps) == len(SURVEY_TABLES) and apps["papers"].sum() == sum(t[3] for t in SURVEY_TABLES)
    assert (apps[["GAN", "autoencoder", "autoregressive"]].sum(axis=1) >= apps["papers"]).all()   # a row may count twice
    assert apps.loc["Denoising", "families named here"] == "autoencoder"
    assert apps.loc["Denoising", "met its goal here"] == "-"
    assert apps.loc["Segmentation", "survey's most used"] == "autoencoder"


def test_an_empty_results_folder_gives_a_table_of_pages_not_run(tmp_path):
    table = C.gather(tmp_path, PAGES, "cpu")
    assert (table["status"] == "not run").all()
    assert C.summary(table)["ran"] == 0 and C.summary(table)["met_share"] == 0.0 and C.missed(table).empty


def test_a_broken_result_file_is_one_line(tmp_path):
    (tmp_path / "ch03_gans.json").write_text("{not json")
    with pytest.raises(ValueError, match="ch03_gans.json: not a readable result file"):
        C.gather(tmp_path, PAGES, "cpu")
    (tmp_path / "ch03_gans.json").write_text('{"chapter": "ch03_gans"}')
    with pytest.raises(ValueError, match=r"not a result written by record\(\) \(missing profile, metric, checks\)"):
        C.gather(tmp_path, PAGES, "cpu")


def test_the_conclusions_figures(results):
    table = C.gather(results, PAGES, "cpu")
    assert len(plot_page_seconds(table, C.LIMIT_S).axes[0].patches) == 2
    assert len(plot_survey_counts(C.by_application(table)).axes[0].patches) == 3 * len(SURVEY_TABLES)
    with pytest.raises(ValueError, match="plot_page_seconds"):
        plot_page_seconds(table.drop(columns="seconds"), 150)
