"""The book's plan as data: chapters, the survey sections they follow, and the taxonomy map.

Chapter 2 draws the survey's taxonomy from this table; a chapter is a link only when its
notebook exists in ``book/``, otherwise it is listed as "coming" (the book has no dead links).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Chapter:
    number: int
    slug: str           # book/ch{number:02d}_{slug}.ipynb
    title: str
    survey: str         # survey section(s)
    models: str

    @property
    def stem(self) -> str:
        return f"ch{self.number:02d}_{self.slug}"


CHAPTERS = (
    Chapter(1, "volumes", "3D medical volumes", "§1, §2.7", "2D vs 3D convolution cost"),
    Chapter(2, "taxonomy", "Unconditional vs conditional generation", "§2.2, §2.6", "the taxonomy"),
    Chapter(3, "gans", "GANs in 3D", "§2.3", "GAN, cGAN, WGAN-GP, pix2pix, CycleGAN, StyleGAN2 blocks"),
    Chapter(4, "autoencoders", "Autoencoders", "§2.4.1–2.4.5", "AE, VAE, CVAE, U-Net, DAE, deep SCM"),
    Chapter(5, "diffusion", "Diffusion models", "§2.4.6, §4.4", "DDPM, DDIM, latent diffusion"),
    Chapter(6, "autoregressive", "Autoregressive models", "§2.5", "3D PixelCNN, VQ-VAE + transformer"),
    Chapter(7, "synthesis", "Unconditional synthesis", "§3.1", "α-WGAN-GP, 3D StyleGAN2, LDM"),
    Chapter(8, "classification", "Classification", "§3.2", "VAE latent classifier, synthetic augmentation"),
    Chapter(9, "conditional", "Conditional synthesis", "§3.3", "pix2pix, CycleGAN, counterfactuals, super-resolution"),
    Chapter(10, "segmentation", "Segmentation", "§3.4", "3D U-Net, Vox2Vox, VAE-regularised U-Net"),
    Chapter(11, "denoising", "Denoising", "§3.5", "DAE, RED-WGAN"),
    Chapter(12, "anomaly", "Anomaly detection", "§3.6", "VAE residuals, VQ-VAE + transformer likelihood"),
    Chapter(13, "registration", "Registration", "§3.7", "VoxelMorph, diffeomorphic VoxelMorph"),
    Chapter(14, "fewshot", "Few-shot and self-supervised learning", "§4.1, §4.2", "pretext pretraining, few-shot GAN, multi-atlas"),
    Chapter(15, "efficient", "Efficient 3D architectures", "§4.3", "separable, split & shuffle, 2.5D"),
    Chapter(16, "trust", "Trustworthiness and bias", "§4.5", "site shift, harmonisation, MC dropout"),
    Chapter(17, "conclusion", "Conclusion", "§5", "every chapter's results"),
)

# The survey's taxonomy (its Fig. 2 and §2.2): model families and the tasks they serve, each
# pointing at the chapters of this book that build them.
TAXONOMY = {
    "Unconditional models — input: noise z": {
        "families": [("GANs", [3]), ("Autoencoders (VAE, DDPM)", [4, 5]), ("Autoregressive models", [6])],
        "tasks": [("Unconditional synthesis", [7]), ("Classification", [8])],
    },
    "Conditional models — input: noise z and data X₁": {
        "families": [("Conditional GANs (cGAN, pix2pix, CycleGAN)", [3, 9]), ("Conditional VAE, U-Net, DAE", [4]),
                     ("Conditional autoregressive / transformer", [6, 12])],
        "tasks": [("Conditional synthesis", [9]), ("Segmentation", [10]), ("Denoising", [11]),
                  ("Anomaly detection", [12]), ("Registration", [13])],
    },
}


# The publications the survey lists for each application, in its Tables 2-8, counted by family from
# the tables' model column: a row that names a GAN and an autoencoder (e.g. HA-GAN, GAN + AE)
# counts for both. GAN: any GAN, pix2pix; autoencoder: AE, VAE, CVAE, VQ-VAE, U-Net, DDPM;
# autoregressive: PixelCNN. Rows: (application, survey table, book chapter, listed, GAN, AE, AR).
SURVEY_TABLES = (
    ("Unconditional synthesis", 2, 7, 10, 8, 3, 0),
    ("Classification", 3, 8, 5, 1, 3, 1),
    ("Conditional synthesis", 4, 9, 23, 20, 5, 0),
    ("Segmentation", 5, 10, 26, 15, 17, 0),
    ("Denoising", 6, 11, 5, 5, 0, 0),
    ("Detection (anomalies)", 7, 12, 4, 2, 3, 0),
    ("Registration", 8, 13, 7, 3, 4, 0),
)


def available_chapters(book_dir: str | Path) -> set[int]:
    """Numbers of the chapters whose notebook exists in ``book_dir``."""
    book_dir = Path(book_dir)
    return {c.number for c in CHAPTERS if (book_dir / f"{c.stem}.ipynb").exists()}


def _chapter_link(number: int, available: set[int]) -> str:
    ch = CHAPTERS[number - 1]
    label = f"Ch. {number}"
    if number in available:
        return f'<a class="g3-link" href="{ch.stem}.html" title="{html.escape(ch.title)}">{label}</a>'
    return f'<span class="g3-coming" title="{html.escape(ch.title)}: coming">{label} (coming)</span>'


def taxonomy_html(available: set[int]) -> str:
    """The taxonomy as an HTML map: two branches, their families and tasks, each with chapter links."""
    style = (
        "<style>.g3-map{display:flex;gap:1em;flex-wrap:wrap;font-size:.92em}"
        ".g3-branch{flex:1 1 20em;border:2px solid #4a7ab5;border-radius:8px;padding:.6em}"
        ".g3-branch h4{margin:.1em 0 .5em 0}.g3-node{border:1px solid #bbb;border-radius:6px;padding:.25em .5em;"
        "margin:.25em 0;display:flex;justify-content:space-between;gap:.5em}"
        ".g3-coming{color:#888;font-style:italic}.g3-kind{font-weight:600;margin-top:.4em}</style>"
    )
    parts = [style, '<div class="g3-map">']
    for branch, groups in TAXONOMY.items():
        parts.append(f'<div class="g3-branch"><h4>{html.escape(branch)}</h4>')
        for kind, nodes in groups.items():
            parts.append(f'<div class="g3-kind">{"Model families" if kind == "families" else "Tasks"}</div>')
            for name, numbers in nodes:
                links = " · ".join(_chapter_link(n, available) for n in numbers)
                parts.append(f'<div class="g3-node"><span>{html.escape(name)}</span><span>{links}</span></div>')
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def chapter_table(available: set[int]) -> list[dict[str, str]]:
    """One row per chapter of the plan: number, title, survey section, models, and whether it exists."""
    return [{"chapter": c.number, "title": c.title, "survey": c.survey, "models": c.models,
             "status": "in the book" if c.number in available else "coming"} for c in CHAPTERS]
